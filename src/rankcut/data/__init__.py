"""Data: datasets read in place from their original files, transforms, splits, calibration
batches (real, or synthesised from a model's BatchNorm statistics); the data root lookup;
pretrained conv kernels. Nothing is downloaded unless asked.

    from rankcut import data
    test = data.dataset("cifar10", "test",
                        transform=data.transforms("cifar10", train=False,
                                                  normalization="resnet20_cifar"))
    train, val = data.train_val_split(data.dataset("cifar10", "train"), val=5000, seed=0,
                                      val_transform=test.transform)
    calib = data.calibration(val, n=512)   # rankcut.plan(model, ..., calib_data=calib);
                                           # never the test split you report on
    calib = data.synthetic_calibration(model, x)   # no data at all: inputs synthesised from
                                                   # the model's BatchNorm statistics

The data root is, in order: the argument, ``$RANKCUT_DATA``, or ``../shared/data`` seen from the
current directory (the layout of a rankcut checkout beside its shared data).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..models import read_state_dict
from ._datasets import (
    NAMES,
    ImageDataset,
    calibration,
    check_limit,
    dataset,
    dataset_key,
    loader,
    num_classes,
    train_val_split,
    with_transform,
)
from ._formats import CIFAR, read_cifar_binary_batch, read_idx
from ._synthetic import synthetic_calibration
from ._transforms import (
    AUGMENTS,
    DATASET_STATS,
    RandomFlip,
    RandomPadCrop,
    ToChannels,
    ToFloat,
    transforms,
)

ENV_VAR = "RANKCUT_DATA"


def find_data_root(path: str | os.PathLike | None = None, *extra: str | os.PathLike) -> Path | None:
    """The first existing directory among ``path``, $RANKCUT_DATA, ``extra`` and ../shared/data.

    Returns None when none exists; an explicit ``path`` that does not exist is an error.
    """
    if path is not None:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
        return root
    given = os.environ.get(ENV_VAR)
    if given and not Path(given).is_dir():  # a typo would read another copy of the data
        warnings.warn(f"${ENV_VAR}={given!r} is not a directory; ignored (looking further: "
                      f"{', '.join(map(str, extra))}{', ' if extra else ''}../shared/data)",
                      stacklevel=2)
    candidates = [given, *extra, Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def require_data_root(path: str | os.PathLike | None = None) -> Path:
    """:func:`find_data_root`, or, for scripts, an exit with how to give the data (no
    traceback) when there is none."""
    root = find_data_root(path)
    if root is None:
        raise SystemExit(f"needs the shared data: set ${ENV_VAR} or place it at ../shared/data")
    return root


def load_conv_kernels(weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The 4-D (conv) tensors of a checkpoint as float32, by name without a ``module.`` prefix
    (read by :func:`rankcut.models.read_state_dict`: safetensors, or torch files with
    ``weights_only=True``, never unpickling code)."""
    return {k: v.float() for k, v in read_state_dict(weights_file).items() if v.ndim == 4}


CIFAR10_BIN = "cifar10/cifar-10-batches-bin"


def read_cifar10_bin(root: str | os.PathLike, split: str = "test",
                     limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 in the binary format (``.bin`` or ``.bin.gz``): uint8 images (N, 3, 32, 32) and
    int64 labels. ``root`` is the data root (holding ``cifar10/cifar-10-batches-bin``) or that
    folder itself; ``split`` is "train" (data_batch_1..5) or "test"."""
    import numpy as np

    from ._formats import find_binary

    check_limit(limit)
    folder = Path(root)
    if (folder / CIFAR10_BIN).is_dir():
        folder = folder / CIFAR10_BIN
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    spec = CIFAR["cifar10"]
    images, labels = [], []
    for stem in spec.train if split == "train" else spec.test:
        found = find_binary(folder, stem)
        if found is None:
            raise FileNotFoundError(f"{folder}: no {stem}.bin or {stem}*.bin.gz (CIFAR-10 binary "
                                    "format)")
        left = None if limit is None else limit - sum(len(y) for y in labels)
        x, y = read_cifar_binary_batch(found, spec.label_bytes, left, spec.num_classes)
        images.append(x)
        labels.append(y)
        if limit is not None and sum(len(y) for y in labels) >= limit:
            break
    return (torch.from_numpy(np.concatenate(images).copy()),
            torch.from_numpy(np.concatenate(labels)))


__all__ = [
    "AUGMENTS",
    "CIFAR10_BIN",
    "DATASET_STATS",
    "ENV_VAR",
    "NAMES",
    "ImageDataset",
    "RandomFlip",
    "RandomPadCrop",
    "ToChannels",
    "ToFloat",
    "calibration",
    "dataset",
    "dataset_key",
    "find_data_root",
    "load_conv_kernels",
    "loader",
    "num_classes",
    "read_cifar10_bin",
    "read_idx",
    "require_data_root",
    "synthetic_calibration",
    "train_val_split",
    "transforms",
    "with_transform",
]
