"""Where optimize's time goes on a big model: wall time, peak memory and the top functions.

    python benchmarks/optimize_cost.py --out benchmarks/results/optimize_cost_vgg11_bn.json

torchvision's VGG11-BN (133 M parameters, random weights, randomized BatchNorm statistics) with a
PReLU(1) classifier head (what LayerCollapse training leaves), optimized with an example batch of 2
at 224², one thread unless ``--threads``. Peak memory is the process's max RSS (``resource.getrusage``), which includes
the model and its deep copy.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse.models import randomize_batchnorm


def vgg11_bn_prelu_head() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn()
    for i, layer in enumerate(model.classifier):
        if isinstance(layer, nn.ReLU):
            model.classifier[i] = nn.PReLU(init=1.0)
    return randomize_batchnorm(model).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default="auto", choices=["auto", "export", "fx"])
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this VM has 2 cores)")
    parser.add_argument("--out", default="benchmarks/results/optimize_cost_vgg11_bn.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x = vgg11_bn_prelu_head(), torch.randn(2, 3, 224, 224)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    gm = fxfuse.optimize(model, (x,), capture=args.capture)
    profile.disable()
    seconds = time.perf_counter() - start
    report = fxfuse.report_of(gm)
    stats = pstats.Stats(profile).sort_stats("cumulative")
    top = sorted(((f"{Path(f).name}:{line}({name})", round(v[3], 2)) for (f, line, name), v in stats.stats.items()
                  if "fxfuse" in f or "passes" in f), key=lambda t: -t[1])[:args.top]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": "python " + " ".join(sys.argv), "model": "vgg11_bn, PReLU(1) head", "seconds": round(seconds, 2),
              "capture_seconds": round(report.capture_seconds, 2), "peak_rss_mb": resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss // 1024, "params": [report.params_before, report.params_after],
              "applied": len(report.applied), "top_cumulative_seconds": top, "commit": commit,
              "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    print(f"optimize vgg11_bn: {seconds:.1f} s (capture {report.capture_seconds:.1f} s), peak RSS "
          f"{result['peak_rss_mb']} MB, {report.params_before:,} → {report.params_after:,} parameters, "
          f"{len(report.applied)} rewrites")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
