"""LayerCollapse training: prepare, regulariser (Eq. 9), AdamLC (Algorithm 2), Eq. 21, schedule, bounds."""
import pytest
import torch
import torch.nn.functional as F
from conftest import applied, count, max_rel_error
from torch import nn

import fxfuse
from fxfuse.passes.collapse_linear import collapse_error_bounds


def widening_mlp(act=nn.ReLU):
    return nn.Sequential(nn.Linear(12, 96), act(), nn.Dropout(0.1), nn.Linear(96, 10), act(),
                         nn.Linear(10, 80), act(), nn.Linear(80, 5)).eval()


def force_slopes(gm, value=1.0):
    with torch.no_grad():
        for a in fxfuse.slopes(gm):
            a.fill_(value)


# --- prepare ------------------------------------------------------------------------------------

def test_prepare_swaps_relu_for_slope_zero_prelu_exactly_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, x = widening_mlp(), torch.randn(16, 12)
    before = [p.clone() for p in model.parameters()]
    prepared = fxfuse.prepare_collapse(model, x)
    pairs = fxfuse.collapse_pairs(prepared)
    assert [p.where for p in pairs] == [("0", "1", "2", "3"), ("5", "6", "7")]
    assert [round(p.gain, 4) for p in pairs] == [round(1 - 12 * 10 / (96 * 22), 4), round(1 - 10 * 5 / (80 * 15), 4)]
    assert "gain" in fxfuse.skipped_of(prepared)[0][1]  # 96 → 10 → 80 would not pay
    assert count(prepared, nn.PReLU) == 2 and count(model, nn.PReLU) == 0
    assert all(a.item() == 0 for a in fxfuse.slopes(prepared))
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("per_channel", [False, True])
def test_prepare_then_optimize_with_slopes_forced_to_one_is_exact(per_channel):
    torch.manual_seed(1)
    model, x = widening_mlp(nn.GELU), torch.randn(16, 12)
    prepared = fxfuse.prepare_collapse(model, x, per_channel=per_channel)
    assert [a.numel() for a in fxfuse.slopes(prepared)] == ([96, 80] if per_channel else [1, 1])
    force_slopes(prepared)
    gm = fxfuse.optimize(prepared, x)
    report = fxfuse.report_of(gm)
    assert len(applied(report, "collapse")) == 2 and all(r.exact for r in report.applied)
    assert report.error <= 1e-6 and count(gm, nn.Linear) == 2
    with torch.no_grad():
        linear = model[3](model[0](x))  # the first pair with its activation removed
        assert max_rel_error(gm(x), model[7](model[5](model[4](linear)))) <= 1e-5


def test_conv_pair_is_prepared_per_channel_and_composes_exactly():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(64, 8, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    prepared = fxfuse.prepare_collapse(model, x, per_channel=True)
    (slope,) = fxfuse.slopes(prepared)
    assert slope.shape == (64,) and torch.allclose(slope, torch.full((64,), 0.1))
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x), atol=1e-6)
    force_slopes(prepared)
    gm = fxfuse.optimize(prepared, x)
    assert count(gm, nn.Conv2d) == 1 and fxfuse.report_of(gm).error <= 1e-4


def test_which_selects_the_last_fraction_or_named_pairs():
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))]).eval()
    all_pairs = fxfuse.collapse_pairs(fxfuse.prepare_collapse(model))
    assert len(all_pairs) == 5  # 8→64→8 in each block; 64→8 → 8→64 across blocks has no activation
    last = fxfuse.collapse_pairs(fxfuse.prepare_collapse(model, which=0.4))
    assert [p.where for p in last] == [p.where for p in all_pairs[-2:]] == [("9", "10", "11"), ("12", "13", "14")]
    named = fxfuse.collapse_pairs(fxfuse.prepare_collapse(model, which=["4"]))
    assert [p.where for p in named] == [("3", "4", "5")]


