import math

import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac

from rankcut.decompose import cp, cp_many
from rankcut.decompose._tensor import cp_to_tensor

from .conftest import DEVICES


def planted_cp(shape, rank, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, rank, generator=g, dtype=dtype) for s in shape]
    return cp_to_tensor(torch.ones(rank, dtype=dtype), factors)


@pytest.mark.parametrize("method", ["als", "als_qr"])
@pytest.mark.parametrize("shape, rank", [((12, 10, 8), 4), ((16, 12, 3, 3), 5), ((9, 7), 3)])
@pytest.mark.parametrize("device", DEVICES)
def test_als_recovers_a_planted_cp_tensor(method, shape, rank, device):
    X = planted_cp(shape, rank).to(device)
    res = cp(X, rank, method=method, max_iter=1000, tol=1e-14)
    assert res.rel_error < 1e-6
    assert float((X - res.to_tensor()).norm() / X.norm()) < 1e-6
    assert [f.shape for f in res.factors] == [(s, rank) for s in shape]
    for f in res.factors:  # unit-norm columns, the scale in the weights
        assert torch.allclose(f.norm(dim=0), torch.ones(rank, dtype=f.dtype, device=device))


def test_tensor_power_method_recovers_an_orthogonally_decomposable_tensor():
    g = torch.Generator().manual_seed(0)
    shape, rank = (10, 8, 6), 4
    factors = [torch.linalg.qr(torch.randn(s, rank, generator=g, dtype=torch.float64))[0]
               for s in shape]
    weights = torch.tensor([5.0, 3.5, 2.0, 1.0], dtype=torch.float64)
    X = cp_to_tensor(weights, factors)
    res = cp(X, rank, method="tpm", tol=1e-14, max_iter=500)
    assert res.rel_error < 1e-6 and res.converged
    assert torch.allclose(res.weights, weights, atol=1e-8)  # extracted largest first
    for found, true in zip(res.factors, factors, strict=True):
        assert torch.allclose((found * true).sum(0).abs(), torch.ones(rank, dtype=torch.float64),
                              atol=1e-8)


