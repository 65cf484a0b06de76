"""Calibration inputs synthesised from a model's BatchNorm statistics
(rankcut.data.synthetic_calibration) and the command line's --synthetic-calib."""

import json

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.data import synthetic_calibration
from tests._cli import run


def tiny_bn(num_classes: int = 10) -> nn.Module:
    """Two conv/BatchNorm/ReLU blocks and a classifier whose BatchNorm statistics are those of
    "training" images far from noise (channel means -1, 0.5, 2 and standard deviations 0.3, 1,
    2, smoothed over space), as a trained model's are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    images = torch.nn.functional.avg_pool2d(torch.randn(256, 3, 18, 18), 3, stride=1) * 3
    images = images * torch.tensor([0.3, 1.0, 2.0])[:, None, None] + torch.tensor(
        [-1.0, 0.5, 2.0])[:, None, None]
    with torch.no_grad():
        for batch in images.split(64):
            model.train()(batch)
    return model.eval()


def mismatch(model: nn.Module, x: torch.Tensor) -> float:
    """Σ over BatchNorm layers of the mean squared gap between the batch's per-channel mean and
    standard deviation of the layer's input and the running ones (written out here, apart from
    the library's)."""
    gaps = []

    def hook(layer, args):
        a = args[0].double()
        mean, std = a.mean((0, 2, 3)), a.std((0, 2, 3), unbiased=False)
        gaps.append(float((mean - layer.running_mean.double()).square().mean()
                          + (std - layer.running_var.double().sqrt()).square().mean()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(gaps)


def test_inputs_take_on_the_batchnorm_statistics():
    model = tiny_bn()
    noise = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batches = synthetic_calibration(model, torch.rand(2, 3, 16, 16), n=64, steps=150)
    assert [tuple(b.shape) for b in batches] == [(64, 3, 16, 16)]
    before, after = mismatch(model, noise), mismatch(model, batches[0])
    assert before > 0.3  # the running means and standard deviations are far from noise's
    assert after < 0.01 * before, (before, after)


def test_batches_are_seeded_and_the_model_and_random_state_are_left_as_they_were():
    model = tiny_bn().train()
    model[4].eval()  # a frozen BatchNorm inside a training model stays frozen
    for p in model.parameters():
        p.grad = None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 8, 8)
    rng = torch.get_rng_state()
    kwargs = dict(n=10, steps=5, batch_size=4)
    first = synthetic_calibration(model, x, **kwargs)
    again = synthetic_calibration(model, x, **kwargs)
    other = synthetic_calibration(model, x, seed=1, **kwargs)
    assert [len(b) for b in first] == [4, 3, 3]  # nearly equal batches
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert all(not b.requires_grad for b in first)
    assert model.training and not model[4].training  # each submodule's mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_synthetic_batches_plan_and_apply_data_aware():
    model = tiny_bn()
    x = torch.rand(4, 3, 16, 16)
    calib = synthetic_calibration(model, x, n=32, steps=20)
    plan = rc.plan(model, x, method="svd", rank=4, calib_data=calib, allow_slower=True)
    assert any(lp.options.get("data_aware") for lp in plan.layers.values())
    small = rc.apply(model, plan, calib_data=calib)
    assert small(x).shape == (4, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 1}, "n: expected an int >= 2"),
    ({"steps": 1.5}, "steps: expected a positive int"),
    ({"batch_size": True}, "batch_size: expected a positive int"),
    ({"lr": float("nan")}, "lr: expected a positive number"),
    ({"seed": -1}, "seed: expected an int >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_calibration(tiny_bn(), torch.rand(1, 3, 8, 8), **kwargs)


def test_a_model_without_batchnorm_or_inputs_that_are_not_a_batch_are_refused():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="no BatchNorm layer with running statistics"):
        synthetic_calibration(plain, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="example_inputs: expected a floating-point batch"):
        synthetic_calibration(tiny_bn(), torch.ones(3, 8, 8, dtype=torch.long))
    detached = tiny_bn()
    detached.forward = lambda x: x  # its BatchNorm layers never run
    with pytest.raises(ValueError, match="no BatchNorm layer ran"):
        synthetic_calibration(detached, torch.rand(1, 3, 8, 8), steps=1)


