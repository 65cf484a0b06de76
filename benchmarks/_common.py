"""What the benchmark scripts share: how a result names the code it was measured at, the
CIFAR-10 images they evaluate and calibrate on, and an empty latency cache."""

import os
import tempfile

from rankcut._provenance import source_commit


def commit() -> str:
    """The commit of the code this benchmark runs (``rankcut._provenance.source_commit``: read
    at the first call and kept, "+dirty" with uncommitted changes)."""
    return source_commit()


def header() -> str:
    """The start of a benchmark's first line: the date, the commit, torch's version, its
    threads and the machine's architecture (what every number printed after depends on)."""
    import platform
    import time

    import torch

    return (f"{time.strftime('%Y-%m-%d')}, commit {commit()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.machine()}")


def cifar_test_and_calib(calib: int):
    """(the shared data's root, CIFAR-10 test images, their labels, the first ``calib`` training
    images); exits with the reason when the data is absent."""
    from rankcut.data import read_cifar10_bin, require_data_root

    root = require_data_root()
    images, labels = read_cifar10_bin(root, "test")
    train, _ = read_cifar10_bin(root, "train", limit=calib)
    return root, images, labels, train


def empty_latency_cache() -> str:
    """Point ``$RANKCUT_CACHE`` at a new, empty folder (returned), so the plans that follow time
    every layer afresh, as on a new machine, and never read or extend the user's own tables."""
    folder = tempfile.mkdtemp(prefix="rankcut-latency-")
    os.environ["RANKCUT_CACHE"] = folder
    return folder
