import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from rankcut.decompose import RankClampWarning, tucker
from rankcut.decompose._tensor import multi_mode_product

from .conftest import DEVICES


def planted_tucker(shape, ranks, modes, seed=0):
    g = torch.Generator().manual_seed(seed)
    core_shape = list(shape)
    for m, r in zip(modes, ranks, strict=True):
        core_shape[m] = r
    core = torch.randn(core_shape, generator=g, dtype=torch.float64)
    mats = {m: torch.randn(shape[m], r, generator=g, dtype=torch.float64)
            for m, r in zip(modes, ranks, strict=True)}
    return multi_mode_product(core, mats)


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize(
    "shape, ranks, modes",
    [((20, 16, 3, 3), (5, 4), (0, 1)), ((12, 10, 8), (3, 4, 2), None), ((30, 9, 5, 5), (7, 3),
                                                                         (1, 0))],
)
@pytest.mark.parametrize("device", DEVICES)
def test_planted_tucker_is_recovered_exactly(method, shape, ranks, modes, device):
    X = planted_tucker(shape, ranks, modes or tuple(range(len(shape)))).to(device)
    res = tucker(X, ranks, modes, method=method)
    assert res.rel_error < 1e-6
    assert float((X - res.to_tensor()).norm() / X.norm()) < 1e-6
    assert res.ranks == tuple(ranks)
    for f in res.factors:
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=device)
        assert torch.allclose(f.mT @ f, eye, atol=1e-10)


def test_tucker2_of_a_conv_kernel_has_the_layer_shapes():
    X = torch.randn(32, 16, 3, 5)
    res = tucker(X, (8, 6), modes=(0, 1))
    assert res.core.shape == (8, 6, 3, 5)
    assert res.factors[0].shape == (32, 8) and res.factors[1].shape == (16, 6)
    assert res.modes == (0, 1)


def test_full_channel_rank_is_exact_and_hooi_improves_on_hosvd():
    X = torch.randn(10, 8, 3, 3, dtype=torch.float64)
    assert tucker(X, (10, 8), modes=(0, 1)).rel_error < 1e-12
    hosvd = tucker(X, (4, 3), modes=(0, 1), method="hosvd")
    hooi = tucker(X, (4, 3), modes=(0, 1), method="hooi", max_iter=100, tol=0.0)
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    errs = torch.tensor(hooi.errors)
    assert (errs[1:] <= errs[:-1] + 1e-12).all()
    assert hosvd.converged and hosvd.n_iter == 0
    assert hooi.n_iter == 100 and not hooi.converged


def test_ranks_are_clamped_with_a_warning():
    with pytest.warns(RankClampWarning, match=r"ranks\[mode 1\]=9 exceeds the maximum 4"):
        res = tucker(torch.randn(6, 4, 3), (2, 9), modes=(0, 1))
    assert res.ranks == (2, 4)


