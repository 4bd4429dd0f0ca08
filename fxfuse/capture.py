"""Capture: validate the user's model and example inputs, copy the model, and capture its graph.

Two captures, one graph format for the rest of fxfuse (``torch.fx.GraphModule``):

- ``"export"``: ``torch.export.export`` (non-strict), the graph of ATen ops that modern PyTorch
  tooling is built on; batch (and, for integer inputs such as token ids, sequence) dimensions are
  ``Dim.AUTO``, so the result runs at other sizes where the model allows it;
- ``"fx"``: ``torch.fx.symbolic_trace``, a graph of the model's own modules and functions.

``capture="auto"`` tries them in ``AUTO_ORDER`` (export first: it reaches more of the torchvision
and timm zoos and every transformers 5 model; ``benchmarks/capture_zoo.py`` measures it). An
``ExportedProgram``, the GraphModule of ``ep.module()`` and a symbolic-traced GraphModule are taken
as they are. The user's model is never touched: capture works on a deep copy (``inplace=True``
skips the copy).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import InputError, TraceError, UnsupportedModelError
from .exported import ExportedGraphModule, guard_static_shapes
from .inputs import Inputs, describe_type
from .ir import DIALECT_KEY, dialect
from .rewrite import drop_unread_tensors
from .verify import propagate_shapes, unchanged_buffers

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAPTURES = ("export", "fx")
AUTO_ORDER = ("export", "fx")
EAGER_KEY = "fxfuse_eager_output"  # gm.meta: the model's own outputs on the example inputs, before capture


def check_model(model: Any, needs_values: bool = True) -> None:
    """Raise a named error when ``model`` cannot be rewritten as it stands. An exported graph
    carries its eval semantics in its ops (BatchNorm's and dropout's ``training`` arguments), so
    only a module graph's ``training`` flag is checked. ``needs_values=False`` (an analysis of
    shapes) accepts weights on the meta device."""
    if not isinstance(model, nn.Module):
        raise InputError(f"fxfuse needs a torch.nn.Module or a torch.export.ExportedProgram, got {describe_type(model)}.")
    exported = isinstance(model, fx.GraphModule) and dialect(model) == "aten"
    if model.training and not exported:
        raise UnsupportedModelError(
            f"{type(model).__name__} is in training mode. fxfuse's rewrites are inference-time "
            "(BatchNorm uses running statistics, Dropout is off): call model.eval() first."
        )
    quantized = [n for n, m in model.named_modules() if ".quantized" in type(m).__module__]
    if quantized:
        raise UnsupportedModelError(
            f"{quantized[0] or type(model).__name__} is a quantized module; fxfuse rewrites floating-point "
            "models. Optimize the float model first, then quantize the result."
        )
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise UnsupportedModelError(
            f"parameter {lazy[0]!r} is not initialized yet (a lazy module). Run the model once on an example "
            "input so that its shapes are known, then optimize it."
        )
    if not any(True for _ in model.parameters()):
        raise InputError(
            f"{type(model).__name__} has no parameters: there is nothing to rewrite. Pass the model after its "
            "layers are built (an empty nn.Sequential() computes the identity)."
        )
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if meta and not needs_values:
        return
    if meta:
        raise UnsupportedModelError(
            f"{meta[0]!r} is on the meta device: it has a shape but no values, so nothing can be computed or "
            "checked. Fix: materialise the weights first (model.to_empty(device='cpu') then load_state_dict, or "
            "build the model outside torch.device('meta')).")
    for name, param in model.named_parameters():
        if param.is_quantized or param.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"parameter {name!r} has dtype {param.dtype}; fxfuse rewrites floating-point models "
                f"({', '.join(str(d) for d in FLOAT_DTYPES)}). Rewrite the float model, then quantize."
            )
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            raise UnsupportedModelError(
                f"{name!r} holds NaN or Inf values: a rewrite of non-finite weights cannot be verified. "
                "Fix the weights (or the checkpoint they came from) first."
            )


def capture(model: nn.Module | torch.export.ExportedProgram, inputs: Inputs | None = None, *, method: str = "auto",
            inplace: bool = False, leaf_modules: Iterable[type] = (), concrete_args: dict | None = None,
            needs_values: bool = True, reference: bool = True) -> fx.GraphModule:
    """The graph of (a copy of) ``model``: an ``ExportedProgram`` or a GraphModule as it is,
    an ``nn.Module`` by ``method`` ("export", "fx", or "auto": ``AUTO_ORDER``, first that works).
    ``leaf_modules``/``concrete_args`` are symbolic_trace's and imply "fx". ``gm.meta['fxfuse_capture']``
    says which capture made the graph; ``needs_values=False``: see ``check_model``. With inputs,
    the model's own output on them is ``gm.meta[EAGER_KEY]`` (what ``optimize`` checks the capture
    against); ``reference=False`` skips that call, for a caller that checks otherwise (a 7B model's
    forward takes minutes on a CPU)."""
    if method not in ("auto", *CAPTURES):
        raise InputError(f"capture={method!r}: pass 'auto', 'export' (torch.export) or 'fx' (torch.fx.symbolic_trace).")
    if isinstance(model, torch.export.ExportedProgram):
        model, inplace = model.module(), True  # a new module: nothing of the program is changed
    check_model(model, needs_values)
    target = model if inplace else _copy(model)
    if isinstance(target, fx.GraphModule) and not leaf_modules and concrete_args is None:
        aten = dialect(target) == "aten"
        target = plain_graph_module(target, type(target).__name__) if aten else target
        target.meta["fxfuse_capture"] = "export" if aten else "fx"
        return target  # already a graph: retracing could lose what its tracer handled
    if model._forward_hooks or model._forward_pre_hooks:
        raise TraceError(
            f"{type(model).__name__} has forward hooks on the model itself: they run around forward, so no capture "
            "of forward holds them. Fix: optimize a copy without them and register them on the result: "
            "m = copy.deepcopy(model); m._forward_hooks.clear(); m._forward_pre_hooks.clear(); "
            "gm = fxfuse.optimize(m, ...); gm.register_forward_hook(hook).")
    methods = ("fx",) if leaf_modules or concrete_args is not None else AUTO_ORDER if method == "auto" else (method,)
    eager = None if inputs is None or not needs_values or not reference else run_model(target, inputs)
    failures = []
    for name in methods:
        if name == "export" and inputs is None:
            failures.append("export: needs example inputs (torch.export runs the model on them)")
            continue
        try:
            with unchanged_buffers(target):
                gm = _export(target, inputs) if name == "export" else _trace(target, leaf_modules, concrete_args, inputs)
        except Exception as e:  # torch raises many types (TraceError, TypeError, UserError, NotImplementedError ...)
            failures.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
            continue
        gm.meta["fxfuse_capture"] = name
        if eager is not None:
            gm.meta[EAGER_KEY] = eager
        return gm
    raise TraceError(f"could not capture {type(model).__name__}.forward ({'; '.join(failures)}).\n" + _capture_fix(model, failures))


def _capture_fix(model: nn.Module, failures: list[str]) -> str:
    text = " ".join(failures)
    if "past_key_values" in text or "Cache" in text:
        return ("Fix: turn the key/value cache off for capture: model.config.use_cache = False (an encoder-decoder "
                "such as T5 copies its config into the decoder: build it from a config with use_cache=False), or "
                "pass use_cache=False in the example inputs (the optimized module then takes it too).")
    return ("Fix: pass example_inputs (torch.export needs them); for symbolic_trace, mark the submodule that holds "
            "data-dependent control flow as a leaf (optimize(..., leaf_modules=[ThatModule])) or fix the offending "
            "argument with optimize(..., concrete_args={'flag': value}).")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _export(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    """``torch.export.export`` (non-strict) with AUTO batch and sequence dims, then ``.module()``.
    Refuses a model with forward hooks: export inlines their tensor ops and drops their Python side
    effects, where symbolic_trace keeps an untouched hooked module as a call."""
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise TraceError(f"{hooked[0]} has forward hooks, which would stop running in an exported graph")
    shapes = dynamic_shapes(model, inputs)
    ep = torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=shapes, strict=False)
    return plain_graph_module(ep.module(), type(model).__name__)


def plain_graph_module(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """An ``ep.module()`` as a GraphModule that pickles (``ExportedGraphModule``), deep-copies and
    can be put in eval mode: export's input-guard call (unpicklable) replaced by fxfuse's check of
    the sizes the graph is specialised to (``guard_static_shapes``), without its hooks and tracer
    class, and without the tensors no op reads."""
    for node in gm.graph.find_nodes(op="call_module", target="_guards_fn"):
        gm.graph.erase_node(node)
    guard_static_shapes(gm)
    drop_unread_tensors(gm)  # a tensor forward never reads (an eval-mode auxiliary head), as symbolic_trace leaves out
    gm.graph._tracer_cls = None
    plain = ExportedGraphModule(gm, gm.graph, name)
    plain.meta[DIALECT_KEY] = "aten"
    return plain.eval()


def dynamic_shapes(model: nn.Module, inputs: Inputs):
    """Dim.AUTO on dim 0 of every tensor, and on dim 1 of integer tensors (token ids, masks),
    keyed by the names of ``model.forward``'s parameters."""
    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: torch.export.Dim.AUTO}
        if not x.is_floating_point() and x.dim() >= 2:
            dims[1] = torch.export.Dim.AUTO
        return dims
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    shapes = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        mapped = pytree.tree_map(spec, value)
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes.update(mapped)
        else:
            shapes[name] = mapped
    return shapes


