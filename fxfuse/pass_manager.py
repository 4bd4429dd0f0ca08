"""Runs an ordered list of passes to a fixed point, verifying each rewrite before it is applied.

A pass is stateless: ``name`` and ``candidates(gm, options) -> list[Candidate]``. Each candidate
is a region of the graph — a chain ``first -> middle* -> last``, or any set of nodes with several
inputs and outputs (``fxfuse.match.Region``) — plus either what replaces it (a module for a chain,
a GraphModule spliced in for any region) or the reason it is left alone. The manager keeps the
books: overlap filtering, local verification against the original region on recorded activations
(every output), graph surgery in the graph's dialect, and the report rows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import PassError
from .ir import fetch_attr
from .match import Chain, Region, chain_where
from .report import Row, node_macs, weight_macs
from .rewrite import replace_region, tidy
from .verify import precision_floor, record, region_error, dtype_of


@dataclass
class Options:
    """Knobs shared by the passes."""

    tau: float = 1e-4  # PReLU slopes within τ of 1 count as linear (LayerCollapse's threshold)
    force: bool = False  # apply even where the compression gain (Eq. 7 / Eq. 8) is not positive
    tolerance: float = 1e-5  # max relative error of an exact rewrite
    conv_tolerance: float = 1e-4  # ... of a conv composition (longer accumulations)
    approx_tolerance: float = 1e-2  # ... of an approximate rewrite (slopes within τ but not 1)
    data_free: bool = False  # no example inputs: only provably exact rewrites, no shapes


@dataclass
class Candidate:
    """A matched region and what to do with it: ``replacement`` to apply, or ``reason`` to skip.
    The replacement takes the region's inputs and returns its outputs (a tuple for several)."""

    region: Chain | Region
    replacement: nn.Module | None = None
    reason: str = ""
    exact: bool = True
    tolerance: float = 1e-5
    # approximate rewrites: recorded input -> per-sample L2 bounds (Eq. 4–5, proven) on the error
    bounds: Callable[[torch.Tensor], tuple[float, float]] | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.region.nodes)


class Pass(Protocol):
    name: str

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]: ...


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], options: Options,
               inputs: tuple | None) -> list[Row]:
    """Apply every pass until it finds nothing more to do; return one report row per decision."""
    rows: list[Row] = []
    for i, p in enumerate(passes):
        try:
            rows += _run_to_fixed_point(gm, p, options, inputs)
        except Exception as e:
            before = ", ".join(q.name for q in passes[:i]) or "none"
            raise PassError(f"pass {p.name!r} failed (passes run before it: {before}): "
                            f"{type(e).__name__}: {e}") from e
    return rows


MAX_ROUNDS = 64  # a chain of 2^64 layers collapses in fewer rounds; a pass needing more never settles


def _run_to_fixed_point(gm, p: Pass, options: Options, inputs) -> list[Row]:
    rows, rejected = [], set()
    for _ in range(MAX_ROUNDS):
        found = [c for c in p.candidates(gm, options) if c.key not in rejected]
        runnable = [c.replacement is not None and (c.exact or not options.data_free) for c in found]
        todo = _without_overlaps([c for c, ok in zip(found, runnable) if ok])
        skipped = [c for c, ok in zip(found, runnable) if not ok]
        wanted = {x for c in todo for x in c.region.inputs}
        values = record(gm, inputs, wanted) if inputs is not None and todo else {}
        interp = fx.Interpreter(gm) if values else None
        applied = 0
        for c in todo:
            xs = [values[x] for x in c.region.inputs] if values else None
            if xs:
                c.tolerance = max(c.tolerance, precision_floor(dtype_of(xs)))
            error, bounds, macs_after = region_error(interp, c, xs) if xs else (None, (None, None), None)
            accepted = error is None or error <= c.tolerance
            row = _row(gm, p.name, c, error, accepted, macs_after)
            row.bound_eq4, row.bound_proven = bounds
            if not accepted:
                row.reason = f"error {error:.2e} > tolerance {c.tolerance:g}"
                rejected.add(c.key)
            else:
                row.reason = _warn_about_hooks(gm, c, p.name)
                replace_region(gm, c.region, c.replacement, p.name)
                applied += 1
            rows.append(row)
        if not applied:
            for c in skipped:
                reason = c.reason or "approximate (PReLU slope ≠ 1): needs example inputs to measure its error"
                rows.append(Row(p.name, "skipped", chain_where(gm, c.region), reason=reason))
            return rows
        tidy(gm)
    raise RuntimeError(f"still rewriting after {MAX_ROUNDS} rounds: the pass never reaches a fixed point")


def _warn_about_hooks(gm: fx.GraphModule, c: Candidate, pass_name: str) -> str:
    """Warn (and return a note) when modules with hooks are rewritten away: their hooks stop running."""
    hooked = [n.target for n in c.region.nodes if n.op == "call_module" and _has_hooks(gm.get_submodule(n.target))]
    if not hooked:
        return ""
    note = f"hooks on {', '.join(hooked)} no longer run (the module was rewritten away)"
    warnings.warn(f"fxfuse {pass_name}: {note}; exclude the pass or remove the hooks to silence this", stacklevel=4)
    return note


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _without_overlaps(candidates: list[Candidate]) -> list[Candidate]:
    """Greedy in graph order: a node is rewritten by at most one candidate per round."""
    taken, kept = set(), []
    for c in candidates:
        nodes = set(c.region.nodes) | set(c.region.inputs)
        if not nodes & taken:
            kept.append(c)
            taken |= set(c.region.nodes)
    return kept


def _row(gm, pass_name: str, c: Candidate, error: float | None, accepted: bool, macs_after: int | None) -> Row:
    """The report row of a verified candidate; a rejected one shows the region unchanged."""
    macs = [node_macs(gm, n) for n in c.region.nodes]
    out_meta = c.region.outputs[0].meta.get("tensor_meta")
    weight = getattr(c.replacement, "weight", None)
    known = all("tensor_meta" in o.meta for o in c.region.outputs) and None not in macs
    macs_before = sum(macs) if known else None
    if macs_after is None and known and not isinstance(c.replacement, fx.GraphModule):
        macs_after = 0 if weight is None else weight_macs(out_meta.shape, weight)
    params_before = sum(p.numel() for p in _params(gm, c.region.nodes))
    params_after = sum(p.numel() for p in c.replacement.parameters())
    if not accepted:
        params_after, macs_after = params_before, macs_before
    return Row(pass_name, "applied" if accepted else "rejected", chain_where(gm, c.region),
               params_before=params_before, params_after=params_after, macs_before=macs_before,
               macs_after=macs_after if known else None, error=error, exact=c.exact, tolerance=c.tolerance)


def _params(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[torch.Tensor]:
    """The parameters the chain's nodes read (modules they call, get_attr inputs), each once."""
    found = {}
    for node in nodes:
        if node.op == "call_module":
            found.update((id(p), p) for p in gm.get_submodule(node.target).parameters())
        for a in node.all_input_nodes:
            if a.op == "call_function" and a.args and isinstance(a.args[0], fx.Node):  # aten.t(weight)
                a = a.args[0]
            if a.op == "get_attr":
                t = fetch_attr(gm, a.target)
                if isinstance(t, nn.Parameter):
                    found[id(t)] = t
    return list(found.values())

