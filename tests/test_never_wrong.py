"""What real code does, class by class: the result computes the original's function on every input
the original accepts (other batch sizes and ranks too), or optimize refuses with a named error, or
the result refuses the inputs it is not proven for (a rank guard; an exported graph's static sizes).
Every test runs on both captures (conftest)."""
import copy
import math

import pytest
import torch
import torch.ao.nn.qat as qat
import torch.nn.functional as F
from torch import nn

import fxfuse
from conftest import randomize_batchnorm
from fuzzing import BatchNormReLU, ScaledLinear, ShiftingIdentity  # layer subclasses with their own forward
from fxfuse.optimize import float64_errors
from fxfuse.verify import rel_error

SPECIALISED = "holds for rank-"  # the rank guard's message
CAPTURED_FOR = "captured by torch.export for rank-"  # the exported graph's own shape guard


def same_function_or_refused(model, example, fresh: list, **kwargs) -> list:
    """optimize ``model`` with and without ``example``; each result computes ``model``'s outputs
    on every ``fresh`` input the original accepts, or refuses it with fxfuse's rank guard. Returns
    the reports (None where optimize refused with an fxfuse error)."""
    reports = []
    for inputs in (example, None):
        try:
            gm = fxfuse.optimize(model, inputs, **kwargs)
        except fxfuse.FxfuseError:
            reports.append(None)
            continue
        for x in fresh:
            x = x if isinstance(x, tuple) else (x,)
            with torch.no_grad():
                try:
                    expected = model(*x)
                except Exception:
                    continue  # the original does not take it either
                try:
                    got = gm(*x)
                except (AssertionError, fxfuse.InputError) as e:  # a named refusal of what it is not proven for
                    assert SPECIALISED in str(e) or CAPTURED_FOR in str(e), e
                    continue
            assert rel_error(got, expected) <= 1e-5, f"{'with' if inputs else 'without'} example inputs"
        reports.append(fxfuse.report_of(gm))
    return reports


def saved(report) -> int:
    return sum(r.params_before - r.params_after for r in report.applied)


# 1. A rewrite deletes a tensor something else still uses.

class WeightReadTwice(nn.Module):
    """fc's weight read by F.linear in a collapsible chain, and fc called again later."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.fc2(F.linear(x, self.fc.weight, self.fc.bias)))


class TiedLMHead(nn.Module):
    """An Embedding whose weight is also the LM head: ``F.linear(h, wte.weight)``, or a head module."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.wte, self.proj = nn.Embedding(20, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens):
        h = self.proj(self.wte(tokens))
        return F.linear(h, self.wte.weight) if self.functional else self.head(h)


def test_a_weight_read_elsewhere_is_kept():
    model = WeightReadTwice().eval()
    for report in same_function_or_refused(model, (torch.randn(2, 8),), [torch.randn(5, 8)]):
        assert report.applied and report.params_before - report.params_after == saved(report)


@pytest.mark.parametrize("functional", [True, False])
def test_an_embedding_tied_to_the_lm_head_keeps_its_weight(functional):
    model = TiedLMHead(functional).eval()
    for report in same_function_or_refused(model, (torch.randint(0, 20, (2, 5)),), [torch.randint(0, 20, (3, 7))]):
        assert len(report.applied) == 1  # proj → head collapsed into one Linear
        assert report.params_before - report.params_after == saved(report)  # the embedding's 160 are not "saved"


# 2. Matching by isinstance accepts what is not the layer.

class PaddingConv(nn.Conv2d):  # as timm's Conv2dSame: pads in forward, and its __init__ differs
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3)

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def qat_linear() -> nn.Module:
    return qat.Linear(8, 8, qconfig=torch.ao.quantization.get_default_qat_qconfig("x86"))


