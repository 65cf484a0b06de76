"""SHA-256 fingerprints of tensors and models: what the caches key their entries by, so that a hit
is the same computation, never a stale one (``rankcut.select.cache``: planning candidates;
``rankcut.train.teacher_cache``: a teacher's outputs)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._modes import eval_mode


def update(h, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s shape, dtype and values (in logical order, whatever its layout or
    device) to the hash ``h``."""
    t = tensor.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        # the array itself, not a bytes copy of it (a 25,088-wide moment is 2.5 GB)
        h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of every parameter and buffer, and of
    every parametrized tensor as it is computed (a parametrization may hold what changes it
    outside its parameters and buffers)."""
    h = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        update(h, tensor)
    # (in eval mode: a spectral norm's power iteration runs, and updates its vectors, in
    # training mode)
    with torch.no_grad(), eval_mode(model):
        for prefix, module in model.named_modules():
            if parametrize.is_parametrized(module):
                for name in module.parametrizations:
                    h.update(f"{prefix}.{name}:computed".encode())
                    update(h, getattr(module, name))
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of rankcut's own source files: what a cache kept on disk was computed by, so
    that code edited since (an upgrade, a checkout) does not reuse it."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# read when rankcut is imported, not at the first plan (hours later in an experiment that
# trains first): what this process computes must not be filed under the digest of source
# files edited since
code_digest()
