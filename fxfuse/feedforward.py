"""Feed-forward sublayers found in a graph by structure, and made to call one module (what tie uses).

Detection (no module names are read): a *dense* node is an ``nn.Linear`` / ``F.linear`` on
attributes (weight (out, in)) or ``torch.addmm(bias, x2d, weight)`` on attributes — the form GPT-2's
``Conv1D`` traces to, weight stored (in, out) — or an untraced ``Conv1D`` module. An FF is a dense
node ``down`` whose input, walked back through element-wise and shape-only nodes, reaches one dense
node (Linear → φ → Linear, φ = GELU, GELU-tanh, ReLU, SiLU, single-slope PReLU, ...) or two dense
nodes joined by a product (SwiGLU: φ(x·Wg) ⊙ (x·Wu) → Wd), every up projection reading the same
input x. The FF is the region of nodes between x and its output y; it must be self-contained (no
value inside is read outside), which is what makes replacing it by one module call valid.

Structurally identical FFs (same op sequence, same shapes) share a Weisfeiler–Lehman hash
(networkx) of their region graph; windows of adjacent FFs are drawn from one such group.

Tying replaces every FF of a window by a call to one shared module: a standalone copy of the
anchor's region holding the merged weights, registered once, so ``parameters()``, ``state_dict``
and the ONNX initializers hold its tensors once.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .alignment import FFWeights
from .errors import PassError
from .rewrite import _free_name, register, replace_nodes, tidy
from .ir import IDENTITY, LINEAR, fetch_attr, is_kind, module_of, view

ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
                       nn.ReLU6, nn.Mish, nn.ELU)
ELEMENTWISE_FUNCTIONS = {F.gelu, F.relu, F.silu, F.mish, F.elu, F.leaky_relu, torch.tanh, torch.sigmoid,
                         torch.relu, torch.pow, torch.mul, torch.add, operator.mul, operator.add, operator.truediv,
                         operator.sub, torch.erf}
ELEMENTWISE_METHODS = {"pow", "mul", "add", "tanh", "sigmoid", "relu", "__mul__", "__add__"}
SHAPE_METHODS = {"size", "view", "reshape", "contiguous"}
aten = torch.ops.aten
ELEMENTWISE_FUNCTIONS |= {aten.gelu.default, aten.relu.default, aten.silu.default, aten.mish.default, aten.elu.default,
                          aten.leaky_relu.default, aten.tanh.default, aten.sigmoid.default, aten.erf.default,
                          aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
                          aten.div.Tensor, aten.pow.Tensor_Scalar, aten.view.default, aten.reshape.default,
                          aten.sym_size.int}
SHAPE_READS = {"size", aten.sym_size.int}  # read a shape, not values
ADDMM = {torch.addmm, aten.addmm.default}  # GPT-2's Conv1D: addmm(bias, x.view(-1, in), weight (in, out))


def is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default))


@dataclass(frozen=True)
class Dense:
    """A linear map on attributes: ``weight`` stored (out, in), or (in, out) when ``transposed``."""

    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool = False

    @property
    def linear_weight(self) -> torch.Tensor:
        """The weight in nn.Linear layout (out, in), a view in its own dtype."""
        return self.weight.T if self.transposed else self.weight

    def matrix(self, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        """The weight in nn.Linear layout (out, in), in ``dtype`` (None: its own, a view of it)."""
        return self.linear_weight.detach().to(dtype or self.weight.dtype)

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight.copy_((weight.T if self.transposed else weight).to(self.weight.dtype))
            if self.bias is not None:
                self.bias.copy_(bias.to(self.bias.dtype))


@dataclass
class FeedForward:
    """One FF sublayer found in a graph: input ``x``, output ``y``, the nodes between, and roles."""

    x: fx.Node
    y: fx.Node
    region: list[fx.Node]  # graph order, get_attr nodes included, y last
    ups: list[Dense]  # [W1] or [two up projections of SwiGLU] in graph order
    down: Dense
    hidden: fx.Node  # the features for alignment: pre-activation (MLP) or the gated product (SwiGLU)
    kind: str  # 'mlp' or 'swiglu'
    signature: str = ""
    shapes: dict = field(default_factory=dict)  # outside sizes read inside (exported GPT-2): node -> axis of x

    def weights(self, dtype: torch.dtype | None = torch.float64) -> FFWeights:
        """Its weights in ``dtype``; None: in their own dtype, as views of its tensors (no copy)."""
        cast = lambda t: None if t is None else t.detach().to(dtype or t.dtype)  # noqa: E731
        ups = [(d.matrix(dtype), cast(d.bias)) for d in self.ups]
        return FFWeights(ups, (self.down.matrix(dtype), cast(self.down.bias)))

    def load(self, ff: FFWeights) -> None:
        for d, (w, b) in zip(self.ups, ff.ups):
            d.load(w, b)
        self.down.load(*ff.down)

    @property
    def numel(self) -> int:
        """Parameters of its layers (weights and biases)."""
        return sum(t.numel() for d in self.ups + [self.down] for t in (d.weight, d.bias) if t is not None)

    @property
    def name(self) -> str:
        """The module path holding all its layers (``blocks.3.ff``, ``vit.encoder.layer.3``)."""
        paths = [_origin(d.node).split(".") for d in self.ups + [self.down]]
        prefix = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        return ".".join(prefix) or self.down.node.name


def as_dense(gm: fx.GraphModule, node: fx.Node) -> Dense | None:
    layer = view(gm, node)
    if layer is not None and layer.kind == LINEAR and node.target is not torch.ops.aten.addmm.default:
        return Dense(node, layer.weight, layer.bias)
    mod = module_of(gm, node)
    if mod is not None and type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and len(node.args) == 1:
        return Dense(node, mod.weight, mod.bias, transposed=True)
    if node.op == "call_function" and node.target in ADDMM and len(node.args) == 3 and not node.kwargs:
        bias, _, weight = node.args
        if all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (bias, weight)):
            return Dense(node, fetch_attr(gm, weight.target), fetch_attr(gm, bias.target), transposed=True)
    return None


def data_input(gm: fx.GraphModule, dense: Dense) -> fx.Node:
    """The tensor a dense node transforms, looking through the flattening ``view`` of ``addmm``."""
    arg = dense.node.args[1] if dense.node.target in ADDMM else dense.node.args[0]
    if is_reshape(arg):
        return arg.args[0]
    return arg


def dense_output(dense: Dense) -> fx.Node:
    """The dense node's value in the input's shape (the un-flattening ``view`` after ``addmm``)."""
    users = list(dense.node.users)
    if dense.node.target in ADDMM and len(users) == 1 and is_reshape(users[0]):
        return users[0]
    return dense.node


def find_feedforwards(gm: fx.GraphModule) -> list[FeedForward]:
    """Every FF sublayer in graph order (see the module docstring for what counts as one)."""
    found = []
    for node in gm.graph.nodes:
        down = as_dense(gm, node)
        if down is not None:
            ff = _feedforward_ending_at(gm, down)
            if ff is not None:
                found.append(ff)
    return found


def _feedforward_ending_at(gm: fx.GraphModule, down: Dense) -> FeedForward | None:
    ups, stack, seen = [], [data_input(gm, down)], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        dense = as_dense(gm, node)
        if dense is not None:
            ups.append(dense)
            continue
        if not _elementwise(gm, node):
            return None
        if node.target not in SHAPE_READS:
            stack += [a for a in node.all_input_nodes if a.op != "get_attr"]
    if len(ups) not in (1, 2) or len({data_input(gm, d) for d in ups}) != 1:
        return None
    ups.sort(key=lambda d: _position(gm, d.node))
    x, y = data_input(gm, ups[0]), dense_output(down)
    shapes = _sizes_of(gm, x)
    region = _region(gm, x, y, shapes)
    if region is None:
        return None
    hidden = dense_output(ups[0]) if len(ups) == 1 else _join(region, [dense_output(d) for d in ups])
    if hidden is None:
        return None
    ff = FeedForward(x, y, region, ups, down, hidden, "mlp" if len(ups) == 1 else "swiglu",
                     shapes={n: axis for n, axis in shapes.items() if any(u in region for u in n.users)})
    ff.signature = structure_hash(gm, ff)
    return ff


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that acts on each hidden feature alone (so it commutes with a neuron permutation)."""
    if is_kind(gm, node, IDENTITY):  # Identity, eval-mode dropout
        return True
    mod = module_of(gm, node)
    if mod is not None:
        return isinstance(mod, ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1)
    if node.op == "call_function" and node.target is aten.prelu.default:  # one slope: the same map on every neuron
        slope = node.args[1]
        return isinstance(slope, fx.Node) and slope.op == "get_attr" and fetch_attr(gm, slope.target).numel() == 1
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS or node.target is operator.getitem
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS | SHAPE_METHODS
    return False


