"""Pure tensor math on torch tensors: the decompositions rankcut builds layers from.

Every function validates its arguments once, works on CPU and CUDA in float32 and float64, is
deterministic given its ``seed``, and returns a small result object that can rebuild its
approximation (``to_matrix()`` or ``to_tensor()``) and carries the relative Frobenius error.
"""

from ._checks import RankClampWarning
from .cp import CP_INITS, CP_METHODS, CPResult, cp, cp_many
from .cur import CUR_METHODS, CURResult, cur
from .svd import SVD_METHODS, SVDResult, energy_rank, reuse_svds, svd, truncation_errors
from .tucker import TUCKER_METHODS, TuckerResult, tucker
from .vbmf import EVBMFResult, evbmf

__all__ = [
    "CP_INITS",
    "CP_METHODS",
    "CUR_METHODS",
    "SVD_METHODS",
    "TUCKER_METHODS",
    "CPResult",
    "CURResult",
    "EVBMFResult",
    "RankClampWarning",
    "SVDResult",
    "TuckerResult",
    "cp",
    "cp_many",
    "cur",
    "energy_rank",
    "evbmf",
    "reuse_svds",
    "svd",
    "truncation_errors",
    "tucker",
]
