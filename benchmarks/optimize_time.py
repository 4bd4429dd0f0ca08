"""Time ``fxfuse.optimize`` itself on transformer graphs of growing depth; write JSON.

    python benchmarks/optimize_time.py --blocks 8 48 --out benchmarks/results/optimize_time_cpu.json

Each model is a timm VisionTransformer (embed 192, 3 heads, 64×64 images, random weights) whose MLP
activation is PReLU(1), so every block's MLP is collapsed and verified. Reported: wall time of
``optimize`` (median of --repeat runs), graph nodes, seconds per node, rewrites applied.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import timm
import torch
from torch import nn

import fxfuse


def transformer(blocks: int) -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=blocks, num_heads=3,
        act_layer=lambda: nn.PReLU(init=1.0)).eval()


def measure(blocks: int, repeat: int) -> dict:
    torch.manual_seed(0)
    model, inputs = transformer(blocks), (torch.randn(2, 3, 64, 64),)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        gm = fxfuse.optimize(model, inputs)
        times.append(time.perf_counter() - start)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    report = fxfuse.report_of(gm)
    seconds = statistics.median(times)
    return {"blocks": blocks, "graph_nodes": nodes, "seconds": round(seconds, 3),
            "ms_per_node": round(1000 * seconds / nodes, 3), "rewrites": len(report.applied),
            "params_before": report.params_before, "params_after": report.params_after,
            "max_rel_error": report.error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 48])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/optimize_time_cpu.json")
    args = parser.parse_args()
    rows = [measure(b, args.repeat) for b in args.blocks]
    for r in rows:
        print(f"{r['blocks']:>4} blocks  {r['graph_nodes']:>6} nodes  {r['seconds']:>7.2f} s  "
              f"{r['ms_per_node']:.2f} ms/node  {r['rewrites']} rewrites  error {r['max_rel_error']:.1e}")
    result = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "results": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
