"""CP (CANDECOMP/PARAFAC) decomposition: X ≈ Σ_r w_r a_r^(1) ∘ a_r^(2) ∘ ... ∘ a_r^(N).

Three solvers:

``"als"``
    Alternating least squares with normal equations (Carroll & Chang 1970; Kolda & Bader 2009,
    SIAM Review 51(3), §3.4): each factor solves A_n (V_n + λI) = X_(n) (⊙_{m≠n} A_m) with V_n the
    Hadamard product of the other factors' Gram matrices and λ a tiny ridge. The matricized
    tensor times Khatri-Rao product (MTTKRP) is computed with a two-level dimension tree: one
    full-tensor product updates the largest mode, a second contracts the tensor with that new
    factor, and every other mode reuses the small contracted tensor. That is 2 passes over the
    tensor a sweep instead of N; each later mode then contracts the small tensor with its own new
    factor, so the modes after it work on a smaller one still.
``"als_qr"``
    ALS solved with QR factorizations (Minster, Viviano, Liu & Ballard 2023, "CP decomposition for
    tensors via alternating least squares with QR decomposition", arXiv 2112.10855): A_m = Q_m R_m
    for the other factors, ⊙R_m = Q_0 R_0, then A_n = (X ×_{m≠n} Q_mᵀ)_(n) Q_0 R_0^{-T}. Avoids
    squaring the condition number; costs more than normal equations.
``"tpm"``
    Tensor power method with deflation (Astrid & Lee 2017, "CP-decomposition with tensor power
    method for convolutional neural networks compression", arXiv 1701.07148; De Lathauwer et al.
    2000 for the higher-order power iteration): rank-1 terms are extracted greedily from the
    residual, each by alternating power updates a_n ∝ Res ×_{m≠n} a_m.

Fit: ALS stops when the relative error changes by less than ``tol`` between sweeps (the rule
tensorly's ``parafac`` uses). The final ``rel_error`` is recomputed exactly from the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import (
    check_choice,
    check_positive,
    check_rank,
    check_tensor,
    make_generator,
    resolvable_error,
)
from ._tensor import cp_to_tensor, khatri_rao, leading_left_singular_vectors, unfold
from .svd import whitening_factor

CP_METHODS = ("als", "als_qr", "tpm")
CP_INITS = ("svd", "random")


@dataclass(frozen=True)
class CPResult:
    """Weights (R,) and unit-norm factors [(I_n, R)], with how they were found.

    ``n_iter`` counts ALS sweeps (TPM: power iterations over all components), ``converged`` says
    whether ``tol`` was met before the iteration cap, ``errors`` is the per-sweep (TPM:
    per-component) relative error history and ``rel_error`` the exact final one.
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel_error: float
    n_iter: int
    converged: bool
    method: str
    init: str
    tol: float
    seed: int | None = None
    errors: list[float] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.weights.shape[0]

    def to_tensor(self) -> torch.Tensor:
        return cp_to_tensor(self.weights, self.factors)


def _initial_factors(X, rank, init, generator, batch: bool = False):
    """Starting factors (I_n, R) of each mode (with ``batch``: X is (B, I_1, ...) and each
    factor (B, I_n, R), every tensor of the batch started from the same random draws, as a call
    of its own with the same seed would be)."""
    shape = X.shape[1:] if batch else X.shape
    factors = []
    for mode, size in enumerate(shape):
        F = torch.randn(size, rank, generator=generator, dtype=torch.float64)
        F = F.to(device=X.device, dtype=X.dtype)
        if batch:
            F = F.expand(X.shape[0], size, rank).clone()
        if init == "svd":
            unfolding = (X.movedim(mode + 1, 1).reshape(X.shape[0], size, -1) if batch
                         else unfold(X, mode))
            k = min(rank, *unfolding.shape[-2:])  # an unfolding has at most min(rows, cols)
            vecs, sq = leading_left_singular_vectors(unfolding, k, values=True)
            # a direction the unfolding does not have (its singular value zero up to rounding:
            # a dead channel, a kernel that is its centre tap) would start a component in the
            # null space, where its updates stay zero: a random column instead
            real = sq > sq[..., :1] * (max(unfolding.shape[-2:]) * torch.finfo(sq.dtype).eps)
            F[..., :k] = torch.where(real[..., None, :], vecs, F[..., :k] / size**0.5)
            if k < rank:  # more components than the mode has directions: random columns
                F[..., k:] /= size**0.5
        factors.append(F)
    return factors


