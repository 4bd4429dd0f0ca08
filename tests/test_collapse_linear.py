import pytest
import torch
import torch.nn.functional as F
from conftest import applied, count, optimize_and_compare, randomize_batchnorm, skipped
from torch import nn

import fxfuse
from fxfuse.exported import check_static_shape
from fxfuse.passes import CollapseLinear
from fxfuse.passes.collapse_linear import collapse_gain


def mlp(n_in, n_hidden, n_out, *middle):
    return nn.Sequential(nn.Linear(n_in, n_hidden), *middle, nn.Linear(n_hidden, n_out)).eval()


def random_widening_dims(g: torch.Generator):
    n_in, n_out = (int(torch.randint(2, 40, (1,), generator=g)) for _ in range(2))
    return n_in, int(torch.randint(max(n_in, n_out) + 1, 160, (1,), generator=g)), n_out


@pytest.mark.parametrize("case", range(12))
def test_widening_mlp_with_unit_prelu_collapses_exactly(case):
    g = torch.Generator().manual_seed(case)
    n_in, n_hidden, n_out = random_widening_dims(g)
    middle = [nn.PReLU(n_hidden if case % 2 else 1, init=1.0), nn.Dropout(0.3), nn.Identity()][: 1 + case % 3]
    model = mlp(n_in, n_hidden, n_out, *middle)
    batch = (int(torch.randint(1, 9, (1,), generator=g)),) + ((3,) if case % 4 == 0 else ())
    gm, report = optimize_and_compare(model, (torch.randn(*batch, n_in, generator=g),))
    assert len(applied(report, "collapse")) == 1
    assert count(gm, nn.Linear) == 1 and count(gm, nn.PReLU) == 0
    assert report.params_after == n_in * n_out + n_out < report.params_before


def test_batchnorm_and_dropout_between_collapse_exactly(seed):
    model = randomize_batchnorm(mlp(12, 96, 7, nn.BatchNorm1d(96), nn.PReLU(96, init=1.0), nn.Dropout(0.5)))
    gm, report = optimize_and_compare(model, (torch.randn(6, 12),), passes=[CollapseLinear()])
    assert len(applied(report, "collapse")) == 1 and count(gm, nn.BatchNorm1d) == 0


def test_batchnorm_after_the_activation_collapses_too():
    model = randomize_batchnorm(mlp(12, 96, 7, nn.PReLU(init=1.0), nn.BatchNorm1d(96)))
    gm, report = optimize_and_compare(model, (torch.randn(6, 12),))
    assert count(gm, nn.Linear) == 1 and count(gm, nn.BatchNorm1d) == 0


def test_bottleneck_is_left_alone():
    model = mlp(64, 8, 64, nn.PReLU(init=1.0))
    assert collapse_gain(64, 8, 64) < 0
    gm, report = optimize_and_compare(model, (torch.randn(4, 64),))
    assert count(gm, nn.Linear) == 2 and not applied(report, "collapse")
    assert "Eq. 7" in skipped(report, "collapse")[0].reason


def test_force_collapses_a_bottleneck():
    gm, report = optimize_and_compare(mlp(64, 8, 64, nn.PReLU(init=1.0)), (torch.randn(4, 64),), force=True)
    assert count(gm, nn.Linear) == 1


@pytest.mark.parametrize("slope", [0.0, 0.25, 0.99, 1.01])
def test_slope_not_one_is_left_alone(slope):
    model = mlp(10, 80, 10, nn.PReLU(init=slope))
    gm, report = optimize_and_compare(model, (torch.randn(4, 10),))
    assert count(gm, nn.Linear) == 2
    assert "τ" in skipped(report, "collapse")[0].reason


def test_channelwise_prelu_with_one_slope_off_is_left_alone():
    prelu = nn.PReLU(80, init=1.0)
    with torch.no_grad():
        prelu.weight[17] = 0.5
    gm, report = optimize_and_compare(mlp(10, 80, 10, prelu), (torch.randn(4, 10),))
    assert count(gm, nn.Linear) == 2 and skipped(report, "collapse")


def test_slope_within_tau_is_an_approximate_collapse_with_measured_error():
    model = mlp(10, 80, 10, nn.PReLU(init=1 - 5e-5))
    x = (torch.randn(64, 10),)
    gm = fxfuse.optimize(model, x)
    row = applied(fxfuse.report_of(gm), "collapse")[0]
    assert row.exact is False and 0 < row.error <= 1e-3
    assert count(gm, nn.Linear) == 1
    data_free = fxfuse.optimize(model)
    assert count(data_free, nn.Linear) == 2
    assert "example inputs" in skipped(fxfuse.report_of(data_free), "collapse")[0].reason


def test_chain_of_linears_collapses_to_one():
    model = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 128), nn.PReLU(init=1.0), nn.Linear(128, 96),
                          nn.Identity(), nn.Linear(96, 4)).eval()
    gm, report = optimize_and_compare(model, (torch.randn(5, 8),))
    assert count(gm, nn.Linear) == 1 and len(applied(report, "collapse")) == 3


class SharedHidden(nn.Module):
    """The hidden activation is also read by a second branch: collapsing would lose it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.side = nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8), nn.Linear(64, 8)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h) + self.side(h)


def test_hidden_value_with_other_users_is_left_alone():
    gm, report = optimize_and_compare(SharedHidden().eval(), (torch.randn(3, 8),))
    assert count(gm, nn.Linear) == 3
    assert "users" in skipped(report, "collapse")[0].reason


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(128, 16)), nn.Parameter(torch.randn(128))
        self.w2 = nn.Parameter(torch.randn(16, 128))

    def forward(self, x):
        return F.linear(F.dropout(F.linear(x, self.w1, self.b1), 0.2, training=self.training), self.w2)


def test_functional_linear_collapses(each_capture):
    gm, report = optimize_and_compare(Functional().eval(), (torch.randn(4, 16),))
    assert report.params_after == 16 * 16 + 16
    if each_capture == "fx":
        assert {n.op for n in gm.graph.nodes} == {"placeholder", "call_module", "output"}
    else:  # one aten.linear on two get_attr parameters (and export's shape guard)
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not check_static_shape]
        assert ops == [torch.ops.aten.linear.default]


def test_data_free_exact_collapse_and_idempotence():
    model = mlp(16, 128, 16, nn.PReLU(init=1.0))
    gm = fxfuse.optimize(model)
    x = torch.randn(3, 16)
    assert count(gm, nn.Linear) == 1
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5 * model(x).abs().max().item())
    again = fxfuse.optimize(gm, (x,))
    assert not fxfuse.report_of(again).applied


def test_a_run_of_linears_is_multiplied_cheapest_pair_first():
    """VGG's classifier shape: W3·W2 (4·32·32 multiply-adds) before W2·W1 (32·32·64); then the rest."""
    model = nn.Sequential(nn.Linear(64, 32), nn.PReLU(init=1.0), nn.Linear(32, 32), nn.PReLU(init=1.0),
                          nn.Linear(32, 4)).eval()
    gm, report = optimize_and_compare(model, (torch.randn(3, 64),))
    rows = applied(report, "collapse")
    assert rows[0].where == ["2", "3", "4"] and len(rows) == 2 and count(gm, nn.Linear) == 1
