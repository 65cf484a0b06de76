"""Datasets by name read from their original files in place, and the helpers around them:
seeded train/validation splits, calibration batches, data loaders."""

from __future__ import annotations

import copy
import inspect
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import _formats

NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
SPLITS = ("train", "test")


def dataset_key(name: str) -> str:
    """The canonical spelling of a dataset name: lower case, ``-`` as ``_`` ("Fashion-MNIST" is
    "fashion_mnist"); the one place that normalises what users type."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a dataset name (e.g. 'cifar10'), got {name!r}")
    return name.lower().replace("-", "_")


def num_classes(name: str) -> int | None:
    """How many classes dataset ``name`` has (labels 0 .. n - 1), known from its format alone;
    None for an image folder (counted from its folders when read)."""
    key = dataset_key(name)
    if key in _formats.CIFAR:
        return _formats.CIFAR[key].num_classes
    if key in _formats.IDX:
        return len(_formats.IDX[key].classes)
    return None

# the folders of an image tree that hold its test split, in order of preference
TEST_FOLDERS = ("test", "val", "validation")

# torchvision's dataset classes, used only when download=True
_TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                "fashion_mnist": "FashionMNIST"}


class ImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with int64 labels (N,).

    ``ds[i]`` is ``(transform(images[i]), int(labels[i]))``, or the uint8 image itself when
    ``transform`` is None. ``classes`` names the labels when known.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable | None = None, classes: list[str] | None = None,
                 name: str | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels: expected shape ({len(images)},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.transform, self.classes, self.name = transform, classes, name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.images.shape[1:]))
        return (f"ImageDataset({self.name or 'images'}: {len(self)} images {shape}, "
                f"transform={self.transform!r})")


def _tensor_image(path: str) -> torch.Tensor:
    """An image file (any format PIL reads) as a uint8 RGB tensor (3, H, W)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Image.DecompressionBombError as err:  # not an OSError, unlike other damage
        raise ValueError(f"{path}: too large to read ({err})") from None


def _imagefolder(root, split: str, transform, download: bool, limit: int | None):
    from torchvision.datasets import ImageFolder

    if download:
        raise ValueError("imagefolder: download=True is not supported (an image tree is local)")
    if root is None:
        raise ValueError("imagefolder: root= is required (a folder of class folders, or one "
                         "holding train/ and test/ or val/)")
    tree = Path(root)
    if not tree.is_dir():
        raise FileNotFoundError(f"imagefolder: {tree} is not a directory (expected class "
                                "folders of images, or train/ and test/ or val/ holding them)")
    # a split folder holds class folders; a class that happens to be named train (CIFAR-100
    # has one) holds images
    splits = [sub for sub in ("train", *TEST_FOLDERS) if (tree / sub).is_dir()
              and any(e.is_dir() for e in (tree / sub).iterdir())]
    wanted = ("train",) if split == "train" else TEST_FOLDERS
    found = [sub for sub in splits if sub in wanted]
    if found:
        tree = tree / found[0]
    elif splits:  # a split tree lacking this split: its other split's folder is no class
        raise FileNotFoundError(f"imagefolder: {tree} has {splits[0]}/ but no "
                                f"{' or '.join(w + '/' for w in wanted)} folder for the "
                                f"{split} split")
    elif split == "train":
        warnings.warn(f"imagefolder: {tree} holds no train/ and test/ (or val/) folders: the "
                      "same images serve as the training and the test split", stacklevel=3)
    classes = None
    if found and found[0] != "train" and "train" in splits:
        # the test split numbered by the training split's classes (each ImageFolder numbers the
        # folders it finds: a class missing from one split would shift the others' labels)
        classes = sorted(e.name for e in (tree.parent / "train").iterdir() if e.is_dir())
        extra = sorted(e.name for e in tree.iterdir() if e.is_dir() and e.name not in classes)
        if extra:
            raise ValueError(f"imagefolder: {tree} has classes the training split "
                             f"({tree.parent / 'train'}) lacks: {extra}")

    # a test split may lack some of the training classes (torchvision >= 0.18 refuses that
    # unless allowed; earlier ones skip them)
    lenient = ({"allow_empty": True} if classes is not None and "allow_empty" in
               inspect.signature(ImageFolder.__init__).parameters else {})
    ds = _numbered_image_folder()(str(tree), classes, transform=transform,
                                  loader=_tensor_image, **lenient)
    if limit is not None and limit < len(ds.samples):
        # a seeded draw, in order: the samples are sorted by class (the first `limit` would be
        # a class or two)
        keep = torch.randperm(len(ds.samples), generator=_generator(0))[:limit].sort().values
        ds.samples = ds.imgs = [ds.samples[i] for i in keep.tolist()]
        ds.targets = [ds.targets[i] for i in keep.tolist()]
    return ds


_NUMBERED: list = []


