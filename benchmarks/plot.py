"""Plot latency ratio (compressed ÷ original) against MAC ratio, the floor, from bench JSON files.

    python benchmarks/plot.py benchmarks/results/gpu_h100.json --out benchmarks/results/gpu_h100.png

One point per model, variant (fxfuse, hand) and timing key; the diagonal is where latency falls as
much as the arithmetic does. Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(data: dict, variant: str):
    originals = {r["model"]: r for r in data["results"] if r["variant"] == "original"}
    for r in data["results"]:
        o = originals.get(r["model"])
        if r["variant"] != variant or o is None or not r["macs"]:
            continue
        for key, ms in r["latency_ms"].items():
            if o["latency_ms"].get(key):
                yield r["model"], key, r["macs"] / o["macs"], ms / o["latency_ms"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 6))
    for path in args.results:
        data = json.load(open(path))
        for variant, marker in (("fxfuse", "o"), ("hand", "x")):
            pts = list(points(data, variant))
            for model in sorted({p[0] for p in pts}):
                xs = [p[2] for p in pts if p[0] == model]
                ys = [p[3] for p in pts if p[0] == model]
                ax.scatter(xs, ys, marker=marker, label=f"{model} ({variant})", alpha=0.7)
    ax.plot([0, 1.1], [0, 1.1], "k--", lw=1, label="latency ratio = MAC ratio")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="MAC ratio (compressed ÷ original)", ylabel="latency ratio (compressed ÷ original)",
           xlim=(0, 1.1), ylim=(0, 1.3), title=data["meta"]["device"])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
