"""fold_batchnorm: eval-mode BatchNorm folded into the Conv or Linear before it.

    y = s ⊙ (W ⋆ x + b) + t  =  (diag(s)·W) ⋆ x + (s ⊙ b + t),   s = γ/√(σ² + ε),  t = β − μ·s

(LayerCollapse Eq. 6 / Algorithm 1 lines 3–5; the same algebra as ``torch.nn.utils.fusion``).

Exact when: BN is in eval mode with running statistics, and normalises the layer's output-channel
axis (Conv2d/3d always; Conv1d and Linear need example inputs to prove the rank, 3 and 2, and the
result checks that rank on every call: BatchNorm1d would normalise another axis at another rank).
Eval-mode Dropout and Identity between the two are seen through. Folding into the *following*
layer is not done: a following conv's zero padding is applied after BN's shift.
"""
from __future__ import annotations

import torch.fx as fx

from fxfuse.affine import (ChannelAffine, batchnorm_affine, batchnorm_problem, batchnorm_rank, fold_into_weights,
                           new_conv, new_linear)
from fxfuse.match import find_chains, kinds
from fxfuse.ir import BATCHNORM, CONV, IDENTITY, LINEAR
from fxfuse.pass_manager import Candidate, Options


class FoldBatchNorm:
    name = "fold_batchnorm"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        found = []
        for chain, reason in find_chains(gm, kinds(LINEAR, CONV), kinds(IDENTITY), kinds(BATCHNORM)):
            if reason:
                found.append(Candidate(chain, reason=reason))
                continue
            layer, bn = chain.first, chain.last.stats
            problem = batchnorm_problem(bn, layer)
            if problem:
                found.append(Candidate(chain, reason=problem))
                continue
            weight, bias = fold_into_weights(layer.weight, layer.bias, ChannelAffine(*batchnorm_affine(bn)))
            module = (new_conv(layer.conv, weight, bias, layer.weight) if layer.is_conv
                      else new_linear(weight, bias, layer.weight))
            found.append(Candidate(chain, module, tolerance=options.tolerance, input_rank=batchnorm_rank(bn, layer)))
        return found
