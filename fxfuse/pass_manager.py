"""Runs an ordered list of passes to a fixed point, verifying each rewrite before it is applied.

A pass is stateless: ``name`` and ``candidates(gm, options) -> list[Candidate]``. Each candidate
is a region of the graph — a chain ``first -> middle* -> last``, or any set of nodes with several
inputs and outputs (``fxfuse.match.Region``) — plus either what replaces it (a module for a chain,
a GraphModule spliced in for any region) or the reason it is left alone. The manager keeps the
books: overlap filtering, local verification against the original region on recorded activations
(every output), graph surgery in the graph's dialect, and the report rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import PassError
from .ir import fetch_attr
from .match import Chain, Region, chain_where, updated_within
from .report import Row, module_macs, node_macs
from .rewrite import guard_rank, replace_region, tidy
from .verify import all_finite, dtype_of, precision_floor, record, region_error


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
    """A matched region and what to do with it: ``replacement`` to apply, or ``reason`` to skip
    (beside a replacement, ``reason`` says why it pays, for the report). The replacement takes the
    region's inputs and returns its outputs (a tuple for several)."""

    region: Chain | Region
    replacement: nn.Module | None = None
    reason: str = ""
    exact: bool = True
    tolerance: float = 1e-5
    # approximate rewrites: recorded input -> per-sample L2 bounds (Eq. 4–5, proven) on the error
    bounds: Callable[[torch.Tensor], tuple[float, float]] | None = None
    # exact only when the region's (first) input has this rank, seen on the example inputs: the
    # rewritten graph checks it (``fxfuse.rewrite.guard_rank``) so other ranks fail loudly
    input_rank: int | None = None
    # a replacement too costly to make for every candidate (a weight product): made by the manager
    # only for a candidate it applies; ``cost`` is that work (multiply-adds): of two overlapping
    # candidates the cheaper goes first, so a run of Linears is multiplied in a cheap order
    build: Callable[[], nn.Module] | None = None
    cost: float = 0.0

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


UNMEASURABLE = "the activations it reads hold NaN or Inf on the example inputs, so its error cannot be measured"
MAX_ROUNDS = 64  # a chain of 2^64 layers collapses in fewer rounds; a pass needing more never settles


def _run_to_fixed_point(gm, p: Pass, options: Options, inputs) -> list[Row]:
    rows, rejected = [], set()
    for _ in range(MAX_ROUNDS):
        found = [_unless_unsafe(gm, c) for c in p.candidates(gm, options) if c.key not in rejected]
        runnable = [(c.replacement is not None or c.build is not None) and (c.exact or not options.data_free)
                    for c in found]
        todo = _without_overlaps([c for c, ok in zip(found, runnable) if ok])
        for c in todo:
            c.replacement = c.replacement if c.replacement is not None else c.build()
        skipped = [c for c, ok in zip(found, runnable) if not ok]
        wanted = {x for c in todo for x in c.region.inputs}
        values = record(gm, inputs, wanted) if inputs is not None and todo else {}
        interp = fx.Interpreter(gm) if values else None
        readers = Readers.of_graph(gm) if todo else None
        applied = 0
        for c in todo:
            xs = [values[x] for x in c.region.inputs] if values else None
            if xs and not all_finite(xs):  # NaN/Inf reached the region: its error cannot be measured
                if not c.exact:
                    rows.append(Row(p.name, "skipped", chain_where(gm, c.region), reason=UNMEASURABLE))
                    rejected.add(c.key)
                    continue
                xs = None  # a provably exact rewrite is applied as without example inputs
            if xs:
                c.tolerance = max(c.tolerance, precision_floor(dtype_of(xs)))
            error, bounds, macs_after = region_error(interp, c, xs) if xs else (None, (None, None), None)
            accepted = error is None or error <= c.tolerance
            row = _row(gm, p.name, c, error, accepted, macs_after, readers)
            row.bound_eq4, row.bound_proven = bounds
            if not accepted:
                row.reason = f"error {error:.2e} > tolerance {c.tolerance:g}"
                rejected.add(c.key)
            else:
                row.reason = c.reason  # an applied candidate's reason says why it pays
                if c.input_rank is not None:
                    guard_rank(gm, c.region, c.input_rank, f"fxfuse's {p.name} of {', '.join(row.where)}")
                    row.reason = "; ".join(filter(None, (
                        c.reason, f"holds for rank-{c.input_rank} inputs only: checked on every call")))
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


def _unless_unsafe(gm: fx.GraphModule, c: Candidate) -> Candidate:
    """``c``, or a skip when applying it could change what else the model does: an input updated
    in place between its nodes, or a module with hooks it would rewrite away (a hook may change the
    output, or record it; neither may stop silently)."""
    if c.replacement is None and c.build is None:
        return c
    hooked = [n.target for n in c.region.nodes if n.op == "call_module" and _has_hooks(gm.get_submodule(n.target))]
    reason = updated_within(c.region) or (
        f"{', '.join(hooked)} has hooks, which would stop running: remove them to allow the rewrite" if hooked else "")
    return Candidate(c.region, reason=reason) if reason else c


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _without_overlaps(candidates: list[Candidate]) -> list[Candidate]:
    """Greedy, cheapest first (``Candidate.cost``), then in graph order: a node is rewritten by at
    most one candidate per round. For VGG's classifier (25088 → 4096 → 4096 → 1000) that forms
    W3·W2 first (1.7e10 multiply-adds) and then (W3·W2)·W1 (1.0e11), not W2·W1 (4.2e11) first."""
    taken, kept = set(), []
    for c in sorted(candidates, key=lambda c: c.cost):
        nodes = set(c.region.nodes) | set(c.region.inputs)
        if not nodes & taken:
            kept.append(c)
            taken |= set(c.region.nodes)
    return kept