def _normalise(F):
    norms = F.norm(dim=-2)
    return F / norms.clamp_min(torch.finfo(F.dtype).tiny).unsqueeze(-2), norms


def _hadamard(grams, skip):
    out = None
    for m, G in enumerate(grams):
        if m != skip:
            out = G if out is None else out * G
    return out


def _spd_solve(V, BT):
    """X with V X = BT for (a batch of) symmetric positive definite V; the pseudo-inverse where
    V is singular."""
    # the upper factor: torch's lower one costs a transposed copy more (1.5x slower here)
    U, info = torch.linalg.cholesky_ex(V, upper=True)
    if BT.shape[-1] <= V.shape[-1]:  # few right-hand sides (a 3x3 kernel's spatial modes: 3):
        # two triangular solves, the same numbers as cholesky_solve and 2-3x faster here
        out = torch.linalg.solve_triangular(
            U, torch.linalg.solve_triangular(U.mT, BT, upper=False), upper=True)
    else:
        out = torch.cholesky_solve(BT, U, upper=True)
    bad = info != 0
    if bool(bad.any()):
        out[bad] = torch.linalg.pinv(V[bad], hermitian=True) @ BT[bad]
    return out


def _als_sweeps(X, factors, max_iter, tol, ridge):
    """Normal-equation ALS on a batch X (B, I_0, ..., I_{N-1}) of same-shaped tensors, with a
    two-level dimension tree rooted at mode 0 (the largest); returns per tensor (weights,
    factors, sweeps, converged, errors), each exactly what a run on that tensor alone gives.

    Every factor is kept with unit-norm columns (the scale lives in the weights), so the Gram
    products have a unit diagonal and the ridge is a plain λI. Each MTTKRP is held transposed,
    (B, R, I_n), the shape the solve takes. A tensor that meets ``tol`` leaves the batch; the
    rest go on, so small kernels share each sweep's kernel launches.
    """
    N = X.ndim - 1
    shape = X.shape[1:]
    rank = factors[0].shape[-1]
    ridge_eye = ridge * torch.eye(rank, dtype=X.dtype, device=X.device)
    tiny = torch.finfo(X.dtype).tiny
    floor = resolvable_error(X.dtype)
    live = list(range(X.shape[0]))  # which tensors of the batch are still iterating
    X0 = X.reshape(X.shape[0], shape[0], -1)
    norm_sq = X0.pow(2).sum((1, 2))
    factors = [_normalise(F)[0] for F in factors]
    grams = [F.mT @ F for F in factors]
    weights = torch.ones(X.shape[0], rank, dtype=X.dtype, device=X.device)
    errors: list[list[float]] = [[] for _ in live]
    done: dict[int, tuple] = {}

    def update(n, MT):
        """Solve mode n from its transposed MTTKRP, keeping unit columns; returns the fit terms."""
        V = _hadamard(grams, n)
        AT = _spd_solve(V + ridge_eye, MT)
        norms = AT.norm(dim=-1)
        factors[n] = (AT / norms.clamp_min(tiny)[..., None]).mT
        grams[n] = factors[n].mT @ factors[n]
        return V, AT, norms

    def finish(rows, n_iter, converged):
        for i in rows:
            b = live[i]
            done[b] = (weights[i], [F[i] for F in factors], n_iter, converged, errors[b])

    for n_iter in range(1, max_iter + 1):
        # Root mode: one full MTTKRP. Then contract the tensor with its new factor once
        # into Z (B, R, I_1, ..., I_{N-1}); every other mode's MTTKRP is a batched product with Z.
        MT = (X0 @ khatri_rao(factors[1:])).mT
        V, AT, norms = update(0, MT)
        Z = factors[0].mT @ X0  # (B, R, I_1 ... I_{N-1})
        B = len(live)
        for n in range(1, N):
            # Z holds modes n..N-1, already contracted with this sweep's factors of modes < n
            after = Z.shape[-1] // shape[n]
            Zn = Z.reshape(B * rank, shape[n], after)
            if n < N - 1:
                kr = khatri_rao(factors[n + 1:]).mT.reshape(B * rank, after, 1)
                MT = torch.bmm(Zn, kr).reshape(B, rank, shape[n])
            else:
                MT = Z
            V, AT, norms = update(n, MT)
            if n < N - 1:  # contract mode n with its new factor: the next modes see it
                Z = torch.bmm(factors[n].mT.reshape(B * rank, 1, shape[n]), Zn).reshape(
                    B, rank, after)
        weights = norms
        # Fit from the last solve: ||X - X̂||² = ||X||² - 2<X, X̂> + ||X̂||².
        inner = (MT * AT).sum((1, 2))
        est_sq = (V * (AT @ AT.mT)).sum((1, 2))
        err = ((norm_sq - 2 * inner + est_sq).clamp_min(0).sqrt()
               / norm_sq.sqrt().clamp_min(tiny)).tolist()  # (all zero: 0, not 0/0)
        for i, e in enumerate(err):
            if e < floor:  # cancelled to noise: measured on the tensor
                approx = cp_to_tensor(norms[i], [F[i] for F in factors])
                err[i] = float((X0[i].reshape(shape) - approx).norm()
                               / norm_sq[i].sqrt().clamp_min(tiny))
        stop = []
        for i, b in enumerate(live):
            errors[b].append(err[i])
            if len(errors[b]) > 1 and abs(errors[b][-2] - errors[b][-1]) < tol:
                stop.append(i)
        finish(stop, n_iter, True)
        if len(stop) == len(live):
            break
        if stop:  # the converged leave the batch
            keep = torch.tensor([i for i in range(len(live)) if i not in stop],
                                device=X.device)
            live = [live[i] for i in keep.tolist()]
            X0, norm_sq, weights = X0[keep], norm_sq[keep], weights[keep]
            factors = [F[keep] for F in factors]
            grams = [G[keep] for G in grams]
    else:
        finish(range(len(live)), max_iter, False)
    return [done[b] for b in range(X.shape[0])]


