"""fuse_parallel (horizontal fusion) and its inverse split_parallel: hits, misses, fan-out, idempotence,
ONNX export, under both captures (conftest). The oracle is the original model run by torch, and
the layer count read off the graph by ``fxfuse.ir.view``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.ir import CONV, LINEAR, view
from fxfuse.passes import WITH_FUSION, FuseParallel, SplitParallel

FUSE = {"passes": [FuseParallel()]}


def layers(gm, kind=LINEAR) -> int:
    return sum(1 for n in gm.graph.nodes if (op := view(gm, n)) is not None and op.kind == kind)


def assert_same_function(gm, model, *shape, tol=1e-5):
    for seed in range(3):
        torch.manual_seed(100 + seed)
        x = torch.randn(*shape)
        with torch.no_grad():
            want, got = model(x), gm(x)
        assert (got - want).abs().max() <= tol * want.abs().max(), seed


class Attention(nn.Module):
    """q, k, v Linears on one input (with bias), the input also read by the residual (fan-out)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return x + self.o(y)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) · up(x)), no biases."""

    def __init__(self, d=16, hidden=40):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Branches(nn.Module):
    """Inception-style parallel convs on one input: two 1×1 (fused), a 3×3 and a grouped 1×1 (not)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1)
        self.c, self.g = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1, groups=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x), self.g(x)], 1)


class MixedBias(nn.Module):
    """Three Linears on one input, one without bias: the two with bias fuse, the other stays."""

    def __init__(self, d=12):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, 5), nn.Linear(d, 7), nn.Linear(d, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], -1)


class TiedRead(nn.Module):
    """q and k on one input, k's weight also read by F.linear elsewhere: fusing would copy it."""

    def __init__(self, d=12):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.q(x) * self.k(x) + F.linear(x.flip(-1), self.k.weight)


@pytest.mark.parametrize("build, shape, before, after", [
    (Attention, (3, 5, 16), 4, 2), (SwiGLU, (3, 5, 16), 3, 2), (MixedBias, (4, 12), 3, 2)])
def test_layers_reading_one_input_become_one(build, shape, before, after):
    torch.manual_seed(0)
    model = build().eval()
    gm = fxfuse.optimize(model, (torch.randn(*shape),), **FUSE)
    report = fxfuse.report_of(gm)
    assert layers(gm) == after and layers(fxfuse.optimize(model, (torch.randn(*shape),), passes=[])) == before
    assert report.params_after == report.params_before and report.macs_after == report.macs_before
    assert all("on one input become 1" in r.reason for r in report.applied)
    assert_same_function(gm, model, *shape)


def test_parallel_convs_of_one_geometry_fuse_and_the_others_stay():
    torch.manual_seed(0)
    model = Branches().eval()
    gm = fxfuse.optimize(model, (torch.randn(2, 8, 6, 6),), **FUSE)
    assert layers(gm, CONV) == 3  # a + b fused; the 3×3 and the grouped conv alone
    assert [r.where for r in fxfuse.report_of(gm).applied] == [["a", "b"]]
    assert_same_function(gm, model, 2, 8, 6, 6)


def test_a_weight_read_elsewhere_is_not_copied_into_a_fused_layer():
    torch.manual_seed(0)
    model = TiedRead().eval()
    gm = fxfuse.optimize(model, (torch.randn(3, 12),), **FUSE)
    report = fxfuse.report_of(gm)
    assert not report.applied and any("read elsewhere" in r.reason for r in report.skipped)
    assert report.params_after == report.params_before


def test_fusing_twice_changes_nothing():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(3, 5, 16)
    once = fxfuse.optimize(model, (x,), **FUSE)
    twice = fxfuse.optimize(once, (x,), **FUSE)
    assert not fxfuse.report_of(twice).applied and layers(twice) == layers(once) == 2
    assert_same_function(twice, model, 3, 5, 16)


def test_split_parallel_gives_the_parts_back():
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(3, 5, 16)
    back = fxfuse.optimize(fxfuse.optimize(model, (x,), **FUSE), (x,), passes=[SplitParallel()])
    assert layers(back) == 4 and sorted(p.shape for p in back.parameters()) == sorted(
        p.shape for p in model.parameters())
    assert_same_function(back, model, 3, 5, 16)


class Halves(nn.Module):
    """A Linear split into halves by Tensor.split(int), only the second half read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x):
        return self.fc(x).split(4, dim=-1)[1].relu()


def test_split_parallel_drops_a_part_nothing_reads():
    torch.manual_seed(0)
    model = Halves().eval()
    gm = fxfuse.optimize(model, (torch.randn(3, 6),), passes=[SplitParallel()])
    report = fxfuse.report_of(gm)
    assert report.params_before - report.params_after == 4 * 6 + 4 and report.macs_after * 2 == report.macs_before
    assert_same_function(gm, model, 3, 6)


def test_with_fusion_exports_to_onnx_with_fewer_matmuls(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(Attention(), SwiGLU()).eval()
    x = torch.randn(2, 5, 16)
    counts = {}
    for name, passes in (("plain", []), ("fused", WITH_FUSION)):
        gm = fxfuse.optimize(model, (x,), passes=passes)
        fxfuse.export_onnx(gm, (x,), tmp_path / f"{name}.onnx")
        graph = onnx.load(tmp_path / f"{name}.onnx").graph
        counts[name] = sum(n.op_type in ("MatMul", "Gemm") for n in graph.node)
    # attention's two matmuls stay; q, k, v → 1 and gate, up → 1
    assert counts["plain"] - counts["fused"] == 3, counts
