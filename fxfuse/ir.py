"""One view of layer-level operations over every graph dialect fxfuse captures.

A pass never asks *how* a graph spells a Linear: ``view(gm, node)`` answers for the node that
computes an op's output, whichever of these forms the graph holds:

| kind      | module graphs (symbolic_trace)              | exported graphs (torch.export, ATen)                   |
|-----------|---------------------------------------------|--------------------------------------------------------|
| linear    | ``nn.Linear``, ``F.linear`` on attributes   | ``aten.linear``, ``aten.addmm(b, x, t(W))``            |
| conv      | ``nn.Conv1d/2d/3d``, ``F.conv1d/2d/3d``      | ``aten.conv1d/2d/3d``, ``aten.convolution``            |
| batchnorm | ``nn.BatchNorm1d/2d/3d``, ``F.batch_norm``   | ``aten.batch_norm``, ``_native_batch_norm_legit_no_training`` |
| prelu     | ``nn.PReLU``, ``F.prelu``                    | ``aten.prelu``, its decomposition ``where(h > 0, h, α·h)`` |
| identity  | ``nn.Identity``, eval-mode dropout           | ``aten.dropout(train=False)``, ``aten.clone``, ``aten.alias``, a full ``aten.slice`` |

A module is seen as its layer only when it *is* that layer: a subclass that overrides ``forward``
(a scaled Linear, timm's BatchNormAct2d) is not, because its call computes something else. Eval
semantics come from the graph: a functional or ATen BatchNorm is a BatchNorm in eval mode only when
its ``training`` argument is False; a module one when the module is in eval mode.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

LINEAR, CONV, BATCHNORM, PRELU, IDENTITY = "linear", "conv", "batchnorm", "prelu", "identity"
BETWEEN_KINDS = (IDENTITY, PRELU, BATCHNORM)  # per-channel affine in eval mode (see fxfuse.affine)

CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
BATCHNORM_MODULES = {nn.BatchNorm1d: None, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}  # the rank each accepts
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, aten.conv1d.default: 1, aten.conv2d.default: 2,
                  aten.conv3d.default: 3, aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, aten.dropout.default}
COPY_FUNCTIONS = {aten.clone.default, aten.alias.default}
TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry, from a module or from a functional/ATen call."""

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"


@dataclass(frozen=True)
class BatchNormStats:
    """BatchNorm's parameters and statistics: y = γ·(x − μ)/√(σ² + ε) + β over axis 1."""

    mean: torch.Tensor | None
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    training: bool
    rank: int | None = None  # the only input rank the op accepts (BatchNorm2d: 4), None if any

    @property
    def num_features(self) -> int:
        return next(t for t in (self.mean, self.weight, self.var) if t is not None).numel()


@dataclass(frozen=True)
class Op:
    """A layer-level operation: ``nodes`` (graph order, the last computes the output) read ``input``.

    ``weight``/``bias`` hold a Linear's (out, in) or a conv's (out, in/groups, *k) tensors, or a
    PReLU's slopes; ``conv`` and ``stats`` the rest of a conv or BatchNorm; ``module`` the module a
    ``call_module`` op calls.
    """

    kind: str
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    conv: ConvSpec | None = None
    stats: BatchNormStats | None = None
    module: nn.Module | None = None

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def is_conv(self) -> bool:
        return self.kind == CONV

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


def fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def view(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """``node`` as the output of a layer-level op, or None."""
    if node.op == "call_module":
        return _module_op(gm, node)
    if node.op == "call_function":
        return _function_op(gm, node)
    return None


def is_kind(gm: fx.GraphModule, node: fx.Node, *kinds: str) -> bool:
    op = view(gm, node)
    return op is not None and op.kind in kinds


def overrides_forward(module: nn.Module, base: type) -> bool:
    """True when ``module``'s class computes something other than ``base.forward``."""
    return type(module).forward is not base.forward


def _module_op(gm, node: fx.Node) -> Op | None:
    mod = gm.get_submodule(node.target)
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    x, nodes = node.args[0], (node,)
    if isinstance(mod, nn.Linear) and not overrides_forward(mod, nn.Linear):
        return Op(LINEAR, nodes, x, mod.weight, mod.bias, module=mod)
    dims = next((d for t, d in CONV_MODULES.items() if isinstance(mod, t) and not overrides_forward(mod, t)), None)
    if dims is not None:
        spec = ConvSpec(dims, tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                        tuple(mod.dilation), mod.groups, mod.padding_mode)
        return Op(CONV, nodes, x, mod.weight, mod.bias, conv=spec, module=mod)
    bn_type = next((t for t in BATCHNORM_MODULES if isinstance(mod, t) and not overrides_forward(mod, t)), None)
    if bn_type is not None:
        training = mod.training or mod.running_mean is None
        stats = BatchNormStats(mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps, training,
                               BATCHNORM_MODULES[bn_type])
        return Op(BATCHNORM, nodes, x, stats=stats, module=mod)
    if isinstance(mod, nn.PReLU) and not overrides_forward(mod, nn.PReLU):
        return Op(PRELU, nodes, x, mod.weight, module=mod)
    plain_identity = isinstance(mod, nn.Identity) and not overrides_forward(mod, nn.Identity)
    eval_dropout = any(isinstance(mod, t) and not overrides_forward(mod, t) for t in DROPOUT_MODULES) and not mod.training
    if plain_identity or eval_dropout:
        return Op(IDENTITY, nodes, x, module=mod)
    return None


def _function_op(gm, node: fx.Node) -> Op | None:
    target = node.target
    if target in LINEAR_FUNCTIONS:
        x, w, b = arguments(node, ("input", "weight", "bias"), (None, None, None))
        return _weighted(gm, LINEAR, (node,), x, w, b, w_dims=2)
    if target in CONV_FUNCTIONS:
        x, w, b, stride, padding, dilation, groups = arguments(
            node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, None, None, 1, 0, 1, 1))
        dims = CONV_FUNCTIONS[target]
        return _conv(gm, (node,), x, w, b, dims, stride, padding, dilation, groups)
    if target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
        if transposed or any(output_padding):
            return None
        return _conv(gm, (node,), x, w, b, len(stride), stride, padding, dilation, groups)
    if target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        b, x, wt = node.args  # b + x @ W.T with W.T a transpose of an (out, in) attribute
        if isinstance(wt, fx.Node) and wt.target in TRANSPOSES and is_attr(wt.args[0]) and _swaps_2d(wt):
            return _weighted(gm, LINEAR, (node,), x, wt.args[0], b, w_dims=2)
        return None
    if target in (F.batch_norm, aten.batch_norm.default):
        x, mean, var, w, b, training, _, eps = arguments(
            node, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            (None, None, None, None, None, False, 0.1, 1e-5))
        if target is aten.batch_norm.default:  # (input, weight, bias, mean, var, training, momentum, eps, cudnn)
            x, w, b, mean, var, training, _, eps = node.args[:8]
        return _batchnorm(gm, (node,), x, mean, var, w, b, eps, bool(training))
    if target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node) \
            and node.args[0].target is aten._native_batch_norm_legit_no_training.default:
        bn = node.args[0]
        x, w, b, mean, var, _, eps = bn.args
        return _batchnorm(gm, (bn, node), x, mean, var, w, b, eps, False)
    if target in (F.prelu, aten.prelu.default):
        x, w = arguments(node, ("input", "weight"), (None, None))
        if isinstance(x, fx.Node) and is_attr(w):
            return Op(PRELU, (node,), x, fetch_attr(gm, w.target))
        return None
    if target is aten.where.self:
        return _decomposed_prelu(gm, node)
    if target in DROPOUT_FUNCTIONS:
        x, _, training = arguments(node, ("input", "p", "training"), (None, 0.5, True))
        if target is aten.dropout.default:
            x, _, training = node.args
        return Op(IDENTITY, (node,), x) if training is False and isinstance(x, fx.Node) else None
    if target in COPY_FUNCTIONS and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return Op(IDENTITY, (node,), node.args[0])
    if target is aten.slice.Tensor and _full_slice(node):
        return Op(IDENTITY, (node,), node.args[0])
    return None


