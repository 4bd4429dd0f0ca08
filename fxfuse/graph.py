"""Matching and surgery on torch.fx graphs, shared by every pass.

Matching is by module *type* (torch.fx's subgraph rewriter compares call_module targets by name,
which cannot express "any Linear, then any PReLU"). A chain is a run of nodes in which each value
feeds exactly one next node: ``first -> middle* -> last``. Only such single-user values are
rewritten, so a hidden activation that is also read elsewhere is never changed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

NodePredicate = Callable[[fx.GraphModule, fx.Node], bool]


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv as the math sees it: y = W ⋆ x + b, whatever form the graph holds."""

    node: fx.Node
    weight: torch.Tensor  # (out, in) or (out, in/groups, *kernel)
    bias: torch.Tensor | None
    conv: nn.Module | None = None  # the ConvNd module for convolutions (stride, padding, ...)

    @property
    def is_conv(self) -> bool:
        return self.conv is not None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def as_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    """View ``node`` as a Linear/Conv layer: ``nn.Linear``, ``F.linear`` on attributes, ``nn.ConvNd``."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.Linear) and _single_input(node):
        return Layer(node, mod.weight, mod.bias)
    if isinstance(mod, CONV_TYPES) and _single_input(node):
        return Layer(node, mod.weight, mod.bias, conv=mod)
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        args = list(node.args) + [node.kwargs.get("weight"), node.kwargs.get("bias")][len(node.args) - 1:]
        weight, bias = (args + [None, None])[1:3]
        if _is_attr(weight) and (bias is None or _is_attr(bias)):
            return Layer(node, fetch_attr(gm, weight.target), None if bias is None else fetch_attr(gm, bias.target))
    return None


def is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return as_layer(gm, node) is not None


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), BATCHNORM_TYPES) and _single_input(node)


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    layer = as_layer(gm, node)
    return layer is not None and not layer.is_conv


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    layer = as_layer(gm, node)
    return layer is not None and layer.is_conv


def is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``nn.Identity`` and dropout in eval mode (modules, or functionals traced with training=False)."""
    mod = module_of(gm, node)
    if isinstance(mod, nn.Identity) or (isinstance(mod, DROPOUT_TYPES) and not mod.training):
        return _single_input(node)
    if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return training is False
    return False


def rank_of(node: fx.Node) -> int | None:
    """The rank of ``node``'s value, known after shape propagation (example inputs), else None."""
    meta = node.meta.get("tensor_meta")
    return None if meta is None else len(meta.shape)


