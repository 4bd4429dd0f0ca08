"""Per-channel affine maps between two layers, and how they fold into the layer before them.

Everything that may sit between two foldable layers is, in eval mode, a per-channel affine map
h ↦ s ⊙ h + t on the first layer's output channels:

- ``nn.Identity`` and eval-mode dropout: s = 1, t = 0 (exact);
- ``nn.PReLU`` with every slope α = 1: the identity (exact); with max|α − 1| ≤ τ it is treated as
  the identity and the rewrite is *approximate* (LayerCollapse Eq. 4 bounds the error by
  C·(1 − α)²);
- eval-mode BatchNorm (LayerCollapse Eq. 6 with running statistics): s = γ/√(σ² + ε),
  t = β − μ·s, exact when BN's channel axis is the layer's output-channel axis.

Folding s, t into the preceding layer y = W ⋆ x + b gives W' = diag(s)·W, b' = s ⊙ b + t
(LayerCollapse Algorithm 1, lines 3–5, with the scale applied to the hidden channels:
the printed line 4, s·W2·W1, puts it on the wrong side of W2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .match import kinds, rank_of
from .ir import BATCHNORM, BETWEEN_KINDS, CONV_MODULES, IDENTITY, PRELU, BatchNormStats, ConvSpec, Op


@dataclass
class ChannelAffine:
    """s ⊙ h + t over the channels of a layer's output (float64), and whether it is exact."""

    scale: torch.Tensor
    shift: torch.Tensor
    exact: bool = True
    slope_deviation: float = 0.0  # max |α − 1| over the PReLU slopes treated as the identity
    rank: int | None = None  # the only rank of the layer's output at which the map is per-channel (see batchnorm_rank)

    @classmethod
    def identity(cls, channels: int, device: torch.device) -> "ChannelAffine":
        return cls(torch.ones(channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device))

    def then_prelu(self, slopes: torch.Tensor, tau: float) -> "ChannelAffine | str":
        """Compose with a PReLU treated as the identity, exact when every slope α is 1; or the
        reason it is not linear enough (max|α − 1| > τ)."""
        deviation = (slopes.detach().double() - 1).abs().max().item()
        if deviation > tau:
            return f"PReLU slope max|α−1| = {deviation:.3g} > τ = {tau:g}: the activation is not linear"
        return ChannelAffine(self.scale, self.shift, self.exact and deviation == 0,
                             max(self.slope_deviation, deviation), self.rank)

    def then(self, scale: torch.Tensor, shift: torch.Tensor) -> "ChannelAffine":
        """Compose with a following map h ↦ scale ⊙ h + shift."""
        return ChannelAffine(scale * self.scale, scale * self.shift + shift, self.exact, self.slope_deviation, self.rank)


