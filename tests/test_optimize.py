import copy
import json

import pytest
import torch
from conftest import assert_same_function, count, optimize_and_compare, randomize_batchnorm
from torch import nn

import fxfuse
from fxfuse.models import demo_inputs, demo_model


def test_users_model_is_unchanged():
    model = demo_model()
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    gm = fxfuse.optimize(model, demo_inputs())
    assert fxfuse.report_of(gm).applied
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert modes == [m.training for m in model.modules()] and grads == [p.requires_grad for p in model.parameters()]
    assert not any(p is q for p in gm.parameters() for q in model.parameters())


def test_report_rows_and_json():
    gm = fxfuse.optimize(demo_model(), demo_inputs())
    report = fxfuse.report_of(gm)
    data = json.loads(report.to_json())
    assert {r["pass_name"] for r in data["rows"]} == {"fold_batchnorm", "collapse", "compose"}
    assert data["params_after"] < data["params_before"] and data["macs_after"] < data["macs_before"]
    for row in report.applied:
        assert row.error <= row.tolerance and row.params_after <= row.params_before and row.where
    for row in report.skipped:
        assert row.reason
    assert report.error <= 1e-4
    assert "skipped" in report.table() and "Eq. 7" in report.table()


class Twice(nn.Module):
    """One module called at two sites: each site is rewritten on its own, the shared module kept."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(x)))
        return self.fc1(self.norm(x))


def test_module_called_twice_is_kept_where_still_used():
    gm, report = optimize_and_compare(Twice().eval(), (torch.randn(3, 8),))
    assert len(report.applied) == 1 and count(gm, nn.Linear) == 2


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 64), nn.PReLU(init=1.0), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def test_residual_block_collapses_and_keeps_the_skip():
    gm, report = optimize_and_compare(Residual().eval(), (torch.randn(3, 5, 16),))
    assert count(gm, nn.Linear) == 1


# --- bad inputs: every error names the cause and the fix -------------------------------------

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_not_a_module():
    with pytest.raises(fxfuse.InputError, match="torch.nn.Module"):
        fxfuse.optimize(lambda x: x)


def test_untraceable_forward_names_the_construct_and_the_fix():
    with pytest.raises(fxfuse.TraceError, match="(?s)Branchy.*control flow.*leaf_modules"):
        fxfuse.optimize(Branchy().eval())


def test_untraceable_submodule_can_be_made_a_leaf():
    model = nn.Sequential(nn.Linear(4, 32), nn.PReLU(init=1.0), nn.Linear(32, 4), Branchy()).eval()
    gm, _ = optimize_and_compare(model, (torch.randn(2, 4),), leaf_modules=[Branchy])
    assert count(gm, nn.Linear) == 2  # the collapsed one and the leaf's own


def test_wrong_input_shape():
    with pytest.raises(fxfuse.InputError, match=r"(?s)\(2, 5\).*shape and dtype"):
        fxfuse.optimize(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 5),))


def test_inputs_that_are_not_tensors():
    with pytest.raises(fxfuse.InputError, match="must be a tensor, a tuple of positional arguments"):
        fxfuse.optimize(nn.Linear(4, 4).eval(), [[1.0, 2.0]])


def test_training_mode():
    with pytest.raises(fxfuse.UnsupportedModelError, match=r"training mode.*model.eval\(\)"):
        fxfuse.optimize(nn.Linear(4, 4))


def test_integer_weights():
    model = nn.Linear(4, 4).eval()
    model.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(fxfuse.UnsupportedModelError, match="int32"):
        fxfuse.optimize(model)


def test_non_finite_weights():
    model = nn.Linear(4, 4).eval()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(fxfuse.UnsupportedModelError, match="NaN"):
        fxfuse.optimize(model)


def test_a_rewrite_beyond_tolerance_is_rejected_not_applied():
    model = nn.Sequential(nn.Linear(10, 80), nn.PReLU(init=1 - 5e-5), nn.Linear(80, 10)).eval()
    x = (torch.randn(64, 10),)
    gm = fxfuse.optimize(model, x, approx_tolerance=1e-9)
    report = fxfuse.report_of(gm)
    assert not report.applied and report.rows[0].status == "rejected" and "tolerance" in report.rows[0].reason
    assert count(gm, nn.Linear) == 2


def test_float64_model_is_rewritten_in_float64():
    model = randomize_batchnorm(demo_model()).double()
    gm, report = optimize_and_compare(model, tuple(x.double() for x in demo_inputs()), rtol=1e-12,
                                      tolerance=1e-12, conv_tolerance=1e-12)
    assert all(p.dtype == torch.float64 for p in gm.parameters()) and report.applied


def test_empty_model():
    with pytest.raises(fxfuse.InputError, match="no parameters"):
        fxfuse.optimize(nn.Sequential().eval())


def test_lazy_model_that_has_not_run():
    with pytest.raises(fxfuse.UnsupportedModelError, match="lazy module"):
        fxfuse.optimize(nn.Sequential(nn.LazyLinear(4)).eval())


def test_quantized_model():
    model = nn.Sequential(torch.ao.nn.quantized.Linear(4, 4)).eval()
    with pytest.raises(fxfuse.UnsupportedModelError, match="quantized module"):
        fxfuse.optimize(model)


def test_inputs_of_the_wrong_dtype():
    with pytest.raises(fxfuse.InputError, match="torch.int64"):
        fxfuse.optimize(nn.Linear(4, 4).eval(), (torch.ones(2, 4, dtype=torch.long),))


def test_a_crashing_pass_is_named_with_the_passes_before_it():
    from fxfuse.passes import FoldBatchNorm

    class Broken:
        name = "broken"

        def candidates(self, gm, options):
            raise RuntimeError("boom")

    with pytest.raises(fxfuse.PassError, match="'broken' failed \\(passes run before it: fold_batchnorm\\).*boom"):
        fxfuse.optimize(nn.Linear(4, 4).eval(), passes=[FoldBatchNorm(), Broken()])


def test_macs_count_layers_matmuls_and_attention():
    from torch.nn import functional as F

    from fxfuse.verify import propagate_shapes
    from fxfuse.report import count_macs

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):  # x: (2, 5, 8)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v) + (q @ k.transpose(-1, -2)) @ v

    gm = torch.fx.symbolic_trace(Attention().eval())
    propagate_shapes(gm, (torch.randn(2, 5, 8),))
    linear, sdpa, matmuls = 2 * 5 * 24 * 8, 2 * 5 * 5 * (8 + 8), 2 * 5 * 5 * 8 + 2 * 5 * 8 * 5
    assert count_macs(gm) == linear + sdpa + matmuls


def test_errors_that_add_up_past_the_tolerance_fail_the_end_to_end_check():
    """Each rewrite is within its tolerance locally; together they are not: VerificationError."""
    from fxfuse.match import Chain
    from fxfuse.ir import LINEAR, view
    from fxfuse.pass_manager import Candidate

    class Perturb:  # scales every Linear by (1 + 9e-4): locally 9e-4 ≤ 1e-3, twice in series 1.8e-3
        name = "perturb"

        def candidates(self, gm, options):
            found = []
            for node in gm.graph.nodes:
                layer = view(gm, node)
                reads = [node.target] + [a.target for a in node.all_input_nodes if a.op == "get_attr"]
                if layer is not None and layer.kind == LINEAR and "perturb" not in str(reads):
                    new = nn.Linear(*reversed(layer.weight.shape)).eval()
                    with torch.no_grad():
                        new.weight.copy_(layer.weight * (1 + 9e-4))
                        new.bias.copy_(layer.bias * (1 + 9e-4))
                    found.append(Candidate(Chain([layer]), new, tolerance=1e-3))
            return found

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    with pytest.raises(fxfuse.VerificationError, match="further from the float64 original"):
        fxfuse.optimize(model, (torch.randn(4, 8),), passes=[Perturb()])


def test_a_pass_that_never_settles_is_stopped_with_its_name():
    from fxfuse.match import Chain
    from fxfuse.ir import LINEAR, view
    from fxfuse.pass_manager import Candidate

    def copy_of(op):
        new = nn.Linear(op.weight.shape[1], op.weight.shape[0])
        new.load_state_dict({"weight": op.weight, "bias": op.bias})
        return new.eval()

    class Forever:  # replaces every Linear by a copy of itself, round after round
        name = "forever"

        def candidates(self, gm, options):
            ops = [view(gm, n) for n in gm.graph.nodes]
            return [Candidate(Chain([op]), copy_of(op)) for op in ops if op is not None and op.kind == LINEAR]

    with pytest.raises(fxfuse.PassError, match="'forever'.*fixed point"):
        fxfuse.optimize(nn.Sequential(nn.Linear(4, 4)).eval(), passes=[Forever()])


class RandomInEval(nn.Module):
    """Linear → PReLU(1) → Linear (collapsible), then a dropout that stays on in eval mode."""

    def __init__(self, collapsible: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.PReLU(init=1.0 if collapsible else 0.25), nn.Linear(32, 8))

    def forward(self, x):
        return nn.functional.dropout(self.body(x), 0.5, training=True)


@pytest.mark.parametrize("collapsible", [True, False])
def test_random_output_in_eval_mode_is_named(collapsible):
    with pytest.raises(fxfuse.UnsupportedModelError, match=r"(?s)changes from one call to the next.*F.dropout"):
        fxfuse.optimize(RandomInEval(collapsible).eval(), (torch.randn(4, 8),))


class SharedWeight(nn.Module):
    """fc's weight read by F.linear in a collapsible chain, and fc itself called elsewhere."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8)

    def forward(self, x):
        y = self.out(self.act(nn.functional.linear(x, self.fc.weight, self.fc.bias)))
        return y + self.out(torch.relu(self.fc(x)))


def test_a_weight_still_read_elsewhere_is_kept():
    gm, report = optimize_and_compare(SharedWeight().eval(), (torch.randn(3, 8),))
    assert [r.pass_name for r in report.applied] == ["collapse"]
    model = SharedWeight().eval()
    data_free = fxfuse.optimize(model)  # no inputs, no check: the module must still run and compute the same
    assert_same_function(data_free, model, (torch.randn(2, 8),))


class ScaledLinear(nn.Linear):
    """Not a Linear: its forward doubles the output."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_a_subclass_that_overrides_forward_is_not_its_base_layer():
    model = nn.Sequential(ScaledLinear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 8)).eval()
    for kwargs in ({}, {"leaf_modules": [ScaledLinear]}):  # traced through, or kept as a module call
        gm, report = optimize_and_compare(model, (torch.randn(3, 8),), **kwargs)
        assert not report.applied
        data_free = fxfuse.optimize(model, **kwargs)
        assert not fxfuse.report_of(data_free).applied