def where(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Module paths a node stands for in the user's model (kept across rewrites in meta)."""
    if "fxfuse_origin" in node.meta:
        return list(node.meta["fxfuse_origin"])
    if node.op == "call_module":
        return [node.target]
    layer = as_layer(gm, node)
    if layer is not None:  # F.linear: name it by its weight attribute
        return [node.args[1].target if len(node.args) > 1 else node.kwargs["weight"].target]
    return [node.name]


@dataclass
class Chain:
    """``nodes[0] -> ... -> nodes[-1]``, each value read only by the next node."""

    nodes: list[fx.Node]

    @property
    def input(self) -> fx.Node:
        return self.nodes[0].args[0]

    @property
    def middle(self) -> list[fx.Node]:
        return self.nodes[1:-1]


def find_chains(gm: fx.GraphModule, is_first: NodePredicate, is_middle: NodePredicate,
                is_last: NodePredicate) -> Iterator[tuple[Chain, str | None]]:
    """Every ``first -> middle* -> last`` chain in graph order, with ``None`` or a reason to skip it.

    A reason comes with a partial chain when the structure is there but a value on the way has
    other users; nodes that start no such chain yield nothing.
    """
    for first in list(gm.graph.nodes):
        if is_first(gm, first):
            found = _follow(gm, first, is_middle, is_last)
            if found is not None:
                yield found


def _follow(gm, first: fx.Node, is_middle: NodePredicate, is_last: NodePredicate):
    nodes, node = [first], first
    while True:
        users = list(node.users)
        continuing = [u for u in users if u.args and u.args[0] is node and (is_middle(gm, u) or is_last(gm, u))]
        if not continuing:
            return None
        if len(users) > 1:
            return Chain(nodes), f"{node.name} has {len(users)} users; rewriting it would change the others"
        nodes.append(continuing[0])
        if is_last(gm, continuing[0]):
            return Chain(nodes), None
        node = continuing[0]


def replace_chain(gm: fx.GraphModule, chain: Chain, module: nn.Module, suffix: str) -> fx.Node:
    """Replace the chain's nodes by one call to ``module``; return the new node.

    The module is registered beside the chain's first module (``blocks.0.fc1`` gives
    ``blocks.0.fc1_<suffix>``); the new node inherits the last node's metadata (shape, dtype).
    A chain replaced by ``nn.Identity`` is bypassed: its users read the chain's input.
    """
    if isinstance(module, nn.Identity):
        return _bypass(gm, chain)
    name = _free_name(gm, where(gm, chain.nodes[0])[0].replace("_" + suffix, "") + "_" + suffix)
    gm.add_submodule(name, module)
    return replace_nodes(gm, chain.nodes, chain.input, name, chain_where(gm, chain))


def replace_nodes(gm: fx.GraphModule, nodes: list[fx.Node], input: fx.Node, target: str,
                  origin: list[str]) -> fx.Node:
    """Replace ``nodes`` (graph order, the last one's value their result, no value inside read
    outside) by ``call_module(target, (input,))``; the new node keeps the last node's shape and
    dtype metadata and records ``origin``. Dead get_attr nodes and their tensors go too."""
    last = nodes[-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(target, (input,))
    new.meta = {k: v for k, v in last.meta.items() if k in ("tensor_meta", "val", "type")}
    new.meta["fxfuse_origin"] = origin
    last.replace_all_uses_with(new)
    _erase(gm, nodes)
    return new


def chain_where(gm: fx.GraphModule, chain: Chain) -> list[str]:
    """Module paths of the chain's nodes, in order (the report's ``where``)."""
    return [w for n in chain.nodes for w in where(gm, n)]


def _bypass(gm: fx.GraphModule, chain: Chain) -> fx.Node:
    chain.nodes[-1].replace_all_uses_with(chain.input)
    _erase(gm, chain.nodes)
    return chain.input


def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for a in attrs:
            if not a.users:
                _erase_attr_node(gm, a)


def tidy(gm: fx.GraphModule) -> None:
    """Drop the modules no node calls any more, then regenerate ``forward``."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def rel_error(new, ref) -> float:
    """max |new - ref| / max |ref| over every tensor of (possibly nested) outputs, in float64."""
    new_leaves, ref_leaves = torch.utils._pytree.tree_leaves(new), torch.utils._pytree.tree_leaves(ref)
    worst = 0.0
    for a, b in zip(new_leaves, ref_leaves):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            a, b = a.detach().double(), b.detach().double()
            scale = b.abs().max().item() if b.numel() else 0.0
            diff = (a - b).abs().max().item() if b.numel() else 0.0
            worst = max(worst, diff / max(scale, 1e-30))
    return worst if math.isfinite(worst) else math.inf


def _erase_attr_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a dead get_attr node, and its tensor when no other node reads it."""
    gm.graph.erase_node(node)
    if not gm.graph.find_nodes(op="get_attr", target=node.target):
        owner, _, attr = node.target.rpartition(".")
        delattr(gm.get_submodule(owner), attr)


def _single_input(node: fx.Node) -> bool:
    return len(node.args) == 1 and not node.kwargs


def _is_attr(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, i = name, 1
    while _has_attr(gm, candidate):
        candidate, i = f"{name}{i}", i + 1
    return candidate


def _has_attr(gm: nn.Module, name: str) -> bool:
    try:
        fetch_attr(gm, name)
        return True
    except AttributeError:
        return False
