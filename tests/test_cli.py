import json
from importlib.metadata import version

import pytest

import fxfuse.cli
from fxfuse.cli import main
from fxfuse.errors import ExportError

MODEL_FILE = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 4)).eval()
"""
NEAR_LINEAR_FILE = MODEL_FILE.replace("init=1.0", "init=0.999")  # collapses only with tau ≥ 0.001
CONV_FILE = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
"""
EMBEDDING_FILE = """
import torch.nn as nn

def build(vocab=100):
    return nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, 64), nn.PReLU(init=1.0), nn.Linear(64, 4)).eval()

def small():
    return build(vocab=10)
"""
TWO_INPUT_FILE = """
import torch.nn as nn

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)

def build():
    return Two().eval()
"""


def write(tmp_path, text: str = MODEL_FILE, name: str = "mine.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def optimize(tmp_path, *args: str, text: str = MODEL_FILE, factory: str = "build") -> dict:
    """``fxfuse optimize`` on ``text`` (exit 0 asserted) → its JSON report."""
    report = tmp_path / "r.json"
    assert main(["optimize", f"{write(tmp_path, text)}:{factory}", "--no-onnx", "--json", str(report), *args]) == 0
    return json.loads(report.read_text())


def rows(report: dict, pass_name: str, status: str = "applied") -> list[dict]:
    return [r for r in report["rows"] if r["pass_name"] == pass_name and r["status"] == status]


def first_error_line(capsys) -> str:
    """stderr's first line, after checking it is fxfuse's one-line error and no traceback follows."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    assert first.startswith("fxfuse: error: "), err
    return first


# --- what a run prints and writes

def test_demo_prints_report_and_writes_onnx(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "collapse" in out and "compose" in out and "fold_batchnorm" in out and "initializer bytes" in out
    assert (tmp_path / "d.onnx").stat().st_size > 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["params_after"] > 0 and data["onnx"]["model"]["nodes"] > 0 and data["onnx"]["baseline"]["nodes"] > 0


def test_optimize_a_model_file_exports_with_a_dynamic_batch_by_default(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "applied" in out and "at batch 2, 1, 7;" in out
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fxfuse {version('fxfuse')}"


@pytest.mark.parametrize("command", [[], ["optimize"], ["demo"], ["bench"], ["analyze"]])
def test_help_is_plain_text(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fxfuse") and "``" not in out


# --- one test per option: its outcome shows that it reached optimize or export_onnx

def test_passes_by_name(tmp_path):
    report = optimize(tmp_path, "--input-shape", "2,8", "--passes", "fold_batchnorm", "drop_identity")
    assert not rows(report, "collapse") and report["params_after"] == report["params_before"]
    assert rows(optimize(tmp_path, "--input-shape", "2,8", "--passes", "collapse"), "collapse")


def test_tau(tmp_path):
    assert rows(optimize(tmp_path, "--input-shape", "2,8", text=NEAR_LINEAR_FILE), "collapse", "skipped")
    [row] = rows(optimize(tmp_path, "--input-shape", "2,8", "--tau", "0.01", text=NEAR_LINEAR_FILE), "collapse")
    assert row["exact"] is False


def test_approx_tolerance(tmp_path):
    report = optimize(tmp_path, "--input-shape", "2,8", "--tau", "0.01", "--approx-tolerance", "1e-9",
                      text=NEAR_LINEAR_FILE)
    assert rows(report, "collapse", "rejected") and not rows(report, "collapse")


def test_tolerance(tmp_path):
    [row] = rows(optimize(tmp_path, "--input-shape", "2,8", "--tolerance", "0.5"), "collapse")
    assert row["exact"] and row["tolerance"] == 0.5


def test_conv_tolerance(tmp_path):
    [row] = rows(optimize(tmp_path, "--input-shape", "2,3,8,8", "--conv-tolerance", "0.5", text=CONV_FILE), "compose")
    assert row["tolerance"] == 0.5


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_integer_input_shape(tmp_path, dtype):
    report = optimize(tmp_path, "--input-shape", f"2,16:{dtype}", text=EMBEDDING_FILE)
    assert rows(report, "collapse")


def test_float64_input_shape(tmp_path):
    report = optimize(tmp_path, "--input-shape", "2,8:float64", text=MODEL_FILE.replace(".eval()", ".double().eval()"))
    assert rows(report, "collapse")


def test_vocab(tmp_path, capsys):
    assert rows(optimize(tmp_path, "--input-shape", "2,16:int64", "--vocab", "10", text=EMBEDDING_FILE,
                         factory="small"), "collapse")
    # token ids up to the default 100 do not fit a 10-word embedding
    assert main(["optimize", f"{write(tmp_path, EMBEDDING_FILE)}:small", "--input-shape", "2,16:int64",
                 "--no-onnx"]) == 2
    assert "index out of range" in first_error_line(capsys)


def test_several_inputs(tmp_path):
    """Each --input-shape is one positional input, in order (y is 6 wide): the model ran on them."""
    report = optimize(tmp_path, "--input-shape", "2,8", "--input-shape", "2,6", text=TWO_INPUT_FILE)
    assert report["params_after"] == report["params_before"] == 36 + 28 and report["macs_before"] == 2 * (32 + 24)


def test_capture(tmp_path):
    assert optimize(tmp_path, "--input-shape", "2,8", "--capture", "fx")["capture"] == "fx"
    assert optimize(tmp_path, "--input-shape", "2,8", "--capture", "export")["capture"] == "export"


def test_no_onnx(tmp_path, capsys):
    optimize(tmp_path, "--input-shape", "2,8", "--out", str(tmp_path / "m.onnx"))
    assert "applied" in capsys.readouterr().out
    assert not (tmp_path / "m.onnx").exists()


def test_quiet(tmp_path, capsys):
    assert rows(optimize(tmp_path, "--input-shape", "2,8", "--quiet"), "collapse")
    assert capsys.readouterr().out == ""


def test_opset(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", "--opset", "18",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert "opset 18;" in capsys.readouterr().out


def test_no_dynamic_batch(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", "--no-dynamic-batch",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert "at batch 2;" in capsys.readouterr().out


# --- one test per user mistake: exit 2, one line "fxfuse: error: <cause>. <fix>", no traceback

def test_missing_model_file(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "nope.py"), "--input-shape", "1,8"]) == 2
    assert "does not exist" in first_error_line(capsys)


def test_model_file_without_the_factory(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path)}:nothing", "--input-shape", "1,8"]) == 2
    assert "defines no 'nothing'" in first_error_line(capsys)


def test_model_file_that_does_not_import(tmp_path, capsys):
    assert main(["optimize", write(tmp_path, "import no_such_module_here\n"), "--input-shape", "1,8"]) == 2
    first = first_error_line(capsys)
    assert "running" in first and "No module named 'no_such_module_here'" in first


def test_factory_that_returns_no_module(tmp_path, capsys):
    assert main(["optimize", write(tmp_path, "def model():\n    return 42\n"), "--input-shape", "1,8"]) == 2
    assert "gives a builtins.int, not a torch.nn.Module" in first_error_line(capsys)


def test_factory_that_raises(tmp_path, capsys):
    assert main(["optimize", write(tmp_path, "def model():\n    raise ValueError('no weights')\n"),
                 "--input-shape", "1,8"]) == 2
    assert "calling model() of" in (first := first_error_line(capsys)) and "ValueError: no weights" in first


def test_too_many_inputs_is_a_user_mistake(tmp_path, capsys):
    """Issue 14, class 7: two --input-shape for a one-input model was a traceback and exit 1."""
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", "--input-shape", "2,8",
                 "--no-onnx"]) == 2
    first = first_error_line(capsys)
    assert "does not run on the example inputs" in first and "2 positional arguments but 3 were given" in first


def test_too_few_inputs(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path, TWO_INPUT_FILE)}:build", "--input-shape", "2,8", "--no-onnx"]) == 2
    assert "missing 1 required positional argument: 'y'" in first_error_line(capsys)


@pytest.mark.parametrize("text, shape, cause", [
    (CONV_FILE, "1,1,8,8", "expected input[1, 1, 8, 8] to have 3 channels, but got 1 channels instead"),
    (MODEL_FILE, "2,7", "mat1 and mat2 shapes cannot be multiplied (2x7 and 8x64)"),
    (MODEL_FILE, "2,8:int64", "mat1 and mat2 must have the same dtype"),
])
def test_an_input_the_model_does_not_take(tmp_path, capsys, text, shape, cause):
    assert main(["optimize", f"{write(tmp_path, text)}:build", "--input-shape", shape, "--no-onnx"]) == 2
    first = first_error_line(capsys)
    assert "does not run on the example inputs" in first and cause in first


@pytest.mark.parametrize("args, cause", [
    (["--passes", "fold_bn"], "argument --passes: 'fold_bn' is not a pass. Use one of fold_batchnorm, collapse, "
                              "compose, drop_identity, untranspose_linear, fold_norm_affine"),
    (["--input-shape", "2,8:int8"], "argument --input-shape: 'int8' is not a dtype. Use one of float32, float64, "
                                    "float16, bfloat16, int64, int32, bool"),
    (["--input-shape", "2x8"], "argument --input-shape: '2x8' is not a shape."),
    (["--input-shape", "2,0"], "argument --input-shape: '2,0' is not a shape."),
    (["--tau", "-1"], "argument --tau: '-1' is not a number ≥ 0."),
    (["--tolerance", "small"], "argument --tolerance: 'small' is not a number ≥ 0."),
    (["--vocab", "0"], "argument --vocab: '0' is not an integer ≥ 1."),
    (["--opset", "99"], "argument --opset: '99' is not an ONNX opset."),
    (["--capture", "jit"], "argument --capture: invalid choice: 'jit'"),
])
def test_a_bad_option(tmp_path, capsys, args, cause):
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", *args]) == 2
    first = first_error_line(capsys)
    assert first.startswith(f"fxfuse: error: {cause}") and first.endswith("See fxfuse optimize --help.")


def test_no_input_shape(tmp_path, capsys):
    assert main(["optimize", f"{write(tmp_path)}:build"]) == 2
    assert "the following arguments are required: --input-shape" in first_error_line(capsys)


def test_the_first_line_names_the_root_cause(tmp_path, capsys, monkeypatch):
    """An error relayed from deep inside torch whose first line does not quote its cause gets it added."""
    def fail(*args, **kwargs):
        try:
            try:
                raise RuntimeError("the innermost reason\nand its details")
            except RuntimeError as e:
                raise ValueError("step 1/3 failed, see below") from e
        except ValueError as e:
            raise ExportError("ONNX export failed: ValueError: step 1/3 failed, see below.\nFix: something.") from e

    monkeypatch.setattr(fxfuse.cli, "optimize", fail)
    assert main(["optimize", f"{write(tmp_path)}:build", "--input-shape", "2,8", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("fxfuse: error: ONNX export failed: ValueError: step 1/3 failed, see below. "
                                   "(caused by RuntimeError: the innermost reason)")
    assert err.splitlines()[1] == "Fix: something."
