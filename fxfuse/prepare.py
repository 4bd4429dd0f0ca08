"""prepare_collapse: make Linear → act → Linear (and Conv → act → Conv) pairs collapsible.

LayerCollapse (Sec. 3, 4.2) fine-tunes a trained model after swapping the activation between two
layers for a PReLU, PReLU_α(x) = max(0, x) + α·min(0, x) (Eq. 1), and pulling α to 1 (Eq. 9).
The PReLU starts as the function it replaces where it can:

- ReLU ≙ α = 0, LeakyReLU(s) ≙ α = s, an existing PReLU keeps its slopes;
- GELU is first replaced by ReLU (Sec. 4.2: "minimal effect on performance"), so α = 0.

Pairs are the chains ``Linear → [BatchNorm | Dropout | Identity]* → act → [...]* → Linear`` (and
the conv ones) whose hidden values have no other user, and only those where the collapse would
pay: Eq. 7, Gain = 1 − n_in·n_out / (n_h·(n_in + n_out)) > 0, and the corrected Eq. 8 for convs
(``fxfuse.passes.compose_conv``). Of those, ``which`` picks all, the last fraction (the paper
regularises 40 % of the layers, from the end, App. C/D.4), or the named ones.

The inserted PReLU nodes carry their role in ``node.meta`` (``collapse_pairs`` finds them from
the graph), so training code never needs parameter names.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .affine import batchnorm_problem, collapse_gain, is_between_op
from .capture import EAGER_KEY, _copy, capture, check_inputs
from .conv import compose_gain, composed_shape, composition_problem
from .errors import InputError, TraceError, UnsupportedModelError
from .feedforward import SHAPE_READS, FeedForward, find_feedforwards
from .match import Chain, chain_where, find_chains, kinds, rank_of, where
from .module_tree import dense_modules, module_calls, replace_modules, sole_module, tensor_names, without_cache
from .rewrite import replace_chain, tidy
from .inputs import as_inputs
from .ir import BATCHNORM, CONV, IDENTITY, LINEAR, Op, is_kind, module_of

ROLE_KEY = "fxfuse_collapse_pair"
SKIPPED_KEY = "fxfuse_prepare_skipped"
PAIRS_ATTRIBUTE = "fxfuse_collapse_pairs"  # a plain attribute of a prepared module: torch.save keeps it
ZERO_SLOPE_FUNCTIONS = {F.relu, torch.relu, F.gelu}  # ReLU, and GELU (which becomes ReLU first)


@dataclass(frozen=True)
class CollapsePair:
    """A prepared pair: the PReLU inserted between two layers, and what collapsing them saves."""

    slope: str  # module path of the inserted PReLU in the prepared GraphModule
    where: tuple[str, ...]  # module paths of the chain in the user's model
    gain: float  # Eq. 7 (Linear) or the corrected Eq. 8 (Conv)


def module_slope(module: nn.Module) -> torch.Tensor | float | None:
    """The PReLU slope that stands for an activation module (ReLU and GELU — transformers' GELU
    variants too — 0, LeakyReLU s, a PReLU its slopes), or None."""
    if isinstance(module, nn.PReLU):
        return module.weight.detach().clone()
    if isinstance(module, (nn.ReLU, nn.GELU)) or (type(module).__module__.startswith("transformers.")
                                                  and "GELU" in type(module).__name__):
        return 0.0
    if isinstance(module, nn.LeakyReLU):
        return float(module.negative_slope)
    return None


def initial_slope(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | float | None:
    """The PReLU slope that stands for ``node``'s activation (ReLU/GELU 0, LeakyReLU s), or None."""
    mod = module_of(gm, node)
    if mod is not None:
        return module_slope(mod)
    if (node.op == "call_function" and node.target in ZERO_SLOPE_FUNCTIONS) or (
            node.op == "call_method" and node.target == "relu"):
        return 0.0
    if node.op == "call_function" and node.target is F.leaky_relu:
        return float(node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01))
    return None


ACTIVATION = "activation"