def _als_qr_sweeps(X, factors, max_iter, tol):
    """ALS with QR-based least squares (Minster et al.); every mode is a full tensor pass."""
    N = X.ndim
    norm_sq = X.pow(2).sum()
    errors: list[float] = []
    converged = False
    n_iter = 0
    qr = [torch.linalg.qr(F) for F in factors]  # each factor's QR, renewed when it changes
    for n_iter in range(1, max_iter + 1):  # noqa: B007
        for n in range(N):
            qs = {m: qr[m][0] for m in range(N) if m != n}
            Q0, R0 = torch.linalg.qr(khatri_rao([qr[m][1] for m in range(N) if m != n]))
            Y = X
            for m in sorted(qs, key=lambda m: -X.shape[m]):
                Y = torch.tensordot(Y, qs[m], dims=([m], [0])).movedim(-1, m)
            B = unfold(Y, n) @ Q0
            diag = R0.diagonal().abs()
            if R0.shape[0] == R0.shape[1] and bool(
                    diag.min() > diag.max() * torch.finfo(R0.dtype).eps * R0.shape[0]):
                A = torch.linalg.solve_triangular(R0, B.mT, upper=True).mT
            else:  # fewer rows than components, or a singular R (a zero component):
                A = B @ torch.linalg.pinv(R0.mT)  # the minimum-norm solution
            factors[n] = A if n == N - 1 else _normalise(A)[0]
            qr[n] = torch.linalg.qr(factors[n])
        # B is X projected on the span of the Khatri-Rao product: the residual is the rest.
        err = float((norm_sq - B.pow(2).sum()).clamp_min(0).sqrt()
                    / norm_sq.sqrt().clamp_min(torch.finfo(norm_sq.dtype).tiny))
        if err < resolvable_error(X.dtype):  # cancelled to noise: measured on the tensor
            err = float((X - cp_to_tensor(torch.ones_like(factors[-1][0]), factors)).norm()
                        / norm_sq.sqrt().clamp_min(torch.finfo(norm_sq.dtype).tiny))
        errors.append(err)
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            converged = True
            break
    factors[-1], weights = _normalise(factors[-1])
    return weights, factors, n_iter, converged, errors


