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
    found = [(variant, p) for path in args.results for variant in ("fxfuse", "hand")
             for p in points(json.load(open(path)), variant)]
    models = sorted({p[0] for _, p in found})
    colors = dict(zip(models, plt.cm.tab10.colors))
    for model in models:
        for variant, marker in (("fxfuse", "o"), ("hand", "x")):
            pts = [p for v, p in found if v == variant and p[0] == model]
            ax.scatter([p[2] for p in pts], [p[3] for p in pts], marker=marker, color=colors[model],
                       label=f"{model} ({variant})", alpha=0.7)
    data = json.load(open(args.results[0]))
    ax.plot([0, 1.1], [0, 1.1], "k--", lw=1, label="latency ratio = MAC ratio")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="MAC ratio (compressed ÷ original)", ylabel="latency ratio (compressed ÷ original)",
           xlim=(0, 1.1), ylim=(0, max([1.3] + [1.05 * p[3] for _, p in found])), title=data["meta"]["device"])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