def activation(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """``node`` as an activation a PReLU can stand for (``initial_slope``), else None."""
    if node.args and isinstance(node.args[0], fx.Node) and initial_slope(gm, node) is not None:
        return Op(ACTIVATION, (node,), node.args[0])
    return None


def _middle(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    return activation(gm, node) or is_between_op(gm, node)  # a PReLU is an activation to prepare


is_layer = kinds(LINEAR, CONV)


def pair_gain(gm: fx.GraphModule, chain: Chain) -> float | str:
    """Eq. 7 for Linear pairs, the corrected Eq. 8 for Conv pairs, or why the pair cannot collapse
    (a BatchNorm between them that ``optimize`` could not fold, a Linear with a Conv, a padded conv)."""
    first, second = chain.first, chain.last
    problem = next(filter(None, (batchnorm_problem(op.stats, first) for op in chain.middle
                                 if op.kind == BATCHNORM)), None)
    if problem:  # optimize would not fold it, so the trained pair would never collapse
        return problem
    if first.is_conv != second.is_conv:
        return "a Linear and a Conv: no single layer computes their composition"
    if not first.is_conv:
        (n_hidden, n_in), n_out = first.weight.shape, second.weight.shape[0]
        return collapse_gain(n_in, n_hidden, n_out)
    return composition_problem(first, second) or compose_gain(first.weight, second.weight,
                                                              composed_shape(first, second))


def _candidates(gm: fx.GraphModule) -> tuple[list[tuple[Chain, Op, float]], list[tuple[list[str], str]]]:
    """(chain, activation op, gain) for every collapsible pair, and the (where, reason) of the others."""
    pairs, skipped = [], []
    for chain, reason in find_chains(gm, is_layer, _middle, is_layer):
        names = chain_where(gm, chain)
        acts = [op for op in chain.middle if op.kind == ACTIVATION]
        if reason or len(acts) > 1:
            skipped.append((names, reason or f"{len(acts)} activations between the layers"))
            continue
        if not acts:
            continue  # already linear: fxfuse.optimize collapses it as it stands
        gain = pair_gain(gm, chain)
        if isinstance(gain, str) or gain <= 0:
            skipped.append((names, gain if isinstance(gain, str) else f"compression gain {gain:.2f} ≤ 0"))
        else:
            pairs.append((chain, acts[0], gain))
    return pairs, skipped


def _select(pairs: list, which, names_of: Callable[[Any], list[str]]) -> list:
    """``which``: 'all', a fraction in (0, 1] of the pairs counted from the end, or module names
    (``names_of(pair)``: its first layer, activation and dropouts, its last layer last).

    A name picks the pair that its first layer, activation or dropout belongs to (a layer that ends
    one pair and starts the next picks the next).
    """
    if which == "all":
        return pairs
    if isinstance(which, (int, float)) and not isinstance(which, bool):
        if not 0 < which <= 1:
            raise InputError(f"which={which!r}: a fraction must lie in (0, 1], e.g. 0.4 for the last 40 % of pairs.")
        return pairs[len(pairs) - math.ceil(round(which * len(pairs), 9)):]  # round: 1/3·6 may be 2.0000000001
    if isinstance(which, (list, tuple, set)) and all(isinstance(w, str) for w in which):
        named = {w: p for p in pairs for w in names_of(p)[:-1]}
        unknown = [w for w in which if w not in named]
        if unknown:
            raise InputError(f"which names {unknown}, which belong to no collapsible pair. Name a layer or "
                             f"activation of one of: {[' → '.join(names_of(p)) for p in pairs]}.")
        chosen = {id(named[w]) for w in which}
        return [p for p in pairs if id(p) in chosen]
    raise InputError(f"which={which!r}: pass 'all', a fraction such as 0.4, or a list of module names.")


def _new_prelu(gm: fx.GraphModule, chain: Chain, act: fx.Node, per_channel: bool) -> nn.PReLU | str:
    """The PReLU for ``act``: one slope, or one per hidden channel (PReLU's channel axis is 1)."""
    first, init = chain.first, initial_slope(gm, act)
    keeps_slopes = isinstance(init, torch.Tensor) and init.numel() == first.out_channels  # an existing PReLU(C)
    channels = first.out_channels if per_channel or keeps_slopes else 1
    if channels > 1 and not keeps_slopes and not first.is_conv:
        if rank_of(act) != 2:
            return ("one slope per channel needs a rank-2 Linear output (PReLU's channel axis is 1): "
                    "pass example_inputs to prove the rank, or per_channel=False")
    if isinstance(init, torch.Tensor) and init.numel() not in (1, channels):
        return f"the existing PReLU has {init.numel()} slopes, the pair {channels} channels"
    prelu = nn.PReLU(channels).to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        prelu.weight.copy_(torch.as_tensor(init, dtype=prelu.weight.dtype).expand(channels))
    return prelu


def prepare_collapse(model: nn.Module, example_inputs: Any = None, *, which: str | float | Sequence[str] = "all",
                     per_channel: bool = False, keep_class: bool | None = None, leaf_modules=(),
                     concrete_args: dict | None = None) -> nn.Module:
    """A copy of ``model`` with the chosen pairs' activations swapped for PReLUs: of its own class
    where every chosen activation is one submodule (then that submodule is replaced by an
    ``nn.PReLU``, recorded in a transformers config for ``fxfuse.from_pretrained``), else a
    GraphModule computing ``model`` with PReLU nodes.

    ``which``: ``"all"`` collapsible pairs, a fraction of them counted from the end (0.4, as the
    paper), or module names (a pair's first layer or activation). ``per_channel``: one slope per
    hidden channel instead of one per pair (a GraphModule). ``keep_class``: None (default) as
    above; True: the model's class or ``UnsupportedModelError``; False: always a GraphModule.
    ``example_inputs`` prove a Linear output's rank for ``per_channel``, and are needed for models
    that only torch.export captures (transformers 5).

    The pairs: on a torch.fx.symbolic_trace graph the chains Linear/Conv → [BatchNorm | Dropout]*
    → act → [...]* → Linear/Conv; on an exported graph (a model symbolic_trace cannot capture)
    the feed-forward sublayers with one up projection (``ff_pairs``: Linear or GPT-2's Conv1D).

    ``model`` is not changed. GELU becomes ReLU first, so a GELU model's function changes
    slightly; ReLU, LeakyReLU and PReLU are kept exactly. The pairs are in ``collapse_pairs(result)``,
    the ones left alone with their reasons in ``skipped_of(result)``.
    """
    inputs = as_inputs(example_inputs)
    try:
        gm = capture(model, inputs, method="fx", leaf_modules=leaf_modules, concrete_args=concrete_args)
    except TraceError:
        if keep_class is False or per_channel or inputs is None:
            raise
        return _prepare_feedforwards(model, inputs, which)
    gm.meta.pop(EAGER_KEY, None)
    if inputs is not None:
        check_inputs(gm, inputs)  # also fills the shapes (tensor_meta) that per_channel needs
    pairs, skipped = _candidates(gm)
    if not pairs:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Linear → activation → Linear (or Conv → act → Conv) pair that "
            f"would pay to collapse. Left alone: {skipped or 'none found'}. Fix: collapsible pairs widen "
            "(n_hidden > n_in·n_out/(n_in + n_out)) and their hidden values have no other user.")
    chosen = _select(pairs, which, lambda p: [w for n in p[0].nodes for w in where(gm, n)])
    if keep_class is not False and not per_channel:
        places = [sole_module(gm, [act.output], f"the activation {act.output.name}") for _, act, _ in chosen]
        if all(path for path, _ in places):
            acts = [(path, tuple(chain_where(gm, chain)), gain) for (chain, _, gain), (path, _) in zip(chosen, places)]
            return _swap_activations(_copy(model), acts, skipped)
        reason = next(r for p, r in places if not p)
        if keep_class:
            raise UnsupportedModelError(f"prepare_collapse(keep_class=True): {reason}. "
                                        "Fix: keep_class=None returns a GraphModule instead.")
        warnings.warn(f"prepare_collapse returns a GraphModule, not a {type(model).__name__}: {reason}, so no "
                      "submodule can be swapped for a PReLU. (keep_class=False asks for the GraphModule.)", stacklevel=2)
    return _prepare_graph(gm, chosen, skipped, per_channel)


def _prepare_graph(gm: fx.GraphModule, chosen: list, skipped: list, per_channel: bool) -> fx.GraphModule:
    """The chosen chains' activation nodes replaced by PReLU modules in ``gm``, roles in ``node.meta``."""
    for chain, act, gain in chosen:
        names = tuple(chain_where(gm, chain))
        prelu = _new_prelu(gm, chain, act.output, per_channel)
        if isinstance(prelu, str):
            skipped.append((list(names), prelu))
            continue
        node = replace_chain(gm, Chain([act]), prelu, "prelu")
        node.meta[ROLE_KEY] = CollapsePair(node.target, names, gain)
    tidy(gm)
    gm.meta[SKIPPED_KEY] = skipped
    return gm


def _prepare_feedforwards(model: nn.Module, inputs, which) -> nn.Module:
    """Module-level prepare of the FF pairs of ``model``'s exported graph (``ff_pairs``)."""
    working = _copy(model).eval()
    with without_cache(working):
        gm = capture(working, inputs, method="export", inplace=True)
    pairs, skipped = ff_pairs(gm)
    slopes_of = {p.act: module_slope(working.get_submodule(p.act)) for p in pairs}
    for p in pairs:
        if slopes_of[p.act] is None:
            skipped.append((list(p.where), f"{type(working.get_submodule(p.act)).__name__} has no PReLU that stands "
                                           "for it (ReLU, GELU, LeakyReLU and PReLU do)"))
    pairs = [p for p in pairs if slopes_of[p.act] is not None]
    if not pairs:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no feed-forward Linear → activation → Linear pair that would pay to "
            f"collapse. Left alone: {skipped or 'none found'}. Fix: LayerCollapse needs a widening MLP whose "
            "activation a PReLU can stand for; a gated (SwiGLU) FF has none.")
    chosen = _select(pairs, which, lambda p: list(p.where))
    return _swap_activations(working.train(model.training), [(p.act, p.where, p.gain) for p in chosen], skipped)


