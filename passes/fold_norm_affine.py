"""fold_norm_affine: a normalisation's elementwise affine folded into every Linear that reads it.

With n the normalised value (LayerNorm: (x − μ)/√(σ² + ε); RMSNorm: x/√(mean(x²) + ε)) and
γ, β the affine over the last axis, every reader y_i = W_i·h + b_i of h = γ ⊙ n + β gives

    y_i = W_i·(γ ⊙ n + β) + b_i = (W_i·diag γ)·n + (W_i·β + b_i)

so the normalisation loses its affine and each Linear absorbs it — the fan-out to q, k and v (or
gate and up) included, which is why this rewrite is a region with one input and several outputs.
Formed in float64 and cast back. Exact in real arithmetic; verified on recorded activations.

Matches LayerNorm (``nn.LayerNorm``, ``F.layer_norm``, ``aten.layer_norm``), RMSNorm (``nn.RMSNorm``,
``F.rms_norm``, ``aten.rms_norm``) with a weight, and a bare scale ``h ⊙ γ`` by a 1-D attribute
(what transformers' Llama/Qwen2/T5 RMSNorm becomes in a graph), normalising the last axis only.
Applies when every reader of h is a Linear taking h as its input (a residual add, a second norm
or an attention that reads h blocks it), and only where it pays: fewer parameters after (a Linear
without a bias gains one when β ≠ 0), unless ``force``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfuse.affine import new_linear
from fxfuse.match import Region
from fxfuse.ir import LINEAR, Op, arguments, fetch_attr, is_attr, module_of, overrides_forward, view
from fxfuse.pass_manager import Candidate, Options

aten = torch.ops.aten
LAYER_NORMS = {F.layer_norm: "layer", aten.layer_norm.default: "layer", F.rms_norm: "rms", aten.rms_norm.default: "rms"}
MULTIPLIES = {operator.mul, torch.mul, aten.mul.Tensor}


@dataclass(frozen=True)
class Affine:
    """h = γ ⊙ n + β at ``node`` (n: the normalised input, or the norm without its affine)."""

    node: fx.Node
    x: fx.Node  # what the replacement reads
    gamma: torch.Tensor
    beta: torch.Tensor | None
    norm: nn.Module | None  # the normalisation without affine to apply to x; None: h = γ ⊙ x


def norm_affine(gm: fx.GraphModule, node: fx.Node) -> Affine | None:
    """``node`` as an elementwise affine over the last axis (see the module docstring), or None."""
    module = module_of(gm, node)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(node.args) == 1 and not node.kwargs:
        base = nn.LayerNorm if isinstance(module, nn.LayerNorm) else nn.RMSNorm
        if overrides_forward(module, base) or module.weight is None or len(module.normalized_shape) != 1:
            return None
        return Affine(node, node.args[0], module.weight, getattr(module, "bias", None),
                      _plain_norm(base, module.normalized_shape, module.eps, module.weight))
    if node.op == "call_function" and node.target in LAYER_NORMS:
        kind = LAYER_NORMS[node.target]
        names = ("input", "normalized_shape", "weight", "bias", "eps") if kind == "layer" else \
            ("input", "normalized_shape", "weight", "eps")
        values = arguments(node, names, (None, None, None, None, 1e-5) if kind == "layer" else (None, None, None, None))
        x, shape, w = values[:3]
        b, eps = (values[3], values[4]) if kind == "layer" else (None, values[3])
        if not (isinstance(x, fx.Node) and is_attr(w) and (b is None or is_attr(b)) and len(shape) == 1):
            return None
        gamma = fetch_attr(gm, w.target)
        norm = _plain_norm(nn.LayerNorm if kind == "layer" else nn.RMSNorm, tuple(shape), eps, gamma)
        return Affine(node, x, gamma, None if b is None else fetch_attr(gm, b.target), norm)
    if node.op == "call_function" and node.target in MULTIPLIES and len(node.args) == 2 and not node.kwargs:
        attrs = [a for a in node.args if is_attr(a)]
        others = [a for a in node.args if isinstance(a, fx.Node) and not is_attr(a)]
        if len(attrs) == 1 and len(others) == 1:
            gamma = fetch_attr(gm, attrs[0].target)
            if isinstance(gamma, torch.Tensor) and gamma.dim() == 1:
                return Affine(node, others[0], gamma, None, None)
    return None


def _plain_norm(base: type, shape: tuple, eps, like: torch.Tensor) -> nn.Module:
    norm = base(shape, eps=eps, elementwise_affine=False, device=like.device, dtype=like.dtype)
    return norm.eval()


def _readers(gm: fx.GraphModule, affine: Affine) -> list[Op] | str:
    """The Linears reading h, or why h has a reader that is not one (or h's last axis is not γ's)."""
    if affine.norm is None and last_dim(affine.x) != affine.gamma.numel():  # a norm checks its own shape
        return (f"the normalised value's last axis ({last_dim(affine.x)}) is not proven to be the affine's "
                f"{affine.gamma.numel()} channels" + (" (pass example inputs)" if last_dim(affine.x) is None else ""))
    readers = []
    for user in affine.node.users:
        op = view(gm, user)
        if op is None or op.kind != LINEAR or op.input is not affine.node or op.nodes != (user,):
            return f"{user.name} reads the normalised value and is not a Linear taking it as input"
        if op.weight.shape[1] != affine.gamma.numel():
            return f"{user.name} has {op.weight.shape[1]} inputs, the affine {affine.gamma.numel()} channels"
        readers.append(op)
    return readers or "the normalised value is not read"


def last_dim(node: fx.Node) -> int | None:
    """The size of ``node``'s last axis: from shape propagation or an exported graph's ``val``."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None) or getattr(node.meta.get("val"), "shape", None)
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else None


