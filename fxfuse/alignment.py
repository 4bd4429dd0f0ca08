"""Neuron alignment and merging of feed-forward sublayers: pure tensor math, no FX.

An FF sublayer is y = W2·φ(W1·x + b1) + b2, or in the SwiGLU form
y = Wd·(φ(Wg·x + bg) ⊙ (Wu·x + bu)) + bd (Verma et al., App. A, Eq. 7). ``FFWeights`` holds the
"up" projections (W1, or Wg and Wu) in nn.Linear layout (hidden, in) and the "down" projection
(out, hidden), all float64.

Permutation invariance (Verma et al., Sec. 3.2): for any permutation π of the hidden neurons and an
element-wise φ, W2[:, π]·φ(W1[π]·x + b1[π]) = W2·φ(W1·x + b1) — the sum over hidden neurons is only
reordered, so it is exact up to the order of floating-point accumulation.

Alignment (Eqs. 1–2, the blank equations of the extracted paper, derived from its prose):
features A (anchor) and B (other), N×H, give the cross-correlation
    C_ij = E[(A_i − μA_i)(B_j − μB_j)] / (σA_i · σB_j)                                    (Eq. 1)
and the permutation π = argmax_π Σ_i C_{i,π(i)}, a linear assignment problem                  (Eq. 2)
solved by scipy's Jonker–Volgenant ``linear_sum_assignment``. B's neuron π(i) is then moved to
position i: W1' = W1[π], b1' = b1[π], W2' = W2[:, π] (Eqs. 3–5; for SwiGLU also Wg' = Wg[π], App.
A Eqs. 8–10). Merging averages the k aligned FFs: W̄ = (1/k) Σ_l W'_l (Eq. 6). The merge is exact
only when the aligned FFs are equal.

Past one process (DDP, ``torchrun``): each rank streams its own shard of the data, and ``all_reduce``
sums the ranks' sums before Eq. 1, so every rank solves Eq. 2 on the statistics of all the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FFWeights:
    """One FF sublayer's weights: ``ups`` = [(W, b)] with W (hidden, in); ``down`` (W (out, hidden), b).

    float64 (``FeedForward.weights()``), except a tie plan's aligned members, which stay in the FF's
    own dtype (a permutation only moves values, so it is exact in any dtype); ``average`` fuses in
    float64 whatever the members' dtype."""

    ups: list[tuple[torch.Tensor, torch.Tensor | None]]
    down: tuple[torch.Tensor, torch.Tensor | None]

    @property
    def hidden(self) -> int:
        return self.ups[0][0].shape[0]


def permute(ff: FFWeights, perm: torch.Tensor) -> FFWeights:
    """Hidden neuron ``perm[i]`` moves to position i: W1[π], b1[π], W2[:, π] (Eqs. 3–5, App. A)."""
    ups = [(w[perm], None if b is None else b[perm]) for w, b in ff.ups]
    return FFWeights(ups, (ff.down[0][:, perm], ff.down[1]))


def average(ffs: list[FFWeights]) -> FFWeights:
    """Element-wise mean of k FFs of the same shapes (Eq. 6; the layer-fusion paper's "mean")."""
    ups = [(_mean([f.ups[j][0] for f in ffs]), _mean([f.ups[j][1] for f in ffs])) for j in range(len(ffs[0].ups))]
    return FFWeights(ups, (_mean([f.down[0] for f in ffs]), _mean([f.down[1] for f in ffs])))


def mix(ffs: list[FFWeights], generator: torch.Generator) -> FFWeights:
    """Layer-fusion "mix": each hidden neuron (its W1 rows and W2 column) is drawn uniformly from one
    of the k FFs (a Bernoulli draw for k = 2); the biases of the output are averaged, as in O'Neill
    et al. ("we only mix between pairs of weight matrices, the bias terms are averaged")."""
    source = torch.randint(len(ffs), (ffs[0].hidden,), generator=generator)
    pick = lambda ts: None if ts[0] is None else torch.stack(ts)[source, torch.arange(len(source))]  # noqa: E731
    ups = [(pick([f.ups[j][0] for f in ffs]), _mean([f.ups[j][1] for f in ffs])) for j in range(len(ffs[0].ups))]
    down_w = torch.stack([f.down[0] for f in ffs])[source, :, torch.arange(len(source))].T
    return FFWeights(ups, (down_w, _mean([f.down[1] for f in ffs])))


def _mean(tensors: list):
    """The element-wise mean in float64 (converting bf16/fp16/fp32 to float64 is exact, so members
    kept in their own dtype give the same mean bits as their float64 copies)."""
    return None if tensors[0] is None else torch.stack(tensors).double().mean(0)