def _numbered_image_folder() -> type:
    """torchvision's ImageFolder numbering its classes by a given list (None: the folders it
    holds), made on first use (torchvision is slow to import) and found again by name, so a
    dataset of it pickles into DataLoader workers that spawn (module ``__getattr__``)."""
    if not _NUMBERED:
        from torchvision.datasets import ImageFolder

        class _NumberedImageFolder(ImageFolder):
            def __init__(self, root, classes, **kwargs):
                self.given_classes = None if classes is None else list(classes)
                super().__init__(root, **kwargs)

            def find_classes(self, directory):
                if self.given_classes is None:
                    return super().find_classes(directory)
                return list(self.given_classes), {c: i for i, c in
                                                  enumerate(self.given_classes)}

        _NumberedImageFolder.__module__ = __name__
        _NumberedImageFolder.__qualname__ = "_NumberedImageFolder"
        _NUMBERED.append(_NumberedImageFolder)
    return _NUMBERED[0]


def __getattr__(name: str):
    if name == "_NumberedImageFolder":
        return _numbered_image_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _download(key: str, root: Path, split: str) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION[key])
    cls(str(root), train=split == "train", download=True)


def dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
            transform: Callable | None = None, download: bool = False,
            limit: int | None = None) -> Dataset:
    """A dataset by name, read from its original files: ``ds[i]`` is ``(image, int label)``.

    Args:
        name: "cifar10", "cifar100" (fine labels), "mnist", "fashion_mnist" or "imagefolder".
        split: "train" or "test".
        root: the data root; by default $RANKCUT_DATA, else ../shared/data (see
            :func:`find_data_root`). The files are looked for in a dataset folder under it
            ("cifar10", "mnist", "fashion_mnist", ... or torchvision's "MNIST/raw" layout) or in
            the root itself. For "imagefolder" root is the image tree (class folders, or train/
            and test/, val/ or validation/ holding them; a tree of class folders alone serves both
            splits, with a warning), read with torchvision.datasets.ImageFolder.
        transform: applied to each uint8 image tensor (C, H, W), e.g. :func:`transforms`;
            without one the dataset yields the uint8 tensors.
        download: fetch missing files with torchvision's dataset class into ``root`` (never
            otherwise); not for "imagefolder".
        limit: only the first ``limit`` examples of the split (of an image folder, whose
            files are sorted by class, a seeded random ``limit`` of them, in order).

    Formats: CIFAR-10/100 in the python version (``cifar-10-batches-py/data_batch_1..5``,
    ``test_batch``; ``cifar-100-python/train``, ``test``) or the binary version
    (``cifar-10-batches-bin/data_batch_N.bin``, ``test_batch.bin``; ``cifar-100-binary/train.bin``,
    ``test.bin``; plain or ``.gz``; a suffix such as ``test_batch_first1017.bin.gz`` is
    accepted); MNIST and Fashion-MNIST as the four idx files (``train-images-idx3-ubyte`` ...,
    plain or ``.gz``). The python version is a pickle (Python 2, read with encoding='latin1' as
    the official files require) loaded by an unpickler that refuses every object but numpy
    arrays; still, point it only at files you trust to be CIFAR batches.

    CIFAR, MNIST and Fashion-MNIST are held in memory as uint8 tensors (an
    :class:`ImageDataset`, with ``images``, ``labels`` and ``classes``); image folders are read
    file by file as uint8 RGB tensors.

    Raises:
        ValueError: an unknown name or split.
        FileNotFoundError: the files are missing; the message names those looked for and the
            formats accepted.
    """
    from . import find_data_root

    key = dataset_key(name)
    if key not in NAMES:
        raise ValueError(f"dataset: unknown name {name!r}; known: {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    check_limit(limit)
    if key == "imagefolder":
        return _imagefolder(root, split, transform, download, limit)
    if download and root is not None:  # a new folder to download into
        Path(root).mkdir(parents=True, exist_ok=True)
    base = find_data_root(root)
    if base is None:
        if download:
            raise ValueError(f"{key}: download=True needs root= (where to put the files)")
        raise FileNotFoundError(f"{key}: no data root: pass root=, set $RANKCUT_DATA or place "
                                "the data at ../shared/data")
    try:
        images, labels, classes = _read(key, base, split, limit)
    except FileNotFoundError:
        if not download:
            raise
        _download(key, base, split)
        images, labels, classes = _read(key, base, split, limit)
    return ImageDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels), transform,
                        classes, name=f"{key} {split}")


