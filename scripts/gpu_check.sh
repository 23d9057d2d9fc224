#!/usr/bin/env bash
# One GPU check for the quantized CUDA path (issue 17), for a lent GPU machine (or any CUDA box):
#   1. the gpu-marked tests (cuda target on CUDA, torch backend fp16 / CUDA graph), then
#   2. `nvila-edge bench --preset nvila-lite-2b --backend torch --device cuda` (random weights), JSON to $OUT.
# Usage: OUT=/tmp/out scripts/gpu_check.sh [--quick]     (needs torch with CUDA; ~5-8 min on an H100)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
QUICK=${1:-}
"$PY" scripts/gpu_check.py env > "$OUT/env.json" || { echo "no usable CUDA torch; see $OUT/env.json"; exit 2; }
cat "$OUT/env.json"
"$PY" -m pytest -q -x -m gpu tests/test_cuda_target.py tests/test_runtime_gpu.py --junitxml="$OUT/gpu-tests.xml" \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -20
TESTS=${PIPESTATUS[0]}
"$PY" -m nvila_edge.cli bench --preset nvila-lite-2b --backend torch --device cuda $QUICK \
    --work-dir "$OUT/work" --json "$OUT/bench-nvila-lite-2b-cuda.json" --no-write-docs 2>&1 | tee "$OUT/bench.log" | tail -30
BENCH=${PIPESTATUS[0]}
rm -rf "$OUT/work"
"$PY" scripts/gpu_check.py summary "$OUT" "$TESTS" "$BENCH" | tee "$OUT/summary.json"
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ]
