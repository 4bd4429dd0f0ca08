"""Which models each capture reaches: fxfuse.optimize with capture="export" and capture="fx" over the
torchvision and timm zoos (random weights), each result checked as the same function on fresh inputs.

    python benchmarks/capture_zoo.py --zoo timm torchvision --timeout-s 60 --out benchmarks/results/capture_zoo

timm: one model per family (the timm module a model is defined in), the smallest by parameter count
(counted on the meta device; ``test_*`` debugging stubs excluded). torchvision: every classification
model. Each model is built in eval mode with random weights and every BatchNorm given non-trivial
running statistics and affine parameters (seeded), so that folds are really tested. Then, per capture:
``gm = fxfuse.optimize(model, (x,), capture=c)`` and the max relative error (float64, over all output
tensors) of ``gm(x2)`` vs ``model(x2)`` on a fresh ``x2`` of the same shape, and for export also at
batch 3 when the graph runs there. "reached" = optimize succeeded and that error is <= 1e-4;
"wrong" = optimize succeeded but the error is larger (or the result fails on fresh inputs);
"refused" = optimize raised an fxfuse error; "crash" = it raised something else (a bug in fxfuse);
"timeout" = past --timeout-s (signal.alarm; per model and capture).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

import fxfuse
from fxfuse.models import randomize_batchnorm

CAPTURES = ("export", "fx")
PASSES = ("fold_batchnorm", "collapse", "compose", "drop_identity")
REACHED_TOL = 1e-4
SIZES = (64, 96)  # tried first, smallest first; then img_size=64 (timm), then the model's default size
MAX_DEFAULT_PX = 448  # a model that only runs at a larger default size is skipped
MAX_PARAMS = 150_000_000
BATCH = 2


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` inside torch or fxfuse swallows it."""


@contextmanager
def time_limit(seconds: float | None):
    if not seconds:
        yield
        return

    def handler(signum, frame):
        raise Timeout(f"timed out after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def foreign_batchnorm_classes(model: nn.Module) -> list[str]:
    """_BatchNorm subclasses defined outside torch.nn (timm's BatchNormAct2d and friends)."""
    return sorted({f"{type(m).__module__}.{type(m).__name__}" for m in batchnorms(model)
                   if not type(m).__module__.startswith("torch.nn")})


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_rel_error(new, ref) -> float:
    """max |new - ref| / max |ref| over every floating output tensor, in float64."""
    a, b = tensors(new), tensors(ref)
    if len(a) != len(b) or not b:
        raise ValueError(f"outputs differ in structure: {len(a)} vs {len(b)} tensors")
    if any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError(f"output shapes differ: {[tuple(x.shape) for x in a]} vs {[tuple(y.shape) for y in b]}")
    diff = max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))
    scale = max(y.double().abs().max().item() for y in b)
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------------------------- zoos

def timm_families(include_tests: bool = False) -> dict[str, list[str]]:
    import timm
    families = {}
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if include_tests or not n.startswith("test_")]
        if names:
            families[module] = names
    return families


_SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "micro", "small", "050", "b0", "s0")


def meta_params(build) -> int | None:
    try:
        with torch.device("meta"):
            return count_params(build())
    except Exception:
        return None


def smallest_timm_model(names: list[str], cache: dict) -> tuple[str, int | None]:
    """The family's model with the fewest parameters (meta-device count); names that cannot be built
    on the meta device come last, ordered by size words in their name."""
    import timm

    def key(name):
        if name not in cache:
            cache[name] = meta_params(lambda: timm.create_model(name, pretrained=False))
        n = cache[name]
        words = next((i for i, w in enumerate(_SIZE_WORDS) if w in name), len(_SIZE_WORDS))
        return (n is None, n or 0, words, len(name), name)

    best = min(names, key=key)
    return best, cache[best]


def timm_family_of(name: str) -> str:
    import timm.models._registry as registry
    return registry._model_to_module.get(name, "?")


def torchvision_family_of(name: str) -> str:
    import torchvision
    return torchvision.models.get_model_builder(name).__module__.rpartition(".")[2]


def default_size(zoo: str, name: str, model: nn.Module) -> tuple[int, ...]:
    if zoo == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("input_size", (3, 224, 224)))
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def make_model(zoo: str, name: str, kwargs: dict) -> nn.Module:
    if zoo == "timm":
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision
    return torchvision.models.get_model(name, weights=None, **kwargs)


