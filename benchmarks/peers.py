"""Peers: fxfuse beside ONNX-level optimisers and model-level fusers, one ONNX file per tool and model.

    python benchmarks/peers.py [--models a,b,...] [--repeats N] [--time-budget S] [--out benchmarks/results/peers.json]

Tools: ``original`` (``fxfuse.export_onnx(..., lean=False)`` of the model: the dynamo exporter's file as
is, dynamic batch, example batch 2 — what the ONNX tools start from);
``ort`` (onnxruntime offline optimisation at ORT_ENABLE_ALL, the file it saves); ``onnxslim``; ``onnxsim``;
``fx_fuse`` (``torch.fx.experimental.optimization.fuse``, then exported); ``mct`` (Sony MCT without
quantisation, see ``MCT_METHOD``); ``fxfuse`` (``fxfuse.optimize`` then ``fxfuse.export_onnx``, lean);
``fxfuse_fused`` on token models (``passes=WITH_FUSION``: horizontal fusion of q/k/v and gate/up); each ONNX
tool again on fxfuse's file (``fxfuse+ort`` ...); for BERT and GPT-2 ``ort_transformers`` (onnxruntime's
transformer optimizer) on both files. Models: random weights, eval mode, randomized BatchNorm statistics,
biases and norm scales moved off their init (``nudge``).

Per file: parameters (the torch model's, else initializer elements), ONNX nodes and nodes by op type,
initializer and file bytes, ``onnx.checker``, max relative error of onnxruntime's output against the
original torch model (fresh input, batch 3), onnxruntime CPU latency at batch 1 and 8 (one intra-op and one
inter-op thread, default graph optimisation; every repeat runs every file once in turn, after one warm-up
round; median and [q1, q3] ms; repeats cut to ``--time-budget`` seconds per model, at least 5), and the
tool's wall time (ONNX tools: their own step on the input file; ``fxfuse+X``: fxfuse's optimize + export
plus X). A tool that fails is recorded with its error and the run goes on; each model runs in a process of
its own (an out-of-memory kill costs that model only). After every model: the JSON, a markdown table
(.md: rows, fxfuse against the best other file, failures) and a plot of batch-1 latency ÷ the original's (.png).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import model_compression_toolkit as mct
import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import onnxslim
import timm
import torch
import torchvision
import transformers as tf
from model_compression_toolkit.core import QuantizationConfig
from model_compression_toolkit.core.common.model_builder_mode import ModelBuilderMode
from model_compression_toolkit.core.graph_prep_runner import graph_preparation_runner
from model_compression_toolkit.core.pytorch.default_framework_info import DEFAULT_PYTORCH_INFO
from model_compression_toolkit.core.pytorch.pytorch_implementation import PytorchImplementation
from model_compression_toolkit.target_platform_capabilities.targetplatform2framework.attach2pytorch import (
    AttachTpcToPytorch,
)
from onnxruntime.transformers.optimizer import optimize_model
from timm.layers import Mlp
from torch import nn
from torch.fx.experimental.optimization import fuse

import fxfuse
from fxfuse.models import randomize_batchnorm
from fxfuse.passes import WITH_FUSION
from optimize_cost import vgg11_bn_prelu_head  # benchmarks/, on sys.path when this script runs

ONNX_TOOLS = ("ort", "onnxslim", "onnxsim")
MCT_METHOD = ("MCT's own graph preparation without its quantisation: core.graph_prep_runner."
              "graph_preparation_runner (its torch.fx graph reader, the prepare-graph substitutions, BN folding and "
              "forward folding, Conv2d-Conv2d linear collapsing, residual collapsing; quantisation configs are "
              "attached to the graph, never applied; IMX500 TPC v1.0 for the fusing info), then "
              "PytorchImplementation.model_builder(graph, ModelBuilderMode.FLOAT), exported by fxfuse.export_onnx")

TABLE_NOTE = ("Latency: median [q1, q3] ms, all files alternated. Error: max relative error of onnxruntime's output "
              "against the original torch model (batch 3, fresh input). Tool s: the tool's own time (ONNX tools on "
              "the original's file; fxfuse+X includes fxfuse's optimize + export). Params: the torch model's, else "
              "initializer elements (†).")
VERDICT_NOTE = ("fxfuse against the fastest and the smallest other file (original included). As fast: a lower median "
                "or overlapping IQRs; as small: initializer MB within 0.1 %.")


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple | dict]  # (batch, seed) → positional tuple or keyword dict
    transformer: tuple[str, int, int] | None = None  # onnxruntime.transformers: (model_type, heads, hidden)


# ---------------------------------------------------------------- suite
def _images(size: int) -> Callable[[int, int], tuple]:
    return lambda batch, seed: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def _tokens(vocab: int, seq: int) -> Callable[[int, int], dict]:
    def make(batch, seed):
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return make


def _timm_mlp_act(name: str, act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A timm model whose every ``Mlp`` activation is ``act()``; a zero-initialised head (Mixer's) gets
    random weights, or every output would be 0 and no error measurable."""
    def build():
        model = timm.create_model(name)
        for mlp in (m for m in model.modules() if isinstance(m, Mlp)):
            mlp.act = act()
        if not model.head.weight.any():
            nn.init.normal_(model.head.weight, std=0.02)
        return model
    return build


