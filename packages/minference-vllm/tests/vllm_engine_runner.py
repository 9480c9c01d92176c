"""Run one vLLM engine on the tiny model in a fresh process and print the result as JSON.

Usage: ``python engine_runner.py SPEC.json OUT.json``. The spec names the model, the prompts
or ``rounds`` of prompts (one ``generate`` call per round, in order, so that a later round can hit
the prefix cache an earlier one filled), sampling and engine arguments, and optionally the
plugin's ``trace`` file. A prompt is a list of token ids, or a dict of ``TokensPrompt`` fields
(``{"prompt_token_ids": [...], "cache_salt": "..."}``: vLLM's per-request prefix-cache isolation).
The output holds, per request in order, the generated token ids, the log-probability of each
generated token and the number of prompt tokens served from vLLM's prefix cache; with a trace
file, also the number of trace lines written when each round had returned (every rank's sparse
calls of a round are traced before its outputs exist: each rank traces inside its attention, which
the step's all-reduce waits for). A fresh process per engine keeps plugin registration,
environment variables and vLLM's process-wide state from leaking between engine configurations.
"""

from __future__ import annotations

import json
import os
import sys


def _trace_lines(path: str | None) -> int:
    if path is None or not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    params = SamplingParams(
        temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=0
    )
    trace = spec.get("trace")
    outputs, trace_lines = [], []
    for round_ in spec.get("rounds", [spec.get("prompts")]):
        prompts = [
            TokensPrompt(**p) if isinstance(p, dict) else TokensPrompt(prompt_token_ids=p)
            for p in round_
        ]
        outputs += llm.generate(prompts, params, use_tqdm=False)
        trace_lines.append(_trace_lines(trace))
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "text": [o.outputs[0].text for o in outputs],
        # logprobs=0: each position holds the sampled token's entry only
        "logprobs": [
            [step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in outputs
        ],
        "num_cached_tokens": [o.num_cached_tokens for o in outputs],
        "trace_lines": trace_lines,
    }
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