def batchnorm_affine(bn: BatchNormStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as (s, t) in float64: s = γ/√(σ² + ε), t = β − μ·s."""
    var = bn.var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def collapse_gain(n_in: int, n_hidden: int, n_out: int) -> float:
    """LayerCollapse Eq. 7: the fraction of weights saved by replacing W2·W1 with their product."""
    return 1 - n_in * n_out / (n_hidden * (n_in + n_out))


def fold_into_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                      affine: ChannelAffine) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = diag(s)·W, b' = s ⊙ b + t, in float64 (weight is (out, ...), any trailing dims)."""
    s = affine.scale.view(-1, *([1] * (weight.dim() - 1)))
    b = weight.new_zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return s * weight.detach().double(), affine.scale * b + affine.shift


def batchnorm_problem(bn: BatchNormStats, layer: Op) -> str | None:
    """Why ``bn`` cannot be folded as a per-channel affine of ``layer``'s output, or None.

    BatchNorm normalises axis 1. That is the layer's channel axis when the layer's output has rank 2
    (Linear) or 2 + spatial dims (a batched ConvNd): proven by BatchNorm2d/3d's own rank check, or
    seen on the example inputs (an exported graph's static ranks are the example's too), and then
    guarded in the rewritten graph (``Candidate.input_rank``)."""
    if bn.training:
        return "BatchNorm uses batch statistics (training mode, or track_running_stats=False)"
    if bn.num_features != layer.out_channels:
        return f"BatchNorm has {bn.num_features} features, the layer {layer.out_channels} channels"
    rank_needed = batchnorm_rank(bn, layer)  # ConvNd: (N, C, *spatial); Linear: (N, C)
    if rank_needed is None:
        return None  # BatchNorm2d/3d accept only that rank
    rank = rank_of(layer.output)
    if rank is None:
        return "without example inputs the rank of the layer's output is unknown, so BatchNorm's channel axis is not proven"
    if rank != rank_needed:
        return f"BatchNorm normalises axis 1 of a rank-{rank} tensor, not the layer's channel axis"
    return None


def batchnorm_rank(bn: BatchNormStats, layer: Op) -> int | None:
    """The rank ``layer``'s output must have for ``bn`` to normalise its channels, when ``bn`` itself
    does not enforce it (BatchNorm1d takes ranks 2 and 3, a functional BatchNorm any rank ≥ 2): a
    Linear → BatchNorm1d fold proven on 2-D examples is wrong on 3-D inputs, where axis 1 is the
    sequence. None when BatchNorm2d/3d's own check guarantees it."""
    rank_needed = layer.weight.dim() if layer.is_conv else 2
    return None if bn.rank == rank_needed else rank_needed


def affine_between(layer: Op, middle: list[Op], tau: float) -> ChannelAffine | str:
    """The map the ``middle`` ops apply to ``layer``'s output, or the reason it is not affine."""
    affine = ChannelAffine.identity(layer.out_channels, layer.weight.device)
    for op in middle:
        if op.kind == IDENTITY:
            continue
        if op.kind == PRELU:
            affine = affine.then_prelu(op.weight, tau)
            if isinstance(affine, str):
                return affine
        elif op.kind == BATCHNORM:
            problem = batchnorm_problem(op.stats, layer)
            if problem:
                return problem
            affine = affine.then(*batchnorm_affine(op.stats))
            affine.rank = batchnorm_rank(op.stats, layer) or affine.rank
        else:
            return f"{op.output.name} is not a per-channel affine map"
    return affine


# Structurally a candidate between two layers: identity, dropout, PReLU or BatchNorm.
is_between_op = kinds(*BETWEEN_KINDS)


def collapsed_linear(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
                     affine: ChannelAffine) -> nn.Linear:
    """One Linear for Linear(w1, b1) → affine → Linear(w2, b2) (weights in nn.Linear's (out, in)
    layout), in the dtype and device of ``w1``: W = W2·diag(s)·W1, b = W2·(s ⊙ b1 + t) + b2 in
    float64 (LayerCollapse Eq. 3 with the affine between folded)."""
    w1_folded, b1_folded = fold_into_weights(w1, b1, affine)
    w2 = w2.detach().double()
    bias = w2 @ b1_folded + (0 if b2 is None else b2.detach().double())
    return new_linear(w2 @ w1_folded, bias, w1)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding float64 ``weight``/``bias`` (None: no bias) cast back to ``like``'s
    dtype and device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.device, dtype=like.dtype)
    return _load(linear, weight, bias, like)


def new_conv(spec: ConvSpec, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor,
             **changes) -> nn.Module:
    """An ``nn.ConvNd`` with ``spec``'s geometry (padding mode, ...) updated by ``changes``, holding
    float64 ``weight``/``bias`` cast back to ``like``'s dtype and device."""
    config = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
                  padding_mode=spec.padding_mode)
    config.update(changes)
    conv_type = next(t for t, d in CONV_MODULES.items() if d == spec.dims)
    new = conv_type(weight.shape[1] * config["groups"], weight.shape[0], tuple(weight.shape[2:]), **config,
                    bias=bias is not None, device=like.device, dtype=like.dtype)
    return _load(new, weight, bias, like)


def _load(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(weight.to(like.dtype))
        if bias is not None:
            module.bias.copy_(bias.to(like.dtype))
    module.requires_grad_(like.requires_grad)
    return module.eval()
