#!/usr/bin/env bash
# The device check of docs/performance.md, run on a lent GPU machine from the repository root
# after scripts/gpu_wheels.sh ran here: the device tool's run, carry [".whl"], command
# "bash scripts/gpu_check.sh" (estimated at 6 minutes on an H100; not yet run on one). Random
# weights of Llama 3.2 1B's shape in bf16, against an untouched HF model and the plain engine in
# the same run; logs land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers, transformer_lens, mechmem
from importlib.metadata import version
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("transformers", transformers.__version__, "transformer-lens", version("transformer-lens"))
PY
shape=(--random-shape llama-3.2-1b --dtype bfloat16 --device cuda)
# Each benchmark under its own limit, so one that fails or overruns leaves the other's figures.
status=0
timeout 330 python3 benchmarks/bench_generate.py "${shape[@]}" --batches 1 16 --tokens 128 \
  --repeats 3 > "$OUT/bench_generate.txt" 2>&1 || { status=1; echo "bench_generate failed"; }
grep -v "Loading weights" "$OUT/bench_generate.txt" | tail -25 || true
timeout 200 python3 benchmarks/bench_drugs.py "${shape[@]}" --tokens 64 --repeats 6 \
  > "$OUT/bench_drugs.txt" 2>&1 || { status=1; echo "bench_drugs failed"; }
grep -v "Loading weights" "$OUT/bench_drugs.txt" | tail -12 || true
exit "$status"
