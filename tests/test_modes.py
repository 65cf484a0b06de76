"""rankcut._modes: the model's device, read one way everywhere."""

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