def check_limit(limit) -> None:
    """``limit`` (how many examples of a split to read) is a positive int or None."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive int or None, got {limit!r}")


def _read(key: str, root: Path, split: str, limit: int | None):
    if key in _formats.CIFAR:
        spec = _formats.CIFAR[key]
        images, labels, fmt, folder = _formats.read_cifar(spec, root, split, limit)
        return images, labels, _formats.cifar_classes(spec, fmt, folder)
    spec = _formats.IDX[key]
    images, labels = _formats.read_idx_split(spec, root, split, limit)
    return images, labels, list(spec.classes)


def with_transform(ds: Dataset, transform: Callable | None) -> Dataset:
    """A shallow copy of ``ds`` (a dataset with a ``transform`` attribute, or a Subset of one)
    that applies ``transform`` instead; the data itself is shared, not copied."""
    if isinstance(ds, Subset):
        return Subset(with_transform(ds.dataset, transform), ds.indices)
    if not hasattr(ds, "transform"):
        raise TypeError(f"{type(ds).__name__} has no transform attribute to replace")
    new = copy.copy(ds)
    new.transform = transform
    if hasattr(new, "transforms") and hasattr(new, "target_transform"):  # torchvision datasets
        from torchvision.datasets.vision import StandardTransform

        new.transforms = StandardTransform(transform, new.target_transform)
    return new


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def train_val_split(ds: Dataset, val: float | int = 0.1, seed: int = 0,
                    val_transform: Callable | None = None) -> tuple[Subset, Subset]:
    """A seeded random split of ``ds`` into (train, validation) Subsets, indices ascending.

    ``val`` is a fraction in (0, 1) or a number of examples. The same ``seed`` and length give
    the same split on every machine (torch's CPU generator). ``val_transform`` (e.g. the eval
    transform) replaces the dataset's transform on the validation part only.
    """
    n = len(ds)
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ValueError(f"val: expected a fraction in (0, 1) or a count, got {val!r}")
    if isinstance(val, float):
        if not 0 < val < 1:
            raise ValueError(f"val: a fraction must lie in (0, 1), got {val}")
        n_val = round(n * val)
    else:
        n_val = val
    if not 0 < n_val < n:
        raise ValueError(f"val: {val!r} of {n} examples leaves an empty part")
    order = torch.randperm(n, generator=_generator(seed))
    val_idx = order[:n_val].sort().values.tolist()
    train_idx = order[n_val:].sort().values.tolist()
    val_ds = ds if val_transform is None else with_transform(ds, val_transform)
    return Subset(ds, train_idx), Subset(val_ds, val_idx)


def calibration(ds: Dataset, n: int = 512, batch_size: int = 128,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` examples of ``ds`` drawn at random (seeded; all of them when ``ds`` is smaller) as
    a list of (inputs, labels) batches, ready for ``rankcut.plan(..., calib_data=...)`` and
    ``rankcut.apply(..., calib_data=...)``.

    ``ds`` must yield model inputs (give it a transform, normally the evaluation one, with the
    model's normalisation). Random transforms draw from a generator seeded with ``seed``; torch's
    global random state is left as it was.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if len(ds) == 0:
        raise ValueError("calibration: the dataset is empty")
    # batched in the drawn order: in index order a class-sorted dataset (an image tree) would
    # give each batch a class or two, and the first batches (max_batches, the damage probes'
    # first samples) the first classes only
    order = torch.randperm(len(ds), generator=_generator(seed))[:n].tolist()
    batches = []
    with torch.random.fork_rng(devices=[]):  # CPU state only; CUDA generators untouched
        torch.default_generator.manual_seed(int(seed))
        for start in range(0, len(order), batch_size):
            samples = [ds[i] for i in order[start:start + batch_size]]
            bad = next((s for s in samples if not _labelled(s)), None)
            if bad is not None:
                raise ValueError(f"ds: expected (input, class label) examples, got "
                                 f"{type(bad).__name__} {bad!r:.80}")
            raw = next((s[0] for s in samples if not isinstance(s[0], torch.Tensor)
                        or not s[0].is_floating_point()), None)
            if raw is not None:
                what = raw.dtype if isinstance(raw, torch.Tensor) else type(raw).__name__
                raise ValueError(f"calibration: the dataset yields {what} images, not model "
                                 "inputs; give it a transform (rankcut.data.transforms(..., "
                                 "normalization=<model name>))")
            sizes = sorted({tuple(s[0].shape) for s in samples})
            if len(sizes) > 1:
                raise ValueError(f"calibration: the dataset yields inputs of several sizes "
                                 f"({sizes[0]}, {sizes[1]}, ...); give it a transform that "
                                 "makes them one size (rankcut.data.transforms(..., size=...))")
            x = torch.stack([s[0] for s in samples])
            y = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long)
            batches.append((x, y))
    return batches


def _labelled(sample) -> bool:
    """Whether ``sample`` is an (input, class label) pair (a label: one integer)."""
    if not (isinstance(sample, tuple | list) and len(sample) >= 2):
        return False
    label = sample[1]
    if isinstance(label, torch.Tensor):
        return label.numel() == 1 and not label.is_floating_point()
    return isinstance(label, numbers.Integral) and not isinstance(label, bool)


def loader(ds: Dataset, batch_size: int = 128, train: bool = False, seed: int = 0,
           num_workers: int = 0, **kwargs) -> DataLoader:
    """A DataLoader over ``ds``: shuffled by a generator seeded with ``seed`` when ``train``,
    in order otherwise. Workers (``num_workers`` > 0) stay alive between epochs and are seeded
    from the same generator; with ``num_workers=0`` random transforms draw from torch's global
    generator. Further DataLoader arguments pass through."""
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", True)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, generator=_generator(seed),
                      num_workers=num_workers, **kwargs)
