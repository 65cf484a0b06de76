from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankcut.decompose import RankClampWarning, svd
from rankcut.decompose.svd import truncation_errors, whitened_spectrum

from .conftest import DEVICES


def planted(m, n, r, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


def decaying(m, n, seed=0, rate=0.9):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = rate ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * s) @ V.mT


@pytest.mark.parametrize("device", DEVICES)
def test_planted_low_rank_is_recovered_exactly(device):
    W = planted(60, 40, 7).to(device)
    res = svd(W, 7)
    assert res.A.shape == (60, 7) and res.B.shape == (7, 40)
    assert res.rel_error < 1e-6
    assert float((W - res.to_matrix()).norm() / W.norm()) < 1e-6


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), rank=st.integers(1, 30),
       balance=st.sampled_from(["sqrt", "left", "right"]))
def test_error_is_the_discarded_spectrum(m, n, rank, balance):
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(m * 31 + n))
    with pytest.warns(RankClampWarning) if rank > min(m, n) else nullcontext():
        res = svd(W, rank, balance=balance)
    k = min(rank, m, n)
    s = torch.linalg.svdvals(W)
    expected = float(s[k:].norm() / s.norm())
    actual = float((W - res.to_matrix()).norm() / W.norm())
    assert res.rank == k
    assert abs(res.rel_error - expected) < 1e-10
    assert abs(actual - expected) < 1e-10


def test_balance_puts_singular_values_where_documented():
    W = torch.randn(20, 12, dtype=torch.float64)
    right = svd(W, 5, balance="right")
    left = svd(W, 5, balance="left")
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(right.A.mT @ right.A, eye, atol=1e-10)  # A = U
    assert torch.allclose(left.B @ left.B.mT, eye, atol=1e-10)  # B = Vᵀ
    sq = svd(W, 5)
    assert torch.allclose(sq.A.norm(dim=0), sq.B.norm(dim=1), atol=1e-10)  # both scaled by √S
    assert torch.allclose(right.to_matrix(), sq.to_matrix(), atol=1e-10)


def test_randomized_matches_exact_on_decaying_spectrum_and_is_seeded():
    W = decaying(400, 300)
    exact = svd(W, 20, method="exact")
    fast = svd(W, 20, method="randomized", seed=3)
    again = svd(W, 20, method="randomized", seed=3)
    assert fast.method == "randomized"
    assert fast.rel_error <= exact.rel_error * 1.01
    assert abs(float((W - fast.to_matrix()).norm() / W.norm()) - fast.rel_error) < 1e-8
    assert torch.equal(fast.A, again.A)


def test_auto_uses_randomized_only_for_large_matrices_at_small_rank():
    assert svd(torch.randn(300, 200), 10).method == "exact"
    W = decaying(1100, 1024, rate=0.97).float()
    res = svd(W, 64)
    assert res.method == "randomized"
    assert res.rel_error <= svd(W, 64, method="exact").rel_error * 1.0001
    assert svd(W, 500).method == "exact"


