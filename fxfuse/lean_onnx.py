"""A lean ONNX file: the exporter's graph without its shape arithmetic and no-op nodes.

torch's dynamo exporter writes, for a dynamic batch, the shape computations of every ``view`` and
of attention's lowering (``Shape → Slice → Concat → Reshape``), and keeps no-op arithmetic such as a
zero bias ``Add``. ``lean`` removes them in three steps, each exact (no float is computed
differently):

1. ``onnx.shape_inference`` with data propagation, so a shape's static entries are known;
2. onnxscript's optimizer: constant folding (a ``Shape`` whose entries are static becomes a
   constant, ``Reshape`` targets take ``-1`` for the one symbolic entry) and its default rewrites;
3. rules of fxfuse's own, then the optimizer again to drop the ``Identity`` nodes they leave:

   - ``x + 0``, ``x − 0``, ``x · 1``, ``x / 1``, ``x ∧ true``, ``x ∨ false`` with a constant
     *tensor* (the optimizer's own rules take scalars only) become ``x`` where broadcasting leaves
     ``x``'s shape unchanged;
   - ``Reshape(Squeeze | Unsqueeze | Flatten(x), s)`` becomes ``Reshape(x, s)`` where ``s`` is a
     constant without 0 entries (a reshape only reads its input's size, which those ops keep);
   - ``Unsqueeze(Unsqueeze(x, a), b)`` becomes one ``Unsqueeze``, for each reader of the inner one
     (the optimizer's rule takes one axis each, and one reader);
   - ``Slice(Shape(x))`` whose entries are all static becomes a constant;
   - a ``Reshape`` whose inferred output shape is its input's (static dims and named symbols
     equal, e.g. a mask viewed as ``(B, −1)``) becomes ``x``;
   - ``Reshape(f(Reshape(x, s₁)), s₂)`` becomes ``f(x)`` where ``f`` is elementwise with scalar
     constants only (GPT-2's Conv1D: ``view → GELU → view``) and ``s₂`` gives ``x``'s own shape.

``export_onnx`` checks the result with ``onnx.checker`` and against torch in onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnxscript import ir, optimizer, rewriter
from onnxscript.rewriter import _ir_utils
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase, RewriteRuleSet


def lean(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with static shape arithmetic folded and no-op nodes removed (see the module)."""
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model = optimizer.optimize(model)
    model = ir.serde.deserialize_model(rewriter.rewrite(model, pattern_rewrite_rules=_RULES))
    _merge_unsqueezes(model.graph)
    _drop_reshape_pairs(model.graph)
    return optimizer.optimize(ir.serde.serialize_model(model))


def _broadcasts_into(constant: np.ndarray, x: ir.Value) -> bool:
    """Whether ``x ∘ constant`` has ``x``'s shape: every axis of the constant is 1 or ``x``'s own."""
    if x.shape is None or constant.ndim > len(x.shape):
        return False
    dims = list(x.shape)[len(x.shape) - constant.ndim:]
    return all(c == 1 or (isinstance(d, int) and d == c) for c, d in zip(constant.shape, dims))


class _NeutralOperand(RewriteRuleClassBase):
    """``op(x, c)`` → ``x`` where the constant ``c`` is all ``neutral`` and leaves ``x``'s shape."""

    def __init__(self, op_type: str, neutral: float, constant_first: bool = False):
        super().__init__(f"{op_type}{'Left' if constant_first else ''}Neutral")
        self.op_type, self.neutral, self.constant_first = op_type, neutral, constant_first

    def pattern(self, op, x, c):
        return getattr(op, self.op_type)(*((c, x) if self.constant_first else (x, c)))

    def check(self, context, x, c) -> MatchResult:
        result, value = MatchResult(), _ir_utils.get_numpy_value(c)
        if value is None or not np.all(value == self.neutral):
            return result.fail(f"operand is not a constant of {self.neutral:g}s")
        if x.dtype != c.dtype or not _broadcasts_into(value, x):
            return result.fail("the constant would change the other operand's shape or type")
        return result

    def rewrite(self, op, x, c):
        return op.Identity(x)


