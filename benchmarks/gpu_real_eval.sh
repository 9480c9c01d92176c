#!/usr/bin/env bash
# Real-model accuracy on a GPU (the Triton path): the real-head table and derived configs, then
# `minference eval` over 2K-8K with several methods. Usage:
#   bash benchmarks/gpu_real_eval.sh PATH/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR [THRESHOLDS] [EXTRA_METHODS]
set -euo pipefail
GGUF=${1:?GGUF file}
OUT=${2:?output folder}
THR=${3:-0.95,0.97,0.99,o0.95,o0.97}
LENGTHS=${LENGTHS:-4k,8k}
SEEDS=${SEEDS:-3}
EXTRA=${4:-oracle:0.1,oracle:0.2,oracle:0.3,vs:64:512,block:16:sampled,ashape:64:1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$ROOT/packages/minference-kernels/src:$ROOT/packages/minference-patterns/src:$ROOT/packages/minference-hf/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
CFG=$(mktemp -d)
mkdir -p "$OUT"
python "$ROOT/benchmarks/real_heads.py" --model "$GGUF" --device cuda --n 8192 \
    --out "$OUT/real_heads_smollm2_8k.json" --derive "$THR" --configs-dir "$CFG"
METHODS=dense
for t in ${THR//,/ }; do
    r=$(python -c "t='$t'; print(('o' if t.startswith('o') else 'r') + str(int(round(float(t.lstrip('o')) * 1000))))")
    METHODS="$METHODS,config=$CFG/real_heads_smollm2_8k_config_$r.json"
done
python -m minference_hf eval --model "$GGUF" --device cuda --dtype bfloat16 \
    --methods "$METHODS,$EXTRA" --lengths "$LENGTHS" --seeds "$SEEDS" --out-dir "$OUT/eval"
