"""Module-level tie: the user's own model back, its repeated FF submodules one shared module.

    tied = fxfuse.tie(model, calibration=batches, remove=4, evaluate=val_loss)   # type(tied) is type(model)
    tied.generate(ids, max_new_tokens=20)
    tied.save_pretrained("out"); again = fxfuse.from_pretrained(AutoModelForCausalLM, "out")   # ties kept

Finding and aligning are the graph tie's (fxfuse/tie.py's docstring: Verma et al.'s Sec. 3.3
features, Eqs. 1–2 alignment, Eq. 6 mean; App. A for SwiGLU). What differs is where a chosen window
is applied: not to the captured graph but to a deep copy of the model's module tree. That needs each
FF region to be exactly one submodule's forward (``region_module``: ``model.layers.3.mlp``,
``transformer.h.2.mlp``); the merged weights W̄ = (1/k) Σ_l W'_l are loaded into the window's first
member module (as the graph tie's shared copy is of its first member), and that one object is
registered at every member path, so ``parameters()`` holds it once and training updates it once.

The merge computes, at every member site l, Wd̄·φ(W̄1·x + b̄1) + b̄2 in place of the member's own FF;
it is exact only where the aligned members were equal (then the model's function is unchanged,
up to float rounding of the permuted sums).

Saving (transformers 5): ``save_pretrained`` refuses state dicts whose tensors share storage unless
the class declares them in ``_tied_weights_keys``; a tied model instead carries the member paths'
keys in its instance's ``_keys_to_ignore_on_save`` (so the file holds one copy) and the ties in its
config as ``fxfuse_ties`` = {member path: shared path}. Plain ``from_pretrained`` cannot re-tie
(its tying reads the class's ``_tied_weights_keys`` only): it would report the members' weights
missing and initialise them at random. ``from_pretrained`` here re-expands the checkpoint, loads
it through the class's own ``from_pretrained`` and re-registers the shared modules.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .capture import _copy, capture as capture_graph
from .errors import InputError, UnsupportedModelError
from .feedforward import SHAPE_READS, Dense, FeedForward
from .inputs import as_inputs
from .ir import IDENTITY, is_kind
from .optimize import REPORT_ATTRIBUTE
from .report import Report, Row, count_params
from .tie import PASS_NAME, Plan, Tie, _batches, alignment_problem, run_tie
from .verify import full_precision, precision_floor, rel_error

TIES_KEY = "fxfuse_ties"  # config entry: {member module path: the path of the module it shares}
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

    Raises ``UnsupportedModelError`` when no candidate FF region is exactly one submodule's forward
    (BERT's FF spans ``intermediate`` and ``output``): tie it as a graph with
    ``fxfuse.optimize(model, inputs, tie=fxfuse.Tie(...))`` instead.
    """
    settings = Tie(calibration=calibration, **options)
    if settings.fuse == "drop":
        raise InputError("fxfuse.tie(fuse='drop') would put modules of fxfuse's own in the model, which its class "
                         "cannot save or load. Fix: use fxfuse.optimize(model, inputs, tie=fxfuse.Tie(fuse='drop')).")
    settings.check()
    settings = dataclasses.replace(settings, calibration=_batches(settings, None))  # a generator is read once
    training, params_before = model.training, count_params(model)
    working = (model if inplace else _copy(model)).eval()
    with _without_cache(working):
        gm = capture_graph(working, as_inputs(settings.calibration[0]), method=capture, inplace=inplace)
        rows = run_tie(gm, settings, None, target=functools.partial(ModuleTarget, working))
    working.train(training)
    report = Report(rows=rows, params_before=params_before, params_after=count_params(working),
                    capture=gm.meta["fxfuse_capture"])
    setattr(working, REPORT_ATTRIBUTE, report)
    return working


