"""rankcut.data: the file formats (written tiny into tmp_path), errors, transforms, seeded splits,
calibration batches; and the real files in ../shared/data when present."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut import data
from rankcut.models import normalizer

RNG = np.random.default_rng(0)


def random_images(n, channels=3, side=32):
    return RNG.integers(0, 256, (n, channels, side, side), dtype=np.uint8)


def write(path, raw, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


# ---------------------------------------------------------------------------------------------
# CIFAR writers: the official layouts, a few images per file


def cifar10_python(folder, per_file=3, protocol=2):
    """cifar-10-batches-py with ``per_file`` images per batch; returns {split: (images, labels)}."""
    out = {}
    for split, stems in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        xs, ys = [], []
        for stem in stems:
            x, y = random_images(per_file), RNG.integers(0, 10, per_file).tolist()
            batch = {"batch_label": stem, "data": x.reshape(per_file, -1), "labels": y,
                     "filenames": [f"{stem}_{i}.png" for i in range(per_file)]}
            write(folder / stem, pickle.dumps(batch, protocol=protocol))
            xs.append(x)
            ys += y
        out[split] = (np.concatenate(xs), np.array(ys))
    return out


def cifar_binary_records(images, *label_columns):
    rows = [np.stack(label_columns, 1).astype(np.uint8), images.reshape(len(images), -1)]
    return np.concatenate(rows, 1).tobytes()


def cifar10_binary(folder, per_file=3, gz=False, test_name="test_batch"):
    out = {}
    for split, stems in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", [test_name])):
        xs, ys = [], []
        for stem in stems:
            x, y = random_images(per_file), RNG.integers(0, 10, per_file)
            write(folder / f"{stem}.bin", cifar_binary_records(x, y), gz)
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def check(ds, images, labels):
    assert isinstance(ds, data.ImageDataset) and len(ds) == len(labels)
    assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == images.shape[1:]
    assert torch.equal(ds.images, torch.from_numpy(images))
    assert ds.labels.tolist() == list(labels)
    x, y = ds[len(ds) - 1]
    assert torch.equal(x, torch.from_numpy(images[-1])) and y == labels[-1]
    assert type(y) is int


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_python_version(tmp_path, protocol):
    written = cifar10_python(tmp_path / "cifar10/cifar-10-batches-py", protocol=protocol)
    for split, (images, labels) in written.items():
        check(data.dataset("cifar10", split, root=tmp_path), images, labels)
    ds = data.dataset("cifar10", "train", root=tmp_path, limit=7)  # crosses into the third file
    check(ds, written["train"][0][:7], written["train"][1][:7])
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    # the format folder itself, or its parent, may be the root
    check(data.dataset("cifar10", "test", root=tmp_path / "cifar10/cifar-10-batches-py"),
          *written["test"])
    check(data.dataset("cifar10", "test", root=tmp_path / "cifar10"), *written["test"])


def test_cifar_python_written_by_numpy1_and_python2_keys(tmp_path):
    """The official files name numpy.core.multiarray (numpy 1) and have latin-1 str keys."""
    x, y = random_images(2), [3, 7]
    raw = pickle.dumps({b"data": x.reshape(2, -1), b"labels": y}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    folder = tmp_path / "cifar-10-batches-py"
    write(folder / "test_batch", raw)
    check(data.dataset("cifar10", "test", root=tmp_path), x, y)


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_cifar_python_refuses_anything_but_arrays(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    write(folder / "test_batch", pickle.dumps({"data": Evil(marker), "labels": [1]}))
    with pytest.raises(ValueError,
                       match=r"not a CIFAR python batch \(UnpicklingError: io\.open: .* refusing"):
        data.dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()
    write(folder / "test_batch", pickle.dumps({"pixels": random_images(1), "labels": [1]}))
    with pytest.raises(ValueError, match="expected 'data' and 'labels'"):
        data.dataset("cifar10", "test", root=tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_cifar10_binary_version(tmp_path, gz):
    folder = tmp_path / "cifar10/cifar-10-batches-bin"
    written = cifar10_binary(folder, gz=gz, test_name="test_batch_first3")
    for split, (images, labels) in written.items():
        check(data.dataset("cifar10", split, root=tmp_path), images, labels)
        # the older reader agrees
        x, y = data.read_cifar10_bin(tmp_path, split)
        assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == labels.tolist()
    check(data.dataset("cifar10", "train", root=folder, limit=4), written["train"][0][:4],
          written["train"][1][:4])


def test_cifar_binary_rejects_partial_records(tmp_path):
    write(tmp_path / "cifar-10-batches-bin/test_batch.bin", b"\0" * 3000)
    with pytest.raises(ValueError, match="not a whole number of 3073-byte"):
        data.dataset("cifar10", "test", root=tmp_path)


def test_cifar100_both_versions(tmp_path):
    x = {s: random_images(4) for s in ("train", "test")}
    fine = {s: RNG.integers(0, 100, 4) for s in x}
    coarse = {s: RNG.integers(0, 20, 4) for s in x}
    names = [f"class{i}" for i in range(100)]
    py = tmp_path / "py/cifar-100-python"
    for s in x:
        write(py / s, pickle.dumps({"data": x[s].reshape(4, -1), "fine_labels": fine[s].tolist(),
                                    "coarse_labels": coarse[s].tolist()}, protocol=2))
        write(tmp_path / f"bin/cifar100/cifar-100-binary/{s}.bin",
              cifar_binary_records(x[s], coarse[s], fine[s]), gz=s == "test")
    write(py / "meta", pickle.dumps({"fine_label_names": names, "coarse_label_names": []}))
    write(tmp_path / "bin/cifar100/cifar-100-binary/fine_label_names.txt",
          "\n".join(names).encode())
    for version in ("py", "bin"):
        for s in x:
            ds = data.dataset("cifar100", s, root=tmp_path / version)
            check(ds, x[s], fine[s])  # fine labels, not the coarse ones
            assert ds.classes == names


def idx_bytes(array, code=0x08):
    array = np.asarray(array)
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                        *array.shape)
    dtype = {0x08: np.uint8, 0x0C: ">i4", 0x0D: ">f4"}[code]
    return head + array.astype(dtype).tobytes()


@pytest.mark.parametrize("name, folder", [("mnist", "mnist"), ("mnist", "MNIST/raw"),
                                          ("fashion_mnist", "fashion_mnist"),
                                          ("fashion_mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets(tmp_path, name, folder, gz):
    written = {}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        images, labels = random_images(n, 1, 28)[:, 0], RNG.integers(0, 10, n)
        write(tmp_path / folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(tmp_path / folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        written[split] = images[:, None], labels
    for split, (images, labels) in written.items():
        ds = data.dataset(name, split, root=tmp_path)
        check(ds, images, labels)
        assert len(ds.classes) == 10
    check(data.dataset(name, "train", root=tmp_path, limit=2), written["train"][0][:2],
          written["train"][1][:2])


def test_read_idx_types_and_errors(tmp_path):
    values = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    path = write(tmp_path / "a.idx", idx_bytes(values, 0x0C), gz=True)
    assert np.array_equal(data.read_idx(path), values)
    assert np.array_equal(data.read_idx(path, limit=1), values[:1])
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    assert np.array_equal(data.read_idx(write(tmp_path / "f.idx", idx_bytes(floats, 0x0D))),
                          floats)
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(write(tmp_path / "bad.idx", b"\x01\x02\x08\x01" + b"\0" * 8))
    with pytest.raises(ValueError, match="truncated idx file"):
        data.read_idx(write(tmp_path / "short.idx", idx_bytes(np.zeros((4, 2)))[:-3]))
    # a partial download: the gzip stream cut short, a .gz that is no gzip, a header cut short
    whole = gzip.compress(idx_bytes(RNG.integers(0, 255, (50, 40)).astype(np.uint8)))
    for name, raw in (("cut.idx.gz", whole[:len(whole) // 2]),
                      ("plain.idx.gz", idx_bytes(values, 0x0C)),
                      ("head.idx", idx_bytes(values, 0x0C)[:7])):
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=f"{name}: truncated or damaged file"):
            data.read_idx(path)


def write_png(path, image):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0)).save(path)


def test_imagefolder_test_labels_follow_the_training_classes_and_limit_draws(tmp_path):
    """A test split lacking a training class keeps the training numbering (each split numbered
    its own folders: 'fish' was 2 in training and 1 in test); a class the training split lacks
    is refused; limit= draws across the classes (the files are sorted by class)."""
    for cls, n in (("cat", 6), ("dog", 6), ("fish", 6)):
        for i in range(n):
            write_png(tmp_path / "train" / cls / f"{i}.png", random_images(1, 3, 8)[0])
    for cls in ("cat", "fish"):
        write_png(tmp_path / "test" / cls / "0.png", random_images(1, 3, 8)[0])
    test = data.dataset("imagefolder", "test", root=tmp_path)
    assert test.classes == ["cat", "dog", "fish"] and sorted(test.targets) == [0, 2]
    drawn = data.dataset("imagefolder", "train", root=tmp_path, limit=6)
    assert len(drawn) == 6 and len(set(drawn.targets)) > 1
    assert drawn.targets == sorted(drawn.targets)  # in the tree's order
    write_png(tmp_path / "test" / "owl" / "0.png", random_images(1, 3, 8)[0])
    with pytest.raises(ValueError, match=r"classes the training split .* lacks: \['owl'\]"):
        data.dataset("imagefolder", "test", root=tmp_path)


def test_imagefolder(tmp_path):
    red = np.zeros((3, 20, 30), np.uint8)
    red[0] = 255
    write_png(tmp_path / "train/cat/a.png", red)
    write_png(tmp_path / "train/cat/b.png", random_images(1, 3, 12)[0])
    write_png(tmp_path / "train/dog/c.png", random_images(1, 1, 40)[0])  # grayscale file
    write_png(tmp_path / "val/cat/d.png", random_images(1, 3, 16)[0])
    write_png(tmp_path / "val/dog/e.png", random_images(1, 3, 16)[0])
    train = data.dataset("imagefolder", "train", root=tmp_path)
    assert train.classes == ["cat", "dog"] and len(train) == 3
    x, y = train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 20, 30) and y == 0
    assert torch.equal(x, torch.from_numpy(red))
    x, y = train[2]
    assert x.shape == (3, 40, 40) and y == 1 and torch.equal(x[0], x[2])  # gray -> RGB
    test = data.dataset("imagefolder", "test", root=tmp_path,  # "test" falls back to val/
                        transform=data.transforms("imagefolder", train=False, size=8))
    assert len(test) == 2 and [test[i][0].shape for i in range(2)] == [(3, 8, 8)] * 2
    assert test[0][0].dtype == torch.float32
    assert len(data.dataset("imagefolder", "train", root=tmp_path, limit=2)) == 2
    # a plain tree of class folders is its own split (read for training, with a warning)
    assert len(data.dataset("imagefolder", "test", root=tmp_path / "train")) == 3
    with pytest.warns(UserWarning, match="the same images serve as the training and the test"):
        assert len(data.dataset("imagefolder", "train", root=tmp_path / "train")) == 3
    # validation/ holds a test split too; a split tree lacking a split is refused, not read
    # as a tree whose classes are the other split's folders
    (tmp_path / "val").rename(tmp_path / "validation")
    assert len(data.dataset("imagefolder", "test", root=tmp_path)) == 2
    (tmp_path / "validation").rename(tmp_path / "holdout")
    with pytest.raises(FileNotFoundError, match="has train/ but no test/ or val/ or validation/"):
        data.dataset("imagefolder", "test", root=tmp_path)
    (tmp_path / "train").rename(tmp_path / "trn")
    (tmp_path / "holdout").rename(tmp_path / "test")
    with pytest.raises(FileNotFoundError, match="has test/ but no train/ folder"):
        data.dataset("imagefolder", "train", root=tmp_path)
    with pytest.raises(ValueError, match="root= is required"):
        data.dataset("imagefolder", "train")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.dataset("imagefolder", "train", root=tmp_path / "nowhere")


def test_a_class_named_train_is_a_class_and_image_folders_pickle(tmp_path):
    """A class-only tree with a class named train (CIFAR-100 has one) is read as classes, not as
    a split tree; the dataset pickles (DataLoader workers that spawn get a copy)."""
    import pickle

    for cls in ("apple", "train", "tulip"):
        write_png(tmp_path / cls / "0.png", random_images(1, 3, 8)[0])
    test = data.dataset("imagefolder", "test", root=tmp_path)
    assert test.classes == ["apple", "train", "tulip"] and len(test) == 3
    again = pickle.loads(pickle.dumps(test))
    assert again.classes == test.classes and torch.equal(again[1][0], test[1][0])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'svhn'; known: cifar10, cifar100, mnist, "
                                         "fashion_mnist, imagefolder"):
        data.dataset("svhn", root=tmp_path)
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        data.dataset("cifar10", "val", root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        data.dataset("cifar10", root=tmp_path, limit=0)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.dataset("cifar10", root=tmp_path / "nowhere")
    # a missing file: named, with the formats accepted
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/\{test_batch\} \(python "
                                                r"pickle version\) or cifar-10-batches-bin/"
                                                r"\{test_batch\[_\*\]\.bin\[\.gz\]\} \(binary"):
        data.dataset("cifar10", "test", root=tmp_path)
    folder = tmp_path / "cifar-10-batches-bin"
    write(folder / "data_batch_1.bin", cifar_binary_records(random_images(1), [0]))
    with pytest.raises(FileNotFoundError, match="missing .*cifar-10-batches-bin/data_batch_2"):
        data.dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\] and "
                                                r"t10k-labels-idx1-ubyte\[\.gz\] \(idx format"):
        data.dataset("fashion_mnist", "test", root=tmp_path)


def test_another_datasets_folder_is_not_read_as_this_one(tmp_path):
    """mnist/ holds files named as Fashion-MNIST's are: given as Fashion-MNIST's root it is
    refused, not read as clothes labelled by digits."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([7, 2])))
    assert data.dataset("mnist", "test", root=folder).labels.tolist() == [7, 2]
    assert len(data.dataset("mnist", "test", root=tmp_path)) == 2
    with pytest.raises(FileNotFoundError, match="is mnist's folder .*not fashion_mnist's"):
        data.dataset("fashion_mnist", "test", root=folder)
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(FileNotFoundError, match="is cifar10's folder"):
        data.dataset("cifar100", "test", root=tmp_path / "cifar10")


