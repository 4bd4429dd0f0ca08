"""The benchmark harness's smoke suite on CPU, so it never rots (figures are not asserted, shapes are)."""
import json

import pytest

pytest.importorskip("timm")

from fxfuse.bench import run  # noqa: E402


def test_smoke_suite_measures_every_variant(tmp_path):
    run("smoke", tmp_path, batches=[1])
    data = json.loads((tmp_path / "smoke.json").read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"original", "fxfuse", "hand"}
    assert rows["fxfuse"]["params"] == rows["hand"]["params"] < rows["original"]["params"]
    assert rows["fxfuse"]["macs"] == rows["hand"]["macs"] < rows["original"]["macs"]
    assert rows["fxfuse"]["onnx_bytes"] < rows["original"]["onnx_bytes"]
    assert all(r["latency_ms"]["cpu/float32/eager/b1"] > 0 and r["latency_ms"]["cpu/float32/onnxruntime/b1"] > 0
               for r in rows.values())
    assert data["meta"]["command"] and "| tiny_vit | fxfuse |" in (tmp_path / "smoke.md").read_text()
