"""fxfuse command line: optimize a model (fxfuse demo, fxfuse optimize FILE.py:factory --input-shape 1,3,224,224),
estimate what LayerCollapse and FF tying could save (fxfuse analyze), or run the benchmarks (fxfuse bench).
Every user mistake exits with status 2 and one line "fxfuse: error: <cause>. <fix>"."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import FxfuseError, InputError
from .export import export_onnx
from .models import demo_inputs, demo_model
from .optimize import optimize, report_of

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a mistake argparse found (its message is printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "bench":
            from .bench import run as bench

            bench(args.suite, Path(args.out), args.batches, dtypes=tuple(args.dtypes), modes=tuple(args.modes),
                  onnx=not args.no_onnx, profile=args.profile, models=args.models, name=args.name)
            return 0
        if args.command == "analyze":
            from .analysis import run as analyze

            analyze(args)
            return 0
        if args.command == "demo":
            model, inputs = demo_model(), demo_inputs()
        else:
            model = load_model(args.model)
            inputs = tuple(random_input(shape, dtype, args.vocab) for shape, dtype in args.input_shape)
        with _quietly(args.quiet):
            run(model, inputs, args)
    except FxfuseError as e:
        print(f"fxfuse: error: {message(e)}", file=sys.stderr)
        return 2
    return 0


def run(model, inputs: tuple, args: argparse.Namespace) -> None:
    """optimize → print the report → export both graphs to ONNX and print their sizes."""
    gm = optimize(model, inputs, passes=args.passes, tau=args.tau, tolerance=args.tolerance,
                  conv_tolerance=args.conv_tolerance, approx_tolerance=args.approx_tolerance, capture=args.capture)
    report = report_of(gm)
    say = (lambda *_: None) if args.quiet else print
    say(report.table())
    exported = None if args.no_onnx else _export(gm, model, inputs, args)
    if exported is not None:
        say()
        say(exported)
    if args.json:  # the report, and what was exported ("onnx": null with --no-onnx)
        data = json.loads(report.to_json())
        data["onnx"] = None if exported is None else dataclasses.asdict(exported)
        Path(args.json).write_text(json.dumps(data, indent=2))


def _export(gm, model, inputs: tuple, args: argparse.Namespace):
    return export_onnx(gm, inputs, Path(args.out), baseline=model, opset=args.opset,
                       dynamic_batch=args.dynamic_batch, lean=args.lean)


def random_input(shape: tuple[int, ...], dtype: torch.dtype, vocab: int) -> torch.Tensor:
    """Normal floats; integers are token ids in [0, vocab); bools are random 0/1 (masks)."""
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 2 if dtype == torch.bool else vocab, shape).to(dtype)


def load_model(spec: str):
    """``path/to/file.py:factory`` → the module ``factory()`` returns (``:model`` by default)."""
    path, _, name = spec.partition(":")
    name = name or "model"
    if not Path(path).is_file():
        raise InputError(f"model file {path!r} does not exist. Give a Python file, e.g. models/mine.py:build.")
    try:
        namespace = runpy.run_path(path)
    except Exception as e:
        raise InputError(f"running {path} failed: {type(e).__name__}: {_first_line(e)}. "
                         "Fix the file so that it imports.") from e
    if name not in namespace:
        raise InputError(f"{path} defines no {name!r}. Define a function {name}() that returns the model, "
                         f"or name another one with {path}:other_name.")
    factory = namespace[name]
    if callable(factory) and not isinstance(factory, torch.nn.Module):
        try:
            factory = factory()
        except Exception as e:
            raise InputError(f"calling {name}() of {path} failed: {type(e).__name__}: {_first_line(e)}. "
                             f"Fix {name}() so that it returns the model.") from e
    if not isinstance(factory, torch.nn.Module):
        raise InputError(f"{path}:{name} gives a {type(factory).__module__}.{type(factory).__qualname__}, not a "
                         f"torch.nn.Module. Make {name}() return the model (an nn.Module in eval mode).")
    return factory


def message(e: BaseException) -> str:
    """``e``'s message, whose first line names the root cause: when it does not already quote the
    innermost exception it was raised from (an error relayed from deep inside torch), that
    exception's first line is added to it."""
    first, newline, rest = str(e).strip().partition("\n")
    root, seen = e, {id(e)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    cause = _first_line(root)
    if root is not e and cause and cause[:200] not in first:
        first = f"{first} (caused by {type(root).__name__}: {cause[:300]})"
    return first + newline + rest


def _first_line(e: BaseException) -> str:
    return str(e).strip().partition("\n")[0]


@contextmanager
def _quietly(quiet: bool):
    """For the run: torch's and onnxscript's log warnings off (fxfuse's own messages name what went
    wrong: torch.export's graph dumps and the ONNX opset converter's tracebacks would come before
    them), and with ``--quiet`` FXFUSE_QUIET=1 (no progress bars). Everything is restored after."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript")]
    levels, before = [log.level for log in loggers], os.environ.get("FXFUSE_QUIET")
    for log in loggers:
        log.setLevel(logging.ERROR)
    if quiet:
        os.environ["FXFUSE_QUIET"] = "1"
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        if before is None:
            os.environ.pop("FXFUSE_QUIET", None)
        else:
            os.environ["FXFUSE_QUIET"] = before


def _input_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    shape, _, dtype = text.partition(":")
    if (dtype or "float32") not in DTYPES:
        raise argparse.ArgumentTypeError(f"{dtype!r} is not a dtype. Use one of {', '.join(DTYPES)}, e.g. 1,128:int64")
    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{shape!r} is not a shape. Write positive sizes separated by commas, "
                                         "e.g. 1,3,224,224 or 1,128:int64")
    return dims, DTYPES[dtype or "float32"]


def _number(kind: type, minimum: float, example: str):
    """An argparse type: a ``kind`` (int or float) ≥ ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} ≥ {minimum}. Give e.g. {example}")
        return value
    return parse


