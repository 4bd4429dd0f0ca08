"""``analyze``: what LayerCollapse and FF tying could save on a model, before any training.

    a = fxfuse.analyze(model, example_inputs)   # or: fxfuse analyze --table1 gpt2-large
    print(a.table()); a.save_chart("saves.png"); a.to_json()

Collapse candidates are runs of dense layers joined by per-element ops, whatever the activation:
Linear → φ → Linear (→ φ → Linear …, VGG's classifier), GPT-2's Conv1D, Conv → φ → Conv. Each
run becomes one layer once every φ is linear (LayerCollapse: train it to PReLU(1) with
``prepare_collapse`` + ``finetune_collapse``; Identity, eval Dropout, PReLU(1) and foldable
BatchNorm are linear already, and ``optimize`` collapses those runs as they stand). What a run saves
(LayerCollapse Table 1's question): a Linear run x ↦ W_k⋯W_1·x of n_0 → n_1 → … → n_k features
becomes W (n_k × n_0), from Σ nᵢ₋₁·nᵢ (+ biases) to n_0·n_k (+ n_k) parameters, and its MACs per
row likewise (Eq. 7 for two layers); a conv pair becomes one conv of kernel k₁ + k₂ − 1 (the
corrected Eq. 8). A run is counted only where that saves (gain > 0) and, for convs, where the
composition is exact (no padding in the second conv). MACs count Linear and Conv multiply-adds
(``fxfuse.report.count_macs``), on the example inputs' shapes.

Tie groups are the structurally identical FF sublayers (``fxfuse.feedforward``): tying n of them
shares one set of weights, saving up to (n − 1) × one FF's parameters and no MACs (FF merging).

``fxfuse analyze --table1 NAME`` builds LayerCollapse Table 1's models from their published configs on the meta
device (shapes only: GPT2-Large costs no memory) and prints the paper's figures beside ours.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .affine import affine_between, is_between_op
from .capture import capture as capture_graph
from .conv import composed_shape, composition_problem
from .feedforward import as_dense, find_feedforwards, group_feedforwards
from .inputs import as_inputs
from .ir import CONV, LINEAR, Op, is_kind, module_of
from .match import chain_where, find_chains, kinds
from .progress import progress, write
from .report import count_macs, count_params, node_macs
from .verify import propagate_shapes

EXACT_NOW = "exact now (optimize collapses it)"
NEEDS_PREPARE = "needs prepare_collapse (train the activation to linear)"
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ReLU6, nn.Hardswish,
                      nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus)
_aten = torch.ops.aten
ACTIVATION_FUNCTIONS = {F.relu, F.gelu, F.silu, F.mish, F.elu, F.leaky_relu, F.hardswish, F.relu6, F.softplus,
                        torch.relu, torch.tanh, torch.sigmoid, _aten.relu.default, _aten.gelu.default,
                        _aten.silu.default, _aten.tanh.default, _aten.sigmoid.default, _aten.hardswish.default,
                        _aten.hardtanh.default, _aten.leaky_relu.default, _aten.elu.default, _aten.mish.default,
                        _aten.softplus.default, _aten.relu_.default, _aten.hardtanh_.default, _aten.silu_.default,
                        _aten.leaky_relu_.default, _aten.elu_.default, _aten.hardswish_.default}


@dataclass
class Collapsible:
    """A run of dense layers that one layer can replace once its activations are linear."""

    where: list[str]
    kind: str  # "linear" or "conv"
    activations: list[str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    status: str  # EXACT_NOW, NEEDS_PREPARE, or why it is not counted

    @property
    def counted(self) -> bool:
        return self.status in (EXACT_NOW, NEEDS_PREPARE)


@dataclass
class TieGroup:
    """Structurally identical FF sublayers: tying them shares one set of weights."""

    sites: list[str]
    params_each: int

    @property
    def params_saved(self) -> int:
        return (len(self.sites) - 1) * self.params_each


@dataclass
class Analysis:
    model: str
    params: int
    macs: int  # every multiply-add fxfuse counts, attention's Q·Kᵀ and A·V included
    dense_macs: int  # those of Linear/Conv layers only (the convention LayerCollapse Table 1 matches)
    collapsible: list[Collapsible] = field(default_factory=list)
    tie_groups: list[TieGroup] = field(default_factory=list)
    paper: dict | None = None  # LayerCollapse Table 1's {"params": %, "macs": %} for this model

    @property
    def params_saved(self) -> int:
        return sum(c.params_before - c.params_after for c in self.collapsible if c.counted)

    @property
    def macs_saved(self) -> int:
        return sum(c.macs_before - c.macs_after for c in self.collapsible if c.counted)

    def percent(self) -> dict:
        """% of the model's parameters and MACs (all, and of dense layers) that collapsing every
        counted run removes."""
        return {"params": 100 * self.params_saved / max(self.params, 1), "macs": 100 * self.macs_saved / max(self.macs, 1),
                "dense_macs": 100 * self.macs_saved / max(self.dense_macs, 1)}

    def table(self) -> str:
        lines = [f"{'collapse candidate':<44} {'params':>25} {'MACs':>31}  status"]
        for c in self.collapsible:
            name = _short(", ".join(c.where), 44)
            lines.append(f"{name:<44} {c.params_before:>12,} → {c.params_after:>10,} "
                         f"{c.macs_before:>15,} → {c.macs_after:>13,}  {c.status}")
        pct = self.percent()
        lines.append(f"collapsing every counted run: {self.params:,} → {self.params - self.params_saved:,} parameters "
                     f"(−{pct['params']:.1f} %), {self.macs:,} → {self.macs - self.macs_saved:,} MACs (−{pct['macs']:.1f} %; "
                     f"−{pct['dense_macs']:.1f} % of the Linear/Conv MACs)")
        if self.paper:
            lines.append(f"LayerCollapse Table 1 ({self.model}): −{self.paper['params']} % parameters, "
                         f"−{self.paper['macs']} % MACs")
        for g in self.tie_groups:
            lines.append(f"tie group of {len(g.sites)} identical FFs ({_short(', '.join(g.sites), 60)}): "
                         f"up to {g.params_saved:,} parameters ({100 * g.params_saved / max(self.params, 1):.1f} %), 0 MACs")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        data.update(params_saved=self.params_saved, macs_saved=self.macs_saved, percent=self.percent())
        return json.dumps(data, indent=2)

    def save_chart(self, path: str) -> None:
        """A bar chart of the parameters each counted candidate and tie group saves (matplotlib)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        bars = [(_short(", ".join(c.where), 40), c.params_before - c.params_after, "tab:blue" if c.status == EXACT_NOW
                 else "tab:orange") for c in self.collapsible if c.counted]
        bars += [(f"tie ×{len(g.sites)}: {_short(g.sites[0], 30)}", g.params_saved, "tab:green") for g in self.tie_groups]
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.5))
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        ax.invert_yaxis()
        ax.set_xlabel("parameters saved (blue: exact now, orange: after prepare_collapse, green: by tying)")
        ax.set_title(f"{self.model}: −{self.percent()['params']:.1f} % parameters, −{self.percent()['macs']:.1f} % MACs by collapse")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def analyze(model: nn.Module, example_inputs: Any, *, capture: str = "auto", tau: float = 1e-4) -> Analysis:
    """What collapsing every Linear/Conv run and tying every group of identical FFs would save
    (see the module docstring). ``model`` may live on the meta device: only shapes are used."""
    inputs = as_inputs(example_inputs)
    gm = capture_graph(model, inputs, method=capture, inplace=True, needs_values=False)
    propagate_shapes(gm, inputs)
    linear, covered = _linear_runs(gm, tau)
    runs = linear + _feedforward_runs(gm, covered) + _conv_pairs(gm, tau)
    ffs = find_feedforwards(gm)
    groups = [TieGroup([ffs[i].name for i in members], ffs[members[0]].numel)
              for members in group_feedforwards(ffs).values() if len(members) > 1]
    dense = sum(node_macs(gm, n) or 0 for n in gm.graph.nodes if is_kind(gm, n, LINEAR, CONV) or as_dense(gm, n))
    return Analysis(type(model).__name__, count_params(gm), count_macs(gm), dense, _without_overlaps(runs), groups)