class _ReshapeOfReshape(RewriteRuleClassBase):
    """``Reshape(inner(x), s)`` → ``Reshape(x, s)`` for a shape-only ``inner`` and constant ``s`` ≠ 0."""

    def __init__(self, inner: str):
        super().__init__(f"Reshape{inner}")
        self.inner = inner

    def pattern(self, op, x, shape):
        return op.Reshape(getattr(op, self.inner)(x, _allow_other_inputs=True), shape)

    def check(self, context, x, shape) -> MatchResult:
        result, target = MatchResult(), _ir_utils.get_numpy_value(shape)
        if target is None or np.any(target == 0):
            return result.fail("the target shape is not a constant free of 0 entries")
        return result

    def rewrite(self, op, x, shape):
        return op.Reshape(x, shape)


class _StaticShapeSlice(RewriteRuleClassBase):
    """``Slice(Shape(x), starts, ends)`` → the constant dims it selects, where all are static."""

    def pattern(self, op, shape, starts, ends):
        return op.Slice(shape, starts, ends, _allow_other_inputs=True)

    def check(self, context, shape, starts, ends) -> MatchResult:
        result, node = MatchResult(), shape.producer()
        if node is None or node.op_type != "Shape" or node.inputs[0].shape is None:
            return result.fail("not a slice of a known-rank Shape")
        dims = list(node.inputs[0].shape)[node.attributes.get_int("start", 0):node.attributes.get_int("end", None)]
        bounds = [_ir_utils.get_numpy_value(v) for v in context.root.inputs[1:]]
        if any(b is None or b.size != 1 for b in bounds) or (len(bounds) > 2 and int(bounds[2].item()) != 0):
            return result.fail("starts, ends, axes and steps are not one constant each on axis 0")
        step = int(bounds[3].item()) if len(bounds) > 3 else 1
        picked = dims[int(bounds[0].item()):int(bounds[1].item()):step]
        if not all(isinstance(d, int) for d in picked):
            return result.fail("a selected dim is symbolic")
        self._dims = picked
        return result

    def rewrite(self, op, shape, starts, ends):
        return op.Constant(value=ir.tensor(self._dims, dtype=ir.DataType.INT64))


def _merge_unsqueezes(graph: ir.Graph) -> None:
    """``Unsqueeze(Unsqueeze(x, a), b)`` → ``Unsqueeze(x, a′ ∪ b)``, ``a′`` = ``a``'s axes in the final rank."""
    for outer in [n for n in graph if n.op_type == "Unsqueeze"]:
        inner = outer.inputs[0].producer()
        if inner is None or inner.op_type != "Unsqueeze" or inner.inputs[0].shape is None:
            continue
        first, second = (_ir_utils.get_numpy_value(n.inputs[1]) for n in (inner, outer))
        if first is None or second is None:
            continue
        rank = len(inner.inputs[0].shape) + first.size + second.size
        added = {int(i) % rank for i in second.reshape(-1)}
        kept = [i for i in range(rank) if i not in added]
        axes = sorted(added | {kept[int(i) % (rank - second.size)] for i in first.reshape(-1)})
        merged = ir.Value(name=f"{outer.outputs[0].name}_axes", const_value=ir.tensor(axes, dtype=ir.DataType.INT64))
        graph.register_initializer(merged)
        outer.replace_input_with(0, inner.inputs[0])
        outer.replace_input_with(1, merged)
        if not inner.outputs[0].uses() and inner.outputs[0] not in graph.outputs:
            graph.remove(inner, safe=True)


