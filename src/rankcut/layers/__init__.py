"""Factorized nn.Modules that replace Linear and Conv2d layers.

Each layer has ``from_dense(module, ranks, *, cov=None, **options)`` (decompose a dense layer;
``options`` are the layer's own settings, ``form`` for CP and ``decomposition`` for SVD/CUR
layers, and the decomposition's, with ``solver`` naming its algorithm),
``to_dense()`` (the equivalent plain layer), ``config()`` and ``like(dense, **config)`` (rebuild
the structure from the dense layer and the config, without decomposing: how saved models load).
"""

from torch import nn

from .base import (
    ConvGeometry,
    FactorizedLayer,
    group_matrices,
    own_forward_reason,
    weight_blocks,
)
from .conv import (
    CPConv2d,
    SpatialConv2d,
    SVDConv2d,
    TuckerConv2d,
    conv_skip_reason,
    cp_break_even,
)
from .costs import Cost, conv_output_hw, cost_at, input_shape, layer_cost
from .linear import LowRankLinear

LAYER_TYPES: dict[str, type[FactorizedLayer]] = {
    cls.__name__: cls for cls in (LowRankLinear, SVDConv2d, SpatialConv2d, CPConv2d, TuckerConv2d)
}


def rebuild(dense: nn.Module, config: dict) -> FactorizedLayer:
    """The factorized layer described by ``config`` (from ``layer.config()``), shaped for ``dense``,
    with freshly initialised weights (load a state dict into it)."""
    config = dict(config)
    name = config.pop("layer", None)
    if name not in LAYER_TYPES:
        raise ValueError(f"config['layer']: expected one of {', '.join(sorted(LAYER_TYPES))}, "
                         f"got {name!r}")
    return LAYER_TYPES[name].like(dense, **config)


__all__ = [
    "LAYER_TYPES",
    "CPConv2d",
    "ConvGeometry",
    "Cost",
    "FactorizedLayer",
    "LowRankLinear",
    "SVDConv2d",
    "SpatialConv2d",
    "TuckerConv2d",
    "conv_output_hw",
    "conv_skip_reason",
    "cost_at",
    "cp_break_even",
    "group_matrices",
    "input_shape",
    "layer_cost",
    "own_forward_reason",
    "rebuild",
    "weight_blocks",
]
