"""Argument validation for the public decomposition functions.

Every public function validates once, at its boundary, and raises a ``ValueError`` that names the
argument, the value received and what is accepted (scikit-learn's habit). Internals trust inputs.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Sequence

import torch

ACCEPTED_DTYPES = (torch.float32, torch.float64)


class RankClampWarning(UserWarning):
    """A requested rank exceeded what the tensor can hold and was lowered to the maximum."""


def check_tensor(x, name: str, *, ndim: int | None = None, min_ndim: int | None = None):
    """Check that ``x`` is a finite float32/float64 tensor of the expected order."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACCEPTED_DTYPES:
        raise ValueError(
            f"{name}: expected dtype float32 or float64, got {x.dtype} "
            "(convert with .float() or .double())"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(
            f"{name}: expected a tensor of order {ndim}, got order {x.ndim} "
            f"(shape {tuple(x.shape)})"
        )
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected a tensor of order >= {min_ndim}, got order {x.ndim} "
            f"(shape {tuple(x.shape)})"
        )
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if x.is_meta:
        raise ValueError(f"{name}: expected a tensor with values, got one on the meta device")
    # in slices of about 16 M entries along the first mode: a mask of the whole tensor would be
    # 0.6 GB more for a 25,088-wide input moment
    step = max(1, (1 << 24) // max(1, x[0].numel())) if x.ndim else 1
    parts = x.split(step) if x.ndim else [x]
    if not all(bool(torch.isfinite(part).all()) for part in parts):
        n_bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
        raise ValueError(f"{name}: expected finite entries, got {n_bad} NaN or infinite entries")
    return x


def is_count(value) -> bool:
    """A whole number >= 1: an int or a NumPy integer, never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def are_counts(values, n: int | None = None) -> bool:
    """A non-empty tuple or list of whole numbers >= 1 (exactly ``n`` of them where given): a
    rank tuple, an (H, W) size, a weight's shape."""
    return (isinstance(values, tuple | list) and len(values) >= 1
            and (n is None or len(values) == n) and all(is_count(v) for v in values))


def check_rank(rank, name: str = "rank") -> int:
    """Check that ``rank`` is an integer >= 1 and return it as ``int``."""
    if isinstance(rank, bool):
        raise ValueError(f"{name}: expected an integer >= 1, got {rank!r}")
    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"{name}: expected an integer >= 1, got {rank!r}") from None
    if rank < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {rank}")
    return rank


def clamp_rank(rank: int, upper: int, name: str = "rank", why: str = "") -> int:
    """Lower ``rank`` to ``upper`` with a :class:`RankClampWarning` when it is above it."""
    if rank > upper:
        warnings.warn(
            f"{name}={rank} exceeds the maximum {upper}{' (' + why + ')' if why else ''}; "
            f"using {name}={upper}",
            RankClampWarning,
            stacklevel=3,
        )
        return upper
    return rank


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_positive(value, name: str, *, allow_zero: bool = False, integer: bool = False):
    """Check a numeric option: finite, > 0 (or >= 0), and an integer where asked."""
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a value {bound}, got {value!r}")
    return value


def make_generator(seed) -> torch.Generator:
    """A CPU generator from an int seed, a Generator (returned as is), or None (fresh seed).

    Random draws are made on the CPU and then moved, so a seed gives the same numbers on every
    device.
    """
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, a torch.Generator or None, got {seed!r}")
    else:
        g.manual_seed(seed)
    return g


def resolvable_error(dtype: torch.dtype) -> float:
    """The smallest relative fit error that ||X||² - (what the fit explains) resolves in
    ``dtype``: below it the subtraction has lost its digits (float32: about 0.01), and an
    iterative solver measures the error on the tensor itself instead (a fit judged by that
    noise stopped early, its history reading 0)."""
    return 30 * math.sqrt(torch.finfo(dtype).eps)
