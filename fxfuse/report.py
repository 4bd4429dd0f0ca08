"""What optimize did: one row per rewrite and per skipped candidate, as a table or JSON."""
from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ir import CONV, CONV_MODULES, LINEAR, module_of, view
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
    capture_seconds: float = 0.0  # of ``seconds``, the time spent capturing the graph (torch.export or symbolic_trace)
    capture: str = ""  # how the graph was captured: "export" (torch.export) or "fx" (symbolic_trace)
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
                     f"{len(self.skipped)} skipped, {self.seconds:.2f} s ({self.capture} capture {self.capture_seconds:.2f} s)")
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


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """Multiply-accumulates of one node (None when its shapes are unknown): fxfuse's one MAC count.

    ``count_macs`` sums it over a graph (``report.macs_before`` / ``macs_after``), and a report row
    sums it over the nodes a rewrite removes and counts the module put in their place with the same
    rule (``module_macs``), so the rows' MAC changes add up to the model's. What counts is what
    papers (LayerCollapse Table 1) and torchvision's / fvcore-style counters count, the products of a
    weight or of two activations: a Linear or Conv in any dialect (``fxfuse.ir``), ``LeftLinear`` and
    HF ``Conv1D``: output elements × products per output element (in/groups · kernel volume, see
    ``module_macs``); a matmul, ``mm``, ``addmm``, ``bmm``, ``baddbmm``: output elements × the
    contracted dim; attention: Q·Kᵀ plus A·V; a called GraphModule (a tied FF): its own nodes'.
    Everything else counts 0: BatchNorm, PReLU and the other activations, dropout, norms,
    element-wise arithmetic (a bias add included), softmax, pooling, reshapes — so folding a BatchNorm
    into the conv before it saves no MACs, and torchvision's ResNet-50 at 224² counts 4,089,184,256.
    """
    module = module_of(gm, node)
    if isinstance(module, fx.GraphModule):
        return count_macs(module)
    if module is not None:
        contracted = _module_contraction(module)
    else:
        op = view(gm, node)
        if op is None:
            return _product_macs(node)
        contracted = _weight_contraction(op.weight) if op.kind in (LINEAR, CONV) else 0
    return _macs(node.meta.get("tensor_meta"), contracted)


def module_macs(module: nn.Module, out_shape) -> int:
    """MACs of one call of ``module`` giving an output of ``out_shape``, by ``node_macs``'s rule (a
    Linear or Conv: output elements × in/groups · kernel volume; ``LeftLinear``: × n; HF ``Conv1D``:
    × in; any other module 0). How a report row counts the module that replaces a chain."""
    return _numel(out_shape) * _module_contraction(module)


def weight_macs(out_shape, weight) -> int:
    """A Linear's or Conv's MACs: output elements × weight elements per output channel (in/groups ·
    kernel volume), for an (out, in/groups, *kernel) ``weight``."""
    return _numel(out_shape) * _weight_contraction(weight)


def _weight_contraction(weight: torch.Tensor) -> int:
    """Products per output element of a Linear or Conv with this (out, in/groups, *kernel) weight."""
    return _numel(weight.shape[1:])


def _module_contraction(module: nn.Module) -> int:
    """Products per output element of a weighted module fxfuse knows (0 for the others)."""
    if isinstance(module, (nn.Linear, *CONV_MODULES)):  # a subclass too: its weight is the layer's
        return _weight_contraction(module.weight)
    if isinstance(module, LeftLinear):  # W (m, n) on axis -2
        return module.weight.shape[1]
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # HF GPT-2: (in, out)
        return module.weight.shape[0]
    return 0


def _macs(meta, contracted: int) -> int | None:
    return 0 if not contracted else None if meta is None else _numel(meta.shape) * contracted


aten = torch.ops.aten
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.addmm, torch.baddbmm, "matmul", "bmm", "mm",
                  aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}
ATTENTION_TARGETS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default,
                     aten._scaled_dot_product_flash_attention_for_cpu.default}


def count_macs(gm: fx.GraphModule) -> int | None:
    """MACs of a shape-propagated graph (None without shapes): ``node_macs`` summed over its nodes,
    so Linear, Conv, matmul and attention products only; a called GraphModule (a tied FF) counts
    once per call."""
    total = 0
    for node in gm.graph.nodes:
        macs = node_macs(gm, node)
        if macs is None:
            return None
        total += macs
    return total


def _product_macs(node: fx.Node) -> int | None:
    """matmul: output elements × contracted dim; attention: Q·Kᵀ plus A·V."""
    if node.op not in ("call_function", "call_method"):
        return 0
    if node.target in MATMUL_TARGETS:
        operands = node.args[1:3] if node.target in (torch.addmm, torch.baddbmm, aten.addmm.default,
                                                     aten.baddbmm.default) else node.args[:2]
        left, out = _shape(operands[0]) if operands else None, node.meta.get("tensor_meta")
        return None if left is None or out is None else _numel(out.shape) * int(left[-1])
    if node.target in ATTENTION_TARGETS:
        q, k, v = (_shape(node.kwargs.get(name, a)) for name, a in zip(("query", "key", "value"), (*node.args[:3], None, None, None)))
        if None in (q, k, v):
            return None
        return _numel(q[:-1]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))
    return 0


def _shape(arg):
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    return getattr(meta, "shape", None)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _arrow(a, b) -> str:
    return "" if a is None else f"{a:,} → {b:,}" if b is not None else f"{a:,}"


def _num(x) -> str:
    return "" if x is None else f"{x:.1e}"
