import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.models import randomize_batchnorm  # noqa: F401  (the tests import it from here)

# The CI machines have 2 cores shared with other jobs: intra-op threads then fight each other and small
# ops get ~1000x slower. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


def max_rel_error(new, ref) -> float:
    """max |new - ref| / max |ref|, the measure of fxfuse's tolerances."""
    return ((new.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def optimize_and_compare(model: nn.Module, inputs: tuple, rtol: float = 1e-5, **kwargs):
    """optimize(model, inputs); assert the result computes the same (fresh inputs too); return (gm, report)."""
    gm = fxfuse.optimize(model, inputs, **kwargs)
    for x in (inputs, tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)):
        assert_same_function(gm, model, x, rtol)
    return gm, fxfuse.report_of(gm)


def assert_same_function(new: nn.Module, model: nn.Module, inputs: tuple, rtol: float = 1e-5) -> None:
    """The rewritten module's outputs on ``inputs`` are within ``rtol`` (max relative error) of ``model``'s."""
    with torch.no_grad():
        err = max_rel_error(new(*inputs), model(*inputs))
    assert err <= rtol, f"rewritten model differs by {err:.2e} > {rtol:g}"


def applied(report, pass_name: str) -> list:
    return [r for r in report.applied if r.pass_name == pass_name]


def skipped(report, pass_name: str) -> list:
    return [r for r in report.skipped if r.pass_name == pass_name]


aten = torch.ops.aten
_CONV = {1: (aten.conv1d.default, aten.conv1d.padding), 2: (aten.conv2d.default, aten.conv2d.padding),
         3: (aten.conv3d.default, aten.conv3d.padding)}
_BATCHNORM = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
# the ATen forms of each layer type in an exported graph, with the input ranks each module type takes
ATEN_FORMS = [
    (nn.Linear, (aten.linear.default, aten.addmm.default), None),
    *[(t, _CONV[d], None) for t, d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3))],
    (nn.BatchNorm1d, _BATCHNORM, (2, 3)), (nn.BatchNorm2d, _BATCHNORM, (4,)), (nn.BatchNorm3d, _BATCHNORM, (5,)),
    (nn.PReLU, (aten.prelu.default,), None),
    (nn.Dropout, (aten.dropout.default,), None),
]


def count(module: nn.Module, kind) -> int:
    """Layers of type ``kind`` in ``module``: its submodules, or in a graph of ATen ops (torch.export)
    the ops that compute such a layer and the modules it calls."""
    if not _is_aten_graph(module):
        return sum(isinstance(m, kind) for m in module.modules())
    total = 0
    for node in module.graph.nodes:
        if node.op == "call_module":
            total += isinstance(module.get_submodule(node.target), kind)
        elif node.op == "call_function":
            rank = node.args[0].meta["val"].dim() if node.args and hasattr(node.args[0], "meta") and "val" in node.args[0].meta else None
            total += any(issubclass(t, kind) and node.target in targets and (ranks is None or rank in ranks)
                         for t, targets, ranks in ATEN_FORMS)
    return total


def _is_aten_graph(module: nn.Module) -> bool:
    return isinstance(module, torch.fx.GraphModule) and any(
        isinstance(n.target, torch._ops.OpOverload) for n in module.graph.nodes)


@pytest.fixture(params=["export", "fx"], autouse=True)
def each_capture(request, monkeypatch):
    """Every test runs once per capture: optimize's "auto" means torch.export first (the default),
    or symbolic_trace alone."""
    import fxfuse.capture
    if request.param == "fx":
        monkeypatch.setattr(fxfuse.capture, "AUTO_ORDER", ("fx",))
    return request.param


@pytest.fixture(params=range(4))
def seed(request):
    torch.manual_seed(request.param)
    return request.param
