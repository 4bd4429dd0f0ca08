#!/usr/bin/env bash
# The whole device check in one call (an H100/H200 machine whose python has torch, timm, onnx):
# install, the CUDA and core tests on that torch, then the GPU benchmarks. Everything goes to $OUT
# (at most 8 files): install.log, tests.log, bench.log, gpu_eager.json, gpu_compile.json.
#   bash benchmarks/gpu_run.sh      (OUT=/some/dir to choose where)
set -u
OUT=${OUT:-benchmarks/results}
RES=$(mktemp -d)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
python -m pytest -q -m "not slow" -p no:cacheprovider tests/test_preservation.py tests/test_optimize.py \
    tests/test_collapse_linear.py tests/test_compose_conv.py tests/test_fold_batchnorm.py > "$OUT/tests.log" 2>&1
nvidia-smi >> "$OUT/tests.log" 2>&1
{
  python -m fxfuse.cli bench --suite gpu --batches 64 256 --modes eager cudagraph --no-onnx --profile --name gpu_eager --out "$RES"
  cp "$RES/gpu_eager.json" "$OUT/"
  python -m fxfuse.cli bench --suite gpu --models vit_b16 mixer_b16 vit_t16 --batches 64 256 --modes compile --no-onnx \
      --name gpu_compile --out "$RES"
} > "$OUT/bench.log" 2>&1 &
bench=$!
while kill -0 $bench 2>/dev/null; do  # keep partial results current in case the call times out
  sleep 10
  cp "$RES"/*.json "$OUT/" 2>/dev/null
done
cp "$RES"/*.json "$OUT/" 2>/dev/null
true
