"""Attention backends: a platform's standard backend with sparse pre-fill in front.

Each module imports vLLM when imported; vLLM imports them through the registry entries that
:func:`minference_vllm.register` installs.
"""
