import json

from fxfuse.cli import main

MODEL_FILE = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 4)).eval()
"""


def test_demo_prints_report_and_writes_onnx(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "collapse" in out and "compose" in out and "fold_batchnorm" in out and "initializer bytes" in out
    assert (tmp_path / "d.onnx").stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["params_after"] > 0


def test_optimize_a_model_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(MODEL_FILE)
    assert main(["optimize", f"{path}:build", "--input-shape", "2,8", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "applied" in capsys.readouterr().out


def test_missing_model_file(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nope.py"), "--input-shape", "1,8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_file_without_the_factory(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(MODEL_FILE)
    assert main(["optimize", f"{path}:nothing", "--input-shape", "1,8"]) == 2
    assert "defines no 'nothing'" in capsys.readouterr().err


def test_model_file_that_does_not_import(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_module_here\n")
    assert main(["optimize", str(path), "--input-shape", "1,8"]) == 2
    assert "running" in capsys.readouterr().err


def test_factory_that_returns_no_module(tmp_path, capsys):
    path = tmp_path / "notmodel.py"
    path.write_text("def model():\n    return 42\n")
    assert main(["optimize", str(path), "--input-shape", "1,8"]) == 2
    assert "torch.nn.Module" in capsys.readouterr().err
