"""The rewrite passes, one module per family, in the order ``optimize`` runs them.

A pass is an object with a ``name`` and ``candidates(gm, options) -> list[Candidate]``; the
shared machinery in ``fxfuse.pass_manager`` verifies, applies and reports what they find.
"""
from .collapse_linear import CollapseLinear
from .compose_conv import ComposeConv
from .drop_identity import DropIdentity
from .fold_batchnorm import FoldBatchNorm
from .fold_norm_affine import FoldNormAffine
from .fuse_parallel import FuseParallel
from .split_parallel import SplitParallel
from .untranspose_linear import UntransposeLinear

DEFAULT_PASSES = (FoldBatchNorm(), CollapseLinear(), ComposeConv(), DropIdentity())
# Opt-in: exact, and faster under torch.compile on an H100 (MLP-Mixer-B), but slower in eager CUDA
# (torch.matmul(2-D, 3-D) copies its input there), so not a default: see the README's Benchmarks.
WITH_UNTRANSPOSE = DEFAULT_PASSES + (UntransposeLinear(),)
# Opt-in: exact, saves a norm's 2·d affine parameters, but no time (layer_norm applies its affine in
# the same kernel) and may add biases to bias-free readers; see passes/fold_norm_affine.py.
ALL_PASSES = WITH_UNTRANSPOSE + (FoldNormAffine(), FuseParallel(), SplitParallel())
# Horizontal fusion: exact, same parameters and MACs, fewer GEMM launches (q/k/v, gate/up); last, so
# the passes before it see the separate layers. ``SplitParallel`` (in ALL_PASSES after it, so that
# list round-trips) undoes it where the parts are wanted back.
WITH_FUSION = DEFAULT_PASSES + (FuseParallel(),)

__all__ = ["CollapseLinear", "ComposeConv", "DropIdentity", "FoldBatchNorm", "FoldNormAffine", "FuseParallel",
           "SplitParallel", "UntransposeLinear", "DEFAULT_PASSES", "WITH_UNTRANSPOSE", "WITH_FUSION", "ALL_PASSES"]
