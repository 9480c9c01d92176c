"""``minference eval`` with the sampled block scoring's rows per query block set to ``--rows``.

:data:`minference_kernels.ops.block_sampled.SAMPLED_ROWS` (4) sets how many query rows of each block the
``scoring="sampled"`` estimate computes exactly; its cost is about ``rows / 64`` of a dense layer
(v0.3.0-c). This runs the eval CLI (every argument after ``--`` is passed to ``minference eval``)
with another value, so that 1 and 4 rows can be compared on a real model through the whole
pipeline (pass keys, perplexity, top-1 agreement against dense):

    python benchmarks/eval_sampled_rows.py --rows 1 -- --model M.gguf --device cuda \
        --methods dense,block:8:sampled --lengths 8k --out-dir OUT

The rows value is added to the eval's own ``OUT/eval.json`` as ``"sampled_rows"`` (with a
provenance block, :mod:`_provenance`, where the eval did not write one). Run it with
``OMP_NUM_THREADS=1`` on a shared CPU: torch's threads spin against other processes there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _provenance import provenance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, required=True, help="sampled rows per query block (1-64)")
    ap.add_argument("eval_args", nargs=argparse.REMAINDER, help="arguments of minference eval")
    a = ap.parse_args()
    if not 1 <= a.rows <= 64:
        ap.error(f"--rows must be in 1..64, got {a.rows}")
    rest = a.eval_args[1:] if a.eval_args[:1] == ["--"] else a.eval_args
    from minference_hf.cli import main as cli_main
    from minference_kernels.ops import block_sampled

    block_sampled.SAMPLED_ROWS = a.rows  # read by the estimate at each call
    rc = cli_main(["eval", *rest])
    if rc != 0:
        return rc
    out = Path(rest[rest.index("--out-dir") + 1]) if "--out-dir" in rest else Path("eval-out")
    path = out / "eval.json"
    result = json.loads(path.read_text())
    result["sampled_rows"] = a.rows
    result.setdefault("provenance", provenance())
    path.write_text(json.dumps(result, indent=1))
    print(f"eval_sampled_rows: recorded sampled_rows={a.rows} in {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