def _kron(vectors):
    out = vectors[0]
    for v in vectors[1:]:
        out = torch.outer(out, v).reshape(-1)
    return out


def _tpm(X, rank, init, max_iter, tol, generator):
    """Greedy rank-1 extraction by higher-order power iterations, with deflation."""
    N = X.ndim
    residual = X.clone()
    norm = X.norm()
    weights = torch.zeros(rank, dtype=X.dtype, device=X.device)
    factors = [torch.zeros(s, rank, dtype=X.dtype, device=X.device) for s in X.shape]
    total_iter = 0
    all_converged = True
    errors = []
    for r in range(rank):
        if init == "svd":
            vecs = [leading_left_singular_vectors(unfold(residual, n), 1)[:, 0] for n in range(N)]
        else:
            vecs = [torch.randn(s, generator=generator, dtype=torch.float64).to(X) for s in X.shape]
            vecs = [v / v.norm() for v in vecs]
        lam_prev = None
        converged = False
        # The residual is fixed during this component's power iterations: unfold it once, so
        # contracting all modes but n is one matrix-vector product with a Kronecker vector.
        unfoldings = [unfold(residual, n).contiguous() for n in range(N)]
        for _ in range(max_iter):
            total_iter += 1
            for n in range(N):
                v = unfoldings[n] @ _kron([vecs[m] for m in range(N) if m != n])
                vn = v.norm()
                vecs[n] = v / vn if vn > 0 else v
            lam = float(torch.dot(v, vecs[N - 1]))
            if lam_prev is not None and abs(lam - lam_prev) <= tol * max(abs(lam), 1e-300):
                converged = True
                break
            lam_prev = lam
        all_converged &= converged
        weights[r] = lam
        for n in range(N):
            factors[n][:, r] = vecs[n]
        residual = residual - cp_to_tensor(weights[r : r + 1], [v[:, None] for v in vecs])
        errors.append(float(residual.norm() / norm) if norm > 0 else 0.0)
    return weights, factors, total_iter, all_converged, errors


