"""Benchmark harness: original against compressed — parameters, bytes, MACs, ONNX size, latency.

For each model of a suite it builds three variants from the same random weights:

- ``original``: the architecture as shipped (GELU/ReLU MLPs, BatchNorm);
- ``fxfuse``: ``fxfuse.optimize`` of the model with every collapse candidate's activation set to
  PReLU(α=1), i.e. what a fully LayerCollapse-trained model looks like;
- ``hand``: the same collapse written by hand (each MLP replaced by one ``nn.Linear``; for
  BatchNorm-only models ``torch.fx.experimental.optimization.fuse``), the reference fxfuse must match.

The tied decoder (``gpt_tied``) is the tie case: ``fxfuse`` runs ``optimize(..., tie=Tie(...))``
(permute-merge of two windows of three feed-forward sublayers, a third of them), ``hand`` makes each
window's blocks call one shared ``FeedForward`` (weights averaged) — same compute, fewer weights.

Latency: on CUDA, CUDA events around each call after warm-up, median of repeats, in eager mode,
``torch.compile`` and CUDA-graph replay; on CPU, torch eager and onnxruntime (default graph
optimisation level) with ``time.perf_counter``.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .export import export_onnx, onnxruntime_runner
from .optimize import optimize
from .progress import progress, write
from .verify import propagate_shapes
from .report import count_macs
from .tie import Tie


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # the original architecture, random weights, eval mode
    linearize: Callable[[nn.Module], nn.Module]  # in place: collapse candidates' activations → PReLU(1)
    hand_collapse: Callable[[nn.Module], nn.Module]  # in place, on the linearized copy
    image: int = 224
    tokens: tuple[int, int] | None = None  # (vocab, context): the input is token ids, not images
    tie_windows: list[tuple[int, ...]] | None = None  # FF windows fxfuse ties (optimize(..., tie=...))

    def example(self, batch: int, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A random input batch: images (B, 3, H, W) in ``dtype`` or token ids (B, context)."""
        if self.tokens:
            vocab, context = self.tokens
            return torch.randint(0, vocab, (batch, context), device=device)
        return torch.randn(batch, 3, self.image, self.image, device=device, dtype=dtype)


@dataclass
class Result:
    model: str
    variant: str
    params: int
    param_bytes: int
    macs: int | None
    onnx_bytes: int | None = None
    onnx_nodes: int | None = None
    latency_ms: dict = field(default_factory=dict)  # "cuda/bfloat16/eager/b64" → median ms
    spread_ms: dict = field(default_factory=dict)  # the same keys → [first quartile, third quartile] ms
    profile: list = field(default_factory=list)  # top CUDA kernels of the eager forward: [name, ms, share]


def unit_prelu() -> nn.PReLU:
    return nn.PReLU(init=1.0)


def collapsed_linear(fc1: nn.Linear, fc2: nn.Linear) -> nn.Linear:
    """One Linear for fc2 ∘ fc1 (LayerCollapse Eq. 3), formed in float64, written by hand."""
    w1, w2 = fc1.weight.double(), fc2.weight.double()
    linear = nn.Linear(fc1.in_features, fc2.out_features, device=fc1.weight.device)
    with torch.no_grad():
        linear.weight.copy_(w2 @ w1)
        linear.bias.copy_(w2 @ fc1.bias.double() + fc2.bias.double())
    return linear.to(fc1.weight.dtype).eval()


def _timm_mlps(model: nn.Module):
    from timm.layers import Mlp

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Mlp)]


def _linearize_timm(model: nn.Module) -> nn.Module:
    for _, _, mlp in _timm_mlps(model):
        mlp.act = unit_prelu()
    return model


def _hand_collapse_timm(model: nn.Module) -> nn.Module:
    for parent, name, mlp in _timm_mlps(model):
        setattr(parent, name, collapsed_linear(mlp.fc1, mlp.fc2))
    return model


def _linearize_vgg(model: nn.Module) -> nn.Module:
    model.classifier[1], model.classifier[4] = unit_prelu(), unit_prelu()
    return model


def _hand_collapse_vgg(model: nn.Module) -> nn.Module:
    c = model.classifier
    model.classifier = nn.Sequential(collapsed_linear(collapsed_linear(c[0], c[3]), c[6]))
    return model


def _hand_tie(windows: list[tuple[int, ...]]) -> Callable[[nn.Module], nn.Module]:
    """Each window's decoder blocks call one ``FeedForward`` whose weights are the members' mean."""
    def tie(model: nn.Module) -> nn.Module:
        for window in windows:
            members = [model.blocks[i].ff for i in window]
            shared = copy.deepcopy(members[0])
            with torch.no_grad():
                for name, p in shared.named_parameters():
                    p.copy_(torch.stack([m.get_parameter(name) for m in members]).mean(0))
            for i in window:
                model.blocks[i].ff = shared
        return model
    return tie


