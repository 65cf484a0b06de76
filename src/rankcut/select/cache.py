"""``CandidateCache``: what ``rc.plan`` measures before any target matters, kept between calls.

Planning a model to several targets (a sweep of compression ratios, ``rankcut sweep``, the
reproductions' configs) repeats the costly part each time: the calibration moments of every
layer's input and every layer's error-versus-cost candidates (CP-ALS scoring, data-aware Tucker-2
at up to 32 rank pairs per layer). None of it depends on the target's value, only on its kind
(the candidate grids are drawn on params or MACs) and on the model, inputs, calibration data and
settings. A cache passed to ``rc.plan(..., cache=cache)`` keeps them, keyed by a fingerprint of
all of these (the SHA-256 of every parameter and buffer of the model and of the calibration
inputs, the input shapes, the method, rank rule, grid kind, rank multiple, solver options and the
eligible layers), so a hit is the same computation, never a stale one. It lives in memory, holds
at most ``max_entries`` fingerprints (least recently used dropped first) and is not saved.
Memory: the calibration moments are n x n per layer (n = input channels x kernel positions; a
512-channel 3x3 layer's is 170 MB in float64).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from .._fingerprint import model_fingerprint, update

__all__ = ["CandidateCache", "data_fingerprint", "model_fingerprint"]


def data_fingerprint(batches, max_batches: int | None) -> str | None:
    """SHA-256 of the inputs of the calibration batches the planner reads (None: no data)."""
    if batches is None:
        return None
    h = hashlib.sha256()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, tuple | list) else batch
        for t in x if isinstance(x, tuple | list) else (x,):
            update(h, torch.as_tensor(t))
    return h.hexdigest()


class CandidateCache:
    """Per-layer candidates and calibration moments of ``rc.plan``, reused by later calls on
    the same model, inputs, data and settings (see the module docstring)."""

    def __init__(self, max_entries: int = 4):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: expected an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple):
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        return None

    def put(self, key: tuple, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
