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
