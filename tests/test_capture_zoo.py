"""benchmarks/capture_zoo.py's per-model check on small timm models whose BatchNorms are timm's
BatchNormAct2d (a _BatchNorm subclass outside torch.nn): both captures reach them, and every
BatchNorm layer (counted on the model, independently of fxfuse) is folded."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import capture_zoo  # noqa: E402

MODELS = ["mobilenetv3_small_050", "regnetx_002"]


@pytest.fixture(scope="module", params=MODELS)
def record(request):
    return capture_zoo.run_model("timm", request.param, timeout_s=120)


def test_models_build_small_with_batchnormact(record):
    assert record["status"] == "run", record.get("why")
    assert record["input_shape"] == [2, 3, 64, 64]
    assert record["foreign_bn_classes"] == ["timm.layers.norm_act.BatchNormAct2d"]


@pytest.mark.parametrize("capture", capture_zoo.CAPTURES)
def test_reached_and_every_batchnorm_folded(record, capture):
    import timm
    model = timm.create_model(record["model"], pretrained=False)
    bn_layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert bn_layers == record["bn_layers"] > 0
    result = record["captures"][capture]
    assert result["status"] == "reached", result
    assert result["fresh_error"] <= capture_zoo.REACHED_TOL
    assert result["folds"] == bn_layers, f"{capture}: {result['folds']} of {bn_layers} BatchNorms folded"
    assert result["params_after"] < result["params_before"]


def test_export_runs_at_another_batch_size(record):
    batch3 = record["captures"]["export"]["batch3"]
    assert batch3["ran"] and batch3["error"] <= capture_zoo.REACHED_TOL


def test_max_rel_error_and_timeout():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert capture_zoo.max_rel_error((a + 0.4,), (a,)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        capture_zoo.max_rel_error((a, a), (a,))
    with pytest.raises(capture_zoo.Timeout):
        with capture_zoo.time_limit(0.05):
            while True:
                pass