@dataclass
class FeatureStats:
    """Streaming float64 sums over N positions for H features, and cross sums with chosen partners.

    Memory is O(H²) per pair, whatever N: Σa, Σa², and Σ a·bᵀ for every partner b.
    """

    n: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    cross: dict = field(default_factory=dict)  # partner index -> Σ a bᵀ (H×H)

    def add(self, a: torch.Tensor) -> None:
        a = a.double()
        if self.sum is None:
            self.sum, self.sum_sq = a.new_zeros(a.shape[1]), a.new_zeros(a.shape[1])
        self.n += a.shape[0]
        self.sum += a.sum(0)
        self.sum_sq += (a * a).sum(0)

    def add_cross(self, partner: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Σ a bᵀ += aᵀb, added in place (one H×H update alive beside the sums, not two)."""
        update = a.double().T @ b.double()
        if partner in self.cross:
            self.cross[partner] += update
        else:
            self.cross[partner] = update

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.n
        return mean, (self.sum_sq / self.n - mean * mean).clamp_min(0).sqrt()


def all_reduce(stats: FeatureStats, group=None) -> FeatureStats:
    """Sum ``stats`` in place over the ranks of a ``torch.distributed`` process ``group`` (default:
    the world), so that every rank holds the statistics of the union of the ranks' data.

    Every quantity of Eq. 1 is a function of sums over positions, and a sum over the union of the
    shards is the sum of the shards' sums: N = Σ_r N_r, Σa = Σ_r Σ_(r) a, Σa² = Σ_r Σ_(r) a² and
    Σ a bᵀ = Σ_r Σ_(r) a bᵀ. The means μ = Σa/N, the variances σ² = Σa²/N − μ² and C_ij (Eq. 1) are
    then those of one process over all the data, up to the order of the float64 additions (the
    all-reduce itself gives every rank the same bits). Collective: every rank of ``group`` must
    call it, on the same features with the same partners, in the same order; the tensors are
    reduced on their own device, which the backend must support (gloo: CPU, nccl: CUDA).
    """
    import torch.distributed as dist

    if stats.sum is None:
        raise ValueError("all_reduce(FeatureStats) needs at least one add() on every rank (the feature width)")
    count = torch.tensor([stats.n], dtype=torch.int64, device=stats.sum.device)
    for t in [count, stats.sum, stats.sum_sq] + [stats.cross[j] for j in sorted(stats.cross)]:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    stats.n = int(count.item())
    return stats


CHUNK_ROWS = 512  # rows of C formed at a time: the temporaries are 512×H, not H×H (0.97 GB at H = 11008)


def cross_correlation(a: FeatureStats, b: FeatureStats, cross_ab: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1 from streaming sums: C_ij = (Σ a_i b_j / N − μa_i μb_j) / (σa_i σb_j).

    Dead neurons (σ = 0, e.g. a ReLU unit never active) correlate 0 with everything, never NaN.
    Formed ``CHUNK_ROWS`` rows at a time, each element by the same operations as the whole-matrix
    formula (so the same bits); the threshold's max over σa_i σb_j is max σa · max σb exactly
    (rounding is monotone and σ ≥ 0). ``out``: the H×H float64 tensor to write C into — it may be
    ``cross_ab`` itself, whose sums are then consumed (each row block is read before it is written).
    """
    mean_a, std_a = a.mean_std()
    mean_b, std_b = b.mean_std()
    threshold = 1e-12 * max((std_a.max() * std_b.max()).item(), 1e-300)
    out = torch.empty_like(cross_ab) if out is None else out
    for start in range(0, cross_ab.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        cov = cross_ab[rows] / a.n - torch.outer(mean_a[rows], mean_b)
        scale = torch.outer(std_a[rows], std_b)
        alive = scale > threshold
        out[rows] = torch.where(alive, cov / torch.where(alive, scale, torch.ones_like(scale)), torch.zeros_like(cov))
    return out


def match_permutation(correlation: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Eq. 2: π maximising Σ_i C_{i,π(i)} by linear assignment (Jonker–Volgenant, via scipy).

    scipy maximises by minimising −C, which it forms as a copy; ``overwrite=True`` negates
    ``correlation`` in place instead (the same matrix, so the same π, one H×H copy fewer) and
    leaves −C in it."""
    from scipy.optimize import linear_sum_assignment  # imported on use: scipy.optimize costs 0.3 s

    if overwrite:
        rows, cols = linear_sum_assignment(correlation.neg_().cpu().numpy())
    else:
        rows, cols = linear_sum_assignment(correlation.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long, device=correlation.device)