def _conv_stack(first: int, second: int, prelu: bool, blocks: int = 4, channels: int = 64) -> Callable[[], nn.Module]:
    """A stem conv, then ``blocks`` × (ReLU → Conv k=first → BN → [PReLU(1)] → Conv k=second): the first
    conv pads so that the map keeps its size, the second is unpadded (what compose needs)."""
    def build():
        layers = [nn.Conv2d(3, channels, 3, padding=1)]
        for _ in range(blocks):
            middle = [nn.BatchNorm2d(channels)] + ([nn.PReLU(init=1.0)] if prelu else [])
            pad = (first - 1) // 2 + (second - 1) // 2
            layers += [nn.ReLU(), nn.Conv2d(channels, channels, first, padding=pad), *middle,
                       nn.Conv2d(channels, channels, second)]
        return randomize_batchnorm(nn.Sequential(*layers))
    return build


def _hf(kind: str) -> Callable[[], nn.Module]:
    """A 4-layer transformers 5 model: hidden 256, 4 heads, vocabulary 1000, no cache."""
    def build():
        common = {"vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
        if kind == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128,
                                                    use_cache=False, **common))
        if kind == "bert":
            return tf.BertForSequenceClassification(tf.BertConfig(
                num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                max_position_embeddings=128, num_labels=3, **common))
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=688, max_position_embeddings=128, use_cache=False, **common))
    return build


def nudge(model: nn.Module) -> nn.Module:
    """Move every bias and norm scale (1-D parameters, PReLU slopes excepted) off its init: zero biases
    let an exporter or simplifier drop their Adds, which a trained model's would not."""
    slopes = {id(m.weight) for m in model.modules() if isinstance(m, nn.PReLU)}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and id(p) not in slopes:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def suite() -> dict[str, Case]:
    img, tok, prelu = _images(224), _tokens(1000, 32), lambda: nn.PReLU(init=1.0)
    cases = [
        Case("resnet18", lambda: randomize_batchnorm(torchvision.models.resnet18()), img),
        Case("mobilenet_v2", lambda: randomize_batchnorm(torchvision.models.mobilenet_v2()), img),
        Case("vgg11_bn_prelu_head", vgg11_bn_prelu_head, img),
        Case("vit_t16_prelu", _timm_mlp_act("vit_tiny_patch16_224", prelu), img),
        Case("vit_t16_identity", _timm_mlp_act("vit_tiny_patch16_224", nn.Identity), img),
        Case("mixer_b16_prelu", _timm_mlp_act("mixer_b16_224", prelu), img),
        Case("mixer_b16_identity", _timm_mlp_act("mixer_b16_224", nn.Identity), img),
        Case("conv1x1_bn_prelu_conv3x3", _conv_stack(1, 3, prelu=True), _images(56)),
        Case("conv3x3_bn_conv1x1", _conv_stack(3, 1, prelu=False), _images(56)),
        Case("gpt2", _hf("gpt2"), tok, ("gpt2", 4, 256)),
        Case("bert", _hf("bert"), tok, ("bert", 4, 256)),
        Case("llama", _hf("llama"), tok),
    ]
    return {c.name: c for c in cases}


