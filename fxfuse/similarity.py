"""Similarity between FF sublayers: data-free measures on weights (O'Neill et al., layer fusion)
and linear CKA between FF outputs (Kornblith et al. 2019, as used by Verma et al. Sec. 5.6).

Weight covariance of an FF: each hidden neuron i is a sample z_i = [W1[i, :], W2[:, i]] (and Wg[i, :]
for SwiGLU), so Σ_W = cov(z) is (in + out)×(in + out) and, like the paper's measures, does not
change when hidden neurons are permuted. All math in float64, whatever the weights' dtype (their
conversion to float64 is exact, so an FF's own bf16 weights give the bits of their float64 copy).
"""
from __future__ import annotations

import math

import torch

from .alignment import FFWeights


def neuron_samples(ff: FFWeights) -> torch.Tensor:
    """One row per hidden neuron: its incoming weights (every up projection) and outgoing weights."""
    return torch.cat([w for w, _ in ff.ups] + [ff.down[0].T], dim=1).double()


def weight_gaussian(ff: FFWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, Σ) of the neuron samples."""
    z = neuron_samples(ff)
    mu = z.mean(0)
    zc = z - mu
    return mu, zc.T @ zc / max(z.shape[0] - 1, 1)


def covariance_cosine(s1: torch.Tensor, s2: torch.Tensor) -> float:
    """Eq. 2 (covariance alignment): tr(Σ1·Σ2) / (‖Σ1‖_F ‖Σ2‖_F); 1 for proportional covariances."""
    return (torch.trace(s1 @ s2) / (s1.norm() * s2.norm()).clamp_min(1e-300)).item()


def gaussian_kl(s1: torch.Tensor, s2: torch.Tensor, ridge: float = 1e-6) -> float:
    """Eq. 3: KL(N(0,Σ1) ‖ N(0,Σ2)) = ½[tr(Σ2⁻¹Σ1) − k − ln(|Σ1|/|Σ2|)].

    The printed Eq. 3 omits the constant −k; it is kept here so that KL(Σ, Σ) = 0. A ridge
    ε·tr(Σ)/k·I makes rank-deficient covariances (fewer neurons than weights per neuron) invertible.
    """
    k = s1.shape[0]
    s1, s2 = _ridged(s1, ridge), _ridged(s2, ridge)
    solve = torch.linalg.solve(s2, s1)
    return 0.5 * (torch.trace(solve) - k - (torch.linalg.slogdet(s1)[1] - torch.linalg.slogdet(s2)[1])).item()


def bures_wasserstein(mu1, s1, mu2, s2) -> float:
    """Eq. 5: W2² between Gaussians = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr( (Σ1^½ Σ2 Σ1^½)^½ ).

    (The extracted Eq. 5 lost the outer square root's placement; this is the standard Bures
    metric.) Square roots by eigen-decomposition with negative round-off eigenvalues clamped to 0,
    so the result is real and ≥ 0 for any PSD inputs.
    """
    root1 = psd_sqrt(s1)
    cross = psd_sqrt(root1 @ s2 @ root1)
    value = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross)
    return max(value.item(), 0.0)


def psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric matrix: V·diag(√max(λ, 0))·Vᵀ."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def euclidean(a: FFWeights, b: FFWeights) -> float:
    """‖θa − θb‖_F over every weight matrix (the layer-fusion paper's ED baseline; order-sensitive).
    One matrix pair in float64 at a time."""
    pairs = [(wa, wb) for (wa, _), (wb, _) in zip(a.ups, b.ups)] + [(a.down[0], b.down[0])]
    return math.sqrt(sum((x.double() - y.double()).pow(2).sum().item() for x, y in pairs))


MEASURES = ("cosine", "kl", "bures", "euclidean")


def distance(measure: str, a: FFWeights, b: FFWeights) -> float:
    """A distance (lower = more alike) between two FFs by one of ``MEASURES``; KL symmetrised."""
    if measure == "euclidean":
        return euclidean(a, b)
    (mu1, s1), (mu2, s2) = weight_gaussian(a), weight_gaussian(b)
    if measure == "cosine":
        return 1.0 - covariance_cosine(s1, s2)
    if measure == "kl":
        return 0.5 * (gaussian_kl(s1, s2) + gaussian_kl(s2, s1))
    if measure == "bures":
        return bures_wasserstein(mu1, s1, mu2, s2)
    raise ValueError(measure)


def _ridged(s: torch.Tensor, ridge: float) -> torch.Tensor:
    k = s.shape[0]
    return s + ridge * max(torch.trace(s).item() / k, 1e-300) * torch.eye(k, dtype=s.dtype, device=s.device)


def linear_cka_from_sums(n: int, sum_x, sum_y, xx, yy, xy) -> float:
    """Linear CKA (Kornblith et al. 2019) from streaming sums, X, Y centred over the N rows:

        CKA = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F),   Xcᵀ Yc = Σ x yᵀ − N μx μyᵀ.
    """
    mx, my = sum_x / n, sum_y / n
    cxy = xy - n * torch.outer(mx, my)
    cxx = xx - n * torch.outer(mx, mx)
    cyy = yy - n * torch.outer(my, my)
    return (cxy.pow(2).sum() / (cxx.norm() * cyy.norm()).clamp_min(1e-300)).item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two N×d feature matrices (the direct formula, for tests and small inputs)."""
    x, y = x.double(), y.double()
    return linear_cka_from_sums(x.shape[0], x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)


def save_heatmap(matrix: torch.Tensor, labels: list[str], path, title: str = "CKA between FF outputs") -> None:
    """A labelled heatmap PNG of a square similarity matrix (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * len(labels), 1.5 + 0.5 * len(labels)))
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
