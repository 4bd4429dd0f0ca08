"""fxfuse.tie on a Llama-2-7B-shaped model (random weights, bf16) on a CPU: peak memory against the
model's bytes, and where the time goes.

    PYTHONPATH=. python benchmarks/tie_7b.py --out benchmarks/results/tie_7b

The model is transformers' LlamaForCausalLM with Llama-2-7B's shapes (hidden 4096, FF hidden 11008,
32 layers, 32 heads, vocabulary 32000), built on the meta device, materialised in bf16 and filled
with N(0, 0.02) (norm scales 1): nothing is downloaded. It is tied with
``fxfuse.tie(model, batches, inplace=True, remove=1, select='euclidean')`` — a data-free choice
(scoring by ``evaluate`` would hold the cross sums of every candidate window) — on ``--batches``
random batches of 1×``--tokens`` token ids.

Memory: VmHWM (the kernel's peak resident set of this process) after each phase, and VmRSS
sampled every ``--sample`` seconds by a thread; the ratio is the final VmHWM to the model's bytes
(parameters and buffers). The phases are timed by wrapping fxfuse's own functions (capture,
calibration, scoring, alignment planning with its assignments, checks, merge). The assignment
(``match_permutation``) is also timed alone, first, on an ``--assign``² (11008²) uniform random matrix.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

import fxfuse
from fxfuse.alignment import match_permutation
from fxfuse.module_tie import ModuleTarget

module_tie, tie_module = importlib.import_module("fxfuse.module_tie"), importlib.import_module("fxfuse.tie")  # not fxfuse.tie, the function

GIB = 2 ** 30


def status_gib(key: str) -> float:
    """A /proc/self/status figure (VmHWM, VmRSS) in GiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024 / GIB


class Phases:
    """Seconds per phase and VmHWM at the end of each, with a sampled VmRSS timeline."""

    def __init__(self, every: float):
        self.start, self.phase, self.seconds, self.hwm_after, self.timeline = time.perf_counter(), "start", {}, {}, []
        self.stop = threading.Event()
        threading.Thread(target=self._sample, args=(every,), daemon=True).start()

    def _sample(self, every: float) -> None:
        while not self.stop.wait(every):
            self.timeline.append((round(time.perf_counter() - self.start, 1), round(status_gib("VmRSS"), 3), self.phase))

    def run(self, phase: str, fn, *args, **kwargs):
        outer, self.phase = self.phase, phase
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t
            self.hwm_after[phase] = round(status_gib("VmHWM"), 3)
            self.phase = outer

    def wrap(self, owner, name: str, phase: str) -> None:
        """Time every call of ``owner.name`` (a module function or a class's method) as ``phase``."""
        fn = getattr(owner, name)
        setattr(owner, name, lambda *a, **k: self.run(phase, fn, *a, **k))


def commit() -> str:
    """The git commit of the fxfuse checkout this runs from (+ "-dirty" with uncommitted changes)."""
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True).stdout
    return head.strip() + ("-dirty" if dirty.strip() else "")


