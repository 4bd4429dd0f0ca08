"""Graph surgery in the graph's own dialect, shared by every pass.

A replacement is emitted as the graph spells layers: a ``call_module`` in module graphs
(symbolic_trace), ATen ops on ``get_attr`` parameters in exported graphs (torch.export), so the
result re-exports, compiles and lowers to ONNX. Dead nodes and the tensors only they read go too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .ir import dialect, fetch_attr
from .match import Chain, Region, chain_where, rank_readers, where

def replace_region(gm: fx.GraphModule, region: Chain | Region, replacement: nn.Module, suffix: str) -> None:
    """Apply a verified rewrite: a GraphModule replacement is spliced in (``inline``), a module
    replacing a chain is called in its place (``replace_chain``)."""
    if isinstance(replacement, fx.GraphModule):
        inline(gm, region, replacement, suffix)
    elif isinstance(region, Chain):
        replace_chain(gm, region, replacement, suffix)
    else:
        raise TypeError(f"a region with {len(region.outputs)} outputs needs a GraphModule replacement")

def replace_chain(gm: fx.GraphModule, chain: Chain, module: nn.Module, suffix: str) -> fx.Node:
    """Replace the chain's nodes by ``module`` applied to the chain's input; return the new node.

    The module is registered beside the chain's first layer (``blocks.0.fc1`` gives
    ``blocks.0.fc1_<suffix>``) and emitted in the graph's dialect (``emit``); the new node inherits
    the last node's metadata (shape, dtype). A chain replaced by ``nn.Identity`` is bypassed: its
    users read the chain's input.
    """
    if isinstance(module, nn.Identity):
        return _bypass(gm, chain)
    _redirect_rank_readers(chain)
    name = _free_name(gm, where(gm, chain.nodes[0])[0].replace("_" + suffix, "") + "_" + suffix)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(chain.output.next):  # in order: get_attr nodes, then the op
        new = emit(gm, name, chain.input)
    return _take_over(gm, chain.nodes, new, chain_where(gm, chain))

def inline(gm: fx.GraphModule, region: Chain | Region, replacement: fx.GraphModule, suffix: str) -> list[fx.Node]:
    """Splice ``replacement``'s graph in place of ``region``: its placeholders read the region's
    inputs, its outputs take over the region's outputs' users, its modules and tensors are registered
    beside the region's first layer (``<where>_<suffix>_<name>``) and its module calls emitted in
    the graph's dialect (``emit``). The new nodes go before the region's first node, which every
    input precedes, so they precede every user of an output."""
    first = min(region.nodes, key=_position(gm))
    base = where(gm, region.nodes[0])[0].replace(".", "_") + "_" + suffix
    env = dict(zip(replacement.graph.find_nodes(op="placeholder"), region.inputs))
    outputs = None
    with gm.graph.inserting_before(first):
        for node in replacement.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                name = _free_name(gm, f"{base}_{node.target.replace('.', '_')}")
                register(gm, name, fetch_attr(replacement, node.target))
                args = fx.map_arg(node.args, env.__getitem__)
                env[node] = emit(gm, name, *args) if node.op == "call_module" else gm.graph.get_attr(name)
            elif node.op == "output":
                outputs = fx.map_arg(node.args[0], env.__getitem__)
            elif node.op != "placeholder":
                env[node] = gm.graph.node_copy(node, env.__getitem__)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    origin = chain_where(gm, region)
    for old, new in zip(region.outputs, outputs):
        new.meta.update({k: v for k, v in old.meta.items() if k in ("tensor_meta", "val", "nn_module_stack")})
        new.meta["fxfuse_origin"] = origin
        old.replace_all_uses_with(new)
    _erase(gm, sorted(region.nodes, key=_position(gm)))
    return outputs

def replace_nodes(gm: fx.GraphModule, nodes: list[fx.Node], input: fx.Node, target: str,
                  origin: list[str]) -> fx.Node:
    """Replace ``nodes`` (graph order, the last one's value their result, no value inside read
    outside) by ``call_module(target, (input,))``; the new node keeps the last node's shape and
    dtype metadata and records ``origin``. Dead get_attr nodes and their tensors go too."""
    with gm.graph.inserting_after(nodes[-1]):
        new = gm.graph.call_module(target, (input,))
    return _take_over(gm, nodes, new, origin)

def guard_rank(gm: fx.GraphModule, region: Chain | Region, rank: int, rewrite: str) -> None:
    """Check, before ``region`` runs, that its input has ``rank`` dims (``torch._assert``, which
    export and ONNX evaluate at trace time): ``rewrite`` was proven for that rank only."""
    x = region.inputs[0]
    message = (f"{rewrite} holds for rank-{rank} inputs, got another rank: optimize the model on example "
               f"inputs of this rank, or without that pass (optimize(..., passes=[...]))")
    with gm.graph.inserting_before(min(region.nodes, key=_position(gm))):
        dims = gm.graph.call_method("dim", (x,))
        gm.graph.call_function(torch._assert, (gm.graph.call_function(operator.eq, (dims, rank)), message))

def emit(gm: fx.GraphModule, target: str, x: fx.Node, *more: fx.Node) -> fx.Node:
    """The node computing submodule ``target`` on ``x``, in the graph's dialect: a ``call_module``,
    or in an exported graph ``aten.linear`` / ``aten.convNd`` / ``aten.layer_norm`` / ``aten.rms_norm``
    on its parameters (``get_attr``)."""
    module = gm.get_submodule(target)
    if dialect(gm) != "aten" or type(module) not in ATEN_EMITTERS or more:
        return gm.graph.call_module(target, (x, *more))
    return ATEN_EMITTERS[type(module)](gm, target, module, x)

def _emit_linear(gm, target: str, module: nn.Linear, x: fx.Node) -> fx.Node:
    return gm.graph.call_function(torch.ops.aten.linear.default, (x, *_attrs(gm, target, module)))

def _emit_conv(gm, target: str, module: nn.Module, x: fx.Node) -> fx.Node:
    if module.padding_mode != "zeros":
        return gm.graph.call_module(target, (x,))
    dims = len(module.kernel_size)
    padded = isinstance(module.padding, str)
    function = getattr(torch.ops.aten, f"conv{dims}d").padding if padded else getattr(torch.ops.aten, f"conv{dims}d").default
    padding = module.padding if padded else list(module.padding)
    return gm.graph.call_function(function, (x, *_attrs(gm, target, module), list(module.stride), padding,
                                             list(module.dilation), module.groups))

def _emit_layer_norm(gm, target: str, module: nn.LayerNorm, x: fx.Node) -> fx.Node:
    weight, bias = _attrs(gm, target, module) if module.weight is not None else (None, None)
    return gm.graph.call_function(torch.ops.aten.layer_norm.default,
                                  (x, list(module.normalized_shape), weight, bias, module.eps))

def _emit_rms_norm(gm, target: str, module: nn.RMSNorm, x: fx.Node) -> fx.Node:
    weight = None if module.weight is None else gm.graph.get_attr(f"{target}.weight")
    return gm.graph.call_function(torch.ops.aten.rms_norm.default,
                                  (x, list(module.normalized_shape), weight, module.eps))

def _attrs(gm, target: str, module: nn.Module) -> tuple:
    weight = gm.graph.get_attr(f"{target}.weight")
    return weight, None if module.bias is None else gm.graph.get_attr(f"{target}.bias")

ATEN_EMITTERS = {nn.Linear: _emit_linear, nn.Conv1d: _emit_conv, nn.Conv2d: _emit_conv, nn.Conv3d: _emit_conv,
                 nn.LayerNorm: _emit_layer_norm, nn.RMSNorm: _emit_rms_norm}

def _take_over(gm: fx.GraphModule, nodes: list[fx.Node], new: fx.Node, origin: list[str]) -> fx.Node:
    last = nodes[-1]
    new.meta = {k: v for k, v in last.meta.items() if k in ("tensor_meta", "val", "type", "nn_module_stack")}
    new.meta["fxfuse_origin"] = origin
    last.replace_all_uses_with(new)
    _erase(gm, nodes)
    return new

def _redirect_rank_readers(chain: Chain) -> None:
    """Let the rank readers of the chain's inner values read its input: every op of a chain keeps
    the rank (Linear, ConvNd, BatchNorm, PReLU, identity), and the input precedes them all."""
    for node in chain.nodes[:-1]:
        for reader in rank_readers(node):
            reader.replace_input_with(node, chain.input)

def _bypass(gm: fx.GraphModule, chain: Chain) -> fx.Node:
    _redirect_rank_readers(chain)
    chain.output.replace_all_uses_with(chain.input)
    _erase(gm, chain.nodes)
    return chain.input

def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (now unused), then what only they read: get_attr nodes (and their tensors,
    unless a called module still holds them) and weight-side ops such as ``aten.t(weight)``."""
    dead = list(reversed(nodes))
    while dead:
        node = dead.pop(0)
        if node.users or node._erased:
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            _erase_attr_node(gm, node)
        else:
            gm.graph.erase_node(node)
        dead += [a for a in inputs if not a.users and _weight_side(a) and a not in dead]

