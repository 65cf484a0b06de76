"""Per-dataset transforms on uint8 image tensors: augmentation, channels, size, normalisation.

The simple steps (pad-and-crop, flip, scale-and-normalise) are small tensor operations, two to three
times faster per image than their torchvision.transforms.v2 counterparts; resizing and cropping of
arbitrary images use v2 (imported when first needed: torchvision is slow to import). Every step
also accepts a batch (N, C, H, W); a random step then draws once for the whole batch. Random draws
come from torch's global generator (seed it with ``torch.manual_seed``; DataLoader workers are
seeded by the loader).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..models import CIFAR10_STATS
from ._datasets import dataset_key

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# mean and std per channel of inputs in [0, 1], over each training set (CIFAR-10, MNIST and
# Fashion-MNIST checked against ../shared/data in tests/test_data.py; CIFAR-100 as commonly quoted)
DATASET_STATS: dict[str, Stats] = {
    "cifar10": CIFAR10_STATS,
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# (channels, side) of each dataset's images; image folders hold RGB images of any size
NATIVE: dict[str, tuple[int, int | None]] = {
    "cifar10": (3, 32), "cifar100": (3, 32), "mnist": (1, 28), "fashion_mnist": (1, 28),
    "imagefolder": (3, None),
}


class RandomPadCrop:
    """Zero-pad by ``padding`` on every side, then crop at a random offset back to the input's
    size (or to ``size`` x ``size``)."""

    def __init__(self, padding: int = 4, size: int | None = None):
        self.padding, self.size = padding, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        h, w = (self.size, self.size) if self.size is not None else x.shape[-2:]
        padded = F.pad(x, (p, p, p, p))
        if padded.shape[-2] < h or padded.shape[-1] < w:
            raise ValueError(f"RandomPadCrop: a {tuple(x.shape[-2:])} image padded by {p} is "
                             f"smaller than the crop {h}x{w}")
        i = int(torch.randint(0, padded.shape[-2] - h + 1, ()))
        j = int(torch.randint(0, padded.shape[-1] - w + 1, ()))
        return padded[..., i:i + h, j:j + w]

    def __repr__(self) -> str:
        size = "" if self.size is None else f", size={self.size}"
        return f"RandomPadCrop(padding={self.padding}{size})"


class RandomFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if float(torch.rand(())) < self.p else x

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class ToChannels:
    """Grayscale -> ``channels`` copies; RGB -> grayscale (ITU-R 601 luma) when channels is 1."""

    def __init__(self, channels: int):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.channels:
            return x
        if c == 1:
            return x.repeat_interleave(self.channels, dim=-3)
        if c == 3 and self.channels == 1:
            from torchvision.transforms.v2.functional import rgb_to_grayscale

            return rgb_to_grayscale(x, num_output_channels=1)
        raise ValueError(f"ToChannels({self.channels}): cannot convert {c} channels")

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


class ToFloat:
    """uint8 [0, 255] -> float32 [0, 1] (floats pass unscaled), then ``(x - mean) / std`` per
    channel when ``mean``/``std`` are given: ToTensor and Normalize in one step."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if (mean is None) != (std is None):
            raise ValueError("normalization: give both mean and std, or neither")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)
        if self.mean is not None:
            if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
                raise ValueError(f"normalization: mean {self.mean} and std {self.std} must have "
                                 "equal lengths and positive std")
            std_t = torch.tensor(self.std)[:, None, None]
            self._scale = 1.0 / std_t
            self._shift = torch.tensor(self.mean)[:, None, None] / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None and x.shape[-3] != len(self.mean):
            raise ValueError(f"normalization: {len(self.mean)} channel statistics for an image "
                             f"with {x.shape[-3]} channels (set channels=)")
        out = x.to(torch.float32, copy=True)  # never alias the input: the steps below are in place
        if x.dtype == torch.uint8:
            out.div_(255)
        if self.mean is None:
            return out
        # (the statistics follow the images to their device: a transform applied on a GPU)
        return out.mul_(self._scale.to(out.device)).sub_(self._shift.to(out.device))

    def __repr__(self) -> str:
        return f"ToFloat(mean={self.mean}, std={self.std})"


