"""Capture: validate the user's model and example inputs, copy the model, trace it with torch.fx.

The user's model is never touched: tracing works on a deep copy, and the copy is what gets
rewritten (``inplace=True`` skips the copy and rewrites the model's own modules).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import InputError, TraceError, UnsupportedModelError
from .pass_manager import propagate_shapes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_input_tuple(example_inputs: Any) -> tuple | None:
    """Normalise ``example_inputs`` (None, a tensor, or a sequence of tensors) to a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise InputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {_describe(example_inputs)}. "
        "Pass the positional arguments of model.forward, e.g. (torch.randn(1, 3, 224, 224),)."
    )


def check_model(model: Any) -> None:
    """Raise a named error when ``model`` cannot be rewritten as it stands."""
    if not isinstance(model, nn.Module):
        raise InputError(f"fxfuse needs a torch.nn.Module, got {_describe(model)}.")
    if model.training:
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


def capture(model: nn.Module, *, inplace: bool = False, leaf_modules: Iterable[type] = (),
            concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace (a copy of) ``model`` into a GraphModule, turning trace failures into ``TraceError``.

    A ``GraphModule`` (e.g. from ``transformers.utils.fx.symbolic_trace``) is used as it is (copied
    unless ``inplace``), not traced again."""
    check_model(model)
    target = model if inplace else _copy(model)
    if isinstance(target, fx.GraphModule) and not leaf_modules and concrete_args is None:
        return target  # already a graph (e.g. from transformers' HF tracer): retracing could lose what it handled
    tracer = _LeafTracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(target, concrete_args=concrete_args)
    except Exception as e:  # torch raises several types (TraceError, TypeError, NotImplementedError)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}.forward: {type(e).__name__}: {e}\n"
            "Fix: mark the submodule that holds data-dependent control flow as a leaf "
            "(optimize(..., leaf_modules=[ThatModule])), or fix the offending argument with "
            "optimize(..., concrete_args={'flag': value})."
        ) from e
    name = type(target).__name__
    return fx.GraphModule(tracer.root, graph, name)


def check_inputs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Any:
    """Run the traced graph on ``example_inputs`` once, recording every node's shape
    (``meta['tensor_meta']``); return its outputs or raise ``InputError``."""
    try:
        return propagate_shapes(gm, example_inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in example_inputs)
        raise InputError(
            f"the model does not run on the example inputs ({shapes}): {type(e).__name__}: {e}\n"
            "Fix: pass inputs of the shape and dtype model.forward expects, on the model's device."
        ) from e


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple = ()):  # a default: torch.load re-creates tracers without arguments
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

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


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