def build(zoo: str, name: str, seed: int = 0):
    """The model in eval mode (seeded random weights, randomized BatchNorms) and an example input
    (batch BATCH) it runs on. Tried in order: the default model at SIZES px; (timm) the model built
    with img_size=SIZES[0]; the default model at its default input size (if <= MAX_DEFAULT_PX)."""
    attempts = [({}, (3, s, s)) for s in SIZES]
    if zoo == "timm":
        attempts.append(({"img_size": SIZES[0]}, (3, SIZES[0], SIZES[0])))
    attempts.append(({}, None))  # None: the model's default input size
    failures, models, tried = [], {}, set()
    for kwargs, shape in attempts:
        key = tuple(sorted(kwargs.items()))
        if key not in models:
            torch.manual_seed(seed)
            try:
                models[key] = randomize_batchnorm(make_model(zoo, name, kwargs).eval(), torch.Generator().manual_seed(seed))
            except Exception as e:
                models[key] = None
                failures.append(f"build {kwargs or 'default'}: {type(e).__name__}: {first_line(e)}")
        model = models[key]
        if model is None:
            continue
        shape = shape or default_size(zoo, name, model)
        if (key, shape) in tried:
            continue
        tried.add((key, shape))
        if max(shape[1:]) > MAX_DEFAULT_PX:
            failures.append(f"default input size {shape} > {MAX_DEFAULT_PX} px: not run")
            continue
        x = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                out = model(x)
            if not tensors(out):
                raise ValueError("no floating-point output tensor")
            if not all(torch.isfinite(t).all() for t in tensors(out)):
                raise ValueError("non-finite output")
        except Exception as e:
            failures.append(f"{kwargs or 'default'} at {'x'.join(map(str, shape))}: {type(e).__name__}: {first_line(e)}")
            continue
        return model, x, kwargs, failures
    raise RuntimeError(" | ".join(failures[-3:]))


# ---------------------------------------------------------------------------------------- per model

def run_capture(model: nn.Module, x: torch.Tensor, capture: str, timeout_s: float | None, seed: int = 1) -> dict:
    """optimize with one capture; check the result on fresh inputs (and, for export, at batch 3)."""
    rec: dict = {"status": None}
    generator = torch.Generator().manual_seed(seed)
    x2 = torch.randn(x.shape, generator=generator)
    x3 = torch.randn((3, *x.shape[1:]), generator=generator)
    start = time.perf_counter()
    try:
        with time_limit(timeout_s):
            try:
                gm = fxfuse.optimize(model, (x,), capture=capture)
            except fxfuse.FxfuseError as e:
                rec.update(status="refused", error_type=type(e).__name__, error=first_line(e))
                return rec
            except Exception as e:  # not a named fxfuse error: a bug in fxfuse (or in torch under it)
                rec.update(status="crash", error_type=type(e).__name__, error=first_line(e),
                           traceback=traceback.format_exc(limit=-6)[-3000:])
                return rec
            r = fxfuse.report_of(gm)
            applied = Counter(row.pass_name for row in r.applied)
            rec.update(applied={p: applied.get(p, 0) for p in sorted(set(PASSES) | set(applied))},
                       folds=applied.get("fold_batchnorm", 0), skipped_rows=len(r.skipped),
                       params_before=r.params_before, params_after=r.params_after,
                       optimize_s=round(r.seconds, 3), report_capture=r.capture,
                       example_error=r.error)
            with torch.no_grad():
                try:
                    rec["fresh_error"] = max_rel_error(gm(x2), model(x2))
                except Exception as e:
                    rec.update(status="wrong", error_type=type(e).__name__,
                               error=f"fails on fresh inputs: {first_line(e)}")
                    return rec
                if capture == "export":
                    try:
                        out3 = gm(x3)
                    except Exception as e:
                        rec["batch3"] = {"ran": False, "why": f"{type(e).__name__}: {first_line(e)}"}
                    else:
                        rec["batch3"] = {"ran": True, "error": max_rel_error(out3, model(x3))}
            errors = [rec["fresh_error"]] + ([rec["batch3"]["error"]] if rec.get("batch3", {}).get("ran") else [])
            worst = max(errors)
            if worst <= REACHED_TOL:
                rec["status"] = "reached"
            else:
                rec.update(status="wrong", error_type="FreshInputError",
                           error=f"max relative error on fresh inputs {worst:.2e} > {REACHED_TOL:g}")
                rec["float64"] = float64_check(model, gm, x2)
    except Timeout as e:
        rec.update(status="timeout", error_type="Timeout", error=str(e))
    except Exception as e:  # the fresh-input check itself failed in an unexpected way
        rec.update(status="crash", error_type=type(e).__name__, error=first_line(e),
                   traceback=traceback.format_exc(limit=-6)[-3000:])
    finally:
        rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def ill_conditioned(original_vs_float64: float, optimized_vs_float64: float) -> bool:
    """The float32 model is itself further than REACHED_TOL from its float64 self (random weights made
    the function amplify float32 rounding), and the optimized graph is about as far (at most twice,
    plus REACHED_TOL): the 1e-4 test cannot tell a changed function from rounding there."""
    return original_vs_float64 > REACHED_TOL and optimized_vs_float64 <= 2 * original_vs_float64 + REACHED_TOL


