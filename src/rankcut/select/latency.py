"""Latency awareness for the planner: measured, on the device the model lives on.

A factorized layer does fewer MACs but runs several smaller kernels in a row; on a CPU at batch 1,
or for a depthwise CP stage, it can be slower than the dense layer it replaces. The
:class:`LatencyGuard` times each candidate the allocation picks against its dense layer
(interleaved runs, median of each, at batch 1 and at the user's batch) and vetoes those slower
than dense by more than a noise margin; the planner then re-allocates without them.

Timing uses each layer's real input shape (recorded on ``example_inputs``) and the candidate's
structure with fresh weights (``Method.structure``): the time of a forward pass does not
depend on the values, so no decomposition is computed to measure it.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import methods
from ..curves import Candidate
from ..profile import compare_latency


def layer_input(module: nn.Module, shape: tuple, batch: int) -> torch.Tensor:
    """A random input of ``batch`` samples for a layer whose recorded input is ``shape``
    ((H, W) of a Conv2d, or (rows,) per sample of a Linear)."""
    device = module.weight.device
    dtype = module.weight.dtype
    if isinstance(module, nn.Conv2d):
        return torch.randn(batch, module.in_channels, *shape, device=device, dtype=dtype)
    return torch.randn(batch * shape[0], module.in_features, device=device, dtype=dtype)


class LatencyGuard:
    """Remembers, per layer and candidate, the measured slow-down against the dense layer.

    ``latency_ratio`` is the largest over ``batches`` of median(candidate) / median(dense); a
    candidate is slower when that exceeds ``1 + margin`` (the margin absorbs timing noise: a
    candidate that merely ties with dense is kept, as it saves params and MACs at no cost in
    time).
    """

    def __init__(self, batches: tuple[int, ...], margin: float = 0.05, warmup: int = 3,
                 repeats: int = 15):
        if margin < 0:
            raise ValueError(f"latency_margin: expected >= 0, got {margin!r}")
        self.batches = tuple(sorted(set(batches)))
        self.margin = margin
        self.warmup, self.repeats = warmup, repeats
        self.measured: dict[tuple, dict] = {}

    def settings(self) -> dict:
        return {"batches": list(self.batches), "margin": self.margin, "repeats": self.repeats,
                "threads": torch.get_num_threads()}

    def measure(self, name: str, module: nn.Module, shape: tuple, cand: Candidate) -> dict:
        """{"latency_ratio", "latency_ms", "dense_latency_ms"} for ``cand`` (batch-1 times)."""
        key = (name, cand.method, cand.form, cand.ranks)
        if key not in self.measured:
            layer = methods.get(cand.method).structure(module, cand.ranks, cand.form).to(
                module.weight.device, module.weight.dtype)
            worst, first = 0.0, None
            for batch in self.batches:
                x = layer_input(module, shape, batch)
                dense, fact = compare_latency(module, layer, x, warmup=self.warmup,
                                              repeats=self.repeats)
                worst = max(worst, fact.median_ms / max(dense.median_ms, 1e-9))
                first = first or (fact.median_ms, dense.median_ms)
            self.measured[key] = {"latency_ratio": worst, "latency_ms": first[0],
                                  "dense_latency_ms": first[1]}
        return self.measured[key]

    def slower(self, name: str, module: nn.Module, shape: tuple, cand: Candidate) -> bool:
        return self.measure(name, module, shape, cand)["latency_ratio"] > 1 + self.margin


def drop_slower(cands: list[Candidate], slow: Candidate) -> list[Candidate]:
    """``cands`` without ``slow`` and every candidate of the same method and form whose ranks are
    all at least as large (a larger factorization of the same form is not faster)."""
    return [c for c in cands
            if not (c.method == slow.method and c.form == slow.form
                    and all(a >= b for a, b in zip(c.ranks, slow.ranks, strict=True)))]
