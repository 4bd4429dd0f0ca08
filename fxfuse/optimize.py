"""``optimize``: capture → passes (each rewrite verified) → end-to-end check → report."""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .capture import capture as capture_graph
from .capture import EAGER_KEY, check_inputs
from .errors import InputError, TraceError, UnsupportedModelError, VerificationError
from .inputs import Inputs, as_inputs
from .pass_manager import Options, Pass, run_passes
from .verify import full_precision, precision_floor, propagate_shapes, rel_error
from .progress import progress
from .report import Report, count_macs, count_params
from .tie import Tie, run_tie

REPORT_ATTRIBUTE = "fxfuse_report"  # a plain attribute: GraphModule pickling keeps those, not ``meta``


def optimize(model: nn.Module | torch.export.ExportedProgram, example_inputs: Any = None, *,
             passes: Sequence[Pass] | None = None, tau: float = 1e-4, force: bool = False, tolerance: float = 1e-5,
             conv_tolerance: float = 1e-4, approx_tolerance: float = 1e-2, inplace: bool = False,
             capture: str = "auto", leaf_modules: Iterable[type] = (), concrete_args: dict | None = None,
             tie: Tie | None = None) -> fx.GraphModule:
    """Return a smaller ``GraphModule`` computing what ``model`` computes; ``report_of(gm)`` says how.

    ``model``: an ``nn.Module`` (captured by ``capture``: "export" = torch.export, "fx" =
    symbolic_trace, "auto" = the first that works, see ``fxfuse.capture``), an ``ExportedProgram``,
    or a GraphModule (``ep.module()``, symbolic_trace). ``example_inputs``: a tensor, a tuple of
    positional arguments (``None`` for optional ones) or a dict of keyword arguments.

    With ``example_inputs`` every rewrite is checked on the activations they produce (max relative
    error ≤ ``tolerance``; ``conv_tolerance`` for composed convs; ``approx_tolerance`` for PReLU
    slopes within ``tau`` of 1 but not 1), and the whole graph is checked against the original
    (which must give the same output twice: a model random in eval mode is refused).
    Without them only provably exact rewrites run. ``model`` is left unchanged: the rewrite works
    on a deep copy unless ``inplace=True`` (then the result shares the untouched layers' tensors);
    every check runs on copies of the inputs and puts the buffers back as they were.

    The result computes the model's function on every input the model accepts, or refuses what it
    is specialised to: a rank a rewrite's exactness depends on (Linear → BatchNorm1d proven on 2-D
    examples raises AssertionError on 3-D inputs; the report row says "holds for rank-2 inputs
    only"), and in an exported graph the sizes torch.export fixed (a batch of 1: InputError).
    Arguments that are None or Python scalars in the call are constants of a symbolic_trace graph.

    ``tie=fxfuse.Tie(...)`` (opt-in, approximate) then merges repeated feed-forward sublayers so
    that several blocks share one set of weights; its rows join the report and its end-to-end
    error is ``report.tie_error``.
    """
    start = time.perf_counter()
    inputs = as_inputs(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with progress(desc="fxfuse optimize", total=4) as bar:  # on a terminal; FXFUSE_QUIET=1 silences it
        bar.set_postfix_str("capture")
        gm = _optimize(model, inputs, bar, passes, tie, capture=capture, inplace=inplace, leaf_modules=leaf_modules,
                       concrete_args=concrete_args, tau=tau, force=force, tolerance=tolerance,
                       conv_tolerance=conv_tolerance, approx_tolerance=approx_tolerance)
    report_of(gm).seconds = time.perf_counter() - start
    return gm


def _optimize(model, inputs, bar, passes, tie, *, capture, inplace, leaf_modules, concrete_args, **options):
    from fxfuse.passes import DEFAULT_PASSES

    start = time.perf_counter()
    gm = capture_graph(model, inputs, method=capture, inplace=inplace, leaf_modules=leaf_modules,
                       concrete_args=concrete_args)
    eager = gm.meta.pop(EAGER_KEY, None)
    options = Options(**options, data_free=inputs is None)
    report = Report(params_before=count_params(gm), capture=gm.meta["fxfuse_capture"],
                    capture_seconds=time.perf_counter() - start)
    bar.update()
    bar.set_postfix_str("checks")
    reference = None
    if inputs is not None:
        reference = check_inputs(gm, inputs)
        _refuse_random_output(gm, inputs, reference, options.tolerance)
        if eager is not None:
            _check_capture(gm, eager, reference, options.tolerance)
        report.macs_before = count_macs(gm)
    bar.update()
    bar.set_postfix_str("passes")
    report.rows = run_passes(gm, DEFAULT_PASSES if passes is None else passes, options, inputs)
    report.params_after = count_params(gm)
    bar.update()
    bar.set_postfix_str("end-to-end check")
    if inputs is not None:
        _check_end_to_end(gm, model, inputs, reference, report)
    if tie is not None:
        _run_tie(gm, tie, inputs, reference, report)
    bar.update()
    setattr(gm, REPORT_ATTRIBUTE, report)
    return gm


def report_of(gm: fx.GraphModule) -> Report:
    """The report ``optimize`` attached to the module it returned (kept by torch.save / torch.load)."""
    report = getattr(gm, REPORT_ATTRIBUTE, None)
    if report is None:
        raise InputError(f"{type(gm).__name__} carries no fxfuse report: report_of takes what fxfuse.optimize returned.")
    return report


def _run_tie(gm: fx.GraphModule, tie: Tie, inputs, reference, report: Report) -> None:
    report.rows += run_tie(gm, tie, inputs)
    report.params_after = count_params(gm)
    if inputs is not None:  # MACs are unchanged by tying: one module computes at every site
        report.tie_error = rel_error(propagate_shapes(gm, inputs), reference)


def _check_end_to_end(gm: fx.GraphModule, model: nn.Module, inputs: tuple, reference, report: Report) -> None:
    """Optimized vs original on the example inputs. Past the largest tolerance a rewrite was allowed,
    ask float64: the optimized graph passes if it is no further from the float64 original than the
    float32 original is, plus that tolerance (ill-conditioned ops downstream of a rewrite, such as a
    LayerNorm of a nearly constant vector, amplify rounding in both alike)."""
    outputs = propagate_shapes(gm, inputs)
    report.macs_after = count_macs(gm)
    report.error = rel_error(outputs, reference)
    allowed = max([r.tolerance for r in report.applied] or [0.0])
    if report.error <= allowed:
        return
    try:
        report.error_vs_float64, report.original_vs_float64 = float64_errors(model, inputs, outputs, reference)
    except Exception as e:  # an exported graph may hold float32 casts or constants
        raise VerificationError(
            f"the optimized graph differs from the original by {report.error:.2e} (max relative error), more than "
            f"the {allowed:g} its rewrites were allowed one by one, and the float64 check that could clear it does "
            f"not run on this model ({type(e).__name__}: {str(e)[:200]}). Fix: pass the nn.Module rather than an "
            "exported program, or run with passes=[...] to find the pass at fault.") from e
    if not report.error_vs_float64 <= report.original_vs_float64 + allowed:
        raise VerificationError(
            f"the optimized graph differs from the original by {report.error:.2e} (max relative error), "
            f"more than the {allowed:g} its rewrites were allowed one by one, and it is further from the "
            f"float64 original ({report.error_vs_float64:.2e}) than the original is ({report.original_vs_float64:.2e}). "
            f"Rewrites:\n{report.table()}\n"
            "Fix: lower tau or approx_tolerance, or run with passes=[...] to find the pass at fault."
        )


def _check_capture(gm: fx.GraphModule, eager, reference, tolerance: float) -> None:
    """Raise ``TraceError`` when the captured graph does not compute what the model computes on the
    example inputs (before any rewrite): a capture that dropped something (a hook, an in-place alias)."""
    drift = rel_error(reference, eager)
    if drift > max(tolerance, precision_floor(_dtype(gm))):
        raise TraceError(
            f"the {gm.meta['fxfuse_capture']} capture of the model computes something else than the model on the "
            f"example inputs (max relative error {drift:.2e}): the capture dropped part of forward (hooks on the "
            "root module, an in-place update through an alias, Python state). Fix: try the other capture "
            "(capture='fx' or capture='export'), or move that logic out of forward.")


def _dtype(gm: fx.GraphModule) -> torch.dtype:
    return next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)