def _activation(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    mod = module_of(gm, node)
    is_act = isinstance(mod, ACTIVATION_MODULES) if mod is not None else (
        node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS)
    if is_act and node.args and isinstance(node.args[0], fx.Node):
        return Op("activation", (node,), node.args[0])
    return None


def _middle(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    return is_between_op(gm, node) or _activation(gm, node)


def _status(first: Op, middle: list[Op], tau: float) -> str:
    """EXACT_NOW when the ops between are linear already, NEEDS_PREPARE for activations (a PReLU
    with slopes ≠ 1 among them), else why the pair cannot become one layer."""
    if any(op.kind == "activation" for op in middle):
        return NEEDS_PREPARE
    affine = affine_between(first, middle, tau)
    if not isinstance(affine, str):
        return EXACT_NOW
    return NEEDS_PREPARE if "PReLU" in affine else affine


def _run_status(statuses: list[str]) -> str:
    problems = [s for s in statuses if s not in (EXACT_NOW, NEEDS_PREPARE)]
    return problems[0] if problems else NEEDS_PREPARE if NEEDS_PREPARE in statuses else EXACT_NOW


def _linear_runs(gm: fx.GraphModule, tau: float) -> tuple[list[Collapsible], set[fx.Node]]:
    """Linear → φ → Linear pairs (torch and ATen forms), joined into runs where one pair's last
    layer is the next pair's first (VGG's classifier: three Linears); and the layers' nodes."""
    pairs = [chain for chain, reason in find_chains(gm, kinds(LINEAR), _middle, kinds(LINEAR)) if not reason]
    runs: list[list] = []
    for chain in pairs:
        if runs and runs[-1][-1].ops[-1].output is chain.ops[0].output:
            runs[-1].append(chain)
        else:
            runs.append([chain])
    found, covered = [], set()
    for run in runs:
        layers = [run[0].first] + [c.last for c in run]
        covered |= {op.output for op in layers}
        middles = [op for c in run for op in c.middle]
        status = _run_status([_status(c.first, c.middle, tau) for c in run])
        where = list(dict.fromkeys(w for c in run for w in chain_where(gm, c)))
        found.append(_dense_run(gm, "linear", where, [op.output for op in layers], middles, status,
                                [(op.weight.shape[1], op.weight.shape[0], op.bias is not None) for op in layers]))
    return found, covered


def _feedforward_runs(gm: fx.GraphModule, covered: set[fx.Node]) -> list[Collapsible]:
    """The Linear–φ–Linear FFs the chain matcher cannot see (their layers not in ``covered``):
    GPT-2's Conv1D (``addmm``), activations written out as element-wise arithmetic (GPT-2's tanh
    GELU), reshapes in between."""
    found = []
    for ff in find_feedforwards(gm):
        if ff.kind != "mlp" or ff.down.node in covered:
            continue  # SwiGLU's gate is a product of two projections: no single layer computes it
        dense = [ff.ups[0], ff.down]
        shapes = [(d.matrix().shape[1], d.matrix().shape[0], d.bias is not None) for d in dense]
        found.append(_dense_run(gm, "linear", [ff.name], [d.node for d in dense], [], NEEDS_PREPARE, shapes,
                                activations=["element-wise ops"]))
    return found


def _dense_run(gm, kind: str, where: list[str], nodes: list[fx.Node], middles: list[Op], status: str,
               shapes: list[tuple[int, int, bool]], activations: list[str] | None = None) -> Collapsible:
    """A run of Linear-like layers (n_in, n_out, has_bias) at ``nodes`` collapsed into one Linear."""
    before = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in shapes)
    n_in, n_out = shapes[0][0], shapes[-1][1]
    after = n_in * n_out + n_out
    macs_before = sum(node_macs(gm, n) or 0 for n in nodes)
    rows = (node_macs(gm, nodes[0]) or 0) // max(shapes[0][0] * shapes[0][1], 1)
    names = activations or [_name(gm, op) for op in middles] or ["none"]
    if after >= before:
        status = f"no gain: {n_in}→…→{n_out} is a bottleneck (Eq. 7 gain ≤ 0)"
    return Collapsible(where, kind, names, before, after, macs_before, rows * n_in * n_out, status)


def _conv_pairs(gm: fx.GraphModule, tau: float) -> list[Collapsible]:
    found = []
    for chain, reason in find_chains(gm, kinds(CONV), _middle, kinds(CONV)):
        if reason:
            continue
        first, second = chain.first, chain.last
        problem = composition_problem(first, second)
        shape = composed_shape(first, second)
        before = sum(t.numel() for op in (first, second) for t in (op.weight, op.bias) if t is not None)
        after = math.prod(shape) + shape[0]
        macs_before = sum(node_macs(gm, op.output) or 0 for op in (first, second))
        out = second.output.meta.get("tensor_meta")
        macs_after = math.prod(out.shape) * math.prod(shape[1:]) if out is not None else 0
        status = problem or _status(first, chain.middle, tau)
        if not problem and after >= before:
            status = "no gain: the composed kernel is larger (corrected Eq. 8 gain ≤ 0)"
        found.append(Collapsible(chain_where(gm, chain), "conv", [_name(gm, op) for op in chain.middle] or ["none"],
                                 before, after, macs_before, macs_after, status))
    return found


def _without_overlaps(runs: list[Collapsible]) -> list[Collapsible]:
    """A layer collapses once: a later candidate sharing a layer with a counted one is not counted."""
    taken: set[str] = set()
    for run in runs:
        if run.counted and taken & set(run.where):
            run.status = "overlaps a candidate above"
        elif run.counted:
            taken |= set(run.where)
    seen, unique = set(), []
    for run in runs:  # the FF view repeats what the chain view found
        key = tuple(run.where)
        if key not in seen:
            seen.add(key)
            unique.append(run)
    return unique


def _name(gm: fx.GraphModule, op: Op) -> str:
    mod = module_of(gm, op.output)
    if mod is not None:
        return type(mod).__name__
    target = op.output.target
    return getattr(target, "__name__", str(target)).split(".")[-1]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# LayerCollapse Table 1: its five models, from their published configs, and its figures.
TABLE_1: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], dict]] = {}


