"""Data-free fxfuse.optimize on the timm zoo: with timm's own no-trace leaf modules and no example
inputs, does every family's result compute the same function on fresh inputs, or refuse with a named reason?

    python benchmarks/datafree_zoo.py --timeout-s 60 --out benchmarks/results/datafree_zoo

One model per timm family, the smallest by parameter count, built as ``capture_zoo.py`` builds it
(eval mode, seeded random weights, randomized BatchNorms, the first input size it runs at). Then
``gm = fxfuse.optimize(model, None, leaf_modules=timm.layers.get_notrace_modules())`` (symbolic_trace,
only provably exact rewrites) and the max relative error of ``gm(x2)`` vs ``model(x2)`` on a fresh ``x2``.
"same" = optimize succeeded and that error is <= 1e-4 ("same (ill-conditioned)" where it is larger but
the float32 model is itself about as far from its float64 self, see ``capture_zoo.ill_conditioned``);
"refused" = optimize raised an ``fxfuse.FxfuseError`` (TraceError for models symbolic_trace cannot
capture); "wrong" = it succeeded but the output differs, or the result fails on fresh inputs (a bug);
"crash" = it raised any other exception (a bug); "timeout" = past --timeout-s (optimize and check);
"skipped" = the model does not build/run on its own, or is larger than capture_zoo's MAX_PARAMS.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture_zoo as cz  # noqa: E402
import fxfuse  # noqa: E402

STATUSES = ("same", "refused", "wrong", "crash", "timeout", "skipped")
PARAM_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "capture_zoo_timm_params.json"


def check(model, x, leaves, timeout_s) -> dict:
    """optimize data-free, then compare with the model on a fresh input; never raises (but for Ctrl-C)."""
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    rec = {"applied": None, "error_type": None, "error": None}
    try:
        with cz.time_limit(timeout_s):
            try:
                gm = fxfuse.optimize(model, None, leaf_modules=leaves)
            except fxfuse.FxfuseError as e:
                return {**rec, "status": "refused", "error_type": type(e).__name__, "error": cz.first_line(e),
                        "reason": f"{type(e).__name__}: {cz.first_line(e)}"}
            except Exception as e:  # not a named fxfuse error: a bug
                return {**rec, "status": "crash", "error_type": type(e).__name__, "error": cz.first_line(e),
                        "reason": "optimize raised a non-fxfuse exception", "traceback": traceback.format_exc(limit=-6)[-3000:]}
            applied = fxfuse.report_of(gm).applied
            rec.update(applied=len(applied), applied_by_pass=dict(Counter(r.pass_name for r in applied)))
            with torch.no_grad():
                try:
                    err = cz.max_rel_error(gm(x2), model(x2))
                except Exception as e:
                    return {**rec, "status": "wrong", "error_type": type(e).__name__, "error": cz.first_line(e),
                            "reason": "the optimized graph fails on a fresh input", "traceback": traceback.format_exc(limit=-6)[-3000:]}
            rec["fresh_error"] = err
            if err <= cz.REACHED_TOL:
                return {**rec, "status": "same", "reason": f"max relative error {err:.1e} on a fresh input"}
            f64 = rec["float64"] = cz.float64_check(model, gm, x2)
            if f64.get("ill_conditioned"):
                return {**rec, "status": "same (ill-conditioned)", "reason": f"max relative error {err:.1e}; vs float64: original "
                        f"{f64['original_vs_float64']:.1e}, optimized {f64['optimized_vs_float64']:.1e}"}
            return {**rec, "status": "wrong", "error_type": "FreshInputError",
                    "error": f"max relative error on a fresh input {err:.2e} > {cz.REACHED_TOL:g}", "reason": f"float64 check: {f64}"}
    except cz.Timeout as e:
        return {**rec, "status": "timeout", "error_type": "Timeout", "error": str(e), "reason": str(e)}
    except Exception as e:  # the check itself failed unexpectedly (report_of, float64_check ...)
        return {**rec, "status": "crash", "error_type": type(e).__name__, "error": cz.first_line(e),
                "reason": "the check failed", "traceback": traceback.format_exc(limit=-6)[-3000:]}


def run_model(name: str, leaves, timeout_s: float) -> dict:
    rec = {"model": name, "family": cz.timm_family_of(name)}
    start = time.perf_counter()
    try:
        with cz.time_limit(timeout_s):
            model, x, _, _ = cz.build("timm", name)
    except (Exception, cz.Timeout) as e:
        return {**rec, "status": "skipped", "applied": None, "error_type": type(e).__name__, "error": cz.first_line(e),
                "reason": "model does not build/run", "seconds": round(time.perf_counter() - start, 2)}
    rec.update(input_shape=list(x.shape), params=cz.count_params(model), **check(model, x, leaves, timeout_s))
    return {**rec, "seconds": round(time.perf_counter() - start, 2)}


def totals_line(results: list[dict]) -> str:
    n = Counter(r["status"].split(" ")[0] for r in results)
    ill = sum(r["status"] == "same (ill-conditioned)" for r in results)
    rewritten = sum(r["status"].startswith("same") and bool(r["applied"]) for r in results)
    return (f"{len(results)} families: {n['same']} same ({rewritten} with rewrites, {ill} ill-conditioned), "
            f"{n['refused']} refused, {n['wrong']} wrong, {n['crash']} crash, {n['timeout']} timeout, {n['skipped']} skipped")


def markdown(data: dict) -> str:
    lines = ["# Data-free fxfuse.optimize with timm's leaf modules on the timm zoo", "",
             f"Command: `{data['command']}` ({data['date']}, {data['wall_s']:.0f} s wall; torch {data['torch']}, timm {data['timm']}; "
             f"fxfuse at git {data['git_head'][:10]}, fxfuse/ + passes/ sources sha256 {data['sources_sha256']}; "
             f"{len(data['leaf_modules'])} timm leaf modules).", "", f"**{data['totals']}**", "",
             "| family | model | status | applied | error / reason | s |", "|---|---|---|---|---|---|"]
    for r in data["results"]:
        why = r["reason"] if r["status"].startswith("same") else f"{r['error_type']}: {r['error']}"
        why = why.replace("|", "\\|")[:200]
        lines.append(f"| {r['family']} | `{r['model']}` | {r['status']} | {'—' if r['applied'] is None else r['applied']} | {why} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import timm
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=0, help="only the first N families (a quick run)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per model, for optimize and the check")
    parser.add_argument("--out", default="benchmarks/results/datafree_zoo", help="writes OUT.json and OUT.md")
    parser.add_argument("--only", nargs="+", default=None, help="these timm families (modules) or model names")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    only = args.only or []
    models = [n for n in only if n in set(timm.list_models())]
    families = [f for f in only if f not in models]
    cache = json.loads(PARAM_CACHE.read_text()) if PARAM_CACHE.exists() else {}
    large = []
    if families or not models:
        picked, large = cz.select_timm(argparse.Namespace(families=families or None, limit=args.families,
                                                          max_params=cz.MAX_PARAMS), cache)
        models += picked
        PARAM_CACHE.write_text(json.dumps(cache))
    leaves = timm.layers.get_notrace_modules()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__, "timm": timm.__version__,
            "timeout_s": args.timeout_s, "leaf_modules": sorted(f"{c.__module__}.{c.__name__}" for c in leaves),
            **cz.source_version(), "results": [{"model": n, "family": cz.timm_family_of(n), "status": "skipped", "applied": None,
                                               "error_type": "TooLarge", "error": f"{p / 1e6:.0f}M parameters > {cz.MAX_PARAMS / 1e6:.0f}M",
                                               "reason": "not run", "seconds": 0.0} for n, p in large]}
    print(f"{len(models)} models to run ({time.perf_counter() - start:.0f} s to pick), {len(leaves)} leaf modules", flush=True)
    for i, name in enumerate(models, 1):
        rec = run_model(name, leaves, args.timeout_s)
        data["results"].append(rec)
        data.update(wall_s=round(time.perf_counter() - start, 1), totals=totals_line(data["results"]))
        print(f"[{i}/{len(models)} {data['wall_s']:.0f}s] {rec['family']:<22} {name:<34} {rec['status']:<8} applied={rec['applied']} "
              f"{rec['seconds']:.1f}s  {'' if rec['status'].startswith('same') else (rec['error_type'] or '') + ': ' + (rec['error'] or '')[:110]}", flush=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))  # partial results survive a kill
    data.update(wall_s=round(time.perf_counter() - start, 1), totals=totals_line(data["results"]))
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data))
    print(data["totals"], flush=True)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
