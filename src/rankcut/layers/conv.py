"""Factorized replacements for ``nn.Conv2d``: CP (CP-4 and CP-3), Tucker-2, channel SVD/CUR and
spatial SVD.

Every layer honours the dense convolution's stride, padding (ints, tuples, "same", "valid"),
dilation, bias, padding_mode and groups. A grouped convolution is factorized group by group into
grouped sub-convolutions (ranks are per group); a depthwise one (one input channel per group) has
nothing to factorize across channels and is refused with that reason.

Shapes, for a dense kernel (T, S, kh, kw) and g = 1:

=================  ==========================================================================
``SVDConv2d``      kh x kw conv S->R, then 1x1 R->T (channel SVD or CUR of the (T, S·kh·kw)
                   matrix; Zhang et al. 2016, Jaderberg et al.'s scheme 2 on channels)
``SpatialConv2d``  kh x 1 conv S->R, then 1 x kw R->T (SVD of the (S·kh, T·kw) reshape;
                   Jaderberg, Vedaldi & Zisserman 2014; AIMET's spatial SVD)
``CPConv2d``       cp4: 1x1 S->R, depthwise kh x 1, depthwise 1 x kw, 1x1 R->T (Lebedev et al.
                   2015); cp3: 1x1 S->R, depthwise kh x kw, 1x1 R->T (Astrid & Lee 2017)
``TuckerConv2d``   1x1 S->R_S, kh x kw conv R_S->R_T (the core), 1x1 R_T->T (Kim et al. 2016)
=================  ==========================================================================

The original bias goes on the last sub-layer; the other sub-layers have none.
"""

from __future__ import annotations

import numbers
import operator
import warnings

import torch
from torch import nn

from .. import decompose as dec
from ..decompose._tensor import khatri_rao
from .base import (
    ConvGeometry,
    FactorizedLayer,
    channel_matrix,
    decomposition_dtype,
    grouped_weights,
    own_forward_reason,
    pointwise,
    single_rank,
    solve,
    spatial_matrix,
)

CP_FORMS = ("cp4", "cp3")
CHANNEL_DECOMPOSITIONS = ("svd", "cur")


def conv_skip_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be factorized as a Conv2d, or None if it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    if (reason := own_forward_reason(conv)) is not None:
        return reason
    if conv.in_channels // conv.groups == 1:
        kind = "single-channel input" if conv.groups == 1 else "depthwise convolution"
        return (f"{kind}: one input channel per group, nothing to factorize across input "
                "channels")
    return None


def cp_break_even(geometry: ConvGeometry, form: str = "cp4") -> int:
    """The largest CP rank (per group) whose layer has at most the dense layer's parameters."""
    kh, kw = geometry.kernel_size
    t, s = geometry.out_per_group, geometry.in_per_group
    per_rank = s + t + (kh + kw if form == "cp4" else kh * kw)
    return max(1, (t * s * kh * kw) // per_rank)


def _channel_moment(patch_moment: torch.Tensor, channels: int) -> torch.Tensor:
    """The input channels' second moment (channels x channels) from that of the unfolded
    patches ((channels·kh·kw) square, ordered channel-major as ``weight.reshape(T, -1)``):
    the diagonal blocks of the kernel positions, averaged."""
    k = patch_moment.shape[0] // channels
    blocks = patch_moment.reshape(channels, k, channels, k)
    return blocks.diagonal(dim1=1, dim2=3).mean(-1)


def _check_conv(conv) -> ConvGeometry:
    reason = conv_skip_reason(conv)
    if reason is not None:
        raise ValueError(f"module: cannot factorize this layer: {reason}")
    return ConvGeometry.of(conv)


def _per_group(cov, groups: int) -> list:
    """``cov`` as one matrix (or None) per group."""
    if cov is None:
        return [None] * groups
    covs = [cov] if isinstance(cov, torch.Tensor) else list(cov)
    if len(covs) != groups:
        raise ValueError(f"cov: expected {groups} matrices (one per group), got {len(covs)}")
    return covs


def _pad_to(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``t`` to ``width`` (CUR widths can differ between groups)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class _ConvFactorized(FactorizedLayer):
    """Shared plumbing of the conv layers: geometry, device/dtype handling and ``to_dense``."""

    # Subclasses name the constructor arguments that config() records and like() takes back,
    # and the sub-layer that carries the bias. (Plain class attributes, not annotations:
    # TorchScript would try to compile annotated ones.)
    config_fields = ("rank",)
    last_name = "last"

    def _init_geometry(self, geometry: ConvGeometry) -> None:
        self.geometry = geometry

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _last(self) -> nn.Conv2d:
        """The sub-layer that carries the bias (a method: TorchScript compiles properties)."""
        return getattr(self, self.last_name)

    def config(self):
        out = {"layer": type(self).__name__}
        for name in self.config_fields:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def like(cls, dense, **config):
        return cls(_check_conv(dense), **config)._placed_as(dense)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """The equivalent plain ``nn.Conv2d`` (same geometry, composed weight, same bias)."""
        ref = self._last().weight
        conv = self.geometry.dense().to(device=ref.device, dtype=ref.dtype)
        conv.weight.copy_(self.dense_weight())
        if conv.bias is not None:
            conv.bias.copy_(self._last().bias)
        return self._dense_placed(conv)

    def _finish(self, dense: nn.Conv2d, decomposition: str, options: dict, **info) -> None:
        """Copy the bias, then record the decomposition, its options and relative weight error."""
        with torch.no_grad():
            if dense.bias is not None:
                self._last().bias.copy_(dense.bias)
            W = dense.weight.detach()
            err = (W - self.dense_weight()).norm() / W.norm().clamp_min(1e-30)
        self._set_info(decomposition=decomposition, options=dict(options), rel_error=float(err),
                       **info)

    def _fill(self, module: nn.Conv2d, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.dtype))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.config_fields)
        return f"{self.geometry.describe()}, {fields}"


