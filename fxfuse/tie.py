"""Tie: merge repeated feed-forward sublayers and share one set of weights (opt-in, approximate).

    gm = fxfuse.optimize(model, example_inputs, tie=fxfuse.Tie(remove=4, calibration=batches, evaluate=val_loss))

Verma, Murray & Duh, "Merging Feed-Forward Sublayers for Compressed Transformers":
1. one pass over calibration data collects, for every FF at once, streaming float64 sums of the
   features just before the activation (Sec. 3.3; SwiGLU: the gated product, App. A);
2. each candidate window of adjacent, structurally identical FFs is aligned to its anchor
   (Eqs. 1–2), averaged (Eqs. 3–6) — or fused by O'Neill et al.'s "freeze"/"mix" — and scored by
   the user's ``evaluate`` on a copy of the model (Sec. 3.4), or ranked data-free by a weight
   measure (layer fusion Eqs. 2, 3, 5, Euclidean);
3. the best non-overlapping windows are tied: every FF of a window calls one shared module.

Merging is exact only when the aligned FFs are equal; the report gives each merge's measured
error on the FF outputs (first calibration batch) and ``Report.tie_error`` end to end.

Under ``torch.distributed`` (DDP, ``torchrun``) each rank passes its own shard of the calibration
data; the feature sums are all-reduced before the alignment (``alignment.all_reduce``), so every
rank finds the same permutations and merged weights as one process on the union of the shards.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .alignment import FeatureStats, FFWeights, all_reduce, average, cross_correlation, match_permutation, mix, permute
from .capture import capture
from .errors import InputError
from .feedforward import drop_sites, extract, find_feedforwards, find_in_extracted, group_feedforwards, tie_sites
from .inputs import as_inputs
from .progress import progress as progress_bar
from .verify import full_precision, precision_floor, record, rel_error
from .report import Row, count_params
from .similarity import MEASURES, distance, linear_cka_from_sums

ALIGNS = ("permute", "vanilla")
FUSES = ("mean", "freeze", "mix", "drop")
ANCHORS = ("first", "middle", "last")
PASS_NAME = "tie"


@dataclass
class Tie:
    """What to merge and how. ``remove``: FF sublayers to remove in all; ``window``: FFs per merged
    group (default ``remove + 1``, one group; ``remove`` must be a multiple of ``window − 1``).

    calibration: batches (a tensor or tuple of model inputs each) for the features; default the
        example inputs. ``mask(batch)`` may return a bool tensor of the batch's positions (e.g. the
        attention mask) to leave padding out of the features.
    evaluate: ``evaluate(model) -> float``, lower is better (e.g. validation loss): windows are
        scored by it (Sec. 3.4). Without it, ``select`` names a data-free measure. Under
        ``torch.distributed`` it must return the same value on every rank (e.g. all-reduce its own
        loss): ranks that choose different windows raise ``InputError``.
    select: 'evaluate' or one of 'cosine', 'kl', 'bures', 'euclidean' (layer fusion measures).
    align: 'permute' (Eqs. 1–2) or 'vanilla' (average without alignment, the paper's baseline).
    fuse: 'mean' (Eq. 6), 'freeze' (keep the member nearest the network's middle), 'mix' (random
        per-neuron choice, biases averaged) or 'drop' (layer-drop baseline: the window's FFs output
        zero; window defaults to ``remove``).
    anchor: 'first', 'middle' or 'last' FF of a window (Sec. 5.3).
    windows: explicit windows (lists of FF indices in graph order) instead of a search.
    distributed: sum the feature statistics over the ``torch.distributed`` ranks, each of which
        passes its own shard of ``calibration``. None (default): when a process group of more than
        one rank is initialized; False: never (a tie run on one rank alone); True: require one. A
        collective: every rank of the world must run the tie, on the same model and options.
    """

    remove: int = 1
    window: int | None = None
    calibration: Iterable | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    select: str | None = None
    align: str = "permute"
    fuse: str = "mean"
    anchor: str = "first"
    mask: Callable[[Any], torch.Tensor] | None = None
    windows: Sequence[Sequence[int]] | None = None
    seed: int = 0
    distributed: bool | None = None

    @property
    def size(self) -> int:
        return self.window or (self.remove if self.fuse == "drop" else self.remove + 1)

    @property
    def selector(self) -> str:
        return self.select or ("evaluate" if self.evaluate is not None else "bures")

    def check(self) -> None:
        """Raise ``InputError`` naming the bad option and the fix."""
        _choice("align", self.align, ALIGNS)
        _choice("fuse", self.fuse, FUSES)
        _choice("anchor", self.anchor, ANCHORS)
        _choice("select", self.selector, ("evaluate",) + MEASURES)
        if self.selector == "evaluate" and self.evaluate is None:
            raise InputError("Tie(select='evaluate') needs evaluate=callable(model) -> float (lower is better).")
        if self.distributed and not _process_group():
            raise InputError("Tie(distributed=True) needs an initialized torch.distributed process group. "
                             "Fix: call torch.distributed.init_process_group first (under torchrun), "
                             "or leave distributed=None.")
        per_window = self.removed_per_window
        if self.windows is None and (self.remove < 1 or per_window < 1 or self.remove % per_window):
            raise InputError(f"Tie(remove={self.remove}, window={self.window}): each window of {self.size} FFs "
                             f"removes {per_window}, which must divide remove ≥ 1. "
                             "Fix: pick window so that window − 1 divides remove "
                             "(window = remove + 1 for one group).")

    @property
    def removed_per_window(self) -> int:
        """FFs a window removes: all of them when dropped, all but one when merged."""
        return self.size if self.fuse == "drop" else self.size - 1

    @property
    def groups(self) -> int:
        return self.remove // self.removed_per_window


def run_tie(gm: fx.GraphModule, tie: Tie, example_inputs: tuple | None, target: Callable | None = None) -> list[Row]:
    """Find, score, merge and tie FF sublayers of ``gm``; return the report rows. ``target(gm, tie,
    ffs)`` makes what the ties are applied to: default ``GraphTarget``, ``gm`` itself in place
    (``fxfuse.module_tie`` applies them to the model's module tree instead)."""
    tie.check()
    ffs = find_feedforwards(gm)
    target = (target or GraphTarget)(gm, tie, ffs)
    rows: list[Row] = []
    candidates = target.placeable(_candidate_windows(tie, ffs, group_feedforwards(ffs), rows), rows)
    if not candidates:
        return rows
    batches = _batches(tie, example_inputs)
    by_evaluation = tie.selector == "evaluate"  # scores need every window's merge; data-free ones need none
    if not by_evaluation:
        scores = {w: _weight_score(tie, ffs, w) for w in candidates}
        chosen = _choose(tie, candidates, scores)
    planned = candidates if by_evaluation else chosen
    pairs = _pairs(tie, planned)
    distributed = tie.distributed is not False and _process_group() and torch.distributed.get_world_size() > 1
    stats, samples = collect_features(gm, ffs, batches if pairs else batches[:1], pairs, tie.mask,
                                      members={i for w in planned for i in w}, distributed=distributed)
    plans = {w: plan_window(tie, ffs, w, stats) for w in planned}
    if by_evaluation:
        scoring = progress_bar(candidates, desc="fxfuse tie scoring")
        scores = {w: _evaluation_score(target, tie, plans[w]) for w in scoring}
        chosen = _choose(tie, candidates, scores)
    if distributed:
        _same_on_every_rank(chosen)
    for w in candidates:
        rows.append(Row(PASS_NAME, "scored", [ffs[i].name for i in w], score=scores[w],
                        reason=f"window {list(w)} by {tie.selector}" + ("" if w in chosen else "; not chosen")))
    for w in chosen:
        problem = target.problem(plans[w], samples)
        if distributed:  # each rank checked its own first batch: skip on every rank if one failed
            problem = _first_of_ranks(problem)
        if problem:
            rows.append(Row(PASS_NAME, "skipped", [ffs[i].name for i in w], reason=problem))
        else:
            rows.append(target.apply(plans[w], samples))
    if len(chosen) < tie.groups:
        rows.append(Row(PASS_NAME, "skipped", [], reason=f"only {len(chosen)} non-overlapping window(s) of {tie.size} "
                                                          f"FFs fit, {tie.groups} asked for (remove={tie.remove})"))
    return rows


class GraphTarget:
    """Ties applied to the captured graph: every FF of a window calls one shared module."""

    def __init__(self, gm: fx.GraphModule, tie: Tie, ffs: list):
        self.gm, self.tie, self.ffs = gm, tie, ffs

    def placeable(self, windows: list, rows: list[Row]) -> list:
        """Every window can be tied in a graph."""
        return windows

    def problem(self, plan: Plan, samples: dict) -> str | None:
        return alignment_problem(self.gm, self.ffs, plan, samples)

    def trial(self, plan: Plan) -> nn.Module:
        """A copy of the graph with ``plan``'s window merged, for ``Tie.evaluate``."""
        trial = copy.deepcopy(self.gm)
        trial_ffs = find_feedforwards(trial)
        rewrite(trial, [trial_ffs[i] for i in plan.window], plan)
        return trial

    def apply(self, plan: Plan, samples: dict) -> Row:
        return apply_plan(self.gm, self.tie, [self.ffs[i] for i in plan.window], plan, samples)


ALIGN_TOLERANCE = 1e-4  # a permuted FF must reproduce its own outputs (round-off only; half precision: its floor)


def alignment_problem(gm: fx.GraphModule, ffs, plan: Plan, samples: dict) -> str | None:
    """Check, before averaging, that every permuted member still computes its own function on the
    first calibration batch (it must: Sec. 3.2's invariance); the reason to skip if one does not."""
    for i, weights in plan.aligned.items():
        with full_precision():
            error = rel_error(build_shared(gm, ffs[i], weights)(samples[i][0]), samples[i][1])
        tolerance = max(ALIGN_TOLERANCE, precision_floor(samples[i][1].dtype))
        if not error <= tolerance:
            return (f"{ffs[i].name} permuted differs from itself by {error:.1e} > {tolerance:g}: something in it "
                    "is not element-wise over hidden neurons, so the alignment would change its function")
    return None


def _candidate_windows(tie: Tie, ffs, groups: dict, rows: list[Row]) -> list[tuple[int, ...]]:
    if tie.windows is not None:
        used: set[int] = set()
        for w in tie.windows:
            if len(set(w)) != len(w) or used & set(w):
                raise InputError(f"Tie(windows=...) window {list(w)} repeats an FF or overlaps an earlier window. "
                                 "Fix: give disjoint windows of distinct FF indices.")
            used |= set(w)
            if not w or any(not 0 <= i < len(ffs) for i in w) or len({ffs[i].signature for i in w}) != 1:
                found = ", ".join(f"{i}: {ff.name}" for i, ff in enumerate(ffs)) or "none"
                raise InputError(f"Tie(windows=...) window {list(w)} is not a set of structurally identical FFs. "
                                 f"FFs found, in graph order: {found}. Fix: give indices of FFs of one shape.")
        return [tuple(w) for w in tie.windows]
    found = []
    for members in groups.values():
        if len(members) < tie.size:
            for i in members:
                rows.append(Row(PASS_NAME, "skipped", [ffs[i].name], reason=(
                    f"{len(members)} structurally identical FF(s) here, fewer than the window of {tie.size}")))
            continue
        found += [tuple(members[s:s + tie.size]) for s in range(len(members) - tie.size + 1)]
    if not ffs:
        rows.append(Row(PASS_NAME, "skipped", [], reason="no feed-forward sublayer (Linear → act → Linear, SwiGLU, "
                                                        "Conv1D) found in the graph"))
    return found


def anchor_of(tie: Tie, window: Sequence[int]) -> int:
    return {"first": window[0], "middle": window[len(window) // 2], "last": window[-1]}[tie.anchor]


def _pairs(tie: Tie, windows) -> dict[int, set]:
    pairs: dict[int, set] = {}
    if tie.align == "permute" and tie.fuse != "drop":
        for w in windows:
            a = anchor_of(tie, w)
            pairs.setdefault(a, set()).update(i for i in w if i != a)
    return pairs


def _batches(tie: Tie, example_inputs) -> list[tuple]:
    source = tie.calibration if tie.calibration is not None else ([example_inputs] if example_inputs else [])
    batches = [b for b in source if as_inputs(b) is not None]  # as_inputs names a batch it cannot take
    if not batches:
        raise InputError("Tie needs data for its features: "
                         "pass Tie(calibration=batches) or example_inputs to optimize.")
    return batches


def _rows_of(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = value.reshape(-1, value.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).bool()]


def collect_features(gm, ffs, batches, pairs: dict[int, set], mask=None, members: set | None = None,
                     distributed: bool = False):
    """One pass over ``batches``: streaming float64 sums of the hidden features of the FFs
    ``members`` (indices; default all), the cross sums the alignment needs (``pairs``), and the
    first batch's inputs/outputs of those FFs for error checks. ``distributed``: the sums are then
    all-reduced over the ``torch.distributed`` world (``alignment.all_reduce``); the samples stay
    this rank's."""
    members = sorted(range(len(ffs)) if members is None else members)
    stats = {i: FeatureStats() for i in members}
    samples = {}
    for b, batch in enumerate(progress_bar(batches, desc="fxfuse tie calibration")):
        ends = {n for i in members for n in (ffs[i].x, ffs[i].y)} if b == 0 else set()
        values = record(gm, batch, {ffs[i].hidden for i in members} | ends)
        if b == 0:
            samples = {i: (values[ffs[i].x], values[ffs[i].y]) for i in members}
        m = mask(batch) if mask is not None else None
        feats = {i: _rows_of(values[ffs[i].hidden], m) for i in members}
        for i, f in feats.items():
            stats[i].add(f)
            for j in pairs.get(i, ()):
                stats[i].add_cross(j, f, feats[j])
    if distributed:
        for i in members:  # sorted: every rank reduces the same tensors in the same order
            all_reduce(stats[i])
    return stats, samples


@dataclass
class Plan:
    """How one window is merged: its members aligned to the anchor (in their own dtype; the anchor's
    and unpermuted members' are views of the FF's tensors), and the merged weights."""

    window: tuple[int, ...]
    aligned: dict[int, FFWeights]
    merged: FFWeights | None  # None: dropped


def plan_window(tie: Tie, ffs, window: Sequence[int], stats) -> Plan:
    """Align every member to the anchor (Eqs. 1–2, or not for 'vanilla') and fuse them.

    Memory, for FFs of hidden width H (Llama-2-7B: H = 11008, an H×H float64 matrix is 0.97 GB):
    every permutation is found first, one at a time, each from its own cross sums turned in place
    into C (Eq. 1) and then −C (``match_permutation(overwrite=True)``), so the sums are consumed
    (each pair belongs to one window: its anchor is at a fixed place in it) and one H×H matrix is
    held; the aligned members are then kept in the FF's own dtype (exact: a permutation moves
    values) and only the fused weights are float64, the same bits as fusing float64 copies."""
    if tie.fuse == "drop":
        return Plan(tuple(window), {}, None)
    a = anchor_of(tie, window)
    perms = {i: _permutation(stats[a], stats[i], i) for i in window if i != a and tie.align == "permute"}
    aligned = {i: permute(ffs[i].weights(None), perms[i]) if i in perms else ffs[i].weights(None) for i in window}
    members = [aligned[i] for i in window]
    if tie.fuse == "mean":
        merged = average(members)
    elif tie.fuse == "mix":
        merged = mix(members, torch.Generator().manual_seed(tie.seed))
    else:  # freeze: keep the member nearest the middle of the network (O'Neill et al.)
        middle = (len(ffs) - 1) / 2
        merged = aligned[min(window, key=lambda i: abs(i - middle))]
    return Plan(tuple(window), aligned, merged)


def _permutation(anchor: FeatureStats, other: FeatureStats, other_index: int) -> torch.Tensor:
    """Eqs. 1–2 for one member, consuming the anchor's cross sums with it (C is formed in their place)."""
    cross = anchor.cross.pop(other_index)
    return match_permutation(cross_correlation(anchor, other, cross, out=cross), overwrite=True)


def build_shared(gm: fx.GraphModule, ff, weights: FFWeights) -> fx.GraphModule:
    """A standalone copy of ``ff`` holding ``weights``."""
    module = extract(gm, ff)
    find_in_extracted(module).load(weights)
    return module


def apply_plan(gm: fx.GraphModule, tie: Tie, members: list, plan: Plan, samples: dict) -> Row:
    """Tie (or drop) the window's FFs in ``gm``. The row's parameters are the window's FF
    parameters before and after (one shared FF, or none when dropped); its error is the largest
    max-relative error of an FF output on the first calibration batch."""
    before = count_params(gm)
    names = [ff.name for ff in members]
    shared = None
    if plan.merged is None:
        error = max(rel_error(torch.zeros_like(samples[i][1]), samples[i][1]) for i in plan.window)
    else:
        shared = build_shared(gm, members[0], plan.merged)
        with full_precision():
            error = max(rel_error(shared(samples[i][0]), samples[i][1]) for i in plan.window)
    rewrite(gm, members, plan, shared)
    removed = before - count_params(gm)
    window_params = sum(ff.numel for ff in members)
    return Row(PASS_NAME, "applied", names, params_before=window_params, params_after=window_params - removed,
               error=error,
               exact=error == 0.0, reason=f"{tie.fuse} of {len(members)} FFs, align={tie.align}, anchor={tie.anchor}")


def _weight_score(tie: Tie, ffs, window) -> float:
    """Data-free: the mean distance (``tie.select``) of the window's members to its anchor (the
    measures take the FFs' own tensors and convert to float64 inside)."""
    a = anchor_of(tie, window) if tie.fuse != "drop" else window[0]
    others = [i for i in window if i != a] or list(window)
    return sum(distance(tie.selector, ffs[a].weights(None), ffs[i].weights(None)) for i in others) / len(others)


def _evaluation_score(target, tie: Tie, plan: Plan) -> float:
    """Sec. 3.4: ``tie.evaluate`` of a copy of the model with the window merged."""
    trial = target.trial(plan)
    with torch.no_grad():
        return float(tie.evaluate(trial))


def rewrite(gm: fx.GraphModule, members: list, plan: Plan, shared: nn.Module | None = None) -> None:
    """Tie the window's FFs to one shared module holding the merged weights (``shared`` if already
    built), or drop them."""
    if plan.merged is None:
        drop_sites(gm, members)
    else:
        tie_sites(gm, members, build_shared(gm, members[0], plan.merged) if shared is None else shared)


def _choose(tie: Tie, candidates, scores) -> list[tuple[int, ...]]:
    """The best windows by score (lower is better), greedily, without overlap, ``tie.groups`` of them."""
    if tie.windows is not None:
        return list(candidates)
    chosen, used = [], set()
    for w in sorted(candidates, key=lambda w: scores[w]):
        if len(chosen) < tie.groups and not used & set(w):
            chosen.append(w)
            used |= set(w)
    return chosen


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(value) -> list:
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _same_on_every_rank(chosen: list) -> None:
    """Raise ``InputError`` on every rank when the ranks chose different windows."""
    by_rank = _gather(chosen)
    if any(c != by_rank[0] for c in by_rank):
        raise InputError(f"Tie: the torch.distributed ranks chose different windows ({', '.join(map(str, by_rank))}, "
                         "by rank). Fix: make evaluate return the same value on every rank (all-reduce its loss), "
                         "and give every rank the same model.")


def _first_of_ranks(problem: str | None) -> str | None:
    """The first rank's reason to skip, if any rank has one."""
    return next((f"rank {r}: {p}" for r, p in enumerate(_gather(problem)) if p), None)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"Tie({name}={value!r}) is not one of {', '.join(map(repr, allowed))}. Fix: use one of those.")


def finetune(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor], steps: int,
             lr: float = 1e-4, progress: bool = True) -> list[float]:
    """Recovery fine-tuning (Verma et al. Sec. 3.4): ``steps`` optimizer steps of ``loss_fn(model, batch)``
    over ``batches`` (cycled), model in train mode, then back to eval. A tied tensor is one
    Parameter used at several sites, so autograd gives it the sum of the sites' gradients.
    Returns the losses. A progress bar on a terminal unless ``progress=False`` or ``FXFUSE_QUIET=1``."""
    batches = list(batches)
    if not batches or steps < 1:
        raise InputError("finetune needs at least one batch and steps ≥ 1.")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    bar = progress_bar(desc="fxfuse finetune", total=steps, show=progress)
    for step, batch in zip(range(steps), itertools.cycle(batches)):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


def feedforward_cka(model: nn.Module, batches: Iterable,
                    mask: Callable | None = None) -> tuple[torch.Tensor, list[str]]:
    """Linear CKA between the outputs of every pair of FF sublayers (Verma et al. Sec. 5.6), from
    streaming float64 sums over ``batches``. Returns the L×L matrix and the FFs' names."""
    gm = model if isinstance(model, fx.GraphModule) else capture(model, method="fx", inplace=True)  # read only: no copy
    ffs = find_feedforwards(gm)
    if not ffs:
        raise InputError(f"{type(model).__name__} has no feed-forward sublayer (Linear → act → Linear, SwiGLU, "
                         "Conv1D) to compare.")
    n, sums, cross = 0, None, None
    for batch in progress_bar(batches, desc="fxfuse feedforward_cka"):
        values = record(gm, batch, {ff.y for ff in ffs})
        m = mask(batch) if mask is not None else None
        outs = [_rows_of(values[ff.y], m).double() for ff in ffs]
        if sums is None:
            sums, cross = [o.new_zeros(o.shape[1]) for o in outs], {}
        n += outs[0].shape[0]
        for i, o in enumerate(outs):
            sums[i] += o.sum(0)
            for j in range(i, len(outs)):
                cross[i, j] = cross.get((i, j), 0) + o.T @ outs[j]
    if n == 0:
        raise InputError("feedforward_cka needs at least one batch with rows (after the mask).")
    size = len(ffs)
    matrix = torch.eye(size, dtype=torch.float64)
    for i, j in itertools.combinations(range(size), 2):
        matrix[i, j] = matrix[j, i] = linear_cka_from_sums(n, sums[i], sums[j], cross[i, i], cross[j, j], cross[i, j])
    return matrix, [ff.name for ff in ffs]