@contextlib.contextmanager
def _without_cache(model: nn.Module):
    """A transformers config's ``use_cache`` off (a ``DynamicCache`` output cannot be exported), then back."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", False)
    if use_cache:
        config.use_cache = False
    try:
        yield
    finally:
        if use_cache:
            config.use_cache = use_cache


class ModuleTarget:
    """Ties applied to ``model``'s module tree (``run_tie``'s target): each FF region mapped to the
    submodule whose forward it is; a window's members become one module object."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, tie: Tie, ffs: list[FeedForward]):
        self.model, self.gm, self.tie, self.ffs = model, gm, tie, ffs
        self.names = _tensor_names(gm)
        self.paths, self.reasons = {}, {}
        for i, ff in enumerate(ffs):
            path, reason = region_module(gm, ff, self.names)
            if path is None:
                self.reasons[i] = reason
            else:
                self.paths[i] = path

    def placeable(self, windows: list, rows: list[Row]) -> list:
        """The windows whose every FF is one submodule; a skipped row for each other one, and
        ``UnsupportedModelError`` when none is left."""
        kept = [w for w in windows if all(i in self.paths for i in w)]
        for w in windows:
            if w not in kept:
                reason = next(self.reasons[i] for i in w if i in self.reasons)
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
        x, y = samples[i]
        with torch.no_grad(), full_precision():
            error = rel_error(self.model.get_submodule(self.paths[i])(x), y)
        tolerance = max(MODULE_TOLERANCE, precision_floor(y.dtype))
        if not error <= tolerance:
            return (f"{self.paths[i]}(x) differs from the FF found in the graph by {error:.1e} > {tolerance:g}: "
                    "its forward is not exactly that FF, so sharing it would change the model")
        return None

    def trial(self, plan: Plan) -> nn.Module:
        """A copy of the model with ``plan``'s window shared, for ``Tie.evaluate``."""
        trial = copy.deepcopy(self.model)
        self._place(trial, plan)
        return trial

    def apply(self, plan: Plan, samples: dict) -> Row:
        """Share the window's module in ``model`` and record the ties; the row as the graph tie's."""
        before = count_params(self.model)
        shared = self._place(self.model, plan)
        paths = [self.paths[i] for i in plan.window]
        record_ties(self.model, {p: paths[0] for p in paths[1:]})
        with torch.no_grad(), full_precision():
            error = max(rel_error(shared(samples[i][0]), samples[i][1]) for i in plan.window)
        window_params = sum(self.ffs[i].numel for i in plan.window)
        return Row(PASS_NAME, "applied", paths, params_before=window_params,
                   params_after=window_params - (before - count_params(self.model)), error=error, exact=error == 0.0,
                   reason=f"{self.tie.fuse} of {len(paths)} FFs as one module, align={self.tie.align}, "
                          f"anchor={self.tie.anchor}")

    def _place(self, model: nn.Module, plan: Plan) -> nn.Module:
        """Load ``plan.merged`` into the first member's module of ``model`` and register that module
        at every member path; return it."""
        first = self.ffs[plan.window[0]]
        path = self.paths[plan.window[0]]
        shared = model.get_submodule(path)
        roles = [self._rebind(d, path, shared) for d in first.ups + [first.down]]
        dataclasses.replace(first, ups=roles[:-1], down=roles[-1]).load(plan.merged)
        for i in plan.window[1:]:
            model.set_submodule(self.paths[i], shared)
        return shared

    def _rebind(self, dense: Dense, path: str, module: nn.Module) -> Dense:
        """``dense`` with its weight and bias replaced by ``module``'s tensors of the same names."""
        local = lambda t: None if t is None else module.get_parameter(_relative(self.names[id(t)], path))  # noqa: E731
        return dataclasses.replace(dense, weight=local(dense.weight), bias=local(dense.bias))