@torch.no_grad()
def cp(
    X: torch.Tensor,
    rank: int,
    *,
    method: str = "als",
    init: str = "svd",
    max_iter: int = 200,
    tol: float = 1e-7,
    seed=0,
    ridge: float | None = None,
    cov: torch.Tensor | None = None,
    max_work: float | None = None,
) -> CPResult:
    """Rank-``rank`` CP decomposition of an N-way tensor (N >= 2).

    Args:
        X: a float32/float64 tensor of order >= 2 (a conv kernel is (T, S, kh, kw)).
        rank: number of rank-1 components R (may exceed every dimension).
        method: ``"als"`` (normal equations, default), ``"als_qr"`` or ``"tpm"``.
        init: ``"svd"`` (leading left singular vectors of each unfolding, HOSVD-style, with seeded
            random columns where R exceeds a dimension) or ``"random"`` (seeded Gaussian).
        max_iter: ALS sweeps, or power iterations per component for ``"tpm"``.
        tol: ALS stops when the relative error changes by less than ``tol`` between sweeps;
            TPM stops a component when its weight changes by less than ``tol`` relatively.
        seed: int or ``torch.Generator`` for every random draw (draws are made on the CPU, so a
            seed gives the same start on every device).
        ridge: normal-equation regulariser λ, added to the (unit-diagonal) Gram product of the
            other factors; default 10·machine epsilon of X's dtype.
        cov: data-aware CP: the second moment Σ (I_1 x I_1) of the inputs that mode 1 of X
            multiplies (a conv kernel's input channels). The CP is then fitted to X ×_1 Lᵀ
            (L Lᵀ = Σ, ridge-regularised as :func:`whitening_factor`) and the mode-1 factor
            mapped back, which minimises the output error on inputs of that moment when the
            kernel positions are uncorrelated; ``rel_error`` is measured in that norm.
        max_work: a bound on the work of the ALS solvers, in multiply-adds of the tensor
            products (about 2·numel(X)·R a sweep): the sweeps are capped at
            ``max_work / (2·numel·R)`` (at least one). ALS never raises the error from one
            sweep to the next, so a capped run's error bounds the full run's from above: the
            planner scores large CP candidates this way (:data:`rankcut.curves.CP_SCORING`).

    Returns:
        :class:`CPResult` (weights, unit-norm factors, exact relative error, sweeps run, whether
        ``tol`` was met, and the per-sweep error history).
    """
    return cp_many([X], rank, method=method, init=init, max_iter=max_iter, tol=tol, seed=seed,
                   ridge=ridge, cov=None if cov is None else [cov], max_work=max_work,
                   _names=("X", "cov"))[0]


