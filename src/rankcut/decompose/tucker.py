"""Tucker decomposition, full or partial: X ≈ G ×_{n∈modes} U_n, U_n with orthonormal columns.

``"hosvd"``
    Truncated higher-order SVD (De Lathauwer, De Moor & Vandewalle 2000, SIAM J. Matrix Anal.
    Appl. 21(4)): U_n = leading left singular vectors of the mode-n unfolding; G = X ×_n U_nᵀ.
``"hooi"``
    Higher-order orthogonal iteration (same authors, "On the best rank-(R1,...,RN)
    approximation"): start from HOSVD, then for each mode in turn U_n = leading left singular
    vectors of (X ×_{m≠n} U_mᵀ)_(n), until the relative error changes by less than ``tol``.

A partial Tucker leaves the modes outside ``modes`` uncompressed: Tucker-2 of a conv kernel
(T, S, kh, kw) uses ``modes=(0, 1)`` (Kim et al. 2016, arXiv 1511.06530). Because the factors are
orthonormal, ||X - X̂||² = ||X||² - ||G||², so the error of every sweep is free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import check_choice, check_positive, check_rank, check_tensor, clamp_rank
from ._tensor import leading_left_singular_vectors, multi_mode_product, unfold

TUCKER_METHODS = ("hooi", "hosvd")


@dataclass(frozen=True)
class TuckerResult:
    """Core G and orthonormal factors U_n (I_n x R_n), one per entry of ``modes``."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    modes: tuple[int, ...]
    rel_error: float
    n_iter: int
    converged: bool
    method: str
    errors: list[float] = field(default_factory=list)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(f.shape[1] for f in self.factors)

    def to_tensor(self) -> torch.Tensor:
        return multi_mode_product(self.core, dict(zip(self.modes, self.factors, strict=True)))


def _check_modes(modes, ndim) -> tuple[int, ...]:
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, int):
        modes = (modes,)
    try:
        modes = tuple(int(m) for m in modes)
    except TypeError:
        raise ValueError(f"modes: expected a sequence of mode indices, got {modes!r}") from None
    normal = tuple(m % ndim if -ndim <= m < ndim else None for m in modes)
    if None in normal or len(set(normal)) != len(normal) or not normal:
        raise ValueError(
            f"modes: expected distinct mode indices in [-{ndim}, {ndim - 1}], got {modes!r}"
        )
    return normal


def _check_ranks(ranks, modes, shape) -> tuple[int, ...]:
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks,) * len(modes)
    if not isinstance(ranks, Sequence) or len(ranks) != len(modes):
        raise ValueError(
            f"ranks: expected an int or a sequence of {len(modes)} ints (one per mode in "
            f"{modes}), got {ranks!r}"
        )
    size = math.prod(shape)
    out = []
    for mode, rank in zip(modes, ranks, strict=True):
        rank = check_rank(rank, f"ranks[mode {mode}]")
        upper = min(shape[mode], size // shape[mode])
        out.append(clamp_rank(rank, upper, f"ranks[mode {mode}]", why=f"shape {tuple(shape)}"))
    return tuple(out)


@torch.no_grad()
def tucker(
    X: torch.Tensor,
    ranks,
    modes: Sequence[int] | int | None = None,
    *,
    method: str = "hooi",
    max_iter: int = 50,
    tol: float = 1e-7,
) -> TuckerResult:
    """Tucker decomposition of ``X`` over ``modes`` (all modes when None).

    Args:
        X: a float32/float64 tensor of order >= 2.
        ranks: an int for every mode in ``modes``, or one per mode; each is clamped, with a
            warning, to what the unfolding can hold.
        modes: the modes to compress; Tucker-2 of a conv kernel is ``(0, 1)``.
        method: ``"hooi"`` (default) or ``"hosvd"``.
        max_iter, tol: HOOI sweeps and the stopping rule on the change of relative error.

    Returns:
        :class:`TuckerResult` with the core, factors, modes, exact relative error, sweeps run,
        whether ``tol`` was met (HOSVD: True) and the per-sweep error history.
    """
    check_tensor(X, "X", min_ndim=2)
    modes = _check_modes(modes, X.ndim)
    ranks = _check_ranks(ranks, modes, X.shape)
    check_choice(method, "method", TUCKER_METHODS)
    check_positive(max_iter, "max_iter", integer=True)
    check_positive(tol, "tol", allow_zero=True)

    factors = {m: leading_left_singular_vectors(unfold(X, m), r) for m, r in zip(modes, ranks,
                                                                                   strict=True)}
    norm_sq = X.pow(2).sum()

    def rel_err(core):
        return float((norm_sq - core.pow(2).sum()).clamp_min(0).sqrt() / norm_sq.sqrt())

    errors: list[float] = []
    n_iter = 0
    converged = method == "hosvd"
    if method == "hooi":
        for n_iter in range(1, max_iter + 1):  # noqa: B007 - reported after the loop
            for mode, rank in zip(modes, ranks, strict=True):
                others = {m: factors[m].mT for m in modes if m != mode}
                Y = multi_mode_product(X, others) if others else X
                factors[mode] = leading_left_singular_vectors(unfold(Y, mode), rank)
            core = multi_mode_product(Y, {mode: factors[mode].mT})
            errors.append(rel_err(core))
            if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
                converged = True
                break
    else:
        core = multi_mode_product(X, {m: factors[m].mT for m in modes})
        errors.append(rel_err(core))

    result_factors = [factors[m] for m in modes]
    approx = multi_mode_product(core, dict(zip(modes, result_factors, strict=True)))
    norm = norm_sq.sqrt()
    rel_error = float((X - approx).norm() / norm) if norm > 0 else 0.0
    return TuckerResult(
        core=core,
        factors=result_factors,
        modes=modes,
        rel_error=rel_error,
        n_iter=n_iter,
        converged=converged,
        method=method,
        errors=errors,
    )