@pytest.mark.parametrize("method", ["als", "als_qr", "tpm"])
def test_fit_never_gets_worse_and_rel_error_is_the_true_error(method):
    X = torch.randn(14, 11, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = cp(X, 6, method=method, max_iter=60, tol=0.0)
    errs = torch.tensor(res.errors)
    assert (errs[1:] <= errs[:-1] + 1e-10).all()
    true = float((X - res.to_tensor()).norm() / X.norm())
    assert abs(res.rel_error - true) < 1e-12
    assert abs(errs[-1] - true) < 1e-8


def test_converged_flag_is_honest():
    X = torch.randn(10, 9, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    capped = cp(X, 5, max_iter=3, tol=0.0)
    assert capped.n_iter == 3 and not capped.converged
    loose = cp(X, 5, max_iter=500, tol=1e-3)
    assert loose.converged and loose.n_iter < 500
    assert abs(loose.errors[-2] - loose.errors[-1]) < 1e-3
    assert all(abs(a - b) >= 1e-3 for a, b in zip(loose.errors[:-2], loose.errors[1:-1],
                                                   strict=True))


@pytest.mark.parametrize("method", ["als", "als_qr", "tpm"])
def test_seed_makes_random_init_deterministic(method):
    X = torch.randn(8, 7, 3, 3)
    a = cp(X, 4, method=method, init="random", seed=5, max_iter=20)
    b = cp(X, 4, method=method, init="random", seed=5, max_iter=20)
    c = cp(X, 4, method=method, init="random", seed=6, max_iter=20)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors, strict=True))
    assert not torch.equal(a.factors[0], c.factors[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype):
    res = cp(torch.randn(6, 5, 3, 3, dtype=dtype), 3, max_iter=10)
    assert res.weights.dtype == dtype and all(f.dtype == dtype for f in res.factors)


def test_rank_above_every_dimension_is_allowed():
    X = torch.randn(4, 3, 3, dtype=torch.float64)
    res = cp(X, 12, max_iter=300)
    assert res.rank == 12 and res.rel_error < 0.05
    # an unfolding with fewer columns than rows and than the rank: (3, 2) for mode 3 here
    assert cp(torch.randn(1, 2, 1, 3, dtype=torch.float64), 3).rel_error < 1e-6


def test_max_work_caps_the_sweeps_and_bounds_the_full_runs_error():
    """Sweeps = max_work / (2·numel·R): the capped run is the full run stopped early (same start),
    so its error is at least the full run's; a tensor that converges first stops as usual."""
    X = torch.randn(10, 9, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    per_sweep = 2 * X.numel() * 5
    capped = cp(X, 5, max_iter=200, tol=0.0, max_work=7.5 * per_sweep)
    full = cp(X, 5, max_iter=200, tol=0.0)
    assert capped.n_iter == 7 and not capped.converged and full.n_iter == 200
    assert capped.errors == pytest.approx(full.errors[:7], rel=1e-9)
    assert capped.rel_error >= full.rel_error
    assert cp(X, 5, max_iter=200, tol=0.0, max_work=1.0).n_iter == 1  # at least one sweep
    assert cp(X, 5, max_iter=4, tol=0.0, max_work=1e12).n_iter == 4  # max_iter still caps
    planted = planted_cp((10, 9, 3, 3), 2)
    assert cp(planted, 2, tol=1e-6, max_work=1e12).converged


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(5), 2), {}, "X: expected a tensor of order >= 2, got order 1"),
        ((torch.randn(3, 3, 3), 0), {}, "rank: expected an integer >= 1, got 0"),
        ((torch.randn(3, 3, 3), 2), {"method": "sgd"}, "method: expected one of"),
        ((torch.randn(3, 3, 3), 2), {"init": "hosvd"}, "init: expected one of 'svd', 'random'"),
        ((torch.randn(3, 3, 3), 2), {"max_iter": 0}, "max_iter: expected a value > 0"),
        ((torch.randn(3, 3, 3), 2), {"tol": -1.0}, "tol: expected a value >= 0"),
        ((torch.randn(3, 3, 3), 2), {"max_work": 0}, "max_work: expected a value > 0"),
        ((torch.randn(3, 3, 3), 2), {"tol": float("nan")}, "tol: expected a finite number"),
        ((torch.randn(3, 3, 3), 2), {"ridge": float("inf")}, "ridge: expected a finite number"),
        ((torch.full((2, 2, 2), float("inf")), 2), {}, "X: expected finite entries, got 8"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cp(*args, **kwargs)


def test_cp_als_matches_tensorly_parafac_on_pretrained_resnet20_kernels(resnet20_kernels):
    """Equal rank, iterations and kind of init (SVD, random columns where R exceeds a mode).

    Per kernel the two land in different local minima by the luck of those random columns
    (either side wins by a few percent), so the 1% bound is on the total over the kernels.
    """
    tl.set_backend("pytorch")
    ours_total = theirs_total = 0.0
    for X in resnet20_kernels.values():
        X = X.double()
        rank = max(1, min(X.shape[:2]) // 2)
        ours = cp(X, rank, max_iter=100, tol=0.0).rel_error
        cpt = parafac(X, rank, n_iter_max=100, init="svd", tol=0.0, random_state=0)
        theirs = float((X - tl.cp_to_tensor(cpt)).norm() / X.norm())
        assert ours <= theirs * 1.05
        ours_total += ours
        theirs_total += theirs
    assert ours_total <= theirs_total * 1.01


@pytest.mark.parametrize("method", ["als", "als_qr", "tpm"])
def test_cp_many_gives_what_each_tensor_alone_gives(method):
    """The batch mixes shapes (two groups), converges at different sweeps (a planted tensor
    stops early, random ones run on) and whitens each tensor with its own second moment."""
    g = torch.Generator().manual_seed(1)
    tensors = [planted_cp((6, 5, 3, 3), 4, seed=2), torch.randn(6, 5, 3, 3, generator=g,
                                                                  dtype=torch.float64),
               torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64),
               torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)]
    opts = {"method": method, "max_iter": 40, "tol": 1e-6}
    many = cp_many(tensors, 4, **opts)
    iters = set()
    for X, res in zip(tensors, many, strict=True):
        alone = cp(X, 4, **opts)
        assert res.n_iter == alone.n_iter and res.converged == alone.converged
        assert res.rel_error == pytest.approx(alone.rel_error, rel=1e-6, abs=1e-9)
        assert torch.allclose(res.to_tensor(), alone.to_tensor(), atol=1e-6)
        iters.add(res.n_iter)
    if method != "tpm":
        assert len(iters) > 1  # the batch really held tensors stopping at different sweeps
    covs = []
    for X in tensors:
        A = torch.randn(X.shape[1], 3 * X.shape[1], generator=g, dtype=torch.float64)
        covs.append(A @ A.mT / A.shape[1])
    for X, C, res in zip(tensors, covs, cp_many(tensors, 3, cov=covs, **opts), strict=True):
        alone = cp(X, 3, cov=C, **opts)
        assert res.rel_error == pytest.approx(alone.rel_error, rel=1e-6, abs=1e-9)
        assert torch.allclose(res.to_tensor(), alone.to_tensor(), atol=1e-6)