def test_no_download_unless_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:  # stands in for torchvision's: writes the python version where it would
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            cifar10_python(tmp_path / "cifar-10-batches-py", per_file=2)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(FileNotFoundError):
        data.dataset("cifar10", "test", root=tmp_path)
    assert calls == []
    ds = data.dataset("cifar10", "test", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), False, True)] and len(ds) == 2
    data.dataset("cifar10", "train", root=tmp_path, download=True)  # present: no second call
    assert len(calls) == 1
    with pytest.raises(ValueError, match="download=True is not supported"):
        data.dataset("imagefolder", root=tmp_path, download=True)


# ---------------------------------------------------------------------------------------------
# transforms


def test_eval_transforms_normalise_as_the_model_expects():
    x = torch.from_numpy(random_images(1)[0])
    t = data.transforms("cifar10", train=False, normalization="resnet20_cifar")
    assert torch.allclose(t(x), normalizer("resnet20_cifar")(x), atol=1e-6)
    mean, std = data.DATASET_STATS["cifar10"]
    expected = (x.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None,
                                                                                          None]
    assert torch.allclose(data.transforms("cifar10", False, normalization="cifar10")(x), expected,
                          atol=1e-6)
    assert torch.allclose(data.transforms("cifar10", False, normalization="vgg11_bn_cifar")(x),
                          expected, atol=1e-6)
    assert torch.allclose(data.transforms("cifar10", False, normalization=(mean, std))(x),
                          expected, atol=1e-6)
    assert torch.equal(data.transforms("cifar10", False)(x), x.float() / 255)
    batch = torch.from_numpy(random_images(5))  # eval transforms work on batches too
    assert torch.allclose(t(batch), normalizer("resnet20_cifar")(batch), atol=1e-6)
    # a float input is scaled as is and left untouched
    f = torch.rand(3, 32, 32)
    before = f.clone()
    t(f)
    assert torch.equal(f, before)