def _trace(target: nn.Module, leaf_modules, concrete_args: dict | None, inputs: Inputs | None) -> fx.GraphModule:
    """``torch.fx`` symbolic tracing; arguments that are ``None`` or Python scalars (given so, or
    left at such a default) become constants (``concrete_args``): symbolic_trace would otherwise
    trace ``if mask is not None`` as true. The graph guards them: another value passed later fails
    with "mask has been specialized to have value None"."""
    if concrete_args is None:
        concrete_args = _constant_arguments(target, inputs) or None
    tracer = _LeafTracer(tuple(leaf_modules))
    versions = {name: b._version for name, b in target.named_buffers()}
    with _augmented_assignment_in_place():
        graph = tracer.trace(target, concrete_args=concrete_args)
    updated = [name for name, b in target.named_buffers() if b._version != versions.get(name)]
    if updated:  # an update that reads no input ran once on the real tensor, and is not in the graph
        raise TraceError(f"forward updates buffer {updated[0]!r} in a way symbolic_trace cannot record")
    gm = fx.GraphModule(tracer.root, graph, type(target).__name__)
    gm.meta[DIALECT_KEY] = "torch"
    return gm


def _constant_arguments(target: nn.Module, inputs: Inputs | None) -> dict:
    """``forward``'s arguments that are None or a Python scalar in this call (passed so, or left at
    such a default), by name: what symbolic_trace should see as constants."""
    signature = inspect.signature(target.forward)
    bound = signature.bind_partial(*inputs.args, **inputs.kwargs) if inputs is not None else signature.bind_partial()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    values = {name: bound.arguments.get(name, p.default) for name, p in signature.parameters.items() if p.kind in plain}
    return {name: v for name, v in values.items() if v is None or type(v) in (bool, int, float, str)}