def _swap_activations(prepared: nn.Module, acts: list[tuple[str, tuple[str, ...], float]],
                      skipped: list) -> nn.Module:
    """``prepared`` (a copy of the user's model) with the activation module at each path of ``acts``
    (path, pair, gain) an ``nn.PReLU`` starting as that activation (``module_slope``; an existing
    PReLU is kept), the pairs recorded."""
    swaps = {}
    for path, _, _ in acts:
        old = prepared.get_submodule(path)
        if not isinstance(old, nn.PReLU):
            like = next(prepared.parameters())
            swaps[path] = nn.PReLU(1, init=float(module_slope(old))).to(device=like.device, dtype=like.dtype)
    replace_modules(prepared, swaps)
    setattr(prepared, PAIRS_ATTRIBUTE, [CollapsePair(path, where, gain) for path, where, gain in acts])
    if getattr(prepared, "config", None) is not None:  # for fxfuse.from_pretrained
        setattr(prepared.config, PAIRS_ATTRIBUTE, [[path, list(where), gain] for path, where, gain in acts])
    setattr(prepared, SKIPPED_KEY, skipped)
    return prepared


@dataclass(frozen=True)
class FFPair:
    """A feed-forward sublayer up → φ → down whose two layers (Linear, or GPT-2's Conv1D) and
    activation φ are each one submodule, as module paths; ``gain``: Eq. 7."""

    ff: FeedForward
    up: str
    act: str
    down: str
    gain: float

    @property
    def where(self) -> tuple[str, str, str]:
        return self.up, self.act, self.down


