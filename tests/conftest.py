"""Shared fixtures: devices to test on, and the real data in ../shared/data (skipped if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from rankcut.data import find_data_root, load_conv_kernels
from rankcut.models import PRETRAINED

# Property tests draw the same examples on every run, so CI passes or fails on the code, not on
# the draw; HYPOTHESIS_PROFILE=explore draws new ones (run it when changing what they test).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def own_latency_cache(tmp_path_factory, monkeypatch):
    """Each test plans with an empty latency cache of its own (rankcut.select.latency.cache_dir):
    no test sees another's timings, or the machine's."""
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path_factory.mktemp("rankcut-cache")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """$RANKCUT_DATA, else ../shared/data beside the repository; the test skips without it."""
    root = find_data_root(None, REPO.parent / "shared" / "data")
    if root is None:
        pytest.skip("real data not found: set $RANKCUT_DATA or place it at ../shared/data")
    return root


@pytest.fixture(scope="session")
def resnet20_weights(shared_data) -> Path:
    """The pretrained CIFAR-10 ResNet-20 (akamaster) weights file; the test skips without it."""
    path = shared_data / PRETRAINED["resnet20_cifar"]
    if not path.is_file():
        pytest.skip(f"pretrained ResNet-20 weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def resnet20_kernels(resnet20_weights) -> dict[str, torch.Tensor]:
    """The conv kernels of the pretrained CIFAR-10 ResNet-20 (akamaster), by parameter name."""
    return load_conv_kernels(resnet20_weights)


@pytest.fixture
def fake_latency(monkeypatch):
    """``install(ms)`` makes every time the planner's latency table takes ``ms(module)``
    milliseconds (a primitive Conv2d/Linear, or a whole model: its rest time, a plan's check),
    so that tests of latency-aware planning do not depend on the machine."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    def install(ms, faults=None):
        """``faults(module)``: the page faults a pass each timing reports (else None)."""
        def fake(module, example_inputs, *, warmup=0, repeats=1, engine="eager"):
            x = example_inputs if isinstance(example_inputs, torch.Tensor) else \
                example_inputs[0]
            v = float(ms(module))
            return Latency(v, v, v, repeats, x.shape[0], torch.get_num_threads(), "cpu",
                           None if faults is None else float(faults(module)))
        def fake_pair(first, second, example_inputs, **kw):
            return fake(first, example_inputs), fake(second, example_inputs)

        monkeypatch.setattr(latency, "measure_latency", fake)
        monkeypatch.setattr(latency, "compare_latency", fake_pair)

    return install
