"""Input statistics of layers on calibration data, for data-aware factorization.

The second moment Σ = E[x xᵀ] of what a layer's weight multiplies: for a Linear its input
features; for a Conv2d the unfolded input patches of each group ((S/g)·kh·kw wide), padded
exactly as the layer pads (any padding mode, "same" included). Factorizing W to minimise
||(W - W~) Σ^½|| minimises the layer's output error on such data (METHODS.md §5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._modes import hooked


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that F.pad takes, from the conv's padding option."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for axis in (1, 0):  # F.pad lists the last dimension (width) first
            total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches the conv's kernel sees, (N·L, S·kh·kw), in the order of ``weight.reshape(T,
    -1)``'s columns (channel, then kernel row, then kernel column)."""
    pad = _explicit_padding(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def calibration_batches(calib_data, max_batches: int | None = None, *,
                        transform: Callable | None = None, batch_size: int = 64,
                        allow_empty: bool = False) -> Iterator:
    """The batches of ``calib_data``, at most ``max_batches``: ``(inputs, targets)`` pairs
    where it has labels, bare inputs where it has none (``transform``, if given, applied to the
    inputs). ``calib_data`` is an iterable of batches (a DataLoader, a list), a Dataset, a tensor
    of inputs or an ``(inputs, targets)`` pair of tensors (the last three cut into batches of
    ``batch_size``). Inputs with NaN or infinite values are an error naming the batch; so are
    no batches at all, unless ``allow_empty``."""
    if calib_data is None:
        raise ValueError("calib_data: expected batches of inputs or (inputs, targets), got None")
    if isinstance(max_batches, bool) or (max_batches is not None and (
            not isinstance(max_batches, int) or max_batches < 1)):
        raise ValueError(f"max_batches: expected an int >= 1 or None, got {max_batches!r}")
    if (isinstance(calib_data, tuple | list) and len(calib_data) == 2
            and all(isinstance(t, torch.Tensor) for t in calib_data)
            and calib_data[1].ndim == 1 and not calib_data[1].is_floating_point()
            and len(calib_data[0]) == len(calib_data[1])):
        x, y = calib_data
        calib_data = [(x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]
    elif isinstance(calib_data, torch.Tensor):
        calib_data = list(calib_data.split(batch_size))
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, DataLoader):
        calib_data = DataLoader(calib_data, batch_size=batch_size)
    elif not isinstance(calib_data, Iterable):
        raise ValueError(f"calib_data: expected batches of inputs or (inputs, targets), got "
                         f"a {type(calib_data).__name__}")
    count = 0
    for batch in calib_data:
        if max_batches is not None and count >= max_batches:
            return
        if isinstance(batch, tuple | list) and len(batch) >= 2:
            x, y = batch[0], batch[1]
        elif isinstance(batch, torch.Tensor):
            x, y = batch, None
        else:
            raise ValueError(f"calib_data: expected batches of inputs or (inputs, targets), "
                             f"got a {type(batch).__name__}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calib_data: batch {count}'s inputs are a {type(x).__name__}, "
                             "expected a tensor")
        if x.is_floating_point() and not bool(x.isfinite().all()):
            raise ValueError(f"calib_data: batch {count} has NaN or infinite inputs")
        x = transform(x) if transform is not None else x
        yield x if y is None else (x, y)
        count += 1
    if count == 0 and not allow_empty:
        raise ValueError("calib_data: no batches")


def input_second_moments(model: nn.Module, names: Sequence[str], batches: Iterable, *,
                         max_batches: int | None = None) -> dict[str, list[torch.Tensor]]:
    """Σ = E[x xᵀ] (float64) of each named Conv2d/Linear's input over ``batches``, one matrix
    per group. ``batches`` yields inputs, or (inputs, targets) pairs whose targets are ignored.
    The model runs in eval mode under no_grad; its mode is restored."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                rows = conv_patches(module, x).double()
                groups = module.groups
            else:
                rows = x.reshape(-1, module.in_features).double()
                groups = 1
            width = rows.shape[1] // groups
            parts = [rows[:, g * width:(g + 1) * width] for g in range(groups)]
            acc = sums.setdefault(name, [torch.zeros(width, width, dtype=torch.float64,
                                                     device=x.device) for _ in range(groups)])
            for a, p in zip(acc, parts, strict=True):
                a.addmm_(p.mT, p)
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return hook

    hooks = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise ValueError(f"names: {name!r} is a {type(module).__name__}, expected a Conv2d "
                             "or Linear")
        hooks.append((module, hook_for(name)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with hooked(model, hooks):
        for batch in calibration_batches(batches, max_batches, allow_empty=True):
            x = batch[0] if isinstance(batch, tuple) else batch
            model(x.to(device))
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"batches: layers {missing} never ran (no batches, or not on the "
                         "forward path)")
    return {n: [a / counts[n] for a in acc] for n, acc in sums.items()}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, calib_data, *, max_batches: int | None = None) -> int:
    """Recompute the running mean and variance of every BatchNorm in ``model`` (in place) from
    ``calib_data``, as the model now computes them (every other module in eval mode; the exact
    average over the batches, ``momentum=None``). Returns the number of BatchNorm layers
    re-estimated; modes and momenta are restored.

    Not applied by default: the inputs must be distributed as the training inputs were
    (augmentation included). On the pretrained CIFAR-10 ResNet-20, re-estimating on 1024
    un-augmented training images takes the *dense* model from 91.64% to 88.40% top-1, and a
    3x-compressed one below where it was (experiments/bn_reestimation.py, docs/planning.md)."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for batch in calibration_batches(calib_data, max_batches):
            x = batch[0] if isinstance(batch, tuple) else batch
            model(x.to(device))
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return len(norms)
