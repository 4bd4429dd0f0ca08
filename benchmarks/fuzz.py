"""Run the differential fuzzer (tests/fuzzing.py) over many seeds in parallel; write JSON.

    python benchmarks/fuzz.py --graphs 20000 --workers 2 --capture export --out benchmarks/results/fuzz_export.json

Every graph is optimized with and without example inputs and compared with the original on fresh
inputs (another batch size and rank too). A refusal counts as one only with a reason the program
has (``fuzzing.refusal_reasons``: hooks on the model, a buffer update symbolic_trace cannot record,
in-place updates, NaN/Inf example inputs); a wrong result, a crash or another refusal is a failure,
recorded with its seed; replay it with ``fuzzing.check(seed)``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from fuzzing import check  # noqa: E402


def run_chunk(job: tuple[range, str]) -> dict:
    """``check`` every seed; ``capture``: "export" (optimize's default, torch.export first) or "fx"."""
    seeds, capture = job
    torch.set_num_threads(1)
    if capture == "fx":
        import fxfuse.capture
        fxfuse.capture.AUTO_ORDER = ("fx",)
    applied = skipped = refused = 0
    failures = []
    for seed in seeds:
        try:
            outcome = check(seed)
            applied, skipped, refused = applied + outcome.applied, skipped + outcome.skipped, refused + outcome.refused
        except Exception as e:  # a wrong rewrite (AssertionError) or a crash: both are failures
            failures.append({"seed": seed, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
    return {"graphs": len(seeds), "applied": applied, "skipped": skipped, "refused": refused, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=20000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--capture", choices=("export", "fx"), default="export",
                        help="how graphs with example inputs are captured (data-free ones always by fx)")
    parser.add_argument("--out", default="benchmarks/results/fuzz.json")
    args = parser.parse_args()
    step = 100
    chunks = [range(s, min(s + step, args.start + args.graphs)) for s in range(args.start, args.start + args.graphs, step)]
    start = time.perf_counter()
    parts = []
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(run_chunk, [(c, args.capture) for c in chunks]):
            parts.append(part)
            done = sum(p["graphs"] for p in parts)
            print(f"{done} graphs, {sum(len(p['failures']) for p in parts)} failures, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    total = {k: sum(p[k] for p in parts) for k in ("graphs", "applied", "skipped", "refused")}
    failures = [f for p in parts for f in p["failures"]]
    result = {"command": "python " + " ".join(sys.argv), "seeds": [args.start, args.start + args.graphs],
              **total, "wrong_or_crashed": len(failures), "failures": failures[:50],
              "capture": args.capture, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
              "python": platform.python_version(), "cpus": os.cpu_count()}
    print(f"{total['graphs']} graphs, {total['applied']} rewrites applied, {total['skipped']} candidates skipped, "
          f"{total['refused']} optimize calls refused with the program's reason, {len(failures)} wrong or crashed, "
          f"{result['seconds']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
