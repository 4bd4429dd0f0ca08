"""collapse: Linear → [BatchNorm | PReLU(α≈1) | Dropout | Identity]* → Linear becomes one Linear.

With the middle ops an affine map h ↦ s ⊙ h + t (see ``fxfuse.affine``), LayerCollapse Eq. 3 and
Algorithm 1 give

    y = W2·(s ⊙ (W1·x + b1) + t) + b2 = (W2·diag(s)·W1)·x + W2·(s ⊙ b1 + t) + b2,

formed in float64 and cast back. Chains of several Linears collapse pair by pair, repeatedly.

Applied only where the compression gain (Eq. 7) is positive, unless ``force``:

    Gain = 1 − n_in·n_out / (n_hidden·(n_in + n_out)) > 0.

Exact when every PReLU slope is exactly 1 and any BatchNorm acts on the hidden features (see
``fxfuse.affine.batchnorm_problem``). With slopes within τ of 1 the collapse is approximate: it
needs example inputs, and its measured error is reported (LayerCollapse Eq. 4 bounds it by
C·(1 − α)²).
"""
from __future__ import annotations

import torch.fx as fx

from fxfuse.affine import affine_between, fold_into_weights, is_between_op, new_linear
from fxfuse.graph import as_layer, find_chains, is_linear
from fxfuse.pass_manager import Candidate, Options


def collapse_gain(n_in: int, n_hidden: int, n_out: int) -> float:
    """LayerCollapse Eq. 7: the fraction of weights saved by replacing W2·W1 with their product."""
    return 1 - n_in * n_out / (n_hidden * (n_in + n_out))


class CollapseLinear:
    name = "collapse"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for chain, reason in find_chains(gm, is_linear, is_between_op, is_linear):
            if reason:
                found.append(Candidate(chain, reason=reason))
                continue
            first, second = as_layer(gm, chain.nodes[0]), as_layer(gm, chain.nodes[-1])
            (n_hidden, n_in), n_out = first.weight.shape, second.weight.shape[0]
            gain = collapse_gain(n_in, n_hidden, n_out)
            affine = affine_between(gm, first, chain.middle, options.tau)
            if isinstance(affine, str):
                found.append(Candidate(chain, reason=affine))
            elif gain <= 0 and not options.force:
                found.append(Candidate(chain, reason=f"compression gain (Eq. 7) {gain:.2f} ≤ 0: "
                                                     f"{n_in}→{n_hidden}→{n_out} is a bottleneck"))
            else:
                w1, b1 = fold_into_weights(first.weight, first.bias, affine)
                w2 = second.weight.detach().double()
                bias = w2 @ b1 + (0 if second.bias is None else second.bias.detach().double())
                module = new_linear(w2 @ w1, bias, first.weight)
                found.append(Candidate(chain, module, exact=affine.exact,
                                       tolerance=options.tolerance if affine.exact else options.approx_tolerance))
        return found
