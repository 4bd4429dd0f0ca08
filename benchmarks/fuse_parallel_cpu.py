"""Horizontal fusion on CPU: a Llama-style decoder exported with and without ``fuse_parallel``,
timed in onnxruntime (one thread, the two files alternated), median and interquartile range.

    python benchmarks/fuse_parallel_cpu.py --out benchmarks/results/fuse_parallel_cpu.json

transformers' LlamaForCausalLM from a config (random weights, 4 layers, 8 heads, SwiGLU), for each
(hidden, intermediate, tokens, batch) case: q/k/v become one GEMM and gate/up another.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

import fxfuse
from fxfuse.passes import DEFAULT_PASSES, WITH_FUSION

VOCAB = 1000
CASES = [(256, 688, 1, 1), (256, 688, 16, 1), (256, 688, 16, 8), (1024, 2752, 1, 1), (1024, 2752, 16, 8)]


def decoder(hidden: int, intermediate: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB, use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def alternated(sessions: dict, feed: dict, repeats: int) -> dict:
    """Median and [q1, q3] ms of each session, every repeat running each once in turn, after warm-up."""
    times = {name: [] for name in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": round(statistics.median(t), 4),
                   "iqr_ms": [round(q, 4) for q in statistics.quantiles(t, n=4)[::2]]} for name, t in times.items()}


def run_case(hidden: int, intermediate: int, tokens: int, batch: int, repeats: int, tmp: Path) -> dict:
    model = decoder(hidden, intermediate)
    example = {"input_ids": torch.randint(0, VOCAB, (2, max(tokens, 2)))}
    sessions, nodes = {}, {}
    for name, passes in (("default", DEFAULT_PASSES), ("fuse_parallel", WITH_FUSION)):
        gm = fxfuse.optimize(model, example, passes=passes)
        path = tmp / f"{name}_{hidden}.onnx"
        nodes[name] = fxfuse.export_onnx(gm, example, path).model.nodes
        sessions[name] = session(path)
    feed = {"input_ids": np.random.default_rng(0).integers(0, VOCAB, (batch, tokens), dtype=np.int64)}
    return {"hidden": hidden, "intermediate": intermediate, "tokens": tokens, "batch": batch, "onnx_nodes": nodes,
            "latency": alternated(sessions, feed, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/fuse_parallel_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_case(*case, args.repeats, Path(tmp)) for case in CASES]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": "python " + " ".join(sys.argv), "commit": commit, "cpu": platform.processor() or
              platform.machine(), "torch": torch.__version__, "onnxruntime": ort.__version__,
              "transformers": transformers.__version__, "threads": 1, "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        d, f = r["latency"]["default"], r["latency"]["fuse_parallel"]
        print(f"hidden {r['hidden']}, {r['tokens']} tokens, batch {r['batch']}: nodes {r['onnx_nodes']}, "
              f"default {d['median_ms']:.3f} {d['iqr_ms']} ms, fuse_parallel {f['median_ms']:.3f} {f['iqr_ms']} ms")


if __name__ == "__main__":
    main()