def _row(gm, pass_name: str, c: Candidate, error: float | None, accepted: bool, macs_after: int | None,
         readers: "Readers") -> Row:
    """The report row of a verified candidate; a rejected one shows the region unchanged.

    Counted so that the applied rows add up to the model's totals. MACs: ``node_macs`` over the
    region's nodes before, the replacement by the same rule after (``module_macs``; a GraphModule's
    ``count_macs``, ``macs_after``, from its verification), the count ``count_macs`` sums over the
    graph. Parameters: before, those the rewrite frees (``Readers.freed``); after, those it adds (a
    tensor the graph keeps anyway is not added). An applied row's nodes stop counting as readers
    (``_forget``), so the next rewrite of the round that removes a shared weight's last reader
    frees it."""
    macs = [node_macs(gm, n) for n in c.region.nodes]
    out_meta = c.region.outputs[0].meta.get("tensor_meta")
    known = all("tensor_meta" in o.meta for o in c.region.outputs) and None not in macs
    macs_before = sum(macs) if known else None
    if macs_after is None and known and not isinstance(c.replacement, fx.GraphModule):
        macs_after = module_macs(c.replacement, out_meta.shape)
    freed = readers.freed(gm, c.region.nodes)
    params_before = sum(p.numel() for p in freed)
    params_after = sum(p.numel() for p in _added(c.replacement, freed, readers))
    if not accepted:
        params_after, macs_after = params_before, macs_before
    else:
        _forget(readers, gm, c)
    return Row(pass_name, "applied" if accepted else "rejected", chain_where(gm, c.region),
               params_before=params_before, params_after=params_after, macs_before=macs_before,
               macs_after=macs_after if known else None, error=error, exact=c.exact, tolerance=c.tolerance)


def _added(replacement: nn.Module, freed: list[torch.Tensor], readers: "Readers") -> list[torch.Tensor]:
    """The replacement's parameters the model gains: not those another node of the graph reads
    already (a reused tensor that stays anyway); one the rewrite frees and reuses counts on both sides."""
    kept = {id(p) for p in freed}
    return [p for p in replacement.parameters() if id(p) in kept or id(p) not in readers.of]


def _forget(readers: "Readers", gm: fx.GraphModule, c: Candidate) -> None:
    """Update ``readers`` for the rewrite of ``c`` about to be applied: its nodes read nothing any
    more, and a tensor its replacement reuses is read by that (a marker standing for the new nodes)."""
    inside = set(c.region.nodes)
    for p in _params(gm, c.region.nodes, readers.side):
        readers.of[id(p)] = readers.of.get(id(p), set()) - inside
    for p in c.replacement.parameters():
        if id(p) in readers.of:
            readers.of[id(p)].add(c)


def _params(gm: fx.GraphModule, nodes: list[fx.Node], side: set) -> list[torch.Tensor]:
    """The parameters the chain's nodes read (modules they call, get_attr inputs), each once."""
    return list({id(p): p for node in nodes for p in _read_params(gm, node, side)}.values())


@dataclass
class Readers:
    """Which nodes read each parameter (by id), with the weight-side nodes (get_attrs and ops on
    get_attrs alone, such as ``aten.t(weight)``), which count as part of the op that reads them."""

    side: set
    of: dict

    @classmethod
    def of_graph(cls, gm: fx.GraphModule) -> "Readers":
        side = set()
        for node in gm.graph.nodes:  # in graph order: a node's inputs are classified before it
            if node.op == "get_attr" or (node.op == "call_function" and node.all_input_nodes
                                         and all(a in side for a in node.all_input_nodes)):
                side.add(node)
        of: dict[int, set] = {}
        for node in gm.graph.nodes:
            if node not in side:
                for p in _read_params(gm, node, side):
                    of.setdefault(id(p), set()).add(node)
        return cls(side, of)

    def freed(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> list[torch.Tensor]:
        """The parameters only ``nodes`` read: what their rewrite frees (a weight tied to an
        embedding that stays, or a module called elsewhere too, is not)."""
        inside = set(nodes)
        return [p for p in _params(gm, nodes, self.side) if self.of.get(id(p), set()) <= inside]


def _read_params(gm: fx.GraphModule, node: fx.Node, side: set):
    if node.op == "call_module":
        yield from gm.get_submodule(node.target).parameters()
    for a in node.all_input_nodes:
        for attr in _attr_sources(a, side):
            t = fetch_attr(gm, attr.target)
            if isinstance(t, nn.Parameter):
                yield t


def _attr_sources(node: fx.Node, side: set) -> list[fx.Node]:
    """The get_attr nodes a weight-side ``node`` is computed from (none for an activation)."""
    if node.op == "get_attr":
        return [node]
    return [a for x in node.all_input_nodes for a in _attr_sources(x, side)] if node in side else []
