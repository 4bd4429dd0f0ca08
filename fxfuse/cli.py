"""Command line: ``fxfuse demo``, ``fxfuse optimize MODEL.py:factory --input-shape ...``, ``fxfuse bench``."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch

from .errors import FxfuseError, InputError
from .export import export_onnx
from .models import demo_inputs, demo_model
from .optimize import optimize, report_of


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from .bench import run as bench

            bench(args.suite, Path(args.out), args.batches, dtypes=tuple(args.dtypes), modes=tuple(args.modes),
                  onnx=not args.no_onnx, profile=args.profile, models=args.models, name=args.name)
            return 0
        if args.command == "demo":
            model, inputs, out = demo_model(), demo_inputs(), Path(args.out)
        else:
            model, out = load_model(args.model), Path(args.out)
            inputs = tuple(torch.randn(*shape) for shape in args.input_shape)
        run(model, inputs, out, args.json)
    except FxfuseError as e:
        print(f"fxfuse: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(model, inputs: tuple, out: Path, json_path: str | None) -> None:
    """optimize → print the report → export both graphs to ONNX and print their sizes."""
    gm = optimize(model, inputs)
    report = report_of(gm)
    print(report.table())
    if json_path:
        Path(json_path).write_text(report.to_json())
    print()
    print(export_onnx(gm, inputs, out, baseline=model))


def load_model(spec: str):
    """``path/to/file.py:factory`` → the module ``factory()`` returns (``:model`` by default)."""
    path, _, name = spec.partition(":")
    name = name or "model"
    if not Path(path).is_file():
        raise InputError(f"model file {path!r} does not exist. Give a Python file, e.g. models/mine.py:build.")
    try:
        namespace = runpy.run_path(path)
    except Exception as e:
        raise InputError(f"running {path} failed: {type(e).__name__}: {e}. Fix the file so that it imports.") from e
    if name not in namespace:
        raise InputError(f"{path} defines no {name!r}. Define a function {name}() that returns the model, "
                         f"or name another one with {path}:other_name.")
    factory = namespace[name]
    return factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize the built-in demo model, print the report, write ONNX")
    opt = sub.add_parser("optimize", help="optimize a model from a Python file, print the report, write ONNX")
    opt.add_argument("model", help="path/to/file.py:factory (a function returning an nn.Module in eval mode)")
    opt.add_argument("--input-shape", type=_shape, action="append", required=True,
                     help="shape of one random example input, e.g. 1,3,224,224 (repeat for several inputs)")
    bench = sub.add_parser("bench", help="measure original vs compressed models (params, MACs, ONNX, latency)")
    bench.add_argument("--suite", choices=["smoke", "cpu", "gpu"], default="smoke")
    bench.add_argument("--batches", type=int, nargs="+", default=[1])
    bench.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="CUDA only: float32 bfloat16 float16")
    bench.add_argument("--modes", nargs="+", default=["eager", "compile", "cudagraph"], help="CUDA only")
    bench.add_argument("--no-onnx", action="store_true", help="skip ONNX export and onnxruntime timing")
    bench.add_argument("--profile", action="store_true", help="CUDA only: top kernels of each variant's eager forward")
    bench.add_argument("--models", nargs="+", help="only these models of the suite")
    bench.add_argument("--out", default="benchmarks/results", help="folder for <name>.json and <name>.md")
    bench.add_argument("--name", help="results file name (default: the suite's)")
    for p, default in ((demo, "fxfuse-demo.onnx"), (opt, "model.onnx")):
        p.add_argument("--out", default=default, help=f"ONNX file to write (default {default})")
        p.add_argument("--json", help="also write the report as JSON to this file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
