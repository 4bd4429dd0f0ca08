"""Differential fuzzing: random graphs optimized with and without inputs compute what they did.

A failure names its seed; replay it with ``python -c "import fuzzing; fuzzing.check(SEED)"`` from
tests/. ``benchmarks/fuzz.py`` runs the same check over tens of thousands of seeds.
"""
import pytest
from fuzzing import check, random_program

SEEDS = range(300)


@pytest.mark.parametrize("block", range(0, len(SEEDS), 50))
def test_random_graphs_keep_their_function(block):
    outcomes = [check(seed) for seed in SEEDS[block:block + 50]]
    assert sum(o.applied for o in outcomes) > 0  # the fuzzer exercises the passes, not only misses


def test_generator_covers_what_the_passes_match():
    kinds = set()
    for seed in range(200):
        model, _, _ = random_program(seed)
        kinds |= {type(m).__name__ for m in model.modules()} | {step[0] for step in model.steps}
    assert {"Linear", "PReLU", "BatchNorm1d", "BatchNorm2d", "Conv1d", "Conv2d", "Dropout", "Identity", "LayerNorm",
            "flinear", "add", "attention", "flatten", "fold", "fdropout"} <= kinds