def test_bad_selections_and_models_name_cause_and_fix():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with pytest.raises(fxfuse.InputError, match="fraction"):
        fxfuse.prepare_collapse(model, which=1.5)
    with pytest.raises(fxfuse.InputError, match="no collapsible pair"):
        fxfuse.prepare_collapse(model, which=["fc9"])
    with pytest.raises(fxfuse.UnsupportedModelError, match="would pay"):
        fxfuse.prepare_collapse(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64)).eval())
    with pytest.raises(fxfuse.InputError, match="prepare_collapse"):
        fxfuse.slopes(torch.fx.symbolic_trace(model))
    with pytest.raises(fxfuse.InputError, match="prepare_collapse"):
        fxfuse.finetune_collapse(torch.fx.symbolic_trace(model), model, [], epochs=1)
    with pytest.raises(fxfuse.InputError, match="lc"):
        fxfuse.AdamLC([nn.Parameter(torch.zeros(1))], lc=-1.0)
    with pytest.raises(fxfuse.InputError, match="overshoot"):
        fxfuse.finetune_collapse(fxfuse.prepare_collapse(model), model, [], epochs=1, lr=0.01, lc=50)
    slope = nn.Parameter(torch.zeros(1))
    slope.grad = torch.zeros(1)
    with pytest.raises(fxfuse.InputError, match="overshoot"):
        fxfuse.AdamLC([{"params": [slope], "lc": 200.0}], lr=0.01).step()


def test_pair_with_a_batchnorm_optimize_cannot_fold_is_not_prepared():
    model = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64, track_running_stats=False), nn.ReLU(),
                          nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prepared = fxfuse.prepare_collapse(model, torch.randn(4, 8))
    assert len(fxfuse.collapse_pairs(prepared)) == 1
    assert "track_running_stats=False" in fxfuse.skipped_of(prepared)[0][1]
    x = torch.randn(4, 8)
    assert torch.allclose(prepared(x), model(x), atol=1e-6)  # ReLU as PReLU(0): the same function


def test_an_existing_channelwise_prelu_keeps_its_slopes():
    model = nn.Sequential(nn.Linear(8, 64), nn.PReLU(64), nn.Linear(64, 8)).eval()
    nn.init.uniform_(model[1].weight, 0.0, 0.5)
    prepared = fxfuse.prepare_collapse(model)
    (slope,) = fxfuse.slopes(prepared)
    assert torch.equal(slope.detach(), model[1].weight.detach())
    x = torch.randn(4, 8)
    assert torch.allclose(prepared(x), model(x), atol=1e-6)


def test_per_channel_on_token_linears_is_skipped_with_its_reason():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prepared = fxfuse.prepare_collapse(model, torch.randn(2, 5, 8), per_channel=True)
    assert count(prepared, nn.PReLU) == 0 and "rank-2" in fxfuse.skipped_of(prepared)[0][1]


# --- regulariser, AdamLC, loss -------------------------------------------------------------------

def test_regularizer_value_and_gradient_is_two_lc_alpha_minus_one():
    prepared = fxfuse.prepare_collapse(widening_mlp(), torch.randn(4, 12), per_channel=True)
    a, b = fxfuse.slopes(prepared)
    with torch.no_grad():
        a.copy_(torch.linspace(-0.5, 1.5, 96))
        b.copy_(torch.linspace(0, 2, 80))
    reg = fxfuse.collapse_regularizer(prepared, lc=0.3)
    assert reg.item() == pytest.approx(0.3 * (((1 - a) ** 2).sum() + ((1 - b) ** 2).sum()).item(), rel=1e-6)
    reg.backward()
    assert torch.allclose(a.grad, 2 * 0.3 * (a.detach() - 1)) and torch.allclose(b.grad, 2 * 0.3 * (b.detach() - 1))