def resolve_normalization(normalization) -> Stats | None:
    """None, a dataset name (its statistics), a model name (the statistics its pretrained
    weights expect, :func:`rankcut.models.normalization`) or a (mean, std) pair of sequences,
    one value per channel (two numbers: one channel)."""
    if normalization is None:
        return None
    if isinstance(normalization, str):
        if dataset_key(normalization) in DATASET_STATS:
            return DATASET_STATS[dataset_key(normalization)]
        from ..models import normalization as model_normalization

        try:
            return model_normalization(normalization)
        except ValueError as e:
            raise ValueError(f"{e}; or a dataset name ({', '.join(DATASET_STATS)}) or a "
                             "(mean, std) pair") from None
    try:
        mean, std = normalization
        if isinstance(mean, numbers.Real) and isinstance(std, numbers.Real):  # one channel
            mean, std = (mean,), (std,)
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(f"normalization: expected None, a model or dataset name, or (mean, std); "
                         f"got {normalization!r}") from None


AUGMENTS = ("standard", "none", "shift")


def transforms(name: str, train: bool, normalization=None, size: int | None = None,
               channels: int | None = None,
               augment: str = "standard") -> Callable[[torch.Tensor], torch.Tensor]:
    """The standard transform of dataset ``name`` on uint8 image tensors (C, H, W) -> float32.

    Args:
        name: "cifar10", "cifar100", "mnist", "fashion_mnist" or "imagefolder".
        train: training-time augmentation. CIFAR: 4-pixel zero-padded random crop and horizontal
            flip; MNIST, Fashion-MNIST: none; image folders: RandomResizedCrop(size) and flip.
            Evaluation: none (image folders: resize to size/0.875, centre crop ``size``).
        normalization: None (inputs in [0, 1]); a model name, for the statistics its pretrained
            weights expect (``rankcut.models.normalization``: "resnet20_cifar",
            "vgg11_bn_cifar", any torchvision model); a dataset name ("cifar10", ...), for that
            training set's statistics; or a (mean, std) pair.
        size: output side length (square); default the dataset's own (32 for CIFAR, 28 for MNIST,
            224 for image folders).
        channels: 1 or 3 output channels (grayscale is repeated to 3; RGB to luma). By default the
            dataset's own, or the normalisation's number of channels when it differs (so MNIST
            normalised for a CIFAR model becomes 3-channel).
        augment: the training augmentation (with ``train`` only): "standard" (the dataset's, as
            above), "none", or "shift" (a random translation by up to 2 pixels of the native
            image, zero-padded, no flip: for digits, where a mirror image is another glyph).
    """
    from torchvision.transforms import v2

    key = dataset_key(name)
    if key not in NATIVE:
        raise ValueError(f"transforms: unknown dataset {name!r}; known: {', '.join(NATIVE)}")
    native_channels, native_size = NATIVE[key]
    stats = resolve_normalization(normalization)
    if channels is None and stats is not None and len(stats[0]) != native_channels:
        channels = len(stats[0])
    out_channels = channels if channels is not None else native_channels
    if stats is not None and len(stats[0]) == 1 and out_channels > 1:  # grey repeated: its
        stats = (stats[0] * out_channels, stats[1] * out_channels)     # statistics too
    if stats is not None and len(stats[0]) != out_channels:
        raise ValueError(f"normalization: {len(stats[0])} channel statistics for "
                         f"{out_channels}-channel images")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size: expected a positive int, got {size!r}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment: expected one of {', '.join(AUGMENTS)}, got {augment!r}")
    if key == "imagefolder" and augment == "shift":
        raise ValueError("augment: 'shift' is for the small fixed-size datasets; image folders "
                         "have 'standard' (random resized crop and flip) or 'none'")
    augmenting = train and augment != "none"
    steps: list = []
    if channels is not None and channels != native_channels:
        steps.append(ToChannels(channels))
    if key == "imagefolder":
        side = size or 224
        if augmenting:
            steps += [v2.RandomResizedCrop(side, antialias=True), RandomFlip()]
        else:
            steps += [v2.Resize(round(side / 0.875), antialias=True), v2.CenterCrop(side)]
    else:
        if augmenting and augment == "shift":
            steps.append(RandomPadCrop(2))
        elif augmenting and key in ("cifar10", "cifar100"):
            steps += [RandomPadCrop(4), RandomFlip()]
        if size is not None and size != native_size:
            steps.append(v2.Resize((size, size), antialias=True))
    steps.append(ToFloat(*(stats if stats is not None else (None, None))))
    return v2.Compose(steps)
