"""Issue 13, item 4: the report's rows and its model totals come from one count, so they add up.

For every pass, torchvision's ResNet-18 and transformers' GPT-2 (its Conv1D layers): the applied
rows' MAC changes sum exactly to ``report.macs_before − report.macs_after``, and their parameter
changes to ``report.params_before − report.params_after``. MACs count the products of Linear/Conv
weights, matmuls and attention (``fxfuse.report.node_macs``); BatchNorm, PReLU, dropout and
element-wise ops count 0, so a BatchNorm fold saves no MACs (LayerCollapse Table 1, torchvision).
Oracles besides the code under test: hand counts (batch × out × in for a Linear), forward hooks on
the eager model, GPT-2's config.
"""
import pytest
import torch
from conftest import randomize_batchnorm
from torch import nn

import fxfuse
from fxfuse.passes import (ALL_PASSES, CollapseLinear, ComposeConv, DropIdentity, FoldBatchNorm, FoldNormAffine,
                           FuseParallel, SplitParallel, UntransposeLinear)


def assert_rows_add_up(report) -> None:
    rows = report.applied
    assert rows, "no rewrite applied: the model does not exercise the pass"
    assert sum(r.macs_before - r.macs_after for r in rows) == report.macs_before - report.macs_after, report.table()
    assert sum(r.params_before - r.params_after for r in rows) == report.params_before - report.params_after, \
        report.table()


def optimized_report(model, inputs, **kwargs):
    return fxfuse.report_of(fxfuse.optimize(model, inputs, **kwargs))


class TokenMixing(nn.Module):
    """MLP-Mixer's token mixing: transpose → Linear → transpose (untranspose_linear)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x):
        return x + self.fc(x.transpose(1, 2)).transpose(1, 2)


class PreNormAttention(nn.Module):
    """LayerNorm → q, k (no bias), v → attention (fold_norm_affine: the affine goes into q, k, v)."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.3)
            self.norm.bias.normal_(0, 0.3)

    def forward(self, x):
        h = self.norm(x)
        return torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)


class Fused(nn.Module):
    """One Linear whose output is split into q, k, v (split_parallel)."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).split([16, 16, 16], -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def _bn(model):
    return randomize_batchnorm(model).eval()


# pass name -> (the pass, a small model it applies to, example inputs)
CASES = {
    "fold_batchnorm": (FoldBatchNorm(), lambda: _bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                                                  nn.Flatten(), nn.Linear(512, 6), nn.Dropout(),
                                                                  nn.BatchNorm1d(6))),
                       (torch.randn(4, 3, 10, 10),)),
    "collapse": (CollapseLinear(), lambda: _bn(nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.PReLU(init=1.0),
                                                             nn.Dropout(), nn.Linear(64, 4))),
                 (torch.randn(3, 8),)),
    "compose": (ComposeConv(), lambda: _bn(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32),
                                                         nn.Conv2d(32, 4, 1))),
                (torch.randn(2, 3, 9, 9),)),
    "drop_identity": (DropIdentity(), lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Identity(), nn.ReLU(),
                                                            nn.Linear(4, 4)).eval(),
                      (torch.randn(2, 4),)),
    "untranspose_linear": (UntransposeLinear(), lambda: TokenMixing().eval(), (torch.randn(3, 12, 7),)),
    "fold_norm_affine": (FoldNormAffine(), lambda: PreNormAttention().eval(), (torch.randn(2, 5, 16),)),
    "fuse_parallel": (FuseParallel(), lambda: PreNormAttention().eval(), (torch.randn(2, 5, 16),)),
    "split_parallel": (SplitParallel(), lambda: Fused().eval(), (torch.randn(2, 5, 16),)),
}


def test_every_pass_has_a_case():
    assert set(CASES) == {p.name for p in ALL_PASSES}


@pytest.mark.parametrize("name", CASES)
def test_rows_add_up_to_the_model_for_each_pass(name):
    torch.manual_seed(0)
    pass_, build, inputs = CASES[name]
    report = optimized_report(build(), inputs, passes=[pass_])
    assert {r.pass_name for r in report.applied} == {name}
    assert_rows_add_up(report)


def test_linear_prelu_linear_against_a_hand_count():
    """Linear(8→64) → PReLU(α=1) → Linear(64→4) on a batch of 3 collapses into Linear(8→4)."""
    torch.manual_seed(0)
    batch, n_in, hidden, n_out = 3, 8, 64, 4
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.PReLU(init=1.0), nn.Linear(hidden, n_out)).eval()
    report = optimized_report(model, (torch.randn(batch, n_in),), passes=[CollapseLinear()])
    before = batch * hidden * n_in + batch * n_out * hidden  # the PReLU multiplies, but counts no MACs
    after = batch * n_out * n_in
    assert (report.macs_before, report.macs_after) == (before, after)
    [row] = report.applied
    assert (row.macs_before, row.macs_after) == (before, after)
    params = (n_in * hidden + hidden) + 1 + (hidden * n_out + n_out)
    assert (report.params_before, report.params_after) == (params, n_in * n_out + n_out)
    assert (row.params_before, row.params_after) == (params, n_in * n_out + n_out)


def test_conv_batchnorm_against_a_hand_count():
    """Conv2d(3→8, 3×3) → BatchNorm2d on 2×3×10×10: 2·8·8·8 outputs × 3·3·3 products; the fold saves none."""
    torch.manual_seed(0)
    model = _bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    report = optimized_report(model, (torch.randn(2, 3, 10, 10),), passes=[FoldBatchNorm()])
    macs = (2 * 8 * 8 * 8) * (3 * 3 * 3)
    assert report.macs_before == report.macs_after == macs
    [row] = report.applied
    assert row.macs_before == row.macs_after == macs
    assert (row.params_before, row.params_after) == (8 * 27 + 8 + 2 * 8, 8 * 27 + 8)  # BN's γ, β go
    assert report.params_before - report.params_after == 2 * 8


class CalledTwice(nn.Module):
    """One Linear called twice, each call followed by its own BatchNorm: both fold in one round, and
    the second fold frees the Linear's weight the first still shared."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn1, self.bn2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn1(self.fc(x)) + self.bn2(self.fc(2 * x))


