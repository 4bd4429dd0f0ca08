"""fxfuse's own exceptions. Each message names the cause and the fix."""


class FxfuseError(Exception):
    """Base class of every error fxfuse raises on purpose."""


class InputError(FxfuseError, TypeError):
    """The model or the example inputs given to fxfuse are not usable as given."""


class TraceError(FxfuseError):
    """torch.fx could not capture the model's forward."""


class UnsupportedModelError(FxfuseError):
    """The model holds something fxfuse cannot rewrite (dtype, quantized weights, training mode)."""


class VerificationError(FxfuseError):
    """The rewritten graph does not compute what the original computed, within tolerance."""


class PassError(FxfuseError):
    """A pass failed with an unexpected exception (a bug): names the pass and those run before it."""


class ExportError(FxfuseError):
    """ONNX export, its checker, or onnxruntime's reproduction of torch's outputs failed."""
