"""collapse: Linear → [BatchNorm | PReLU(α≈1) | Dropout | Identity]* → Linear becomes one Linear.

With the middle ops an affine map h ↦ s ⊙ h + t (see ``fxfuse.affine``), LayerCollapse Eq. 3 and
Algorithm 1 give

    y = W2·(s ⊙ (W1·x + b1) + t) + b2 = (W2·diag(s)·W1)·x + W2·(s ⊙ b1 + t) + b2,

formed in float64 and cast back. Chains of several Linears collapse pair by pair, repeatedly.

Applied only where the compression gain (Eq. 7) is positive, unless ``force``:

    Gain = 1 − n_in·n_out / (n_hidden·(n_in + n_out)) > 0.

Exact when every PReLU slope is exactly 1 and any BatchNorm acts on the hidden features (see
``fxfuse.affine.batchnorm_problem``). With slopes within τ of 1 the collapse is approximate: it
needs example inputs, and its measured error is reported beside two bounds on it (see
``collapse_error_bounds``): the paper's Eq. 4–5 and one that is proven for any hidden width.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.fx as fx

from fxfuse.affine import affine_between, collapse_gain, collapsed_linear, is_between_op
from fxfuse.match import find_chains, kinds
from fxfuse.ir import BATCHNORM, LINEAR, PRELU, Op
from fxfuse.pass_manager import Candidate, Options

is_linear = kinds(LINEAR)


def collapse_error_bounds(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, x_norm: float,
                          deviation: float) -> tuple[float, float]:
    """Bounds on |Y_linear − Y_α| (L2, per sample) for Y = W2·PReLU_α(W1·x + b1) + b2, |x| ≤ x_norm.

    With Δ = max|1 − α| over the slopes and z = W1·x + b1:

    - LayerCollapse Eq. 4–5: |ΔY|² ≤ C·Δ², C = σ_max(W2·W1)²·|x^δ|² + |W2·b1|².
      Its proof (App. A) treats the indicator I of Eq. 12 as one scalar; with a hidden layer wider
      than one unit, I is a diagonal mask D and ΔY = (1 − α)·W2·D·z, whose norm can exceed
      σ_max(W2·W1)·|x| (W2·W1 may even be 0 while W2·D·W1 is not). So it is not a bound in general.
    - proven: |ΔY| = |W2·diag(1 − α)·D·z| ≤ Δ·σ_max(W2)·|z| ≤ Δ·σ_max(W2)·(σ_max(W1)·|x| + |b1|).
    """
    w1, w2 = w1.detach().double(), w2.detach().double()
    b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1.detach().double()
    sigma = lambda m: torch.linalg.matrix_norm(m, ord=2).item()  # noqa: E731  largest singular value
    c = sigma(w2 @ w1) ** 2 * x_norm ** 2 + (w2 @ b1).norm().item() ** 2
    return c ** 0.5 * deviation, deviation * sigma(w2) * (sigma(w1) * x_norm + b1.norm().item())


def _bounds_on(first: Op, second: Op, deviation: float, x: torch.Tensor) -> tuple[float, float]:
    """``collapse_error_bounds`` with |x^δ| the largest input norm among the recorded samples (δ → 0)."""
    x_norm = x.detach().double().reshape(-1, first.weight.shape[1]).norm(dim=1).max().item()
    return collapse_error_bounds(first.weight, first.bias, second.weight, x_norm, deviation)


class CollapseLinear:
    name = "collapse"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for chain, reason in find_chains(gm, is_linear, is_between_op, is_linear):
            if reason:
                found.append(Candidate(chain, reason=reason))
                continue
            first, second = chain.first, chain.last
            (n_hidden, n_in), n_out = first.weight.shape, second.weight.shape[0]
            gain = collapse_gain(n_in, n_hidden, n_out)
            affine = affine_between(first, chain.middle, options.tau)
            if isinstance(affine, str):
                found.append(Candidate(chain, reason=affine))
            elif gain <= 0 and not options.force:
                found.append(Candidate(chain, reason=f"compression gain (Eq. 7) {gain:.2f} ≤ 0: "
                                                     f"{n_in}→{n_hidden}→{n_out} is a bottleneck"))
            else:
                # the bounds are derived for Linear → one PReLU → Linear: none through BatchNorm or two PReLUs
                plain = (not any(op.kind == BATCHNORM for op in chain.middle)
                         and sum(op.kind == PRELU for op in chain.middle) <= 1)
                bounds = partial(_bounds_on, first, second, affine.slope_deviation) if plain else None
                found.append(Candidate(chain, build=partial(collapsed_linear, first.weight, first.bias, second.weight, second.bias, affine), exact=affine.exact,
                                       tolerance=options.tolerance if affine.exact else options.approx_tolerance,
                                       bounds=None if affine.exact else bounds, input_rank=affine.rank,
                                       cost=n_out * n_hidden * n_in))
        return found