@pytest.mark.parametrize(
    "ranks, modes, kwargs, match",
    [
        ((2, 2), (0, 0), {}, "modes: expected distinct mode indices"),
        ((2, 2), (0, 4), {}, "modes: expected distinct mode indices in"),
        ((2, 2, 2), (0, 1), {}, "ranks: expected an int or a sequence of 2 ints"),
        ((2, 0), (0, 1), {}, r"ranks\[mode 1\]: expected an integer >= 1, got 0"),
        ((2, 2), (0, 1), {"method": "als"}, "method: expected one of 'hooi', 'hosvd'"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(ranks, modes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tucker(torch.randn(5, 4, 3, 3), ranks, modes, **kwargs)


def test_tucker2_matches_tensorly_partial_tucker_on_pretrained_resnet20_kernels(resnet20_kernels):
    tl.set_backend("pytorch")
    for X in resnet20_kernels.values():
        X = X.double()
        ranks = (max(1, X.shape[0] // 2), max(1, X.shape[1] // 2))
        ours = tucker(X, ranks, modes=(0, 1), max_iter=20, tol=1e-7).rel_error
        (core, factors), _ = partial_tucker(X, rank=ranks, modes=(0, 1), n_iter_max=20,
                                            init="svd", tol=1e-7)
        theirs = float((X - tl.tenalg.multi_mode_dot(core, factors, modes=(0, 1))).norm()
                       / X.norm())
        assert ours <= theirs * 1.01


def test_an_all_zero_kernel_converges_at_once_with_zero_error():
    """A dead kernel: its relative error is 0 (not 0/0), so HOOI stops after two sweeps."""
    res = tucker(torch.zeros(8, 6, 3, 3), (2, 2), modes=(0, 1))
    assert res.converged and res.n_iter <= 2 and res.errors and all(e == 0 for e in res.errors)


def test_a_rank_above_the_other_modes_core_is_clamped_with_a_warning():
    """512x64x3x3 at (256, 16): mode 0's unfolding of the core-sized tensor has 16·9 = 144
    columns, so HOOI could hold no more than 144 (silently, before); HOSVD and HOOI agree."""
    X = torch.randn(512, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    for method in ("hooi", "hosvd"):
        with pytest.warns(RankClampWarning, match=r"ranks\[mode 0\]=256 exceeds the maximum 144"):
            res = tucker(X, (256, 16), modes=(0, 1), method=method, max_iter=2)
        assert res.ranks == (144, 16) and res.factors[0].shape == (512, 144)


def test_the_tucker_curve_offers_only_buildable_rank_pairs():
    from rankcut import methods
    from rankcut.curves import tucker_curve

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 64, (3, 1))  # each rank at most 3x the other
    cands = tucker_curve(methods.get("tucker"), conv, (8, 8))
    assert cands and all(r_t <= 3 * r_s and r_s <= 3 * r_t for r_t, r_s in
                         (c.ranks for c in cands))


def test_data_aware_tucker_takes_an_inference_mode_moment():
    """A moment built under torch.inference_mode() has no version counter (the prepared-data
    cache read it, and raised)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        x = torch.randn(50, 36, generator=g, dtype=torch.float64)
        cov = x.T @ x / 50
    first = tucker(X, (2, 2), modes=(0, 1), cov=cov)
    again = tucker(X, (2, 2), modes=(0, 1), cov=cov)  # the cache's second look at it
    # the data-aware solve, as on an ordinary tensor holding the same moment
    plain = tucker(X, (2, 2), modes=(0, 1), cov=cov.clone())
    assert first.rel_error == pytest.approx(plain.rel_error, rel=1e-9)
    assert again.rel_error == pytest.approx(plain.rel_error, rel=1e-9)
    assert torch.allclose(first.to_tensor(), plain.to_tensor(), atol=1e-12)
    assert first.rel_error != pytest.approx(tucker(X, (2, 2), modes=(0, 1)).rel_error)


def test_a_near_exact_float32_hooi_history_is_the_factors_error():
    torch.manual_seed(0)
    core = torch.randn(6, 5, 3, 3) * torch.logspace(0, -4, 6)[:, None, None, None]
    U, V = torch.linalg.qr(torch.randn(32, 6)).Q, torch.linalg.qr(torch.randn(24, 5)).Q
    X = torch.einsum("abkl,ia,jb->ijkl", core, U, V)
    X = X + 1e-6 * X.norm() / X.numel() ** 0.5 * torch.randn_like(X)
    res = tucker(X, (6, 5), modes=(0, 1))
    assert res.errors[-1] > 0 and res.errors[-1] == pytest.approx(res.rel_error, rel=0.05)


def test_data_aware_tucker_takes_a_moment_a_rounding_short_of_positive_definite():
    """A moment the whitening accepts after its jitter (eigenvalues a rounding below zero) is
    factorized, not a LinAlgError from the channel block's Cholesky."""
    b = 1 + 10 * 2.0**-23
    cov = torch.tensor([[1.0, b], [b, 1.0]], dtype=torch.float32)
    X = torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    res = tucker(X, (2, 2), modes=(0, 1), cov=cov)
    assert res.rel_error >= 0 and torch.isfinite(res.core).all()