def _refuse_random_output(gm: fx.GraphModule, inputs: Inputs, reference, tolerance: float) -> None:
    """Raise ``UnsupportedModelError`` when a second call of the captured model on the example
    inputs is further than ``tolerance`` (at least the dtype's precision floor) from the first
    (``reference``): then no rewrite can be checked against it."""
    with full_precision():
        drift = rel_error(propagate_shapes(gm, inputs), reference)
    if drift > max(tolerance, precision_floor(_dtype(gm))):
        raise UnsupportedModelError(
            f"the model's output changes from one call to the next on the same inputs (by {drift:.2e}), so no "
            "rewrite can be checked against it: something in forward is random in eval mode, e.g. "
            "F.dropout(x, p, training=True) or torch.rand. Fix: make eval-mode forward deterministic "
            "(F.dropout(x, p, self.training)).")


def float64_errors(model: nn.Module, inputs: Inputs, *outputs) -> list[float]:
    """Max relative error of each of ``outputs`` against ``model`` computed in float64 on ``inputs``."""
    exact = float64_copy(model)
    with full_precision():
        truth = as_inputs(inputs).map(lambda x: x.double() if x.is_floating_point() else x)(exact)
    return [rel_error(out, truth) for out in outputs]


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model``: parameters, buffers and the plain tensor attributes that
    ``.double()`` leaves alone (``self.scale = torch.tensor(0.5)``)."""
    exact = copy.deepcopy(model).double()
    for module in exact.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(module, name, value.double())
    return exact
