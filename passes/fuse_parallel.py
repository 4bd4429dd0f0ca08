"""fuse_parallel (horizontal fusion): layers that read the same value become one layer, split after.

    (W₁x + b₁, …, W_kx + b_k) = split([W₁; …; W_k]·x + [b₁; …; b_k])

for Linears (split along the last axis: attention's q/k/v, a gated MLP's gate/up) and for
convolutions of one geometry (split along the channel axis: parallel 1×1 branches). Exact up to
float summation order: each output element is the same dot product as before (a kernel may block
a wider GEMM differently). Parameters and MACs stay; what it saves is
k − 1 GEMM launches and k − 1 reads of x, which is what small batches and decode steps pay for.

Fused: layers of one kind reading the same node, with the same input width (conv: the same kernel,
stride, padding, dilation, ``groups == 1``, zero padding), dtype and device, all with a bias or all
without. Left alone: a layer whose weight something else reads too (a tied weight: fusing would copy
it). The inverse is ``split_parallel``: run ``optimize(gm, passes=[SplitParallel()])`` to get the
parts back (for the tie pass, or LoRA adapters on ``q_proj``/``v_proj``).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn

from fxfuse.affine import new_conv, new_linear
from fxfuse.ir import CONV, LINEAR, Op, dialect, view
from fxfuse.match import Region
from fxfuse.pass_manager import Candidate, Options, Readers


def split_function(gm: fx.GraphModule):
    """``torch.split`` as the graph spells it: an ATen op in exported graphs."""
    return torch.ops.aten.split_with_sizes.default if dialect(gm) == "aten" else torch.split


def feature_axis(op: Op) -> int:
    """The axis a layer's outputs are stacked on: the last for a Linear, the channel axis for a
    conv (counted from the end, so unbatched inputs agree)."""
    return -(op.conv.dims + 1) if op.is_conv else -1


def _group_key(op: Op) -> tuple | None:
    """Layers with equal keys can share one weight; None for a conv that cannot (groups, padding mode)."""
    shared = (op.kind, tuple(op.weight.shape[1:]), op.weight.dtype, op.weight.device, op.bias is None)
    if op.is_conv:
        if op.conv.groups != 1 or op.conv.padding_mode != "zeros":
            return None
        return shared + (op.conv,)
    return shared


def parallel_layers(gm: fx.GraphModule, x: fx.Node, order: dict[fx.Node, int]) -> list[list[Op]]:
    """The groups (two or more, in graph ``order``) of Linears or convs reading ``x`` that one layer can replace."""
    groups: dict[tuple, list[Op]] = defaultdict(list)
    for user in sorted(x.users, key=order.__getitem__):
        op = view(gm, user)
        if op is not None and op.kind in (LINEAR, CONV) and op.input is x and (key := _group_key(op)) is not None:
            groups[key].append(op)
    return [layers for layers in groups.values() if len(layers) > 1]


def fused(gm: fx.GraphModule, layers: list[Op]) -> fx.GraphModule:
    """x ↦ split(layer(x), sizes): one Linear or conv holding the layers' weights stacked."""
    first = layers[0]
    weight = torch.cat([op.weight.detach() for op in layers])
    bias = None if first.bias is None else torch.cat([op.bias.detach() for op in layers])
    root, graph = nn.Module(), fx.Graph()
    root.fused = new_conv(first.conv, weight, bias, first.weight) if first.is_conv else new_linear(weight, bias,
                                                                                                    first.weight)
    root.fused.requires_grad_(any(op.weight.requires_grad for op in layers))
    y = graph.call_module("fused", (graph.placeholder("x"),))
    parts = graph.call_function(split_function(gm), (y, [op.out_channels for op in layers], feature_axis(first)))
    graph.output(tuple(graph.call_function(operator.getitem, (parts, i)) for i in range(len(layers))))
    return fx.GraphModule(root, graph, "FusedParallel").eval()


class FuseParallel:
    name = "fuse_parallel"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found, readers = [], Readers.of_graph(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for x in order:
            for layers in parallel_layers(gm, x, order):
                outputs = [op.output for op in layers]
                region = Region(outputs, [x], outputs)
                freed = {id(p) for p in readers.freed(gm, outputs)}
                if not all(id(t) in freed for op in layers for t in (op.weight, op.bias) if t is not None):
                    found.append(Candidate(region, reason="a weight is read elsewhere too (tied): fusing would copy it"))
                    continue
                kind = "convolutions" if layers[0].is_conv else "GEMMs"
                found.append(Candidate(region, build=lambda layers=layers: fused(gm, layers), tolerance=options.tolerance,
                                       reason=f"{len(layers)} {kind} on one input become 1, split after"))
        return found
