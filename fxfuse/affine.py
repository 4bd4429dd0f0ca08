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
import torch.fx as fx
from torch import nn

from .graph import BATCHNORM_TYPES, Layer, is_batchnorm, is_identity, module_of, rank_of


@dataclass
class ChannelAffine:
    """s ⊙ h + t over the channels of a layer's output (float64), and whether it is exact."""

    scale: torch.Tensor
    shift: torch.Tensor
    exact: bool = True
    slope_deviation: float = 0.0  # max |α − 1| over the PReLU slopes treated as the identity

    @classmethod
    def identity(cls, channels: int, device: torch.device) -> "ChannelAffine":
        return cls(torch.ones(channels, dtype=torch.float64, device=device),
                   torch.zeros(channels, dtype=torch.float64, device=device))

    def then(self, scale: torch.Tensor, shift: torch.Tensor) -> "ChannelAffine":
        """Compose with a following map h ↦ scale ⊙ h + shift."""
        return ChannelAffine(scale * self.scale, scale * self.shift + shift, self.exact, self.slope_deviation)


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as (s, t) in float64: s = γ/√(σ² + ε), t = β − μ·s."""
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def fold_into_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                      affine: ChannelAffine) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = diag(s)·W, b' = s ⊙ b + t, in float64 (weight is (out, ...), any trailing dims)."""
    s = affine.scale.view(-1, *([1] * (weight.dim() - 1)))
    b = weight.new_zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return s * weight.detach().double(), affine.scale * b + affine.shift


def batchnorm_problem(bn: nn.Module, layer: Layer) -> str | None:
    """Why ``bn`` cannot be folded as a per-channel affine of ``layer``'s output, or None."""
    if bn.training:
        return "BatchNorm is in training mode (uses batch statistics)"
    if bn.running_mean is None:
        return "BatchNorm has track_running_stats=False: it normalises by batch statistics even in eval mode"
    if bn.num_features != layer.out_channels:
        return f"BatchNorm has {bn.num_features} features, the layer {layer.out_channels} channels"
    rank_needed = 2 if not layer.is_conv else layer.weight.dim()  # Linear: (N, C); ConvNd: (N, C, *spatial)
    if layer.is_conv and not isinstance(bn, nn.BatchNorm1d):
        return None  # BatchNorm2d/3d only accept batched input, whose channel axis is 1
    rank = rank_of(layer.node)
    if rank is None:
        return "without example inputs the rank of the layer's output is unknown, so BatchNorm's channel axis is not proven"
    if rank != rank_needed:
        return f"BatchNorm normalises axis 1 of a rank-{rank} tensor, not the layer's channel axis"
    return None


def affine_between(gm: fx.GraphModule, layer: Layer, middle: list[fx.Node], tau: float) -> ChannelAffine | str:
    """The map the ``middle`` nodes apply to ``layer``'s output, or the reason it is not affine."""
    affine = ChannelAffine.identity(layer.out_channels, layer.weight.device)
    for node in middle:
        mod = module_of(gm, node)
        if is_identity(gm, node):
            continue
        if isinstance(mod, nn.PReLU):
            deviation = (mod.weight.detach().double() - 1).abs().max().item()
            if deviation > tau:
                return f"PReLU slope max|α−1| = {deviation:.3g} > τ = {tau:g}: the activation is not linear"
            affine = ChannelAffine(affine.scale, affine.shift, affine.exact and deviation == 0,
                                   max(affine.slope_deviation, deviation))
        elif isinstance(mod, BATCHNORM_TYPES):
            problem = batchnorm_problem(mod, layer)
            if problem:
                return problem
            affine = affine.then(*batchnorm_affine(mod))
        else:
            return f"{node.name} is not a per-channel affine map"
    return affine


def is_between_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Structurally a candidate between two layers: identity, dropout, PReLU or BatchNorm."""
    prelu = isinstance(module_of(gm, node), nn.PReLU) and len(node.args) == 1
    return prelu or is_identity(gm, node) or is_batchnorm(gm, node)


def new_linear(weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding float64 ``weight``/``bias`` cast back to ``like``'s dtype and device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], device=like.device, dtype=like.dtype)
    return _load(linear, weight, bias, like)


def new_conv(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor, **changes) -> nn.Module:
    """A conv like ``conv`` (same class, padding mode, ...) with new weights and ``changes``."""
    config = dict(in_channels=conv.in_channels, out_channels=weight.shape[0], kernel_size=tuple(weight.shape[2:]),
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  padding_mode=conv.padding_mode)
    config.update(changes)
    new = type(conv)(**config, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    return _load(new, weight, bias, conv.weight)


def _load(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(weight.to(like.dtype))
        module.bias.copy_(bias.to(like.dtype))
    module.requires_grad_(like.requires_grad)
    return module.eval()