def ff_pairs(gm: fx.GraphModule) -> tuple[list[FFPair], list[tuple[list[str], str]]]:
    """The FFs of ``gm`` (``find_feedforwards``) that a module-level collapse can take, in graph
    order, and the (where, reason) of the others: one up projection, layers and activation each
    one submodule (``dense_modules``, ``sole_module``), a positive gain (Eq. 7)."""
    names = tensor_names(gm)
    pairs, skipped = [], []
    for ff in find_feedforwards(gm):
        if len(ff.ups) != 1:
            skipped.append(([ff.name], "a gated FF (SwiGLU: φ(x·Wg) ⊙ (x·Wu) → Wd) is not linear even where φ is, "
                                       "so it cannot collapse"))
            continue
        layers, reason = dense_modules(gm, ff, names)
        act, reason = (None, reason) if layers is None else _activation_module(gm, ff, layers)
        if act is None:
            skipped.append(([ff.name], reason))
            continue
        (n_hidden, n_in), n_out = ff.ups[0].linear_weight.shape, ff.down.linear_weight.shape[0]
        gain = collapse_gain(n_in, n_hidden, n_out)
        if gain <= 0:
            skipped.append(([layers[0], act, layers[1]], f"compression gain (Eq. 7) {gain:.2f} ≤ 0: "
                                                          f"{n_in}→{n_hidden}→{n_out} is a bottleneck"))
            continue
        pairs.append(FFPair(ff, layers[0], act, layers[1], gain))
    return pairs, skipped


