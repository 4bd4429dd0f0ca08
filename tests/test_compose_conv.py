import pytest
import torch
from conftest import applied, count, optimize_and_compare, randomize_batchnorm, skipped
from torch import nn

import fxfuse
from fxfuse.passes import ComposeConv
from fxfuse.passes.compose_conv import compose_gain

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

def pick(g, options):
    return options[int(torch.randint(len(options), (1,), generator=g))]

def random_pair(case: int):
    """Conv(k1, stride, dilation, padding, groups) → [BN] → PReLU(1) → Conv(k2, no padding), wide hidden."""
    g = torch.Generator().manual_seed(case)
    dims = pick(g, [1, 2, 2, 3])
    groups = pick(g, [1, 1, 2])
    c_in, c_out, c_hidden = 2 * pick(g, [1, 2]), 2 * pick(g, [1, 2, 3]), 16 * pick(g, [2, 3])
    k1, k2 = pick(g, [1, 2, 3]), pick(g, [1, 2, 3])
    conv1 = CONVS[dims](c_in, c_hidden, k1, stride=pick(g, [1, 2, 3]), dilation=pick(g, [1, 2]),
                        padding=pick(g, [0, 1, 2]), groups=groups, padding_mode=pick(g, ["zeros", "zeros", "reflect"]))
    conv2 = CONVS[dims](c_hidden, c_out, k2, stride=pick(g, [1, 2]), dilation=pick(g, [1, 2]),
                        groups=pick(g, [1, groups]), bias=pick(g, [True, False]))
    middle = [BATCHNORMS[dims](c_hidden), nn.PReLU(c_hidden, init=1.0)][: pick(g, [0, 1, 2])]
    model = randomize_batchnorm(nn.Sequential(conv1, *middle, conv2), g).eval()
    size = [int(torch.randint(17, 24, (1,), generator=g)) for _ in range(dims)]
    return model, (torch.randn(pick(g, [1, 3]), c_in, *size, generator=g),)

@pytest.mark.parametrize("case", range(30))
def test_random_conv_pairs_compose_within_tolerance(case):
    model, inputs = random_pair(case)
    gm, report = optimize_and_compare(model, inputs, rtol=1e-4, force=True)
    assert count(gm, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) == 1, report.table()
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0

@pytest.mark.parametrize("height,width", [(9, 9), (10, 13), (16, 11)])
def test_strided_padded_first_conv_is_exact_at_the_borders(height, width):
    model = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.PReLU(init=1.0), nn.Conv2d(64, 8, 3)).eval()
    x = torch.randn(2, 3, height, width)
    gm, _ = optimize_and_compare(model, (x,), rtol=1e-4)
    y, ref = gm(x), model(x)
    assert y.shape == ref.shape
    border = torch.cat([(y - ref)[..., 0, :].flatten(), (y - ref)[..., -1, :].flatten(), (y - ref)[..., :, -1].flatten()])
    assert border.abs().max() <= 1e-4 * ref.abs().max()
    (conv,) = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2)  # k1 + s1·(k2 − 1)

def test_padded_second_conv_is_not_composed():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 8, 3, padding=1)).eval()
    gm, report = optimize_and_compare(model, (torch.randn(1, 3, 12, 12),))
    assert count(gm, nn.Conv2d) == 2
    assert "pads the hidden map" in skipped(report, "compose")[0].reason

def test_same_padding_second_conv_with_unit_kernel_composes():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding="same"), nn.Conv2d(64, 8, 1, padding="same")).eval()
    gm, _ = optimize_and_compare(model, (torch.randn(1, 3, 12, 12),), rtol=1e-4)
    assert count(gm, nn.Conv2d) == 1

def test_negative_gain_is_not_composed():
    model = nn.Sequential(nn.Conv2d(32, 16, 3), nn.Conv2d(16, 32, 3)).eval()
    assert compose_gain(model[0].weight, model[1].weight, (32, 32, 5, 5)) < 0
    gm, report = optimize_and_compare(model, (torch.randn(1, 32, 12, 12),))
    assert count(gm, nn.Conv2d) == 2
    assert "Eq. 8" in skipped(report, "compose")[0].reason

def test_nonlinear_middle_is_not_composed():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.PReLU(64), nn.Conv2d(64, 8, 1)).eval()
    gm, report = optimize_and_compare(model, (torch.randn(1, 3, 12, 12),))
    assert count(gm, nn.Conv2d) == 2 and "τ" in skipped(report, "compose")[0].reason

def test_depthwise_then_pointwise_composes():
    model = nn.Sequential(nn.Conv2d(8, 64, 3, groups=8, padding=1), nn.Conv2d(64, 8, 1)).eval()
    gm, _ = optimize_and_compare(model, (torch.randn(2, 8, 10, 10),), rtol=1e-4, passes=[ComposeConv()])
    assert count(gm, nn.Conv2d) == 1

def test_data_free_composition_is_applied_and_correct():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 8, 1)).eval()
    gm = fxfuse.optimize(model)
    x = torch.randn(2, 3, 11, 11)
    assert count(gm, nn.Conv2d) == 1
    assert (gm(x) - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    assert applied(fxfuse.report_of(gm), "compose")[0].error is None
