"""untranspose_linear: transpose → Linear → transpose becomes one left multiplication.

    (Linear(xᵀ))ᵀ = (xᵀ·Wᵀ + b)ᵀ = W·x + b·1ᵀ,   x of shape (..., n, c), W (m, n)

over the last two axes (``fxfuse.modules.LeftLinear``). MLP-Mixer's token mixing is this
chain; once LayerCollapse leaves one Linear in it, the two transposes' copies are what is left
to pay for. Exact up to float summation order (the same products and sums).

Matches ``x.transpose(a, b)`` / ``torch.transpose`` where {a, b} are the last two axes (negative
axes, or the rank from example inputs, which the result then checks on every call) and the Linear's
output feeds only the second transpose.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxfuse.match import find_chains, kinds, rank_of
from fxfuse.ir import LINEAR, Op
from fxfuse.modules import LeftLinear
from fxfuse.pass_manager import Candidate, Options


def swapped_axes(node: fx.Node) -> tuple[int, int] | None:
    """The two axes a transpose node swaps, or None when ``node`` is no transpose."""
    is_method = node.op == "call_method" and node.target == "transpose"
    is_function = node.op == "call_function" and node.target in (torch.transpose, torch.ops.aten.transpose.int)
    if (is_method or is_function) and len(node.args) == 3 and not node.kwargs:
        return node.args[1], node.args[2]
    return None


def swaps_last_two(node: fx.Node) -> bool | None:
    """True / False, or None when the rank needed to tell is unknown (no example inputs)."""
    axes = swapped_axes(node)
    if axes is None:
        return False
    if all(a < 0 for a in axes):
        return sorted(axes) == [-2, -1]
    rank = rank_of(node)
    if rank is None:
        return None
    return sorted(a % rank for a in axes) == [rank - 2, rank - 1]


def _transpose(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    return Op("transpose", (node,), node.args[0]) if swapped_axes(node) is not None else None


class UntransposeLinear:
    name = "untranspose_linear"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for chain, reason in find_chains(gm, _transpose, kinds(LINEAR), _transpose):
            first, last = chain.first.output, chain.last.output
            proven = (swaps_last_two(first), swaps_last_two(last))
            reason = reason or (
                "more than one Linear between the transposes" if len(chain.middle) != 1 else
                "without example inputs the rank is unknown, so the transposed axes are not proven the last two"
                if None in proven else "" if all(proven) else "the transposes do not swap the last two axes")
            if reason:
                found.append(Candidate(chain, reason=reason))
                continue
            layer = chain.middle[0]
            bias = None if layer.bias is None else layer.bias.detach().clone()
            module = LeftLinear(layer.weight.detach().clone(), bias).requires_grad_(layer.weight.requires_grad)
            negative = all(a < 0 for node in (first, last) for a in swapped_axes(node))
            found.append(Candidate(chain, module.eval(), tolerance=options.tolerance,
                                   input_rank=None if negative else rank_of(first)))
        return found
