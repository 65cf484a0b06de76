"""What every factorized layer shares: the dense geometry it replaces, and how to rebuild it.

A factorized layer is built in two steps so that saved models can be rebuilt without running any
decomposition: the constructor (``like(dense, **config)``) makes the sub-layers with the right
shapes; ``from_dense`` then fills them from a decomposition of the dense weight. ``config()``
returns the JSON-serialisable dict that ``like`` takes back (the layer type and its realised ranks).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """The options of an ``nn.Conv2d`` that a factorized replacement must honour exactly."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        return cls(conv.in_channels, conv.out_channels, _pair(conv.kernel_size),
                   _pair(conv.stride), padding, _pair(conv.dilation), conv.groups,
                   conv.bias is not None, conv.padding_mode)

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    def axis(self, axis: int) -> dict[str, Any]:
        """Conv2d options for a (kh, 1) (axis 0) or (1, kw) (axis 1) conv along one axis only.

        Splitting a 2-D convolution into a height pass and a width pass is exact for every
        padding mode: a 1-D convolution along one axis commutes with padding along the other.
        """
        def pick(pair, other):
            return (pair[0], other) if axis == 0 else (other, pair[1])

        padding = self.padding if isinstance(self.padding, str) else pick(self.padding, 0)
        return {"kernel_size": pick(self.kernel_size, 1), "stride": pick(self.stride, 1),
                "padding": padding, "dilation": pick(self.dilation, 1),
                "padding_mode": self.padding_mode}

    def spatial(self) -> dict[str, Any]:
        """Conv2d options of the original spatial convolution."""
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "padding_mode": self.padding_mode}

    def dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, bias=self.bias, groups=self.groups,
                         **self.spatial())

    def describe(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}", f"kernel_size={self.kernel_size}"]
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            parts.append(f"padding={self.padding!r}" if isinstance(self.padding, str)
                         else f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if not self.bias:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)


def own_forward_reason(module: nn.Module) -> str | None:
    """Why a subclass of nn.Conv2d or nn.Linear cannot be factorized from its weight: it
    computes with its own ``forward`` (or a conv's ``_conv_forward``): a standardised or
    fake-quantised weight, a scale, so the weight's product is not what it computes. None for
    torch's own classes, subclasses that keep torch's forward, and anything else."""
    for base, attrs in ((nn.Conv2d, ("forward", "_conv_forward")), (nn.Linear, ("forward",))):
        if isinstance(module, base):
            own = [a for a in attrs if getattr(type(module), a) is not getattr(base, a)]
            if own:
                return (f"a {type(module).__name__}, a subclass of nn.{base.__name__} with its "
                        f"own {own[0]}: its output may not be its weight's product, which a "
                        "factorization would keep")
            return None
    return None


def pointwise(in_channels: int, out_channels: int, groups: int = 1, bias: bool = False):
    """A 1x1 convolution (no padding, stride 1)."""
    return nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)


class FactorizedLayer(nn.Module):
    """Base class: ``like``/``config`` rebuild the structure, ``from_dense``/``to_dense`` convert.

    ``info`` holds what the decomposition reported (method, relative weight error, ...) when the
    layer came from ``from_dense``; it is informational and not part of the state dict. (No
    class-level annotations here or in subclasses: TorchScript would try to compile them.)
    """

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def built_ranks(self) -> tuple[int, ...]:
        """The ranks the layer has (its config's ``ranks``, or ``(rank,)``)."""
        config = self.config()
        return tuple(config["ranks"]) if "ranks" in config else (config["rank"],)

    @classmethod
    def like(cls, dense: nn.Module, **config) -> FactorizedLayer:
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        raise NotImplementedError

    def _placed_as(self, dense: nn.Module) -> FactorizedLayer:
        """This new layer on ``dense``'s device and dtype, its factors frozen when the dense
        weight was and its bias when the dense bias was (a layer the user froze stays out of
        fine-tuning; a bias trained alone stays trainable), in its train/eval mode."""
        ref = dense.weight
        self.to(device=ref.device, dtype=ref.dtype).requires_grad_(ref.requires_grad)
        bias = getattr(dense, "bias", None)
        if isinstance(bias, torch.Tensor):
            for name, p in self.named_parameters():
                if name.rpartition(".")[2] == "bias":
                    p.requires_grad_(bias.requires_grad)
        return self.train(dense.training)

    def _dense_placed(self, dense: nn.Module) -> nn.Module:
        """``to_dense``'s layer ``dense`` as this one is placed: its weight frozen when every
        factor is, its bias when the bias is, in this layer's train/eval mode."""
        named = list(self.named_parameters())
        factors = [p for n, p in named if n.rpartition(".")[2] != "bias"]
        dense.weight.requires_grad_(any(p.requires_grad for p in factors))
        biases = [p for n, p in named if n.rpartition(".")[2] == "bias"]
        if dense.bias is not None and biases:
            dense.bias.requires_grad_(biases[-1].requires_grad)
        return dense.train(self.training)

    @classmethod
    def from_dense_many(cls, modules, ranks, *, covs=None, **options) -> list[FactorizedLayer]:
        """``from_dense`` of each of ``modules`` at the same ``ranks`` (``covs``: one input
        moment per module, or None). A layer class whose solver batches (CP) overrides this."""
        covs = [None] * len(modules) if covs is None else covs
        return [cls.from_dense(m, ranks, cov=c, **options)
                for m, c in zip(modules, covs, strict=True)]

    def _copy_bias(self, bias_target: nn.Parameter | None, dense: nn.Module) -> None:
        if bias_target is not None and dense.bias is not None:
            bias_target.data.copy_(dense.bias.detach())

    def _set_info(self, **info) -> None:
        self.info = info