class SVDConv2d(_ConvFactorized):
    """Channel decomposition: kh x kw conv S->g·R (grouped), then 1x1 g·R->T (grouped)."""

    config_fields = ("rank", "decomposition")

    def __init__(self, geometry: ConvGeometry, rank: int, decomposition: str = "svd"):
        super().__init__()
        self._init_geometry(geometry)
        g = geometry.groups
        self.rank = int(rank)
        self.decomposition = decomposition
        self.first = nn.Conv2d(geometry.in_channels, g * self.rank, groups=g, bias=False,
                               **geometry.spatial())
        self.last = pointwise(g * self.rank, geometry.out_channels, groups=g, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    def dense_weight(self):
        geo, g, r = self.geometry, self.geometry.groups, self.rank
        first = self.first.weight.reshape(g, r, -1)
        last = self.last.weight.reshape(g, geo.out_per_group, r)
        return (last @ first).reshape(geo.out_channels, geo.in_per_group, *geo.kernel_size)

    @classmethod
    def from_dense(cls, conv, ranks, *, cov=None, decomposition="svd", entries=None, **options):
        """Channel SVD (``decomposition="svd"``) or CUR (``"cur"``) of each group's kernel.

        ``options`` go to :func:`rankcut.decompose.svd` or :func:`rankcut.decompose.cur`
        (``solver`` names the algorithm: ``solver="deim"``); with CUR the layer width is the
        number of columns (RX: rows) the method picked. ``cov``: the second moment of each
        group's unfolded input patches (a list, one per group; see :mod:`rankcut.calibrate`)
        for the data-aware SVD or CUR that minimises the output error. ``entries``: for the
        data-aware CUR, a weight (shaped as ``conv.weight``) whose rows and columns the layer
        keeps while fitting ``conv``'s.
        """
        rank = single_rank(ranks)
        geo = _check_conv(conv)
        if decomposition not in CHANNEL_DECOMPOSITIONS:
            raise ValueError(f"decomposition: expected one of 'svd', 'cur', got {decomposition!r}")
        covs = _per_group(cov, geo.groups)
        W = conv.weight.detach()
        dtype = decomposition_dtype(W)
        if entries is not None and decomposition != "cur":
            raise ValueError("entries: only CUR keeps a weight's own entries")
        kept = (None if entries is None else
                [channel_matrix(Eg) for _, Eg in grouped_weights(entries.detach().to(dtype),
                                                                 geo.groups)])
        pairs, errors = [], []
        for gi, Wg in grouped_weights(W.to(dtype), geo.groups):
            M = channel_matrix(Wg)
            if decomposition == "svd":
                res = solve(dec.svd, M, rank, cov=covs[gi], **options)
                pairs.append((res.A, res.B))
            else:
                res = solve(dec.cur, M, rank, cov=covs[gi],
                            entries=None if kept is None else kept[gi], **options)
                pairs.append(res.factors())
                errors.append(res.rel_error)
        info = {"data_aware": cov is not None}
        if cov is not None and len(errors) == 1:  # ||(W - W~) L|| / ||W L||, as solved
            info["output_error"] = errors[0]
        width = max(A.shape[1] for A, _ in pairs)
        layer = cls.like(conv, rank=width, decomposition=decomposition)
        first = torch.cat([_pad_to(B, width, 0) for _, B in pairs])
        last = torch.cat([_pad_to(A, width, 1) for A, _ in pairs])
        layer._fill(layer.first, first.reshape(layer.first.weight.shape))
        layer._fill(layer.last, last.reshape(layer.last.weight.shape))
        layer._finish(conv, decomposition, options, **info)
        return layer


class SpatialConv2d(_ConvFactorized):
    """Spatial SVD: kh x 1 conv S->g·R, then 1 x kw conv g·R->T (both grouped)."""

    def __init__(self, geometry: ConvGeometry, rank: int):
        super().__init__()
        self._init_geometry(geometry)
        g = geometry.groups
        self.rank = int(rank)
        self.first = nn.Conv2d(geometry.in_channels, g * self.rank, groups=g, bias=False,
                               **geometry.axis(0))
        self.last = nn.Conv2d(g * self.rank, geometry.out_channels, groups=g, bias=geometry.bias,
                              **geometry.axis(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    def dense_weight(self):
        geo, g, r = self.geometry, self.geometry.groups, self.rank
        kh, kw = geo.kernel_size
        first = self.first.weight.reshape(g, r, geo.in_per_group, kh)
        last = self.last.weight.reshape(g, geo.out_per_group, r, kw)
        W = torch.einsum("gtrj,grsi->gtsij", last, first)
        return W.reshape(geo.out_channels, geo.in_per_group, kh, kw)

    @classmethod
    def from_dense(cls, conv, ranks, *, cov=None, **options):
        """SVD of each group's kernel reshaped to (S·kh, T·kw); ``options`` go to ``svd``.
        Not data-aware: ``cov`` must be None."""
        rank = single_rank(ranks)
        if cov is not None:
            raise ValueError("cov: spatial SVD is not data-aware (use svd, tucker or cp)")
        geo = _check_conv(conv)
        kh, kw = geo.kernel_size
        W = conv.weight.detach()
        pairs = []
        for _, Wg in grouped_weights(W.to(decomposition_dtype(W)), geo.groups):
            res = solve(dec.svd, spatial_matrix(Wg), rank, **options)
            pairs.append((res.A, res.B))
        width = pairs[0][0].shape[1]
        layer = cls.like(conv, rank=width)
        first = torch.cat([A.mT.reshape(width, geo.in_per_group, kh, 1) for A, _ in pairs])
        last = torch.cat([B.reshape(width, geo.out_per_group, kw).permute(1, 0, 2)
                          .reshape(geo.out_per_group, width, 1, kw) for _, B in pairs])
        layer._fill(layer.first, first)
        layer._fill(layer.last, last)
        layer._finish(conv, "spatial_svd", options)
        return layer


class CPConv2d(_ConvFactorized):
    """CP layer: 1x1 S->g·R, depthwise spatial pass(es) on g·R channels, 1x1 g·R->T."""

    config_fields = ("rank", "form")
    last_name = "pointwise_out"

    def __init__(self, geometry: ConvGeometry, rank: int, form: str = "cp4"):
        super().__init__()
        if form not in CP_FORMS:
            raise ValueError(f"form: expected one of 'cp4', 'cp3', got {form!r}")
        self._init_geometry(geometry)
        g = geometry.groups
        self.rank = int(rank)
        self.form = form
        width = g * self.rank
        self.pointwise_in = pointwise(geometry.in_channels, width, groups=g)
        if form == "cp4":
            self.depthwise = nn.Sequential(
                nn.Conv2d(width, width, groups=width, bias=False, **geometry.axis(0)),
                nn.Conv2d(width, width, groups=width, bias=False, **geometry.axis(1)),
            )
        else:
            self.depthwise = nn.Sequential(
                nn.Conv2d(width, width, groups=width, bias=False, **geometry.spatial()))
        self.pointwise_out = pointwise(width, geometry.out_channels, groups=g, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_out(self.depthwise(self.pointwise_in(x)))

    def dense_weight(self):
        geo, g, r = self.geometry, self.geometry.groups, self.rank
        kh, kw = geo.kernel_size
        w_in = self.pointwise_in.weight.reshape(g, r, geo.in_per_group)
        w_out = self.pointwise_out.weight.reshape(g, geo.out_per_group, r)
        if self.form == "cp4":
            spatial = [self.depthwise[0].weight.reshape(g, r, kh).mT,
                       self.depthwise[1].weight.reshape(g, r, kw).mT]
        else:
            spatial = [self.depthwise[0].weight.reshape(g, r, kh * kw).mT]
        # One matmul with the Khatri-Rao product of the other factors: torch.einsum over the four
        # operands at once builds a (T, R, S, ...) intermediate, 100x slower on a 512x512 kernel.
        W = w_out @ khatri_rao([w_in.mT, *spatial]).mT
        return W.reshape(geo.out_channels, geo.in_per_group, kh, kw)

    @classmethod
    def from_dense(cls, conv, ranks, *, cov=None, form="cp4", **options):
        """CP of each group's kernel: 4-way for ``cp4``, of the (T, S, kh·kw) reshape for ``cp3``.

        ``options`` go to :func:`rankcut.decompose.cp` (solver, init, max_iter, tol, seed). The
        CP weights are spread evenly over the factors (each scaled by w^(1/N)), which keeps the
        sub-layers at comparable scales for fine-tuning. ``cov``: the second moment of each
        group's unfolded input patches (as for SVDConv2d); the CP is then fitted in the output
        norm of the input channels' second moment (the patch moment averaged over the kernel
        positions; data-aware CP, see ``rankcut.decompose.cp``'s ``cov``).

        A rank above :func:`cp_break_even` (where the layer would hold as many parameters as the
        dense one) cannot save anything; it is clamped to that rank with a warning, as SVD ranks
        are clamped to the matrix's size.
        """
        return cls.from_dense_many([conv], ranks, covs=None if cov is None else [cov],
                                   form=form, **options)[0]

    @classmethod
    def from_dense_many(cls, modules, ranks, *, covs=None, form="cp4", **options):
        """:meth:`from_dense` of each conv of ``modules`` at ``ranks`` (``covs``: one input moment
        per conv, or None): every group kernel of every conv goes to one
        :func:`rankcut.decompose.cp_many`, which runs those of a shape as one batch."""
        rank = single_rank(ranks)
        if form not in CP_FORMS:
            raise ValueError(f"form: expected one of 'cp4', 'cp3', got {form!r}")
        covs = [None] * len(modules) if covs is None else list(covs)
        jobs = []  # (conv index, kernel to decompose, its channels' moment or None), per rank
        clamped = []
        for i, (conv, cov) in enumerate(zip(modules, covs, strict=True)):
            geo = _check_conv(conv)
            most = cp_break_even(geo, form)
            if rank > most:
                warnings.warn(f"rank: CP rank {rank} gives a layer larger than the dense one; "
                              f"clamped to {most}", stacklevel=3)
            clamped.append(min(rank, most))
            kh, kw = geo.kernel_size
            W = conv.weight.detach()
            per_cov = _per_group(cov, geo.groups)
            for gi, Wg in grouped_weights(W.to(decomposition_dtype(W)), geo.groups):
                X = Wg if form == "cp4" else Wg.reshape(geo.out_per_group, geo.in_per_group,
                                                        kh * kw)
                channel = (None if per_cov[gi] is None
                           else _channel_moment(per_cov[gi], geo.in_per_group))
                jobs.append((i, X, channel))
        results: list = [None] * len(jobs)
        for r in sorted(set(clamped)):
            picked = [j for j, job in enumerate(jobs) if clamped[job[0]] == r]
            with_cov = [j for j in picked if jobs[j][2] is not None]
            for part in (with_cov, [j for j in picked if jobs[j][2] is None]):
                if not part:
                    continue
                channels = [jobs[j][2] for j in part] if part is with_cov else None
                found = solve(dec.cp_many, [jobs[j][1] for j in part], r, cov=channels,
                              **options)
                for j, res in zip(part, found, strict=True):
                    results[j] = res
        return [cls._from_cp(conv, clamped[i], form, [res for (k, _, _), res in
                                                     zip(jobs, results, strict=True) if k == i],
                             options, covs[i] is not None)
                for i, conv in enumerate(modules)]

    @classmethod
    def _from_cp(cls, conv, rank, form, results, options, data_aware):
        """The layer from each group's CP (its weights spread evenly over the factors)."""
        geo = ConvGeometry.of(conv)
        kh, kw = geo.kernel_size
        per_group = []
        for res in results:
            scale = res.weights.clamp_min(0) ** (1.0 / len(res.factors))
            per_group.append([f * scale for f in res.factors])
        layer = cls.like(conv, rank=rank, form=form)

        def stacked(mode):  # the mode's factor of every group, one row per sub-layer channel
            return torch.cat([f[mode] if mode == 0 else f[mode].mT for f in per_group])

        layer._fill(layer.pointwise_in, stacked(1)[..., None, None])
        layer._fill(layer.pointwise_out, stacked(0)[..., None, None])
        if form == "cp4":
            layer._fill(layer.depthwise[0], stacked(2).reshape(-1, 1, kh, 1))
            layer._fill(layer.depthwise[1], stacked(3).reshape(-1, 1, 1, kw))
        else:
            layer._fill(layer.depthwise[0], stacked(2).reshape(-1, 1, kh, kw))
        layer._finish(conv, "cp", options, form=form,
                      converged=all(res.converged for res in results), data_aware=data_aware)
        return layer


class TuckerConv2d(_ConvFactorized):
    """Tucker-2 layer: 1x1 S->g·R_S, kh x kw core g·R_S->g·R_T (grouped), 1x1 g·R_T->T.

    ``ranks`` are (R_T, R_S) = (output-channel rank, input-channel rank), the kernel's mode order.
    """

    config_fields = ("ranks",)

    def __init__(self, geometry: ConvGeometry, ranks: tuple[int, int]):
        super().__init__()
        self._init_geometry(geometry)
        g = geometry.groups
        self.ranks = (int(ranks[0]), int(ranks[1]))
        r_out, r_in = self.ranks
        self.first = pointwise(geometry.in_channels, g * r_in, groups=g)
        self.core = nn.Conv2d(g * r_in, g * r_out, groups=g, bias=False, **geometry.spatial())
        self.last = pointwise(g * r_out, geometry.out_channels, groups=g, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def dense_weight(self):
        geo, g = self.geometry, self.geometry.groups
        r_out, r_in = self.ranks
        first = self.first.weight.reshape(g, r_in, geo.in_per_group)
        core = self.core.weight.reshape(g, r_out, r_in, *geo.kernel_size)
        last = self.last.weight.reshape(g, geo.out_per_group, r_out)
        W = torch.einsum("gta,gabij,gbs->gtsij", last, core, first)
        return W.reshape(geo.out_channels, geo.in_per_group, *geo.kernel_size)

    @classmethod
    def from_dense(cls, conv, ranks, *, cov=None, **options):
        """Tucker-2 (modes T and S) of each group's kernel; ``options`` go to ``tucker``.

        ``ranks``: (R_T, R_S), or one int for both; each is clamped, with a warning, to what
        the kernel allows (the group's channel count, and the other mode's size times kh·kw).
        ``cov``: the second moment of each group's unfolded input patches
        (a list, one per group; see :mod:`rankcut.calibrate`) for the data-aware Tucker-2 that
        minimises the output error (the first 1x1 convolution is then the input projection B).
        """
        geo = _check_conv(conv)
        if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
            ranks = (int(ranks), int(ranks))
        try:
            ranks = tuple(operator.index(r) for r in ranks)
        except TypeError:
            raise ValueError(f"ranks: expected (R_T, R_S) or one integer, got {ranks!r}") from None
        covs = _per_group(cov, geo.groups)
        W = conv.weight.detach()
        results = [solve(dec.tucker, Wg, tuple(ranks), modes=(0, 1), cov=covs[gi], **options)
                   for gi, Wg in grouped_weights(W.to(decomposition_dtype(W)), geo.groups)]
        layer = cls.like(conv, ranks=results[0].ranks)
        layer._fill(layer.first, torch.cat([r.factors[1].mT for r in results])[..., None, None])
        layer._fill(layer.core, torch.cat([r.core for r in results]))
        layer._fill(layer.last, torch.cat([r.factors[0] for r in results])[..., None, None])
        info = {"data_aware": cov is not None}
        if cov is not None and len(results) == 1:  # ||(W - W~) L|| / ||W L||, as solved
            info["output_error"] = results[0].rel_error
        layer._finish(conv, "tucker", options, **info)
        return layer
