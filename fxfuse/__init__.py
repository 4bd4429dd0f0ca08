"""fxfuse: smaller, faster PyTorch models by exact torch.fx graph rewrites.

    gm = fxfuse.optimize(model, example_inputs)       # a torch.fx.GraphModule, same function
    print(fxfuse.report_of(gm))                        # what was rewritten, skipped, and why
    fxfuse.export_onnx(gm, example_inputs, "model.onnx", baseline=model)

LayerCollapse training (make a GELU/ReLU model collapsible first):

    prepared = fxfuse.prepare_collapse(model, example_inputs, which=0.4)
    history = fxfuse.finetune_collapse(prepared, model, batches, epochs=10)   # model: the teacher
    passed = [p for p in fxfuse.collapse_pairs(prepared) if p.slope in history[-1]["done"]]
    gm = fxfuse.optimize(prepared, example_inputs, tau=fxfuse.max_slope_deviation(prepared, passed))
    small = fxfuse.collapse(prepared, example_inputs, tau=...)    # or: the model's own class, not a graph

The model's own class back (transformers models stay transformers models):

    tied = fxfuse.tie(model, calibration=batches, remove=4, evaluate=val_loss)
    tied.save_pretrained("out"); again = fxfuse.from_pretrained(AutoModelForCausalLM, "out")
"""
from .analysis import Analysis, analyze
from .errors import (ExportError, FxfuseError, InputError, PassError, TraceError, UnsupportedModelError,
                     VerificationError)
from .collapse_training import (AdamLC, collapse_param_groups, collapse_regularizer, finetune_collapse,
                                max_slope_deviation, self_distillation_loss)
from .export import ExportReport, export_onnx
from .optimize import optimize, report_of
from .pass_manager import Candidate, Options
from .prepare import CollapsePair, collapse_pairs, prepare_collapse, skipped_of, slopes
from .module_collapse import collapse
from .report import Report, Row
from .similarity import save_heatmap
from .tie import Tie, feedforward_cka, finetune
from .module_tie import tie  # after .tie: the name fxfuse.tie is this function
from .module_tree import from_pretrained

__all__ = [
    "optimize", "report_of", "analyze", "Analysis", "export_onnx", "ExportReport", "Report", "Row", "Candidate", "Options",
    "FxfuseError", "InputError", "TraceError", "UnsupportedModelError", "VerificationError", "PassError",
    "ExportError", "Tie", "tie", "from_pretrained", "finetune", "feedforward_cka", "save_heatmap",
    "prepare_collapse", "collapse", "collapse_pairs", "skipped_of", "slopes", "CollapsePair", "collapse_regularizer", "AdamLC",
    "collapse_param_groups", "self_distillation_loss", "finetune_collapse", "max_slope_deviation",
]