def test_rank_above_shape_is_clamped_with_a_warning():
    W = torch.randn(5, 8)
    with pytest.warns(RankClampWarning, match="rank=9 exceeds the maximum 5"):
        res = svd(W, 9)
    assert res.rank == 5 and res.rel_error < 1e-5


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(3, 3, dtype=torch.int64), 2), {}, "W: expected dtype float32 or float64"),
        ((torch.ones(3, 3, 3), 2), {}, "W: expected a tensor of order 2"),
        ((torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1), {}, "W: expected finite"),
        ((torch.ones(3, 3), 0), {}, "rank: expected an integer >= 1, got 0"),
        ((torch.ones(3, 3), 1.5), {}, "rank: expected an integer >= 1, got 1.5"),
        ((torch.ones(3, 3), 2), {"method": "qr"}, "method: expected one of"),
        ((torch.ones(3, 3), 2), {"balance": "up"}, "balance: expected one of"),
        ((torch.ones(3, 3), 2), {"n_iter": -1}, "n_iter: expected a value >= 0"),
        (([[1.0]], 1), {}, "W: expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        svd(*args, **kwargs)


def test_parameters_are_accepted_and_no_graph_is_built():
    W = torch.nn.Parameter(torch.randn(6, 4))
    res = svd(W, 2)
    assert not res.A.requires_grad and not res.B.requires_grad


def test_nested_reuse_svds_keeps_what_the_inner_block_asks_for(monkeypatch):
    """An inner block asking for more entries than the outer keeps them while it runs (the
    planner inside a sweep's block); when it ends, the outer's limit holds again."""
    from rankcut.decompose import reuse_svds

    mats = [decaying(12, 20, seed=s).float() for s in range(4)]
    calls = {"svd": 0}
    real_svd = torch.linalg.svd

    def counting(*args, **kwargs):
        calls["svd"] += 1
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    with reuse_svds(max_entries=1):
        with reuse_svds(max_entries=4):
            for _ in range(2):
                for W in mats:
                    svd(W.clone(), 3, method="exact")
            assert calls["svd"] == 4  # all four kept
        svd(mats[3].clone(), 3, method="exact")  # the newest is kept under the outer limit
        assert calls["svd"] == 4
        svd(mats[0].clone(), 3, method="exact")
        assert calls["svd"] == 5


def test_reuse_svds_decomposes_each_matrix_once_with_the_same_results(monkeypatch):
    """Inside ``reuse_svds`` a matrix of the same values (another tensor object, as each point
    of a sweep copies the layer) is decomposed once, for SVD at any rank and CUR alike, and
    every result is bit for bit the one computed without it; so is a data-aware SVD's whitened
    Gram; entries beyond ``max_entries`` are dropped; nothing is kept outside the block."""
    from rankcut.decompose import cur, reuse_svds

    W = decaying(30, 80, seed=3).float()
    X = torch.randn(200, 80, generator=torch.Generator().manual_seed(1))
    cov = X.mT @ X / 200
    plain = [svd(W, r, method="exact") for r in (3, 9)]
    plain_cur = cur(W, 6, method="deim")
    plain_data = svd(W, 5, cov=cov)
    plain_spectrum = truncation_errors([W])
    plain_whitened = whitened_spectrum(W, cov)
    calls = {"svd": 0, "eigh": 0}
    real_svd, real_eigh = torch.linalg.svd, torch.linalg.eigh

    def counting(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(torch.linalg, "svd", counting("svd", real_svd))
    monkeypatch.setattr(torch.linalg, "eigh", counting("eigh", real_eigh))
    with reuse_svds(max_entries=2):
        again = [svd(W.clone(), r, method="exact") for r in (3, 9)]
        again_cur = cur(W.clone(), 6, method="deim")
        assert calls["svd"] == 1
        data = [svd(W.clone(), r, cov=cov.clone()) for r in (5, 5)]
        gram_eighs = calls["eigh"]
        assert calls["svd"] == 1 and gram_eighs >= 1
        svd(W.clone(), 5, cov=cov)
        assert calls["eigh"] == gram_eighs  # reused
        # the planner's pricing of data-aware ranks reads the same eigendecomposition
        assert torch.equal(whitened_spectrum(W.clone(), cov.clone()),
                           whitened_spectrum(W, cov, ridge=1e-6))
        assert calls["eigh"] == gram_eighs
        real_svdvals = torch.linalg.svdvals
        monkeypatch.setattr(torch.linalg, "svdvals", counting("svdvals", real_svdvals))
        calls["svdvals"] = 0
        spectra = [truncation_errors([W.clone()]) for _ in range(2)]  # the planner's pricing
        assert calls["svdvals"] == 1 and torch.equal(spectra[0], spectra[1])
        assert torch.equal(spectra[0], plain_spectrum)
        svd(W + 1, 4, method="exact")  # a third entry: the oldest (W's SVD) goes
        svd(W, 4, method="exact")
        assert calls["svd"] == 3
    for a, b in zip(plain, again, strict=True):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.rel_error == b.rel_error
    assert torch.equal(plain_cur.to_matrix(), again_cur.to_matrix())
    assert all(torch.equal(plain_data.A, d.A) and torch.equal(plain_data.B, d.B) for d in data)
    with reuse_svds():  # eigh's eigenvalues, not eigvalsh's: equal to rounding
        assert torch.allclose(whitened_spectrum(W, cov), plain_whitened, rtol=1e-9, atol=1e-12)
    svd(W, 3, method="exact")
    svd(W, 3, method="exact")
    assert calls["svd"] == 5  # outside the block every call computes


def test_energy_rank_of_an_all_zero_spectrum_is_one_and_never_above_full():
    from rankcut.decompose.svd import energy_rank

    assert energy_rank(torch.zeros(5), 0.9) == 1
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_draws_its_test_matrix_on_the_cpu(device):
    """The same seed gives the CPU's numbers on every device (torch.svd_lowrank drew on the
    tensor's device), whatever the global generators hold; and is near the exact SVD."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(300, 40, generator=g, dtype=torch.float64)
         * torch.exp(-torch.arange(40, dtype=torch.float64) / 4)) @ torch.randn(
        40, 200, generator=g, dtype=torch.float64)
    cpu = svd(W, 8, method="randomized", seed=3)
    torch.manual_seed(123)  # the global generators do not matter
    there = svd(W.to(device), 8, method="randomized", seed=3)
    torch.testing.assert_close(there.A.cpu(), cpu.A)
    exact = svd(W, 8, method="exact")
    assert cpu.rel_error == pytest.approx(exact.rel_error, rel=1e-6)


@pytest.mark.parametrize("balance", ["sqrt", "left", "right"])
def test_exact_and_randomized_svd_give_the_same_factors_signs_included(balance):
    """A singular pair is defined up to a common sign, which each solver (LAPACK, cuSOLVER, the
    range finder) chose its own way: on an H200 the randomized factors of one matrix had
    columns of the opposite sign on CUDA. One convention (each left vector's largest entry
    positive) gives one answer, which the two CPU solvers show."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(300, 40, generator=g, dtype=torch.float64)
         * torch.exp(-torch.arange(40, dtype=torch.float64) / 4)) @ torch.randn(
        40, 200, generator=g, dtype=torch.float64)
    exact = svd(W, 8, method="exact", balance=balance)
    for seed in range(4):
        fast = svd(W, 8, method="randomized", balance=balance, seed=seed, oversample=20)
        torch.testing.assert_close(fast.A, exact.A, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(fast.B, exact.B, rtol=1e-6, atol=1e-8)
    U = exact.A / exact.A.norm(dim=0)
    assert bool((U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all())


def test_data_aware_svd_gives_the_same_factors_from_its_tall_and_wide_paths():
    """Σ-whitened SVD takes the SVD of W L for tall W and the eigenvectors of W Σ Wᵀ for wide
    W; with the sign convention both give the same factors of the same matrix."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 30, generator=g, dtype=torch.float64)
    cov = X.T @ X / 500
    W = torch.randn(20, 30, generator=g, dtype=torch.float64)
    wide = svd(W, 5, cov=cov)  # 20 < 30: the Gram's eigenvectors
    tall = svd(torch.cat([W, torch.zeros(20, 30, dtype=torch.float64)]), 5, cov=cov)
    torch.testing.assert_close(tall.A[:20], wide.A, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tall.B, wide.B, rtol=1e-6, atol=1e-9)


def test_randomized_svd_reports_its_error_exactly_in_float32():
    """||W||² - Σ s² in float32 lost most of its digits near zero error (17x too high at 4e-5);
    the residual is now summed directly in float64."""
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(200, 6, generator=g) @ torch.randn(6, 150, generator=g)
         + 1e-4 * torch.randn(200, 150, generator=g))
    result = svd(A, 6, method="randomized")
    true = float((A.double() - (result.A @ result.B).double()).norm() / A.double().norm())
    assert result.rel_error == pytest.approx(true, rel=1e-3)


def test_spectra_of_parameters_build_no_autograd_graph():
    weight = torch.nn.Parameter(torch.randn(5, 4))
    assert not truncation_errors([weight]).requires_grad


def test_a_float32_moment_of_few_samples_is_a_second_moment_not_refused():
    """Fewer samples than features, summed in float32: eigenvalues a rounding below zero
    (about -1e-8 of the largest), which the ridge need not cover, are not a reason to refuse
    what is a second moment; a moment with a clearly negative part still is."""
    from rankcut.decompose import cur

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(50, 256, generator=g)) + 1
    cov = x.T @ x / 50
    W = torch.randn(256, 256, generator=g)
    assert 0 < svd(W, 8, cov=cov).rel_error < 1
    assert 0 < cur(torch.randn(300, 256, generator=g), 8, method="deim", cov=cov).rel_error < 1
    with pytest.raises(ValueError, match="cov: not positive semi-definite"):
        svd(W, 8, cov=-torch.eye(256))


def test_decompositions_name_a_meta_tensor_and_take_numpy_ranks():
    import numpy as np

    from rankcut.decompose import tucker

    with pytest.raises(ValueError, match="W: expected a tensor with values, got one on the meta"):
        svd(torch.empty(6, 9, device="meta"), 2)
    X = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    assert tucker(X, np.int64(2), modes=(0, 1)).ranks == tucker(X, 2, modes=(0, 1)).ranks


def test_truncation_errors_refuse_what_the_other_functions_refuse():
    with pytest.raises(ValueError, match=r"mats\[0\]"):
        truncation_errors([torch.ones(3, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        truncation_errors([torch.ones(3, 3), torch.full((2, 2), float("nan"))])
    with pytest.raises(ValueError, match=r"mats\[0\]: expected a non-empty tensor"):
        truncation_errors([torch.ones(0, 5)])


def test_exact_svd_factors_inside_reuse_svds_are_the_callers_own():
    """Inside reuse_svds the SVD is cached; the factors returned are copies, so a caller
    writing into one does not change what later calls get."""
    from rankcut.decompose import reuse_svds

    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    want = svd(W, 4, method="exact")
    with reuse_svds():
        first = svd(W, 4, method="exact", balance="right")
        first.A.mul_(0)
        first.S.mul_(0)
        again = svd(W, 4, method="exact")
    assert torch.equal(again.A, want.A) and torch.equal(again.S, want.S)
