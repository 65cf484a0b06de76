"""Running a model in eval mode for a while, leaving its train/eval flags as they were; and
with forward hooks attached for a while (how profiling, planning and calibration watch layers)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own training flag (so a
    frozen BatchNorm kept in eval inside a training model stays that way)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: Iterable[tuple[nn.Module, Callable]], *,
           pre: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.no_grad()`` with each ``(module, fn)`` of ``hooks``
    registered as a forward hook (a forward pre-hook with ``pre``); on exit the hooks are
    removed and the modes restored, also after an error."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn) if pre
                           else module.register_forward_hook(fn))
        with eval_mode(model), torch.no_grad():
            yield model
    finally:
        for handle in handles:
            handle.remove()