@pytest.mark.parametrize("make, shape", [
    (lambda: [ScaledLinear(8, 8), nn.Linear(8, 8)], (8,)),
    (lambda: [nn.Linear(8, 8), ShiftingIdentity(), nn.Linear(8, 8)], (8,)),
    (lambda: [nn.Linear(8, 8), randomize_batchnorm(BatchNormReLU(8))], (8,)),
    (lambda: [PaddingConv(3, 4), nn.Conv2d(4, 4, 1)], (3, 8, 8)),
    (lambda: [qat_linear(), nn.Linear(8, 8)], (8,)),
], ids=["scaled-linear", "shifting-identity", "batchnorm-act", "padding-conv", "qat-linear"])
@pytest.mark.parametrize("as_leaf", [False, True])
def test_a_layer_subclass_with_its_own_forward_is_not_the_layer(make, shape, as_leaf):
    layers = make()
    model = nn.Sequential(*layers).eval()
    leaves = [type(m) for m in layers if type(m) not in (nn.Linear, nn.Conv2d)]  # timm's no-trace leaves, say
    same_function_or_refused(model, (torch.randn(2, *shape),), [torch.randn(3, *shape)],
                             **({"leaf_modules": leaves} if as_leaf else {}))


# 3. A NaN or Inf blinds every check.

def test_nan_or_inf_example_inputs_are_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.PReLU(init=0.5), nn.Linear(8, 8)).eval()
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 8)
        x[0, 3] = bad
        with pytest.raises(fxfuse.InputError, match="NaN or Inf"):
            fxfuse.optimize(model, (x,), tau=1.0)  # tau=1 would let the 0.5 slope through, were it measured


class NaNInside(nn.Module):
    """Finite inputs, NaN activations (log of negatives) before an approximate collapse."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.PReLU(init=0.5), nn.Linear(8, 8))

    def forward(self, x):
        return self.mlp(torch.log(x))


def test_nan_inside_the_graph_is_not_an_error_of_zero():
    model = NaNInside().eval()
    gm = fxfuse.optimize(model, (torch.randn(4, 8),), tau=1.0)
    report = fxfuse.report_of(gm)
    assert not report.applied and "NaN or Inf" in report.skipped[0].reason
    fresh = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_error(gm(fresh), model(fresh)) == 0.0


def test_a_nan_never_compares_as_close():
    ref = torch.tensor([float("nan"), 1.0, float("inf")])
    assert rel_error(torch.tensor([float("nan"), 1.0, float("inf")]), ref) == 0.0
    assert rel_error(torch.tensor([0.0, 1.0, float("inf")]), ref) == math.inf
    assert rel_error(torch.tensor([float("nan"), 1.0, -float("inf")]), ref) == math.inf
    assert rel_error(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 1.0])) == math.inf
    assert rel_error(torch.ones(3), torch.ones(1, 3)) == math.inf  # another shape is never close


# 4. The captured graph must compute what the model computes.

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(self.fc(x))


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_on_the_model_itself_are_refused(kind):
    model = Small().eval()
    if kind == "forward":
        model.register_forward_hook(lambda module, args, out: out * 2)
    else:
        model.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    for inputs in ((torch.randn(2, 8),), None):
        with pytest.raises(fxfuse.TraceError, match="forward hooks on the model itself"):
            fxfuse.optimize(model, inputs)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.fc = Small(), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.inner(x))


def test_a_hooked_submodule_keeps_its_hooks_running():
    model = Outer().eval()
    seen = []
    model.inner.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out * 3)
    x = torch.randn(5, 8)
    for inputs in ((torch.randn(2, 8),), None):
        gm = fxfuse.optimize(model, inputs)
        seen.clear()
        with torch.no_grad():
            assert rel_error(gm(x), model(x)) <= 1e-6
        assert seen == [(5, 8), (5, 8)]  # the hook ran in the optimized model and in the original


class InPlaceAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        g = h  # an alias: the update below changes g too
        h += 1
        h *= 2
        return self.fc3(self.fc2(g))


def test_an_alias_of_a_value_updated_in_place_sees_the_update():
    model = InPlaceAlias().eval()
    for report in same_function_or_refused(model, (torch.randn(2, 8),), [torch.randn(5, 8)]):
        assert report is not None


class ReadThenUpdated(nn.Module):
    """x is read by the chain's first layer, then updated in place before the chain's last."""

    def __init__(self):
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.1), nn.Linear(8, 8)

    def forward(self, x):
        x = x * 1.0
        h = self.drop(x)
        x.mul_(3)
        return self.fc(h) + x


def test_a_region_whose_input_is_updated_inside_it_is_left_alone():
    model = ReadThenUpdated().eval()
    same_function_or_refused(model, (torch.randn(2, 8),), [torch.randn(5, 8)])


class UnreadInPlaceUpdate(nn.Module):
    """``h += 0.5`` whose result only an Identity reads: bypassing the Identity leaves the update
    with no reader, but it still changes h for ``h.mul_`` and fc3 (found by the fuzzer, seed 12703)."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.skip, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc2(self.fc(x))
        g = h
        h += 0.5  # g sees it
        self.skip(h)
        return self.fc3(g.mul_(1.5))


