"""fxfuse on tiny Hugging Face models (random weights, nothing downloaded; builders in hf_models.py).

For each model: optimize captures it with torch.export and reports every rewrite; the eval-mode
dropouts (counted independently in a plain torch.export graph) are dropped; the optimized graph
computes the model's function at other batch sizes and sequence lengths; it exports to ONNX
(onnxruntime agrees with torch); and it survives torch.save / torch.load.
"""
import collections
import functools
import io
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxfuse
from conftest import max_rel_error

transformers = pytest.importorskip("transformers")
from hf_models import HF_MODELS  # noqa: E402  (needs transformers)

aten = torch.ops.aten
slow = pytest.mark.slow
# (batch, seq) of the fresh inputs: unlike the example's (2, 8), within every model's position limit (64)
FRESH_SHAPES = [(3, 11), (4, 5)]
# Measured on 2 shared cores, one torch thread: build + optimize 0.6-4.5 s a model (T5 the slowest), the
# other checks < 1.2 s; export_onnx 3-5 s for BERT, ViT, GPT-2, 6-11 s for Llama, Qwen2, BART, T5 (slow).
DEFAULT_RUN = tuple(HF_MODELS)
ONNX_DEFAULT_RUN = ("gpt2", "bert", "vit")
# Config attributes that hold a dropout probability, by the config classes of hf_models.
DROPOUT_ATTRIBUTES = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
                      "dropout_rate", "dropout", "attention_dropout", "activation_dropout", "classifier_dropout")


def models(default=DEFAULT_RUN):
    """Every model of HF_MODELS; those not in ``default`` are marked slow."""
    return [pytest.param(name, marks=() if name in default else slow) for name in HF_MODELS]


@pytest.fixture(autouse=True)
def each_capture():
    """Overrides conftest's (export, fx) parametrization: these tests are about the default capture."""
    return "auto"


TIMES = collections.defaultdict(dict)  # model -> step -> seconds (printed with -s)