AUGMENTED_ASSIGNMENTS = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
                         "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv,
                         "__imod__": operator.imod, "__ipow__": operator.ipow, "__iand__": operator.iand,
                         "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
                         "__irshift__": operator.irshift}


@contextlib.contextmanager
def _augmented_assignment_in_place():
    """While tracing, ``h += 1`` records ``operator.iadd(h, 1)`` — in place on a tensor at run time,
    as in eager — instead of Python's fallback for a Proxy, ``h = h + 1``, after which an alias
    (``g = h``) would hold the old value in the graph but the new one in the model."""
    def recorder(function):
        return lambda self, other: self.tracer.create_proxy("call_function", function, (self, other), {})
    for name, function in AUGMENTED_ASSIGNMENTS.items():
        setattr(fx.Proxy, name, recorder(function))
    try:
        yield
    finally:
        for name in AUGMENTED_ASSIGNMENTS:
            delattr(fx.Proxy, name)


def check_inputs(gm: fx.GraphModule, inputs: Inputs) -> Any:
    """Run the captured graph on ``inputs`` once, recording every node's shape
    (``meta['tensor_meta']``); return its outputs or raise ``InputError``."""
    try:
        return propagate_shapes(gm, inputs)
    except Exception as e:
        raise InputError(
            f"the model does not run on the example inputs ({inputs.describe()}): {type(e).__name__}: {_first_line(e)}\n"
            "Fix: pass inputs of the shape and dtype model.forward expects, on the model's device."
        ) from e


def run_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(*args, **kwargs)`` without gradients, or ``InputError`` naming why it fails."""
    try:
        with torch.no_grad(), unchanged_buffers(model):
            return inputs(model)
    except Exception as e:
        raise InputError(
            f"the model does not run on the example inputs ({inputs.describe()}): {type(e).__name__}: {_first_line(e)}\n"
            "Fix: pass inputs of the shape and dtype model.forward expects, on the model's device."
        ) from e


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple = ()):  # a default: torch.load re-creates tracers without arguments
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """The given leaf types, torch's own layers, and modules with forward hooks: called as
        modules, their hooks keep running (tracing through them would inline what the hooks compute
        and drop what they do)."""
        hooked = bool(m._forward_hooks or m._forward_pre_hooks) and m is not self.root
        return hooked or isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        """A parameter read as an attribute (``F.layer_norm(x, s, self.weight)``) becomes a get_attr
        node, as in ``fx.Tracer``, but found by a dict instead of a scan of every parameter per read
        (which makes tracing quadratic in depth)."""
        if isinstance(attr_val, nn.Parameter):
            if not hasattr(self, "_parameter_names"):
                self._parameter_names = {id(p): n for n, p in self.root.named_parameters()}
            name = self._parameter_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise InputError(
            f"could not copy {type(model).__name__} to protect it from the rewrite: {e}. "
            "Fix: make the model deep-copyable, or pass inplace=True to rewrite it in place."
        ) from e


