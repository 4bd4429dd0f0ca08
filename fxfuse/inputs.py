"""Example inputs as the model takes them: positional arguments (``None`` for optional ones) and
keyword arguments (Hugging Face models are called with ``input_ids=...``)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import InputError

SCALARS = (bool, int, float)


@dataclass(frozen=True)
class Inputs:
    """``model(*args, **kwargs)``; every leaf a tensor, ``None`` or a Python number."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self, module: Callable) -> Any:
        """``module`` on fresh copies of the tensors: a forward that updates its input in place
        (``x.mul_(2)``) changes neither the caller's tensors nor the next call's inputs."""
        fresh = self.map(torch.Tensor.clone)
        return module(*fresh.args, **fresh.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        """The same structure with ``fn`` applied to every tensor."""
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, self.kwargs))
        return Inputs(tuple(args), kwargs)

    def describe(self) -> str:
        shapes = [f"{tuple(x.shape)} {x.dtype}" for x in self.tensors()]
        names = "" if not self.kwargs else f" (keywords {', '.join(self.kwargs)})"
        return ", ".join(shapes) + names

    def placeholders(self, gm: fx.GraphModule) -> list:
        """The values of ``gm``'s placeholder nodes, in order, for an Interpreter run without
        input processing: the pytree-flattened inputs of an exported graph, or the arguments bound
        to a traced graph's ``forward`` signature (defaults filled in). Tensors are fresh copies,
        as in ``__call__``."""
        self = self.map(torch.Tensor.clone)
        codegen = gm.graph._codegen
        if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
            return list(fx._pytree.tree_flatten_spec((list(self.args), self.kwargs), codegen.pytree_info.in_spec))
        bound = inspect.signature(gm.forward).bind(*self.args, **self.kwargs)
        bound.apply_defaults()
        nodes = gm.graph.find_nodes(op="placeholder")
        return [bound.arguments.get(n.target, n.args[0] if n.args else None) for n in nodes]


def as_inputs(example_inputs: Any) -> Inputs | None:
    """Normalise ``example_inputs`` — None, a tensor, a tuple/list of positional arguments, or a
    dict of keyword arguments — to ``Inputs``; raise ``InputError`` for anything else."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,))
    if isinstance(example_inputs, dict) and all(isinstance(k, str) for k in example_inputs):
        inputs = Inputs((), dict(example_inputs))
    elif isinstance(example_inputs, (tuple, list)):
        inputs = Inputs(tuple(example_inputs))
    else:
        inputs = None
    leaves = [] if inputs is None else pytree.tree_leaves((inputs.args, inputs.kwargs))
    if inputs is None or not inputs.tensors() or not all(isinstance(x, (torch.Tensor, *SCALARS)) for x in leaves):
        raise InputError(
            f"example_inputs must be a tensor, a tuple of positional arguments (tensors, None for optional ones) "
            f"or a dict of keyword arguments, got {describe_type(example_inputs)}. Pass what model.forward takes, "
            "e.g. (torch.randn(1, 3, 224, 224),) or {'input_ids': ids, 'attention_mask': mask}.")
    _check_finite(inputs)
    return inputs


def _check_finite(inputs: Inputs) -> None:
    """Refuse NaN and Inf: every check measures an error relative to the outputs these inputs give,
    and a NaN there makes every comparison pass (or fail) regardless of the rewrite."""
    for i, x in enumerate(inputs.tensors()):
        if x.is_floating_point() and x.device.type != "meta" and not torch.isfinite(x).all():
            raise InputError(
                f"example input {i} ({tuple(x.shape)} {x.dtype}) holds NaN or Inf values, which no check can compare. "
                "Fix: pass finite example inputs (for an additive attention mask use torch.finfo(dtype).min, not -inf).")


def describe_type(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {', '.join(sorted({describe_type(x) for x in obj})) or 'nothing'}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"
