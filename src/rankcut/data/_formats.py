"""Readers of the original dataset file formats into uint8 arrays; no torchvision, no download.

CIFAR-10/100 come in two official formats: the python version (pickled dicts, read here by an
unpickler that only reconstructs numpy arrays) and the binary version (fixed-size records, plain
or gzip-compressed). MNIST and Fashion-MNIST come as idx files (plain or gzip-compressed).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _open(path: Path) -> Iterator[io.BufferedIOBase]:
    """``path`` opened for reading (gunzipped when it ends in .gz); a file cut short or damaged
    (a partial download: gzip's end-of-stream, a bad gzip header, a header shorter than its
    format's) is a ValueError naming it."""
    f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    try:
        with f:
            yield f
    except (EOFError, gzip.BadGzipFile, zlib.error, struct.error) as err:
        raise ValueError(f"{path}: truncated or damaged file ({type(err).__name__}: "
                         f"{err})") from None


def _read(path: Path, nbytes: int | None = None) -> bytes:
    with _open(path) as f:
        return f.read() if nbytes is None else _read_at_most(f, nbytes)


_CHUNK = 1 << 26


def _read_at_most(f, nbytes: int) -> bytes:
    """Up to ``nbytes`` bytes of ``f``, read in chunks: a size taken from a header or a limit
    never allocates more than the file holds."""
    parts = []
    while nbytes > 0:
        part = f.read(min(nbytes, _CHUNK))
        if not part:
            break
        parts.append(part)
        nbytes -= len(part)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# CIFAR


@dataclass(frozen=True)
class CifarSpec:
    name: str
    subdirs: tuple[str, ...]     # where under the data root the format folders may sit
    python_dir: str              # the python (pickle) version's folder
    binary_dir: str              # the binary version's folder
    train: tuple[str, ...]       # file stems of the training split
    test: tuple[str, ...]
    label_bytes: int             # leading label bytes of a binary record; the last is the label
    python_label_key: str
    num_classes: int = 10        # labels lie in 0 .. num_classes - 1


CIFAR = {
    "cifar10": CifarSpec("cifar10", ("cifar10", "cifar-10", "CIFAR10"), "cifar-10-batches-py",
                         "cifar-10-batches-bin", tuple(f"data_batch_{i}" for i in range(1, 6)),
                         ("test_batch",), 1, "labels"),
    "cifar100": CifarSpec("cifar100", ("cifar100", "cifar-100", "CIFAR100"), "cifar-100-python",
                          "cifar-100-binary", ("train",), ("test",), 2, "fine_labels", 100),
}
CIFAR_PIXELS = 3 * 32 * 32


def _find_python(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_binary(folder: Path, stem: str) -> Path | None:
    """The binary-version file of ``stem`` in ``folder`` (``stem.bin``, ``stem.bin.gz``, or
    with a suffix: ``stem_*.bin[.gz]``), or None."""
    # a stem may carry a suffix before .bin, as ../shared/data's test_batch_first1017.bin.gz
    found = sorted(folder.glob(f"{stem}.bin")) + sorted(folder.glob(f"{stem}.bin.gz"))
    found = found or sorted(folder.glob(f"{stem}_*.bin")) + sorted(folder.glob(f"{stem}_*.bin.gz"))
    return found[0] if found else None


def cifar_files(spec: CifarSpec, root: Path, split: str) -> tuple[str, list[Path]]:
    """("python" or "binary", the split's files in order), looked for in ``root``'s format
    folders (directly or under one of ``spec.subdirs``) and in ``root`` itself."""
    stems = spec.train if split == "train" else spec.test
    bases = [root / sub for sub in spec.subdirs if (root / sub).is_dir()] + [root]
    incomplete = []
    for base in bases:
        if base == root:
            _check_not_anothers_folder(spec.name, root)
        for folder, direct in ((base / spec.python_dir, False), (base / spec.binary_dir, False),
                               (base, True)):
            if not folder.is_dir():
                continue
            for fmt, find in (("python", _find_python), ("binary", find_binary)):
                if direct or folder.name == (spec.python_dir if fmt == "python"
                                             else spec.binary_dir):
                    files = [find(folder, stem) for stem in stems]
                    if all(files):
                        return fmt, files
                    if not direct:
                        incomplete += [folder / _pattern(fmt, s)
                                       for s, f in zip(stems, files, strict=True) if f is None]
    looked = ", ".join(str(b) for b in bases)
    missing = f"missing {', '.join(map(str, incomplete))}; " if incomplete else ""
    raise FileNotFoundError(
        f"{spec.name} ({split}): {missing}looked in {looked} for "
        f"{spec.python_dir}/{{{','.join(stems)}}} (python pickle version) or "
        f"{spec.binary_dir}/{{{','.join(_pattern('binary', s) for s in stems)}}} "
        "(binary version, plain or .gz)")


def _pattern(fmt: str, stem: str) -> str:
    return stem if fmt == "python" else f"{stem}[_*].bin[.gz]"


def check_labels(path: Path, labels: np.ndarray, num_classes: int, what: str) -> None:
    """Refuse labels outside 0 .. ``num_classes`` - 1: the file is not ``what`` (or damaged)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{path}: label {int(labels[i])} of record {i} is outside 0.."
                         f"{num_classes - 1} ({len(bad)} such records): not {what}, or a "
                         "damaged one")


class _ArrayUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays and builtin containers only: any other global is refused, so a
    crafted file cannot run code."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                         ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "scalar"),
                         ("numpy._core.numeric", "_frombuffer")})

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core."):  # written by numpy 1 (and Python 2) as numpy.core
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}: a CIFAR batch holds numpy arrays and "
                                         "lists only; refusing to load it")
        return super().find_class(module, name)


def read_cifar_python_batch(path: Path, label_key: str,
                            num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One file of the CIFAR python version: uint8 (N, 3, 32, 32) and int64 labels (checked to
    lie in 0 .. ``num_classes`` - 1 when that is given).

    The official files are Python-2 pickles of dicts ({'data': (N, 3072) uint8, 'labels' or
    'fine_labels': list}); they are read with ``encoding='latin1'`` by an unpickler that only
    rebuilds numpy arrays. Only read files you trust to be CIFAR batches."""
    with _open(path) as f:
        try:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        except Exception as e:  # a damaged pickle fails in any of a dozen ways
            raise ValueError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})"
                             ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (no dict inside)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: not a CIFAR python batch (keys {sorted(batch)}; expected "
                         f"'data' and {label_key!r})")
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{path}: not a CIFAR python batch ({e})") from None
    if (data.ndim != 2 or data.shape[1] != CIFAR_PIXELS or labels.ndim != 1
            or len(data) != len(labels)):
        raise ValueError(f"{path}: not a CIFAR python batch (data {data.shape}, labels "
                         f"{labels.shape})")
    if num_classes is not None:
        check_labels(path, labels, num_classes, "a CIFAR python batch")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_binary_batch(path: Path, label_bytes: int, limit: int | None = None,
                            num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One file of the CIFAR binary version (plain or .gz): records of ``label_bytes`` label
    bytes (CIFAR-100: coarse then fine; the last one is taken) and 3072 pixel bytes (the red,
    green and blue 32x32 planes, row-major). With ``num_classes``, a label outside
    0 .. ``num_classes`` - 1 is an error naming the file (random bytes of whole-record size
    are not a batch)."""
    record = label_bytes + CIFAR_PIXELS
    raw = _read(path, None if limit is None else limit * record)
    if not raw and limit != 0:  # (a copy cut off before its first byte: not an empty split)
        raise ValueError(f"{path}: the file is empty, not a CIFAR binary batch (truncated or "
                         "damaged: copy it again)")
    if len(raw) % record:
        raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte "
                         "CIFAR binary records")
    data = np.frombuffer(raw, np.uint8).reshape(-1, record)
    images = data[:, label_bytes:].reshape(-1, 3, 32, 32)
    labels = data[:, label_bytes - 1].astype(np.int64)
    if num_classes is not None:
        check_labels(path, labels, num_classes, "a CIFAR binary batch")
    return images, labels


def read_cifar(spec: CifarSpec, root: Path, split: str,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray, str, Path]:
    """uint8 images (N, 3, 32, 32) and int64 labels of one split, the format read ("python" or
    "binary") and the folder read from."""
    fmt, files = cifar_files(spec, root, split)
    images, labels, count = [], [], 0
    for f in files:
        left = None if limit is None else limit - count
        if fmt == "python":
            x, y = read_cifar_python_batch(f, spec.python_label_key, spec.num_classes)
            x, y = x[:left], y[:left]
        else:
            x, y = read_cifar_binary_batch(f, spec.label_bytes, left, spec.num_classes)
        images.append(x)
        labels.append(y)
        count += len(y)
        if limit is not None and count >= limit:
            break
    return np.concatenate(images), np.concatenate(labels), fmt, files[0].parent


def cifar_classes(spec: CifarSpec, fmt: str, folder: Path) -> list[str] | None:
    """Class names: CIFAR-10's are fixed; CIFAR-100's come from its meta file when present."""
    if spec.name == "cifar10":
        return list(CIFAR10_CLASSES)
    try:
        if fmt == "python":
            with _open(folder / "meta") as f:
                meta = _ArrayUnpickler(f, encoding="latin1").load()
            return [str(n) for n in meta["fine_label_names"]]
        return (folder / "fine_label_names.txt").read_text().split()
    except (OSError, KeyError, TypeError, pickle.UnpicklingError):
        return None


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


# ---------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """An idx file (plain or .gz) as an array: a big-endian header (two zero bytes, a type code,
    the number of dimensions, then each dimension as uint32) followed by the data. ``limit``
    reads only the first entries along dimension 0."""
    path = Path(path)
    with _open(path) as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] == 0:
            raise ValueError(f"{path}: not an idx file (header {head.hex()})")
        dtype, ndim = _IDX_TYPES[head[2]], head[3]
        dims = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = math.prod(dims)
        raw = _read_at_most(f, count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{path}: truncated idx file ({len(raw)} bytes of data, expected "
                         f"{count * dtype.itemsize} for dims {dims})")
    return np.frombuffer(raw, dtype).reshape(dims)


@dataclass(frozen=True)
class IdxSpec:
    name: str
    subdirs: tuple[str, ...]
    classes: tuple[str, ...]


IDX = {
    "mnist": IdxSpec("mnist", ("mnist", "MNIST", "MNIST/raw"), tuple(str(d) for d in range(10))),
    "fashion_mnist": IdxSpec(
        "fashion_mnist", ("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot")),
}


def idx_files(spec: IdxSpec, root: Path, split: str) -> tuple[Path, Path]:
    """(images, labels) files of a split, plain or .gz, in ``root`` (or a known subfolder)."""
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    bases = [root / sub for sub in spec.subdirs if (root / sub).is_dir()] + [root]
    for base in bases:
        if base == root:
            _check_not_anothers_folder(spec.name, root)
        found = [next((base / n for n in (s, s + ".gz") if (base / n).is_file()), None)
                 for s in stems]
        if all(found):
            return found[0], found[1]
    raise FileNotFoundError(
        f"{spec.name} ({split}): looked in {', '.join(map(str, bases))} for {stems[0]}[.gz] and "
        f"{stems[1]}[.gz] (idx format, plain or gzip-compressed)")


def read_idx_split(spec: IdxSpec, root: Path, split: str,
                   limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, 28, 28) and int64 labels of an idx dataset split."""
    image_file, label_file = idx_files(spec, root, split)
    images, labels = read_idx(image_file, limit), read_idx(label_file, limit)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected uint8 images (N, H, W), got {images.dtype} "
                         f"{images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_file}: expected {len(images)} labels, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    check_labels(label_file, labels, len(spec.classes), f"a {spec.name} idx label file")
    return images[:, None], labels


def _check_not_anothers_folder(name: str, root: Path) -> None:
    """Refuse to read ``root`` itself as dataset ``name`` when it is the folder another dataset
    lives in (``mnist/`` read as Fashion-MNIST: the same file names, other images and classes)."""
    for other in (*IDX.values(), *CIFAR.values()):
        if other.name == name:
            continue
        for sub in other.subdirs:
            parts = Path(sub).parts
            if root.parts[-len(parts):] == parts:
                raise FileNotFoundError(
                    f"{name}: {root} is {other.name}'s folder ({sub}/), not {name}'s; give the "
                    f"data root (the folder holding {name}'s folder) or {name}'s own folder")