def _sizes_of(gm: fx.GraphModule, x: fx.Node) -> dict[fx.Node, int]:
    """Exported graphs read sizes once (``sym_size(input_ids, 0)``) and reuse them: the ``sym_size``
    nodes whose value is one of x's sizes, with that axis (an extracted FF recomputes them from x)."""
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return {}
    sizes = {}
    for node in gm.graph.find_nodes(op="call_function", target=aten.sym_size.int):
        size = node.meta.get("val")
        axis = next((i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d is not None
                     and isinstance(size, torch.SymInt) and str(d) == str(size)), None)
        if axis is not None:
            sizes[node] = axis
    return sizes


def _region(gm: fx.GraphModule, x: fx.Node, y: fx.Node, shapes: dict) -> list[fx.Node] | None:
    """Nodes on paths x → y (and the attributes they read), or None if a value inside leaks out.
    ``shapes`` (sizes of x read outside) count as x."""
    ancestors, stack = {y}, [y]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a is not x and a not in ancestors and a not in shapes:
                if a.op in ("placeholder", "output"):
                    return None
                ancestors.add(a)
                stack.append(a)
    for n in ancestors:
        if n is not y and any(u not in ancestors for u in n.users):
            return None
        if n.op not in ("get_attr",) and not _reaches(n, x, ancestors, shapes):
            return None
    return [n for n in gm.graph.nodes if n in ancestors]


