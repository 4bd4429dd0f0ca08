"""Tie's tensor math without FX: correlation, assignment, permutation, fusion, measures, CKA."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from fxfuse.alignment import FeatureStats, FFWeights, average, cross_correlation, match_permutation, mix, permute
from fxfuse.similarity import (bures_wasserstein, covariance_cosine, distance, gaussian_kl, linear_cka,
                               linear_cka_from_sums, psd_sqrt, save_heatmap, weight_gaussian)


def random_ff(hidden=16, dim=8, swiglu=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    ups = [(randn(hidden, dim), randn(hidden))]
    if swiglu:
        ups.append((randn(hidden, dim), None))
    return FFWeights(ups, (randn(dim, hidden), randn(dim)))


def apply_ff(ff, x):
    h = torch.nn.functional.gelu(x @ ff.ups[0][0].T + ff.ups[0][1])
    if len(ff.ups) == 2:
        h = h * (x @ ff.ups[1][0].T)
    return h @ ff.down[0].T + ff.down[1]


@pytest.mark.parametrize("swiglu", [False, True])
def test_permuted_weights_compute_the_same_function(swiglu):
    ff, x = random_ff(swiglu=swiglu), torch.randn(32, 8, dtype=torch.float64)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    ref, new = apply_ff(ff, x), apply_ff(permute(ff, perm), x)
    assert ((new - ref).abs().max() / ref.abs().max()).item() <= 1e-12
    assert not torch.equal(permute(ff, perm).ups[0][0], ff.ups[0][0])


def stats_of(a, b):
    sa, sb = FeatureStats(), FeatureStats()
    for chunk_a, chunk_b in zip(a.split(7), b.split(7)):  # streaming, uneven chunks
        sa.add(chunk_a)
        sb.add(chunk_b)
        sa.add_cross(1, chunk_a, chunk_b)
    return sa, sb


def test_streaming_correlation_matches_numpy_and_survives_dead_neurons():
    a, b = torch.randn(50, 6), torch.randn(50, 6)
    b[:, 2] = 0.0  # a dead neuron: zero variance
    sa, sb = stats_of(a, b)
    corr = cross_correlation(sa, sb, sa.cross[1])
    full = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:6, 6:]
    alive = [0, 1, 3, 4, 5]
    assert np.abs(corr.numpy()[:, alive] - full[:, alive]).max() < 1e-10
    assert torch.isfinite(corr).all() and (corr[:, 2] == 0).all()


def test_assignment_recovers_a_hidden_permutation():
    a = torch.randn(200, 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    b = a[:, perm] + 0.01 * torch.randn(200, 12)  # b's neuron j is a's neuron perm[j]
    sa, sb = stats_of(a, b)
    found = match_permutation(cross_correlation(sa, sb, sa.cross[1]))
    assert torch.equal(b[:, found].sub(a).abs().max() < 0.1, torch.tensor(True))
    assert torch.equal(perm[found], torch.arange(12))


def test_assignment_is_optimal_against_brute_force():
    corr = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    found = match_permutation(corr)
    best = max(itertools.permutations(range(6)), key=lambda p: sum(corr[i, p[i]].item() for i in range(6)))
    assert found.tolist() == list(best)


def test_average_mix_and_their_biases():
    ffs = [random_ff(seed=s) for s in range(3)]
    mean = average(ffs)
    assert torch.allclose(mean.ups[0][0], (ffs[0].ups[0][0] + ffs[1].ups[0][0] + ffs[2].ups[0][0]) / 3)
    mixed = mix(ffs, torch.Generator().manual_seed(0))
    sources = set()
    for i in range(16):  # each neuron's incoming row and outgoing column come from the same member
        src = [k for k in range(3) if torch.equal(mixed.ups[0][0][i], ffs[k].ups[0][0][i])]
        assert len(src) == 1 and torch.equal(mixed.down[0][:, i], ffs[src[0]].down[0][:, i])
        sources.add(src[0])
    assert sources == {0, 1, 2}
    assert torch.allclose(mixed.down[1], mean.down[1]) and torch.allclose(mixed.ups[0][1], mean.ups[0][1])


def test_covariance_measures_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1, s2 = m1 @ m1.T + 0.1 * torch.eye(5, dtype=torch.float64), m2 @ m2.T + 0.1 * torch.eye(5, dtype=torch.float64)
    assert covariance_cosine(s1, 3 * s1) == pytest.approx(1.0)
    assert gaussian_kl(s1, s1) == pytest.approx(0.0, abs=1e-9)
    expected_kl = 0.5 * (np.trace(np.linalg.solve(s2, s1)) - 5 - np.log(np.linalg.det(s1) / np.linalg.det(s2)))
    assert gaussian_kl(s1, s2, ridge=0.0) == pytest.approx(expected_kl, rel=1e-9)
    r1 = scipy.linalg.sqrtm(s1.numpy())
    expected_w2 = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2.numpy() @ r1)).real
    zero = torch.zeros(5, dtype=torch.float64)
    assert bures_wasserstein(zero, s1, zero, s2) == pytest.approx(expected_w2, rel=1e-8)
    assert bures_wasserstein(zero, s1, zero, s1) == pytest.approx(0.0, abs=1e-9)
    rank1 = torch.outer(m1[0], m1[0])  # singular PSD: the clamped square root stays real and exact
    assert torch.allclose(psd_sqrt(rank1) @ psd_sqrt(rank1), rank1, atol=1e-10)


def test_weight_measures_ignore_neuron_order():
    ff = random_ff(hidden=32)
    shuffled = permute(ff, torch.randperm(32, generator=torch.Generator().manual_seed(4)))
    other = random_ff(hidden=32, seed=9)
    for measure in ("cosine", "kl", "bures"):
        assert distance(measure, ff, shuffled) == pytest.approx(0.0, abs=1e-7)
        assert distance(measure, ff, other) > 1e-3
    assert distance("euclidean", ff, ff) == 0.0 and distance("euclidean", ff, shuffled) > 1.0
    mu, sigma = weight_gaussian(ff)
    assert sigma.shape == (16, 16) and torch.allclose(sigma, sigma.T)


def test_linear_cka_matches_the_gram_matrix_form(tmp_path):
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    h = torch.eye(40, dtype=torch.float64) - 1 / 40
    hsic = lambda k, l: torch.trace(k @ h @ l @ h)  # noqa: E731
    kx, ky = x @ x.T, y @ y.T
    expected = hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky))
    assert linear_cka(x, y) == pytest.approx(expected.item(), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert linear_cka(x, 2 * x @ q + 1) == pytest.approx(1.0, rel=1e-10)
    sums = linear_cka_from_sums(40, x.sum(0), x.sum(0), x.T @ x, x.T @ x, x.T @ x)
    assert sums == pytest.approx(1.0)
    save_heatmap(torch.eye(3, dtype=torch.float64), ["a", "b", "c"], tmp_path / "cka.png")
    assert (tmp_path / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