def is_ill_conditioned(c: dict | None) -> bool:
    f = (c or {}).get("float64") or {}
    return "original_vs_float64" in f and ill_conditioned(f["original_vs_float64"], f["optimized_vs_float64"])


def float64_check(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> dict:
    """For a 'wrong' result: the float32 original's and the optimized graph's distances from the float64
    original on ``x`` (see ill_conditioned)."""
    try:
        with torch.no_grad():
            truth = copy.deepcopy(model).double()(x.double())
            original, optimized = max_rel_error(model(x), truth), max_rel_error(gm(x), truth)
        return {"original_vs_float64": original, "optimized_vs_float64": optimized,
                "ill_conditioned": ill_conditioned(original, optimized)}
    except Exception as e:
        return {"failed": f"{type(e).__name__}: {first_line(e)}"}


def run_model(zoo: str, name: str, captures=CAPTURES, timeout_s: float | None = 60.0, seed: int = 0) -> dict:
    """Build one model and run every capture on it; never raises (errors are recorded)."""
    rec = {"zoo": zoo, "model": name,
           "family": timm_family_of(name) if zoo == "timm" else torchvision_family_of(name)}
    start = time.perf_counter()
    try:
        with time_limit(timeout_s):
            model, x, kwargs, failures = build(zoo, name, seed)
    except BaseException as e:  # Timeout included
        if isinstance(e, KeyboardInterrupt):
            raise
        rec.update(status="skipped", why=f"model does not build/run: {type(e).__name__}: {first_line(e)}",
                   build_s=round(time.perf_counter() - start, 2))
        return rec
    bns = batchnorms(model)
    rec.update(status="run", input_shape=list(x.shape), build_kwargs=kwargs, build_failures=failures,
               params=count_params(model), bn_layers=len(bns),
               bn_classes=sorted({type(m).__name__ for m in bns}),
               foreign_bn_classes=foreign_batchnorm_classes(model),
               build_s=round(time.perf_counter() - start, 2), captures={})
    for capture in captures:
        rec["captures"][capture] = run_capture(model, x, capture, timeout_s)
    return rec


# ------------------------------------------------------------------------------------------ markdown

def status_cell(c: dict | None) -> str:
    if c is None:
        return "—"
    if c["status"] == "reached":
        return f"reached ({c['fresh_error']:.0e})"
    if is_ill_conditioned(c):
        f = c["float64"]
        return (f"wrong, ill-conditioned: {c['error']}; vs float64: original {f['original_vs_float64']:.1e}, "
                f"optimized {f['optimized_vs_float64']:.1e}")
    return f"{c['status']}: {c.get('error_type', '')}: {c.get('error', '')}".replace("|", "\\|")[:160]


def summarize(results: list[dict], unit: str) -> dict:
    """Per capture: the families (timm) / models (torchvision) per status."""
    out = {}
    for capture in CAPTURES:
        by = {}
        for r in results:
            if r["status"] != "run" or capture not in r["captures"]:
                continue
            by.setdefault(r["captures"][capture]["status"], []).append(r[unit])
        out[capture] = {k: sorted(v) for k, v in by.items()}
    return out


def only_one(results: list[dict]) -> dict:
    reached = {c: {r["model"] for r in results if r["status"] == "run" and r["captures"].get(c, {}).get("status") == "reached"}
               for c in CAPTURES}
    return {c: sorted(reached[c] - set().union(*(reached[o] for o in CAPTURES if o != c))) for c in CAPTURES}


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# fxfuse capture zoo: torch.export vs torch.fx.symbolic_trace", "",
             f"torch {meta['torch']}, torchvision {meta['torchvision']}, timm {meta['timm']}, python {meta['python']}, "
             f"{meta['cpu_count']} CPUs ({meta['threads']} torch thread), {meta['platform']}.", "",
             "Random weights; every BatchNorm given random running statistics and affine parameters. "
             f"**reached** = `fxfuse.optimize(model, (x,), capture=c)` succeeded and `gm(x2)` matches `model(x2)` on a fresh "
             f"input (and, for export, at batch 3 when the graph runs there) to max relative error ≤ {REACHED_TOL:g}; "
             "**refused** = optimize raised an fxfuse error (TraceError etc.); **wrong** = optimize returned a graph that "
             "differs on fresh inputs (a bug, unless marked ill-conditioned: see the float64 check below); **crash** = optimize raised a non-fxfuse exception (a bug); "
             "**timeout** = past the per-model, per-capture limit.", ""]
    for zoo, z in data["zoos"].items():
        results = z["results"]
        run = [r for r in results if r["status"] == "run"]
        unit = "family" if zoo == "timm" else "model"
        lines += [f"## {zoo}", "", f"Command: `{z['command']}` ({z['date']}, {z['wall_s']:.0f} s wall; "
                  f"timeout {z['timeout_s']} s per model and capture; fxfuse at git {z.get('git_head', '?')[:10]}, "
                  f"fxfuse/ + passes/ sources sha256 {z.get('sources_sha256', '?')}).", ""]
        if zoo == "timm":
            lines += [f"{len(results)} families (one model each, the smallest by parameters); {len(run)} run, "
                      f"{len(results) - len(run)} skipped (listed below).", ""]
        else:
            lines += [f"{len(results) + len(z.get('skipped_large', []))} classification models; {len(run)} run, "
                      f"{len(results) - len(run) + len(z.get('skipped_large', []))} skipped (listed below).", ""]
        summary = summarize(results, unit)
        col = "families" if zoo == "timm" else "models"
        lines += [f"| capture | {col} reached (same function on fresh inputs) | refused | wrong (of which ill-conditioned) | crash | timeout |",
                  "|---|---|---|---|---|---|"]
        ill = {c: sum(is_ill_conditioned(r["captures"].get(c)) for r in run) for c in CAPTURES}
        for capture in CAPTURES:
            s = summary[capture]
            lines.append(f"| {capture} | {len(s.get('reached', []))} / {len(run)} | {len(s.get('refused', []))} | "
                         f"{len(s.get('wrong', []))} ({ill[capture]}) | {len(s.get('crash', []))} | {len(s.get('timeout', []))} |")
        both = [r for r in run if all(r["captures"].get(c, {}).get("status") == "reached" for c in CAPTURES)]
        either = [r for r in run if any(r["captures"].get(c, {}).get("status") == "reached" for c in CAPTURES)]
        lines += ["", f"Both captures reach {len(both)}; at least one reaches {len(either)} of {len(run)}.", ""]
        b3 = [r for r in run if r["captures"].get("export", {}).get("status") == "reached"]
        ran3 = [r for r in b3 if r["captures"]["export"].get("batch3", {}).get("ran")]
        lines += [f"Export graphs reached that also run at batch 3: {len(ran3)} of {len(b3)}"
                  + (f" (not: {', '.join(r['model'] for r in b3 if r not in ran3)})" if len(ran3) < len(b3) else "") + ".", ""]
        one = only_one(results)
        lines += ["### Reached by one capture only", ""]
        for capture in CAPTURES:
            names = one[capture]
            fam = {r["model"]: r["family"] for r in results}
            lines.append(f"- only {capture} ({len(names)}): " + (", ".join(f"{fam[n]} (`{n}`)" if zoo == "timm" else f"`{n}`"
                                                                         for n in names) or "none"))
        lines.append("")
        foreign = [r for r in run if r.get("foreign_bn_classes")]
        if foreign:
            lines += ["### BatchNorms that are not torch.nn classes (BatchNormAct2d and friends)", "",
                      "| family | model | BN classes | BN layers | folds (export) | folds (fx) |", "|---|---|---|---|---|---|"]
            for r in foreign:
                folds = [str(r["captures"].get(c, {}).get("folds", "—")) if r["captures"].get(c, {}).get("status") == "reached"
                         else f"— ({r['captures'].get(c, {}).get('status', '—')})" for c in CAPTURES]
                classes = ", ".join(c.rpartition(".")[2] for c in r["foreign_bn_classes"])
                lines.append(f"| {r['family']} | `{r['model']}` | {classes} | {r['bn_layers']} | {folds[0]} | {folds[1]} |")
            lines.append("")
        partial = [r for r in run if r["bn_layers"] and any(
            r["captures"].get(c, {}).get("status") == "reached" and r["captures"][c]["folds"] != r["bn_layers"] for c in CAPTURES)]
        if partial:
            lines += ["### Reached, but not every BatchNorm folded", "",
                      "| model | BN layers | folds (export) | folds (fx) |", "|---|---|---|---|"]
            for r in partial:
                f = [str(r["captures"].get(c, {}).get("folds", "—")) for c in CAPTURES]
                lines.append(f"| `{r['model']}` | {r['bn_layers']} | {f[0]} | {f[1]} |")
            lines.append("")
        bugs = [(r, c) for r in run for c in CAPTURES
                if (r["captures"].get(c, {}).get("status") in ("wrong", "crash")
                    and not is_ill_conditioned(r["captures"][c]))
                or r["captures"].get(c, {}).get("error_type") == "PassError"]
        lines += ["### Possible fxfuse bugs (wrong, crash, PassError)", ""]
        lines += [f"- `{r['model']}` ({c}): {status_cell(r['captures'][c])}" for r, c in bugs] or ["- none"]
        illc = [(r, c) for r in run for c in CAPTURES if is_ill_conditioned(r["captures"].get(c))]
        if illc:
            lines += ["", "Wrong by the 1e-4 test but ill-conditioned (with these random weights the float32 model is itself "
                      "further than 1e-4 from its float64 self, and the optimized graph is at most about twice as far "
                      "from float64): not counted as bugs, but look at the numbers:", ""]
            lines += [f"- `{r['model']}` ({c}): {status_cell(r['captures'][c])}" for r, c in illc]
        lines += ["", "### Every model", "",
                  "| family | model | params | input | BN | export | fx | applied (export) | applied (fx) | params after (export / fx) | optimize s (export / fx) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run:
            cs = [r["captures"].get(c) for c in CAPTURES]
            ap = [", ".join(f"{k} {v}" for k, v in c.get("applied", {}).items() if v) or "—" if c and "applied" in c else "—"
                  for c in cs]
            pa = " / ".join(f"{c['params_after'] / 1e6:.2f}M" if c and "params_after" in c else "—" for c in cs)
            secs = " / ".join(f"{c['seconds']:.1f}" if c else "—" for c in cs)
            shape = "×".join(map(str, r["input_shape"])) + (f" ({', '.join(f'{k}={v}' for k, v in r['build_kwargs'].items())})"
                                                            if r["build_kwargs"] else "")
            b3 = cs[0].get("batch3", {}) if cs[0] else {}
            exp = status_cell(cs[0]) + (" b3✗" if b3 and not b3.get("ran") else "")
            lines.append(f"| {r['family']} | `{r['model']}` | {r['params'] / 1e6:.2f}M | {shape} | {r['bn_layers']} | "
                         f"{exp} | {status_cell(cs[1])} | {ap[0]} | {ap[1]} | {pa} | {secs} |")
        skipped = [r for r in results if r["status"] != "run"]
        lines += ["", "### Skipped", ""]
        lines += [f"- `{r['model']}` ({r['family']}): {r['why']}" for r in skipped]
        lines += [f"- `{name}`: {n / 1e6:.0f}M parameters > {z['max_params'] / 1e6:.0f}M (not run)"
                  for name, n in z.get("skipped_large", [])]
        if not skipped and not z.get("skipped_large"):
            lines.append("- none")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def select_timm(args, cache: dict) -> tuple[list[str], list]:
    families = timm_families()
    names = sorted(families)
    if args.families:
        names = [f for f in names if f in args.families]
    if args.limit:
        names = names[:args.limit]
    models, large = [], []
    for family in names:
        name, n = smallest_timm_model(families[family], cache)
        if n is not None and n > args.max_params:
            large.append((name, n))
        else:
            models.append(name)
    return models, large


def select_torchvision(args) -> tuple[list[str], list]:
    import torchvision
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if args.families:
        names = [n for n in names if n in args.families or torchvision_family_of(n) in args.families]
    if args.limit:
        names = names[:args.limit]
    models, large = [], []
    for name in names:
        n = torchvision_params(name)
        (large.append((name, n)) if n is not None and n > args.max_params else models.append(name))
    return models, large


def torchvision_params(name: str) -> int | None:
    """The parameter count from the weights' metadata (nothing is downloaded), else counted on the meta device."""
    import torchvision
    try:
        return next(iter(torchvision.models.get_model_weights(name))).meta["num_params"]
    except Exception:
        return meta_params(lambda: torchvision.models.get_model(name, weights=None))


def source_version() -> dict:
    """Which fxfuse code ran: git HEAD (read only) and a hash of fxfuse/ and passes/ as they are on disk,
    which may differ from HEAD."""
    import hashlib
    import subprocess
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for f in sorted([*root.glob("fxfuse/*.py"), *root.glob("passes/*.py")]):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        head = ""
    return {"git_head": head, "sources_sha256": digest.hexdigest()[:16]}


def main(argv=None) -> None:
    import timm
    import torchvision
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="+", choices=("timm", "torchvision"), default=["timm", "torchvision"])
    parser.add_argument("--limit", type=int, default=0, help="first N families (timm) / models (torchvision)")
    parser.add_argument("--families", nargs="+", default=None, help="timm modules / torchvision models or modules")
    parser.add_argument("--models", nargs="+", default=None, help="run exactly these model names (overrides the pick)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per model and capture (signal.alarm)")
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS)
    parser.add_argument("--out", default="benchmarks/results/capture_zoo")
    parser.add_argument("--merge", action="store_true", help="keep the other zoos' results already in --out.json")
    parser.add_argument("--render", action="store_true", help="only rewrite --out.md from --out.json")
    parser.add_argument("--param-cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "capture_zoo_timm_params.json"),
                        help="meta-device parameter counts of timm models (speeds up the family pick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return
    data = {"zoos": {}}
    if args.merge and out.with_suffix(".json").exists():
        data = json.loads(out.with_suffix(".json").read_text())
    data["meta"] = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                    "fxfuse": getattr(fxfuse, "__version__", "0.1.0"), "python": platform.python_version(),
                    "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    version = source_version()
    cache_path = Path(args.param_cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for zoo in args.zoo:
        start = time.perf_counter()
        if args.models:
            known = set(timm.list_models()) if zoo == "timm" else set(torchvision.models.list_models(module=torchvision.models))
            models, large = [m for m in args.models if m in known], []
        elif zoo == "timm":
            models, large = select_timm(args, cache)
            cache_path.write_text(json.dumps(cache))
        else:
            models, large = select_torchvision(args)
        print(f"[{zoo}] {len(models)} models to run ({time.perf_counter() - start:.0f} s to pick); "
              f"skipped as too large: {large}", flush=True)
        z = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "timeout_s": args.timeout_s,
             "max_params": args.max_params, "skipped_large": large, "results": [], "wall_s": 0.0, **version}
        data["zoos"][zoo] = z
        for i, name in enumerate(models, 1):
            rec = run_model(zoo, name, timeout_s=args.timeout_s)
            z["results"].append(rec)
            z["wall_s"] = round(time.perf_counter() - start, 1)
            if rec["status"] == "run":
                cells = "  ".join(f"{c}={v['status']}" + (f"(folds {v['folds']}/{rec['bn_layers']})" if v.get("folds") is not None else "")
                                  + f" {v['seconds']:.1f}s" + ("" if v["status"] == "reached" else f" [{v.get('error_type')}: {v.get('error', '')[:100]}]")
                                  for c, v in rec["captures"].items())
            else:
                cells = f"skipped: {rec['why'][:150]}"
            print(f"[{zoo} {i}/{len(models)} {z['wall_s']:.0f}s] {rec['family']:<24} {name:<36} {cells}", flush=True)
            out.with_suffix(".json").write_text(json.dumps(data, indent=1))  # partial results survive a kill
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data).split("### Every model")[0] if len(data["zoos"]) == 1 else "", flush=True)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