# ---------------------------------------------------------------- tools
class _Positional(nn.Module):
    """A transformers model called with positional token ids and mask (MCT reads positional inputs only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _MctFloat(nn.Module):
    """MCT's float model (``*args`` in, a list out) called as the original: positionally or by ``names``."""

    def __init__(self, model: nn.Module, names: list[str] | None):
        super().__init__()
        self.model, self.names = model, names or []

    def forward(self, *args, **kwargs):
        y = self.model(*args, *(kwargs[n] for n in self.names))
        return y[0] if isinstance(y, (list, tuple)) and len(y) == 1 else y


def mct_float(model: nn.Module, example) -> nn.Module:
    names = list(example) if isinstance(example, dict) else None
    if names:
        model, example = _Positional(model), (example["input_ids"], example["attention_mask"])
    fqc = AttachTpcToPytorch().attach(mct.get_target_platform_capabilities())
    impl = PytorchImplementation()
    graph = graph_preparation_runner(model, lambda: iter([list(example)]), QuantizationConfig(),
                                     DEFAULT_PYTORCH_INFO, impl, fqc)
    return _MctFloat(impl.model_builder(graph, mode=ModelBuilderMode.FLOAT)[0].eval(), names)


TORCH_TOOLS = {"original": lambda m, x: m, "fx_fuse": lambda m, x: fuse(m), "mct": mct_float,
               "fxfuse": lambda m, x: fxfuse.optimize(m, x)}
FXFUSE_TOOLS = ("fxfuse", "fxfuse_fused")  # exported lean (fxfuse.lean_onnx); the others as torch exports them
FUSED = {"fxfuse_fused": lambda m, x: fxfuse.optimize(m, x, passes=WITH_FUSION)}  # horizontal fusion, transformers


def onnx_tool(tool: str, src: Path, dst: Path, case: Case) -> None:
    """Write ``tool``'s rewrite of the ONNX file ``src`` to ``dst``."""
    if tool == "ort":  # offline optimisation: the session saves the graph it optimised
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    elif tool == "onnxslim":
        onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    elif tool == "onnxsim":
        model, ok = onnxsim.simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("onnxsim.simplify: its own check failed")
        onnx.save(model, str(dst))
    else:
        model_type, heads, hidden = case.transformer
        optimized = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden)
        optimized.save_model_to_file(str(dst))


# ---------------------------------------------------------------- measurements
def onnx_stats(path: Path) -> dict:
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        checker = "ok"
    except Exception as e:  # noqa: BLE001  (recorded: the file is still measured)
        checker = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    inits = model.graph.initializer
    numel = [int(np.prod(t.dims, dtype=np.int64)) for t in inits]
    itemsize = [onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in inits]
    ops = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    return {"nodes": len(model.graph.node), "ops": dict(ops.most_common()), "init_elements": sum(numel),
            "init_bytes": sum(n * size for n, size in zip(numel, itemsize)),
            "file_bytes": path.stat().st_size, "checker": checker}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, inputs) -> dict:
    """Inputs by name where the file kept the model's argument names, the others in order."""
    names = [i.name for i in sess.get_inputs()]
    named = inputs if isinstance(inputs, dict) else {}
    rest = iter([v for k, v in named.items() if k not in names] if named else inputs)
    return {n: (named[n] if n in named else next(rest)).numpy() for n in names}


def rel_error(outputs: list, reference: list[torch.Tensor]) -> float:
    """max |y − ref| / max |ref|, worst over the outputs."""
    return max(float(np.abs(y.astype(np.float64) - r.double().numpy()).max() / max(float(r.abs().max()), 1e-30))
               for y, r in zip(outputs, reference))


