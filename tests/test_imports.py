"""``import fxfuse`` stays light: the heavy optional-use libraries load only when used (issue 13).

Each check runs in a fresh interpreter, since pytest and other tests may have imported them already.
"""
import io
import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "onnx", "scipy", "networkx", "matplotlib", "onnxscript")


@pytest.fixture(autouse=True)
def each_capture():
    """Nothing here captures a model: run once, not once per capture as conftest's fixture would."""


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_import_fxfuse_loads_no_heavy_library():
    code = f"import fxfuse, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_help_exits_0():
    result = python("-m", "fxfuse.cli", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("quiet, tty, shown", [("", True, True), ("1", True, False), ("", False, False)])
def test_progress_bars_only_on_a_terminal_and_not_quiet(monkeypatch, quiet, tty, shown):
    from fxfuse import progress

    monkeypatch.setenv("FXFUSE_QUIET", quiet)
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert progress.enabled() is shown
    assert list(progress.progress(range(3), desc="test")) == [0, 1, 2]
    assert ("test: 100%" in stderr.getvalue()) is shown


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
