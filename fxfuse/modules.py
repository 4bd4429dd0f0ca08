"""Modules that fxfuse's rewrites put into graphs (importable, so optimized graphs pickle)."""
from __future__ import annotations

import torch
from torch import nn


class LeftLinear(nn.Module):
    """y = W·x + b[:, None] over the second-to-last axis: x (..., n, c) ↦ (..., m, c).

    The same function as ``linear(x.transpose(-1, -2)).transpose(-1, -2)`` without the two
    transposes, whose non-contiguous results cost copies (MLP-Mixer's token mixing). One batched
    GEMM whose weight has batch stride 0: ``torch.matmul(W, x)`` would fold 2-D @ 3-D through
    transposes and copy x (on an H100 that made MLP-Mixer-B/16 1.27x slower at batch 256;
    ``benchmarks/left_linear_gpu.py``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, *x.shape[-2:])
        y = torch.bmm(self.weight.expand(flat.shape[0], -1, -1), flat).reshape(*x.shape[:-2], -1, x.shape[-1])
        return y if self.bias is None else y + self.bias[:, None]