def latencies(sessions: dict, feeds: dict, repeats: int, budget_s: float) -> tuple[dict, int]:
    """Milliseconds per file and batch: every file once in turn per repeat, after one warm-up round whose
    duration cuts ``repeats`` to fit ``budget_s`` (at least 5)."""
    times = {tool: {b: [] for b in feeds[tool]} for tool in sessions}

    def one_round(record: bool) -> None:
        for tool, sess in sessions.items():
            for b, f in feeds[tool].items():
                start = time.perf_counter()
                sess.run(None, f)
                if record:
                    times[tool][b].append(1000 * (time.perf_counter() - start))
    start = time.perf_counter()
    one_round(False)
    repeats = min(repeats, max(5, int(budget_s / max(time.perf_counter() - start, 1e-9))))
    for _ in range(repeats):
        one_round(True)
    return times, repeats


def summary(ms: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(ms, n=4)
    return {"median": round(statistics.median(ms), 4), "iqr": [round(q1, 4), round(q3, 4)]}


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS: glibc keeps it mapped otherwise (after VGG's
    exports 4.6 GB of a 6.7 GB process, enough for the timed sessions to be killed for memory)."""
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def failure(e: Exception) -> str:
    """The exception's type and message (one line), and where it was raised (file:line in function)."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    message = " / ".join(line for line in str(e)[:600].splitlines() if line.strip())
    return f"{type(e).__name__}: {message} [{Path(frame.filename).name}:{frame.lineno} in {frame.name}]"


# ---------------------------------------------------------------- one model
def produce(case: Case, tmp: Path) -> tuple[nn.Module, dict[str, dict]]:
    """The original model and every tool's row: its ONNX file, params and seconds, or its failure."""
    torch.manual_seed(0)
    model, example, rows = nudge(case.build()).eval(), case.inputs(2, 0), {}

    def attempt(name: str, make: Callable[[Path], dict], before: float = 0.0) -> None:
        start, path = time.perf_counter(), tmp / f"{name.replace('+', '_')}.onnx"
        try:
            rows[name] = {"path": path, **make(path), "tool_s": time.perf_counter() - start + before}
        except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
            rows[name] = {"failure": failure(e)}
        release_memory()
        status = rows[name].get("failure") or f"{rows[name]['tool_s']:.1f} s"
        print(f"[peers] {case.name} / {name}: {status}", file=sys.stderr, flush=True)

    def torch_tool(name, make):
        def run(path):
            with torch.no_grad():
                module = make(copy.deepcopy(model), example).eval()  # fx fuse's GraphModule is in training mode
            fxfuse.export_onnx(module, example, path, lean=name in FXFUSE_TOOLS)
            return {"params": sum(p.numel() for p in module.parameters())}
        return run

    def onnx_step(tool, base):
        def run(path):
            if "path" not in rows[base]:
                raise RuntimeError(f"no {base} file")
            onnx_tool(tool, rows[base]["path"], path, case)
            return {}
        return run

    for tool, make in {**TORCH_TOOLS, **(FUSED if isinstance(example, dict) else {})}.items():
        attempt(tool, torch_tool(tool, make))
    for tool in ONNX_TOOLS + (("ort_transformers",) if case.transformer else ()):
        attempt(tool, onnx_step(tool, "original"))
        attempt(f"fxfuse+{tool}", onnx_step(tool, "fxfuse"), before=rows["fxfuse"].get("tool_s", 0.0))
    return model, rows


def measure(case: Case, repeats: int, budget_s: float) -> tuple[list[dict], int]:
    """Every tool's row for ``case`` (file statistics, error, latency) and the repeats timed."""
    with tempfile.TemporaryDirectory() as tmp:
        model, rows = produce(case, Path(tmp))
        fresh = case.inputs(3, 1)
        with torch.no_grad():
            reference = torch.utils._pytree.tree_leaves(model(**fresh) if isinstance(fresh, dict) else model(*fresh))
        del model
        release_memory()
        sessions, feeds = {}, {}
        for tool, row in rows.items():
            if "path" in row:
                row.update(onnx_stats(row["path"]))
                row.setdefault("params", row["init_elements"])
                try:
                    sess = session(row.pop("path"))
                    row["error"] = rel_error(sess.run(None, feed(sess, fresh)), reference)
                    sessions[tool], feeds[tool] = sess, {b: feed(sess, case.inputs(b, 2)) for b in (1, 8)}
                except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
                    row["failure"] = "onnxruntime: " + failure(e)
        times, used = latencies(sessions, feeds, repeats, budget_s)
    for tool, ms in times.items():
        rows[tool]["latency_ms"] = {f"b{b}": summary(t) for b, t in ms.items()}
    return [{"model": case.name, "tool": tool, **row} for tool, row in rows.items()], used


# ---------------------------------------------------------------- outputs
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout


def meta(args) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"command": "python " + " ".join(sys.argv), "commit": _git("rev-parse", "--short", "HEAD").strip(),
            "modified": [line[3:] for line in _git("status", "--porcelain", "fxfuse", "passes").splitlines()],
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxsim": onnxsim.__version__, "onnxslim": onnxslim.__version__,
            "mct": mct.__version__, "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ort_threads": {"intra_op": 1, "inter_op": 1}, "ort_timing_level": "default (ORT_ENABLE_ALL)",
            "example_batch": 2, "error_batch": 3, "max_repeats": args.repeats, "time_budget_s": args.time_budget,
            "mct_method": MCT_METHOD, "repeats": {}}