def _timed(name, step, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    TIMES[name][step] = time.perf_counter() - start
    print(f"[{name}] {step}: {TIMES[name][step]:.2f} s")
    return result


@functools.lru_cache(maxsize=None)
def optimized(name):
    """(model, example_kwargs, make_kwargs, gm), optimized once per model and session."""
    model, example, make = _timed(name, "build", HF_MODELS[name])
    gm = _timed(name, "optimize", fxfuse.optimize, model, example)
    return model, example, make, gm


def float_leaves(output):
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def assert_same_outputs(new, ref, rtol):
    new_leaves, ref_leaves = tree_leaves(new), tree_leaves(ref)
    assert len(new_leaves) == len(ref_leaves), f"{len(new_leaves)} output leaves, expected {len(ref_leaves)}"
    floats = [(a, b) for a, b in zip(new_leaves, ref_leaves) if isinstance(b, torch.Tensor) and b.is_floating_point()]
    assert floats, "no floating output to compare"
    for i, (a, b) in enumerate(floats):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        err = max_rel_error(a, b)
        assert err <= rtol, f"output {i} {tuple(b.shape)} differs by {err:.2e} (max relative error) > {rtol:g}"


def oracle_dropouts(model, example):
    """The eval-mode dropouts of a plain torch.export capture (no fxfuse): (module path, p) each,
    the path being the innermost module on the node's nn_module_stack (the dropout module, or the
    module calling F.dropout)."""
    graph = torch.export.export(model, (), example, strict=False).module().graph
    found = []
    for node in graph.find_nodes(op="call_function", target=aten.dropout.default):
        x, p, train = node.args
        assert train is False, f"{node.name}: dropout in training mode in an eval model"
        stack = list(node.meta.get("nn_module_stack", {}).values())
        found.append((stack[-1][0] if stack else "", p))
    return found


def config_dropout(model):
    """The largest dropout probability the model's config (and sub-configs) declares."""
    configs = [model.config, *(getattr(model.config, k) for k in ("text_config", "vision_config") if hasattr(model.config, k))]
    return max([float(getattr(c, a)) for c in configs for a in DROPOUT_ATTRIBUTES
                if isinstance(getattr(c, a, None), (int, float))] or [0.0])


@pytest.mark.parametrize("name", models())
def test_optimize_captures_by_export_and_reports_each_rewrite(name):
    model, example, make, gm = optimized(name)
    report = fxfuse.report_of(gm)
    assert isinstance(gm, torch.fx.GraphModule)
    assert report.capture == "export"
    assert report.rows, f"{name}: an empty report\n{report.table()}"
    for row in report.rows:
        assert row.status in ("applied", "skipped", "rejected"), row
        assert any(row.where) or row.reason.strip(), f"{name}: a row names no place and gives no reason: {row}"
        if row.status != "applied":
            assert row.reason.strip(), f"{name}: a {row.status} row without a reason: {row}"
    assert report.error is not None and report.error <= 1e-5, report.table()
    assert report.params_after <= report.params_before


@pytest.mark.parametrize("name", models())
def test_eval_dropouts_are_dropped(name):
    """Oracle: the aten.dropout nodes of torch.export.export(model) itself, cross-checked with the
    model's nn.Dropout modules and its config."""
    model, example, make, gm = optimized(name)
    report = fxfuse.report_of(gm)
    dropouts = _timed(name, "oracle export", oracle_dropouts, model, example)
    modules = dict(model.named_modules())
    for path, p in dropouts:  # the oracle is sound: each node is a dropout module or a module's F.dropout
        assert path in modules, path
        module = modules[path]
        if isinstance(module, torch.nn.Dropout):
            assert module.p == p, (path, module.p, p)
    if config_dropout(model) > 0:
        assert any(p > 0 for _, p in dropouts), f"{name}: config dropout {config_dropout(model)} but no dropout in the graph"
    # every one of them is bypassed by drop_identity: none is left in the graph, and each has its row
    left = gm.graph.find_nodes(op="call_function", target=aten.dropout.default)
    assert not left, f"{name}: {len(left)} dropout nodes left: {[n.name for n in left]}\n{report.table()}"
    rows = collections.Counter(w for r in report.applied if r.pass_name == "drop_identity" for w in r.where)
    expected = collections.Counter(path for path, _ in dropouts)
    missing = expected - rows
    assert not missing, f"{name}: dropouts without a drop_identity row: {dict(missing)}\n{report.table()}"


@pytest.mark.parametrize("name", models())
@pytest.mark.parametrize("batch, seq", FRESH_SHAPES)
def test_same_function_on_fresh_inputs_of_other_shapes(name, batch, seq):
    model, example, make, gm = optimized(name)
    kw = make(batch, seq, seed=batch * 100 + seq)
    with torch.no_grad():
        new = _timed(name, f"gm at {batch}x{seq}", gm, **kw)
        ref = model(**kw)
    assert type(new) is type(ref)
    assert_same_outputs(new, ref, rtol=1e-5)


@pytest.mark.parametrize("name", models(default=ONNX_DEFAULT_RUN))
def test_onnx_export(name, tmp_path):
    model, example, make, gm = optimized(name)
    path = tmp_path / "m.onnx"
    try:
        report = _timed(name, "export_onnx", fxfuse.export_onnx, gm, example, path)
    except fxfuse.ExportError as e:
        pytest.fail(f"{name}: export_onnx raised ExportError: {str(e)[:2000]}")
    assert report.error is not None and report.error <= 1e-4, str(report)
    # the ONNX file at another sequence length too (export_onnx checks other batch sizes)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kw = make(3, 11, seed=7)
    feed = {i.name: kw[i.name].numpy() for i in session.get_inputs()}
    assert set(feed) == set(kw), f"ONNX inputs {sorted(feed)} vs kwargs {sorted(kw)}"
    got = [torch.from_numpy(np.asarray(y)) for y in session.run(None, feed)]
    with torch.no_grad():
        ref = float_leaves(model(**kw))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and max_rel_error(a, b) <= 1e-4, (tuple(a.shape), tuple(b.shape))


@pytest.mark.parametrize("name", models())
def test_save_load_round_trip(name):
    model, example, make, gm = optimized(name)
    buffer = io.BytesIO()
    _timed(name, "torch.save", torch.save, gm, buffer)
    buffer.seek(0)
    loaded = _timed(name, "torch.load", torch.load, buffer, weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert len(fxfuse.report_of(loaded).rows) == len(fxfuse.report_of(gm).rows)
    for batch, seq in FRESH_SHAPES:
        kw = make(batch, seq, seed=seq)
        with torch.no_grad():
            new, ref = loaded(**kw), gm(**kw)
        assert_same_outputs(new, ref, rtol=0.0)
        got, want = type(new), type(ref)
        assert got is want, f"the loaded module returns a {got.__name__}, not a {want.__name__}"
