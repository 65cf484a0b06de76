"""Model constructors by name, and loading of pretrained weights without unpickling code.

    model = rankcut.models.create("resnet20_cifar", weights="path/to/resnet20-12fca82f.th")

Weights are read with ``torch.load(..., weights_only=True)`` (legacy checkpoints; a
``state_dict`` entry and the ``module.`` prefix of DataParallel are handled) or from
safetensors files. The CIFAR ResNets expect inputs in [0, 1] normalised with the ImageNet mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as their pretrained weights were trained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .cifar_resnet import CifarResNet

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    f"resnet{depth}_cifar": partial(CifarResNet, depth) for depth in (20, 32, 44, 56, 110)
}

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The input normalisation (mean, std per channel, inputs in [0, 1]) each model's pretrained
# weights expect.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: IMAGENET_STATS for name in REGISTRY if name.endswith("_cifar")
}


def normalizer(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (or [0, 1] float) images -> the normalised float inputs model ``name`` expects."""
    if name not in NORMALIZATION:
        raise ValueError(f"model: no normalisation known for {name!r}; known: "
                         f"{', '.join(sorted(NORMALIZATION))}")
    mean, std = (torch.tensor(v)[:, None, None] for v in NORMALIZATION[name])

    def normalize(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - mean) / std

    return normalize


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a (legacy) torch checkpoint, never unpickling
    code; a ``state_dict`` wrapper and a ``module.`` prefix are removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create(name: str, weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Build the model registered as ``name``; load ``weights`` (strictly) when given."""
    if name not in REGISTRY:
        raise ValueError(f"model: unknown name {name!r}; known: {', '.join(sorted(REGISTRY))}")
    model = REGISTRY[name](**kwargs)
    if weights is not None:
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in read_state_dict(weights).items()}
        model.load_state_dict(state, strict=True)
    return model


__all__ = ["NORMALIZATION", "REGISTRY", "CifarResNet", "create", "normalizer", "read_state_dict"]