def test_an_update_in_place_nothing_reads_is_kept():
    same_function_or_refused(UnreadInPlaceUpdate().eval(), (torch.randn(2, 8),), [torch.randn(5, 8)])


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = self.fc(x)
        if mask is not None:
            h = h * mask
        return self.fc2(h) * scale


def test_a_none_default_argument_stays_none():
    model = OptionalMask().eval()
    x, mask = torch.randn(3, 8), torch.rand(3, 8)
    for inputs in ((torch.randn(2, 8),), None):
        gm = fxfuse.optimize(model, inputs)
        with torch.no_grad():
            assert rel_error(gm(x), model(x)) <= 1e-5
            try:
                got = gm(x, mask)
            except Exception as e:  # specialised to mask=None: a named refusal, not another function
                assert "mask" in str(e) or "specialized" in str(e) or "arguments" in str(e), e
            else:
                assert rel_error(got, model(x, mask)) <= 1e-5


# 5. State changes while checking.

class RunningMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("peak", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.peak.copy_(torch.maximum(self.peak, x.abs().max()))
        self.calls += 1
        return self.fc2(self.fc(x))


def test_buffers_updated_in_forward_come_back_as_given(each_capture):
    """torch.export records both updates; symbolic_trace runs ``self.calls += 1`` (it reads no
    input) once on the real tensor and leaves it out of the graph, so that capture is refused."""
    model = RunningMax().eval()
    if each_capture == "fx":
        with pytest.raises(fxfuse.TraceError, match="updates buffer 'calls'"):
            fxfuse.optimize(model, (torch.randn(2, 8),))
        return
    gm = fxfuse.optimize(model, (torch.randn(2, 8) * 5,))
    buffers = dict(gm.named_buffers())
    assert buffers["peak"].item() == 0.0 and buffers["calls"].item() == 0
    assert model.peak.item() == 0.0 and model.calls.item() == 0
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) <= 1e-5
    assert buffers["calls"].item() == 1 and buffers["peak"].item() == x.abs().max().item()


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x.mul_(2)
        return self.fc2(self.fc(x))


def test_an_input_updated_in_place_is_neither_changed_nor_called_random():
    model = ScalesItsInput().eval()
    x = torch.randn(2, 8)
    given = x.clone()
    gm = fxfuse.optimize(model, (x,))
    assert torch.equal(x, given)
    assert fxfuse.report_of(gm).applied
    with torch.no_grad():
        assert rel_error(gm(x.clone()), model(x.clone())) <= 1e-5


# 6. Shape assumptions from one example.

def test_a_linear_batchnorm1d_fold_proven_on_2d_inputs_refuses_3d_ones():
    model = randomize_batchnorm(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)).eval())
    three_d = torch.randn(3, 6, 8)  # axis 1 (6 long) is what BatchNorm1d normalises: another function
    reports = same_function_or_refused(model, (torch.randn(2, 8),), [torch.randn(5, 8), three_d])
    assert reports[0].applied and SPECIALISED in reports[0].applied[0].reason
    gm = fxfuse.optimize(model, (torch.randn(2, 8),))
    with pytest.raises((AssertionError, fxfuse.InputError), match="rank-2"):
        gm(three_d)


