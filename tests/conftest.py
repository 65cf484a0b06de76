"""Shared fixtures: devices to test on, and the real data in ../shared/data (skipped if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def data_root() -> Path | None:
    """$RANKCUT_DATA, else ../shared/data beside the repository; None when neither exists."""
    env = os.environ.get("RANKCUT_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set $RANKCUT_DATA or place it at ../shared/data")
    return root


def _conv_kernels(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pytest.skip(f"pretrained weights not found at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items() if v.ndim == 4}


@pytest.fixture(scope="session")
def resnet20_kernels(shared_data) -> dict[str, torch.Tensor]:
    """The conv kernels of the pretrained CIFAR-10 ResNet-20 (akamaster), by parameter name."""
    return _conv_kernels(shared_data / "weights/resnet_cifar10_akamaster/resnet20-12fca82f.th")
