"""Module-level LayerCollapse: a prepared model's linear FF pairs become one Linear, class kept.

    prepared = fxfuse.prepare_collapse(bert, inputs, which=0.4)   # still a BertForSequenceClassification
    ...                                                           # fine-tune: Trainer, finetune_collapse
    small = fxfuse.collapse(prepared, inputs)                     # same class, fewer parameters

The graph finds the pairs (``fxfuse.prepare.ff_pairs``: feed-forward sublayers up → φ → down whose
layers and activation are each one submodule). Where φ is an ``nn.PReLU`` whose slopes are within
τ of 1, LayerCollapse Eq. 3 gives one map (``fxfuse.affine.collapsed_linear``, float64):

    y = W2·PReLU_α(W1·x + b1) + b2 ≈ (W2·W1)·x + (W2·b1 + b2),

exact when every α = 1, otherwise approximate (its error is measured on the example inputs and
must stay within ``approx_tolerance``). The module tree then gets: the up layer and the PReLU
replaced by ``nn.Identity``, the down layer by an ``nn.Linear(n_in, n_out)`` holding the product
(Eq. 7's gain, 1 − n_in·n_out / (n_h·(n_in + n_out)), is positive, so it is smaller); the
replacements are recorded for ``fxfuse.from_pretrained`` (``fxfuse.module_tree``). Everything else,
the residual and the norms included, is untouched.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .affine import ChannelAffine, collapsed_linear
from .capture import EAGER_KEY, _copy, capture as capture_graph, run_model
from .errors import InputError, UnsupportedModelError, VerificationError
from .inputs import as_inputs
from .module_tree import replace_modules, without_cache
from .optimize import REPORT_ATTRIBUTE
from .prepare import FFPair, ff_pairs, module_slope
from .report import Report, Row, count_params
from .verify import full_precision, precision_floor, record, rel_error

PASS_NAME = "collapse"


def collapse(model: nn.Module, example_inputs: Any, *, tau: float = 1e-4, tolerance: float = 1e-5,
             approx_tolerance: float = 1e-2, capture: str = "auto") -> nn.Module:
    """A copy of ``model``, of its own class, whose FF pairs with a PReLU of slopes within ``tau``
    of 1 are one ``nn.Linear`` each (see the module docstring); ``fxfuse.report_of`` gives a row per
    pair: its measured error on the example inputs, or why it was left alone.

    Each collapse is checked on the pair's own inputs (max relative error ≤ ``tolerance`` when
    exact, ≤ ``approx_tolerance`` when a slope is not exactly 1), and the whole copy against
    ``model`` on ``example_inputs``. ``model`` is not changed. Where nothing can be collapsed (a
    gated FF, a slope far from 1, an activation not yet prepared) the copy is returned as it was,
    the rows saying why, as ``fxfuse.optimize`` does.
    """
    start = time.perf_counter()
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise InputError("fxfuse.collapse needs example_inputs: each collapse is checked on them. "
                         "Fix: pass a batch the model takes, e.g. fxfuse.collapse(model, {'input_ids': ids}).")
    working = _copy(model).eval()
    with without_cache(working):
        captured = time.perf_counter()
        gm = capture_graph(working, inputs, method=capture, inplace=True)
        captured = time.perf_counter() - captured
        pairs, skipped = ff_pairs(gm)
        samples = record(gm, inputs, {n for p in pairs for n in (p.ff.x, p.ff.y)})
        reference = gm.meta.pop(EAGER_KEY)  # the model's own output on the inputs, before any change
        rows = [Row(PASS_NAME, "skipped", where, reason=reason) for where, reason in skipped]
        replacements: dict[str, nn.Module] = {}
        for pair in pairs:
            rows.append(_collapse_pair(working, pair, samples, replacements, tau, tolerance, approx_tolerance))
        if not rows:
            rows.append(Row(PASS_NAME, "skipped", [], reason="no feed-forward sublayer (Linear → activation → "
                                                             "Linear) found in the graph"))
        applied = [r for r in rows if r.status == "applied"]
        replace_modules(working, replacements)
        error = _check_end_to_end(working, inputs, reference, max(r.tolerance for r in applied)) if applied else 0.0
    working.train(model.training)
    report = Report(rows=rows, params_before=count_params(model), params_after=count_params(working),
                    error=error, capture=gm.meta["fxfuse_capture"], seconds=time.perf_counter() - start,
                    capture_seconds=captured)
    setattr(working, REPORT_ATTRIBUTE, report)
    return working


def _collapse_pair(model: nn.Module, pair: FFPair, samples: dict, replacements: dict, tau: float,
                   tolerance: float, approx_tolerance: float) -> Row:
    """Collapse one pair into ``replacements`` (path → module) if its PReLU is linear enough and
    the collapsed Linear reproduces the pair on its recorded inputs; the report row either way."""
    where = list(pair.where)
    if replacements.keys() & set(where):
        return Row(PASS_NAME, "skipped", where, reason="shares a layer with a pair collapsed just before: "
                                                       "call fxfuse.collapse again to collapse it too")
    prelu = model.get_submodule(pair.act)
    if type(prelu) is not nn.PReLU:
        fix = ("fxfuse.prepare_collapse and train its slope to 1 first" if module_slope(prelu) is not None
               else "no PReLU stands for it, so it cannot be prepared")
        return Row(PASS_NAME, "skipped", where, reason=f"the activation is a {type(prelu).__name__}, not a PReLU: {fix}")
    up, down = pair.ff.ups[0], pair.ff.down
    affine = ChannelAffine.identity(up.linear_weight.shape[0], up.weight.device).then_prelu(prelu.weight, tau)
    if isinstance(affine, str):
        return Row(PASS_NAME, "skipped", where, reason=affine)
    linear = collapsed_linear(up.linear_weight, up.bias, down.linear_weight, down.bias, affine)
    x, y = samples[pair.ff.x], samples[pair.ff.y]
    with torch.no_grad(), full_precision():
        error = rel_error(linear(x), y)
    allowed = max(tolerance if affine.exact else approx_tolerance, precision_floor(y.dtype))
    before = sum(t.numel() for d in (up, down) for t in (d.weight, d.bias) if t is not None) + prelu.weight.numel()
    after = count_params(linear)
    row = Row(PASS_NAME, "applied", where, params_before=before, params_after=after, error=error,
              exact=affine.exact, tolerance=allowed, reason=f"gain {pair.gain:.2f} (Eq. 7)" + (
                  "" if affine.exact else f"; approximate: max|α−1| = {affine.slope_deviation:.2g} ≤ τ"))
    if not error <= allowed:
        row.status, row.params_after, row.reason = "rejected", before, f"error {error:.2e} > tolerance {allowed:g}"
        return row
    replacements.update({pair.up: nn.Identity(), pair.act: nn.Identity(), pair.down: linear.train(model.training)})
    return row


def _check_end_to_end(model: nn.Module, inputs, reference, allowed: float) -> float:
    """The collapsed model against the original on the example inputs; ``VerificationError`` past
    ``allowed`` (the largest tolerance of a collapse), e.g. where code between the layers reads the
    hidden width."""
    try:
        outputs = run_model(model, inputs)
    except InputError as e:
        raise UnsupportedModelError(
            f"the model no longer runs with its FF pairs collapsed in place ({str(e).splitlines()[0]}): its code "
            "between the layers depends on them. Fix: collapse the graph, fxfuse.optimize(model, inputs).") from e
    with full_precision():
        error = rel_error(outputs, reference)
    if not error <= allowed:
        raise VerificationError(
            f"the collapsed model differs from the original by {error:.2e} (max relative error), more than the "
            f"{allowed:g} its collapses were allowed one by one: its code between the layers does more than the "
            "graph showed. Fix: collapse the graph, fxfuse.optimize(model, inputs).")
    return error
