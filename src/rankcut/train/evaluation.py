"""Top-1 / top-5 accuracy and loss of a classifier, in eval mode and without gradients."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .._modes import check_module, eval_mode, forward_on, logits_of, model_device, sum_dtype
from . import distributed as dist_util
from .batches import as_data, fetch, split_batch, to_device
from .losses import at_least_float32, check_targets


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model: nn.Module, data, *, device=None, transform=None, batch_size: int = 256,
             num_workers: int = 0, distributed: bool = False) -> dict:
    """``{"top1", "top5", "loss", "n"}`` of ``model`` on ``data``: accuracies in percent, the
    mean cross-entropy (no label smoothing), and the number of samples.

    ``data`` is a Dataset, a DataLoader, or an (inputs, targets) pair of tensors. The model runs
    in eval mode under ``torch.no_grad()``, so BatchNorm uses and keeps its running statistics;
    every module's train/eval flag is restored afterwards. ``device`` defaults to the model's;
    ``transform`` is applied to each batch of inputs after it is moved there. With fewer than
    five classes, top-5 counts the top min(5, classes).

    ``distributed=True`` (inside a torch.distributed process group; every process must call it)
    splits a Dataset across the processes and sums the counts, so each sample is seen once. A
    DataLoader is used as given: its counts are summed only if it has a DistributedSampler;
    otherwise every process evaluates all of it.
    """
    model = unwrap(check_module(model))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, IterableDataset):  # a stream: read in order, in batches
        data = DataLoader(data, batch_size=batch_size)
    data = as_data(data, "data")
    held = model_device(model, fallback=None)
    if device is None:
        device = held if held is not None else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a device name or torch.device, got {device!r}") \
            from None
    if held is not None and (held.type != device.type
                             or device.index not in (None, held.index)):
        raise ValueError(f"device: the model is on {held}, not {device}; move it there first "
                         "(model.to(device)) or leave device=None")
    if isinstance(transform, nn.Module):  # (a copy: the caller's stays where it is, for the
        transform = copy.deepcopy(transform).to(device)  # calibration batches it may also see)
    env = dist_util.DistEnv()
    # a loader is used as given: its counts are summed over the processes only when it shards
    # the data itself (a DistributedSampler); an unsharded one is read whole by every process
    shards = not isinstance(data, DataLoader) or isinstance(data.sampler, DistributedSampler)
    if (distributed and shards and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        env = dist_util.DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size())
        if (isinstance(data, DataLoader)
                and data.sampler.total_size != len(data.dataset)):  # summed: miscounted
            total, n = data.sampler.total_size, len(data.dataset)
            what = (f"pads {n} samples to {total} (a multiple of the processes), so some "
                    "would be counted twice" if total > n else
                    f"drops {n - total} of {n} samples (drop_last), so they would not be "
                    "counted")
            raise ValueError(f"data: its DistributedSampler {what}; pass the Dataset itself "
                             "(evaluate shards it without padding)")
    if isinstance(data, DataLoader):
        batches = iter(data)
    else:
        indices = list(range(env.rank, len(data), env.world_size))
        chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        batches = fetch(data, chunks, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    # loss sum, top-1 hits, top-5 hits, samples: summed on the device, read once at the end
    totals = torch.zeros(4, dtype=sum_dtype(device), device=device)
    with eval_mode(model):
        for batch in batches:
            x, y = to_device(*split_batch(batch), device)
            if transform is not None:
                x = transform(x)
            with forward_on(x, "data"):
                logits = at_least_float32(logits_of(model(x)))
            check_targets(logits, y)  # every batch: a bad label in a later one would count
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]
            totals += torch.stack([
                F.cross_entropy(logits, y, reduction="sum"), hits[:, 0].sum(),
                hits.any(dim=1).sum(), torch.tensor(float(len(y)), device=device),
            ]).to(totals.dtype)
    dist_util.all_sum(totals, env)
    loss, top1, top5, n = totals.tolist()
    if n == 0:
        raise ValueError("data: no samples to evaluate")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": int(n)}
