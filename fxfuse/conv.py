"""Two convolutions as one: the composed kernel, its geometry, and when composing is exact and pays.

The derivation, the exactness conditions and the corrected Eq. 8 are in ``passes/compose_conv.py``,
the pass that applies them; ``prepare_collapse`` asks the same questions of a pair before training it.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from .ir import Op


def symmetric_padding(conv: Op) -> tuple[int, ...] | None:
    """Per-dim padding of ``conv`` as numbers; None for an asymmetric 'same' padding."""
    padding, kernel = conv.conv.padding, conv.weight.shape[2:]
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "valid":
        return (0,) * len(kernel)
    totals = [d * (k - 1) for d, k in zip(conv.conv.dilation, kernel)]
    return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None

def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in/g, *k) grouped weight as the equivalent block-diagonal (out, in, *k) weight."""
    out_g, in_g = weight.shape[0] // groups, weight.shape[1]
    dense = weight.new_zeros(weight.shape[0], in_g * groups, *weight.shape[2:])
    for g in range(groups):
        dense[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = weight[g * out_g:(g + 1) * out_g]
    return dense

def grouped_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``dense_weight``: the diagonal blocks, stacked along the output channels."""
    out_g, in_g = dense.shape[0] // groups, dense.shape[1] // groups
    return torch.cat([dense[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] for g in range(groups)])

def composed_size(k1, k2, stride1, dilation1, dilation2) -> list[int]:
    """Kernel size of W2 ∘ W1 per spatial dim: s1·d2·(k2 − 1) + d1·(k1 − 1) + 1."""
    return [s * d2 * (b - 1) + d1 * (a - 1) + 1 for a, b, s, d1, d2 in zip(k1, k2, stride1, dilation1, dilation2)]

def composed_groups(c1, c2) -> int:
    """Equal group counts stay grouped; otherwise the composition is dense."""
    return c1.groups if c1.groups == c2.groups else 1

def composed_shape(first: Op, second: Op) -> tuple[int, ...]:
    """The single conv's weight shape (out, in / groups, *kernel), known before composing."""
    c1, c2 = first.conv, second.conv
    size = composed_size(first.weight.shape[2:], second.weight.shape[2:], c1.stride, c1.dilation, c2.dilation)
    in_channels = first.weight.shape[1] * c1.groups
    return (second.out_channels, in_channels // composed_groups(c1, c2), *size)

def compose_kernels(w1: torch.Tensor, w2: torch.Tensor, stride1, dilation1, dilation2) -> torch.Tensor:
    """K = W2 ∘ W1 for dense weights w1 (hidden, in, *k1), w2 (out, hidden, *k2)."""
    k1, k2 = w1.shape[2:], w2.shape[2:]
    kernel = w1.new_zeros(w2.shape[0], w1.shape[1], *composed_size(k1, k2, stride1, dilation1, dilation2))
    for b in itertools.product(*(range(n) for n in k2)):
        start = [s * d2 * i for i, s, d2 in zip(b, stride1, dilation2)]
        window = tuple(slice(o, o + d1 * (a - 1) + 1, d1) for o, a, d1 in zip(start, k1, dilation1))
        kernel[(slice(None), slice(None)) + window] += torch.einsum("oh,hi...->oi...", w2[(..., *b)], w1)
    return kernel

def compose_gain(w1: torch.Tensor, w2: torch.Tensor, composed_shape: Sequence[int]) -> float:
    """Corrected Eq. 8: 1 − (composed weights) / (weights of the two convs)."""
    return 1 - math.prod(composed_shape) / (w1.numel() + w2.numel())

def composition_problem(first: Op, second: Op) -> str | None:
    """Why ``second ∘ first`` is not one exact conv, or None."""
    c1, c2 = first.conv, second.conv
    if c1.dims != c2.dims:
        return f"Conv{c1.dims}d → Conv{c2.dims}d: different dimensionality"
    if symmetric_padding(second) != (0,) * c2.dims:
        return f"the second conv pads the hidden map (padding={c2.padding!r}); composing would change the borders"
    if symmetric_padding(first) is None:
        return f"the first conv's padding {c1.padding!r} is asymmetric"
    return None
