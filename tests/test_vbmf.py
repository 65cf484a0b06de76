import math

import pytest
import torch

from rankcut.decompose import evbmf
from rankcut.decompose.vbmf import tau_bar


def signal_plus_noise(L, M, rank, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(L, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, M, generator=g, dtype=torch.float64)
    return signal, signal + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_planted_rank_is_found_in_both_orientations(seed):
    _, Y = signal_plus_noise(100, 200, 10, seed)
    res = evbmf(Y)
    assert res.rank == 10
    assert evbmf(Y.mT).rank == 10
    assert abs(res.sigma2 - 1.0) < 0.1  # the noise variance is estimated, not given
    assert res.U.shape == (100, 10) and res.Vh.shape == (10, 200)


@pytest.mark.parametrize("seed", range(5))
def test_pure_noise_has_rank_zero(seed):
    g = torch.Generator().manual_seed(100 + seed)
    assert evbmf(torch.randn(100, 200, generator=g, dtype=torch.float64)).rank == 0
    assert evbmf(3.0 * torch.randn(150, 60, generator=g, dtype=torch.float64)).rank == 0


def test_threshold_follows_the_paper():
    _, Y = signal_plus_noise(80, 120, 5, 0)
    res = evbmf(Y, sigma2=2.0)
    alpha = 80 / 120
    t = tau_bar(alpha)
    assert not math.isclose(evbmf(Y).sigma2, 2.0, rel_tol=0.05)  # so 2.0 is the given one
    assert math.isclose(res.threshold, math.sqrt(120 * 2.0 * (1 + t) * (1 + alpha / t)))
    assert res.rank == int((res.singular_values > res.threshold).sum())


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.01])
def test_tau_bar_is_the_root_of_the_threshold_equation(alpha):
    t = tau_bar(alpha)
    assert abs(math.log1p(t) + alpha * math.log1p(t / alpha) - t) < 1e-12
    assert abs(t / (2.5129 * math.sqrt(alpha)) - 1) < 0.15  # the usual approximation
    if alpha == 1.0:
        assert round(t, 4) == 2.5129


def test_posterior_mean_denoises():
    signal, Y = signal_plus_noise(100, 200, 10, 3)
    res = evbmf(Y)
    assert (res.to_matrix() - signal).norm() < 0.5 * (Y - signal).norm()


def test_weakening_moves_the_rank_toward_full():
    _, Y = signal_plus_noise(60, 90, 6, 1)
    plain = evbmf(Y)
    half = evbmf(Y, weakening=0.5)
    full = evbmf(Y, weakening=1.0)
    assert plain.rank == 6 and full.rank == 60
    assert half.rank == 6 + round(0.5 * 54) and half.rank_unweakened == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weakening": 1.5}, r"weakening: expected a number in \[0, 1\], got 1.5"),
        ({"sigma2": -1.0}, "sigma2: expected a positive number or None, got -1.0"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evbmf(torch.randn(5, 6), **kwargs)


def test_zero_matrix_has_rank_zero():
    assert evbmf(torch.zeros(4, 7)).rank == 0


def test_a_pruned_layer_whose_trailing_singular_values_are_zero():
    """The last rows zero (filters pruned): the noise variance's lower bound is 0, whose log
    the search would take; the rank found is at most the rows left."""
    g = torch.Generator().manual_seed(0)
    M = torch.zeros(8, 16, dtype=torch.float64)
    M[:2] = torch.randn(2, 16, generator=g, dtype=torch.float64)
    result = evbmf(M)
    assert result.rank == evbmf(M[:2]).rank and 0 < result.sigma2 < float("inf")


def test_zero_filters_do_not_change_the_rank_of_the_rest():
    """Exactly-zero rows carry no noise: with them in, the least free energy fell to a σ² near
    0 and every nonzero component was kept (rank 56 of a rank-10 signal with 8 rows zeroed).
    EVBMF of the nonzero part: the same rank and σ² as the matrix without those rows."""
    g = torch.Generator().manual_seed(0)
    signal = (torch.randn(64, 10, generator=g, dtype=torch.float64)
              @ torch.randn(10, 576, generator=g, dtype=torch.float64)) * 0.05
    W = signal + 0.02 * torch.randn(64, 576, generator=g, dtype=torch.float64)
    for zeroed in (4, 8, 20):
        V = W.clone()
        V[:zeroed] = 0
        with_zeros, without = evbmf(V), evbmf(V[zeroed:])
        assert with_zeros.rank == without.rank == 10
        assert with_zeros.sigma2 == pytest.approx(without.sigma2, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_exactly_low_rank_matrix_keeps_its_rank(dtype):
    """A factorized layer made dense again (multistage plans from such a view): exactly rank k
    up to rounding. EVBMF of its nonzero part alone found none of it signal (rank 0, which the
    rank rule made 1); with no zero rows to explain the deficit, every nonzero component is
    kept, as EVBMF with the zeros in keeps them."""
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 6):
        U = torch.linalg.qr(torch.randn(32, k, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(288, k, generator=g, dtype=torch.float64)).Q
        M = (U @ V.mT).to(dtype)
        assert evbmf(M).rank == k and evbmf(M.mT).rank == k


def test_noise_with_nearly_dead_filters_stays_rank_zero():
    """Rows scaled to rounding level (near-dead filters, not zeroed) explain the numerical rank
    deficit as zero rows do: pure noise stays rank 0."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 576, generator=g, dtype=torch.float64)
    assert evbmf(W).rank == 0
    W[:8] *= 1e-17
    assert evbmf(W).rank == 0


def test_a_given_sigma2_is_kept_for_an_exactly_low_rank_matrix():
    """The exactly-low-rank special case (a factorized layer made dense again) is for an
    estimated σ²: a σ² the caller gives far above the signal keeps rank 0 and that σ²."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g)
    assert evbmf(M).rank == 2  # estimated: both components kept
    given = evbmf(M, sigma2=1e6)
    assert given.rank == 0 and given.sigma2 == 1e6