def grouped_weights(weight: torch.Tensor, groups: int):
    """The dense conv weight split per group: yields (group index, (T/g, S/g, kh, kw) slice)."""
    per_group = weight.shape[0] // groups
    for g in range(groups):
        yield g, weight[g * per_group:(g + 1) * per_group]


# How each factorization reshapes one group's kernel (T, S, kh, kw) into the matrix it
# truncates: channel SVD/CUR the (T, S·kh·kw) matrix, spatial SVD the (S·kh, T·kw) one, and
# Tucker-2's input mode the (S, T·kh·kw) unfolding. One place, so that planning, layers and
# reports truncate the same matrix.
def channel_matrix(block: torch.Tensor) -> torch.Tensor:
    return block.reshape(block.shape[0], -1)


def spatial_matrix(block: torch.Tensor) -> torch.Tensor:
    t, s, kh, kw = block.shape
    return block.permute(1, 2, 0, 3).reshape(s * kh, t * kw)


def input_matrix(block: torch.Tensor) -> torch.Tensor:
    return block.transpose(0, 1).reshape(block.shape[1], -1)


def weight_blocks(module: nn.Module, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """A Linear's weight, or a conv's weight split per group ((T/g, S/g, kh, kw) each),
    detached and cast to ``dtype`` when given."""
    W = module.weight.detach()
    W = W if dtype is None else W.to(dtype)
    if isinstance(module, nn.Linear):
        return [W]
    return [block for _, block in grouped_weights(W, module.groups)]


def group_matrices(module: nn.Module, shape: str = "channel",
                   dtype: torch.dtype | None = torch.float32) -> list[torch.Tensor]:
    """One matrix per group (a Linear is one group): ``shape`` "channel" (channel SVD, CUR),
    "spatial" (spatial SVD) or "input" (Tucker-2's input mode)."""
    reshape = {"channel": channel_matrix, "spatial": spatial_matrix, "input": input_matrix}
    if shape not in reshape:
        raise ValueError(f"shape: expected one of {', '.join(reshape)}, got {shape!r}")
    blocks = weight_blocks(module, dtype)
    if isinstance(module, nn.Linear):
        if shape != "channel":
            raise ValueError(f"shape: a Linear layer has only the 'channel' matrix, not {shape!r}")
        return blocks
    return [reshape[shape](b) for b in blocks]


def single_rank(ranks) -> int:
    """One rank from an integer (a NumPy or 0-d tensor integer too) or a one-element sequence
    (how plans store ranks); anything else is a ValueError."""
    if not isinstance(ranks, bool):
        try:
            return operator.index(ranks)
        except TypeError:
            pass
    if isinstance(ranks, list | tuple) and len(ranks) == 1 and not isinstance(ranks[0], bool):
        try:
            return operator.index(ranks[0])
        except TypeError:
            pass
    raise ValueError(f"ranks: expected an integer or a one-element sequence of one, got "
                     f"{ranks!r}")


def solver_kwargs(options: dict) -> dict:
    """A layer's solver options as keyword arguments of ``decompose_fn``: the layer calls the
    decomposition's algorithm ``solver`` (``method`` is the compression method's name in rankcut,
    and a decomposition's own argument name)."""
    options = dict(options)
    if "method" in options:
        raise ValueError(f"method: a layer's decomposition algorithm is chosen with 'solver' "
                         f"(e.g. solver={options['method']!r}), not 'method'")
    if "solver" in options:
        options["method"] = options.pop("solver")
    return options


def solve(decompose_fn, *args, **options):
    """``decompose_fn(*args, **options)`` with ``solver`` for the algorithm (see
    :func:`solver_kwargs`); its complaints about ``method`` are reported as ``solver``."""
    try:
        return decompose_fn(*args, **solver_kwargs(options))
    except ValueError as err:
        text = str(err)
        if text.startswith("method:") and "solver" in options:
            raise ValueError("solver:" + text[len("method:"):]) from None
        raise


def decomposition_dtype(weight: torch.Tensor) -> torch.dtype:
    """Half-precision weights are decomposed in float32 (what linear algebra needs), cast back."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
