"""The rewrite passes, one module per family, in the order ``optimize`` runs them.

A pass is an object with a ``name`` and ``candidates(gm, options) -> list[Candidate]``; the
shared machinery in ``fxfuse.pass_manager`` verifies, applies and reports what they find.
"""
from .collapse_linear import CollapseLinear
from .compose_conv import ComposeConv
from .drop_identity import DropIdentity
from .fold_batchnorm import FoldBatchNorm
from .untranspose_linear import UntransposeLinear

DEFAULT_PASSES = (FoldBatchNorm(), CollapseLinear(), ComposeConv(), DropIdentity(), UntransposeLinear())

__all__ = ["CollapseLinear", "ComposeConv", "DropIdentity", "FoldBatchNorm", "UntransposeLinear", "DEFAULT_PASSES"]
