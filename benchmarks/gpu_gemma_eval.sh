#!/usr/bin/env bash
# Gemma-3-270M accuracy on a GPU: `minference eval` over several lengths and methods. The GGUF file
# (253 MB) is too big for one transfer to the device machine, so it arrives in parts; this script
# assembles them, checks the SHA-256 and runs the eval. Usage:
#   bash benchmarks/gpu_gemma_eval.sh PARTS_DIR OUT_DIR [METHODS]
# (env LENGTHS, SEEDS, DEPTHS, GGUF_WHEEL_DIR: a folder with the gguf wheel when pip has no index)
set -euo pipefail
PARTS=${1:?folder of gemma-3-270m-q4_k_m.gguf parts (g.part00 ..)}
OUT=${2:?output folder}
METHODS=${3:-dense,vs:256:2048,vs:1024:8192,block:16:sampled,block:48:sampled,ashape:64:4096,oracle:0.05,oracle:0.1,oracle:0.2}
LENGTHS=${LENGTHS:-8k,16k,32k}
SEEDS=${SEEDS:-2}
DEPTHS=${DEPTHS:-0.1,0.5,0.9}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GGUF="$PARTS/gemma-3-270m-q4_k_m.gguf"
if [ ! -f "$GGUF" ]; then cat "$PARTS"/g.part* > "$GGUF"; fi
echo "$SHA  $GGUF" | sha256sum -c -
if ! python -c "import gguf" 2>/dev/null; then
    pip install --quiet --no-deps --target /tmp/site --no-index --find-links "${GGUF_WHEEL_DIR:?no gguf}" gguf
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT/packages/minference-kernels/src:$ROOT/packages/minference-patterns/src:$ROOT/packages/minference-hf/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python -m minference_hf eval --model "$GGUF" --device cuda --dtype bfloat16 --methods "$METHODS" \
    --lengths "$LENGTHS" --seeds "$SEEDS" --depths "$DEPTHS" --out-dir "$OUT"
