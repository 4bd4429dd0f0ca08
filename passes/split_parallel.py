"""split_parallel: the inverse of ``fuse_parallel`` — a layer whose output is only split along its
feature axis becomes one layer per part.

    split([W₁; …; W_k]·x + [b₁; …; b_k]) = (W₁x + b₁, …, W_kx + b_k)

Exact up to float summation order (the same dot products). Opt-in, for when the parts matter: the
tie pass aligns a gated MLP's gate and up projections separately, a LoRA adapter targets
``q_proj``/``v_proj``. A part nothing reads is not computed at all. Matches ``torch.split``,
``Tensor.split`` and ATen's ``split_with_sizes``/``split`` with the axis given as negative or
proven by the example inputs' rank.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from fxfuse.affine import new_conv, new_linear
from fxfuse.ir import CONV, LINEAR, Op, arguments, view
from fxfuse.match import Region, rank_of
from fxfuse.pass_manager import Candidate, Options

from .fuse_parallel import feature_axis

SPLITS = {torch.split, torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor}


def split_sizes(node: fx.Node, total: int) -> tuple[list[int], int] | None:
    """``(sizes, dim)`` of a split node (an int split size expanded to sizes), else None."""
    if not (node.op == "call_function" and node.target in SPLITS or node.op == "call_method" and node.target == "split"):
        return None
    _, size, dim = arguments(node, ("tensor", "split_size_or_sections", "dim"), (None, None, 0))
    if isinstance(size, int) and size > 0:
        size = [min(size, total - start) for start in range(0, total, size)]
    if not (isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size) and sum(size) == total):
        return None
    return list(size), dim


def _on_feature_axis(layer: Op, split: fx.Node, dim: int) -> bool:
    axis = feature_axis(layer)
    rank = rank_of(layer.output)
    return dim == axis or rank is not None and dim == axis % rank


def parts(layer: Op, sizes: list[int], read: list[int]) -> fx.GraphModule:
    """x ↦ the layers for the ``read`` parts of ``layer``'s output rows."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    root, graph = nn.Module(), fx.Graph()
    x, outputs = graph.placeholder("x"), []
    for i in read:
        rows = slice(starts[i], starts[i] + sizes[i])
        weight = layer.weight.detach()[rows]
        bias = None if layer.bias is None else layer.bias.detach()[rows]
        part = new_conv(layer.conv, weight, bias, layer.weight) if layer.is_conv else new_linear(weight, bias,
                                                                                                  layer.weight)
        root.add_module(f"part{i}", part)
        outputs.append(graph.call_module(f"part{i}", (x,)))
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph, "SplitParallel").eval()


class SplitParallel:
    name = "split_parallel"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for node in order:
            layer = view(gm, node)
            if layer is None or layer.kind not in (LINEAR, CONV) or len(node.users) != 1:
                continue
            split = next(iter(node.users))
            found_split = split_sizes(split, layer.out_channels)
            if found_split is None or not _on_feature_axis(layer, split, found_split[1]):
                continue
            sizes = found_split[0]
            getitems = sorted(split.users, key=order.__getitem__)
            if not getitems or any(g.target is not operator.getitem or not isinstance(g.args[1], int)
                                   for g in getitems):
                found.append(Candidate(Region([node, split], [layer.input], [split]),
                                       reason="the split's parts are not each taken by index"))
                continue
            taken = [g for g in getitems if g.users]
            if not taken:
                continue  # nothing reads the layer: dead code, not a split
            read = [g.args[1] % len(sizes) for g in taken]
            region = Region([node, split, *getitems], [layer.input], taken)
            found.append(Candidate(region, build=lambda layer=layer, sizes=sizes, read=read: parts(layer, sizes, read),
                                   tolerance=options.tolerance,
                                   reason=f"one layer split {len(sizes)} ways becomes {len(read)} layers"))
        return found
