"""Verification: run graphs on recorded inputs at full precision and compare.

A rewrite is checked on the activations its region reads when the model runs on the example
inputs (``record``): the replacement against the original nodes, every output, max relative error
(``rel_error``), with TF32 off and gradients off (``full_precision``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .inputs import as_inputs
from .report import count_macs

@contextlib.contextmanager
def full_precision():
    """No gradients and no TF32 (cuDNN enables it for float32 convolutions by default): a check
    compares the rewrite with the original, not TF32's 1e-3 rounding with itself."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

def precision_floor(dtype: torch.dtype) -> float:
    """The least tolerance a rewrite can meet in ``dtype``: 2 ulps at 1 (bf16 1.6e-2, fp16 2e-3).

    The original graph rounds its hidden values to that precision too, so a rewrite computed in
    float64 and cast back differs from it by about that much even when the math is exact.
    """
    return 2 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def rel_error(new, ref) -> float:
    """max |new - ref| / max |ref| over every tensor of (possibly nested) outputs, in float64.

    Infinite when the outputs differ in structure or shape, or hold NaN/±Inf in other places than
    the reference: a NaN never compares as "close"."""
    new_leaves, ref_leaves = torch.utils._pytree.tree_leaves(new), torch.utils._pytree.tree_leaves(ref)
    if len(new_leaves) != len(ref_leaves):
        return math.inf
    worst = 0.0
    for a, b in zip(new_leaves, ref_leaves):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                return math.inf
            a, b = a.detach().double(), b.detach().double()
            bad = ~torch.isfinite(b)
            if bad.any() or not torch.isfinite(a).all():
                if not torch.equal(~torch.isfinite(a), bad) or not torch.equal(a[bad].nan_to_num(), b[bad].nan_to_num()):
                    return math.inf
                a, b = a[~bad], b[~bad]
            scale = b.abs().max().item() if b.numel() else 0.0
            diff = (a - b).abs().max().item() if b.numel() else 0.0
            worst = max(worst, diff / max(scale, 1e-30))
    return worst


def all_finite(value) -> bool:
    """True when every floating tensor in ``value`` holds only finite numbers."""
    return all(torch.isfinite(x).all() for x in torch.utils._pytree.tree_leaves(value)
               if isinstance(x, torch.Tensor) and x.is_floating_point())


@contextlib.contextmanager
def unchanged_buffers(module: torch.nn.Module):
    """Leave no trace of the calls made inside in ``module``'s buffers (a running max, a step
    counter updated in forward): each verification run starts from the state the model was given
    in, and the returned model keeps that state. A buffer rebound in forward is put back too."""
    saved = [(owner, name, t, t.detach().clone()) for owner in module.modules()
             for name, t in owner._buffers.items() if t is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, t, value in saved:
                t.copy_(value) if t.shape == value.shape else t.set_(value)  # an observer resizes its min/max
                owner._buffers[name] = t


class NestedShapeProp(ShapeProp):
    """ShapeProp that also fills the nodes of GraphModules called as submodules (a tied FF)."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, fx.GraphModule) and not kwargs:
            return NestedShapeProp(module).propagate(*args)
        return super().call_module(target, args, kwargs)

class _Recorder(NestedShapeProp):
    """NestedShapeProp (fills ``meta['tensor_meta']``) that also keeps the values of chosen nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result

def record(gm: fx.GraphModule, inputs, wanted: set) -> dict:
    """Run ``gm`` on ``inputs`` (no grad, no TF32), filling shapes; return the values of the ``wanted`` nodes."""
    recorder = _Recorder(gm, wanted)
    run_graph(recorder, gm, inputs)
    return recorder.values

def propagate_shapes(gm: fx.GraphModule, inputs):
    """Fill every node's ``meta['tensor_meta']``, in called GraphModules too; return the outputs
    (flat, as the graph's output node holds them)."""
    return run_graph(NestedShapeProp(gm), gm, inputs)

def run_graph(interpreter: fx.Interpreter, gm: fx.GraphModule, inputs):
    """Run ``interpreter`` on the graph's placeholders (``Inputs.placeholders``): no input or output
    processing, so an exported graph's pytree signature and a traced graph's keywords both work."""
    with full_precision(), unchanged_buffers(gm):
        return interpreter.run(*as_inputs(inputs).placeholders(gm), enable_io_processing=False)

def dtype_of(values: list) -> torch.dtype:
    return next((v.dtype for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()), torch.float32)

def region_error(interp: fx.Interpreter, c, xs: list) -> tuple[float, tuple, int | None]:
    """Relative error of the replacement against the original region on the recorded inputs (worst
    over its outputs), the candidate's error bounds (absolute per sample) divided by the same scale,
    max |reference|, and — for a GraphModule replacement, shape-propagated on the way — its MACs.
    ``interp`` is made once per round: making one walks the whole graph."""
    interp.env = dict(zip(c.region.inputs, xs))
    with full_precision():
        for node in c.region.nodes:
            if node not in interp.env:
                _evaluate(interp, node)
        refs = [interp.env[o] for o in c.region.outputs]
        scale = max(max(r.detach().double().abs().max().item() for r in refs), 1e-30)
        bounds = (None, None) if c.bounds is None else tuple(b / scale for b in c.bounds(xs[0]))
        if isinstance(c.replacement, fx.GraphModule):
            new = NestedShapeProp(c.replacement).propagate(*xs)
            macs = count_macs(c.replacement)
        else:
            new, macs = c.replacement(*xs), None
        return rel_error(new, refs), bounds, macs

def _evaluate(interp: fx.Interpreter, node: fx.Node) -> None:
    """Run ``node`` in ``interp``, first whatever it reads that is not recorded yet (the get_attr
    nodes feeding F.linear, an exported graph's ``aten.t(weight)``)."""
    for arg in node.all_input_nodes:
        if arg not in interp.env:
            _evaluate(interp, arg)
    interp.env[node] = interp.run_node(node)