def region_module(gm: fx.GraphModule, ff: FeedForward, names: dict) -> tuple[str | None, str]:
    """The path of the submodule whose forward is exactly ``ff``'s region, or ``(None, why not)``.

    From the nodes' ``nn_module_stack`` (both captures record it): the deepest module call every
    node of the region belongs to; it must be called once, hold every tensor the region reads, and
    compute nothing outside the region but identities (eval dropout) and shape reads."""
    compute = [n for n in ff.region if n.op != "get_attr"]
    stacks = [n.meta.get("nn_module_stack") or {} for n in compute]
    common = [k for k in stacks[0] if all(k in s for s in stacks[1:])]
    if not common:
        return None, f"the FF {ff.name} belongs to no one submodule call"
    key = common[-1]
    path, kind = stacks[0][key][0], stacks[0][key][1]
    calls = {k for n in gm.graph.nodes for k, v in (n.meta.get("nn_module_stack") or {}).items() if v[0] == path}
    if len(calls) > 1:
        return None, f"{path} is called {len(calls)} times, so its weights serve more than this FF"
    region = set(ff.region)
    extra = [n for n in gm.graph.nodes if n not in region and key in (n.meta.get("nn_module_stack") or {})
             and not (is_kind(gm, n, IDENTITY) or n.target in SHAPE_READS)]
    if extra:
        return None, (f"the FF {ff.name} is only part of {path} ({_type_name(kind)}), which also computes "
                      f"{getattr(extra[0].target, '__name__', extra[0].target)}")
    outside = [names.get(id(t), "?") for d in ff.ups + [ff.down] for t in (d.weight, d.bias)
               if t is not None and not names.get(id(t), "").startswith(path + ".")]
    if outside:
        return None, f"the FF {ff.name} reads {outside[0]}, which is not a tensor of {path}"
    return path, ""


def _type_name(kind) -> str:
    """A module's class name from ``nn_module_stack`` (export records a dotted string, symbolic_trace the class)."""
    return kind.__name__ if isinstance(kind, type) else str(kind).rpartition(".")[2]


def _tensor_names(gm: fx.GraphModule) -> dict[int, str]:
    """Each parameter's and buffer's name in ``gm`` by id (its first name when it has several)."""
    names: dict[int, str] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


def _relative(name: str, path: str) -> str:
    return name[len(path) + 1:]


def record_ties(model: nn.Module, ties: dict[str, str]) -> None:
    """Write ``ties`` ({member path: shared path}) into ``model.config.fxfuse_ties`` (when it has a
    config) and leave the members' keys out of what ``save_pretrained`` writes (one copy on disk)."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, TIES_KEY, {**(getattr(config, TIES_KEY, None) or {}), **ties})
    if hasattr(model, "_keys_to_ignore_on_save"):
        members = {f"{m}.{k}" for m, shared in ties.items() for k in model.get_submodule(shared).state_dict()}
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | members


def retie(model: nn.Module, ties: dict[str, str]) -> nn.Module:
    """Register the module at each shared path at its member paths too (``ties``: {member: shared})."""
    for member, shared in ties.items():
        model.set_submodule(member, model.get_submodule(shared))
    record_ties(model, ties)
    return model


def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)`` for a directory written by a tied model's
    ``save_pretrained``, ties kept: the checkpoint's shared tensors are given to every member key,
    loaded by the class's own ``from_pretrained`` (``cls`` may be an Auto class), and the shared
    modules registered again at the member paths (``retie``). A checkpoint without ``fxfuse_ties``
    loads as ``cls.from_pretrained`` loads it. ``path`` is a local directory."""
    import transformers  # imported on use: fxfuse does not need transformers

    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    ties = getattr(config, TIES_KEY, None) or {}
    if not ties:
        return cls.from_pretrained(path, config=config, **kwargs)
    state = _checkpoint(path)
    for member, shared in ties.items():
        state.update({member + k[len(shared):]: v for k, v in list(state.items()) if k.startswith(shared + ".")})
    mapping = getattr(cls, "_model_mapping", None)  # an Auto class: the class it picks for this config
    model_class = mapping[type(config)] if mapping is not None else cls
    return retie(model_class.from_pretrained(None, config=config, state_dict=state, **kwargs), ties)


def _checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint in directory ``path`` (one file or an index of shards)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise InputError(f"fxfuse.from_pretrained found no model.safetensors (or its index) in {os.fspath(path)!r}. "
                         "Fix: pass the local directory a tied model's save_pretrained wrote "
                         "(download a hub repository first, e.g. huggingface_hub.snapshot_download).")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state
