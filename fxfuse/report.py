"""What optimize did: one row per rewrite and per skipped candidate, as a table or JSON."""
from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import as_layer, module_of
from .modules import LeftLinear


@dataclass
class Row:
    """One rewrite (status 'applied'), or one candidate left alone ('skipped', 'rolled back')."""

    pass_name: str
    status: str  # 'applied', 'skipped' (a precondition fails) or 'rejected' (verification failed)
    where: list[str]
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    error: float | None = None  # measured max relative error on the example inputs
    exact: bool | None = None
    tolerance: float | None = None  # the error the rewrite was allowed
    reason: str = ""
    score: float | None = None  # tie: a window's selection score (lower is better)
    bound_eq4: float | None = None  # approximate collapse: LayerCollapse Eq. 4–5's bound, relative like error
    bound_proven: float | None = None  # ... a bound that holds for any hidden width (see collapse_error_bounds)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    error: float | None = None  # end-to-end, original vs optimized, on the example inputs
    error_vs_float64: float | None = None  # set when `error` exceeded the tolerances: optimized vs float64 original
    original_vs_float64: float | None = None  # ... and the original's own distance from its float64 self
    seconds: float = 0.0
    tie_error: float | None = None  # end-to-end after the (approximate, opt-in) tie step

    @property
    def applied(self) -> list[Row]:
        return [r for r in self.rows if r.status == "applied"]

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.rows if r.status not in ("applied", "scored")]

    @property
    def scored(self) -> list[Row]:
        """Candidates that were scored (tie's windows), chosen or not."""
        return [r for r in self.rows if r.status == "scored"]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A fixed-width text table: one line per row, then the totals."""
        head = f"{'pass':<16} {'status':<11} {'params':>21} {'MACs':>25} {'error':>9}  where / reason"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            detail = ", ".join(r.where) + (f"  — {r.reason}" if r.reason else "")
            detail += "" if r.score is None else f" (score {r.score:.4g})"
            if r.bound_eq4 is not None:
                detail += f"  (bounds: Eq. 4–5 {_num(r.bound_eq4)}, proven {_num(r.bound_proven)})"
            lines.append(f"{r.pass_name:<16} {r.status:<11} {_arrow(r.params_before, r.params_after):>21} "
                         f"{_arrow(r.macs_before, r.macs_after):>25} {_num(r.error):>9}  {detail}")
        lines.append("-" * len(head))
        lines.append(f"{'model':<16} {len(self.applied):>3} applied {_arrow(self.params_before, self.params_after):>21} "
                     f"{_arrow(self.macs_before, self.macs_after):>25} {_num(self.error):>9}  "
                     f"{len(self.skipped)} skipped, {self.seconds:.2f} s")
        if self.error_vs_float64 is not None:
            lines.append(f"against the float64 original: optimized {self.error_vs_float64:.2e}, "
                         f"original {self.original_vs_float64:.2e} (float32 rounding amplified downstream)")
        if self.tie_error is not None:
            lines.append(f"after tie: end-to-end max relative error {self.tie_error:.2e} (approximate, opt-in)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def count_params(module: nn.Module) -> int:
    """Parameters counted once per tensor, however many names share it."""
    return sum(p.numel() for p in module.parameters())


def layer_macs(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Multiply-accumulates of a Linear/Conv/LeftLinear node: output elements × (in/groups · kernel volume)."""
    layer = as_layer(gm, node)
    weight = layer.weight if layer is not None else getattr(module_of(gm, node), "weight", None)
    meta = node.meta.get("tensor_meta")
    if weight is None or meta is None:
        return None
    return weight_macs(meta.shape, weight)


def weight_macs(out_shape, weight) -> int:
    """Output elements × weight elements per output channel (in/groups · kernel volume)."""
    return _numel(out_shape) * _numel(weight.shape[1:])


MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"}


def count_macs(gm: fx.GraphModule) -> int | None:
    """MACs of every Linear, Conv, matmul and attention in a shape-propagated graph (None without
    shapes); a called GraphModule (a tied FF) counts once per call."""
    total = 0
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        macs = (count_macs(module) if isinstance(module, fx.GraphModule) else
                layer_macs(gm, node) if _is_weighted_product(gm, node) else _product_macs(node))
        if macs is None:
            return None
        total += macs
    return total


def _is_weighted_product(gm: fx.GraphModule, node: fx.Node) -> bool:
    return as_layer(gm, node) is not None or isinstance(module_of(gm, node), LeftLinear)


def _product_macs(node: fx.Node) -> int | None:
    """matmul: output elements × contracted dim; attention: Q·Kᵀ plus A·V."""
    if node.op not in ("call_function", "call_method") or not (
            node.target in MATMUL_TARGETS or node.target is F.scaled_dot_product_attention):
        return 0
    shapes = [getattr(a.meta.get("tensor_meta"), "shape", None) for a in node.args[:3] if isinstance(a, fx.Node)]
    if node.target in MATMUL_TARGETS and len(shapes) >= 2:
        out = node.meta.get("tensor_meta")
        return None if out is None or shapes[0] is None else _numel(out.shape) * int(shapes[0][-1])
    if node.target is F.scaled_dot_product_attention:
        if None in shapes:
            return None
        q, k, v = shapes
        return _numel(q[:-1]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _arrow(a, b) -> str:
    return "" if a is None else f"{a:,} → {b:,}" if b is not None else f"{a:,}"


def _num(x) -> str:
    return "" if x is None else f"{x:.1e}"