def _reaches(node: fx.Node, x: fx.Node, region: set, shapes: dict) -> bool:
    """Whether ``node`` depends on x only through the region (no other outside input)."""
    return all(a is x or a in region or a in shapes for a in node.all_input_nodes)


def _join(region: list[fx.Node], branches: list[fx.Node]) -> fx.Node | None:
    """The first node in the region that depends on every branch: SwiGLU's gated product."""
    deps: dict[fx.Node, set] = {}
    for n in region:
        deps[n] = {b for b in branches if n is b} | set().union(*[deps.get(a, set()) for a in n.all_input_nodes])
        if len(deps[n]) == len(branches):
            return n
    return None


def structure_hash(gm: fx.GraphModule, ff: FeedForward) -> str:
    """Weisfeiler–Lehman hash of the region graph labelled by op, callee kind, constants and shapes."""
    import networkx as nx  # imported on use: `import fxfuse` stays light

    graph = nx.DiGraph()
    inside = set(ff.region)
    for n in ff.region:
        graph.add_node(n.name, label=_label(gm, n))
        for a in n.all_input_nodes:
            graph.add_edge(a.name if a in inside else "x", n.name)
    graph.nodes["x"]["label"] = "input"
    with warnings.catch_warnings():  # networkx 3.5 warns that digraph hashes changed; ours are compared in-run only
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(graph, node_attr="label", iterations=4)


def _label(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "get_attr":
        return f"attr{tuple(fetch_attr(gm, n.target).shape)}"
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        shapes = [tuple(p.shape) for p in mod.parameters()]
        return f"{type(mod).__name__}({mod.extra_repr()}){shapes}"  # settings: GELU's approximate, ELU's alpha
    constants = [a for a in n.args if not isinstance(a, fx.Node)]
    return f"{n.op}:{getattr(n.target, '__name__', n.target)}{constants}{sorted(n.kwargs.items(), key=str)}"


def group_feedforwards(ffs: list[FeedForward]) -> dict[str, list[int]]:
    """Indices of structurally identical FFs (same hash), in graph order."""
    groups: dict[str, list[int]] = {}
    for i, ff in enumerate(ffs):
        groups.setdefault(ff.signature, []).append(i)
    return groups


def extract(gm: fx.GraphModule, ff: FeedForward) -> fx.GraphModule:
    """A standalone GraphModule y = FF(x) with its own copies of the region's modules and tensors."""
    root, graph, env = nn.Module(), fx.Graph(), {}
    env[ff.x] = graph.placeholder("x")
    for size, axis in ff.shapes.items():
        env[size] = graph.call_function(aten.sym_size.int, (env[ff.x], axis))
    for n in ff.region:
        if n.op in ("get_attr", "call_module"):
            name = n.target.replace(".", "_")
            register(root, name, copy.deepcopy(fetch_attr(gm, n.target)))
            env[n] = graph.create_node(n.op, name, (), {}) if n.op == "get_attr" else \
                graph.call_module(name, fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__))
        else:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[ff.y])
    return fx.GraphModule(root, graph, "SharedFeedForward")


def find_in_extracted(module: fx.GraphModule) -> FeedForward:
    """The FF of a module made by ``extract`` (its roles re-found by the same structural rules)."""
    ffs = find_feedforwards(module)
    if len(ffs) != 1:  # a bug: extract() copies exactly one FF's region
        raise PassError(f"pass 'tie': an extracted FF region holds {len(ffs)} FFs, not 1:\n{module.code}")
    return ffs[0]


def tie_sites(gm: fx.GraphModule, ffs: list[FeedForward], shared: nn.Module) -> None:
    """Make every FF in ``ffs`` call ``shared``, registered once at a fresh name."""
    name = _free_name(gm, "tied_ff")
    gm.add_submodule(name, shared)
    for ff in ffs:
        replace_region(gm, ff, name)
    tidy(gm)


def replace_region(gm: fx.GraphModule, ff: FeedForward, target: str) -> fx.Node:
    """Replace the FF's region by ``call_module(target, (x,))``; drop the tensors no longer read."""
    return replace_nodes(gm, [n for n in ff.region if n.op != "get_attr"], ff.x, target, [ff.name])


class ZeroFeedForward(nn.Module):
    """A dropped FF sublayer (layer-drop baseline): outputs zeros, so the residual passes x through."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def drop_sites(gm: fx.GraphModule, ffs: list[FeedForward]) -> None:
    """Replace each FF in ``ffs`` by a ``ZeroFeedForward`` (Verma et al. Sec. 4.4 baseline, per FF)."""
    for ff in ffs:
        name = _free_name(gm, "dropped_ff")
        gm.add_submodule(name, ZeroFeedForward(ff.down.matrix().shape[0]))
        replace_region(gm, ff, name)
    tidy(gm)


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, n in enumerate(gm.graph.nodes) if n is node)


def _origin(node: fx.Node) -> str:
    """The module path of a dense node: its call_module target, or its weight attribute's owner."""
    if node.op == "call_module":
        return node.target
    attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    return attrs[0].rpartition(".")[0] if attrs else node.name
