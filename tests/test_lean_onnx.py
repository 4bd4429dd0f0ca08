"""The lean export: fxfuse's ONNX has no more nodes than onnxsim's or onnxslim's result on the same
graph, and onnxruntime reproduces torch on it; each of fxfuse's own rules, hit and miss."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxfuse
from fxfuse.export import _with_batch, run_onnxruntime
from fxfuse.inputs import as_inputs
from fxfuse.lean_onnx import lean
from fxfuse.verify import rel_error


@pytest.fixture(autouse=True)
def each_capture():
    """Overrides conftest's (export, fx) parametrization: the ONNX rules do not depend on the capture."""


def small_vit() -> tuple[nn.Module, torch.Tensor]:
    """timm's ViT at 32², two blocks, PReLU(1) MLPs: attention's dynamic-batch shape arithmetic."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    for block in model.blocks:
        block.mlp.act = nn.PReLU(init=1.0)
    return model.eval(), torch.randn(2, 3, 32, 32)


def small_gpt2() -> tuple[nn.Module, dict]:
    """transformers' GPT2LMHeadModel, two layers, nudged biases: token ids and an attention mask."""
    pytest.importorskip("transformers")
    from hf_models import gpt2

    model, kwargs, _ = gpt2()
    return model, kwargs


@pytest.mark.parametrize("build", [small_vit, small_gpt2])
def test_no_more_nodes_than_onnxsim_or_onnxslim_on_the_same_graph(build, tmp_path):
    onnxsim = pytest.importorskip("onnxsim")
    onnxslim = pytest.importorskip("onnxslim")
    model, example = build()
    gm = fxfuse.optimize(model, example)
    fxfuse.export_onnx(gm, example, tmp_path / "plain.onnx", lean=False)
    fxfuse.export_onnx(gm, example, tmp_path / "lean.onnx")
    plain, ours = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "lean.onnx")
    simplified, _ = onnxsim.simplify(plain)
    slimmed = onnxslim.slim(plain)
    counts = {name: len(m.graph.node) for name, m in
              (("plain", plain), ("fxfuse", ours), ("onnxsim", simplified), ("onnxslim", slimmed))}
    assert counts["fxfuse"] <= min(counts["onnxsim"], counts["onnxslim"]), counts
    assert counts["fxfuse"] < counts["plain"], counts
    fresh = as_inputs(example).map(lambda x: _with_batch(x, 5))
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(fresh(model))
    assert rel_error(run_onnxruntime(tmp_path / "lean.onnx", fresh), expected) <= 1e-4


def _graph_file(nodes, inputs, output, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [output], [numpy_helper.from_array(v, k) for k, v in
                                                             initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _x(*shape):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _out(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, tmp_path, x: np.ndarray) -> bool:
    onnx.save(before, tmp_path / "before.onnx")
    onnx.save(after, tmp_path / "after.onnx")
    a, b = (run_onnxruntime(tmp_path / f, (torch.from_numpy(x),))[0] for f in ("before.onnx", "after.onnx"))
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("op, value, constant_first", [("Add", 0.0, False), ("Add", 0.0, True), ("Sub", 0.0, False),
                                                        ("Mul", 1.0, False), ("Mul", 1.0, True), ("Div", 1.0, False)])
def test_a_neutral_constant_tensor_is_dropped(tmp_path, op, value, constant_first):
    c = np.full((6,), value, np.float32)
    operands = ["c", "x"] if constant_first else ["x", "c"]
    nodes = [helper.make_node(op, operands, ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    model = _graph_file(nodes, [_x("batch", 4, 6)], _out("z", "batch", 4, 6), {"c": c})
    out = lean(model)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((3, 4, 6), np.float32))


@pytest.mark.parametrize("constant, why", [(np.zeros((5, 6), np.float32), "broadcasting adds an axis of 5"),
                                           (np.full((6,), 1e-30, np.float32), "not zeros")])
def test_an_add_that_changes_the_value_or_the_shape_is_kept(tmp_path, constant, why):
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    shape = np.broadcast_shapes((2, 1, 6), constant.shape)
    model = _graph_file(nodes, [_x("batch", 1, 6)], _out("y", "batch", *shape[1:]), {"c": constant})
    out = lean(model)
    assert [n.op_type for n in out.graph.node] == ["Add"], why
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((2, 1, 6), np.float32))


@pytest.mark.parametrize("target, merged", [([-1, 12], True), ([0, 12], False)])
def test_a_reshape_reads_through_a_squeeze_unless_its_target_copies_a_dim(tmp_path, target, merged):
    nodes = [helper.make_node("Squeeze", ["x", "axes"], ["s"]), helper.make_node("Reshape", ["s", "shape"], ["y"])]
    model = _graph_file(nodes, [_x("batch", 1, 3, 4)], _out("y", "batch", 12),
                        {"axes": np.array([1], np.int64), "shape": np.array(target, np.int64)})
    out = lean(model)
    assert [n.op_type for n in out.graph.node] == (["Reshape"] if merged else ["Squeeze", "Reshape"])
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((2, 1, 3, 4), np.float32))


def test_two_unsqueezes_become_one_for_each_reader(tmp_path):
    nodes = [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Unsqueeze", ["u", "b"], ["v"]),
             helper.make_node("Unsqueeze", ["u", "c"], ["w"]), helper.make_node("Add", ["v", "w"], ["y"])]
    model = _graph_file(nodes, [_x("batch", 3)], _out("y", "batch", 1, 3, 1),
                        {"a": np.array([1], np.int64), "b": np.array([3], np.int64), "c": np.array([2], np.int64)})
    out = lean(model)
    assert sorted(n.op_type for n in out.graph.node) == ["Add", "Unsqueeze", "Unsqueeze"]
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((2, 3), np.float32))


