"""Tie on a GPT-2 (transformers ``GPT2LMHeadModel``) trained here on Python's own source text:
1/3 and 1/2 of the FF sublayers removed by permute-merge, vanilla merge or FF-drop, 3 seeds,
validation loss before and after an equal recovery fine-tune with the HF Trainer.

    python benchmarks/tie_text.py --out benchmarks/results/tie_text

Verma, Murray & Duh, "Merging Feed-Forward Sublayers for Compressed Transformers" (Sec. 5.1, Fig. 2,
App. E Table 10): on GPT-2 Large they merge one window of adjacent FFs (12 of 36 removed: FFs 22-34;
18 of 36: 16-34), permute beats vanilla at every ratio, and merging matches or beats layer dropping
(Fig. 3). Here, at small scale:

- Text: every ``.py`` file of the standard library (``sysconfig.get_paths()['stdlib']``, without
  ``site-packages``), sorted by path, read as bytes: a byte-level vocabulary of 256, no tokenizer.
  Each file goes whole to one split by a hash of its relative path: 5 % validation, 5 % selection,
  90 % train. Validation windows are used for the reported losses only; selection windows only to
  choose which FFs to merge or drop (Sec. 3.4); calibration (features) and all training come from train.
- Model: ``GPT2Config(n_layer=6, n_embd=192, n_head=6, n_positions=128, vocab_size=256)``, dropout 0,
  trained from scratch per seed (0, 1, 2; the seed sets the initialisation and the training windows)
  with ``transformers.Trainer``.
- Ratios: remove=2 (1/3 of 6 FFs: one window of 3 FFs becomes one shared FF) and remove=3 (1/2: one
  window of 4), one window each as in the paper's Table 10. Variants: ``fxfuse.tie(..., align=
  'permute')`` and ``align='vanilla'``, the window chosen among all adjacent windows by the selection
  loss; FF-drop: the same number of FFs (so the same parameters) replaced by a module returning
  zeros, the run of adjacent FFs chosen by the same selection loss among all such runs. (The paper's
  baseline drops whole layers, attention included, which cannot match the FF ratios on 6 layers.)
- Recovery fine-tune: the same Trainer run (steps, lr, schedule, windows, order) for every variant,
  and for the unmerged model as a control.

Reported: mean, sample std (ddof 1), min and max over the seeds of the validation loss (nats per
byte) and perplexity, per ratio × variant × before/after the fine-tune; parameters (a tensor shared
by several modules counted once), checkpoint bytes, the windows chosen and every window's selection
loss, times. The verdict line states whether permute < vanilla holds at every ratio, before and after
the fine-tune, on every seed and on the mean.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import fxfuse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_windows import checkpoint_bytes, windows  # noqa: E402  (benchmarks/)

SPLITS = ("train", "selection", "validation")
VARIANTS = ("permute", "vanilla", "drop")


@dataclass
class Settings:
    """Sizes and schedules; the defaults are the committed run's."""

    seeds: tuple = (0, 1, 2)
    removes: tuple = (2, 3)  # FFs removed: 1/3 and 1/2 of n_layer=6
    n_layer: int = 6
    n_embd: int = 192
    n_head: int = 6
    context: int = 128
    batch: int = 8
    train_steps: int = 600
    train_lr: float = 1e-3
    train_warmup: int = 50
    tune_steps: int = 40
    tune_lr: float = 3e-4
    calibration_batches: int = 8
    selection_batches: int = 8
    validation_batches: int = 16
    threads: int = 1  # under load from other jobs, 2 threads on 2 cores ran 3-8x slower than 1
    max_files: int | None = None  # the first files of the sorted list only (tests)
    log_every: int = 50


# ---------------------------------------------------------------- text


