"""The benchmark harness's smoke suite on CPU, so it never rots (figures are not asserted, shapes are)."""
import json

import pytest
import torch
from conftest import max_rel_error
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("timm")

from fxfuse.bench import run, suite, variants  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run("smoke", out, batches=[1])
    data = json.loads((out / "smoke.json").read_text())
    return data, (out / "smoke.md").read_text()


def variants_of(data, model):
    return {r["variant"]: r for r in data["results"] if r["model"] == model}


def test_smoke_suite_measures_every_variant(smoke):
    data, table = smoke
    for model in ("tiny_vit", "tiny_decoder"):
        rows = variants_of(data, model)
        assert set(rows) == {"original", "fxfuse", "hand"}
        assert rows["fxfuse"]["params"] == rows["hand"]["params"] < rows["original"]["params"]
        assert rows["fxfuse"]["onnx_bytes"] < rows["original"]["onnx_bytes"]
        assert all(r["latency_ms"]["cpu/float32/eager/b1"] > 0 and r["latency_ms"]["cpu/float32/onnxruntime/b1"] > 0
                   for r in rows.values())
        assert f"| {model} | fxfuse |" in table
        for r in rows.values():  # each median lies in its interquartile range
            assert all(q1 <= r["latency_ms"][key] <= q3 for key, (q1, q3) in r["spread_ms"].items())
    assert data["meta"]["command"]


def test_collapse_removes_macs_and_tie_keeps_them(smoke):
    vit, decoder = variants_of(smoke[0], "tiny_vit"), variants_of(smoke[0], "tiny_decoder")
    assert vit["fxfuse"]["macs"] == vit["hand"]["macs"] < vit["original"]["macs"]
    # a tied FF still runs at every site it serves: one set of weights, the same arithmetic
    assert decoder["fxfuse"]["macs"] == decoder["hand"]["macs"] == decoder["original"]["macs"]
    assert decoder["fxfuse"]["param_bytes"] == decoder["hand"]["param_bytes"] < decoder["original"]["param_bytes"]


class RecordOps(TorchDispatchMode):
    """Records each aten operator a forward dispatches with its output's shape and strides: the
    same sequence means the same kernels on any device, so the same time up to noise."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        layout = (tuple(out.shape), out.stride()) if isinstance(out, torch.Tensor) else None
        self.ops.append((str(func), layout))
        return out


def dispatched_ops(case_name: str, suite_name: str) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """Per variant: the aten ops one forward dispatches, and its output."""
    case = suite(suite_name, [case_name])[0]
    models, x = variants(case, "cpu"), case.example(1)
    for model in models.values():  # timm zero-initialises Mixer's head: give every variant the same nonzero one
        head = model.get_submodule("head")
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    ops, outputs = {}, {}
    for name, model in models.items():
        with RecordOps() as recorder, torch.no_grad():
            outputs[name] = model(x)
        ops[name] = recorder.ops
    return ops, outputs


def test_fxfuse_graph_dispatches_the_hand_collapsed_models_ops():
    ops, outputs = dispatched_ops("tiny_vit", "smoke")
    assert ops["fxfuse"] == ops["hand"] and len(ops["hand"]) < len(ops["original"])
    assert max_rel_error(outputs["fxfuse"], outputs["hand"]) <= 1e-5  # and they compute the same


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit_b16", "mixer_b16", "vit_t16"])
def test_fxfuse_dispatches_the_hand_collapsed_models_ops_on_the_benchmark_models(model):
    ops, outputs = dispatched_ops(model, "gpu")
    assert ops["fxfuse"] == ops["hand"]
    assert max_rel_error(outputs["fxfuse"], outputs["hand"]) <= 1e-5
