"""Turning the data arguments into batches: a Dataset is read through index batches this
package chooses (so the order is a function of the seed, the epoch and the position in it),
a DataLoader is used as given, and a pair of tensors is read as a TensorDataset."""

from __future__ import annotations

import numbers
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset


def as_data(data, what: str):
    """A Dataset or DataLoader; an (inputs, targets) pair of tensors becomes a TensorDataset.
    An IterableDataset (a stream: no indices to shuffle or resume at) must come in a
    DataLoader."""
    if isinstance(data, IterableDataset):
        raise ValueError(f"{what}: an IterableDataset (a stream, not indexable) cannot be "
                         "shuffled or batched by index here; pass DataLoader(data, "
                         "batch_size=...) instead")
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        _check_first_example(data, what)
        return data
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{what}: inputs and targets differ in length ({len(data[0])} and "
                             f"{len(data[1])})")
        if data[1].ndim != 1:  # (found now, not at the first step after minutes of planning)
            raise ValueError(f"{what}: expected one class index per input, targets of shape "
                             f"({len(data[1])},), got shape {tuple(data[1].shape)} (one-hot or "
                             "(N, 1) labels: take labels.argmax(1) or labels.squeeze(1))")
        return TensorDataset(data[0], data[1])
    raise ValueError(f"{what}: expected a torch Dataset, a DataLoader or an (inputs, targets) "
                     f"pair of tensors, got {type(data).__name__}")


def _check_first_example(data: Dataset, what: str) -> None:
    """Refuse a dataset whose examples' inputs batching cannot stack (PIL images: a
    torchvision dataset without a transform), naming ``what``, instead of the collate error
    of the first batch. A dataset without a length, or an empty one, is left to the reader."""
    try:
        if len(data) == 0:
            return
    except TypeError:
        return
    # (its transform may draw random numbers: the generators are left as they were, so the
    # run's draws are those it would make without this look)
    state = random.getstate(), np.random.get_state()  # noqa: NPY002 (what transforms draw from)
    with torch.random.fork_rng(devices=[]):
        try:
            example = data[0]
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])  # noqa: NPY002
    if not isinstance(example, (tuple, list)) or len(example) < 2:
        raise ValueError(f"{what}: expected (input, class label) examples, got "
                         f"{type(example).__name__}" + (
                             f" of {len(example)}" if isinstance(example, (tuple, list)) else ""))
    first, label = example[0], example[1]
    # (whole-valued floats pass, as to_device takes them; its per-batch checks do the rest)
    if not ((isinstance(label, numbers.Real) and not isinstance(label, bool)
             and float(label).is_integer())
            or (isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim == 0)):
        raise ValueError(f"{what}: expected each example's label to be a class index (an int "
                         f"or a 0-d tensor), got {type(label).__name__}"
                         + (f" of shape {tuple(label.shape)}" if hasattr(label, "shape") else "")
                         + " (one-hot labels: take their argmax)")
    if not isinstance(first, (torch.Tensor, np.ndarray, numbers.Number)):
        raise ValueError(f"{what}: its examples' inputs are {type(first).__name__} objects, "
                         "which do not batch; give the dataset a transform to tensors (e.g. "
                         "torchvision.transforms.v2.Compose([ToImage(), ToDtype(torch.float32, "
                         "scale=True)]))")


def fetch(dataset: Dataset, index_batches: Iterable[Sequence[int]], *, num_workers: int = 0,
          pin_memory: bool = False, seed: int = 0) -> Iterator:
    """The batches of ``dataset`` at ``index_batches``, collated. A TensorDataset is indexed
    directly (one gather per tensor instead of one ``__getitem__`` per sample). Workers
    (``num_workers`` > 0) are seeded from ``seed``."""
    if isinstance(dataset, TensorDataset) and num_workers == 0:
        for idx in index_batches:
            i = torch.as_tensor(list(idx), dtype=torch.long)
            yield tuple(t[i] for t in dataset.tensors)
        return
    # The loader's base seed (its workers' seeds) drawn from the global generator would shift
    # every later random draw (the per-sample augmentation, dropout): a run resumed mid-epoch,
    # which starts a loader where the uninterrupted run did not, would then train on other
    # draws. A private generator, seeded by the caller, leaves the global one alone.
    loader = DataLoader(dataset, batch_sampler=list(index_batches), num_workers=num_workers,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    yield from loader


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a collated batch (a tuple or list whose first two items they are)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}")


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A batch on ``device``, its labels as class indices (int64): a tensor of one label per
    input (float labels only with whole values; a one-hot or an (N, 1) column is refused, as
    cross-entropy would fail on it or broadcast it silently)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"a batch must be an (inputs, labels) pair of tensors, got "
                         f"({type(x).__name__}, {type(y).__name__})")
    n = x.shape[0] if x.ndim else 1
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels: expected one class index per input, a tensor of shape ({n},),"
                         f" got shape {tuple(y.shape)} (one-hot or (N, 1) labels: take "
                         "labels.argmax(1) or labels.squeeze(1))")
    if y.dtype.is_floating_point and not bool((y == y.round()).all()):
        raise ValueError("labels: expected class indices, got fractional values (soft labels "
                         "are not taken here)")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels: expected class indices, got {y.dtype}")
    non_blocking = device.type == "cuda"
    return (x.to(device, non_blocking=non_blocking),
            y.to(device, non_blocking=non_blocking).long())