def folded_linear(reader: Op, affine: Affine) -> nn.Linear:
    """W' = W·diag γ, b' = W·β + b (no bias when both β and b are absent), from float64."""
    w = reader.weight.detach().double()
    weight = w * affine.gamma.detach().double()
    bias = None if reader.bias is None else reader.bias.detach().double()
    if affine.beta is not None:
        bias = w @ affine.beta.detach().double() + (0 if bias is None else bias)
    return new_linear(weight, bias, reader.weight)


def replacement(affine: Affine, readers: list[Op]) -> fx.GraphModule:
    """x ↦ (W_1'·n + b_1', ..., W_k'·n + b_k') with n = norm(x) without affine (or x itself)."""
    root, graph = nn.Module(), fx.Graph()
    n = graph.placeholder("x")
    if affine.norm is not None:
        root.norm = affine.norm
        n = graph.call_module("norm", (n,))
    outputs = []
    for i, reader in enumerate(readers):
        root.add_module(f"linear{i}", folded_linear(reader, affine))
        outputs.append(graph.call_module(f"linear{i}", (n,)))
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph, "FoldedNormAffine").eval()


class FoldNormAffine:
    name = "fold_norm_affine"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for node in gm.graph.nodes:
            affine = norm_affine(gm, node)
            if affine is None:
                continue
            readers = _readers(gm, affine)
            region = Region([node, *(r.output for r in readers)] if not isinstance(readers, str) else [node],
                            [affine.x], [r.output for r in readers] if not isinstance(readers, str) else [node])
            if isinstance(readers, str):
                found.append(Candidate(region, reason=readers))
                continue
            new = replacement(affine, readers)
            before = affine.gamma.numel() + (0 if affine.beta is None else affine.beta.numel()) + sum(
                r.weight.numel() + (0 if r.bias is None else r.bias.numel()) for r in readers)
            after = sum(p.numel() for p in new.parameters())
            if after >= before and not options.force:
                found.append(Candidate(region, reason=f"folding adds biases: {before:,} → {after:,} parameters"))
                continue
            found.append(Candidate(region, new, tolerance=options.tolerance))
        return found
