"""Parameters and MACs of a dense layer or of a factorized candidate, without building either.

Planners price thousands of candidate (layer, method, rank) combinations; these formulas give
the same numbers as counting the built layer (``rankcut.profile``) and as
``torch.utils.flop_counter`` (tests hold them to it). MACs are for one sample: a conv's input of
spatial size ``input_hw``, a Linear's ``rows`` input vectors (1 for a plain classifier; the
sequence length for a transformer). Bias additions are not MACs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..decompose._checks import are_counts
from .base import ConvGeometry


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)


def _axis_out(size: int, kernel: int, stride: int, padding, dilation: int) -> int:
    if padding == "same":
        return size
    pad = 0 if padding == "valid" else padding
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_hw(geo: ConvGeometry, input_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial output size of the dense convolution for an input of ``input_hw``."""
    pads = geo.padding if isinstance(geo.padding, str) else None
    return tuple(
        _axis_out(input_hw[a], geo.kernel_size[a], geo.stride[a],
                  pads if pads else geo.padding[a], geo.dilation[a])
        for a in (0, 1)
    )


def _conv_cost(geo: ConvGeometry, config: dict | None, input_hw) -> Cost:
    T, g = geo.out_channels, geo.groups
    Sg = geo.in_per_group
    kh, kw = geo.kernel_size
    bias = T if geo.bias else 0
    H, W = input_hw
    Ho, Wo = conv_output_hw(geo, input_hw)
    out_px = Ho * Wo
    if config is None:
        return Cost(T * Sg * kh * kw + bias, out_px * T * Sg * kh * kw)
    layer = config["layer"]
    if layer == "SVDConv2d":
        R = config["rank"]
        return Cost(g * R * Sg * kh * kw + T * R + bias, out_px * (g * R * Sg * kh * kw + T * R))
    if layer == "SpatialConv2d":
        R = config["rank"]
        # kh x 1 pass: height already strided, width still the input's
        return Cost(g * R * Sg * kh + T * R * kw + bias,
                    Ho * W * g * R * Sg * kh + out_px * T * R * kw)
    if layer == "CPConv2d":
        R = config["rank"]
        width = g * R
        if config.get("form", "cp4") == "cp4":
            spatial = Cost(width * (kh + kw), Ho * W * width * kh + out_px * width * kw)
        else:
            spatial = Cost(width * kh * kw, out_px * width * kh * kw)
        return Cost(width * Sg + T * R + bias, H * W * width * Sg + out_px * T * R) + spatial
    if layer == "TuckerConv2d":
        r_out, r_in = config["ranks"]
        return Cost(g * r_in * Sg + g * r_out * r_in * kh * kw + T * r_out + bias,
                    H * W * g * r_in * Sg + out_px * (g * r_out * r_in * kh * kw + T * r_out))
    raise ValueError(f"config['layer']: {layer!r} does not replace an nn.Conv2d")


def _check_config(config) -> None:
    """A factorized layer's ``config()`` (hand-made ones too): a mapping with ``layer`` and its
    rank or ranks, whole numbers >= 1."""
    if not isinstance(config, dict) or not isinstance(config.get("layer"), str):
        raise ValueError(f"config: expected a factorized layer's config() (a mapping with "
                         f"'layer', e.g. {{'layer': 'CPConv2d', 'rank': 64, 'form': 'cp4'}}), "
                         f"got {config!r}")
    tucker = config["layer"] == "TuckerConv2d"  # (ranks (R_out, R_in); every other: rank)
    ranks = config.get("ranks") if tucker else (config["rank"],) if "rank" in config else None
    if not are_counts(ranks, 2 if tucker else 1):
        raise ValueError(f"config: expected {'ranks (R_out, R_in)' if tucker else 'rank'}, "
                         f"whole numbers >= 1, got {config!r}")


def layer_cost(dense: nn.Module, config: dict | None = None, *, input_hw=None,
               rows: int = 1) -> Cost:
    """Cost of ``dense`` (``config=None``) or of its factorized replacement ``config``.

    ``config`` is what a factorized layer's ``config()`` returns (e.g. ``{"layer": "CPConv2d",
    "rank": 64, "form": "cp4"}``). Convolutions need ``input_hw``, the input's (height, width).
    """
    if config is not None:
        _check_config(config)
    if isinstance(dense, nn.Conv2d):
        if input_hw is None:
            raise ValueError("input_hw: a convolution's cost needs its input (height, width)")
        if not are_counts(input_hw, 2):
            raise ValueError(f"input_hw: expected (H, W) of the input, got {input_hw!r}")
        return _conv_cost(ConvGeometry.of(dense), config, tuple(int(v) for v in input_hw))
    if isinstance(dense, nn.Linear):
        n, m = dense.in_features, dense.out_features
        bias = m if dense.bias is not None else 0
        if config is None:
            return Cost(n * m + bias, rows * n * m)
        if config["layer"] != "LowRankLinear":
            raise ValueError(f"config['layer']: {config['layer']!r} does not replace an nn.Linear")
        R = config["rank"]
        return Cost(R * (n + m) + bias, rows * R * (n + m))
    raise ValueError(f"dense: expected an nn.Conv2d or nn.Linear, got {type(dense).__name__}")


def cost_at(dense: nn.Module, shape: tuple, config: dict | None = None) -> Cost:
    """:func:`layer_cost` of ``dense`` (or of its replacement ``config``) at ``shape``, the
    layer's recorded input: (H, W) of a Conv2d, (rows per sample,) of a Linear (see
    :func:`input_shape`)."""
    if isinstance(dense, nn.Conv2d):
        return layer_cost(dense, config, input_hw=shape)
    return layer_cost(dense, config, rows=shape[0] if shape else 1)


def input_shape(dense: nn.Module, x, batch: int) -> tuple:
    """The shape :func:`cost_at` takes, from the input ``x`` that a Conv2d or Linear ``dense``
    (or its replacement) gets in a pass of ``batch`` samples: (H, W), or the rows per sample of
    a Linear (the sequence length of a transformer, 1 for a classifier)."""
    if isinstance(dense, nn.Conv2d):
        return tuple(x.shape[-2:])
    return (max(1, x.numel() // dense.in_features // batch),)
