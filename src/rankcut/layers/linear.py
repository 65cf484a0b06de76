"""Low-rank replacement for ``nn.Linear``: two Linear layers, in -> rank -> out.

W (out x in) ≈ A @ B is computed by truncated SVD (Eckart-Young; Mai et al. 2020 for classifier
layers) or by CUR (C actual columns, U R; the layer width is then the number of columns picked):
``first`` is Linear(in, rank, bias=False) with weight B, ``second`` is Linear(rank, out) with
weight A and the original bias. Params rank·(in + out) (+ out), against in·out dense.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import decompose as dec
from .base import FactorizedLayer, decomposition_dtype, own_forward_reason, single_rank, solve
from .conv import CHANNEL_DECOMPOSITIONS, SVDConv2d


class LowRankLinear(FactorizedLayer):
    """Linear(in, rank, bias=False) followed by Linear(rank, out, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 decomposition: str = "svd"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.decomposition = decomposition
        self.first = nn.Linear(in_features, self.rank, bias=False)
        self.second = nn.Linear(self.rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.second.bias is not None}, "
                f"decomposition={self.decomposition!r}")

    def config(self):
        return {"layer": "LowRankLinear", "rank": self.rank, "decomposition": self.decomposition}

    @classmethod
    def like(cls, dense, rank, decomposition="svd"):
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"module: expected an nn.Linear, got {type(dense).__name__}")
        return cls(dense.in_features, dense.out_features, rank, dense.bias is not None,
                   decomposition)._placed_as(dense)

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        ref = self.second.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None)
        dense = dense.to(device=ref.device, dtype=ref.dtype)
        dense.weight.copy_(self.dense_weight())
        if dense.bias is not None:
            dense.bias.copy_(self.second.bias)
        return self._dense_placed(dense)

    @classmethod
    def from_dense(cls, module, ranks, *, cov=None, decomposition="svd", entries=None,
                   **options):
        """Factorize an ``nn.Linear`` (or a 1x1 ``nn.Conv2d``, returned as an ``SVDConv2d``).

        ``decomposition``: ``"svd"`` (``options`` go to :func:`rankcut.decompose.svd`) or
        ``"cur"`` (to :func:`rankcut.decompose.cur`, e.g. ``solver="deim"``). ``cov``: the
        second moment of the layer's inputs, for the data-aware SVD or CUR
        (:mod:`rankcut.calibrate`). ``entries``: for the data-aware CUR, a weight (shaped as
        ``module.weight``) whose rows and columns the layer keeps while fitting ``module``'s.
        """
        rank = single_rank(ranks)
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1):
            return SVDConv2d.from_dense(module, rank, cov=cov, decomposition=decomposition,
                                        entries=entries, **options)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"module: expected an nn.Linear or a 1x1 nn.Conv2d, got "
                             f"{type(module).__name__}")
        if (reason := own_forward_reason(module)) is not None:
            raise ValueError(f"module: cannot factorize this layer: {reason}")
        if decomposition not in CHANNEL_DECOMPOSITIONS:
            raise ValueError(f"decomposition: expected one of 'svd', 'cur', got {decomposition!r}")
        W = module.weight.detach()
        M = W.to(decomposition_dtype(W))
        if isinstance(cov, list | tuple):
            if len(cov) != 1:
                raise ValueError(f"cov: a Linear layer takes one input moment, got a list of "
                                 f"{len(cov)}")
            (cov,) = cov
        info = {}
        if decomposition == "svd":
            if entries is not None:
                raise ValueError("entries: only CUR keeps a weight's own entries")
            res = solve(dec.svd, M, rank, cov=cov, **options)
            A, B = res.A, res.B
        else:
            E = None if entries is None else entries.detach().to(M.dtype)
            res = solve(dec.cur, M, rank, cov=cov, entries=E, **options)
            A, B = res.factors()
            if cov is not None:  # ||(W - W~) L|| / ||W L||, as solved
                info["output_error"] = res.rel_error
        layer = cls.like(module, A.shape[1], decomposition)
        with torch.no_grad():
            layer.first.weight.copy_(B)
            layer.second.weight.copy_(A)
            if module.bias is not None:
                layer.second.bias.copy_(module.bias)
            err = (W - layer.dense_weight()).norm() / W.norm().clamp_min(1e-30)
        layer._set_info(decomposition=decomposition, options=dict(options), rel_error=float(err),
                        data_aware=cov is not None, **info)
        return layer
