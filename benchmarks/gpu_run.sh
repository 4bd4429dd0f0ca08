#!/usr/bin/env bash
# The whole device check in one call (an H100/H200 machine whose python has torch, timm, onnx):
# install, the CUDA and core tests on that torch, then the GPU benchmarks, most wanted first.
# Everything goes to $OUT (at most 8 files come back): tests.log (install too), bench.log,
# left_linear_{matmul,bmm,baddbmm}_<card>.json and gpu_<card>_{eager,compile,more}.json, each rewritten
# after every variant so a cut-off run keeps its rows.
#   bash benchmarks/gpu_run.sh      (OUT=/some/dir to choose where)
set -u
OUT=${OUT:-benchmarks/results}
RES=$(mktemp -d)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/tests.log" 2>&1
python -m pytest -q -m "not slow" -p no:cacheprovider tests/test_preservation.py tests/test_optimize.py \
    tests/test_collapse_linear.py tests/test_compose_conv.py tests/test_fold_batchnorm.py tests/test_untranspose_linear.py \
    tests/test_tie.py >> "$OUT/tests.log" 2>&1
nvidia-smi >> "$OUT/tests.log" 2>&1
CARD=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
bench() { python -m fxfuse.cli bench --suite gpu --no-onnx --out "$RES" "$@"; }
{
  python benchmarks/left_linear_gpu.py --out "$RES"  # decides whether untranspose_linear becomes a default
  # --profile profiles the last of --dtypes
  bench --models vit_b16 mixer_b16 vit_t16 --batches 1 64 256 --dtypes float32 bfloat16 --modes eager cudagraph \
      --profile --name "gpu_${CARD}_eager"
  bench --models vit_b16 mixer_b16 vit_t16 --batches 64 256 --modes compile --name "gpu_${CARD}_compile"
  bench --models gpt_tied resnet18 vgg11 --batches 1 64 --modes eager cudagraph compile --name "gpu_${CARD}_more"
} > "$OUT/bench.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  sleep 10
  cp "$RES"/*.json "$OUT/" 2>/dev/null
done
cp "$RES"/*.json "$OUT/" 2>/dev/null
true
