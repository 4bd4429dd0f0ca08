"""fxfuse: smaller, faster PyTorch models by exact torch.fx graph rewrites.

    gm = fxfuse.optimize(model, example_inputs)       # a torch.fx.GraphModule, same function
    print(fxfuse.report_of(gm))                        # what was rewritten, skipped, and why
    fxfuse.export_onnx(gm, example_inputs, "model.onnx", baseline=model)
"""
from .errors import (ExportError, FxfuseError, InputError, PassError, TraceError, UnsupportedModelError,
                     VerificationError)
from .export import ExportReport, export_onnx
from .optimize import optimize, report_of
from .pass_manager import Candidate, Options
from .report import Report, Row
from .similarity import save_heatmap
from .tie import Tie, feedforward_cka, finetune

__all__ = [
    "optimize", "report_of", "export_onnx", "ExportReport", "Report", "Row", "Candidate", "Options",
    "FxfuseError", "InputError", "TraceError", "UnsupportedModelError", "VerificationError", "PassError",
    "ExportError", "Tie", "finetune", "feedforward_cka", "save_heatmap",
]
