"""MLP-Mixer token mixing after untranspose_linear, with LeftLinear's forward written three ways:
time fxfuse's Mixer-B/16 against the original and the hand-collapsed one, in the same run, per way.

    python benchmarks/left_linear_gpu.py --out benchmarks/results     (writes left_linear_<way>_<device>.json)

matmul:   torch.matmul(W, x) + b      (2-D @ 3-D: ATen folds it through transposes, copying x)
bmm:      torch.bmm(W.expand(B, m, n), x) + b   (stride-0 batch of W, no copy of x; LeftLinear's own)
baddbmm:  torch.baddbmm(b, W.expand(B, m, n), x) (bias in the GEMM)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fxfuse import bench
from fxfuse.modules import LeftLinear
from fxfuse.passes import WITH_UNTRANSPOSE


def _baddbmm(self, x):
    flat = x.reshape(-1, *x.shape[-2:])
    y = torch.baddbmm(self.bias[:, None], self.weight.expand(flat.shape[0], -1, -1), flat)
    return y.reshape(*x.shape[:-2], -1, x.shape[-1])


WAYS = {
    "matmul": lambda self, x: torch.matmul(self.weight, x) + self.bias[:, None],
    "bmm": LeftLinear.forward,
    "baddbmm": _baddbmm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--ways", nargs="+", default=list(WAYS))
    parser.add_argument("--models", nargs="+", default=["mixer_b16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()
    device = torch.cuda.get_device_name().split()[1].lower() if torch.cuda.is_available() else "cpu"
    for way in args.ways:
        LeftLinear.forward = WAYS[way]
        bench.run("gpu", Path(args.out), batches=args.batches, modes=("eager", "cudagraph"), onnx=False, profile=True,
                  models=args.models, name=f"left_linear_{way}_{device}", passes=WITH_UNTRANSPOSE)


if __name__ == "__main__":
    main()
