"""Cost of ``fxfuse.optimize`` itself as the graph grows: wall time and peak memory; writes JSON.

    python benchmarks/optimize_time.py --vit-blocks 8 32 128 512 --gpt2-layers 12 24 48 96 \
        --captures export fx --out benchmarks/results/optimize_time_cpu.json

Two families, random weights, MLP activations PReLU(α=1) so every block's MLP is collapsed and
verified: stacks of timm ViT blocks (embed 192, 3 heads, 64×64 images) and GPT-2-style decoders
written here in plain PyTorch (d 768, 12 heads, 64 tokens; GPT-2 small is 12 layers). Each size
runs in a fresh process, so its peak RSS is its own: reported as the growth over the RSS after the
model was built (what optimize added), with the default deep copy and with ``inplace=True``, for
each capture (torch.export, symbolic_trace; one-off start-up costs are paid on a tiny model first, and
``capture_seconds`` is the part spent capturing). ``ms_per_node`` divides by the model's symbolic_trace
node count on both captures, so the two are per the same unit of model size; ``cpu_ms_per_node``
uses the process's CPU time (one torch thread), which other work on the machine does not inflate.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.PReLU(init=1.0), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, layers: int, d: int = 768, heads: int = 12, vocab: int = 50257, context: int = 1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(GPT2Block(d, heads) for _ in range(layers)))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("positions", torch.arange(64))

    def forward(self, tokens):
        return self.lm_head(self.ln_f(self.blocks(self.wte(tokens) + self.wpe(self.positions))))


def build(family: str, size: int):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2(size).eval(), (torch.randint(0, 50257, (1, 64)),)
    import timm

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=192, depth=size, num_heads=3, act_layer=lambda: nn.PReLU(init=1.0))
    return vit.eval(), (torch.randn(2, 3, 64, 64),)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(family: str, size: int, inplace: bool, capture: str, queue) -> None:
    import fxfuse

    model, inputs = build(family, size)
    # one-off start-up costs (imports, torch.export's dynamo set-up) are not optimize's per-node cost
    fxfuse.optimize(nn.Sequential(nn.Linear(2, 2)).eval(), (torch.randn(2, 2),), capture=capture)
    before = rss_mib()
    start, cpu_start = time.perf_counter(), time.process_time()
    gm = fxfuse.optimize(model, inputs, inplace=inplace, capture=capture)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = fxfuse.report_of(gm)
    queue.put({"family": family, "size": size, "inplace": inplace, "capture": capture, "graph_nodes": len(gm.graph.nodes),
               "traced_nodes": len(torch.fx.symbolic_trace(model).graph.nodes), "seconds": round(seconds, 3),
               "cpu_seconds": round(cpu_seconds, 3),
               "ms_per_node": None, "capture_seconds": round(report.capture_seconds, 3), "peak_growth_mib": round(peak - before, 1), "model_mib": round(
                   sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
               "rewrites": len(report.applied), "params_before": report.params_before,
               "params_after": report.params_after, "max_rel_error": report.error})


def run_isolated(family: str, size: int, inplace: bool, capture: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=measure, args=(family, size, inplace, capture, queue))
    p.start()
    row = queue.get()
    p.join()
    row["ms_per_node"] = round(1000 * row["seconds"] / row["traced_nodes"], 3)
    row["cpu_ms_per_node"] = round(1000 * row["cpu_seconds"] / row["traced_nodes"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-blocks", type=int, nargs="*", default=[8, 32, 128, 512])
    parser.add_argument("--gpt2-layers", type=int, nargs="*", default=[12, 24, 48, 96])
    parser.add_argument("--captures", nargs="*", default=["export", "fx"], choices=["export", "fx"])
    parser.add_argument("--modes", nargs="*", default=["copy", "inplace"], choices=["copy", "inplace"])
    parser.add_argument("--out", default="benchmarks/results/optimize_time_cpu.json")
    args = parser.parse_args()
    rows = []
    result = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "results": rows}
    for capture in args.captures:
        for family, sizes in (("vit", args.vit_blocks), ("gpt2", args.gpt2_layers)):
            for size, mode in ((size, mode) for size in sizes for mode in args.modes):
                r = run_isolated(family, size, mode == "inplace", capture)
                rows.append(r)
                with open(args.out, "w") as f:  # after every row, so an interrupted run keeps what it measured
                    json.dump(result, f, indent=2)
                print(f"{capture:>6} {family:>4} {size:>4}  {mode:<7} {r['traced_nodes']:>6} nodes  "
                      f"{r['seconds']:>7.2f} s  {r['ms_per_node']:.2f} ms/node  CPU {r['cpu_ms_per_node']:.2f} ms/node  peak +{r['peak_growth_mib']:,.0f} MiB "
                      f"(weights {r['model_mib']:,.0f} MiB)  {r['rewrites']} rewrites  error {r['max_rel_error']:.1e}",
                      flush=True)


if __name__ == "__main__":
    main()