def _ms(s: dict | None) -> str:
    return f"{s['median']:.2f} [{s['iqr'][0]:.2f}, {s['iqr'][1]:.2f}]" if s else ""


def verdict(rows: list[dict]) -> str | None:
    """A table row: fxfuse against the fastest and the smallest other file (original included); as fast
    when its median is lower or the two IQRs overlap, as small when its initializers are (0.1 %)."""
    timed = [r for r in rows if r.get("latency_ms")]
    ours = next((r for r in timed if r["tool"] == "fxfuse"), None)
    others = [r for r in timed if not r["tool"].startswith("fxfuse")]
    if not ours or not others:
        return None
    cells = []
    for key in ("b1", "b8"):
        best = min(others, key=lambda r: r["latency_ms"][key]["median"])
        a, b = ours["latency_ms"][key], best["latency_ms"][key]
        ok = a["median"] <= b["median"] or a["iqr"][0] <= b["iqr"][1]
        cells.append(f"{'yes' if ok else 'no'}: {a['median']:.2f} vs {best['tool']} {b['median']:.2f}")
    small = min(others, key=lambda r: r["init_bytes"])
    ok = ours["init_bytes"] <= 1.001 * small["init_bytes"]
    mb = ours["init_bytes"] / 1e6, small["init_bytes"] / 1e6
    cells.append(f"{'yes' if ok else 'no'}: {mb[0]:.2f} vs {small['tool']} {mb[1]:.2f}")
    same_graph = {r["tool"]: r["nodes"] for r in rows
                  if r["tool"] in ("fxfuse+onnxsim", "fxfuse+onnxslim") and r.get("nodes")}
    cells.append(f"{'yes' if all(ours['nodes'] <= n for n in same_graph.values()) else 'no'}: {ours['nodes']} vs "
                 + ", ".join(f"{t.split('+')[1]} {n}" for t, n in same_graph.items()))
    fast = min((r for r in timed if r["tool"].startswith("fxfuse")), key=lambda r: r["latency_ms"]["b1"]["median"])
    return f"| {ours['model']} | {' | '.join(cells)} | {fast['tool']} {fast['latency_ms']['b1']['median']:.2f} |"