def test_cifar_train_transforms_pad_crop_and_flip():
    x = torch.from_numpy(random_images(1)[0])
    t = data.transforms("cifar10", train=True)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4)).float() / 255
    windows = {(i, j, f) for i in range(9) for j in range(9) for f in (False, True)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        y = t(x)
        assert y.shape == (3, 32, 32) and y.dtype == torch.float32
        match = [(i, j, f) for i, j, f in windows
                 if torch.equal((padded[:, i:i + 32, j:j + 32].flip(-1) if f
                                 else padded[:, i:i + 32, j:j + 32]), y)]
        assert match  # every output is a flipped or unflipped 32x32 window of the padded image
        seen.update(match)
    assert len(seen) > 50 and {f for *_, f in seen} == {False, True}


def test_shift_augment_translates_without_flipping_and_none_turns_augmentation_off():
    x = torch.from_numpy(random_images(1, 1, 28)[0])
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float() / 255
    windows = {(i, j): padded[:, i:i + 28, j:j + 28] for i in range(5) for j in range(5)}
    t = data.transforms("mnist", train=True, augment="shift")
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        y = t(x)
        match = [k for k, w in windows.items() if torch.equal(w, y)]
        assert match  # a 28x28 window of the 2-padded image, never mirrored
        seen.update(match)
    assert len(seen) > 15
    # before the resize: the shift is of the native image, the output the asked size
    assert t.transforms[0].padding == 2
    assert data.transforms("mnist", True, size=32, augment="shift")(x).shape == (1, 32, 32)
    # CIFAR's own augmentation replaced by the shift, or none at all
    c = torch.from_numpy(random_images(1)[0])
    assert "RandomFlip" not in repr(data.transforms("cifar10", True, augment="shift"))
    for name in ("cifar10", "imagefolder"):
        assert torch.equal(data.transforms(name, True, augment="none")(c),
                           data.transforms(name, False)(c))
    # evaluation transforms never augment
    assert torch.equal(data.transforms("mnist", False, augment="shift")(x), padded[:, 2:30, 2:30])


def test_grayscale_to_three_channels_and_resize():
    x = torch.from_numpy(random_images(1, 1, 28)[0])
    y = data.transforms("mnist", train=False, size=32, channels=3)(x)
    assert y.shape == (3, 32, 32) and torch.equal(y[0], y[1]) and torch.equal(y[0], y[2])
    assert data.transforms("mnist", train=True)(x).shape == (1, 28, 28)
    assert torch.allclose(data.transforms("fashion_mnist", False, normalization="fashion_mnist")(x),
                          (x.float() / 255 - 0.2860) / 0.3530, atol=1e-6)
    # normalising for a 3-channel model makes the images 3-channel on its own
    z = data.transforms("mnist", train=False, normalization="vgg11_bn_cifar", size=32)(x)
    assert z.shape == (3, 32, 32)
    assert data.transforms("cifar10", False, channels=1)(torch.from_numpy(random_images(1)[0])
                                                         ).shape == (1, 32, 32)
    assert data.transforms("cifar100", True, size=64)(
        torch.from_numpy(random_images(1)[0])).shape == (3, 64, 64)
    u = torch.from_numpy(random_images(1, 3, 50)[0])
    assert data.transforms("imagefolder", True, size=24)(u).shape == (3, 24, 24)
    assert data.transforms("imagefolder", False)(u).shape == (3, 224, 224)


def test_transform_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.transforms("svhn", train=False)
    with pytest.raises(ValueError, match="3 channel statistics for 1-channel images"):
        data.transforms("cifar10", False, normalization="cifar10", channels=1)
    with pytest.raises(ValueError, match="no normalisation known for 'nonet'.*dataset name"):
        data.transforms("cifar10", False, normalization="nonet")
    with pytest.raises(ValueError, match="expected None, a model or dataset name"):
        data.transforms("cifar10", False, normalization=0.5)
    with pytest.raises(ValueError, match="channels: expected 1 or 3"):
        data.transforms("mnist", False, channels=2)
    with pytest.raises(ValueError, match="size: expected a positive int"):
        data.transforms("mnist", False, size=0)
    # two numbers are one channel's mean and std
    x = torch.from_numpy(random_images(1, 1, 28)[0])
    assert torch.equal(data.transforms("mnist", False, normalization=(0.1307, 0.3081))(x),
                       data.transforms("mnist", False, normalization=((0.1307,), (0.3081,)))(x))
    with pytest.raises(ValueError, match="limit: expected a positive int"):
        data.read_cifar10_bin(".", "test", limit=-5)
    with pytest.raises(ValueError, match="augment: expected one of standard, none, shift"):
        data.transforms("mnist", True, augment="crop")
    with pytest.raises(ValueError, match="augment: 'shift' is for the small"):
        data.transforms("imagefolder", True, augment="shift")


# ---------------------------------------------------------------------------------------------
# splits, calibration, loaders


def tiny(n=50, transform=None):
    images = torch.from_numpy(random_images(n, 3, 8))
    return data.ImageDataset(images, torch.arange(n) % 10, transform)


def test_train_val_split_is_seeded_and_disjoint():
    ds = tiny(50)
    train, val = data.train_val_split(ds, val=0.2, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(train.indices + val.indices) == list(range(50))
    assert train.indices == sorted(train.indices)
    again = data.train_val_split(ds, val=0.2, seed=3)
    assert (again[0].indices, again[1].indices) == (train.indices, val.indices)
    assert data.train_val_split(ds, val=0.2, seed=4)[1].indices != val.indices
    # a count; this generator's order is fixed across machines: pin it
    assert data.train_val_split(ds, val=5, seed=0)[1].indices == \
        sorted(torch.randperm(50, generator=torch.Generator().manual_seed(0))[:5].tolist())
    for bad in (0, 50, 0.0, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"val: .*(leaves an empty part|must lie in \(0, "
                                             r"1\), got|or a count, got)"):
            data.train_val_split(ds, val=bad)


def test_split_with_its_own_eval_transform():
    ds = tiny(20, transform=data.transforms("cifar10", train=True))
    train, val = data.train_val_split(ds, val=4, val_transform=data.transforms("cifar10", False))
    i = val.indices[0]
    assert torch.equal(val[0][0], ds.images[i].float() / 255)  # no augmentation on val
    assert ds.transform is not val.dataset.transform and train.dataset is ds
    assert val.dataset.images is ds.images  # the data is shared, not copied


def test_calibration_batches_for_plan_and_apply():
    ds = tiny(300, transform=data.transforms("cifar10", False, normalization="cifar10"))
    state = torch.get_rng_state()
    batches = data.calibration(ds, n=200, batch_size=64, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert [len(x) for x, _ in batches] == [64, 64, 64, 8]
    assert all(x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
               for x, y in batches)
    again = data.calibration(ds, n=200, batch_size=64, seed=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches, again, strict=True))
    other = data.calibration(ds, n=200, batch_size=64, seed=2)
    assert not torch.equal(torch.cat([x for x, _ in other]), torch.cat([x for x, _ in batches]))
    assert sum(len(x) for x, _ in data.calibration(ds, n=1000)) == 300  # all of a small set
    # random transforms are seeded too
    aug = tiny(40, transform=data.transforms("cifar10", train=True))
    assert torch.equal(data.calibration(aug, n=16)[0][0], data.calibration(aug, n=16)[0][0])
    with pytest.raises(ValueError, match="yields torch.uint8 images"):
        data.calibration(tiny(10), n=4)
    # batched in the drawn order: a class-sorted dataset (an image tree) gives every batch
    # many classes, not a class or two each
    by_class = data.ImageDataset(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8),
                                 torch.arange(10).repeat_interleave(100), data.ToFloat())
    for _, y in data.calibration(by_class, n=256, batch_size=64):
        assert len(set(y.tolist())) >= 8
    mixed = [(torch.rand(3, 4, 4), 0), (torch.rand(3, 5, 5), 1)]
    with pytest.raises(ValueError, match="inputs of several sizes"):
        data.calibration(mixed, n=2)
    # usable as calib_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(576, 10)).eval()
    plan = rc.Plan({"0": rc.LayerPlan("svd", (2,), options={"data_aware": True})})
    small = rc.apply(model, plan, calib_data=batches)
    assert small[0].info["data_aware"]


def test_loader_is_seeded():
    ds = tiny(30)

    def labels(loader):
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(data.loader(ds, 8)) == ds.labels.tolist()  # eval: in order
    shuffled = labels(data.loader(ds, 8, train=True, seed=5))
    assert shuffled == labels(data.loader(ds, 8, train=True, seed=5))
    assert shuffled != ds.labels.tolist() and sorted(shuffled) == sorted(ds.labels.tolist())
    x, y = next(iter(data.loader(ds, 8)))
    assert x.shape == (8, 3, 8, 8) and y.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# the real files


@pytest.fixture(scope="module")
def cifar_test(shared_data):
    try:
        return data.dataset("cifar10", "test", root=shared_data)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_real_cifar10_test_images(cifar_test, shared_data):
    assert len(cifar_test) == 1017 and cifar_test.images.shape == (1017, 3, 32, 32)
    all_labels = np.fromfile(shared_data / "cifar10/cifar-10-batches-bin/"
                             "test_batch_labels_all10000.u8", np.uint8)
    assert cifar_test.labels.tolist() == all_labels[:1017].tolist()
    assert cifar_test.labels.bincount().tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def test_real_cifar10_training_statistics(shared_data):
    ds = data.dataset("cifar10", "train", root=shared_data, limit=10000)  # data_batch_1 only
    x = ds.images.float() / 255
    mean, std = data.DATASET_STATS["cifar10"]
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor(mean), atol=0.005)
    assert torch.allclose(x.std((0, 2, 3)), torch.tensor(std), atol=0.005)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_datasets(shared_data, name):
    try:
        train = data.dataset(name, "train", root=shared_data)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    test = data.dataset(name, "test", root=shared_data)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().sum() == 60000 and set(test.labels.tolist()) == set(range(10))
    x = train.images.float() / 255
    mean, std = data.DATASET_STATS[name]
    assert abs(x.mean() - mean[0]) < 5e-4 and abs(x.std() - std[0]) < 5e-4


def test_grey_statistics_follow_grey_images_made_three_channel():
    """docs/data_models.md's example for seed 001's VGG-11: MNIST normalised by its own (one
    channel) statistics, repeated to 3 channels at 32x32."""
    tf = data.transforms("mnist", train=True, normalization="mnist", channels=3, size=32)
    image = torch.from_numpy(random_images(1, 1, 28)[0])
    x = tf(image)
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    plain = data.transforms("mnist", train=False, normalization="mnist", size=32)(image)
    assert torch.allclose(x[0], plain[0])
