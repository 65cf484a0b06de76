"""Where real data lives: datasets and pretrained weights read in place, never downloaded.

The data root is, in order: the argument, ``$RANKCUT_DATA``, or ``../shared/data`` seen from the
current directory (the layout of a rankcut checkout beside its shared data).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
    """The 4-D (conv) tensors of a checkpoint, by name with any ``module.`` prefix removed.

    Reads legacy ``torch.save`` files with ``weights_only=True`` (never unpickling code) and
    safetensors files; a checkpoint dict with a ``state_dict`` entry is unwrapped.
    """
    path = Path(weights_file)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    return {k.removeprefix("module."): v.float() for k, v in state.items() if v.ndim == 4}