def markdown(data: dict) -> str:
    m, results = data["meta"], data["results"]
    modified = f" (uncommitted: {', '.join(m['modified'])})" if m["modified"] else ""
    lines = [f"Command: `{m['command']}` at {m['commit']}{modified}, {m.get('wall_s', 0) / 60:.1f} min  ",
             f"{m['cpu']}, onnxruntime {m['onnxruntime']} (1 intra-op, 1 inter-op thread), torch {m['torch']}, "
             f"onnx {m['onnx']}, onnxsim {m['onnxsim']}, onnxslim {m['onnxslim']}, MCT {m['mct']}; repeats: "
             + ", ".join(f"{k} {v}" for k, v in m["repeats"].items()), "", TABLE_NOTE, "",
             "| model | tool | params | nodes | init MB | error | b1 ms | b8 ms | tool s |", "|---" * 9 + "|"]
    failures = []
    for r in results:
        if "nodes" in r:
            error, lat = f"{r['error']:.1e}" if "error" in r else "", r.get("latency_ms", {})
            lines.append(f"| {r['model']} | {r['tool']} | {r['params']:,}{'' if r['tool'] in TORCH_TOOLS or r['tool'] in FUSED else '†'} | "
                         f"{r['nodes']} | {r['init_bytes'] / 1e6:.2f} | {error} | {_ms(lat.get('b1'))} | "
                         f"{_ms(lat.get('b8'))} | {r['tool_s']:.1f} |")
        else:
            lines.append(f"| {r['model']} | {r['tool']} | failed (below) | | | | | | |")
        if r.get("failure") or r.get("checker", "ok") != "ok":
            failures.append(f"- {r['model']} / {r['tool']}: {r.get('failure') or 'onnx.checker: ' + r['checker']}")
    head = ("| model | as fast, b1 ms | as fast, b8 ms | as small, init MB | nodes ≤ onnxsim/onnxslim of fxfuse's "
            "file | fastest fxfuse file, b1 ms |")
    lines += ["", VERDICT_NOTE, "", head, "|---" * 6 + "|"]
    models = dict.fromkeys(r["model"] for r in results)
    lines += [v for v in (verdict([r for r in results if r["model"] == name]) for name in models) if v]
    lines += ["", f"MCT: {m['mct_method']}.", "", "Failures and checker messages:", ""]
    return "\n".join(lines + (failures or ["- none"])) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in data["results"]))
    cols = min(4, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, models):
        timed = [r for r in data["results"] if r["model"] == name and r.get("latency_ms")]
        b1 = [r["latency_ms"]["b1"] for r in timed]
        base = next((s["median"] for r, s in zip(timed, b1) if r["tool"] == "original"), None)
        if base:
            spread = [[(s["median"] - s["iqr"][0]) / base for s in b1],
                      [(s["iqr"][1] - s["median"]) / base for s in b1]]
            ax.barh([r["tool"] for r in timed], [s["median"] / base for s in b1], xerr=spread, error_kw={"lw": 0.8},
                    color=["tab:orange" if r["tool"].startswith("fxfuse") else "tab:blue" for r in timed])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.invert_yaxis()
            ax.tick_params(labelsize=7)
        ax.set_title(f"{name} (original {base or 0:.1f} ms)", fontsize=8)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("onnxruntime CPU latency at batch 1 ÷ the original's (bar: median, whiskers: IQR; lower is faster)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_isolated(name: str, args) -> tuple[list[dict], int]:
    """``measure`` of one model in a child process: a crash or an out-of-memory kill costs that model only."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        rc = subprocess.run([sys.executable, __file__, "--models", name, "--repeats", str(args.repeats),
                             "--time-budget", str(args.time_budget), "--rows-out", str(out)], check=False).returncode
        if rc == 0:
            return tuple(json.loads(out.read_text()))
    return [{"model": name, "tool": "all", "failure": f"the harness process exited with {rc} (-9: killed)"}], 0


def main() -> None:
    cases = suite()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(cases), help=f"comma-separated, of: {', '.join(cases)}")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per model, at most")
    parser.add_argument("--time-budget", type=float, default=20.0,
                        help="seconds of timed repeats per model: repeats are cut to fit (at least 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # a child process: one model's rows
    args = parser.parse_args()
    if set(args.models.split(",")) - set(cases):
        parser.error(f"unknown models: {', '.join(sorted(set(args.models.split(',')) - set(cases)))}")
    logging.disable(logging.WARNING)  # MCT and onnxruntime.transformers log every substitution
    os.environ.setdefault("FXFUSE_QUIET", "1")
    if args.rows_out:
        args.rows_out.write_text(json.dumps(measure(cases[args.models], args.repeats, args.time_budget)))
        return
    data, start = {"meta": meta(args), "results": []}, time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        rows, data["meta"]["repeats"][name] = measure_isolated(name, args)
        data["results"] += rows
        data["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps(data, indent=1))
        args.out.with_suffix(".md").write_text(markdown(data))
        plot(data, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
