"""Small multilinear-algebra helpers shared by the CP and Tucker solvers.

Conventions follow Kolda & Bader (2009) with C-order unfoldings: ``unfold(X, n)`` moves mode n to
the front and flattens the rest with the last mode varying fastest, which matches
``khatri_rao`` of the remaining factors taken in increasing mode order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unfold(X: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: a matrix of shape (I_mode, prod of the other dims)."""
    return X.movedim(mode, 0).reshape(X.shape[mode], -1)


def mode_product(X: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """X ×_mode M for M of shape (J, I_mode): mode ``mode`` of the result has size J."""
    return torch.tensordot(X, M, dims=([mode], [1])).movedim(-1, mode)


def multi_mode_product(X: torch.Tensor, mats: dict[int, torch.Tensor]) -> torch.Tensor:
    """X multiplied along each mode in ``mats`` (mode -> (J, I_mode)); the largest shrink first."""
    order = sorted(mats, key=lambda m: mats[m].shape[0] / X.shape[m])
    for mode in order:
        X = mode_product(X, mats[mode], mode)
    return X


def khatri_rao(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of (..., I_k, R) matrices: (..., prod I_k, R), first factor
    slowest; leading dimensions are a batch."""
    out = mats[0]
    rank = out.shape[-1]
    for M in mats[1:]:
        out = (out[..., :, None, :] * M[..., None, :, :]).reshape(*out.shape[:-2], -1, rank)
    return out


def leading_left_singular_vectors(M: torch.Tensor, k: int, *, values: bool = False):
    """The k leading left singular vectors of M (..., rows, cols), as a (..., rows, k) matrix
    (leading dimensions are a batch); with ``values``, also their squared singular values
    (..., k), descending.

    Wide matrices go through the eigendecomposition of the small Gram matrix M Mᵀ, which is much
    cheaper than an SVD of M; the leading subspace is what Tucker and CP initialisations need.
    """
    rows, cols = M.shape[-2:]
    if rows <= cols:
        vals, vecs = torch.linalg.eigh(M @ M.mT)
        out = vecs[..., -k:].flip(-1)
        return (out, vals[..., -k:].flip(-1).clamp_min(0)) if values else out
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    return (U[..., :k], S[..., :k].square()) if values else U[..., :k]


def cp_to_tensor(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_r w_r a_r^(1) ∘ ... ∘ a_r^(N) as a dense tensor."""
    shape = tuple(f.shape[0] for f in factors)
    if len(factors) == 1:
        return (factors[0] * weights).sum(dim=1)
    flat = (factors[0] * weights) @ khatri_rao(factors[1:]).mT
    return flat.reshape(shape)