class _IdentityReshape(RewriteRuleClassBase):
    """``Reshape(x, s)`` → ``x`` where shape inference gives the output ``x``'s own shape, dim by dim."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def check(self, context, x, shape) -> MatchResult:
        result, out = MatchResult(), context.output_values[0]
        if x.shape is None or out.shape is None or len(x.shape) != len(out.shape):
            return result.fail("the shapes are not known")
        if not all(_same_dim(a, b) for a, b in zip(x.shape, out.shape)):
            return result.fail("the reshape changes a dim, or one is unknown")
        return result

    def rewrite(self, op, x, shape):
        return op.Identity(x)


def _same_dim(a, b) -> bool:
    """Equal static dims, or the same named symbol (an unnamed symbolic dim proves nothing)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf", "Sigmoid", "Relu", "Neg", "Exp", "Sqrt", "Abs",
                "PRelu", "LeakyRelu", "Gelu", "Cast", "Identity"}


def _drop_reshape_pairs(graph: ir.Graph) -> None:
    """``Reshape(f(Reshape(x, s₁)), s₂)`` → ``f(x)``: see the module (rule 3, last)."""
    for outer in [n for n in graph if n.op_type == "Reshape"]:
        if outer.outputs[0] in graph.outputs:
            continue  # a graph output keeps its name and its producer
        region, inner = _scalar_elementwise_region(outer.inputs[0])
        if inner is None or not _reshapes_back(inner.inputs[0], outer):
            continue
        for node in region:
            node.outputs[0].shape = inner.inputs[0].shape  # elementwise with scalars: x's shape throughout
            for i, value in enumerate(node.inputs):
                if value is inner.outputs[0]:
                    node.replace_input_with(i, inner.inputs[0])
        ir.convenience.replace_all_uses_with(outer.outputs[0], outer.inputs[0])
        graph.remove(outer, safe=True)
        if not inner.outputs[0].uses():
            graph.remove(inner, safe=True)


def _scalar_elementwise_region(value: ir.Value):
    """The elementwise nodes from one ``Reshape`` up to ``value``, every other operand a scalar
    constant and every value inside read only inside; ``([], None)`` when there is none."""
    region, frontier, inner = [], [value], None
    while frontier:
        node = frontier.pop().producer()
        if node is None or node in region or node is inner:
            if node is None:
                return [], None
            continue
        if node.op_type == "Reshape":
            if inner is not None:
                return [], None
            inner = node
            continue
        if node.op_type not in _ELEMENTWISE or len(node.outputs) != 1:
            return [], None
        region.append(node)
        for operand in node.inputs:
            constant = _ir_utils.get_numpy_value(operand)
            if constant is None:
                frontier.append(operand)
            elif constant.size != 1:
                return [], None
    inside = set(region)
    if inner is None or any(user not in inside for n in region[1:] for user, _ in n.outputs[0].uses()):
        return [], None
    return region, inner


def _reshapes_back(x: ir.Value, outer: ir.Node) -> bool:
    """Whether ``outer``'s constant target gives ``x``'s shape: static dims equal, one ``-1`` for the symbolic."""
    target = _ir_utils.get_numpy_value(outer.inputs[1])
    if target is None or x.shape is None or target.size != len(x.shape) or np.any(target == 0):
        return False
    symbolic = [i for i, d in enumerate(x.shape) if not isinstance(d, int)]
    return (len(symbolic) <= 1 and all(int(t) == d for t, d in zip(target, x.shape) if isinstance(d, int))
            and [i for i, t in enumerate(target) if t == -1] == symbolic)


_RULES = RewriteRuleSet([
    *(_NeutralOperand.rule(op, 0.0, first) for op, first in (("Add", False), ("Add", True), ("Sub", False))),
    *(_NeutralOperand.rule(op, 1.0, first) for op, first in (("Mul", False), ("Mul", True), ("Div", False))),
    *(_ReshapeOfReshape.rule(inner) for inner in ("Squeeze", "Unsqueeze", "Flatten")),
    *(_NeutralOperand.rule("And", True, first) for first in (False, True)),
    *(_NeutralOperand.rule("Or", False, first) for first in (False, True)),
    _StaticShapeSlice.rule(), _IdentityReshape.rule(),
])
