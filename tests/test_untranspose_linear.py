import pytest
import torch
from conftest import applied, assert_same_function, optimize_and_compare, skipped
from torch import nn

import fxfuse
from fxfuse.modules import LeftLinear
from fxfuse.passes import WITH_UNTRANSPOSE

OPT_IN = {"passes": WITH_UNTRANSPOSE}


class TokenMixing(nn.Module):
    """MLP-Mixer's token mixing after collapse: transpose → Linear → transpose, plus a residual."""

    def __init__(self, tokens=12, dims=(1, 2), bias=True):
        super().__init__()
        self.fc, self.dims = nn.Linear(tokens, tokens, bias=bias), dims

    def forward(self, x):
        return x + self.fc(x.transpose(*self.dims)).transpose(*self.dims)


@pytest.mark.parametrize("dims,bias", [((1, 2), True), ((-1, -2), True), ((2, 1), False)])
def test_token_mixing_becomes_a_left_matmul(dims, bias):
    gm, report = optimize_and_compare(TokenMixing(dims=dims, bias=bias).eval(), (torch.randn(3, 12, 7),), **OPT_IN)
    assert len(applied(report, "untranspose_linear")) == 1
    assert [type(m) for m in gm.modules()][1:] == [LeftLinear]
    assert not any(n.target == "transpose" for n in gm.graph.nodes)
    assert report.macs_after == report.macs_before


def test_other_axes_are_left_alone():
    gm, report = optimize_and_compare(TokenMixing(tokens=3, dims=(0, 2)).eval(), (torch.randn(3, 12, 4),), **OPT_IN)
    assert not applied(report, "untranspose_linear")


def test_data_free_needs_negative_axes():
    model = TokenMixing().eval()
    assert "rank is unknown" in skipped(fxfuse.report_of(fxfuse.optimize(model, **OPT_IN)), "untranspose_linear")[0].reason
    negative = TokenMixing(dims=(-1, -2)).eval()
    gm = fxfuse.optimize(negative, **OPT_IN)
    assert fxfuse.report_of(gm).applied
    assert_same_function(gm, negative, (torch.randn(3, 12, 7),))  # nothing checked it without inputs


def test_exports_and_pickles(tmp_path):
    x = (torch.randn(2, 12, 5),)
    model = TokenMixing().eval()
    gm = fxfuse.optimize(model, x, **OPT_IN)
    assert_same_function(gm, model, x)
    assert fxfuse.export_onnx(gm, x, tmp_path / "t.onnx").error <= 1e-4
    torch.save(gm, tmp_path / "gm.pt")
    assert torch.equal(torch.load(tmp_path / "gm.pt", weights_only=False)(*x), gm(*x))


class MixerTokenMlp(nn.Module):
    """timm's Mixer token MLP: transpose → fc1 → PReLU(1) → Dropout → fc2 → Dropout → transpose."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, 48), nn.PReLU(init=1.0), nn.Dropout(0.0), nn.Linear(48, 12),
                                 nn.Dropout(0.0))

    def forward(self, x):
        return x + self.mlp(x.transpose(1, 2)).transpose(1, 2)


def test_opt_in_pipeline_collapses_then_untransposes_through_leftover_dropout():
    gm, report = optimize_and_compare(MixerTokenMlp().eval(), (torch.randn(2, 12, 5),), **OPT_IN)
    assert [r.pass_name for r in report.applied] == ["collapse", "drop_identity", "untranspose_linear"]
    assert [type(m) for m in gm.modules()][1:] == [LeftLinear]


def test_not_a_default_pass():
    _, report = optimize_and_compare(MixerTokenMlp().eval(), (torch.randn(2, 12, 5),))
    assert [r.pass_name for r in report.applied] == ["collapse", "drop_identity"]