@torch.no_grad()
def cp_many(
    tensors: Sequence[torch.Tensor],
    rank: int,
    *,
    method: str = "als",
    init: str = "svd",
    max_iter: int = 200,
    tol: float = 1e-7,
    seed=0,
    ridge: float | None = None,
    cov: Sequence[torch.Tensor] | None = None,
    max_work: float | None = None,
    _names: tuple[str, str] = ("tensors", "cov"),
) -> list[CPResult]:
    """:func:`cp` of each tensor of ``tensors`` at ``rank`` (``cov``: one second moment per
    tensor, or None), every result what ``cp`` gives for that tensor alone (with an int
    ``seed``). ALS runs the tensors of one shape, dtype and device as one batch: each sweep is a
    few batched kernels for all of them, which is what makes many small kernels (a ResNet's
    3x3 convolutions) fast; a tensor that converges leaves the batch."""
    x_name, cov_name = _names
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or not tensors:
        raise ValueError(f"{x_name}: expected a non-empty list of tensors, got "
                         f"{type(tensors).__name__}")
    for i, X in enumerate(tensors):
        check_tensor(X, x_name if len(tensors) == 1 else f"{x_name}[{i}]", min_ndim=2)
    rank = check_rank(rank)
    check_choice(method, "method", CP_METHODS)
    check_choice(init, "init", CP_INITS)
    check_positive(max_iter, "max_iter", integer=True)
    check_positive(tol, "tol", allow_zero=True)
    if ridge is not None:
        check_positive(ridge, "ridge", allow_zero=True)
    if max_work is not None:
        check_positive(max_work, "max_work")
    if cov is not None and (isinstance(cov, torch.Tensor) or not isinstance(cov, Sequence)
                            or len(cov) != len(tensors)):
        raise ValueError(f"{cov_name}: expected one second moment per tensor "
                         f"({len(tensors)}), got {type(cov).__name__}")
    fitted = list(tensors)
    whiten = [None] * len(tensors)
    if cov is not None:  # fit X ×_1 Lᵀ, map the mode-1 factor back after
        for i, (X, C) in enumerate(zip(tensors, cov, strict=True)):
            n = X.shape[1]
            check_tensor(C, cov_name, ndim=2)
            if C.shape != (n, n):
                raise ValueError(f"{cov_name}: expected shape ({n}, {n}) (mode 1 of X), got "
                                 f"{tuple(C.shape)}")
            whiten[i] = whitening_factor(C, device=X.device).to(X.dtype)
            fitted[i] = torch.tensordot(X, whiten[i], dims=([1], [0])).movedim(-1, 1)
    groups: dict[tuple, list[int]] = {}
    results: list[CPResult | None] = [None] * len(tensors)
    for i, X in enumerate(fitted):
        if not bool(X.any()):  # a dead kernel: zero weights are exact (the solvers' 0/0 is not)
            results[i] = CPResult(
                weights=X.new_zeros(rank), factors=[X.new_zeros(n, rank) for n in X.shape],
                rel_error=0.0, n_iter=0, converged=True, method=method, init=init, tol=tol,
                seed=seed if isinstance(seed, int) else None, errors=[0.0])
            continue
        groups.setdefault((tuple(X.shape), X.dtype, X.device), []).append(i)
    for members in groups.values():
        batch = torch.stack([fitted[i] for i in members])
        lam = 10 * torch.finfo(batch.dtype).eps if ridge is None else ridge
        sweeps = max_iter
        if max_work is not None and method != "tpm":
            sweeps = min(max_iter, max(1, int(max_work // (2 * batch[0].numel() * rank))))
        for i, res in zip(members, _cp_batch(batch, rank, method, init, sweeps, tol, seed,
                                             lam), strict=True):
            results[i] = res if whiten[i] is None else _unwhiten(res, whiten[i])
    return results


def _cp_batch(X, rank, method, init, max_iter, tol, seed, ridge) -> list[CPResult]:
    """CP of each tensor of the batch X (B, ...), see :func:`cp_many`."""
    generator = make_generator(seed)
    if method == "tpm":
        runs = [_tpm(x, rank, init, max_iter, tol, make_generator(seed) if isinstance(seed, int)
                     else generator) for x in X]
    else:
        # Root the dimension tree at the largest mode: the contracted tensor is then smallest.
        shape = X.shape[1:]
        root = max(range(len(shape)), key=lambda m: shape[m])
        Xp = X.movedim(root + 1, 1)
        factors = _initial_factors(Xp, rank, init, generator, batch=True)
        if method == "als":
            runs = _als_sweeps(Xp, factors, max_iter, tol, ridge)
        else:
            runs = [_als_qr_sweeps(Xp[b], [F[b] for F in factors], max_iter, tol)
                    for b in range(X.shape[0])]
        order = list(range(1, len(shape)))
        order.insert(root, 0)
        runs = [(w, [fs[i] for i in order], *rest) for w, fs, *rest in runs]
    out = []
    for x, (weights, factors, n_iter, converged, errors) in zip(X, runs, strict=True):
        norm = x.norm()
        approx = cp_to_tensor(weights, factors)
        rel_error = float((x - approx).norm() / norm) if norm > 0 else 0.0
        out.append(CPResult(weights=weights, factors=factors, rel_error=rel_error, n_iter=n_iter,
                            converged=converged, method=method, init=init, tol=tol,
                            seed=seed if isinstance(seed, int) else None, errors=errors))
    return out


def _unwhiten(res: CPResult, L: torch.Tensor) -> CPResult:
    """A CP fitted to X ×_1 Lᵀ, mapped back to X (its mode-1 factor solved through Lᵀ)."""
    f1 = torch.linalg.solve_triangular(L.mT, res.factors[1], upper=True)
    norms = f1.norm(dim=0).clamp_min(torch.finfo(f1.dtype).tiny)
    factors = list(res.factors)
    factors[1] = f1 / norms
    return CPResult(weights=res.weights * norms, factors=factors, rel_error=res.rel_error,
                    n_iter=res.n_iter, converged=res.converged, method=res.method,
                    init=res.init, tol=res.tol, seed=res.seed, errors=res.errors)