def test_adamlc_pulls_a_slope_to_one_geometrically():
    """Algorithm 2 with g = 0: θ_t − 1 = (1 − 2·lc·lr)^t·(θ_0 − 1)."""
    slope = nn.Parameter(torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64))
    lr, lc, steps = 0.01, 5.0, 40
    opt = fxfuse.AdamLC([{"params": [slope], "lc": lc}], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0 * slope).sum().backward()
        opt.step()
    expected = 1 + (1 - 2 * lc * lr) ** steps * (torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64) - 1)
    assert torch.allclose(slope.detach(), expected, rtol=0, atol=1e-12)
    assert (slope.detach() - 1).abs().max().item() == pytest.approx(0.9 ** 40, rel=1e-9)


def test_adamlc_is_adam_then_the_decoupled_pull():
    torch.manual_seed(3)
    w, target = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    ours = [nn.Parameter(w.clone()), nn.Parameter(torch.full((4,), 0.2, dtype=torch.float64))]
    ref = [nn.Parameter(w.clone()), nn.Parameter(torch.full((4,), 0.2, dtype=torch.float64))]
    lr, lc = 0.05, 0.7
    adamlc = fxfuse.AdamLC([{"params": [ours[0]]}, {"params": [ours[1]], "lc": lc}], lr=lr)
    adam = torch.optim.Adam(ref, lr=lr)
    x = torch.randn(6, 3, dtype=torch.float64)
    for _ in range(10):
        for (weight, slope), opt in ((ours, adamlc), (ref, adam)):
            opt.zero_grad()
            F.mse_loss(F.prelu(x @ weight.T, slope), target).backward()
            opt.step()
        with torch.no_grad():  # Algorithm 2, line 15, applied after the reference Adam step
            ref[1].sub_(2 * (ref[1] - 1) * lc * lr)
        assert torch.allclose(ours[0], ref[0], atol=1e-12) and torch.allclose(ours[1], ref[1], atol=1e-12)


def test_self_distillation_loss_is_half_ce_plus_half_kl_plus_reg():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1])
    p, q = teacher.softmax(-1), logits.softmax(-1)
    ce = -q.log()[torch.arange(2), labels].mean()
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    loss = fxfuse.self_distillation_loss(logits, labels, teacher, reg=torch.tensor(0.25))
    assert loss.item() == pytest.approx((0.5 * ce + 0.5 * kl + 0.25).item(), rel=1e-6)
    same = fxfuse.self_distillation_loss(teacher, labels, teacher)
    assert same.item() == pytest.approx(0.5 * F.cross_entropy(teacher, labels).item(), rel=1e-6)


# --- schedule -----------------------------------------------------------------------------------

def test_schedule_collapses_from_the_last_pair_and_optimize_collapses_every_pair():
    torch.manual_seed(4)
    model = widening_mlp()
    x = torch.randn(256, 12)
    y = model(x).argmax(-1).detach()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    prepared = fxfuse.prepare_collapse(model, x)
    seen = []
    history = fxfuse.finetune_collapse(prepared, model, batches, epochs=12, lr=0.005, lc=50.0,
                                       callback=lambda e, gm: seen.append(e) or {"evaluated": e}, progress=False)
    last, first = (p.slope for p in reversed(fxfuse.collapse_pairs(prepared)))
    assert history[0]["active"] in (last, first) and history[-1]["done"] == [last, first]  # from the last
    assert seen == [h["epoch"] for h in history] == [h["evaluated"] for h in history]
    tau = fxfuse.max_slope_deviation(prepared)
    assert tau == history[-1]["max_deviation"] < 2e-2
    gm = fxfuse.optimize(prepared, x, tau=tau)
    rows = applied(fxfuse.report_of(gm), "collapse")
    assert len(rows) == 2 and count(gm, nn.Linear) == 2 and count(gm, nn.PReLU) == 0
    for r in rows:
        assert not r.exact and r.bound_eq4 > 0 and 0 < r.error <= r.bound_proven