def stdlib_files(root: str | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by path, ``site-packages`` left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def split_of(relative: str) -> str:
    """A file's split from a hash of its relative path: 5 % validation, 5 % selection, the rest train."""
    bucket = int(hashlib.sha1(relative.encode()).hexdigest()[:8], 16) % 20
    return "validation" if bucket == 0 else "selection" if bucket == 1 else "train"


def corpus(max_files: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The bytes of each split (files concatenated in path order) as uint8 tensors, and a description."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[:max_files]
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for path in files:
        parts[split_of(path.relative_to(root).as_posix())].append(path.read_bytes())
    data, about = {}, {"root": str(root), "files": len(files)}
    for s in SPLITS:
        blob = b"".join(parts[s])
        data[s] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        about[s] = {"files": len(parts[s]), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    return data, about


class Windows(torch.utils.data.Dataset):
    """Causal-LM rows for the Trainer: labels = input_ids (GPT2LMHeadModel shifts them)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# ---------------------------------------------------------------- model, training, loss


def gpt2(settings: Settings, seed: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=256, n_positions=settings.context, n_embd=settings.n_embd,
                                     n_layer=settings.n_layer, n_head=settings.n_head, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     use_cache=False)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def train(model: nn.Module, ids: torch.Tensor, *, steps: int, batch: int, lr: float, warmup: int,
          schedule: str, seed: int, log_every: int) -> dict:
    """One pass of ``transformers.Trainer`` over ``ids`` (steps × batch rows, shuffled by ``seed``)."""
    import transformers

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            lr_scheduler_type=schedule, warmup_steps=warmup, weight_decay=0.0, seed=seed, data_seed=seed,
            logging_steps=log_every, save_strategy="no", report_to="none", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Windows(ids))
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # losses are kept in log_history
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    model.eval()
    return {"steps": steps, "seconds": seconds, "logged_train_loss": losses}


def lm_loss(model: nn.Module, ids: torch.Tensor, batch: int) -> float:
    """Mean next-byte cross-entropy (nats) over the rows of ``ids`` (equal batches, so the mean of means)."""
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in ids.split(batch)]
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- variants


class ZeroFF(nn.Module):
    """A dropped FF sublayer: its block adds zero (GPT2Block computes ``residual + mlp(ln_2(h))``)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def drop_ffs(model: nn.Module, layers) -> nn.Module:
    dropped = copy.deepcopy(model)
    for i in layers:
        dropped.transformer.h[i].mlp = ZeroFF()
    return dropped


def layer_drop(model: nn.Module, remove: int, score) -> tuple[nn.Module, list[int], dict]:
    """Drop the run of ``remove`` adjacent FFs with the lowest ``score(model)``; every run's score."""
    runs = [list(range(s, s + remove)) for s in range(len(model.transformer.h) - remove + 1)]
    scores = {tuple(r): score(drop_ffs(model, r)) for r in runs}
    best = list(min(scores, key=scores.get))
    return drop_ffs(model, best), best, {_paths(r): v for r, v in scores.items()}


def merge(model: nn.Module, remove: int, align: str, calibration: list,
          score) -> tuple[nn.Module, list[int], dict, float]:
    """``fxfuse.tie``: one window of remove + 1 adjacent FFs, chosen by ``score``, becomes one shared module;
    also every window's score and the merge's error on the FF outputs (fxfuse's report, first calibration batch)."""
    tied = fxfuse.tie(model, calibration=[{"input_ids": c} for c in calibration], remove=remove,
                      evaluate=score, align=align)
    report = fxfuse.report_of(tied)
    applied = [r for r in report.applied if r.pass_name == "tie"]
    if len(applied) != 1:
        raise RuntimeError(f"expected one merged window, the report says:\n{report}")
    layers = [_layer(p) for p in applied[0].where]
    scores = {", ".join(r.where): r.score for r in report.scored}
    return tied.eval(), layers, scores, applied[0].error


def _layer(path: str) -> int:
    """``transformer.h.3.mlp`` → 3."""
    parts = path.split(".")
    return int(parts[parts.index("h") + 1])


def _paths(layers) -> str:
    return ", ".join(f"transformer.h.{i}.mlp" for i in layers)


def shared_ff_groups(model: nn.Module) -> list[list[int]]:
    """Layers whose ``mlp`` is one module object, as groups of two or more."""
    groups: dict[int, list[int]] = {}
    for i, block in enumerate(model.transformer.h):
        groups.setdefault(id(block.mlp), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# ---------------------------------------------------------------- the run


def describe(model: nn.Module, ids: torch.Tensor, batch: int) -> dict:
    loss = lm_loss(model, ids, batch)
    return {"params": sum(p.numel() for p in model.parameters()), "checkpoint_bytes": checkpoint_bytes(model),
            "val_loss": loss, "val_ppl": math.exp(loss)}


def run_seed(settings: Settings, seed: int, data: dict, log=print) -> dict:
    s = settings
    rows = lambda split, n, offset: windows(data[split], n * s.batch, s.context, seed=offset)  # noqa: E731
    validation = rows("validation", s.validation_batches, 2)  # the same windows for every seed and variant
    selection = rows("selection", s.selection_batches, 1)
    calibration = list(rows("train", s.calibration_batches, 3).split(s.batch))
    pretrain = rows("train", s.train_steps, 100 + seed)
    tune = rows("train", s.tune_steps, 200 + seed)  # the same for every variant of this seed
    score = lambda m: lm_loss(m, selection, s.batch)  # noqa: E731
    tune_kwargs = dict(steps=s.tune_steps, batch=s.batch, lr=s.tune_lr, warmup=0, schedule="linear", seed=seed,
                       log_every=s.log_every)

    model = gpt2(s, seed)
    trained = train(model, pretrain, steps=s.train_steps, batch=s.batch, lr=s.train_lr, warmup=s.train_warmup,
                    schedule="cosine", seed=seed, log_every=s.log_every)
    original = describe(model, validation, s.batch)
    log(f"seed {seed}: trained {s.train_steps} steps in {trained['seconds']:.0f} s, "
        f"val loss {original['val_loss']:.4f}")
    control = copy.deepcopy(model)
    original["tune"] = train(control, tune, **tune_kwargs)
    original["val_loss_after"] = lm_loss(control, validation, s.batch)
    original["val_ppl_after"] = math.exp(original["val_loss_after"])
    del control

    ratios = {}
    for remove in s.removes:
        variants = {}
        for variant in VARIANTS:
            start = time.perf_counter()
            if variant == "drop":
                (compressed, layers, scores), error = layer_drop(model, remove, score), None
            else:
                compressed, layers, scores, error = merge(model, remove, variant, calibration, score)
            row = {"layers": layers, "selection_scores": scores, "merge_error": error,
                   "compress_seconds": time.perf_counter() - start, "shared_groups": shared_ff_groups(compressed),
                   **describe(compressed, validation, s.batch)}
            row["tune"] = train(compressed, tune, **tune_kwargs)
            row["shared_groups_after"] = shared_ff_groups(compressed)  # the Trainer kept the ties
            row["val_loss_after"] = lm_loss(compressed, validation, s.batch)
            row["val_ppl_after"] = math.exp(row["val_loss_after"])
            variants[variant] = row
            log(f"seed {seed} remove {remove} {variant:<8} layers {layers} params {row['params']:,} "
                f"val {row['val_loss']:.4f} → {row['val_loss_after']:.4f} ({row['compress_seconds']:.0f} s + "
                f"{row['tune']['seconds']:.0f} s tune)")
        ratios[str(remove)] = {"remove": remove, "window": remove + 1, "fraction": remove / s.n_layer,
                               "variants": variants}
    return {"seed": seed, "pretrain": trained, "original": original, "ratios": ratios}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def summarize(seeds: list[dict]) -> dict:
    """Mean and spread over the seeds per ratio × variant × before/after, and the permute-vs-vanilla verdict."""
    summary = {"original": {"before": spread([r["original"]["val_loss"] for r in seeds]),
                            "after": spread([r["original"]["val_loss_after"] for r in seeds])}}
    verdict = {}
    for remove in seeds[0]["ratios"]:
        per = {}
        for variant in VARIANTS:
            rows = [r["ratios"][remove]["variants"][variant] for r in seeds]
            per[variant] = {"before": spread([x["val_loss"] for x in rows]),
                            "after": spread([x["val_loss_after"] for x in rows]),
                            "ppl_before": spread([x["val_ppl"] for x in rows]),
                            "ppl_after": spread([x["val_ppl_after"] for x in rows]),
                            "params": sorted({x["params"] for x in rows})}
        summary[remove] = per
        verdict[remove] = {}
        for when in ("before", "after"):
            p, v = per["permute"][when], per["vanilla"][when]
            verdict[remove][when] = {"every_seed": all(a < b for a, b in zip(p["values"], v["values"])),
                                     "seeds_won": sum(a < b for a, b in zip(p["values"], v["values"])),
                                     "mean": p["mean"] < v["mean"], "gap_mean": v["mean"] - p["mean"]}
    every = all(w[when]["every_seed"] for w in verdict.values() for when in w)
    mean = all(w[when]["mean"] for w in verdict.values() for when in w)
    return {"summary": summary, "verdict": verdict, "holds_every_seed": every, "holds_on_mean": mean}


def environment(settings: Settings) -> dict:
    import accelerate
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "fxfuse_commit": commit, "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": settings.threads}


def run(settings: Settings, log=print) -> dict:
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    data, about = corpus(settings.max_files)
    log(f"corpus: {about['files']} files; " + ", ".join(f"{s} {about[s]['bytes']:,} bytes" for s in SPLITS))
    seeds = [run_seed(settings, seed, data, log) for seed in settings.seeds]
    return {"settings": asdict(settings), "environment": environment(settings), "corpus": about, "seeds": seeds,
            **summarize(seeds), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    s, env, about = result["settings"], result["environment"], result["corpus"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = [f"Command: `{result['command']}`", "",
             f"Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, accelerate "
             f"{env['accelerate']}, fxfuse commit {env['fxfuse_commit'][:10]}, {env['threads']} CPU thread(s) of "
             f"{env['cpus']}; {result['seconds'] / 60:.1f} min wall.", "",
             f"Text: the {about['files']} `.py` files of the standard library (`{about['root']}`), bytes; "
             f"train {about['train']['bytes']:,} bytes ({about['train']['files']} files), selection "
             f"{about['selection']['bytes']:,} ({about['selection']['files']}), validation "
             f"{about['validation']['bytes']:,} ({about['validation']['files']}). GPT2LMHeadModel, {s['n_layer']} "
             f"layers, n_embd {s['n_embd']}, {s['n_head']} heads, context {s['context']}, vocabulary 256 (bytes), "
             f"trained from scratch {s['train_steps']} steps × {s['batch']} windows (Trainer, lr {s['train_lr']}, "
             f"cosine) per seed ({seeds}). Windows chosen by the loss on {s['selection_batches']}×{s['batch']} "
             f"selection windows; reported: validation loss in nats per byte on {s['validation_batches']}×{s['batch']} "
             f"windows of {s['context']} bytes. Recovery fine-tune: Trainer, {s['tune_steps']} steps × {s['batch']} "
             f"windows, lr {s['tune_lr']} linear to 0, the same for every row.", "",
             f"Mean ± sample std over {len(s['seeds'])} seeds [min, max]:", "",
             "| FFs removed | variant | parameters | val loss before fine-tune | after fine-tune "
             "| ppl before | ppl after |", "|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda d: f"{d['mean']:.4f} ± {d['std']:.4f} [{d['min']:.4f}, {d['max']:.4f}]"  # noqa: E731
    fmt_ppl = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    o = result["summary"]["original"]
    params = result["seeds"][0]["original"]["params"]
    ppl = lambda key: spread([r["original"][key] for r in result["seeds"]])  # noqa: E731
    lines.append(f"| 0/{s['n_layer']} | original (control) | {params:,} | {fmt(o['before'])} | {fmt(o['after'])} | "
                 f"{fmt_ppl(ppl('val_ppl'))} | {fmt_ppl(ppl('val_ppl_after'))} |")
    for remove, per in result["summary"].items():
        if remove == "original":
            continue
        for variant in VARIANTS:
            d = per[variant]
            lines.append(f"| {remove}/{s['n_layer']} | {variant} | {', '.join(f'{p:,}' for p in d['params'])} | "
                         f"{fmt(d['before'])} | {fmt(d['after'])} | {fmt_ppl(d['ppl_before'])} | "
                         f"{fmt_ppl(d['ppl_after'])} |")
    lines += ["", "Per seed, validation loss before → after the fine-tune:", "",
              "| seed | FFs removed | permute | vanilla | drop |", "|---|---|---|---|---|"]
    for r in result["seeds"]:
        lines.append(f"| {r['seed']} | 0 (control) | {r['original']['val_loss']:.4f} → "
                     f"{r['original']['val_loss_after']:.4f} | | |")
        for remove, ratio in r["ratios"].items():
            lines.append(f"| {r['seed']} | {remove} | " + " | ".join(
                f"{ratio['variants'][v]['val_loss']:.4f} → {ratio['variants'][v]['val_loss_after']:.4f}"
                for v in VARIANTS) + " |")
    lines += ["", "Windows chosen (layer indices) per seed:", "",
              "| FFs removed | variant | " + " | ".join(f"seed {r['seed']}" for r in result["seeds"]) + " |",
              "|---|---|" + "---|" * len(result["seeds"])]
    for remove in result["seeds"][0]["ratios"]:
        for variant in VARIANTS:
            lines.append(f"| {remove} | {variant} | " + " | ".join(
                str(r["ratios"][remove]["variants"][variant]["layers"]) for r in result["seeds"]) + " |")
    mean_of = lambda values: statistics.fmean(values)  # noqa: E731
    rows = [v for r in result["seeds"] for ratio in r["ratios"].values() for k, v in ratio["variants"].items()]
    lines += ["", "drop: the chosen FFs' `mlp` replaced by a module returning zeros (the block adds nothing; its "
              "`ln_2` stays, unused), the run of adjacent FFs chosen by the same selection loss; it removes as "
              "many parameters as the merge. The paper's layer-drop baseline drops whole layers instead.", "",
              "Times (mean over seeds): pretraining "
              f"{mean_of([r['pretrain']['seconds'] for r in result['seeds']]):.0f} s; "
              f"fxfuse.tie (capture, features, every window scored, merge) "
              f"{mean_of([v['compress_seconds'] for v in rows if v['merge_error'] is not None]):.0f} s; "
              f"FF-drop search {mean_of([v['compress_seconds'] for v in rows if v['merge_error'] is None]):.0f} s; "
              f"recovery fine-tune {mean_of([v['tune']['seconds'] for v in rows]):.0f} s.",
              "", "Paired gaps (same seed, same validation windows; the spread over seeds above also holds the "
              "seeds' own differences): validation loss of the other variant − permute's, mean ± std over seeds, "
              "and the seeds on which permute is lower:", ""]
    for remove in result["verdict"]:
        for when, key in (("before", "val_loss"), ("after", "val_loss_after")):
            parts = []
            for other in ("vanilla", "drop"):
                gaps = [r["ratios"][remove]["variants"][other][key] - r["ratios"][remove]["variants"]["permute"][key]
                        for r in result["seeds"]]
                g = spread(gaps)
                parts.append(f"{other} − permute {g['mean']:+.4f} ± {g['std']:.4f} "
                             f"(permute lower on {sum(x > 0 for x in gaps)}/{len(gaps)} seeds)")
            lines.append(f"- {remove}/{s['n_layer']} FFs removed, {when} fine-tune: " + "; ".join(parts))
    control = spread([r["original"]["val_loss_after"] - r["original"]["val_loss"] for r in result["seeds"]])
    lines += ["", f"Control: the same fine-tune changes the unmerged model's validation loss by {control['mean']:+.4f} "
              f"on average [{control['min']:+.4f}, {control['max']:+.4f}] over the seeds."]
    lines += ["", "**Verdict** — the paper's claim (permute < vanilla at every ratio): "
              + ("holds" if result["holds_every_seed"] else "does not hold")
              + " on every seed, before and after the fine-tune; on the mean it "
              + ("holds" if result["holds_on_mean"] else "does not hold") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = Settings()
    for name in ("train_steps", "tune_steps", "n_embd", "n_layer", "n_head", "batch", "validation_batches", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--out", default="benchmarks/results/tie_text")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return
    settings = Settings(seeds=tuple(args.seeds),
                        **{k: v for k, v in vars(args).items() if k not in ("seeds", "out", "render")})
    result = run(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["command"] = "python " + " ".join(sys.argv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