def _weight_side(node: fx.Node, depth: int = 4) -> bool:
    """A get_attr, or a pure op on get_attrs alone (``aten.t(weight)``, ``bias.view(...)``): what a
    removed layer leaves behind. Never an activation: a dead in-place update (``h += 1``, whose
    result nothing reads) still changes ``h`` for its other readers."""
    if node.op == "get_attr":
        return True
    return (depth > 0 and node.op == "call_function" and not node.is_impure() and bool(node.all_input_nodes)
            and all(_weight_side(a, depth - 1) for a in node.all_input_nodes))

def _erase_attr_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a dead get_attr node, and its tensor when no other node reads it: neither another
    get_attr nor a call of the module that holds it (``F.linear(h, self.fc.weight)`` beside ``self.fc(x)``)."""
    gm.graph.erase_node(node)
    owner, _, attr = node.target.rpartition(".")
    called = any(owner == m.target or owner.startswith(m.target + ".") or not m.target
                 for m in gm.graph.find_nodes(op="call_module"))
    if not called and not gm.graph.find_nodes(op="get_attr", target=node.target):
        delattr(gm.get_submodule(owner), attr)

def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__

def register(owner: nn.Module, name: str, value) -> None:
    """Register ``value`` on ``owner`` under the (dot-free) ``name``: a module, parameter or buffer."""
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)

def drop_unread_tensors(gm: fx.GraphModule) -> None:
    """Erase the get_attr nodes nothing reads (``_ = self.fc.weight``), and their tensors, so a
    weight a rewrite replaced is really gone; a dead alias of a tensor that is read (a tied
    embedding's second name) stays."""
    attrs = gm.graph.find_nodes(op="get_attr")
    read = {id(fetch_attr(gm, n.target)) for n in attrs if n.users}
    for node in attrs:
        if not node.users and id(fetch_attr(gm, node.target)) not in read:
            _erase_attr_node(gm, node)

def tidy(gm: fx.GraphModule) -> None:
    """Drop the tensors and modules nothing reads or calls any more, then regenerate ``forward``."""
    drop_unread_tensors(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()

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
