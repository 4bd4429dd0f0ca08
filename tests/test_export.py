import onnx
import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.export import run_onnxruntime
from fxfuse.models import demo_inputs, demo_model


def test_demo_export_is_checked_reproduced_and_smaller(tmp_path):
    model, inputs = demo_model(), demo_inputs()
    gm = fxfuse.optimize(model, inputs)
    report = fxfuse.export_onnx(gm, inputs, tmp_path / "m.onnx", baseline=model)
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    (y_ort,) = run_onnxruntime(tmp_path / "m.onnx", inputs)
    ref = model(*inputs)
    assert ((y_ort - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    assert report.error <= 1e-4
    assert report.model.nodes < report.baseline.nodes
    assert report.model.initializer_bytes < report.baseline.initializer_bytes / 5
    assert "original" in str(report) and "optimized" in str(report)


def test_channelwise_prelu_left_in_the_graph_exports(tmp_path):
    """A PReLU with one slope per channel on a 4-D map must broadcast as [1, C, 1, 1] in ONNX."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.0, 0.5)
    x = (torch.randn(2, 3, 9, 9),)
    gm = fxfuse.optimize(model, x)
    report = fxfuse.export_onnx(gm, x, tmp_path / "p.onnx")
    assert report.error <= 1e-4 and report.opset >= 18


def test_export_failure_is_an_export_error(tmp_path):
    class Sparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    with pytest.raises(fxfuse.ExportError, match="Sparse"):
        fxfuse.export_onnx(Sparse().eval(), (torch.randn(2, 2),), tmp_path / "s.onnx")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.PReLU(init=1.0), nn.Linear(16, 3)).eval()


def test_an_example_batch_of_one_still_gives_a_dynamic_batch(tmp_path):
    """torch.export fixes a size of 1, so the file is traced at another batch and runs at any."""
    model = _mlp()
    report = fxfuse.export_onnx(model, (torch.randn(1, 6),), tmp_path / "b1.onnx")
    assert report.batches == [1, 7]
    x = torch.randn(5, 6)
    (y,) = run_onnxruntime(tmp_path / "b1.onnx", (x,))
    assert torch.allclose(y, model(x), rtol=1e-4, atol=1e-6)


def test_a_graph_captured_at_batch_one_is_refused_a_dynamic_batch_with_a_fix(tmp_path, each_capture):
    model, x = _mlp(), torch.randn(1, 6)
    gm = fxfuse.optimize(model, (x,))
    if each_capture == "fx":  # symbolic_trace fixes no size: the batch stays free
        assert fxfuse.export_onnx(gm, (x,), tmp_path / "fx.onnx").batches == [1, 7]
        return
    with pytest.raises(fxfuse.ExportError, match="runs at batch 1 only") as e:
        fxfuse.export_onnx(gm, (x,), tmp_path / "g.onnx")
    assert "batch of 2 or more, or pass dynamic_batch=False" in str(e.value)
    assert fxfuse.export_onnx(gm, (x,), tmp_path / "g.onnx", dynamic_batch=False).batches == [1]


def test_an_opset_the_exporter_cannot_write_is_an_error_not_a_silent_other_opset(tmp_path):
    with pytest.raises(fxfuse.ExportError, match="not the opset 7 asked for") as e:
        fxfuse.export_onnx(_mlp(), (torch.randn(2, 6),), tmp_path / "o7.onnx", opset=7)
    assert "Give opset" in str(e.value)