def _decoder_case(name: str, windows: list[tuple[int, ...]], **config) -> Case:
    from .models import TinyDecoder

    build = lambda: TinyDecoder(**config).eval()  # noqa: E731
    tokens = (config["vocab"], config["context"])
    return Case(name, build, lambda m: m, _hand_tie(windows), tokens=tokens, tie_windows=windows)


def _fuse_batchnorm(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, **kwargs).eval()
    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        model = getattr(torchvision.models, name)()
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            nn.init.uniform_(bn.running_var, 0.5, 2.0)
            nn.init.normal_(bn.running_mean, 0, 0.2)
        return model.eval()
    return build


def suite(name: str, models: list[str] | None = None) -> list[Case]:
    """The cases of a named suite ("smoke", "cpu", "gpu"), or only ``models`` of it."""
    timm_case = lambda n, build, image=224: Case(n, build, _linearize_timm, _hand_collapse_timm, image)  # noqa: E731
    cases = {
        "vit_t16": timm_case("vit_t16", _timm("vit_tiny_patch16_224")),
        "vit_b16": timm_case("vit_b16", _timm("vit_base_patch16_224")),
        "mixer_b16": timm_case("mixer_b16", _timm("mixer_b16_224")),
        "vgg11": Case("vgg11", _torchvision("vgg11"), _linearize_vgg, _hand_collapse_vgg),
        "resnet18": Case("resnet18", _torchvision("resnet18"), lambda m: m, _fuse_batchnorm),
        "tiny_vit": timm_case("tiny_vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
        "gpt_tied": _decoder_case("gpt_tied", [(4, 5, 6), (7, 8, 9)], vocab=8192, dim=768, layers=12, heads=12,
                                  hidden=3072, context=256),
        "tiny_decoder": _decoder_case("tiny_decoder", [(1, 2, 3)], vocab=96, context=64),
    }
    names = {"gpu": ["vit_b16", "mixer_b16", "vit_t16", "vgg11", "resnet18", "gpt_tied"],
             "cpu": ["vit_t16", "resnet18", "vgg11", "mixer_b16", "gpt_tied"], "smoke": ["tiny_vit", "tiny_decoder"]}[name]
    return [cases[n] for n in names if not models or n in models]


def variants(case: Case, device: str, passes=None) -> dict[str, nn.Module]:
    """original, fxfuse (``optimize`` with ``passes``, default its own) and hand variants of ``case``
    in float32 on ``device``, same weights."""
    torch.manual_seed(0)
    original = case.build()
    linear = case.linearize(copy.deepcopy(original)).to(device)
    original = original.to(device)
    example = (case.example(2, device),)
    tie = Tie(windows=case.tie_windows, calibration=[case.example(8, device)]) if case.tie_windows else None
    return {"original": original, "fxfuse": optimize(linear, example, passes=passes, tie=tie),
            "hand": case.hand_collapse(copy.deepcopy(linear))}


def static_costs(model: nn.Module, case: Case) -> tuple[int, int, int | None]:
    """Parameters, parameter bytes (each tensor once) and MACs at batch 1."""
    params = list(model.parameters())
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    propagate_shapes(gm, (case.example(1, params[0].device),))
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params), count_macs(gm)


def cuda_times(fn: Callable, warmup: int = 10, repeat: int = 30) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn()`` between CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cpu_times(fn: Callable, warmup: int = 5, repeat: int = 20) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn()`` (``time.perf_counter``), after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def summarize(samples: dict[str, list[float]]) -> tuple[dict, dict]:
    """Per timing key: the median, and the interquartile range [q1, q3] (how noisy the median is)."""
    medians = {key: round(statistics.median(t), 4) for key, t in samples.items()}
    spreads = {key: [round(q, 4) for q in statistics.quantiles(t, n=4)[::2]] for key, t in samples.items()}
    return medians, spreads


def cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable:
    """A replay function for ``model(x)`` captured in a CUDA graph (static input)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def time_cuda(model: nn.Module, case: Case, dtypes, batches, modes) -> dict[str, list[float]]:
    out = {}
    for dtype in dtypes:
        m = copy.deepcopy(model).to(dtype)
        compiled = torch.compile(m, dynamic=False) if "compile" in modes else None
        for batch in batches:
            x = case.example(batch, "cuda", dtype)
            fns = {"eager": lambda: m(x), "compile": lambda: compiled(x), "cudagraph": lambda: cuda_graph(m, x)}
            for mode in modes:
                fn = fns[mode]() if mode == "cudagraph" else fns[mode]
                out[f"cuda/{str(dtype)[6:]}/{mode}/b{batch}"] = cuda_times(fn)
    return out


def profile_cuda(model: nn.Module, case: Case, dtype: torch.dtype, batch: int, top: int = 8) -> list:
    """The ``top`` operators by CUDA time over 5 eager forwards: [name, ms per forward, share of total]."""
    from torch.profiler import ProfilerActivity, profile

    m = copy.deepcopy(model).to(dtype)
    x = case.example(batch, "cuda", dtype)
    for _ in range(3):
        m(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            m(x)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith("cuda")]
    kernels = [e for e in events if e.device_type.name == "CUDA"] or events
    total = sum(e.device_time_total for e in kernels)
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    return [[e.key[:80], round(e.device_time_total / 5000, 4), round(e.device_time_total / total, 3)] for e in kernels[:top]]


def time_cpu(model: nn.Module, onnx_path: Path | None, case: Case, batches) -> dict[str, list[float]]:
    out = {}
    for batch in batches:
        x = case.example(batch)
        out[f"cpu/float32/eager/b{batch}"] = cpu_times(lambda: model(x))
        if onnx_path is not None:
            session = onnxruntime_runner(onnx_path)
            out[f"cpu/float32/onnxruntime/b{batch}"] = cpu_times(lambda: session((x,)))
    return out


def run(suite_name: str, out_dir: Path, batches, dtypes=("bfloat16",), modes=("eager", "compile", "cudagraph"),
        onnx: bool = True, profile: bool = False, models: list[str] | None = None, name: str | None = None,
        passes=None) -> dict:
    """Measure every case of ``suite_name``; write ``<name>.json`` and ``<name>.md`` (name defaults to
    the suite's) into ``out_dir``, rewritten after each variant so an interrupted run keeps its rows.
    Each result is printed as a JSON line; a progress bar over the models on a terminal (``FXFUSE_QUIET=1``
    silences it)."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if cuda else platform.processor()
            or platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "suite": suite_name}
    bar = progress(suite(suite_name, models), desc="fxfuse bench", unit="model")
    for case in bar:
        bar.set_postfix_str(case.name)
        with torch.inference_mode(False), torch.no_grad():
            for variant, model in variants(case, device, passes).items():
                r = Result(case.name, variant, *static_costs(model, case))
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "m.onnx" if onnx else None
                    if onnx:
                        cpu_model = copy.deepcopy(model).cpu()
                        stats = export_onnx(cpu_model, (case.example(1),), path)
                        r.onnx_bytes, r.onnx_nodes = stats.model.file_bytes, stats.model.nodes
                    samples = (time_cuda(model, case, [getattr(torch, d) for d in dtypes], batches, modes)
                               if cuda else time_cpu(model, path, case, batches))
                    r.latency_ms, r.spread_ms = summarize(samples)
                if profile and cuda:
                    r.profile = profile_cuda(model, case, getattr(torch, dtypes[-1]), max(batches))
                results.append(r)
                write(json.dumps(asdict(r)))
                _write(out_dir, name or suite_name, meta, results)
    return {"meta": meta, "results": [asdict(r) for r in results]}


def _write(out_dir: Path, name: str, meta: dict, results: list[Result]) -> None:
    data = {"meta": meta, "results": [asdict(r) for r in results]}
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out_dir / f"{name}.md").write_text(markdown_table(data))


def markdown_table(data: dict) -> str:
    """Per model and timing key: each variant's value and ratio to the original; params and MACs ratios."""
    rows = data["results"]
    lines = [f"Command: `{data['meta']['command']}`  \nDevice: {data['meta']['device']}, torch {data['meta']['torch']}",
             "", "| model | variant | params | MACs | ONNX bytes | timing | ms | IQR ms | ÷ original |",
             "|---|---|---|---|---|---|---|---|---|"]
    originals = {r["model"]: r for r in rows if r["variant"] == "original"}
    for r in rows:
        o = originals.get(r["model"], r)
        ratio = lambda a, b: f"{a / b:.3f}" if a and b else ""  # noqa: E731
        statics = f"{r['params']:,} ({ratio(r['params'], o['params'])}) | {r['macs'] or 0:,} ({ratio(r['macs'], o['macs'])}) | " \
                  f"{r['onnx_bytes'] or 0:,}"
        for key, ms in r["latency_ms"].items():
            iqr = "–".join(f"{q:.3f}" for q in r.get("spread_ms", {}).get(key, []))
            lines.append(f"| {r['model']} | {r['variant']} | {statics} | {key} | {ms:.3f} | {iqr} | "
                         f"{ratio(ms, o['latency_ms'].get(key))} |")
            statics = " | | "
    return "\n".join(lines) + "\n"
