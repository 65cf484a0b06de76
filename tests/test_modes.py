"""rankcut._modes: the model's device, read one way everywhere."""

import pytest
import torch
from torch import nn

from rankcut._modes import model_device


def test_a_models_device_is_its_first_parameters_else_its_first_buffers_else_the_fallback():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    buffers_only = nn.BatchNorm1d(3, affine=False)  # running statistics, no parameters
    assert not list(buffers_only.parameters())
    assert model_device(buffers_only.to("meta")) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.ReLU(), torch.device("meta")) == torch.device("meta")
    assert model_device(nn.ReLU(), "meta") == torch.device("meta")


def test_available_device_names_a_device_this_machine_has_or_says_why_not():
    """The one check of a --device (the command line and the experiments): the CPU is always
    there; a garbled name and a GPU index past the machine's are refused with the reason."""
    from rankcut._modes import available_device

    assert available_device("cpu") == torch.device("cpu")
    for bad in ("gpu0", "cuda:x", ""):
        with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or mps"):
            available_device(bad)
    with pytest.raises(ValueError, match="'cuda:64' is not on this machine"):
        available_device("cuda:64")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="'mps' is not on this machine"):
            available_device("mps")
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or mps, got 'meta'"):
        available_device("meta")
