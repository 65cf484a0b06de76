"""Where real data lives: datasets and pretrained weights read in place, never downloaded.

The data root is, in order: the argument, ``$RANKCUT_DATA``, or ``../shared/data`` seen from the
current directory (the layout of a rankcut checkout beside its shared data).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import read_state_dict

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
    candidates = [os.environ.get(ENV_VAR), *extra, Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


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
    import gzip

    import numpy as np

    folder = Path(root)
    if (folder / CIFAR10_BIN).is_dir():
        folder = folder / CIFAR10_BIN
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    stems = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = []
    for stem in stems:
        found = sorted(folder.glob(f"{stem}*.bin")) + sorted(folder.glob(f"{stem}*.bin.gz"))
        if not found:
            raise FileNotFoundError(f"{folder}: no {stem}.bin or {stem}*.bin.gz (CIFAR-10 binary "
                                    "format)")
        files.append(found[0])
    records = []
    for f in files:
        raw = f.read_bytes()
        raw = gzip.decompress(raw) if f.suffix == ".gz" else raw
        records.append(np.frombuffer(raw, np.uint8).reshape(-1, 3073))
        if limit is not None and sum(len(r) for r in records) >= limit:
            break
    data = np.concatenate(records)[:limit]
    images = torch.from_numpy(data[:, 1:].reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(data[:, 0].astype(np.int64))
