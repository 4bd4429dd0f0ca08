"""compose: Conv → [BatchNorm | PReLU(α≈1) | Dropout | Identity]* → Conv becomes one Conv.

With the middle folded into the first conv (``fxfuse.affine``), the second conv reads
h[i] = Σ_a W1[a]·x[s1·i + d1·a − p1] + b1 at positions s2·j + d2·b, so

    y[j] = Σ_c K[c]·x[s1·s2·j + c − p1] + b2 + Σ_b W2[b]·b1,   K[s1·d2·b + d1·a] += W2[b]·W1[a]

per spatial dim: kernel size s1·d2·(k2 − 1) + d1·(k1 − 1) + 1 (k1 + k2 − 1 for unit stride and
dilation, LayerCollapse Sec. 3.1), stride s1·s2, the first conv's padding and padding mode,
dilation 1. Grouped convs compose through their dense (block-diagonal) form; equal group
counts stay grouped.

Exact when the second conv has no padding (its zero padding of the hidden map is not what the
composed kernel sees at the borders) and the first conv's padding is symmetric. Applied only
where it pays, the corrected Eq. 8 (the printed one is new/old inverted against Eq. 7):

    Gain_conv = 1 − k²·c_in·c_out / (k1²·c_in·c_hidden + k2²·c_hidden·c_out) > 0.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxfuse.affine import ChannelAffine, affine_between, fold_into_weights, is_between_op, new_conv
from fxfuse.conv import (compose_gain, compose_kernels, composed_groups, composed_shape, composition_problem,
                         dense_weight, grouped_weight, symmetric_padding)
from fxfuse.match import find_chains, kinds
from fxfuse.ir import CONV, Op
from fxfuse.pass_manager import Candidate, Options


def compose_convs(first: Op, second: Op, affine: ChannelAffine) -> nn.Module:
    """The single conv computing ``second(affine(first(x)))`` (see the module docstring)."""
    c1, c2 = first.conv, second.conv
    w1, b1 = fold_into_weights(first.weight, first.bias, affine)
    w1, w2 = dense_weight(w1, c1.groups), dense_weight(second.weight.detach().double(), c2.groups)
    groups = composed_groups(c1, c2)
    kernel = grouped_weight(compose_kernels(w1, w2, c1.stride, c1.dilation, c2.dilation), groups)
    bias = w2.sum(dim=tuple(range(2, w2.dim()))) @ b1
    if second.bias is not None:
        bias = bias + second.bias.detach().double()
    stride = tuple(a * b for a, b in zip(c1.stride, c2.stride))
    return new_conv(c1, kernel, bias, first.weight, stride=stride, padding=symmetric_padding(first), dilation=1,
                    groups=groups)


class ComposeConv:
    name = "compose"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for chain, reason in find_chains(gm, kinds(CONV), is_between_op, kinds(CONV)):
            first, second = chain.first, chain.last
            reason = reason or composition_problem(first, second)
            affine = reason or affine_between(first, chain.middle, options.tau)
            if isinstance(affine, str):
                found.append(Candidate(chain, reason=affine))
                continue
            gain = compose_gain(first.weight, second.weight, composed_shape(first, second))
            if gain <= 0 and not options.force:
                found.append(Candidate(chain, reason=f"compression gain (Eq. 8, corrected) {gain:.2f} ≤ 0"))
                continue
            found.append(Candidate(chain, compose_convs(first, second, affine), exact=affine.exact,
                                   tolerance=options.conv_tolerance if affine.exact else options.approx_tolerance,
                                   input_rank=affine.rank))
        return found