def _activation_module(gm: fx.GraphModule, ff: FeedForward, layers: list[str]) -> tuple[str | None, str]:
    """The submodule computing what ``ff`` does between its two layers, or ``(None, why not)``."""
    between = [n for n in ff.region if n.op != "get_attr" and not any(p in layers for _, p in module_calls(n))
               and not (is_kind(gm, n, IDENTITY) or n.target in SHAPE_READS)]
    if not between:
        return None, "nothing between the layers: already linear, fxfuse.optimize collapses it as it stands"
    return sole_module(gm, between, f"the activation of {ff.name}")


def skipped_of(prepared: nn.Module) -> list[tuple[list[str], str]]:
    """The pairs ``prepare_collapse`` left alone, with the reasons."""
    return prepared.meta[SKIPPED_KEY] if isinstance(prepared, fx.GraphModule) else getattr(prepared, SKIPPED_KEY)


def collapse_pairs(prepared: nn.Module) -> list[CollapsePair]:
    """The pairs ``prepare_collapse`` prepared, in graph order: recorded on a module of the
    user's class, found by their role in a GraphModule's graph."""
    if not isinstance(prepared, fx.GraphModule):  # those whose PReLU is still there (not collapsed yet)
        config = getattr(prepared, "config", None)
        recorded = getattr(prepared, PAIRS_ATTRIBUTE, None) or [
            CollapsePair(slope, tuple(where), gain) for slope, where, gain in getattr(config, PAIRS_ATTRIBUTE, ())]
        return [p for p in recorded if isinstance(_submodule(prepared, p.slope), nn.PReLU)]
    return [n.meta[ROLE_KEY] for n in prepared.graph.nodes if ROLE_KEY in n.meta]


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def prepared_pairs(gm: fx.GraphModule) -> list[CollapsePair]:
    """``collapse_pairs(gm)``, or ``InputError`` when there is none (``gm`` was not prepared)."""
    pairs = collapse_pairs(gm)
    if not pairs:
        raise InputError("the model has no prepared pairs: call fxfuse.prepare_collapse(model, ...) first "
                         "and train the GraphModule it returns.")
    return pairs


def slopes(gm: fx.GraphModule, pairs: Sequence[CollapsePair] | None = None) -> list[nn.Parameter]:
    """The PReLU slope tensors α of ``pairs`` (default: every prepared pair, at least one)."""
    return [gm.get_submodule(p.slope).weight for p in (prepared_pairs(gm) if pairs is None else pairs)]
