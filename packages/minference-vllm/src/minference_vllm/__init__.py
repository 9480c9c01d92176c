"""minference-vllm: a vLLM V1 plugin that does sparse long-context pre-fill.

vLLM finds :func:`register` through the ``vllm.general_plugins`` entry point. Importing this
package imports neither vLLM nor torch and changes nothing; see ``docs/guides/vllm.md``.
"""

from __future__ import annotations

from .__about__ import __version__
from ._plugin import register
from .settings import PluginSettings, resolve_settings

__all__ = ["PluginSettings", "__version__", "register", "resolve_settings"]
