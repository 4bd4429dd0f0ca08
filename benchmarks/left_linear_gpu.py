"""MLP-Mixer token mixing after untranspose_linear, with LeftLinear's forward written three ways:
time fxfuse's Mixer-B/16 against the original and the hand-collapsed one, in the same run, per way.

    python benchmarks/left_linear_gpu.py --out benchmarks/results

matmul:   torch.matmul(W, x) + b      (2-D @ 3-D: ATen folds it through transposes, copying x)
bmm:      torch.bmm(W.expand(B, m, n), x) + b   (stride-0 batch of W, no copy of x)
baddbmm:  torch.baddbmm(b, W.expand(B, m, n), x) (bias in the GEMM)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fxfuse import bench
from fxfuse.modules import LeftLinear


def _batched(fn):
    def forward(self, x):
        flat = x.reshape(-1, *x.shape[-2:])
        return fn(self, flat, self.weight.expand(flat.shape[0], -1, -1)).reshape(*x.shape[:-2], -1, x.shape[-1])
    return forward


WAYS = {
    "matmul": lambda self, x: torch.matmul(self.weight, x) + self.bias[:, None],
    "bmm": _batched(lambda self, x, w: torch.bmm(w, x) + self.bias[:, None]),
    "baddbmm": _batched(lambda self, x, w: torch.baddbmm(self.bias[:, None], w, x)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--ways", nargs="+", default=list(WAYS))
    args = parser.parse_args()
    for way in args.ways:
        LeftLinear.forward = WAYS[way]
        bench.run("gpu", Path(args.out), batches=[64, 256], modes=("eager", "cudagraph"), onnx=False, profile=True,
                  models=["mixer_b16"], name=f"mixer_left_linear_{way}")


if __name__ == "__main__":
    main()