def _full_slice(node: fx.Node) -> bool:
    """``x[:, ...]`` as export spells it: ``aten.slice(x, dim, 0, end ≥ size, 1)``, the whole of x."""
    x, dim, start, end, step = arguments(node, ("self", "dim", "start", "end", "step"), (None, 0, None, None, 1))
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor) or start not in (None, 0) or step != 1:
        return False
    size = val.shape[dim]
    return end is None or isinstance(end, int) and isinstance(size, int) and end >= size or end == sys.maxsize


def _decomposed_prelu(gm, node: fx.Node) -> Op | None:
    """``where(h > 0, h, α·h)``: what ``run_decompositions`` makes of ``aten.prelu``."""
    cond, h, neg = node.args
    if not (isinstance(cond, fx.Node) and cond.target is aten.gt.Scalar and cond.args == (h, 0)):
        return None
    if not (isinstance(neg, fx.Node) and neg.target is aten.mul.Tensor and h in neg.args):
        return None
    slope = next(a for a in neg.args if a is not h) if neg.args.count(h) == 1 else None
    if isinstance(slope, fx.Node) and slope.target is aten.view.default:
        slope = slope.args[0]
    if not is_attr(slope):
        return None
    return Op(PRELU, (cond, neg, node), h, fetch_attr(gm, slope.target).reshape(-1))


def _weighted(gm, kind, nodes, x, w, b, w_dims) -> Op | None:
    if not (isinstance(x, fx.Node) and is_attr(w) and (b is None or is_attr(b))):
        return None
    weight = fetch_attr(gm, w.target)
    if not isinstance(weight, torch.Tensor) or weight.dim() != w_dims:
        return None
    bias = None if b is None else fetch_attr(gm, b.target)
    return Op(kind, nodes, x, weight, bias)


def _conv(gm, nodes, x, w, b, dims, stride, padding, dilation, groups) -> Op | None:
    op = _weighted(gm, CONV, nodes, x, w, b, w_dims=dims + 2)
    if op is None:
        return None
    spec = ConvSpec(dims, _tuple(stride, dims), padding if isinstance(padding, str) else _tuple(padding, dims),
                    _tuple(dilation, dims), int(groups))
    return Op(CONV, nodes, x, op.weight, op.bias, conv=spec)


def _batchnorm(gm, nodes, x, mean, var, w, b, eps, training) -> Op | None:
    tensors = [mean, var, w, b]
    if not isinstance(x, fx.Node) or not all(t is None or is_attr(t) for t in tensors):
        return None
    mean, var, w, b = (None if t is None else fetch_attr(gm, t.target) for t in tensors)
    stats = BatchNormStats(mean, var, w, b, float(eps), training or mean is None)
    return Op(BATCHNORM, nodes, x, stats=stats)


def arguments(node: fx.Node, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional-or-keyword arguments of a call by name, with defaults."""
    values = list(node.args) + list(defaults[len(node.args):])
    return [node.kwargs.get(name, value) for name, value in zip(names, values)]


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _swaps_2d(node: fx.Node) -> bool:
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True  # aten.t


def is_attr(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


DIALECT_KEY = "fxfuse_dialect"  # gm.meta: "aten" (torch.export) or "torch" (symbolic_trace)


def dialect(gm: fx.GraphModule) -> str:
    """"aten" for graphs of ATen ops (torch.export), "torch" for module graphs (symbolic_trace)."""
    if DIALECT_KEY not in gm.meta:
        aten = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
        gm.meta[DIALECT_KEY] = "aten" if aten else "torch"
    return gm.meta[DIALECT_KEY]
