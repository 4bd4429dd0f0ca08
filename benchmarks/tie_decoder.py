"""Tie on a small decoder-only transformer trained here: validation loss before and after a short
recovery fine-tune, permute-merge vs vanilla merge vs layer-drop, with parameter counts.

    python benchmarks/tie_decoder.py --out benchmarks/results/tie_decoder

Text: Python's own documentation topics (``pydoc_data.topics``, shipped with CPython; nothing is
downloaded), character level, 90 % train / 10 % validation. The model (``fxfuse.models.TinyDecoder``,
6 blocks, GELU FFs) is trained from scratch, then 1/3 of its FF sublayers are removed: merging a
window of 3 adjacent FFs into one shared FF (permute or vanilla), or dropping 2 FFs (layer-drop
baseline, same number of parameters removed). Windows are chosen by validation loss on a held-out
selection split (Sec. 3.4), features come from training batches. Every variant — and the
unmerged model, as a control — then gets the same recovery fine-tune.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fxfuse
from fxfuse.models import TinyDecoder
from text_windows import checkpoint_bytes, windows  # benchmarks/, on sys.path when this script runs


def corpus() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def encode(text: str) -> tuple[torch.Tensor, int]:
    chars = sorted(set(text))
    table = {c: i for i, c in enumerate(chars)}
    return torch.tensor([table[c] for c in text], dtype=torch.long), len(chars)


def batches(data: torch.Tensor, count: int, batch: int, context: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` random windows of context + 1 characters."""
    return list(windows(data, count * batch, context + 1, seed).view(count, batch, context + 1))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def evaluate(model: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(lm_loss(model, b).item() for b in data) / len(data)


def train(model: nn.Module, data: list[torch.Tensor], steps: int, lr: float) -> list[float]:
    return fxfuse.finetune(model, data, lm_loss, steps=steps, lr=lr, progress=sys.stderr.isatty())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--tune-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/tie_decoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    ids, vocab = encode(corpus())
    cut = int(0.9 * len(ids))
    train_ids, val_ids = ids[:cut], ids[cut:]
    train_data = batches(train_ids, args.train_steps, args.batch, args.context, seed=0)
    select_data = batches(val_ids, 8, args.batch, args.context, seed=1)  # picks windows
    val_data = batches(val_ids, 32, args.batch, args.context, seed=2)  # reported
    calibration = [b[:, :-1] for b in batches(train_ids, 8, args.batch, args.context, seed=3)]
    tune_data = batches(train_ids, args.tune_steps, args.batch, args.context, seed=4)

    torch.manual_seed(0)
    model = TinyDecoder(vocab=vocab, dim=128, layers=6, heads=4, hidden=512, context=args.context, act="gelu")
    train_losses = train(model, train_data, args.train_steps, lr=2e-3)
    model.eval()
    example = (calibration[0],)
    variants = {
        "original": None,
        "permute (tie)": fxfuse.Tie(remove=2, calibration=calibration, evaluate=lambda m: evaluate(m, select_data)),
        "vanilla (tie, no alignment)": fxfuse.Tie(remove=2, align="vanilla", calibration=calibration,
                                                  evaluate=lambda m: evaluate(m, select_data)),
        "layer-drop (2 FFs)": fxfuse.Tie(remove=2, fuse="drop", calibration=calibration,
                                         evaluate=lambda m: evaluate(m, select_data)),
    }
    rows = []
    for name, tie in variants.items():
        gm = fxfuse.optimize(model, example, tie=tie) if tie else fxfuse.optimize(model, example)
        report = fxfuse.report_of(gm)
        merged = [r.where for r in report.applied if r.pass_name == "tie"]
        before = evaluate(gm, val_data)
        tuned = copy.deepcopy(gm)
        train(tuned, tune_data, args.tune_steps, lr=5e-4)
        rows.append(dict(variant=name, merged=merged, params=sum(p.numel() for p in gm.parameters()),
                         checkpoint_bytes=checkpoint_bytes(gm), val_loss_before_tuning=before,
                         val_loss_after_tuning=evaluate(tuned, val_data),
                         windows={", ".join(r.where): r.score for r in report.scored}))
        print(f"{name:<30} params {rows[-1]['params']:>9,}  val loss {before:.4f} → "
              f"{rows[-1]['val_loss_after_tuning']:.4f}  merged {merged}", flush=True)

    matrix, names = fxfuse.feedforward_cka(model, calibration[:4])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fxfuse.save_heatmap(matrix, names, out.with_name(out.name + "_cka.png"),
                        "CKA between FF outputs (trained TinyDecoder)")
    command = "python " + " ".join(sys.argv)
    result = dict(command=command, torch=torch.__version__, python=platform.python_version(),
                  machine=platform.machine(),
                  threads=args.threads, corpus="pydoc_data.topics (CPython)", chars=len(ids), vocab=vocab,
                  train_steps=args.train_steps, tune_steps=args.tune_steps, batch=args.batch, context=args.context,
                  final_train_loss=sum(train_losses[-50:]) / 50, rows=rows, cka=matrix.tolist(), ff_names=names,
                  seconds=time.perf_counter() - start)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}` (torch {result['torch']}, {result['threads']} CPU thread(s), "
             f"{result['seconds']:.0f} s)", "",
             f"TinyDecoder (6 blocks, dim 128, FF 512, GELU) trained {result['train_steps']} steps on "
             f"{result['corpus']}, {result['chars']:,} characters; validation loss (nats/char) on "
             f"32×{result['batch']} held-out windows; recovery fine-tune {result['tune_steps']} steps.", "",
             "| variant | FFs merged / dropped | parameters | checkpoint bytes "
             "| val loss before tuning | after tuning |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        merged = "; ".join(", ".join(w) for w in r["merged"]) or "—"
        lines.append(f"| {r['variant']} | {merged} | {r['params']:,} | {r['checkpoint_bytes']:,} | "
                     f"{r['val_loss_before_tuning']:.4f} | {r['val_loss_after_tuning']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
