"""Graph rewrites applied to the user's module tree, so that the result keeps its class.

The graph finds the patterns; a rewrite of a graph region can be applied to a submodule instead
where that submodule's one call computes exactly the region (``sole_module``, read from the nodes'
``nn_module_stack``, which both captures record). Then the rest of the model is untouched and the
result is the user's own class (``generate``, ``save_pretrained``, ``Trainer`` keep working).

What fxfuse changed in a tree is written into a transformers config, so that ``from_pretrained``
rebuilds it before loading the weights:

- ``fxfuse_ties`` = {member path: shared path}: the member paths hold the shared module object
  (``fxfuse.tie``); the members' keys are left out of ``save_pretrained``'s file (one copy on disk);
- ``fxfuse_modules`` = {path: spec}: the module now at ``path`` is one of fxfuse's replacements —
  an ``nn.PReLU`` standing for an activation (``prepare_collapse``), an ``nn.Identity`` for a
  collapsed layer, an ``nn.Linear`` holding a collapsed pair (``fxfuse.collapse``).

Plain ``from_pretrained`` cannot rebuild either (its tying reads the class's ``_tied_weights_keys``
only, and it builds the class's own modules): it reports the members' weights missing, or refuses
the replaced layers' shapes. ``from_pretrained`` here builds the class with the replacements in
place, loads through the class's own ``from_pretrained`` (whose key conversions, e.g. ViT's
``encoder.layer.k.intermediate.dense`` on disk for ``layers.k.mlp.fc1``, then apply) and re-ties.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch.fx as fx
from torch import nn

from .errors import InputError
from .feedforward import ADDMM, SHAPE_READS, FeedForward, is_reshape, dense_output
from .ir import IDENTITY, is_kind

TIES_KEY = "fxfuse_ties"
MODULES_KEY = "fxfuse_modules"


def module_calls(node: fx.Node) -> list[tuple[str, str]]:
    """The module calls ``node`` ran in, outermost first, as (call key, module path); a
    ``call_module`` node's own module last."""
    calls = [(k, v[0].split("@")[0]) for k, v in (node.meta.get("nn_module_stack") or {}).items()]
    if node.op == "call_module" and not (calls and calls[-1][1] == node.target):  # symbolic_trace may list it
        calls.append((f"call {node.name}", node.target))
    return calls


def _type_name(gm: fx.GraphModule, path: str) -> str:
    """A module's class name (export records a dotted string in ``nn_module_stack``, symbolic_trace the class)."""
    for n in gm.graph.nodes:
        for k, v in (n.meta.get("nn_module_stack") or {}).items():
            if v[0].split("@")[0] == path:
                return v[1].__name__ if isinstance(v[1], type) else str(v[1]).rpartition(".")[2]
        if n.op == "call_module" and n.target == path:
            return type(gm.get_submodule(path)).__name__
    return "?"


def sole_module(gm: fx.GraphModule, nodes: list[fx.Node], what: str) -> tuple[str | None, str]:
    """The path of the submodule whose forward computes exactly ``nodes`` (``what`` names them in
    reasons), or ``(None, why not)``: the deepest module call all of them ran in, called once,
    computing nothing else but identities (eval dropout) and shape reads."""
    compute = [n for n in nodes if n.op != "get_attr"]
    stacks = [module_calls(n) for n in compute]
    common = [c for c in stacks[0] if all(c in s for s in stacks[1:]) and c[1]]
    if not common:
        return None, f"{what} belongs to no one submodule call"
    key, path = common[-1]
    calls = {k for n in gm.graph.nodes for k, p in module_calls(n) if p == path}
    if len(calls) > 1:
        return None, f"{path} is called {len(calls)} times, so its weights serve more than {what}"
    inside = set(nodes)
    extra = [n for n in gm.graph.nodes if n not in inside and (key, path) in module_calls(n)
             and not (is_kind(gm, n, IDENTITY) or n.target in SHAPE_READS)]
    if extra:
        return None, (f"{what} is only part of {path} ({_type_name(gm, path)}), which also computes "
                      f"{getattr(extra[0].target, '__name__', extra[0].target)}")
    return path, ""