class TiedFirstLayers(nn.Module):
    """Two collapsible Linear → PReLU(1) → Linear chains whose first Linears share one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 64), nn.Linear(4, 64)
        self.b.weight = self.a.weight
        self.p1, self.p2 = nn.PReLU(init=1.0), nn.PReLU(init=1.0)
        self.o1, self.o2 = nn.Linear(64, 4), nn.Linear(64, 4)

    def forward(self, x):
        return self.o1(self.p1(self.a(x))) + self.o2(self.p2(self.b(x)))


@pytest.mark.parametrize("build,n_in,pass_,saved", [
    # fc's 72 and two BNs' 16 each go, two folded Linears of 72 come
    (lambda: _bn(CalledTwice()), 8, FoldBatchNorm(), (8 * 8 + 8) + 2 * 16 - 2 * (8 * 8 + 8)),
    # the shared 4×64 weight once, two biases, slopes and second layers; two Linears 4→4 come
    (lambda: TiedFirstLayers().eval(), 4, CollapseLinear(), 4 * 64 + 2 * (64 + 1 + 64 * 4 + 4) - 2 * (4 * 4 + 4)),
], ids=["module_called_twice", "tied_weight"])
def test_a_weight_shared_by_two_rewrites_of_one_round_is_freed_once(build, n_in, pass_, saved):
    torch.manual_seed(0)
    report = optimized_report(build(), (torch.randn(4, n_in),), passes=[pass_])
    assert len(report.applied) == 2
    assert report.params_before - report.params_after == saved
    assert_rows_add_up(report)


def hooked_macs(model: nn.Module, inputs: tuple) -> int:
    """Linear and Conv2d MACs of an eager forward, from hooks: output elements × in/groups · kernel."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, out: total.append(out.numel() * m.weight[0].numel()))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return sum(total)


def test_resnet18_batchnorm_folds_add_up():
    """The issue's case on a smaller ResNet: every BatchNorm folds, no MAC changes anywhere."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18()).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    report = optimized_report(model, inputs)
    folds = [r for r in report.applied if r.pass_name == "fold_batchnorm"]
    assert len(folds) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert report.macs_before == report.macs_after == hooked_macs(model, inputs)
    assert all(r.macs_before == r.macs_after for r in report.applied)
    assert_rows_add_up(report)


def gpt2_macs(config, batch: int, seq: int) -> int:
    """From the config: per layer q/k/v, projection and the MLP's two Conv1D, attention's QKᵀ and AV; the LM head."""
    tokens, d, head = batch * seq, config.n_embd, config.n_embd // config.n_head
    per_layer = tokens * d * (3 * d + d + 4 * d + 4 * d) + tokens * config.n_head * seq * 2 * head
    return config.n_layer * per_layer + tokens * d * config.vocab_size


def test_gpt2_rows_add_up(each_capture):
    """GPT2LMHeadModel under torch.export; symbolic_trace cannot trace it (transformers 5), so under fx
    its MLP sublayer (Conv1D → GELU → Conv1D → Dropout), traced through and with Conv1D a leaf module."""
    pytest.importorskip("transformers")
    from hf_models import gpt2
    from transformers.pytorch_utils import Conv1D

    model, kwargs, _ = gpt2()
    c = model.config
    if each_capture == "export":
        report = optimized_report(model, kwargs)
        assert report.macs_before == report.macs_after == gpt2_macs(c, *kwargs["input_ids"].shape)
        assert_rows_add_up(report)
        return
    mlp, (batch, seq) = model.transformer.h[0].mlp, kwargs["input_ids"].shape
    assert isinstance(mlp.c_fc, Conv1D)
    x = (torch.randn(batch, seq, c.n_embd),)
    for extra in ({}, {"leaf_modules": [Conv1D]}):
        report = optimized_report(mlp, x, **extra)
        assert report.macs_before == report.macs_after == batch * seq * (c.n_embd * 4 * c.n_embd) * 2
        assert_rows_add_up(report)


def test_a_replacement_module_counts_by_the_rule_the_totals_use():
    """``module_macs`` (a row's MACs after) against hand counts: a weight's products only, HF Conv1D's
    (in, out) weight read the right way round, and a module with a weight that multiplies element-wise
    (LayerNorm, PReLU, BatchNorm) counting 0, as it does in ``count_macs``."""
    from fxfuse.modules import LeftLinear
    from fxfuse.report import module_macs
    transformers = pytest.importorskip("transformers")

    out = (2, 3, 5)  # 30 output elements
    assert module_macs(nn.Linear(4, 5), out) == 30 * 4
    assert module_macs(nn.Conv2d(6, 4, 3, groups=2), (2, 4, 5, 5)) == 2 * 4 * 5 * 5 * (3 * 3 * 3)  # in/groups = 3
    assert module_macs(LeftLinear(torch.randn(3, 7), None), out) == 30 * 7
    assert module_macs(transformers.pytorch_utils.Conv1D(5, 4), out) == 30 * 4  # nf=5 out, nx=4 in
    for module in (nn.LayerNorm(5), nn.PReLU(), nn.BatchNorm1d(3), nn.Identity()):
        assert module_macs(module, out) == 0
