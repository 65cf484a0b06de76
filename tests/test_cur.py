import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rankcut.decompose import RankClampWarning, cur, svd

from .conftest import DEVICES
from .test_svd import decaying, planted


def noisy_decaying(seed=0):
    g = torch.Generator().manual_seed(seed)
    return decaying(120, 100, rate=0.85) + 1e-3 * torch.randn(120, 100, generator=g,
                                                              dtype=torch.float64)


@pytest.mark.parametrize("method", ["leverage", "cx", "deim"])
@pytest.mark.parametrize("device", DEVICES)
def test_c_and_r_are_actual_columns_and_rows(method, device):
    W = torch.randn(30, 25, dtype=torch.float64, device=device)
    res = cur(W, 4, method=method, n_cols=8, n_rows=8, seed=1)
    assert torch.equal(res.C, W[:, res.col_idx])
    if method == "cx":
        assert res.R is None and res.row_idx is None
        assert torch.allclose(res.to_matrix(), res.C @ res.U)
    else:
        assert torch.equal(res.R, W[res.row_idx])
    assert abs(float((W - res.to_matrix()).norm() / W.norm()) - res.rel_error) < 1e-10


@pytest.mark.parametrize("method, shape, rank, count", [
    ("deim", (60, 200), 20, 20), ("leverage", (200, 60), 8, 30), ("cx", (80, 90), 10, 25),
    ("deim", (50, 50), 50, 50),  # every column and row: C U R = W
    ("deim", (40, 70), 20, 20)])  # a rank-12 matrix: C and R are rank-deficient
def test_u_is_the_pseudoinverse_formula(method, shape, rank, count):
    # U is computed in the coordinates of W's SVD (no pseudo-inverse of the r x n matrix R):
    # it must be C⁺ W R⁺ (CX: C⁺ W) as written, with pinv's own cut-offs
    m, n = shape
    g = torch.Generator().manual_seed(3)
    if m == 40:
        W = planted(m, n, 12, seed=4)
    else:
        W = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(
            0, -6, n, dtype=torch.float64)
    res = cur(W, rank, method=method, n_cols=count, n_rows=count, seed=1)
    C, R = res.C, res.R
    expected = torch.linalg.pinv(C) @ W if R is None else (
        torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R))
    assert torch.allclose(res.U, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert abs(float((W - res.to_matrix()).norm() / W.norm()) - res.rel_error) < 1e-10


def test_linear_time_scales_columns_and_rows_as_drineas_kannan_mahoney():
    W = torch.randn(40, 30, dtype=torch.float64)
    c, r = 12, 9
    res = cur(W, 5, method="linear_time", n_cols=c, n_rows=r, seed=2)
    total = W.pow(2).sum()
    p = W.pow(2).sum(0) / total
    q = W.pow(2).sum(1) / total
    assert res.C.shape == (40, c) and res.R.shape == (r, 30) and res.U.shape == (c, r)
    expected_C = W[:, res.col_idx] / (c * p[res.col_idx]).sqrt()
    expected_R = W[res.row_idx] / (r * q[res.row_idx]).sqrt()[:, None]
    assert torch.allclose(res.C, expected_C, atol=1e-12)
    assert torch.allclose(res.R, expected_R, atol=1e-12)
    # U = ([CᵀC]_k)⁺ Ψᵀ with Ψ the sampled, scaled rows of C.
    psi = expected_C[res.row_idx] / (r * q[res.row_idx]).sqrt()[:, None]
    evals, evecs = torch.linalg.eigh(expected_C.mT @ expected_C)
    top = evecs[:, -5:]
    U = (top / evals[-5:]) @ top.mT @ psi.mT
    assert torch.allclose(res.U, U, atol=1e-9)


def test_linear_time_error_falls_as_more_columns_are_sampled():
    W = noisy_decaying()
    few = [cur(W, 5, method="linear_time", n_cols=5, n_rows=5, seed=s).rel_error
           for s in range(20)]
    many = [cur(W, 5, method="linear_time", n_cols=60, n_rows=60, seed=s).rel_error
            for s in range(20)]
    assert sum(many) < 0.75 * sum(few)


def test_leverage_cur_mean_error_is_within_two_plus_eps_of_best_rank_k():
    W = noisy_decaying()
    k = 5
    best = svd(W, k).rel_error
    errors = [cur(W, k, n_cols=4 * k, n_rows=4 * k, seed=s).rel_error for s in range(40)]
    assert sum(errors) / len(errors) <= (2 + 0.1) * best


def test_deim_is_deterministic_and_exact_on_low_rank_matrices():
    W = planted(50, 40, 6)
    a = cur(W, 6, method="deim")
    b = cur(W, 6, method="deim")
    assert torch.equal(a.col_idx, b.col_idx) and torch.equal(a.row_idx, b.row_idx)
    assert len(set(a.col_idx.tolist())) == 6 and len(set(a.row_idx.tolist())) == 6
    assert a.rel_error < 1e-8


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 25), n=st.integers(2, 25), r=st.integers(1, 5), seed=st.integers(0, 99))
@example(m=7, n=4, r=4, seed=50)  # leverage sampling left a row out (found in CI, 2026-12-02)
def test_deim_and_leverage_recover_any_low_rank_matrix(m, n, r, seed):
    r = min(r, m, n)
    W = planted(m, n, r, seed=seed)
    assert cur(W, r, method="deim").rel_error < 1e-7
    # Leverage sampling keeps a row with probability min(1, count x its share of the leverage):
    # even at the full width a row of small leverage may be left out (m=7, n=4, r=4, seed=50
    # kept 3 rows). Whenever the kept columns and rows span the matrix, CUR is exact.
    res = cur(W, r, n_cols=n, n_rows=m, seed=seed)
    spans = all(int(torch.linalg.matrix_rank(part)) == r
                for part in (W[:, res.col_idx], W[res.row_idx]))
    assert res.rel_error < 1e-7 or not spans
    assert res.rel_error < 1e-7 or len(res.row_idx) < m or len(res.col_idx) < n


