import pytest
import torch
import torch.nn.functional as F
from conftest import applied, assert_same_function, count, optimize_and_compare, randomize_batchnorm, skipped
from torch import nn

import fxfuse
from fxfuse.passes import FoldBatchNorm

BN = nn.modules.batchnorm._BatchNorm
CASES = [
    (nn.Conv1d, nn.BatchNorm1d, 1), (nn.Conv2d, nn.BatchNorm2d, 2), (nn.Conv3d, nn.BatchNorm3d, 3),
]


@pytest.mark.parametrize("conv,bn,dims", CASES)
def test_conv_batchnorm_folds_exactly(conv, bn, dims, seed):
    g = torch.Generator().manual_seed(seed)
    c_in, c_out = (int(torch.randint(1, 9, (1,), generator=g)) * 2 for _ in range(2))
    model = nn.Sequential(conv(c_in, c_out, 3, stride=1 + seed % 2, padding=seed % 3, groups=1 + seed % 2,
                               bias=seed % 2 == 0), nn.Dropout(0.2), bn(c_out))
    model = randomize_batchnorm(model, g).eval()
    x = torch.randn(2, c_in, *([9] * dims), generator=g)
    gm, report = optimize_and_compare(model, (x,), passes=[FoldBatchNorm()])
    assert count(gm, BN) == 0 and len(applied(report, "fold_batchnorm")) == 1
    assert report.params_after < report.params_before


def test_linear_batchnorm_folds_on_2d_input():
    model = randomize_batchnorm(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10))).eval()
    gm, _ = optimize_and_compare(model, (torch.randn(5, 6),))
    assert count(gm, BN) == 0


def test_linear_batchnorm_on_3d_input_is_not_folded():
    """BatchNorm1d normalises axis 1 of (N, C, L); the Linear's features are axis 2."""
    model = randomize_batchnorm(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(4))).eval()
    gm, report = optimize_and_compare(model, (torch.randn(5, 4, 6),))
    assert count(gm, BN) == 1 and "features" in skipped(report, "fold_batchnorm")[0].reason
    square = randomize_batchnorm(nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10))).eval()
    gm, report = optimize_and_compare(square, (torch.randn(5, 10, 6),))
    assert count(gm, BN) == 1 and "rank-3" in skipped(report, "fold_batchnorm")[0].reason


def test_batchnorm_without_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 8, 8),))
    assert count(gm, BN) == 1 and "track_running_stats" in skipped(report, "fold_batchnorm")[0].reason


def test_data_free_fold_needs_a_proven_channel_axis():
    conv2d = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    conv1d = randomize_batchnorm(nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8))).eval()
    folded = fxfuse.optimize(conv2d)
    assert count(folded, BN) == 0
    assert_same_function(folded, conv2d, (torch.randn(2, 3, 9, 9),))  # nothing checked it without inputs
    gm = fxfuse.optimize(conv1d)
    assert count(gm, BN) == 1 and "rank" in skipped(fxfuse.report_of(gm), "fold_batchnorm")[0].reason


class ConvFeedsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_with_other_users_is_not_folded():
    model = randomize_batchnorm(ConvFeedsTwo()).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 8, 8),))
    assert count(gm, BN) == 1 and "users" in skipped(report, "fold_batchnorm")[0].reason


def test_fold_preserves_dtype_and_requires_grad():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).double().eval()
    model[0].requires_grad_(False)
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64),), rtol=1e-12,
                                      tolerance=1e-12)
    assert count(gm, BN) == 0 and applied(report, "fold_batchnorm")
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.weight.dtype == torch.float64 and not conv.weight.requires_grad


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm2d subclass whose forward checks the input's
    rank, calls F.batch_norm and an activation (so it is not the base layer: it is traced through)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


def test_functional_batchnorm_inside_a_subclass_is_folded():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 4, 1),
                                              BatchNormAct(4))).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 3, 10, 10),))
    assert len(applied(report, "fold_batchnorm")) == 2
    assert not any(n.target in (F.batch_norm, torch.ops.aten.batch_norm.default) for n in gm.graph.nodes)
