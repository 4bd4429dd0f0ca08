"""Matching: chains of single-user values and regions over the layer view (``fxfuse.ir``).

Matching is by what an op *is* (``fxfuse.ir.view``: a Linear is a Linear whether the graph holds
``nn.Linear``, ``F.linear`` or ``aten.linear``), not by name. A chain is a run of ops in which
each value feeds exactly one next op: ``first -> middle* -> last``. Only such single-user values
are rewritten, so a hidden activation that is also read elsewhere is never changed. A region is
any set of nodes with several inputs and outputs (a fan-out such as a norm feeding q, k and v).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx

from .ir import Op, view

Matcher = Callable[[fx.GraphModule, fx.Node], "Op | None"]

def kinds(*wanted: str) -> Matcher:
    """A matcher for the ops of the ``wanted`` kinds (``fxfuse.ir``)."""
    def match(gm: fx.GraphModule, node: fx.Node) -> Op | None:
        op = view(gm, node)
        return op if op is not None and op.kind in wanted else None
    match.__name__ = "_".join(wanted)
    return match

def rank_of(node: fx.Node) -> int | None:
    """The rank of ``node``'s value: from shape propagation (example inputs) or, in exported
    graphs, from the graph itself (``meta['val']``); else None."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None

def where(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Module paths a node stands for in the user's model (kept across rewrites in meta)."""
    if "fxfuse_origin" in node.meta:
        return list(node.meta["fxfuse_origin"])
    if node.op == "call_module":
        return [node.target]
    stack = node.meta.get("nn_module_stack")
    if stack:  # exported graphs: the innermost module the op was called in
        path = list(stack.values())[-1][0].split("@")[0]
        if path:
            return [path]
    op = view(gm, node)
    attr = next((a for a in node.all_input_nodes if a.op == "get_attr"), None) if op is not None else None
    if attr is not None:  # F.linear on attributes: name it by its weight's owner
        return [attr.target.rpartition(".")[0] or attr.target]
    return [node.name]

@dataclass
class Region:
    """What a rewrite replaces: ``nodes`` (graph order) reading ``inputs`` from outside, of which
    only ``outputs`` are read outside. A replacement takes the inputs and returns the outputs (one
    tensor, or a tuple for several)."""

    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]

@dataclass
class Chain:
    """``ops[0] -> ... -> ops[-1]``, each op's value read only by the next op: a region with one
    input and one output."""

    ops: list[Op]

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for op in self.ops for n in op.nodes]

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.input]

    @property
    def outputs(self) -> list[fx.Node]:
        return [self.output]

    @property
    def input(self) -> fx.Node:
        return self.ops[0].input

    @property
    def output(self) -> fx.Node:
        return self.ops[-1].output

    @property
    def first(self) -> Op:
        return self.ops[0]

    @property
    def last(self) -> Op:
        return self.ops[-1]

    @property
    def middle(self) -> list[Op]:
        return self.ops[1:-1]

def chain_where(gm: fx.GraphModule, region: Chain | Region) -> list[str]:
    """Module paths of a chain's ops, or of a region's nodes, in order (the report's ``where``)."""
    if isinstance(region, Chain):
        return [w for op in region.ops for w in where(gm, op.output)]
    return list(dict.fromkeys(w for n in region.nodes if n.op != "get_attr" for w in where(gm, n)))

def find_chains(gm: fx.GraphModule, first: Matcher, middle: Matcher,
                last: Matcher) -> Iterator[tuple[Chain, str | None]]:
    """Every ``first -> middle* -> last`` chain in graph order, with ``None`` or a reason to skip it.

    A reason comes with a partial chain when the structure is there but a value on the way has
    other users; nodes that start no such chain yield nothing.
    """
    for node in list(gm.graph.nodes):
        op = first(gm, node)
        if op is not None:
            found = _follow(gm, op, middle, last)
            if found is not None:
                yield found

def _follow(gm, op: Op, middle: Matcher, last: Matcher):
    ops = [op]
    while True:
        value = ops[-1].output
        step = _next_op(gm, value, middle, last)
        if step is None:
            return None
        nxt, is_last = step
        users = set(value.users) - set(rank_readers(value))
        if not users <= set(nxt.nodes) or not _self_contained(nxt):
            return Chain(ops), f"{value.name} has {len(users)} users; rewriting it would change the others"
        ops.append(nxt)
        if is_last:
            return Chain(ops), None

def _next_op(gm, value: fx.Node, middle: Matcher, last: Matcher) -> tuple[Op, bool] | None:
    """The op reading ``value`` as its input, anchored at a user of ``value`` or one step further
    (an op spelled as several nodes: ``_native_batch_norm_legit_no_training`` then ``getitem``)."""
    near = list(value.users) + [w for u in value.users for w in u.users]
    for anchor in dict.fromkeys(near):
        for matcher, is_last in ((last, True), (middle, False)):
            op = matcher(gm, anchor)
            if op is not None and op.input is value:
                return op, is_last
    return None

def _self_contained(op: Op) -> bool:
    """No value computed inside a multi-node op is read outside it."""
    inside = set(op.nodes)
    return all(set(n.users) - set(rank_readers(n)) <= inside for n in op.nodes[:-1])

def rank_readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read only its rank (``x.ndim``, ``x.dim()``: timm's BatchNormAct2d
    checks its input so). Every rewrite keeps ranks, so they may read the rewritten value instead."""
    return [u for u in node.users if (u.op == "call_function" and u.target is getattr and u.args[1:] == ("ndim",))
            or (u.op == "call_method" and u.target == "dim" and len(u.args) == 1)]

def updated_in_place(node: fx.Node) -> fx.Node | None:
    """The value ``node`` updates in place, or None: ``operator.iadd`` (``h += 1``), ``x.add_(1)``,
    ``F.relu(x, inplace=True)``, a module built with ``inplace=True``, an ATen op that writes its input."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    target = node.target
    writes = (node.kwargs.get("inplace") is True
              or node.op == "call_function" and (target in IN_PLACE_OPERATORS or _schema_writes(target))
              or node.op == "call_method" and target.endswith("_") and not target.startswith("__")
              or node.op == "call_module" and getattr(node.graph.owning_module.get_submodule(target), "inplace", False) is True)
    return node.args[0] if writes else None

IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift}

def _schema_writes(target) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and bool(schema.arguments) and schema.arguments[0].alias_info is not None \
        and schema.arguments[0].alias_info.is_write

def updated_within(region: "Chain | Region") -> str | None:
    """Why ``region`` cannot be replaced at one point of the graph: an input it reads is updated in
    place between its first and last node (the replacement would read the updated value)."""
    order = {n: i for i, n in enumerate(region.nodes[0].graph.nodes)}
    start, end = min(order[n] for n in region.nodes), max(order[n] for n in region.nodes)
    for x in region.inputs:
        for user in x.users:
            if updated_in_place(user) is x and start < order[user] < end:
                return f"{x.name} is updated in place by {user.name} between the rewritten nodes"
    return None
