"""fxfuse.analyze: what collapse and tie could save, checked against hand counts."""
import json

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.analysis import EXACT_NOW, NEEDS_PREPARE, analyze_table_model
from hf_models import bert, gpt2


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


@pytest.mark.parametrize("act, status", [(nn.GELU(), NEEDS_PREPARE), (nn.ReLU(), NEEDS_PREPARE),
                                         (nn.PReLU(init=1.0), EXACT_NOW), (nn.PReLU(init=0.5), NEEDS_PREPARE),
                                         (nn.Identity(), EXACT_NOW)])
def test_a_two_layer_mlp_against_a_hand_count(act, status):
    model = nn.Sequential(nn.Linear(16, 64), act, nn.Linear(64, 16)).eval()
    result = fxfuse.analyze(model, (torch.randn(4, 16),))
    [c] = result.collapsible
    assert (c.params_before, c.params_after) == (linear(16, 64) + linear(64, 16), linear(16, 16))
    assert (c.macs_before, c.macs_after) == (4 * (16 * 64 + 64 * 16), 4 * 16 * 16)
    assert c.status == status and result.params == sum(p.numel() for p in model.parameters())
    assert result.params_saved == c.params_before - c.params_after


def test_a_bottleneck_saves_nothing_and_is_not_counted():
    model = nn.Sequential(nn.Linear(16, 4), nn.GELU(), nn.Linear(4, 16)).eval()
    result = fxfuse.analyze(model, (torch.randn(2, 16),))
    assert "no gain" in result.collapsible[0].status and result.params_saved == 0


def test_a_three_layer_classifier_collapses_as_one_run():
    """VGG's classifier: Linear → ReLU → Dropout → Linear → ReLU → Dropout → Linear."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(),
                          nn.Linear(64, 10)).eval()
    result = fxfuse.analyze(model, (torch.randn(3, 32),))
    [c] = result.collapsible
    assert c.params_before == linear(32, 64) + linear(64, 64) + linear(64, 10) and c.params_after == linear(32, 10)
    assert c.macs_after == 3 * 32 * 10


def test_a_conv_pair_against_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    result = fxfuse.analyze(model, (torch.randn(1, 3, 10, 10),))
    [c] = result.collapsible
    out = 8 * 8 * 8  # (8 channels, 8 × 8) after the 3×3 conv, and after the 1×1
    assert c.params_before == 8 * 3 * 9 + 8 + 8 * 8 + 8 and c.params_after == 8 * 3 * 9 + 8
    assert (c.macs_before, c.macs_after) == (out * 27 + out * 8, out * 27)


def test_a_padded_second_conv_is_named_not_counted():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    result = fxfuse.analyze(model, (torch.randn(1, 3, 10, 10),))
    assert "pads the hidden map" in result.collapsible[0].status and result.params_saved == 0


def test_gpt2_conv1d_feedforwards_and_their_tie_group():
    model, kwargs, _ = gpt2()
    d, layers = model.config.n_embd, model.config.n_layer
    rows = kwargs["input_ids"].numel()  # batch × sequence: one row per token
    result = fxfuse.analyze(model, kwargs, capture="export")  # symbolic_trace cannot trace transformers 5
    ff = linear(d, 4 * d) + linear(4 * d, d)
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.params_saved == layers * (ff - linear(d, d))
    assert result.macs_saved == layers * rows * (8 * d * d - d * d)
    [group] = result.tie_groups
    assert len(group.sites) == layers and group.params_saved == (layers - 1) * ff


def test_bert_gelu_feedforwards():
    model, kwargs, _ = bert()
    c = model.config
    d, hidden, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    result = fxfuse.analyze(model, kwargs, capture="export")
    counted = [x for x in result.collapsible if x.counted]
    assert len(counted) == layers + 1 and all(x.status == NEEDS_PREPARE for x in counted)  # + pooler → classifier
    head = linear(d, d) + linear(d, c.num_labels) - linear(d, c.num_labels)  # tanh pooler, dropout, classifier
    assert result.params_saved == layers * (linear(d, hidden) + linear(hidden, d) - linear(d, d)) + head


def test_json_and_chart(tmp_path):
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.GELU(),
                          nn.Linear(64, 16)).eval()
    result = fxfuse.analyze(model, (torch.randn(2, 16),))
    data = json.loads(result.to_json())
    assert data["params_saved"] == result.params_saved and len(data["collapsible"]) == len(result.collapsible)
    result.save_chart(tmp_path / "saves.png")
    assert (tmp_path / "saves.png").read_bytes()[:4] == b"\x89PNG"


def test_meta_device_models_are_analysed_without_values():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    result = fxfuse.analyze(model, (torch.zeros(2, 16, device="meta"),))
    assert result.params_saved == linear(16, 64) + linear(64, 16) - linear(16, 16)


def test_vgg16_reproduces_layercollapse_table_1():
    pytest.importorskip("torchvision")
    result = analyze_table_model("vgg16")
    assert result.params == 138_357_544  # torchvision's VGG16
    assert round(result.percent()["params"], 1) == 71.2 and round(result.percent()["dense_macs"], 1) == 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name, params, macs", [("mixer-large", 86.5, 86.5), ("vit-large", 57.9, 58.2),
                                                ("bert-large", 52.6, 58.3), ("gpt2-large", 53.4, 53.5)])
def test_layercollapse_table_1(name, params, macs):
    """The paper's parameter figures exactly; its MAC figures for Mixer and ViT, within 1.2 points
    for BERT and GPT-2 (README: sequence length and what the paper counted)."""
    pct = analyze_table_model(name).percent()
    assert (round(pct["params"], 1), round(pct["dense_macs"], 1)) == (params, macs)


def test_cli_table1_prints_the_comparison(tmp_path, capsys):
    from fxfuse.cli import main
    assert main(["analyze", "--table1", "vgg16", "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "71.2 / 71.2" in out and "0.6 / 0.6" in out
    assert json.loads((tmp_path / "a.json").read_text())[0]["model"] == "vgg16"
    assert (tmp_path / "a.png").stat().st_size > 0


def test_cli_model_file(tmp_path, capsys):
    from fxfuse.cli import main
    path = tmp_path / "mine.py"
    path.write_text("import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), "
                    "nn.Linear(32, 8)).eval()\n")
    assert main(["analyze", f"{path}:build", "--input-shape", "2,8"]) == 0
    assert "needs prepare_collapse" in capsys.readouterr().out


@pytest.mark.parametrize("argv, first", [
    (["analyze"], "fxfuse analyze takes a model file"),
    (["analyze", "m.py:build"], "needs --input-shape"),
    (["analyze", "--table1", "gpt5"], "argument --table1"),
])
def test_cli_mistakes(argv, first, capsys, tmp_path):
    from fxfuse.cli import main
    assert main(argv) == 2
    assert first in capsys.readouterr().err.splitlines()[0]