def _table_model(name: str, params: float, macs: float):
    def register(build):
        TABLE_1[name] = (build, {"params": params, "macs": macs})
        return build
    return register


@_table_model("gpt2-large", 53.4, 52.7)
def _gpt2_large():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=1280, n_layer=36, n_head=20, use_cache=False))
    return model, {"input_ids": torch.zeros(1, 1024, dtype=torch.long)}


@_table_model("bert-large", 52.6, 57.1)
def _bert_large():
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096))
    return model, {"input_ids": torch.zeros(1, 512, dtype=torch.long)}


@_table_model("vit-large", 57.9, 58.2)
def _vit_large():
    from transformers import ViTConfig, ViTForImageClassification
    model = ViTForImageClassification(ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                intermediate_size=4096, num_labels=1000))
    return model, (torch.zeros(1, 3, 224, 224),)


@_table_model("mixer-large", 86.5, 86.5)
def _mixer_large():
    import timm
    return timm.create_model("mixer_l16_224"), (torch.zeros(1, 3, 224, 224),)


@_table_model("vgg16", 71.2, 0.6)
def _vgg16():
    import torchvision
    return torchvision.models.vgg16(), (torch.zeros(1, 3, 224, 224),)


def analyze_table_model(name: str) -> Analysis:
    """One of LayerCollapse Table 1's models, built on the meta device, analysed."""
    build, paper = TABLE_1[name]
    with torch.device("meta"):
        model, inputs = build()
    inputs = as_inputs(inputs).map(lambda t: t.to("meta"))
    result = analyze(model.eval(), inputs, capture="export")  # transformers 5 models: export only
    result.model, result.paper = name, paper
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fxfuse analyze`` options (input parsing shared with ``fxfuse optimize``)."""
    from .cli import _input_shape, _number

    parser.add_argument("model", nargs="?", help="path/to/file.py:factory (a function returning an nn.Module)")
    parser.add_argument("--input-shape", type=_input_shape, action="append", metavar="SHAPE[:DTYPE]",
                        help="one example input per use, as for fxfuse optimize (e.g. 1,128:int64)")
    parser.add_argument("--vocab", type=_number(int, 1, "100"), default=100, help="token ids are in [0, VOCAB)")
    parser.add_argument("--capture", choices=["auto", "export", "fx"], default="auto")
    parser.add_argument("--table1", nargs="+", choices=[*sorted(TABLE_1), "all"], metavar="NAME",
                        help="LayerCollapse Table 1's models, built from their configs on the meta device: "
                             f"{', '.join(sorted(TABLE_1))}, or all; printed beside the paper's figures")
    parser.add_argument("--json", help="write the analyses as JSON to this file")
    parser.add_argument("--png", help="write a bar chart of the savings (several models: one file per model)")


def run(args: argparse.Namespace) -> None:
    """``fxfuse analyze``: print each model's table (and, for --table1, the comparison with the paper)."""
    from .cli import load_model, random_input
    from .errors import InputError
    if bool(args.model) == bool(args.table1):
        raise InputError("fxfuse analyze takes a model file (FILE.py:factory --input-shape ...) or --table1 NAME..., "
                         "one of the two. Example: fxfuse analyze --table1 vgg16")
    if args.model:
        if not args.input_shape:
            raise InputError("fxfuse analyze FILE.py:factory needs --input-shape (e.g. --input-shape 1,3,224,224).")
        inputs = tuple(random_input(shape, dtype, args.vocab) for shape, dtype in args.input_shape)
        results = [analyze(load_model(args.model), inputs, capture=args.capture)]
    else:
        names = sorted(TABLE_1) if "all" in args.table1 else args.table1
        results = [analyze_table_model(name) for name in progress(names, desc="analyze")]
    for result in results:
        write(result.table() + "\n")
    if args.table1:
        write(comparison(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([json.loads(r.to_json()) for r in results], f, indent=2)
    for result in results if args.png else ():
        path = args.png if len(results) == 1 else args.png.replace(".png", f"_{result.model}.png")
        result.save_chart(path)


def comparison(results: list[Analysis]) -> str:
    """Our figures beside LayerCollapse Table 1's."""
    lines = [f"{'model':<12} {'params':>12} {'−% params ours / paper':>23} {'−% dense MACs ours / paper':>27} "
             f"{'−% all MACs':>12}"]
    for r in results:
        pct, paper = r.percent(), r.paper or {"params": math.nan, "macs": math.nan}
        lines.append(f"{r.model:<12} {r.params:>12,} {pct['params']:>13.1f} / {paper['params']:<7} "
                     f"{pct['dense_macs']:>17.1f} / {paper['macs']:<7} {pct['macs']:>12.1f}")
    return "\n".join(lines)