def dense_modules(gm: fx.GraphModule, ff: FeedForward, names: dict) -> tuple[list[str] | None, str]:
    """The paths of the submodules (up projections, then down) whose forward is each exactly one of
    ``ff``'s dense layers (``nn.Linear``, GPT-2's ``Conv1D``) and holds its weight and bias only, or
    ``(None, why not)``."""
    paths = []
    for d in ff.ups + [ff.down]:
        flattened = d.node.args[1] if d.node.target in ADDMM and is_reshape(d.node.args[1]) else None
        nodes = [n for n in (flattened, d.node, dense_output(d)) if n is not None]
        path, reason = sole_module(gm, list(dict.fromkeys(nodes)), f"{ff.name}'s layer {d.node.name}")
        if path is None:
            return None, reason
        held = {names.get(id(t)) for t in (d.weight, d.bias) if t is not None}
        own = {n for n, _ in gm.named_parameters() if n.startswith(path + ".")}
        if held != own:
            return None, f"{path} holds other tensors than {ff.name}'s layer weights"
        paths.append(path)
    return paths, ""


def tensor_names(gm: fx.GraphModule) -> dict[int, str]:
    """Each parameter's and buffer's name in ``gm`` by id (its first name when it has several)."""
    names: dict[int, str] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


@contextlib.contextmanager
def without_cache(model: nn.Module):
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


def module_spec(module: nn.Module) -> dict:
    """What ``build_module`` needs to rebuild one of fxfuse's replacement modules (empty, like ``module``)."""
    if type(module) is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if type(module) is nn.PReLU:
        return {"type": "PReLU", "num_parameters": module.num_parameters}
    if type(module) is nn.Identity:
        return {"type": "Identity"}
    raise TypeError(f"{type(module).__name__} is not a module fxfuse puts in a model")


def build_module(spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind == "PReLU":
        return nn.PReLU(spec["num_parameters"])
    return nn.Identity()


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put each module at its path in ``model`` and record the replacements in ``model.config``
    (when it has one) as ``fxfuse_modules``, so that ``from_pretrained`` rebuilds them."""
    for path, module in replacements.items():
        model.set_submodule(path, module)
    config = getattr(model, "config", None)
    if config is not None:
        specs = {**(getattr(config, MODULES_KEY, None) or {}), **{p: module_spec(m) for p, m in replacements.items()}}
        setattr(config, MODULES_KEY, specs)


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
    """``cls.from_pretrained(path, **kwargs)`` for a directory written by ``save_pretrained`` of a
    model fxfuse tied, prepared or collapsed, with those changes kept (``cls`` may be an Auto class;
    ``path`` a local directory): the class is built with fxfuse's replacement modules already in
    place (so that the checkpoint's shapes fit, whatever key names the class's loader converts), the
    checkpoint loaded by the class's own ``from_pretrained``, and the shared modules registered
    again at the member paths, whose weights are not in the file. Any other missing or unexpected
    weight raises ``InputError``. A checkpoint without fxfuse entries loads as ``cls.from_pretrained``."""
    import transformers  # imported on use: fxfuse does not need transformers

    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    ties, specs = getattr(config, TIES_KEY, None) or {}, getattr(config, MODULES_KEY, None) or {}
    if not ties and not specs:
        return cls.from_pretrained(path, config=config, **kwargs)
    mapping = getattr(cls, "_model_mapping", None)  # an Auto class: the class it picks for this config
    model_class = mapping[type(config)] if mapping is not None else cls

    def build_replaced(self, config, *args, **kw):
        model_class.__init__(self, config, *args, **kw)
        for p, spec in specs.items():
            self.set_submodule(p, build_module(spec))

    rebuilt = type(model_class.__name__, (model_class,), {"__init__": build_replaced})
    with _quiet(bool(ties)):  # the members' weights are missing by design: they are the shared ones
        model, info = rebuilt.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    model.__class__ = model_class  # the user's class, as saved
    _check_loading(info, ties)
    return retie(model, ties)


@contextlib.contextmanager
def _quiet(on: bool):
    """transformers' loading report off while ``on`` (``_check_loading`` reports what matters)."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers")
    level = logger.level
    if on:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_loading(info: dict, ties: dict[str, str]) -> None:
    """Raise ``InputError`` when a weight other than a tie member's was missing or unexpected."""
    member = lambda k: any(k.startswith(m + ".") for m in ties)  # noqa: E731
    missing = [k for k in info.get("missing_keys", ()) if not member(k)]
    unexpected = list(info.get("unexpected_keys", ()))
    mismatched = [k for k, *_ in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        raise InputError(f"fxfuse.from_pretrained: the checkpoint does not fit the class (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, mismatched {mismatched[:3]}). Fix: load the directory the "
                         "model's own save_pretrained wrote, with the class it was saved from.")