def test_seed_makes_sampling_reproducible():
    W = torch.randn(60, 50, dtype=torch.float64)
    for method in ("leverage", "linear_time", "cx"):
        a = cur(W, 5, method=method, n_cols=10, n_rows=10, seed=7)
        b = cur(W, 5, method=method, n_cols=10, n_rows=10, seed=7)
        c = cur(W, 5, method=method, n_cols=10, n_rows=10, seed=8)
        assert torch.equal(a.col_idx, b.col_idx) and torch.equal(a.U, b.U)
        assert not torch.equal(a.col_idx, c.col_idx) or (
            a.row_idx is not None and not torch.equal(a.row_idx, c.row_idx)
        )


def test_counts_are_checked_and_clamped():
    W = torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"n_cols: expected a count >= rank \(4\), got 2"):
        cur(W, 4, n_cols=2)
    with pytest.warns(RankClampWarning, match="n_cols=9 exceeds the maximum 6"):
        res = cur(W, 3, method="deim", n_cols=9)
    assert res.C.shape[1] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cur(W, 3, method="linear_time", n_cols=6, n_rows=10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "random"},
         "method: expected one of 'leverage', 'linear_time', 'cx', 'deim', 'rx'"),
        ({"cov": torch.eye(4)}, r"cov: expected shape \(5, 5\)"),
        ({"seed": "x"}, "seed: expected an int"),
        ({"n_rows": 0}, "n_rows: expected an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cur(torch.randn(5, 5), 2, **kwargs)


def test_large_matrices_at_small_rank_pick_from_randomized_singular_vectors():
    # 1024 x 1100 at rank 24: the leading vectors come from the randomized range finder; the
    # columns and rows it makes DEIM pick give the error of those from a full SVD (within 1%)
    import importlib

    from rankcut.decompose.svd import randomized_pays

    module = importlib.import_module("rankcut.decompose.cur")

    g = torch.Generator().manual_seed(5)
    W = (torch.randn(1024, 60, generator=g) * torch.logspace(0, -2, 60)) @ torch.randn(
        60, 1100, generator=g) + 1e-3 * torch.randn(1024, 1100, generator=g)
    assert randomized_pays(1024, 1100, 24)
    fast = cur(W, 24, method="deim")
    # exact leading singular vectors from the two Gram matrices (a full SVD of this matrix
    # takes ten times longer on the 2-core CPU)
    Wd = W.double()
    U = torch.linalg.eigh(Wd @ Wd.mT).eigenvectors.flip(1)[:, :24].float()
    V = torch.linalg.eigh(Wd.mT @ Wd).eigenvectors.flip(1)[:, :24].float()
    cols, rows = module._deim(V), module._deim(U)
    C, R = W[:, cols], W[rows]
    exact = float((W - C @ torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R) @ R).norm() / W.norm())
    assert fast.rel_error <= 1.01 * exact
    # deterministic: the range finder's seed is fixed, whatever seed the caller passes
    assert cur(W, 24, method="deim", seed=7).col_idx.tolist() == fast.col_idx.tolist()
    lev = cur(W, 24, method="leverage", n_cols=48, n_rows=48, seed=1)
    assert lev.rel_error < 2 * exact


