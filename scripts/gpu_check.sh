#!/usr/bin/env bash
# The device check for the quantized CUDA path (issue 27): one prepared, self-contained command for a lent GPU.
#   0. on a CPU machine with ModelOpt, beforehand: `python scripts/gpu_check.py prepare` → .gpu-check/ (~11 MiB:
#      the calibrated tiny bundle + fp32 reference outputs) and .whl/ (transformers 5.24's wheel, 13 MiB: the
#      image has 5.17, older than the `cache=` API), both git-ignored, both carried to the device;
#   1. the carried wheels into /tmp/gpu-check-site (PYTHONPATH), then `pip install --no-deps -e .` (the
#      package-dir mapping needs an install; the image has every other dependency);
#   2. preflight: every module, version and carried file the check needs, else exit 3 naming what is missing;
#   3. the gpu-marked tests (cuda target on CUDA against the carried reference, describe(): cuda-graph decode and
#      the kernel modes; torch backend fp16 / CUDA graph); a skipped test fails the check;
#   4. each KernelOptions alternative timed (LM head, W8A8 eager / compiled, W4A16 tinygemm / cuBLAS over M);
#   5. `nvila-edge bench --preset nvila-lite-2b --backend torch --device cuda` (random weights), JSON to $OUT.
# Usage: OUT=/tmp/out scripts/gpu_check.sh [--cpu-dry-run] [--quick]
#   --cpu-dry-run: every step on the CPU kernels (tiny preset, kernels scaled down), to prove the command here.
# On a lent GPU (docs/BENCHMARKS.md): run(command="bash scripts/gpu_check.sh --quick", carry=[".gpu-check", ".whl"],
#   timeout_s=540); ~8 min on an H100 is the budget, so a rerun fits in the 15 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=0 QUICK=""
for a in "$@"; do
    case "$a" in --cpu-dry-run) DRY=1 ;; --quick) QUICK=--quick ;; *) echo "unknown argument $a"; exit 64 ;; esac
done
export PYTHONUNBUFFERED=1 NVILA_GPU_ARTEFACTS=${NVILA_GPU_ARTEFACTS:-$PWD/.gpu-check}
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step install
if ls .whl/*.whl > /dev/null 2>&1; then  # carried wheels the image lacks (transformers >= 5.24), never fetched
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
        .whl/*.whl || { echo "installing the carried wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . > /tmp/gpu-check-install.log 2>&1 \
    || { tail -20 /tmp/gpu-check-install.log; echo "pip install --no-deps -e . failed"; exit 3; }
step preflight
if [ $DRY = 1 ]; then
    "$PY" scripts/gpu_check.py preflight --cpu | tee "$OUT/preflight.json"; PRE=${PIPESTATUS[0]}
    export NVILA_GPU_TEST_DEVICE=cpu
    DEV=cpu PRESET=tiny KCPU=--cpu
else
    "$PY" scripts/gpu_check.py preflight | tee "$OUT/preflight.json"; PRE=${PIPESTATUS[0]}
    "$PY" scripts/gpu_check.py env > "$OUT/env.json"; cat "$OUT/env.json"
    DEV=cuda PRESET=nvila-lite-2b KCPU=""
fi
[ "$PRE" = 0 ] || { echo "preflight failed: nothing was run (see above)"; exit 3; }
step "gpu tests on $DEV"
"$PY" -m pytest -q -rs -m gpu tests/test_cuda_target.py tests/test_runtime_gpu.py -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
TESTS=${PIPESTATUS[0]}
step "kernel alternatives on $DEV"
"$PY" scripts/gpu_check.py kernels "$OUT/kernels.json" $KCPU > /tmp/gpu-check-kernels.log 2>&1; KERN=$?
tail -40 /tmp/gpu-check-kernels.log
step "bench $PRESET on $DEV"
"$PY" -m nvila_edge.cli bench --preset $PRESET --backend torch --device $DEV $QUICK \
    --work-dir "$OUT/work" --json "$OUT/bench-$PRESET-$DEV.json" --no-write-docs 2>&1 | tee "$OUT/bench.log" | tail -30
BENCH=${PIPESTATUS[0]}
rm -rf "$OUT/work"
step summary
"$PY" scripts/gpu_check.py summary "$OUT" "$TESTS" "$BENCH" "$KERN" | tee "$OUT/summary.json"; SUM=${PIPESTATUS[0]}
[ "$TESTS" = 0 ] && [ "$BENCH" = 0 ] && [ "$KERN" = 0 ] && [ "$SUM" = 0 ]
