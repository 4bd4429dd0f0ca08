"""ONNX export of an optimized graph, checked by ``onnx.checker`` and reproduced by onnxruntime."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .capture import dynamic_shapes
from .errors import ExportError, InputError
from .verify import rel_error
from .inputs import Inputs, as_inputs
from .progress import progress


@dataclass
class OnnxStats:
    path: str
    nodes: int
    initializer_bytes: int
    file_bytes: int


@dataclass
class ExportReport:
    """What was written, how far onnxruntime is from torch, and the original model's export beside it."""

    model: OnnxStats
    error: float  # max relative error, onnxruntime vs torch, worst over the batches checked
    opset: int
    batches: list[int]  # batch sizes onnxruntime was checked at (example inputs' first, then 1 and 7 if dynamic)
    baseline: OnnxStats | None = None

    def __str__(self) -> str:
        lines = [f"{'ONNX':<10} {'nodes':>7} {'initializer bytes':>18} {'file bytes':>12}"]
        for label, s in (("original", self.baseline), ("optimized", self.model)):
            if s is not None:
                lines.append(f"{label:<10} {s.nodes:>7} {s.initializer_bytes:>18,} {s.file_bytes:>12,}")
        lines.append(f"opset {self.opset}; onnxruntime vs torch max relative error {self.error:.1e} "
                     f"at batch {', '.join(map(str, self.batches))}; {self.model.path}")
        return "\n".join(lines)


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *, baseline: nn.Module | None = None,
                opset: int | None = None, dynamic_batch: bool = True, lean: bool = True,
                rtol: float = 1e-4) -> ExportReport:
    """Export ``module`` to ``path`` and prove the file right: ``onnx.checker`` passes and
    onnxruntime's outputs are within ``rtol`` (max relative error) of torch's, on the example
    inputs and, with ``dynamic_batch`` (dim 0 of every input symbolic), at batch 1 and 7 too (an
    example batch of 1 is traced at batch 7: torch.export would fix a size of 1).
    ``lean`` folds the exporter's static shape arithmetic and drops no-op nodes (``fxfuse.lean_onnx``).
    ``baseline`` (e.g. the original model) is exported the same way to a temporary file, for
    comparison of node count and initializer bytes. ``opset`` None takes the exporter's default; the
    report says which.
    A progress bar on a terminal (``FXFUSE_QUIET=1`` silences it, see ``fxfuse.progress``)."""
    inputs = as_inputs(example_inputs)
    example_batch = inputs.tensors()[0].shape[0]
    checks = [inputs] + [inputs.map(lambda x, b=b: _with_batch(x, b)) for b in ((1, 7) if dynamic_batch else ())
                         if b != example_batch]
    batches = [xs.tensors()[0].shape[0] for xs in checks]
    traced = checks[-1] if dynamic_batch and batches[0] == 1 else inputs  # export would fix a batch of 1
    if traced is not inputs:
        _check_runs_at_another_batch(module, traced)
    with progress(desc="fxfuse export_onnx", total=1 + len(checks) + (baseline is not None)) as bar:
        bar.set_postfix_str("torch.onnx.export")
        stats, opset_used = _export(module, traced, Path(path), opset, dynamic_batch, lean)
        bar.update()
        run, errors = onnxruntime_runner(path), []
        for b, xs in zip(batches, checks):
            bar.set_postfix_str(f"onnxruntime check, batch {b}")
            errors.append(rel_error(_run_at(run, xs, b, path), _torch_outputs(module, xs)))
            bar.update()
        error = max(errors)
        if not error <= rtol:
            raise ExportError(f"onnxruntime's output differs from torch's by {error:.2e} (> rtol {rtol:g}) for {path}")
        report = ExportReport(stats, error, opset_used, batches)
        if baseline is not None:
            bar.set_postfix_str("baseline export")
            with tempfile.TemporaryDirectory() as tmp:
                report.baseline, _ = _export(baseline, traced, Path(tmp) / "baseline.onnx", opset, dynamic_batch,
                                              lean)
            bar.update()
    return report


def onnxruntime_runner(path: str | os.PathLike) -> Callable[[tuple], list[torch.Tensor]]:
    """A function running the ONNX file at ``path`` by onnxruntime's CPU provider (session made once)."""
    import onnxruntime as ort  # imported on use, like onnx below: `import fxfuse` stays light

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs) -> list[torch.Tensor]:
        inputs = as_inputs(inputs)
        named = {k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor) and k in names}
        positional = [x for x in Inputs(inputs.args).tensors()] + [
            x for k, v in inputs.kwargs.items() if k not in named for x in Inputs((v,)).tensors()]
        named.update(zip([n for n in names if n not in named], positional))
        feed = {name: named[name].detach().cpu().numpy() for name in names}
        return [torch.from_numpy(y) for y in session.run(None, feed)]
    return run


def run_onnxruntime(path: str | os.PathLike, inputs) -> list[torch.Tensor]:
    """Outputs of the ONNX file at ``path`` on ``inputs``, by onnxruntime's CPU provider."""
    return onnxruntime_runner(path)(inputs)


def _check_runs_at_another_batch(module: nn.Module, inputs: Inputs) -> None:
    try:
        _torch_outputs(module, inputs)
    except InputError as e:  # a graph fxfuse captured by torch.export at batch 1 accepts batch 1 only
        raise ExportError(f"{type(module).__name__} runs at batch 1 only, so its ONNX file cannot have a dynamic "
                          f"batch: {str(e).split(' Fix:')[0]} Optimize it with example inputs of a batch of 2 or more, "
                          f"or pass dynamic_batch=False.") from e


def _run_at(run: Callable, inputs: Inputs, batch: int, path) -> list[torch.Tensor]:
    try:
        return run(inputs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"onnxruntime cannot run {path} at batch {batch}: {first}. Fix: pass dynamic_batch=False "
                          f"(the graph's shapes depend on the batch size), or give example inputs of a batch of 2 "
                          f"or more") from e


def _with_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Fresh random floats, or the example's own rows (token ids, masks) repeated, at ``batch``."""
    if x.is_floating_point():
        return torch.randn(batch, *x.shape[1:], dtype=x.dtype, device=x.device)
    return x[torch.arange(batch, device=x.device) % x.shape[0]]


def _torch_outputs(module: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [y.cpu() for y in torch.utils._pytree.tree_leaves(inputs(module))]


def _export(module: nn.Module, inputs: Inputs, path: Path, opset: int | None, dynamic_batch: bool, lean: bool):
    import onnx

    dynamic = dynamic_shapes(module, inputs) if dynamic_batch else None
    try:
        torch.onnx.export(module, inputs.args, str(path), kwargs=inputs.kwargs or None, dynamo=True,
                          external_data=False, opset_version=opset, dynamic_shapes=dynamic, verbose=False)
        model = onnx.load(str(path))
        if lean:
            from .lean_onnx import lean as lean_model  # onnxscript's optimizer: imported on use

            model = lean_model(model)
            onnx.save(model, str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        fix = " If the model's shapes depend on the batch size, pass dynamic_batch=False." if dynamic_batch else ""
        raise ExportError(f"ONNX export of {type(module).__name__} to {path} failed: {type(e).__name__}: {e}.{fix}") from e
    initializer_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    opset_used = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_used != opset:
        raise ExportError(f"the ONNX exporter wrote opset {opset_used} to {path}, not the opset {opset} asked for: it "
                          f"cannot convert this model to opset {opset}. Give opset {opset_used} or later, or none.")
    return OnnxStats(str(path), len(model.graph.node), initializer_bytes, path.stat().st_size), opset_used