def _greedy_deim(V: torch.Tensor) -> list[int]:
    """DEIM as Sorensen & Embree state it: interpolate column j on the rows picked so far and
    pick the row of the largest residual."""
    picked = [int(V[:, 0].abs().argmax())]
    for j in range(1, V.shape[1]):
        p = torch.tensor(picked)
        residual = (V[:, j] - V[:, :j] @ torch.linalg.solve(V[p, :j], V[p, j])).abs()
        residual[p] = -1.0
        picked.append(int(residual.argmax()))
    return picked


@pytest.mark.parametrize("n, k", [(50, 1), (50, 7), (300, 40), (64, 64)])
def test_deim_picks_are_the_greedy_definitions(n, k):
    """The LU-pivot form of DEIM picks the rows of the textbook greedy loop, in its order."""
    import importlib

    deim = importlib.import_module("rankcut.decompose.cur")._deim
    g = torch.Generator().manual_seed(n + k)
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    assert deim(V).tolist() == _greedy_deim(V)
    assert deim(V.float()).tolist() == _greedy_deim(V.float().double())


def _moment(n, dims, seed=0, noise=1e-3):
    """The second moment of inputs that mostly span ``dims`` directions, and its L (L Lᵀ = Σ
    plus the solvers' ridge)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dims, generator=g, dtype=torch.float64) @ torch.randn(
        dims, 2000, generator=g, dtype=torch.float64)
    X += noise * torch.randn(n, 2000, generator=g, dtype=torch.float64)
    cov = X @ X.mT / 2000
    reg = cov + 1e-6 * cov.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    return cov, torch.linalg.cholesky(reg)


def _output_error(W, approx, L):
    return float(((W - approx) @ L).norm() / (W @ L).norm())


@pytest.mark.parametrize("method", ["deim", "leverage", "linear_time", "cx", "rx"])
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])  # wide: from W Σ Wᵀ; tall: from W L
def test_data_aware_cur_reports_its_output_error_and_keeps_actual_columns_and_rows(method,
                                                                                    shape):
    m, n = shape
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cov, L = _moment(n, 12)
    res = cur(W, 8, method=method, n_cols=10, n_rows=10, seed=0, cov=cov)
    assert res.data_aware
    assert abs(_output_error(W, res.to_matrix(), L) - res.rel_error) < 1e-8
    if res.C is not None:
        assert torch.equal(res.C, W[:, res.col_idx])
    if res.R is not None:
        assert torch.equal(res.R, W[res.row_idx])
    assert (res.C is None) == (method == "rx") and (res.R is None) == (method == "cx")


def test_data_aware_middle_factor_is_the_output_norm_optimum_for_its_rows_and_columns():
    # for the picked C and R, no other U does better on the inputs: the gradient of
    # ||(W - C U R) L||² in U vanishes, and data-free U = C⁺ W R⁺ does worse
    W = torch.randn(50, 80, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov, L = _moment(80, 10)
    res = cur(W, 6, method="deim", cov=cov)
    C, U, R = res.C, res.U, res.R
    grad = C.mT @ ((W - C @ U @ R) @ L @ L.mT) @ R.mT
    assert float(grad.norm()) < 1e-8 * float((C.mT @ W @ L @ L.mT @ R.mT).norm())
    free = torch.linalg.pinv(C) @ W @ torch.linalg.pinv(R)
    assert _output_error(W, C @ free @ R, L) > res.rel_error


def test_data_aware_rx_fits_the_part_of_the_weight_its_inputs_see():
    # VGG's classifier at 32x32: each feature reaches the first layer as 49 equal copies, so
    # only W summed over each block of copies acts; the rest of W (its untrained
    # initialisation) dominates the weight norm. Data-free CUR spends its rows and columns on
    # that part and loses the output; fitted on data, RX keeps it at a small rank.
    g = torch.Generator().manual_seed(0)
    feats, copies, m = 16, 8, 60
    seen = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, feats, generator=g, dtype=torch.float64) / copies
    unseen = torch.randn(m, feats, copies, generator=g, dtype=torch.float64)
    unseen -= unseen.mean(-1, keepdim=True)  # no block sum: invisible to such inputs
    W = seen.repeat_interleave(copies, dim=1) + unseen.reshape(m, -1)
    x = torch.randn(feats, 3000, generator=g, dtype=torch.float64).repeat_interleave(copies, 0)
    cov = x @ x.mT / 3000
    L = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * torch.eye(
        feats * copies, dtype=torch.float64))
    free = cur(W, 4, method="deim")
    fitted = cur(W, 4, method="rx", cov=cov)
    assert _output_error(W, free.to_matrix(), L) > 0.5
    assert fitted.rel_error < 0.01
    assert fitted.rel_error == pytest.approx(_output_error(W, fitted.to_matrix(), L), abs=1e-8)


def test_rx_without_data_interpolates_rows():
    W = planted(30, 40, 5, seed=3)
    res = cur(W, 5, method="rx")
    assert res.C is None and torch.equal(res.R, W[res.row_idx]) and res.row_idx.numel() == 5
    assert res.rel_error < 1e-8  # five rows of a rank-5 matrix span its rows


@pytest.mark.parametrize("method", ["deim", "rx", "cx"])
def test_data_aware_cur_fits_one_matrix_with_anothers_entries(method):
    # sequential fitting: the corrected weight W' is the map fitted, the dense W gives the rows
    # and columns; U is the output-norm optimum for them and the error W''s
    g = torch.Generator().manual_seed(5)
    E = torch.randn(30, 50, generator=g, dtype=torch.float64)
    W = E + 0.3 * torch.randn(30, 50, generator=g, dtype=torch.float64)
    cov, L = _moment(50, 9)
    res = cur(W, 5, method=method, cov=cov, entries=E)
    if res.C is not None:
        assert torch.equal(res.C, E[:, res.col_idx])
    if res.R is not None:
        assert torch.equal(res.R, E[res.row_idx])
    assert abs(_output_error(W, res.to_matrix(), L) - res.rel_error) < 1e-8
    if res.R is not None:  # the middle factor is the optimum for W: its gradient vanishes
        A = res.factors()[0]
        grad = ((W - res.to_matrix()) @ L @ L.mT) @ res.R.mT
        if res.C is not None:
            grad = res.C.mT @ grad
        assert float(grad.norm()) < 1e-8 * float((W @ L @ L.mT @ res.R.mT).norm())
        assert A.shape[0] == 30
    else:  # CX: W's columns C, then the output-norm optimum U: C^T (W - C U) L L^T = 0
        grad = res.C.mT @ ((W - res.to_matrix()) @ L @ L.mT)
        assert float(grad.norm()) < 1e-8 * float((res.C.mT @ W @ L @ L.mT).norm())
    with pytest.raises(ValueError, match="entries: only the data-aware"):
        cur(W, 5, method=method, entries=E)
    with pytest.raises(ValueError, match="entries: expected the shape"):
        cur(W, 5, method=method, cov=cov, entries=E[:, :10])
    with pytest.raises(ValueError, match="ridge"):
        cur(W, 5, method=method, cov=cov, ridge=0)


@pytest.mark.parametrize("method", ["deim", "leverage", "linear_time", "cx", "rx"])
def test_a_zero_matrix_gives_zero_factors(method):
    W = torch.zeros(12, 9, dtype=torch.float64)
    cov, _ = _moment(9, 3)
    for res in (cur(W, 3, method=method), cur(W, 3, method=method, cov=cov)):
        assert res.rel_error == 0.0 and torch.equal(res.to_matrix(), W)


@pytest.mark.parametrize("solver", ["leverage", "cx", "deim"])
@pytest.mark.parametrize("how", [{"rank": "params=3x"}, {"target": "params=3x"}])
def test_planned_cur_layers_cost_what_the_plan_predicts(solver, how):
    """Sampled CUR keeps about as many columns as the rank, not exactly: the planner prices
    each candidate at the width its layer really has, and applying the plan rebuilds that very
    layer (the same rank and seed), so the predicted parameters are the built ones."""
    import rankcut as rc
    from rankcut.profile import count_params

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(60, 50), torch.nn.ReLU(),
                                torch.nn.Linear(50, 40)).eval()
    plan = rc.plan(model, torch.randn(2, 60), method="cur", min_params=0, allow_slower=True,
                   options={"cur": {"solver": solver, "seed": 1}}, **how)
    small = rc.apply(model, plan)
    assert plan.active
    for name, lp in plan.active.items():
        assert count_params(small.get_submodule(name)) == lp.predicted["params"], name


@pytest.mark.parametrize("method", ["deim", "rx", "leverage"])
@pytest.mark.parametrize("m, n", [(40, 120), (60, 60)])
def test_data_aware_cur_of_a_wide_weight_reads_its_rows_products_off_the_gram(method, m, n):
    # W (Σ + λI) Rᵀ and R (Σ + λI) Rᵀ taken from the decomposed Gram W (Σ + λI) Wᵀ give the
    # factors the n x n x r products give (entries=a copy of W takes that path)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cov, L = _moment(n, 15)
    fast = cur(W, 8, method=method, seed=0, cov=cov)
    slow = cur(W, 8, method=method, seed=0, cov=cov, entries=W.clone())
    assert torch.equal(fast.row_idx, slow.row_idx)
    assert torch.allclose(fast.to_matrix(), slow.to_matrix(), rtol=0, atol=1e-9 * W.abs().max())
    assert fast.rel_error == pytest.approx(slow.rel_error, abs=1e-9)
    assert fast.rel_error == pytest.approx(_output_error(W, fast.to_matrix(), L), abs=1e-8)


def test_data_aware_cur_decomposes_a_wide_weights_gram_once(monkeypatch):
    # outside reuse_svds too: the output directions and the middle factor share one eigh
    W = torch.randn(30, 70, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cov, _ = _moment(70, 10)
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real(*a, **k))
    cur(W, 6, method="rx", cov=cov)
    assert len(calls) == 1


def test_an_asymmetric_moment_is_taken_as_its_symmetric_part_on_every_path():
    """The tall-weight path used Σ as given: its antisymmetric part changed the fit."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(9, 9, generator=g, dtype=torch.float64)
    N = torch.randn(9, 9, generator=g, dtype=torch.float64)
    S = A @ A.T
    for shape in ((12, 9), (6, 9)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        for method in ("rx", "deim"):
            a = cur(W, 3, method=method, cov=S + 0.5 * (N - N.T))
            b = cur(W, 3, method=method, cov=S)
            assert a.rel_error == pytest.approx(b.rel_error, rel=1e-9), (shape, method)
            assert torch.allclose(a.to_matrix(), b.to_matrix(), atol=1e-9)


@pytest.mark.parametrize("method", ["deim", "rx"])
def test_data_aware_rows_of_a_rank_one_weight_fit_it_exactly(method):
    """R Σ Rᵀ read off the Gram's eigendecomposition carries rounding-level eigenvalues: its
    pseudo-inverse must not invert them (U grew to 1e6 and the output error to 0.18, while
    the error reported stayed 0.03)."""
    for seed in range(4):
        torch.manual_seed(seed)
        W = torch.outer(torch.randn(24), torch.randn(36))
        Z = torch.randn(300, 36)
        cov = (Z.T @ Z / 300).double()
        r = cur(W, 3, method=method, cov=cov)
        A = (r.U if r.C is None else r.C @ r.U).double()
        L = torch.linalg.cholesky(cov)
        actual = float(((W.double() - A @ r.R.double()) @ L).norm() / (W.double() @ L).norm())
        assert actual < 1e-5 and r.rel_error < 1e-5, (seed, actual, r.rel_error)
