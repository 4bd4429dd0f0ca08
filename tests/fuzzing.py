"""A differential fuzzer for fxfuse: random models, optimized with and without inputs, compared.

``random_program(seed)`` builds an eval-mode ``nn.Module`` whose forward is a random straight-line
program over what the passes match (Linear, F.linear, PReLU with unit / random / near-unit slopes,
BatchNorm, Conv1d/2d with random kernel, stride, padding, groups, dilation and padding mode,
Dropout, Identity) mixed with what real models put around them (residual adds, reshapes, values
read twice, a module called twice, functional activations, LayerNorm, attention-like matmuls), in
float32 or float64. What real code does is mixed in too (issue 14's classes): weights read twice
(``F.linear`` on a called module's weight, tied Linears), layer subclasses with their own forward
(also given as ``leaf_modules``), values updated in place (``h += c`` with aliases, ``x.mul_``
on the input), buffers updated in forward, forward hooks (on a layer, or on the model itself),
ops that make NaN activations, NaN/Inf example inputs, and checks at another batch size and rank.
``check(seed)`` optimizes it both ways and returns what happened; a wrong rewrite, a crash outside
fxfuse's errors, or a refusal the program gives no reason for raises ``AssertionError`` naming the
seed, so ``check(seed)`` replays it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.verify import rel_error
from fxfuse.optimize import float64_copy, float64_errors
from fxfuse.passes import ALL_PASSES


class Program(nn.Module):
    """``forward`` runs ``steps``: each (op, source index, operand index, module/parameter index)."""

    def __init__(self, steps: list, modules: list, params: list):
        super().__init__()
        self.steps, self.mods, self.params = steps, nn.ModuleList(modules), nn.ParameterList(params)

    def forward(self, x):
        values = [x]
        for op, src, other, idx in self.steps:
            values.append(OPS[op](self, values[src], values[other] if other is not None else None, idx))
        return values[-1]


def _add_in_place(x):
    x += 0.5  # an alias of x (an earlier value read again later) sees this
    return x


OPS = {
    "module": lambda self, x, _, i: self.mods[i](x),
    "flinear_of": lambda self, x, _, i: F.linear(x, self.mods[i].weight, self.mods[i].bias),
    "iadd": lambda self, x, _, __: _add_in_place(x),
    "mul_": lambda self, x, _, __: x.mul_(1.5),
    "nan_where_large": lambda self, x, _, __: x.masked_fill(x > 1.5, math.nan),
    "flinear": lambda self, x, _, i: F.linear(x, self.params[i], self.params[i + 1] if i + 1 < len(self.params) else None),
    "add": lambda self, x, y, _: x + y,
    "relu": lambda self, x, _, __: F.relu(x),
    "gelu": lambda self, x, _, __: F.gelu(x),
    "scale": lambda self, x, _, __: x * 0.5,
    "fdropout": lambda self, x, _, __: F.dropout(x, 0.3, training=self.training),
    "flatten": lambda self, x, _, __: x.flatten(1),
    "fold": lambda self, x, _, __: x.reshape(x.shape[0], 2, -1),
    "attention": lambda self, x, _, __: torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), -1) @ x,
}


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class ShiftingIdentity(nn.Identity):
    def forward(self, x):
        return x + 1


class BatchNormReLU(nn.BatchNorm1d):  # timm's BatchNormAct2d, in one dimension
    def forward(self, x):
        return F.relu(super().forward(x))


class PaddingConv(nn.Conv1d):  # timm's Conv2dSame, in one dimension: pads in forward, another __init__
    def __init__(self, channels: int, out: int, kernel: int):
        super().__init__(channels, out, kernel)

    def forward(self, x):
        return super().forward(F.pad(x, (kernel_left(self), self.kernel_size[0] - 1 - kernel_left(self))))


def kernel_left(conv: nn.Conv1d) -> int:
    return (conv.kernel_size[0] - 1) // 2


SUBCLASSES = (ScaledLinear, ShiftingIdentity, BatchNormReLU, PaddingConv)


class RunningMax(nn.Module):
    """Updates its buffers in forward (from the input: every capture records it; and a counter,
    which symbolic_trace cannot record, so it refuses), returns its input."""

    def __init__(self, counts: bool):
        super().__init__()
        self.counts = counts
        self.register_buffer("peak", torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.peak.copy_(torch.maximum(self.peak, x.detach().abs().nan_to_num(0, 0, 0).max().to(self.peak.dtype)))
        if self.counts:
            self.calls += 1
        return x


def _scale_output(module, args, output):
    return output * 1.5


@dataclass
class _Builder:
    rng: random.Random
    shapes: list = field(default_factory=list)  # shape of every value, batch dim excluded
    steps: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    params: list = field(default_factory=list)

    def module(self, mod: nn.Module, shape, src: int = -1):
        self.modules.append(mod)
        self._push(("module", src, None, len(self.modules) - 1), shape)

    def _push(self, step, shape):
        op, src, other, idx = step
        src = src % len(self.shapes)
        self.steps.append((op, src, other, idx))
        self.shapes.append(tuple(shape))

    def prelu(self, channels: int) -> nn.PReLU:
        r = self.rng.random()
        slope = 1.0 if r < 0.6 else 1 - self.rng.uniform(0, 1e-4) if r < 0.7 else self.rng.uniform(-0.5, 1.5)
        prelu = nn.PReLU(channels if self.rng.random() < 0.5 else 1, init=slope)
        if prelu.num_parameters > 1 and self.rng.random() < 0.2:
            with torch.no_grad():
                prelu.weight[self.rng.randrange(channels)] = 0.5
        return prelu

    def batchnorm(self, kind, channels: int) -> nn.Module:
        bn = kind(channels, track_running_stats=self.rng.random() < 0.9).eval()
        if bn.track_running_stats:
            with torch.no_grad():
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1, 0.2)
                bn.bias.normal_(0, 0.2)
        return bn


def _feature_step(b: _Builder) -> None:
    shape, rng = b.shapes[-1], b.rng
    f = shape[-1]
    choice = rng.choice(["linear"] * 6 + ["flinear", "prelu", "prelu", "bn", "dropout", "identity", "fdropout",
                                          "layernorm", "act", "residual", "reuse", "reshape", "attention",
                                          "shared", "tied", "subclass", "inplace", "state", "nan"])
    if choice in ("shared", "tied") and not _reusable(b, f):
        choice = "linear"
    if choice == "shared":  # F.linear on the weight of a module that is (or was) called as well
        b._push(("flinear_of", -1, None, rng.choice(_reusable(b, f))), shape)
    elif choice == "tied":  # a new Linear holding an existing one's weight
        tied = nn.Linear(f, f)
        tied.weight = b.modules[rng.choice(_reusable(b, f))].weight
        b.module(tied, shape)
    elif choice == "subclass":
        kind = rng.choice([ScaledLinear, ShiftingIdentity, BatchNormReLU])
        layer = kind(f, f) if kind is ScaledLinear else kind() if kind is ShiftingIdentity else b.batchnorm(kind, shape[0])
        b.module(layer, shape)
    elif choice == "inplace":  # h += c on a value read before (an alias) or after; x.mul_ on the input
        src = rng.choice([-1, rng.randrange(len(b.shapes))])
        b._push((rng.choice(["iadd", "mul_"]), src, None, None), b.shapes[src % len(b.shapes)])
    elif choice == "state":
        b.module(RunningMax(counts=rng.random() < 0.3), shape)
    elif choice == "nan":
        b._push(("nan_where_large", -1, None, None), shape)  # NaN activations from finite inputs
    elif choice == "linear" or (choice == "reuse" and not _reusable(b, f)):
        width = rng.choice([max(2, f // 4), f, 2 * f, 4 * f, rng.randint(2, 64)])
        b.module(nn.Linear(f, min(width, 256), bias=rng.random() < 0.8), shape[:-1] + (min(width, 256),))
    elif choice == "flinear":
        width = rng.randint(2, 128)
        b.params += [nn.Parameter(torch.randn(width, f) / math.sqrt(f)), nn.Parameter(torch.randn(width))]
        b._push(("flinear", -1, None, len(b.params) - 2), shape[:-1] + (width,))
    elif choice == "prelu":
        b.module(b.prelu(shape[0]), shape)  # nn.PReLU's channel axis is 1
    elif choice == "bn":
        b.module(b.batchnorm(nn.BatchNorm1d, shape[0]), shape)  # channel axis 1: features when rank 2
    elif choice in ("dropout", "identity"):
        b.module(nn.Dropout(0.3).eval() if choice == "dropout" else nn.Identity(), shape)
    elif choice == "layernorm":
        b.module(nn.LayerNorm(f), shape)
    elif choice in ("act", "fdropout"):
        b._push((rng.choice(["relu", "gelu", "scale"]) if choice == "act" else "fdropout", -1, None, None), shape)
    elif choice == "residual":
        same = [i for i, s in enumerate(b.shapes[:-1]) if s == shape]
        b._push(("add", -1, rng.choice(same), None) if same else ("scale", -1, None, None), shape)
    elif choice == "reuse":
        i = rng.choice(_reusable(b, f))
        b._push(("module", -1, None, i), shape)
    elif choice == "reshape":
        b._push(("flatten", -1, None, None), (math.prod(shape),)) if len(shape) == 2 or f % 2 \
            else b._push(("fold", -1, None, None), (2, f // 2))
    elif choice == "attention" and len(shape) == 2:
        b._push(("attention", -1, None, None), shape)


def _reusable(b: _Builder, f: int) -> list[int]:
    return [i for i, m in enumerate(b.modules) if isinstance(m, nn.Linear) and m.in_features == m.out_features == f]


def _conv_step(b: _Builder) -> None:
    shape, rng = b.shapes[-1], b.rng
    c, spatial = shape[0], shape[1:]
    dims = len(spatial)
    choice = rng.choice(["conv"] * 5 + ["prelu", "bn", "bn", "dropout", "identity", "act", "residual", "padconv"])
    if choice == "padconv" and dims == 1:
        conv = PaddingConv(c, rng.choice([c, 2 * c]), rng.choice([1, 3]))
        b.module(conv, (conv.out_channels, *spatial))
    elif choice == "conv" or choice == "padconv":
        _conv(b, c, spatial)
    elif choice == "prelu":
        b.module(b.prelu(c), shape)
    elif choice == "bn":
        b.module(b.batchnorm(nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d, c), shape)
    elif choice in ("dropout", "identity"):
        b.module(nn.Dropout(0.2).eval() if choice == "dropout" else nn.Identity(), shape)
    elif choice == "act":
        b._push((rng.choice(["relu", "scale"]), -1, None, None), shape)
    else:
        same = [i for i, s in enumerate(b.shapes[:-1]) if s == shape]
        b._push(("add", -1, rng.choice(same), None) if same else ("scale", -1, None, None), shape)


def _conv(b: _Builder, c: int, spatial: tuple) -> None:
    rng = b.rng
    k, s, d = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    p = rng.choice([0, 0, 1, 2])
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in spatial]
    if min(out) < 2:
        return
    c_out = rng.choice([max(1, c // 2), c, 2 * c, 4 * c, 16, 32])
    c_out = min(c_out, 64)
    groups = rng.choice([g for g in (1, 2, 4, c) if c % g == 0 and c_out % g == 0])
    mode = "reflect" if p and p < min(spatial) and rng.random() < 0.2 else "zeros"
    conv = (nn.Conv1d if len(spatial) == 1 else nn.Conv2d)(c, c_out, k, stride=s, padding=p, dilation=d,
                                                            groups=groups, padding_mode=mode, bias=rng.random() < 0.8)
    b.module(conv, (c_out, *out))


def _parallel_tail(b: _Builder, rng: random.Random) -> None:
    """Sometimes two or three layers of one geometry on the last value, summed: q/k/v, gate/up,
    parallel conv branches (fuse_parallel's matches; their bias flags, kernels or widths may differ)."""
    if rng.random() > 0.3:
        return
    shape, src = b.shapes[-1], len(b.shapes) - 1
    conv = len(shape) >= 2 and any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in b.modules)
    width = rng.choice([2, shape[0] if conv else shape[-1], 24])
    outs = []
    for _ in range(rng.choice([2, 2, 3])):
        bias = rng.random() < 0.8
        if conv:
            k = rng.choice([1, 1, 3])
            layer = (nn.Conv1d if len(shape) == 2 else nn.Conv2d)(shape[0], width, k, padding=k // 2, bias=bias)
            b.module(layer, (width, *shape[1:]), src=src)
        else:
            b.module(nn.Linear(shape[-1], width, bias=bias), shape[:-1] + (width,), src=src)
        outs.append(len(b.shapes) - 1)
    for other in outs[:-1]:
        b._push(("add", -1, other, None), b.shapes[-1])


def random_program(seed: int) -> tuple[nn.Module, tuple[int, ...], torch.dtype]:
    """A random eval-mode model, its input shape (batch first) and dtype."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind = rng.choice(["vector", "sequence", "image", "signal"])
    shape = {"vector": (rng.randint(2, 48),), "sequence": (rng.randint(2, 6), rng.randint(2, 48)),
             "image": (rng.randint(1, 6), rng.randint(6, 14), rng.randint(6, 14)),
             "signal": (rng.randint(1, 6), rng.randint(8, 24))}[kind]
    b = _Builder(rng, [shape])
    for _ in range(rng.randint(2, 12)):
        is_conv = len(b.shapes[-1]) >= 2 and kind in ("image", "signal") and len(b.shapes[-1]) == len(shape)
        if is_conv and rng.random() < 0.1 and math.prod(b.shapes[-1]) <= 2048:
            b._push(("flatten", -1, None, None), (math.prod(b.shapes[-1]),))
        else:
            (_conv_step if is_conv else _feature_step)(b)
    _parallel_tail(b, random.Random(seed ^ 0x5EED))  # its own stream: the programs before it stay as they were
    dtype = torch.float64 if rng.random() < 0.3 else torch.float32
    model = Program(b.steps, b.modules, b.params).to(dtype).eval()
    _add_hooks(model, rng)
    batch_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats for m in b.modules)
    return model, (rng.randint(2 if batch_stats else 1, 4), *shape), dtype


def _add_hooks(model: Program, rng: random.Random) -> None:
    """Sometimes a forward hook that changes a layer's output; rarely one on the model itself."""
    if model.mods and rng.random() < 0.1:
        model.mods[rng.randrange(len(model.mods))].register_forward_hook(_scale_output)
    if rng.random() < 0.02:
        model.register_forward_hook(_scale_output)


def refusal_reasons(model: Program) -> list[str]:
    """Why optimize may refuse ``model`` (the first line of the fxfuse error names it): hooks on the
    model itself, a buffer update symbolic_trace cannot record, in-place updates that make a
    capture differ from the model (checked on example inputs), NaN reaching the end."""
    reasons = []
    if model._forward_hooks:
        reasons.append("forward hooks on the model itself")
    if any(isinstance(m, RunningMax) and m.counts for m in model.mods):
        reasons.append("updates buffer")
    if any(step[0] in ("iadd", "mul_") for step in model.steps):
        reasons.append("computes something else than the model")
    if any(isinstance(m, BatchNormReLU) for m in model.mods):  # BatchNorm1d's rank check, unless a leaf
        reasons.append("symbolically traced variables cannot be used as inputs to control flow")
    return reasons


@dataclass
class Outcome:
    seed: int
    applied: int
    skipped: int
    error: float
    refused: int = 0  # optimize calls refused for a reason the program has (refusal_reasons), or NaN inputs


def check(seed: int) -> Outcome:
    """Optimize program ``seed`` with and without example inputs; assert both compute the same on
    fresh inputs (at the example's shape, another batch size and, for vector programs, rank 3),
    or refuse those inputs with fxfuse's named guards, and leave the model's buffers as given."""
    model, shape, dtype = random_program(seed)
    rng = random.Random(seed + 1)
    if not list(model.parameters()):
        try:
            fxfuse.optimize(model)
        except fxfuse.InputError:
            return Outcome(seed, 0, 0, 0.0)
        raise AssertionError(f"seed {seed}: a model without parameters was accepted")
    x = torch.randn(shape, dtype=dtype)
    if rng.random() < 0.03:
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        try:
            fxfuse.optimize(model, (x,))
        except fxfuse.InputError as e:
            assert "NaN or Inf" in str(e), f"seed {seed}: {e}"
            return Outcome(seed, 0, 0, 0.0, refused=1)
        raise AssertionError(f"seed {seed}: a NaN/Inf example input was accepted")
    leaves = list(SUBCLASSES) if rng.random() < 0.5 else []
    worst, applied, skipped, refused = 0.0, 0, 0, 0
    for inputs in ((x,), None):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            gm = fxfuse.optimize(model, inputs, passes=ALL_PASSES,  # every pass, the opt-in ones too
                                 leaf_modules=leaves if inputs is None else ())
        except fxfuse.FxfuseError as e:
            allowed = refusal_reasons(model)
            assert any(reason in str(e).splitlines()[0] for reason in allowed), (
                f"seed {seed}: refused ({'with' if inputs else 'without'} example inputs) for no reason the "
                f"program has ({allowed}): {type(e).__name__}: {e}")
            refused += 1
            continue
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), f"seed {seed}: model changed"
        report = fxfuse.report_of(gm)
        given = {k: v for k, v in gm.state_dict().items() if k in state}
        assert all(torch.equal(v, state[k]) for k, v in given.items()), f"seed {seed}: buffers changed by checking"
        for fresh in _fresh_inputs(shape, dtype, rng):
            error = _compare(seed, model, gm, fresh, report, inputs is not None)
            worst = max(worst, error)
        if inputs is None:
            assert all(r.exact for r in report.applied), f"seed {seed}: approximate rewrite without inputs"
        applied, skipped = applied + len(report.applied), skipped + len(report.skipped)
    return Outcome(seed, applied, skipped, worst, refused)