@pytest.mark.parametrize("region, kept", [([("Mul", "half"), ("Tanh", None)], False),
                                          ([("Mul", "row"), ("Tanh", None)], True)])
def test_a_view_pair_around_scalar_elementwise_ops_is_dropped(tmp_path, region, kept):
    """Reshape (B·S, 4) → (B, S, 4), elementwise, Reshape → (−1, 4): GPT-2's Conv1D view pair;
    kept when an operand is a tensor (here one per position s: its broadcast depends on the view)."""
    nodes, value = [helper.make_node("Reshape", ["x", "to3d"], ["r0"])], "r0"
    for i, (op, constant) in enumerate(region):
        nodes.append(helper.make_node(op, [value] + ([constant] if constant else []), [f"e{i}"]))
        value = f"e{i}"
    nodes += [helper.make_node("Reshape", [value, "to2d"], ["r1"]), helper.make_node("Relu", ["r1"], ["y"])]
    model = _graph_file(nodes, [_x("rows", 4)], _out("y", "rows", 4), {
        "to3d": np.array([-1, 2, 4], np.int64), "to2d": np.array([-1, 4], np.int64),
        "half": np.array(0.5, np.float32), "row": np.arange(2, dtype=np.float32).reshape(2, 1)})
    out = lean(model)
    assert ("Reshape" in [n.op_type for n in out.graph.node]) == kept
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((6, 4), np.float32))


def test_a_slice_of_static_shape_entries_becomes_a_constant(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "one", "end"], ["d"]),
             helper.make_node("Concat", ["minus", "d"], ["t"], axis=0), helper.make_node("Reshape", ["x", "t"], ["y"])]
    model = _graph_file(nodes, [_x("batch", 3, 4)], _out("y", "batch3", 4), {
        "one": np.array([2], np.int64), "end": np.array([3], np.int64), "minus": np.array([-1], np.int64)})
    out = lean(model)
    assert [n.op_type for n in out.graph.node] == ["Reshape"]
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((2, 3, 4), np.float32))


@pytest.mark.parametrize("target, dropped", [([0, -1], True), ([-1, 3, 2], False)])
def test_a_reshape_to_its_own_shape_is_dropped(tmp_path, target, dropped):
    """A mask viewed as (B, −1) is itself; a view that changes the shape stays."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    out_shape = ["batch", 6] if dropped else ["batch", 3, 2]
    model = _graph_file(nodes, [_x("batch", 6)], _out("y", *out_shape), {"shape": np.array(target, np.int64)})
    out = lean(model)
    assert ("Reshape" in [n.op_type for n in out.graph.node]) != dropped
    assert _same_outputs(model, out, tmp_path, np.random.default_rng(0).standard_normal((4, 6), np.float32))
