"""A GraphModule of ATen ops (what ``torch.export`` captures) that pickles its graph.

``torch.save`` of a plain GraphModule stores its generated Python code and re-traces it with
``symbolic_trace`` on load. For an exported graph that loses the pytree signature (a Hugging Face
model's ``ModelOutput`` comes back as a dict) and fails on shape arithmetic (``aten.zeros`` of a
list holding traced sizes, T5). ``ExportedGraphModule`` pickles the nodes themselves instead — ATen
targets by name, since OpOverloads do not pickle — with the pytree specs and the module's tensors.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

KEPT_META = ("nn_module_stack", "fxfuse_origin")


def check_static_shape(x, rank: int, sizes: dict, name: str) -> None:
    """Raise ``InputError`` when ``x`` has another rank, or another size in a dimension the
    capture made static, than the exported graph was specialised to (torch.export fixes a size-1
    batch and any size that the model's code pins). A graph op, so re-exports run it too."""
    if not isinstance(x, torch.Tensor):
        return
    wrong = x.dim() != rank or any(x.shape[d] != size for d, size in sizes.items())
    if wrong:
        from .errors import InputError
        shown = ", ".join(f"dim {d} = {size}" for d, size in sizes.items()) or "no fixed size"
        raise InputError(
            f"input {name!r} has shape {tuple(x.shape)}, but this graph was captured by torch.export for rank-{rank} "
            f"inputs with {shown}. Fix: optimize the model with example inputs of the shape it will run at "
            "(a batch of at least 2 keeps the batch size free).")


def guard_static_shapes(gm: fx.GraphModule) -> None:
    """Insert ``check_static_shape`` for every tensor placeholder of an exported graph, from the
    placeholders' ``meta['val']`` (symbolic sizes stay free)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    if not placeholders:
        return
    with gm.graph.inserting_after(placeholders[-1]):
        for node in reversed(placeholders):
            val = node.meta.get("val")
            guarded = any(u.target is check_static_shape for u in node.users)
            if isinstance(val, torch.Tensor) and not guarded:
                sizes = {d: s for d, s in enumerate(val.shape) if isinstance(s, int)}
                gm.graph.call_function(check_static_shape, (node, val.dim(), sizes, node.name))


class ExportedGraphModule(fx.GraphModule):
    """``fx.GraphModule`` whose pickle holds its graph, not code to re-trace (see the module doc)."""

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_graph", "_code", "_modules", "_parameters", "_buffers") and not k.startswith("_")}
        holder = nn.Module()
        holder._modules, holder._parameters, holder._buffers = dict(self._modules), dict(self._parameters), dict(self._buffers)
        codegen = self.graph._codegen
        info = getattr(codegen, "pytree_info", None)
        return _rebuild, (type(self).__name__, holder, _nodes(self.graph), info, state, self.training)


def _nodes(graph: fx.Graph) -> list[tuple]:
    """Each node as (op, name, target, args, kwargs, meta), Nodes in args by name."""
    return [(n.op, n.name, _target_name(n.target), fx.map_arg(n.args, _ref), fx.map_arg(n.kwargs, _ref),
             {k: n.meta[k] for k in KEPT_META if k in n.meta}) for n in graph.nodes]


class _Ref(str):
    """A reference to an earlier node, by name."""


def _ref(node: fx.Node) -> _Ref:
    return _Ref(node.name)


def _target_name(target):
    if isinstance(target, torch._ops.OpOverload):
        return ("op", str(target))  # 'aten.linear.default'
    return target


def _resolve(target):
    if isinstance(target, tuple) and len(target) == 2 and target[0] == "op":
        obj = torch.ops
        for part in target[1].split("."):
            obj = getattr(obj, part)
        return obj
    return target


def _rebuild(name: str, holder: nn.Module, nodes: list[tuple], info, state: dict, training: bool):
    graph, env = fx.Graph(), {}
    resolve_args = lambda a: env[a] if isinstance(a, _Ref) else a  # noqa: E731
    for op, node_name, target, args, kwargs, meta in nodes:
        args, kwargs = _map(args, resolve_args), _map(kwargs, resolve_args)
        if op == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(op, _resolve(target), tuple(args), dict(kwargs), node_name)
        node.meta.update(meta)
        env[_Ref(node_name)] = node
    if info is not None:
        graph._codegen = fx.graph._PyTreeCodeGen(info)
    gm = ExportedGraphModule(holder, graph, name)
    gm.__dict__.update(state)
    return gm.train(training)


def _map(value, fn):
    if isinstance(value, (list, tuple)):
        mapped = [_map(v, fn) for v in value]
        return type(value)(mapped) if isinstance(value, tuple) else mapped
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value) if isinstance(value, str) else value