def assignment_alone(hidden: int) -> float:
    """Seconds of match_permutation on a hidden×hidden uniform random matrix (negated in place)."""
    matrix = torch.rand(hidden, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    match_permutation(matrix, overwrite=True)
    return time.perf_counter() - t


def llama_7b(layers: int) -> transformers.LlamaForCausalLM:
    """Llama-2-7B's shapes, random bf16 weights, no init pass: built on meta, then filled in place."""
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                      max_position_embeddings=4096, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its inv_freq buffer, as transformers makes it
    return model.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/tie_7b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--assign", type=int, default=11008, help="size of the assignment timed alone")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between VmRSS samples")
    args = parser.parse_args(argv)
    phases = Phases(args.sample)
    load_before = os.getloadavg()
    alone = phases.run(f"assignment alone ({args.assign}x{args.assign} uniform)", assignment_alone, args.assign)
    model = phases.run("model build", llama_7b, args.layers)
    model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 32000, (1, args.tokens), generator=g)} for _ in range(args.batches)]
    for owner, name, phase in [(module_tie, "capture_graph", "capture (torch.export)"),
                               (tie_module, "collect_features", "calibration"),
                               (tie_module, "_weight_score", "scoring (euclidean)"),
                               (tie_module, "plan_window", "plan (correlation, assignment, average)"),
                               (tie_module, "match_permutation", "assignment in the run"),
                               (ModuleTarget, "problem", "checks"),
                               (ModuleTarget, "apply", "merge (load, share, error)")]:
        phases.wrap(owner, name, phase)
    tied = phases.run("fxfuse.tie total", fxfuse.tie, model, batches, inplace=True, remove=1, select="euclidean",
                      capture="export")
    phases.stop.set()
    report = fxfuse.report_of(tied)
    peak = status_gib("VmHWM")
    result = {
        "command": "PYTHONPATH=. python benchmarks/tie_7b.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"LlamaForCausalLM, Llama-2-7B shapes, {args.layers} layers, random weights, bf16",
        "calibration": f"{args.batches} batches of 1x{args.tokens} random token ids",
        "model_bytes": model_bytes, "model_gib": round(model_bytes / GIB, 3),
        "peak_rss_gib": round(peak, 3), "ratio_to_model_bytes": round(peak * GIB / model_bytes, 4),
        "target_ratio": 1.3, "within_target": peak * GIB <= 1.3 * model_bytes,
        "seconds": {k: round(v, 2) for k, v in phases.seconds.items()},
        "vmhwm_gib_after": phases.hwm_after,
        "assignment_alone": {"size": args.assign, "seconds": round(alone, 2)},
        "params_before": report.params_before, "params_after": report.params_after,
        "rows": [{"status": r.status, "where": r.where, "score": r.score, "error": r.error, "reason": r.reason}
                 for r in report.rows if r.status != "scored"],
        "scores": {" ".join(r.where): r.score for r in report.scored},
        "ties": getattr(tied.config, "fxfuse_ties", None),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "fxfuse commit": commit()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()},
        "rss_timeline": phases.timeline,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# fxfuse.tie on {r['model']}", "", f"Command: `{r['command']}`", "",
             f"Calibration: {r['calibration']}; torch {r['versions']['torch']}, transformers "
             f"{r['versions']['transformers']}; {r['machine']['cpus']} CPUs, load average before/after "
             f"{r['machine']['load_average_before']} / {r['machine']['load_average_after']} (a shared machine).", "",
             "| figure | value |", "|---|---|",
             f"| model bytes (parameters + buffers) | {r['model_bytes']:,} ({r['model_gib']} GiB) |",
             f"| peak RSS (VmHWM) | {r['peak_rss_gib']} GiB |",
             f"| ratio to model bytes | {r['ratio_to_model_bytes']} (target ≤ {r['target_ratio']}: "
             f"{'met' if r['within_target'] else 'NOT met'}) |",
             f"| parameters before → after | {r['params_before']:,} → {r['params_after']:,} |",
             f"| assignment alone, {r['assignment_alone']['size']}² uniform random | {r['assignment_alone']['seconds']} s |",
             "",
             "Phases in the order they ended; capture … merge are parts of `fxfuse.tie total`, the assignment in "
             "the run is part of plan (the rest of plan: Eq. 1 and the average). Capture is torch.export alone "
             "(fxfuse.tie skips the model's own eager call). The RSS timeline is in the JSON.", "",
             "| phase | seconds | VmHWM after (GiB) |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {r['vmhwm_gib_after'].get(k, '')} |" for k, v in r["seconds"].items()]
    lines += ["", "Rows:", ""] + [f"- {row['status']} {row['where']}: {row['reason']} (error {row['error']})"
                                  for row in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:  # the table again from a result file: --markdown benchmarks/results/tie_7b.json
        Path(sys.argv[2]).with_suffix(".md").write_text(markdown(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