def _fresh_inputs(shape: tuple, dtype: torch.dtype, rng: random.Random) -> list[torch.Tensor]:
    batch, *rest = shape
    fresh = [torch.randn(shape, dtype=dtype), torch.randn((batch % 3 + 2, *rest), dtype=dtype)]
    if len(rest) == 1:  # a vector program at rank 3: Linears take it; BatchNorm1d normalises another axis
        fresh.append(torch.randn((2, rng.choice([2, rest[0]]), rest[0]), dtype=dtype))
    return fresh


GUARDS = ("holds for rank-", "captured by torch.export for rank-")  # fxfuse's named refusals of an input


def _compare(seed: int, model: nn.Module, gm: nn.Module, fresh: torch.Tensor, report, with_inputs: bool) -> float:
    """The rewritten model's max relative error against ``model`` on ``fresh`` (0 when the
    original does not take it, or the result refuses it with a named guard)."""
    with torch.no_grad():
        try:
            ref = model(fresh.clone())
        except Exception:
            return 0.0  # the original does not take this input either
        try:
            out = gm(fresh.clone())
        except (AssertionError, fxfuse.InputError) as e:
            assert any(g in str(e) for g in GUARDS), f"seed {seed}: {type(e).__name__}: {e}"
            return 0.0
        error = rel_error(out, ref)
        allowed = max([r.tolerance for r in report.applied] + [1e-5])
        if not error <= allowed:  # as optimize does: is it further from float64 truth than the original?
            ours, theirs = float64_errors(model, (fresh,), out, ref)
            exact = all(r.exact for r in report.applied) and _float64_gap(model, gm, fresh) <= theirs + allowed
            assert ours <= theirs + allowed or exact, (
                f"seed {seed}: optimized model differs by {error:.2e} > {allowed:g} and from float64 by {ours:.2e} > "
                f"{theirs:.2e} + {allowed:g} ({'with' if with_inputs else 'without'} example inputs, input "
                f"{tuple(fresh.shape)})\n{report.table()}")
    return error


def _float64_gap(model: nn.Module, gm: nn.Module, x: torch.Tensor) -> float:
    """The rewritten model against the original, both run in float64. An exact rewrite then differs
    only by the float32 rounding of the weights it stored, amplified as the graph amplifies any
    float32 rounding: at most about what the float32 original is from float64 (the caller's bound)."""
    try:
        return rel_error(float64_copy(gm)(x.double()), float64_copy(model)(x.double()))
    except RuntimeError:  # an exported graph holding float32 constants does not run in float64
        return math.inf
