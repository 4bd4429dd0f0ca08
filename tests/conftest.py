import pytest
import torch
from torch import nn

import fxfuse

# The CI machines have 2 cores shared with other jobs: intra-op threads then fight each other and small
# ops get ~1000x slower. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


def max_rel_error(new, ref) -> float:
    """max |new - ref| / max |ref|, the measure of fxfuse's tolerances."""
    return ((new.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 1.5 + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.randn(bn.num_features, generator=generator) * 0.2 + 1)
                bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
    return model


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


def count(module: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.fixture(params=range(4))
def seed(request):
    torch.manual_seed(request.param)
    return request.param