def test_an_unbatched_conv1d_input_is_refused_after_a_batched_fold():
    model = randomize_batchnorm(nn.Sequential(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)).eval())
    unbatched = torch.randn(4, 8)  # conv output (6, 6): BatchNorm1d reads it as 6 samples of 6 features
    same_function_or_refused(model, (torch.randn(2, 4, 10),), [torch.randn(3, 4, 12), unbatched])


class TokenMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)

    def forward(self, x):
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


def test_a_transpose_pair_proven_on_rank_3_refuses_rank_4():
    from fxfuse.passes import ALL_PASSES
    model = TokenMixer().eval()
    same_function_or_refused(model, (torch.randn(2, 6, 4),), [torch.randn(3, 6, 5), torch.randn(2, 3, 6, 6)],
                             passes=ALL_PASSES)


class Regroup(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(self.fc(x).reshape(x.shape[0], 2, 4))


def test_a_graph_specialised_to_a_batch_of_one_refuses_other_batches():
    """torch.export fixes a size-1 batch (its 0/1 specialisation): reshape(1, 2, 4) would then
    silently regroup a batch of 3; the exported graph's shape check refuses it instead."""
    model = Regroup().eval()
    same_function_or_refused(model, (torch.randn(1, 8),), [torch.randn(1, 8), torch.randn(3, 8)])
    gm = fxfuse.optimize(model, (torch.randn(2, 8),))
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert rel_error(gm(x), model(x)) <= 1e-5  # a batch of 2 keeps the batch size free


# 7. Raw crashes instead of named errors.

def test_parameters_on_the_meta_device_are_refused():
    with torch.device("meta"):
        model = Small().eval()
    for inputs in ((torch.randn(2, 8, device="meta"),), None):
        with pytest.raises(fxfuse.UnsupportedModelError, match="meta device"):
            fxfuse.optimize(model, inputs)


class PlainTensorAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = torch.randn(8, 8)  # neither parameter nor buffer: .double() leaves it float32

    def forward(self, x):
        return self.fc(x) @ self.proj


def test_the_float64_arbiter_runs_on_plain_tensor_attributes():
    model = PlainTensorAttribute().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        float32_error, = float64_errors(model, (x,), model(x))
    assert 0 < float32_error < 1e-5  # float32 rounding, measured against a float64 run


class VectorWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(8, 8), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return F.linear(self.fc(x), self.w)  # a 1-D weight: a dot product, the feature axis gone


def test_a_one_dimensional_linear_weight():
    same_function_or_refused(VectorWeight().eval(), (torch.randn(2, 8),), [torch.randn(5, 8)])


# 8. False alarms: exactness is decided in float64.

def test_rexnet_with_linear_activations_is_not_refused():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("rexnet_100", act_layer="identity", dw_act_layer="identity").eval())
    x = torch.randn(2, 3, 224, 224)
    gm = fxfuse.optimize(model, (x,))  # raised VerificationError when float32 roundings were compared
    report = fxfuse.report_of(gm)
    assert len(report.applied) > 50
    fresh = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = float64_errors(model, (fresh,), gm(fresh), model(fresh))
    assert ours <= theirs + 1e-4


# 9. Savings reported but not realised.

class DeadRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc(x))


def test_a_dead_read_of_a_replaced_weight_does_not_keep_it_alive():
    gm = torch.fx.symbolic_trace(DeadRead().eval())
    with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):
        gm.graph.get_attr("fc.weight")  # what a tracer leaves behind for `self.fc.weight.shape` and such
    gm.recompile()
    for inputs in ((torch.randn(2, 8),), None):
        result = fxfuse.optimize(copy.deepcopy(gm).eval(), inputs)
        report = fxfuse.report_of(result)
        assert saved(report) == 16 * 8 + 16 + 4 * 16 + 4 - (4 * 8 + 4)
        assert report.params_before - sum(p.numel() for p in result.parameters()) == saved(report)
