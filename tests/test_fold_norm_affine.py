import pytest
import torch
from conftest import applied, optimize_and_compare, skipped
from torch import nn

import fxfuse
from fxfuse.passes import FoldNormAffine

D = 16


class PreNormAttention(nn.Module):
    """norm → q, k, v (k without bias) → attention → o, plus the residual; ``residual_reads_norm``
    adds the normalised value itself to the output (a reader that is not a Linear)."""

    def __init__(self, norm: nn.Module, residual_reads_norm: bool = False):
        super().__init__()
        self.norm, self.residual_reads_norm = norm, residual_reads_norm
        self.q, self.k, self.v, self.o = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D), nn.Linear(D, D)
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0, 0.3)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / D ** 0.5, -1) @ self.v(h)
        return x + self.o(a) + (h if self.residual_reads_norm else 0)


class HandRMSNorm(nn.Module):
    """RMSNorm as transformers writes it: the weight multiplies the normalised value."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


NORMS = {"layernorm": lambda: nn.LayerNorm(D), "rmsnorm": lambda: nn.RMSNorm(D), "hand_rmsnorm": lambda: HandRMSNorm(D)}


def affine_params(norm: nn.Module) -> int:
    return sum(p.numel() for p in norm.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_affine_goes_into_q_k_v(norm):
    model = PreNormAttention(NORMS[norm]()).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 5, D),), passes=[FoldNormAffine()])
    rows = applied(report, "fold_norm_affine")
    assert len(rows) == 1 and {"q", "k", "v"} <= set(rows[0].where)
    gained_bias = D if getattr(model.norm, "bias", None) is not None else 0  # k: W·β becomes its bias
    assert report.params_before - report.params_after == affine_params(model.norm) - gained_bias
    with torch.no_grad():  # other batch and (symbolic_trace; export fixes a float input's dim 1) sequence length
        x = torch.randn(3, 7 if report.capture == "fx" else 5, D)
        assert (gm(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
    again = fxfuse.report_of(fxfuse.optimize(gm, (x,), passes=[FoldNormAffine()]))
    assert not again.applied  # idempotent: the norm has no affine left


def test_a_reader_that_is_no_linear_blocks_the_fold():
    model = PreNormAttention(nn.LayerNorm(D), residual_reads_norm=True).eval()
    gm, report = optimize_and_compare(model, (torch.randn(2, 5, D),), passes=[FoldNormAffine()])
    assert not applied(report, "fold_norm_affine")
    assert "is not a Linear" in skipped(report, "fold_norm_affine")[0].reason


class NarrowNormWideReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.heads = nn.ModuleList(nn.Linear(4, 32, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        return sum(head(h) for head in self.heads)


def test_a_fold_that_adds_more_biases_than_it_removes_is_skipped():
    with torch.no_grad():
        model = NarrowNormWideReaders().eval()
        model.norm.bias.normal_()
    gm, report = optimize_and_compare(model, (torch.randn(3, 4),), passes=[FoldNormAffine()])
    assert "adds biases" in skipped(report, "fold_norm_affine")[0].reason
    forced = fxfuse.report_of(fxfuse.optimize(model, (torch.randn(3, 4),), passes=[FoldNormAffine()], force=True))
    assert len(applied(forced, "fold_norm_affine")) == 1 and forced.params_after == forced.params_before - 8 + 96


def test_a_bare_scale_needs_the_shape_proven():
    model = PreNormAttention(HandRMSNorm(D)).eval()
    report = fxfuse.report_of(fxfuse.optimize(model, passes=[FoldNormAffine()]))  # data-free: symbolic_trace
    assert "not proven" in skipped(report, "fold_norm_affine")[0].reason


@pytest.mark.parametrize("source", ["module", "program", "program_module"])
def test_same_rewrite_from_an_exported_program(source):
    model, x = PreNormAttention(nn.LayerNorm(D)).eval(), torch.randn(2, 5, D)
    ep = torch.export.export(model, (x,))
    given = {"module": model, "program": ep, "program_module": ep.module()}[source]
    gm = fxfuse.optimize(given, (x,), passes=[FoldNormAffine()])
    report = fxfuse.report_of(gm)
    assert [r.where for r in applied(report, "fold_norm_affine")] == [["norm", "q", "k", "v"]]
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
