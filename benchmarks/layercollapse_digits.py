"""LayerCollapse end to end on scikit-learn's bundled digits (8×8, 10 classes; nothing downloaded).

    python benchmarks/layercollapse_digits.py --model mixer     (and --model vgg)

1. Train a small MLP-Mixer (GELU MLPs) from scratch: the original model and the teacher.
2. ``prepare_collapse`` the last block's token- and channel-MLP (GELU → ReLU → PReLU α = 0; or the
   last ``--fraction`` of all pairs),
   ``finetune_collapse`` (Eq. 21 with AdamLC, one pair at a time from the last), then
   ``optimize(tau=max|1 − α|)`` collapses both pairs; no tuning after the collapse.
   ``--model vgg``: a VGG-style net (conv features, VGG's Linear-ReLU-Dropout classifier), all pairs.
3. Baselines of the same target architecture (the collapsed graph) at equal epochs (paper Table 5):
   knowledge distillation from scratch, and KD starting from a one-shot collapse of the original
   (every activation of the two pairs simply deleted).

Writes ``<out>.json`` and ``<out>.md`` with the command, the environment and every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time

import sklearn
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxfuse
from fxfuse.verify import propagate_shapes
from fxfuse.report import count_macs, count_params


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), Mlp(tokens, token_hidden)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), Mlp(dim, channel_hidden)

    def forward(self, x):  # (batch, tokens, dim)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer for 1×8×8 images: 2×2 patches (16 tokens), ``depth`` blocks, mean-pooled head."""

    def __init__(self, depth: int = 6, dim: int = 64, token_hidden: int = 64, channel_hidden: int = 256):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 2, stride=2)
        self.blocks = nn.Sequential(*[MixerBlock(16, dim, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def vgg() -> nn.Module:
    """VGG-style for 1×8×8: two conv-BN-ReLU, max-pool, and VGG's classifier (Linear-ReLU-Dropout ×2, Linear)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(1024, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 10))


MODELS = {"mixer": Mixer, "vgg": vgg}


def digits(seed: int):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, stratify=data.target, random_state=seed)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return round(100.0 * (model(x).argmax(-1) == y).float().mean().item(), 2)


def train(model: nn.Module, loader, epochs: int, lr: float, teacher: nn.Module | None = None) -> nn.Module:
    """Adam, cosine-free constant lr; cross-entropy, or Eq. 21 without L_reg when a teacher is given (KD)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            logits = model(x)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    target = teacher(x)
                loss = fxfuse.self_distillation_loss(logits, y, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def size(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    propagate_shapes(gm, (example[:1],))
    return count_params(gm), count_macs(gm)


def reinit(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    student = copy.deepcopy(gm)
    for m in student.modules():
        if hasattr(m, "reset_parameters") and m is not student:
            m.reset_parameters()
    return student


def run(args, seed: int) -> dict:
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = digits(seed)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch, shuffle=True)
    example = xtr[:256]
    rows, t0 = {}, time.perf_counter()

    teacher = train(MODELS[args.model](), loader, args.train_epochs, args.lr)
    rows[f"original ({args.model})"] = (*size(teacher, example), accuracy(teacher, xte, yte), args.train_epochs)
    which = args.fraction or "all"
    if args.model == "mixer" and not args.fraction:  # the last block's token- and channel-MLP
        which = [f"blocks.{len(teacher.blocks) - 1}.token_mlp.fc1", f"blocks.{len(teacher.blocks) - 1}.channel_mlp.fc1"]

    prepared = fxfuse.prepare_collapse(teacher, example, which=which)
    rows["prepared: act → PReLU(α=0), no tuning"] = (*size(prepared, example), accuracy(prepared, xte, yte), 0)
    t1 = time.perf_counter()
    history = fxfuse.finetune_collapse(prepared, teacher, loader, epochs=args.lc_epochs, lr=args.lc_lr, lc=args.lc,
                                       callback=lambda e, gm: {"test_acc": accuracy(gm, xte, yte)},
                                       progress=not args.quiet)
    lc_seconds, lc_epochs = time.perf_counter() - t1, len(history)
    passed = [p for p in fxfuse.collapse_pairs(prepared) if p.slope in history[-1]["done"]]
    tau = fxfuse.max_slope_deviation(prepared, passed)  # collapse the pairs that passed the schedule
    rows["LayerCollapse fine-tuned, before collapse"] = (*size(prepared, example), accuracy(prepared, xte, yte),
                                                         lc_epochs)
    collapsed = fxfuse.optimize(prepared, example, tau=tau)
    report = fxfuse.report_of(collapsed)
    rows["LayerCollapse, collapsed (no further tuning)"] = (*size(collapsed, example),
                                                            accuracy(collapsed, xte, yte), lc_epochs)

    one_shot = fxfuse.prepare_collapse(teacher, example, which=which)
    with torch.no_grad():  # the same pairs as the LayerCollapse result, activations deleted
        for a in fxfuse.slopes(one_shot, [p for p in fxfuse.collapse_pairs(one_shot) if p.slope in history[-1]["done"]]):
            a.fill_(1.0)
    one_shot = fxfuse.optimize(one_shot, example)
    rows["one-shot collapse of the original (activations deleted)"] = (*size(one_shot, example),
                                                                       accuracy(one_shot, xte, yte), 0)
    t2 = time.perf_counter()
    kd = train(reinit(collapsed), loader, lc_epochs, args.lr, teacher=teacher)
    kd_seconds = time.perf_counter() - t2
    rows["KD from scratch, same target, equal epochs"] = (*size(kd, example), accuracy(kd, xte, yte), lc_epochs)
    kd_init = train(one_shot, loader, lc_epochs, args.lc_lr, teacher=teacher)
    rows["KD from the one-shot collapse, equal epochs"] = (*size(kd_init, example), accuracy(kd_init, xte, yte),
                                                           lc_epochs)
    return {
        "rows": [dict(model=k, params=p, macs=m, test_accuracy=a, epochs=e) for k, (p, m, a, e) in rows.items()],
        "collapses": [dict(where=r.where, params_before=r.params_before, params_after=r.params_after, error=r.error,
                           bound_eq4=r.bound_eq4, bound_proven=r.bound_proven)
                      for r in report.applied if r.pass_name == "collapse"],
        "tau": tau, "end_to_end_error": report.error, "history": history,
        "seconds": {"total": round(time.perf_counter() - t0, 1), "lc_finetune": round(lc_seconds, 1),
                    "kd_scratch": round(kd_seconds, 1)},
        "train": {"n_train": len(ytr), "n_test": len(yte)}, "seed": seed,
    }


def markdown(result: dict) -> str:
    runs = result["runs"]
    base = runs[0]["rows"][0]
    lines = [f"`{result['command']}` — torch {result['torch']}, scikit-learn {result['sklearn']}, "
             f"{result['cpus']} CPU cores ({result['torch_threads']} torch thread), commit {result['commit']}, "
             f"{sum(r['seconds']['total'] for r in runs):.0f} s; digits, test sets of {runs[0]['train']['n_test']} "
             f"images (one image = {100 / runs[0]['train']['n_test']:.2f} points), seeds {result['args']['seeds']}",
             "", "| model | params | MACs | test acc. (%), mean | per seed | epochs per seed |",
             "|---|---:|---:|---:|---|---|"]
    for i, r in enumerate(runs[0]["rows"]):
        accs = [run["rows"][i]["test_accuracy"] for run in runs]
        sizes = []
        for key in ("params", "macs"):
            values = sorted({run["rows"][i][key] for run in runs})  # differ when seeds pass different pairs
            sizes.append(" / ".join(f"{v:,}" + (f" ({100 * (v / base[key] - 1):+.1f}%)" if i else "") for v in values))
        lines.append(f"| {r['model']} | {sizes[0]} | {sizes[1]} | {sum(accs) / len(accs):.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in accs)} | {' / '.join(str(run['rows'][i]['epochs']) for run in runs)} |")
    lines += ["", "Collapse of each pair that passed the schedule, at τ = its max|1 − α|; relative errors on the "
              "example batch (256 training images):", "",
              "| seed | τ | collapsed pair | error | Eq. 4–5 bound | proven bound |", "|---|---:|---|---:|---:|---:|"]
    num = lambda x: "—" if x is None else f"{x:.2e}"  # noqa: E731  (no bound through a BatchNorm)
    for run in runs:
        for c in run["collapses"]:
            lines.append(f"| {run['seed']} | {run['tau']:.1e} | {c['where'][0]} … {c['where'][-1]} | {num(c['error'])} | "
                         f"{num(c['bound_eq4'])} | {num(c['bound_proven'])} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The git commit the figures come from (``+dirty`` with uncommitted changes), or 'unknown'."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mixer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lc-epochs", type=int, default=20, help="at most; the schedule may stop earlier")
    parser.add_argument("--lc-lr", type=float, default=5e-4)
    parser.add_argument("--lc", type=float, default=200.0, help="AdamLC pulls by 2·lc·lr·(α − 1) per step")
    parser.add_argument("--fraction", type=float, default=None,
                        help="collapse this fraction of the pairs, from the end (default: the last block's two)")
    parser.add_argument("--threads", type=int, default=1, help="1: two threads contend badly on 2 busy cores")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default=None, help="default benchmarks/results/layercollapse_digits_<model>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out = args.out or f"benchmarks/results/layercollapse_digits_{args.model}"
    result = {"runs": [run(args, seed) for seed in args.seeds]}
    result.update(command="python " + " ".join(sys.argv), args=vars(args), torch=torch.__version__,
                  sklearn=sklearn.__version__, python=platform.python_version(), machine=platform.machine(),
                  cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), commit=_commit())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