class _KeywordBN(nn.Module):
    """A BatchNorm called with its input by keyword, on (N, C) features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0]))

    def forward(self, x):
        return self.bn(input=self.fc(x))


def test_keyword_inputs_features_and_small_last_batches():
    model = _KeywordBN().eval()
    batches = synthetic_calibration(model, torch.rand(1, 6), n=5, batch_size=4, steps=300)
    assert [len(b) for b in batches] == [3, 2]  # never a batch of one: it has no spread
    for b in batches:
        with torch.no_grad():
            h = model.fc(b)
        assert torch.allclose(h.mean(0), model.bn.running_mean, atol=0.05)
        assert torch.allclose(h.std(0, unbiased=False), model.bn.running_var.sqrt(), atol=0.05)


def test_half_precision_models_get_half_precision_inputs():
    model = tiny_bn().half()
    batches = synthetic_calibration(model, torch.rand(1, 3, 8, 8, dtype=torch.half), n=8,
                                    steps=30)
    assert batches[0].dtype == torch.half and bool(torch.isfinite(batches[0]).all())
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert mismatch(model.float(), batches[0].float()) < 0.5 * mismatch(model.float(), noise)


def test_inference_mode_is_refused_with_a_reason():
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        synthetic_calibration(tiny_bn(), torch.rand(1, 3, 8, 8), steps=1)


def test_cli_compresses_without_data_on_synthetic_inputs(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "--model", "tests.test_synthetic:tiny_bn",
                       "--input-shape", "3,16,16", "--method", "svd", "--rank", 4,
                       "--synthetic-calib", 16, "--min-params", 0, "--allow-slower",
                       "--quiet", "--out", tmp_path / "out")
    assert code == 0, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert any(lp.get("options", {}).get("data_aware") for lp in plan["layers"].values())


@pytest.mark.parametrize("extra, message", [
    (["--synthetic-calib", -1], "--synthetic-calib: expected an integer >= 0"),
    (["--synthetic-calib", 8, "--data", "cifar10"], "--synthetic-calib: for a model without data"),
    (["--synthetic-calib", 8, "--seed", -1], "--seed: expected an integer >= 0"),
])
def test_cli_refuses_bad_synthetic_calib(extra, message, capsys, tmp_path):
    code, _, err = run(capsys, "compress", "--model", "tests.test_synthetic:tiny_bn",
                       "--input-shape", "3,16,16", "--target", "macs=2x", *extra,
                       "--out", tmp_path / "out")
    assert code == 2
    assert message in err


def test_cli_says_when_the_model_has_no_batchnorm(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "--model", "tests.test_bad_inputs_cli:tiny",
                       "--input-shape", "3,16,16", "--target", "macs=2x", "--synthetic-calib",
                       8, "--allow-slower", "--out", tmp_path / "out")
    assert code == 2
    assert "--synthetic-calib: synthetic calibration: the model has no BatchNorm" in err


@pytest.mark.parametrize("extra, says", [
    ([], "give --data or --synthetic-calib 128"),
    (["--synthetic-calib", 8], None),
    (["--target", "macs=1.5x"], None),  # to 2x weight errors do well enough
])
def test_cli_says_what_helps_a_deep_target_without_data(extra, says, capsys, tmp_path):
    code, out, err = run(capsys, "compress", "--model", "tests.test_synthetic:tiny_bn",
                         "--input-shape", "3,16,16", "--target", "macs=3x", "--method", "svd",
                         "--min-params", 0, "--allow-slower", "--quiet", *extra,
                         "--out", tmp_path / "out")
    assert code == 0, err
    if says is None:
        assert "without calibration data" not in out
    else:
        assert "macs=3x without calibration data" in out and says in out
