"""benchmarks/tie_text.py end to end at a tiny size (2 seeds, 4 layers, half the FFs removed, every
variant), so the benchmark's code path cannot rot: the compressed models are checked against the model
they came from (which modules are one object, before and after the Trainer's fine-tune; how many
parameters are gone), the splits against each other, and the summary against the per-seed rows.
One ratio keeps it fast: each fxfuse.tie call captures GPT-2 with torch.export (seconds each)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import tie_text  # noqa: E402

TINY = tie_text.Settings(seeds=(0, 1), removes=(2,), n_layer=4, n_embd=16, n_head=2, context=16, batch=2,
                         train_steps=4, tune_steps=2, calibration_batches=2, selection_batches=2,
                         validation_batches=2, max_files=120, log_every=1)


@pytest.fixture(autouse=True)
def each_capture():
    """Overrides conftest's (export, fx) parametrization: fxfuse.tie on a transformers model captures by export."""
    return "export"


@pytest.fixture(scope="module")
def result():
    return tie_text.run(TINY, log=lambda message: None)


def ff_numel(settings):
    """Parameters of one GPT-2 FF (c_fc and c_proj, weights and biases), from the config alone."""
    d, hidden = settings.n_embd, 4 * settings.n_embd
    return d * hidden + hidden + hidden * d + d


def test_splits_are_disjoint_deterministic_and_cover_every_file():
    root = Path(tie_text.sysconfig.get_paths()["stdlib"])
    files = tie_text.stdlib_files(root)
    assert files == sorted(files) and not any("site-packages" in p.parts for p in files)
    names = [p.relative_to(root).as_posix() for p in files]
    splits = [tie_text.split_of(n) for n in names]
    assert splits == [tie_text.split_of(n) for n in names]
    counts = {s: splits.count(s) for s in tie_text.SPLITS}
    assert sum(counts.values()) == len(files)
    assert 0.02 < counts["validation"] / len(files) < 0.09 and 0.02 < counts["selection"] / len(files) < 0.09


def test_every_seed_ratio_and_variant_is_reported(result):
    json.dumps(result)  # what main() writes
    assert [r["seed"] for r in result["seeds"]] == list(TINY.seeds)
    for r in result["seeds"]:
        assert set(r["ratios"]) == {"2"}
        for remove, ratio in r["ratios"].items():
            assert set(ratio["variants"]) == set(tie_text.VARIANTS)
            for row in ratio["variants"].values():
                assert math.isfinite(row["val_loss"]) and math.isfinite(row["val_loss_after"])
                assert row["tune"]["steps"] == TINY.tune_steps
    assert set(result["summary"]) == {"original", "2"}
    assert "Verdict" in tie_text.markdown({**result, "command": "test"})


def test_compressed_models_remove_exactly_the_ffs_asked(result):
    """Merging remove + 1 FFs into one shared module and dropping remove FFs both take remove FFs'
    parameters out of the count; the merged window is one module object, and the lowest-scored one."""
    for r in result["seeds"]:
        original = r["original"]["params"]
        for remove, ratio in r["ratios"].items():
            k = int(remove)
            rows = ratio["variants"]
            for variant in ("permute", "vanilla"):
                row = rows[variant]
                assert row["params"] == original - k * ff_numel(TINY)
                assert row["checkpoint_bytes"] < r["original"]["checkpoint_bytes"]
                assert len(row["layers"]) == k + 1
                assert row["shared_groups"] == row["shared_groups_after"] == [row["layers"]]
                assert 0 < row["merge_error"] < math.inf  # different FFs averaged: not exact
                assert len(row["selection_scores"]) == TINY.n_layer - k  # every window of k + 1 adjacent FFs
                best = min(row["selection_scores"], key=row["selection_scores"].get)
                assert best == tie_text._paths(row["layers"])
            drop = rows["drop"]
            assert len(drop["layers"]) == k and drop["shared_groups"] == drop["shared_groups_after"] == []
            assert drop["params"] == original - k * ff_numel(TINY)
            assert len(drop["selection_scores"]) == TINY.n_layer - k + 1


def test_summary_is_the_spread_of_the_seeds(result):
    for remove in ("2",):
        for variant in tie_text.VARIANTS:
            for when, key in (("before", "val_loss"), ("after", "val_loss_after")):
                values = [r["ratios"][remove]["variants"][variant][key] for r in result["seeds"]]
                d = result["summary"][remove][variant][when]
                assert d["mean"] == pytest.approx(sum(values) / len(values))
                assert d["min"] == min(values) and d["max"] == max(values)
                assert d["std"] == pytest.approx(torch.tensor(values, dtype=torch.float64).std().item())
        v = result["verdict"][remove]["before"]
        p = [r["ratios"][remove]["variants"]["permute"]["val_loss"] for r in result["seeds"]]
        q = [r["ratios"][remove]["variants"]["vanilla"]["val_loss"] for r in result["seeds"]]
        assert v["seeds_won"] == sum(a < b for a, b in zip(p, q))