def test_cp_many_rejects_what_it_cannot_batch():
    with pytest.raises(ValueError, match="tensors: expected a non-empty list"):
        cp_many(torch.randn(2, 3, 3), 2)
    with pytest.raises(ValueError, match="tensors: expected a non-empty list"):
        cp_many([], 2)
    with pytest.raises(ValueError, match=r"cov: expected one second moment per tensor \(2\)"):
        cp_many([torch.randn(3, 3, 3)] * 2, 2, cov=[torch.eye(3)])


@pytest.mark.parametrize("method", ["als", "als_qr", "tpm"])
def test_an_all_zero_kernel_is_exact_at_zero_weights(method):
    """A dead kernel, alone or beside live ones: zero weights, error 0, converged (the solvers'
    errors were 0/0: NaN never met tol, every sweep ran, and ALS-QR's factors were NaN)."""
    live = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    dead, alive = cp_many([torch.zeros(6, 5, 3, 3), live], 4, method=method, max_iter=50)
    assert dead.converged and dead.rel_error == 0 and dead.n_iter == 0
    assert not dead.to_tensor().any() and not dead.to_tensor().isnan().any()
    assert alive.rel_error == cp(live, 4, method=method, max_iter=50).rel_error


def test_a_kernel_with_a_dead_channel_or_only_a_centre_tap_is_fitted_by_every_component():
    """An unfolding's zero singular directions start no component (it would stay zero: ALS
    reported a rank-3 kernel's best rank-3 fit at 0.42 error, ALS-QR divided by zero)."""
    g = torch.Generator().manual_seed(0)
    centre = torch.zeros(4, 3, 3, 3, dtype=torch.float64)
    centre[:, :, 1, 1] = torch.randn(4, 3, generator=g, dtype=torch.float64)  # rank 3 exactly
    for method in ("als", "als_qr"):
        res = cp(centre, 3, method=method, max_iter=200)
        assert res.rel_error < 1e-6, method
    dead = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    dead[:, 1] = 0
    for method in ("als", "als_qr"):
        res = cp(dead, 3, method=method, max_iter=200)
        assert math.isfinite(res.rel_error) and bool((res.weights > 0).all()), method


@pytest.mark.parametrize("method", ["als", "als_qr"])
def test_a_near_exact_float32_fit_is_not_stopped_by_rounding(method):
    """At a true error of 1e-5 the fit's ||X||² - ... cancels to nothing in float32: read as
    0.0 twice, it stopped ALS at 1.4e-4. The history now tracks the factors' own error."""
    torch.manual_seed(1)
    fs = [torch.randn(s, 4) for s in (16, 12, 3, 3)]
    fs[0][:, 1] = fs[0][:, 0] + 0.3 * fs[0][:, 1]  # two close components: a slow fit
    X = cp_to_tensor(torch.ones(4), fs)
    X = X + 1e-5 * X.norm() / X.numel() ** 0.5 * torch.randn_like(X)
    res = cp(X, 4, method=method)
    assert res.rel_error < 2e-5
    assert res.errors[-1] == pytest.approx(res.rel_error, rel=0.05)


def test_cp_many_names_a_cov_that_is_no_sequence():
    from rankcut.decompose.cp import cp_many

    with pytest.raises(ValueError, match="cov: expected one second moment per tensor"):
        cp_many([torch.randn(4, 3, 2)], 2, cov=iter([torch.eye(3)]))
