"""The same rewrites whichever way the graph was captured: an nn.Module (torch.export or
symbolic_trace), an ExportedProgram, its .module(), and the core-ATen graph of run_decompositions()."""
import pytest
import torch
from conftest import randomize_batchnorm
from torch import nn

import fxfuse
from fxfuse.models import demo_inputs, demo_model
from fxfuse.passes import FoldBatchNorm


@pytest.fixture(autouse=True)
def each_capture():
    """These tests name their captures themselves: run them once."""
    return "explicit"


def prelu_mlp():
    model = nn.Sequential(nn.Linear(16, 128), nn.PReLU(init=1.0), nn.Dropout(0.1), nn.Linear(128, 16)).eval()
    return model, (torch.randn(4, 16),)


def conv_bn_conv():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.Conv2d(32, 8, 3), nn.BatchNorm2d(8))
    return randomize_batchnorm(model).eval(), (torch.randn(2, 3, 12, 12),)


MODELS = {"prelu_mlp": prelu_mlp, "conv_bn_conv": conv_bn_conv, "demo": lambda: (demo_model(), demo_inputs())}
def export(model, x):
    """torch.export with a dynamic batch, as a user would write it."""
    return torch.export.export(model, x, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in x))


SOURCES = {
    "module_fx": lambda m, x: (m, "fx"),
    "module_export": lambda m, x: (m, "export"),
    "program": lambda m, x: (export(m, x), "auto"),
    "program_module": lambda m, x: (export(m, x).module(), "auto"),
    "decomposed": lambda m, x: (export(m, x).run_decompositions(), "auto"),
}


def decisions(report) -> list[tuple]:
    """What was done, independent of node names: pass, status, parameters before → after."""
    return sorted((r.pass_name, r.status, r.params_before, r.params_after) for r in report.rows
                  if r.pass_name != "drop_identity")  # dropouts: the ATen decomposition already removes them


@pytest.mark.parametrize("name", MODELS)
def test_every_capture_finds_the_same_rewrites(name):
    model, x = MODELS[name]()
    found = {}
    for source, make in SOURCES.items():
        given, capture = make(model, x)
        gm = fxfuse.optimize(given, x, capture=capture)
        report = fxfuse.report_of(gm)
        assert report.capture == ("fx" if source == "module_fx" else "export")
        found[source] = decisions(report)
        with torch.no_grad():  # the model's function at another batch size
            fresh = tuple(torch.randn(5, *t.shape[1:]) for t in x)
            assert (gm(*fresh) - model(*fresh)).abs().max() <= 1e-5 * model(*fresh).abs().max()
    assert any(status == "applied" for _, status, *_ in found["module_fx"])
    assert all(rows == found["module_fx"] for rows in found.values()), found


def test_core_aten_graph_holds_what_the_passes_match():
    """The oracle for 'decomposed' above: run_decompositions really spells the layers as core ATen."""
    model, x = conv_bn_conv()
    graph = torch.export.export(model, x).run_decompositions().module().graph
    targets = {n.target for n in graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert {aten.convolution.default, aten._native_batch_norm_legit_no_training.default} <= targets
    model, x = prelu_mlp()
    targets = {n.target for n in torch.export.export(model, x).run_decompositions().module().graph.nodes}
    assert {aten.addmm.default, aten.where.self} <= targets and aten.prelu.default not in targets


def test_exported_result_reexports_compiles_and_pickles(tmp_path):
    model, x = MODELS["demo"]()
    gm = fxfuse.optimize(model, x, capture="export")
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)  # still an ATen graph
    again = torch.export.export(gm, x).module()
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    with torch.no_grad():
        for other in (again, loaded):
            assert (other(*x) - gm(*x)).abs().max() <= 1e-6 * gm(*x).abs().max()


def test_capture_failures_name_both_captures_and_a_fix():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(fxfuse.TraceError, match=r"(?s)export: .*fx: .*Fix: "):
        fxfuse.optimize(DataDependent().eval(), (torch.randn(2, 4),))
    with pytest.raises(fxfuse.InputError, match="capture='nope'"):
        fxfuse.optimize(DataDependent().eval(), (torch.randn(2, 4),), capture="nope")


def test_macs_count_gpt2_conv1d_and_attention_in_the_exported_graph():
    """Oracle from the config: GPT-2's Conv1D layers (q/k/v, projection, MLP), attention and the LM head."""
    from hf_models import gpt2

    model, kwargs, _ = gpt2()
    c = model.config
    tokens, seq, d, head = kwargs["input_ids"].numel(), kwargs["input_ids"].shape[1], c.n_embd, c.n_embd // c.n_head
    per_layer = tokens * d * (3 * d + d + 4 * d + 4 * d) + tokens * c.n_head * seq * 2 * head
    expected = c.n_layer * per_layer + tokens * d * c.vocab_size
    report = fxfuse.report_of(fxfuse.optimize(model, kwargs))
    assert report.macs_before == expected


def test_a_batchnorm_fold_keeps_the_model_total_and_the_row_agrees():
    model, x = conv_bn_conv()
    report = fxfuse.report_of(fxfuse.optimize(model, x, passes=[FoldBatchNorm()]))
    conv1, conv2 = 2 * 12 * 12 * 32 * 3, 2 * 10 * 10 * 8 * 32 * 9  # output elements × products each
    assert report.macs_before == report.macs_after == conv1 + conv2
    assert all(r.macs_before == r.macs_after for r in report.applied) and len(report.applied) == 2


def test_a_transformers_cache_is_named_with_fixes_that_work():
    from hf_models import gpt2

    model, kwargs, make = gpt2()
    model.config.use_cache = True
    with pytest.raises(fxfuse.TraceError, match=r"(?s)DynamicCache.*Fix: .*use_cache = False"):
        fxfuse.optimize(model, kwargs)
    gm = fxfuse.optimize(model, {**kwargs, "use_cache": False})  # the second fix the message names
    model.config.use_cache = False  # the first
    fresh = make(3, 5)
    with torch.no_grad():
        assert torch.equal(gm(**fresh, use_cache=False).logits, model(**fresh).logits)
        assert torch.equal(fxfuse.optimize(model, kwargs)(**fresh).logits, model(**fresh).logits)


class AuxHead(nn.Module):
    """An auxiliary classifier that only training uses (torchvision's GoogLeNet, Inception v3)."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = nn.Linear(8, 8), nn.Linear(8, 1000)

    def forward(self, x):
        y = self.body(x)
        return (y, self.aux(x)) if self.training else y


def test_both_captures_count_the_same_parameters():
    model, x = AuxHead().eval(), (torch.randn(2, 8),)
    counts = {c: fxfuse.report_of(fxfuse.optimize(model, x, capture=c)).params_before for c in ("export", "fx")}
    assert counts == {"export": 72, "fx": 72}  # the eval-mode graph never reads the auxiliary head