# --- error bounds (Eq. 4–5) --------------------------------------------------------------------

def test_measured_error_stays_under_the_proven_bound():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 80), nn.PReLU(init=1 - 8e-5), nn.Linear(80, 10)).eval()
    gm = fxfuse.optimize(model, (torch.randn(64, 10),))
    (row,) = applied(fxfuse.report_of(gm), "collapse")
    assert 0 < row.error <= row.bound_proven and row.bound_eq4 > 0
    assert "Eq. 4–5" in fxfuse.report_of(gm).table()


def test_eq4_bound_fails_when_the_hidden_mask_is_not_one_scalar():
    """W2·W1 = 0, so Eq. 4–5 gives C = 0, yet one hidden unit is negative: the error is |1 − α|."""
    fc1, fc2 = nn.Linear(1, 2, bias=False), nn.Linear(2, 1)
    with torch.no_grad():
        fc1.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        fc2.weight.copy_(torch.tensor([[1.0, 1.0]]))
        fc2.bias.fill_(1.0)  # the output is ≈ 1, so relative and absolute errors agree
    alpha = 1 - 5e-5
    model = nn.Sequential(fc1, nn.PReLU(init=alpha), fc2).eval()
    gm = fxfuse.optimize(model, (torch.tensor([[1.0], [2.0]]),))
    (row,) = applied(fxfuse.report_of(gm), "collapse")
    assert row.bound_eq4 == 0 < row.error <= row.bound_proven
    assert row.error == pytest.approx(2 * (1 - alpha), rel=1e-2)  # x = 2: |ΔY| = |1 − α|·2, Y ≈ 1
    paper, proven = collapse_error_bounds(fc1.weight, None, fc2.weight, x_norm=2.0, deviation=1 - alpha)
    assert paper == 0 and proven == pytest.approx(4 * (1 - alpha), rel=1e-4)  # σ(W2)·σ(W1)·|x| = √2·√2·2


class FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2))


def test_functional_activation_becomes_a_prelu_with_its_slope():
    model, x = FunctionalBlock().eval(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="returns a GraphModule, not a FunctionalBlock: the activation leaky_relu "
                                         "belongs to no one submodule call"):
        prepared = fxfuse.prepare_collapse(model, x)
    assert isinstance(prepared, torch.fx.GraphModule)
    (pair,) = fxfuse.collapse_pairs(prepared)
    assert pair.where == ("fc1", "leaky_relu", "fc2") and fxfuse.slopes(prepared)[0].item() == pytest.approx(0.2)
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x), atol=1e-6)


def test_timm_mixer_pairs_are_found_from_the_last_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    model = timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=16, patch_size=4, num_blocks=3, embed_dim=32).eval()
    nn.init.normal_(model.head.weight)  # timm zero-initialises the head
    x = torch.randn(2, 3, 16, 16)
    prepared = fxfuse.prepare_collapse(model, x, which=1 / 3)
    assert [p.where[0] for p in fxfuse.collapse_pairs(prepared)] == ["blocks.2.mlp_tokens.fc1", "blocks.2.mlp_channels.fc1"]
    force_slopes(prepared)
    with torch.no_grad():
        expected = prepared(x)
    gm = fxfuse.optimize(prepared, x)
    assert len(applied(fxfuse.report_of(gm), "collapse")) == 2
    with torch.no_grad():
        assert max_rel_error(gm(x), expected) <= 1e-5


class MethodRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


def test_relu_called_as_a_method_is_prepared():
    model = MethodRelu().eval()
    prepared = fxfuse.prepare_collapse(model, keep_class=False)
    assert len(fxfuse.collapse_pairs(prepared)) == 1
    x = torch.randn(4, 8)
    assert torch.allclose(prepared(x), model(x), atol=1e-6)  # ReLU as PReLU(0)
    assert isinstance(fxfuse.collapse_regularizer(prepared, 1.0, []), torch.Tensor)
