"""Module-level tie: the user's own model back, its repeated FF submodules one shared module.

    tied = fxfuse.tie(model, calibration=batches, remove=4, evaluate=val_loss)   # type(tied) is type(model)
    tied.generate(ids, max_new_tokens=20)
    tied.save_pretrained("out"); again = fxfuse.from_pretrained(AutoModelForCausalLM, "out")   # ties kept

Finding and aligning are the graph tie's (fxfuse/tie.py's docstring: Verma et al.'s Sec. 3.3
features, Eqs. 1–2 alignment, Eq. 6 mean; App. A for SwiGLU). What differs is where a chosen window
is applied: not to the captured graph but to a deep copy of the model's module tree. Where each FF
region is exactly one submodule's forward (``region_module``: ``model.layers.3.mlp``,
``transformer.h.2.mlp``) that module is shared; otherwise, where each of its dense layers is one
submodule's forward (BERT's and ViT's ``intermediate.dense`` and ``output.dense``, whose modules
also compute the residual and norm), those are shared, role by role, and the code between them
(the activation) stays at each site, as it is. The merged weights W̄ = (1/k) Σ_l W'_l are loaded
into the window's first member's modules (as the graph tie's shared copy is of its first member),
and those objects are registered at every member's paths, so ``parameters()`` holds them once and
training updates them once.

The merge computes, at every member site l, Wd̄·φ(W̄1·x + b̄1) + b̄2 in place of the member's own FF;
it is exact only where the aligned members were equal (then the model's function is unchanged,
up to float rounding of the permuted sums).

Saving: the ties are written into the config (``fxfuse.module_tree``); ``fxfuse.from_pretrained``
loads them back.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .capture import _copy, capture as capture_graph
from .errors import InputError, UnsupportedModelError
from .feedforward import Dense, FeedForward
from .inputs import as_inputs
from .module_tree import dense_modules, record_ties, sole_module, tensor_names, without_cache
from .optimize import REPORT_ATTRIBUTE
from .report import Report, Row, count_params
from .tie import PASS_NAME, Plan, Tie, _batches, alignment_problem, build_shared, run_tie
from .verify import full_precision, precision_floor, rel_error

MODULE_TOLERANCE = 1e-4  # a member module must reproduce its FF region on the first calibration batch


def tie(model: nn.Module, calibration: Iterable | None = None, *, capture: str = "auto", inplace: bool = False,
        **options) -> nn.Module:
    """A copy of ``model``, of its own class, whose chosen windows of repeated FF submodules are
    one shared module holding their aligned average (``options``: ``fxfuse.Tie``'s, e.g. ``remove``,
    ``window``, ``evaluate``, ``align``, ``fuse``, ``anchor``, ``windows``, ``mask``).

    ``calibration``: batches as the model takes them (a tensor, a tuple of positional arguments,
    or a dict of keyword arguments such as ``{"input_ids": ids}``); the first one is also the
    example the graph is captured on (``capture``: 'auto', 'export' or 'fx'). The features are
    collected in eval mode (with a transformers config's ``use_cache`` off while capturing); the
    copy is returned in ``model``'s mode. ``model`` itself is never changed, unless ``inplace=True``:
    then neither tie nor its capture copies the model (with a data-free ``select``, peak memory is
    about the model's bytes plus one window's H×H float64 cross sums and one float64 FF: Llama-2-7B
    in bf16 peaks at 1.23× its bytes, ``benchmarks/results/tie_7b.md``) and ``model`` itself is
    tied and returned — even if a later window fails, the windows tied before stay tied. Scoring by
    ``evaluate`` still runs each window on a deep copy of the model. ``fxfuse.report_of``
    gives the rows (each merge's error on its FF outputs).

    Raises ``UnsupportedModelError`` when no candidate FF is one submodule's forward nor made of
    dense layers that each are one (an FF written inline in a larger module with functional
    layers): tie it as a graph with ``fxfuse.optimize(model, inputs, tie=fxfuse.Tie(...))`` instead.
    """
    settings = Tie(calibration=calibration, **options)
    if settings.fuse == "drop":
        raise InputError("fxfuse.tie(fuse='drop') would put modules of fxfuse's own in the model, which its class "
                         "cannot save or load. Fix: use fxfuse.optimize(model, inputs, tie=fxfuse.Tie(fuse='drop')).")
    settings.check()
    settings = dataclasses.replace(settings, calibration=_batches(settings, None))  # a generator is read once
    training, params_before = model.training, count_params(model)
    working = (model if inplace else _copy(model)).eval()
    with without_cache(working):
        gm = capture_graph(working, as_inputs(settings.calibration[0]), method=capture, inplace=inplace,
                           reference=False)  # each tied module is checked on its own FF's values instead
        rows = run_tie(gm, settings, None, target=functools.partial(ModuleTarget, working))
    working.train(training)
    report = Report(rows=rows, params_before=params_before, params_after=count_params(working),
                    capture=gm.meta["fxfuse_capture"])
    setattr(working, REPORT_ATTRIBUTE, report)
    return working


class ModuleTarget:
    """Ties applied to ``model``'s module tree (``run_tie``'s target): each FF mapped to the
    submodule whose forward it is, or else to the submodules of its dense layers; a window's
    members' modules become the first member's module objects."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, tie: Tie, ffs: list[FeedForward]):
        self.model, self.gm, self.tie, self.ffs = model, gm, tie, ffs
        self.names = tensor_names(gm)
        self.sites, self.owners, self.reasons = {}, {}, {}  # FF index -> shared paths, each dense's path, why not
        for i, ff in enumerate(ffs):
            path, reason = region_module(gm, ff, self.names)
            if path is not None:
                self.sites[i], self.owners[i] = [path], [path] * (len(ff.ups) + 1)
                continue
            paths, _ = dense_modules(gm, ff, self.names)
            if paths is None:
                self.reasons[i] = reason
            else:
                self.sites[i] = self.owners[i] = paths

    def placeable(self, windows: list, rows: list[Row]) -> list:
        """The windows whose every FF has its modules; a skipped row for each other one, and
        ``UnsupportedModelError`` when none is left."""
        kept = [w for w in windows if all(i in self.sites for i in w) and
                len({len(self.sites[i]) for i in w}) == 1]  # all shared whole, or all layer by layer
        for w in windows:
            if w not in kept:
                reason = next((self.reasons[i] for i in w if i in self.reasons),
                              "some FFs of the window are one submodule, others are not")
                rows.append(Row(PASS_NAME, "skipped", [self.ffs[i].name for i in w], reason=reason))
        if windows and not kept:
            raise UnsupportedModelError(
                f"fxfuse.tie cannot share modules here: {rows[-1].reason}. Fix: tie the graph instead, "
                "fxfuse.optimize(model, inputs, tie=fxfuse.Tie(...)) (it returns a torch.fx.GraphModule).")
        return kept

    def problem(self, plan: Plan, samples: dict) -> str | None:
        """The graph tie's alignment check, then: does each member module compute its FF region?"""
        return alignment_problem(self.gm, self.ffs, plan, samples) or next(
            (r for r in (self._module_problem(i, samples) for i in plan.window) if r), None)

    def _module_problem(self, i: int, samples: dict) -> str | None:
        """For an FF shared whole: its module's output on the FF's input against the graph's. (Dense
        modules shared layer by layer compute exactly their graph nodes, by ``dense_modules``.)"""
        if len(self.sites[i]) > 1:
            return None
        x, y = samples[i]
        with torch.no_grad(), full_precision():
            error = rel_error(self.model.get_submodule(self.sites[i][0])(x), y)
        tolerance = max(MODULE_TOLERANCE, precision_floor(y.dtype))
        if not error <= tolerance:
            return (f"{self.sites[i][0]}(x) differs from the FF found in the graph by {error:.1e} > {tolerance:g}: "
                    "its forward is not exactly that FF, so sharing it would change the model")
        return None

    def trial(self, plan: Plan) -> nn.Module:
        """A copy of the model with ``plan``'s window shared, for ``Tie.evaluate``."""
        trial = copy.deepcopy(self.model)
        self._place(trial, plan)
        return trial

    def apply(self, plan: Plan, samples: dict) -> Row:
        """Share the window's modules in ``model`` and record the ties; the row as the graph tie's.
        The error is measured through the shared module (whole FFs) or the merged FF (layer by layer)."""
        before = count_params(self.model)
        shared = self._place(self.model, plan)
        first = self.sites[plan.window[0]]
        record_ties(self.model, {m: s for i in plan.window[1:] for m, s in zip(self.sites[i], first)})
        merged = shared[first[0]] if len(first) == 1 else build_shared(self.gm, self.ffs[plan.window[0]], plan.merged)
        with torch.no_grad(), full_precision():
            error = max(rel_error(merged(samples[i][0]), samples[i][1]) for i in plan.window)
        window_params = sum(self.ffs[i].numel for i in plan.window)
        how = "as one module" if len(first) == 1 else f"as {len(first)} shared layers"
        return Row(PASS_NAME, "applied", [p for i in plan.window for p in self.sites[i]], params_before=window_params,
                   params_after=window_params - (before - count_params(self.model)), error=error, exact=error == 0.0,
                   reason=f"{self.tie.fuse} of {len(plan.window)} FFs {how}, align={self.tie.align}, "
                          f"anchor={self.tie.anchor}")

    def _place(self, model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
        """Load ``plan.merged`` into the first member's modules of ``model`` and register those
        modules at every member's paths; return them by path."""
        i0 = plan.window[0]
        first = self.ffs[i0]
        shared = {p: model.get_submodule(p) for p in self.sites[i0]}
        roles = [self._rebind(d, p, shared[p]) for d, p in zip(first.ups + [first.down], self.owners[i0])]
        dataclasses.replace(first, ups=roles[:-1], down=roles[-1]).load(plan.merged)
        for i in plan.window[1:]:
            for member, path in zip(self.sites[i], self.sites[i0]):
                model.set_submodule(member, shared[path])
        return shared

    def _rebind(self, dense: Dense, path: str, module: nn.Module) -> Dense:
        """``dense`` with its weight and bias replaced by ``module``'s tensors of the same names."""
        local = lambda t: None if t is None else module.get_parameter(_relative(self.names[id(t)], path))  # noqa: E731
        return dataclasses.replace(dense, weight=local(dense.weight), bias=local(dense.bias))


def region_module(gm: fx.GraphModule, ff: FeedForward, names: dict) -> tuple[str | None, str]:
    """The path of the submodule whose forward is exactly ``ff``'s region and holds every tensor it
    reads, or ``(None, why not)``."""
    path, reason = sole_module(gm, ff.region, f"the FF {ff.name}")
    if path is None:
        return None, reason
    outside = [names.get(id(t), "?") for d in ff.ups + [ff.down] for t in (d.weight, d.bias)
               if t is not None and not names.get(id(t), "").startswith(path + ".")]
    if outside:
        return None, f"the FF {ff.name} reads {outside[0]}, which is not a tensor of {path}"
    return path, ""


def _relative(name: str, path: str) -> str:
    return name[len(path) + 1:]