def _pass_names() -> dict:
    from .passes import ALL_PASSES

    return {p.name: p for p in ALL_PASSES}


def _pass(name: str):
    passes = _pass_names()
    if name not in passes:
        raise argparse.ArgumentTypeError(f"{name!r} is not a pass. Use one of {', '.join(passes)}")
    return passes[name]


def _opset(text: str) -> int:
    import onnx

    latest = onnx.defs.onnx_opset_version()
    if not (text.isdigit() and 1 <= int(text) <= latest):
        raise argparse.ArgumentTypeError(f"{text!r} is not an ONNX opset. Give one from 1 to {latest} "
                                         "(the exporter writes 18 and converts to others when it can)")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes print one line, "fxfuse: error: ...", and point to --help."""

    def error(self, message: str):
        self.exit(2, f"fxfuse: error: {message}. See {self.prog} --help.\n")


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        this_version = version("fxfuse")
    except PackageNotFoundError:
        this_version = "unknown (not installed)"
    parser = _Parser(prog="fxfuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fxfuse {this_version}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize the built-in demo model, print the report, write ONNX")
    opt = sub.add_parser("optimize", help="optimize a model from a Python file, print the report, write ONNX")
    opt.add_argument("model", help="path/to/file.py:factory (a function returning an nn.Module in eval mode)")
    opt.add_argument("--input-shape", type=_input_shape, action="append", required=True, metavar="SHAPE[:DTYPE]",
                     help="one random example input, e.g. 1,3,224,224 or 1,128:int64; repeat it for each input of "
                          f"forward, in order. DTYPE: {', '.join(DTYPES)} (default float32)")
    opt.add_argument("--vocab", type=_number(int, 1, "100"), default=100,
                     help="integer inputs are random token ids in [0, VOCAB) (default 100)")
    names = ", ".join(_pass_names())
    from .passes import DEFAULT_PASSES

    for p, default in ((demo, "fxfuse-demo.onnx"), (opt, "model.onnx")):
        p.add_argument("--passes", type=_pass, nargs="+", metavar="NAME",
                       help=f"the passes to run, in order: {names} "
                            f"(default: {' '.join(q.name for q in DEFAULT_PASSES)})")
        p.add_argument("--tau", type=_number(float, 0, "1e-4"), default=1e-4,
                       help="PReLU slopes within tau of 1 are collapsed, approximately (default 1e-4)")
        p.add_argument("--tolerance", type=_number(float, 0, "1e-4"), default=1e-5,
                       help="max relative error of an exact rewrite (default 1e-5)")
        p.add_argument("--conv-tolerance", type=_number(float, 0, "1e-4"), default=1e-4,
                       help="max relative error of a composed convolution (default 1e-4)")
        p.add_argument("--approx-tolerance", type=_number(float, 0, "1e-4"), default=1e-2,
                       help="max relative error of an approximate collapse, slope within tau of 1 (default 1e-2)")
        p.add_argument("--capture", choices=["auto", "export", "fx"], default="auto",
                       help="torch.export, symbolic_trace, or auto: export first (default)")
        p.add_argument("--out", default=default, help=f"ONNX file to write (default {default})")
        p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
        p.add_argument("--opset", type=_opset, help="ONNX opset (default: the exporter's own; the export report names it)")
        p.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=True,
                       help="make dim 0 of every input symbolic in the ONNX file, checked at batch 1 and 7 too "
                            "(default on)")
        p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=True,
                       help="fold the exporter's static shape arithmetic and drop no-op nodes (default on)")
        p.add_argument("--json", help="also write the report as JSON to this file")
        p.add_argument("--quiet", action="store_true", help="print nothing but errors, draw no progress bars")
    analyze = sub.add_parser("analyze", help="what LayerCollapse and FF tying could save on a model "
                                             "(parameters, MACs), before training")
    from .analysis import add_arguments

    add_arguments(analyze)
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
    return parser


if __name__ == "__main__":
    sys.exit(main())
