"""rankcut.train: the training loop's behaviour, the loss it optimises, evaluate, logs, freezing,
checkpoints that resume exactly (also after SIGKILL), and a short real fine-tune of ResNet-20."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rankcut as rc
from rankcut.train import (
    distillation_loss,
    evaluate,
    factorized_parameters,
    finetune,
    training_loss,
)

from .conftest import DEVICES

REPO = Path(__file__).resolve().parents[1]


# ---- small problems ----------------------------------------------------------------------
def blobs(n: int = 256, dim: int = 8, classes: int = 4, seed: int = 0):
    """Gaussian clusters (the same centers for every ``seed``, which draws the samples):
    learnable to ~100% by a small MLP in a few epochs."""
    centers = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def mlp(dim: int = 8, classes: int = 4, hidden: int = 32, bn: bool = True, dropout: float = 0.0,
        seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(dim, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def noisy(x: torch.Tensor) -> torch.Tensor:
    """A random per-batch augmentation drawing from torch, numpy and Python's generators (so an
    exact resume needs all three restored)."""
    jitter = 0.05 * torch.randn_like(x)
    shift = 0.01 * float(np.random.rand()) + 0.01 * random.random()  # noqa: NPY002
    return x + jitter + shift


def resume_problem():
    """Model, data and settings for the resume tests (shared with the killed subprocess):
    dropout, momentum, warm-up + cosine, weight decay, random augmentation, validation, and a
    kill in the middle of the second epoch."""
    x, y = blobs(96)
    kw = dict(steps=14, batch_size=16, lr=0.05, nesterov=True, warmup_steps=3,
              transform=noisy, val_transform=lambda t: t, val_data=blobs(40, seed=1),
              checkpoint_every=4, log_every=1, seed=3, progress=False)
    return mlp(dropout=0.2), (x, y), kw


def no_time(history):
    return [{k: v for k, v in e.items() if k != "time"} for e in history]


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(autouse=True)
def one_thread():
    """Same float reduction order in every process that takes part in a comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- learning -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_loss_decreases_on_a_learnable_problem(device, optimizer):
    x, y = blobs(256)
    model = mlp()
    lr = 0.05 if optimizer == "sgd" else 1e-2
    result = finetune(model, (x, y), epochs=4, batch_size=32, optimizer=optimizer, lr=lr,
                      log_every=8, val_data=blobs(128, seed=1), device=device, progress=False)
    train = [e for e in result.history if e["split"] == "train"]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert result.final["val_accuracy"] > 95
    assert result.steps == 4 * (256 // 32)
    assert next(model.parameters()).device.type == device


def test_amp_on_cpu_runs_in_bfloat16():
    x, y = blobs(64)
    seen = []
    model = mlp(bn=False)
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    finetune(model, (x, y), steps=2, batch_size=32, amp=True, device="cpu", progress=False)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model[0].weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_dataloader_is_used_as_given():
    x, y = blobs(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    sizes = []
    model = mlp(bn=False)
    model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    result = finetune(model, loader, epochs=2, lr=0.05, progress=False)
    assert result.steps == 8 and sizes == [16] * 8


# ---- the objective ------------------------------------------------------------------------
def test_distillation_loss_matches_a_hand_computation():
    s = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    t = [[2.0, 0.0, -1.0], [-0.5, 1.5, 2.5]]
    temperature = 3.0

    def softmax(row):
        e = [math.exp(v / temperature) for v in row]
        return [v / sum(e) for v in e]

    expected = 0.0
    for srow, trow in zip(s, t, strict=True):
        ps, pt = softmax(srow), softmax(trow)
        expected += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt, strict=True))
    expected = expected / len(s) * temperature**2
    got = distillation_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    same = distillation_loss(torch.tensor(s), torch.tensor(s), temperature)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def smoothed_ce_by_hand(logits: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """(1 - eps) * (-log p_y) + eps * mean_c(-log p_c), averaged over the batch."""
    logp = logits.double().log_softmax(1)
    nll = -logp[torch.arange(len(y)), y]
    uniform = -logp.mean(1)
    return float(((1 - eps) * nll + eps * uniform).mean())


def test_finetune_optimises_label_smoothed_ce_mixed_with_distillation():
    """The loss logged for step 1 (one batch holding the whole data set, the untouched model)
    is (1 - alpha) * smoothed CE + alpha * T^2 KL, computed here by hand."""
    x, y = blobs(64)
    student, teacher = mlp(bn=False, seed=1), mlp(seed=2)
    eps, alpha, temp = 0.1, 0.3, 2.0
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher.eval()(x)
    teacher.train()
    teacher_modes = []
    teacher.register_forward_hook(lambda m, i, o: teacher_modes.append(m[1].training))
    teacher_before = copy.deepcopy(teacher.state_dict())
    ce = smoothed_ce_by_hand(s_logits, y, eps)
    kd = distillation_loss(s_logits, t_logits, temp).item()
    result = finetune(student, (x, y), steps=1, batch_size=64, label_smoothing=eps,
                      teacher=teacher, kd_alpha=alpha, kd_temperature=temp, log_every=1,
                      progress=False)
    assert result.history[0]["loss"] == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    # label smoothing changes the objective
    assert ce != pytest.approx(F.cross_entropy(s_logits, y).item(), rel=1e-3)
    # the teacher ran in eval mode, was not trained, and got its mode back
    assert teacher_modes == [False] and teacher.training and teacher[1].training
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    plain = training_loss(s_logits, y, label_smoothing=eps)
    assert plain.item() == pytest.approx(ce, rel=1e-6)


def test_clip_grad_norm_bounds_the_update():
    x, y = blobs(64)
    kw = dict(steps=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0,
              lr_schedule="constant", log_every=1, progress=False)
    base = mlp(bn=False)
    free, clipped = copy.deepcopy(base), copy.deepcopy(base)
    finetune(free, (x, y), **kw)
    result = finetune(clipped, (x, y), clip_grad_norm=1e-3, **kw)

    def moved(model):
        return torch.cat([(p - q).flatten() for p, q in
                          zip(model.parameters(), base.parameters(), strict=True)]).norm().item()

    grad_norm = result.history[0]["grad_norm"]
    assert moved(free) == pytest.approx(grad_norm, rel=1e-4)  # lr 1: the step is the gradient
    assert grad_norm > 0.01
    assert moved(clipped) == pytest.approx(1e-3, rel=1e-3)


# ---- freezing and modes -------------------------------------------------------------------
def test_freeze_leaves_frozen_parameters_bit_identical():
    x, y = blobs(64)
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, (x, y), epochs=2, batch_size=16, lr=0.1, freeze=["0", "1.bias"],
             progress=False)
    for name, p in model.named_parameters():
        if name in ("0.weight", "0.bias", "1.bias"):
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name
        assert p.requires_grad  # restored afterwards
    finetune(model, (x, y), steps=1, batch_size=16, freeze=lambda n: not n.startswith("3."),
             progress=False)
    with pytest.raises(ValueError, match="matches no parameter"):
        finetune(model, (x, y), steps=1, batch_size=16, freeze="conv*", progress=False)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        finetune(model, (x, y), steps=1, batch_size=16, freeze="*", progress=False)
    assert all(p.requires_grad for p in model.parameters())  # restored after the error too


def test_freeze_factor_groups_of_factorized_layers():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    model = rc.apply(dense, rc.Plan({"2": rc.LayerPlan("tucker", (6, 6))}))
    x = torch.randn(32, 4, 8, 8)
    y = torch.arange(32) % 3
    frozen = factorized_parameters(model, ["first", "last"])
    assert frozen == ["2.first.weight", "2.last.weight", "2.last.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, (x, y), steps=3, batch_size=16, lr=0.1, freeze=frozen, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name in frozen), name
    assert factorized_parameters(model) == ["2.first.weight", "2.core.weight", "2.last.weight",
                                            "2.last.bias"]
    with pytest.raises(ValueError, match="name no child"):
        factorized_parameters(model, ["pointwise_in"])


def test_modes_during_and_after_training():
    x, y = blobs(64)
    model = mlp()
    model.eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, m[1].training)))
    finetune(model, (x, y), steps=2, batch_size=32, val_data=(x, y), eval_every=1,
             progress=False)
    # each step trains with BatchNorm in train mode; each validation runs in eval mode
    assert seen[:2] == [(True, True), (False, False)]
    assert not model.training and not model[1].training  # as the caller left them
    seen.clear()
    bn_stats = model[1].running_mean.clone()
    finetune(model, (x, y), steps=2, batch_size=32, freeze_bn_stats=True, progress=False)
    assert seen == [(True, False)] * 2 and torch.equal(model[1].running_mean, bn_stats)


# ---- evaluate -----------------------------------------------------------------------------
def test_evaluate_counts_top1_top5_and_loss_on_a_constructed_case():
    # inputs are one-hot sample indices; the linear layer's weight is the logit table
    table = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],   # label 0 ranks 1st        -> top-1 and top-5
        [1.0, 8.0, 9.0, 3.0, 4.0, 5.0],   # label 1 ranks 2nd        -> top-5 only
        [6.0, 5.0, 0.0, 3.0, 4.0, 2.0],   # label 2 ranks 6th (last) -> neither
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],   # label 1 ranks 5th        -> top-5 only
        [0.0, 0.0, 0.0, 0.0, 0.0, 7.0],   # label 5 ranks 1st        -> top-1 and top-5
    ])
    labels = torch.tensor([0, 1, 2, 1, 5])
    model = nn.Linear(5, 6, bias=False)
    with torch.no_grad():
        model.weight.copy_(table.T)
    metrics = evaluate(model, (torch.eye(5), labels), batch_size=2)
    assert metrics["n"] == 5
    assert metrics["top1"] == pytest.approx(40.0)
    assert metrics["top5"] == pytest.approx(80.0)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(table, labels).item(), rel=1e-6)
    # a transform runs on each batch of inputs
    shifted = evaluate(model, (torch.eye(5), labels), transform=lambda t: t.roll(1, dims=1))
    assert shifted["top1"] != metrics["top1"]
    # a label outside the classes in a later batch (cross-entropy's -100 "ignore" among them:
    # the loss would skip it, top-1 count it) is refused, named, not counted
    for bad, named in ((-100, "class -100"), (6, "class 6")):
        with pytest.raises(ValueError, match=f"labels: the data has {named} but the model has 6"):
            evaluate(model, (torch.eye(5), torch.tensor([0, 1, 2, 1, bad])), batch_size=2)


def test_finetune_refuses_a_loader_whose_length_overstates_its_batches():
    """len() says 4 batches, 3 come: an error, not an endless loop over the empty rest."""
    class Filtered(torch.utils.data.IterableDataset):
        def __iter__(self):
            x, y = blobs(48)
            for i in range(0, 48, 16):
                yield x[i:i + 16], y[i:i + 16]

        def __len__(self):
            return 4

    loader = torch.utils.data.DataLoader(Filtered(), batch_size=None)
    with pytest.raises(ValueError, match="yielded 3 batches in epoch 0, but its len.. says 4"):
        finetune(mlp(), loader, epochs=2, progress=False)


def test_odd_but_valid_inputs_train_and_resume():
    """NumPy numbers for the settings (kept in checkpoints, which hold plain types); a callable
    optimizer keeps its own weight decay; a tensor learning rate is logged as a number; a model
    returning (logits, extra) trains and is evaluated on its logits; an IterableDataset is
    refused by finetune (no indices) and streamed by evaluate."""
    import tempfile

    x, y = blobs(32)
    with tempfile.TemporaryDirectory() as folder:
        kw = dict(steps=4, batch_size=8, progress=False, seed=np.int64(1),
                  momentum=np.float64(0.9), checkpoint_dir=folder)
        finetune(mlp(), (x, y), callback=lambda info: info["step"] == 2, **kw)
        assert finetune(mlp(), (x, y), resume=True, **kw).steps == 4
    groups = []
    finetune(mlp(), (x, y), steps=1, batch_size=8, progress=False,
             optimizer=lambda g: groups.append(torch.optim.AdamW(g, lr=1e-3, weight_decay=0.3))
             or groups[-1])
    assert [g["weight_decay"] for g in groups[0].param_groups] == [0.3, 0.0]
    tensor_lr = finetune(mlp(), (x, y), steps=2, batch_size=8, progress=False, log_every=1,
                         optimizer=lambda g: torch.optim.AdamW(g, lr=torch.tensor(0.01)))
    lrs = [e["lr"] for e in tensor_lr.history if e["split"] == "train"]
    assert all(isinstance(v, float) for v in lrs) and lrs[0] != lrs[-1]
    json.dumps(tensor_lr.history)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, v):
            return self.net(v), v.mean()

    trained = finetune(TwoOutputs(), (x, y), steps=2, batch_size=8, progress=False)
    assert evaluate(trained.model, (x, y))["n"] == 32

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(x, y, strict=True)

    with pytest.raises(ValueError, match="IterableDataset .* pass DataLoader"):
        finetune(mlp(), Stream(), steps=1, progress=False)
    assert evaluate(mlp(), Stream(), batch_size=8)["n"] == 32


def test_distributed_evaluate_refuses_a_sampler_that_pads(tmp_path):
    """Under a process group, a loader whose DistributedSampler pads the data to a multiple of
    the processes would count the padding twice in the summed figures: refused."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    data = TensorDataset(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 0]))
    model = nn.Linear(3, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        padded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0))
        with pytest.raises(ValueError, match="pads 5 samples to 6"):
            evaluate(model, padded, distributed=True)
        dropping = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0,
                                                               drop_last=True))
        with pytest.raises(ValueError, match="drops 1 of 5 samples"):
            evaluate(model, dropping, distributed=True)
        even = DataLoader(data, sampler=DistributedSampler(data, num_replicas=1, rank=0))
        assert evaluate(model, even, distributed=True)["n"] == 5
    finally:
        dist.destroy_process_group()


def test_evaluate_leaves_batchnorm_statistics_and_modes_alone():
    """Seed 002 evaluated in train mode, so test batches leaked into BatchNorm's statistics."""
    x, y = blobs(128)
    model = mlp()
    model.train()
    with torch.no_grad():
        model(x[:32])  # some statistics to keep
    before = copy.deepcopy(model.state_dict())
    metrics = evaluate(model, (x * 5 + 3, y), batch_size=32)  # far from the running stats
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # running stats, counter
    assert model.training and model[1].training
    assert metrics["n"] == 128 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert all(p.grad is None for p in model.parameters())


# ---- logs -------------------------------------------------------------------------------------
def test_json_lines_log(tmp_path):
    x, y = blobs(96)
    log = tmp_path / "logs" / "train.jsonl"
    result = finetune(mlp(), (x, y), epochs=2, batch_size=16, log=log, log_every=4,
                      val_data=(x, y), clip_grad_norm=10.0, progress=False)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == result.history
    train = [e for e in entries if e["split"] == "train"]
    val = [e for e in entries if e["split"] == "val"]
    assert [e["step"] for e in train] == [4, 8, 12]
    assert [e["step"] for e in val] == [6, 12]  # every epoch (6 steps of 16 of 96 samples)
    for e in train:
        assert {"step", "epoch", "loss", "accuracy", "lr", "time", "grad_norm"} <= e.keys()
        assert 0 <= e["accuracy"] <= 100 and e["lr"] > 0
    for e in val:
        assert {"step", "epoch", "loss", "accuracy", "top5", "n"} <= e.keys() and e["n"] == 96
    assert result.final["val_accuracy"] == val[-1]["accuracy"]
    assert result.final["train_loss"] == train[-1]["loss"]


def test_tensorboard_is_optional(tmp_path):
    x, y = blobs(32)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="tensorboard package is not installed"):
            finetune(mlp(), (x, y), steps=2, batch_size=16, tensorboard=tmp_path / "tb",
                     progress=False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            finetune(mlp(), (x, y), steps=2, batch_size=16, tensorboard=tmp_path / "tb",
                     log_every=1, progress=False)
        assert any((tmp_path / "tb").iterdir())


# ---- checkpoints ------------------------------------------------------------------------------
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    model, data, kw = resume_problem()
    full = finetune(copy.deepcopy(model), data, **kw)

    first = copy.deepcopy(model)
    stopped = finetune(first, data, checkpoint_dir=tmp_path, log=tmp_path / "log.jsonl",
                       callback=lambda info: info["step"] == 5, **kw)
    assert stopped.steps == 5 and (tmp_path / "last.pt").is_file()
    resumed = finetune(copy.deepcopy(model), data, checkpoint_dir=tmp_path, resume=True,
                       log=tmp_path / "log.jsonl", **kw)
    assert resumed.steps == 14
    assert state_equal(resumed.model, full.model)
    assert no_time(resumed.history) == no_time(full.history)
    # a finished run resumes to the same result without training: not one step taken
    steps = []
    again = finetune(copy.deepcopy(model), data, checkpoint_dir=tmp_path, resume=True,
                     callback=lambda info: steps.append(info["step"]) is None and False, **kw)
    assert steps == [] and state_equal(again.model, full.model)


def test_the_optimizer_is_fused_and_a_checkpoint_keeps_the_implementation_built_here(
        tmp_path, monkeypatch):
    """finetune's SGD/AdamW use torch's fused kernel where the device has one: the same update
    as the default implementation (to float rounding); a checkpoint written by another
    implementation resumes with the one built here (how, not what, it computes)."""
    from rankcut.train import checkpoint as ckpt
    from rankcut.train.loop import _make_optimizer

    for kind in ("sgd", "adamw"):
        params = [nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))]
        plain_params = [nn.Parameter(params[0].detach().clone())]
        fused = _make_optimizer(kind, [{"params": params, "weight_decay": 1e-3}], 0.1, 0.9,
                                False)
        if not fused.param_groups[0].get("fused"):
            pytest.skip("this torch has no fused optimizer kernel for the CPU")
        plain = (torch.optim.SGD(plain_params, lr=0.1, momentum=0.9, weight_decay=1e-3)
                 if kind == "sgd" else torch.optim.AdamW(plain_params, lr=0.1,
                                                         weight_decay=1e-3))
        for step in range(3):
            grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(step + 1))
            params[0].grad, plain_params[0].grad = grad.clone(), grad.clone()
            fused.step()
            plain.step()
        torch.testing.assert_close(params[0], plain_params[0], rtol=1e-5, atol=1e-6)
    model, data, kw = resume_problem()
    finetune(copy.deepcopy(model), data, checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 3, **kw)
    payload = ckpt.read(tmp_path)
    for group in payload["optimizer"]["param_groups"]:
        group["fused"] = None  # as an unfused optimizer wrote it
    ckpt.write(tmp_path, payload)
    seen = []
    step = torch.optim.SGD.step

    def watch(self, *args, **kwargs):
        seen.append(self.param_groups[0]["fused"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", watch)
    finetune(copy.deepcopy(model), data, checkpoint_dir=tmp_path, resume=True, **kw)
    assert seen and all(seen)


class Jittered(torch.utils.data.Dataset):
    """Per-sample random augmentation from torch's global generator (as image datasets with
    crop and flip transforms do), read through a DataLoader by finetune."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.rand(self.x[i].shape), self.y[i]


def test_resume_mid_epoch_reads_the_same_augmented_batches(tmp_path):
    """A run stopped in the middle of an epoch and resumed ends as an uninterrupted one, with a
    per-sample augmenting Dataset (starting the resumed epoch's loader must not draw from the
    global generator the augmentation draws from)."""
    x, y = blobs(96)
    kw = dict(steps=10, batch_size=16, lr=0.05, seed=3, progress=False, checkpoint_every=2)
    model = mlp()
    full = finetune(copy.deepcopy(model), Jittered(x, y), **kw)
    finetune(copy.deepcopy(model), Jittered(x, y), checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 3, **kw)
    resumed = finetune(copy.deepcopy(model), Jittered(x, y), checkpoint_dir=tmp_path,
                       resume=True, **kw)
    assert resumed.steps == 10 and state_equal(resumed.model, full.model)


def test_a_shuffling_dataloader_resumed_mid_epoch_reads_the_same_batches(tmp_path):
    """A DataLoader passed as given, shuffling with no generator of its own and augmenting in
    its dataset: resumed mid-epoch, it draws the same order and augmentation as the
    uninterrupted run (its order rebuilt from the generators' state as the epoch began)."""
    x, y = blobs(96)
    kw = dict(steps=10, lr=0.05, seed=3, progress=False, checkpoint_every=2)
    model = mlp()

    def loader():
        return torch.utils.data.DataLoader(Jittered(x, y), batch_size=16, shuffle=True)

    full = finetune(copy.deepcopy(model), loader(), **kw)
    finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 3, **kw)
    resumed = finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path, resume=True,
                       **kw)
    assert resumed.steps == 10 and state_equal(resumed.model, full.model)


def test_a_dataloader_with_its_own_generator_resumed_mid_epoch_reads_the_same_batches(tmp_path):
    """The same with a loader shuffling by a generator of its own (the user's, seeded): its
    state as the epoch began is kept too, so the resumed epoch draws the same order."""
    x, y = blobs(96)
    kw = dict(steps=12, lr=0.05, seed=3, progress=False, checkpoint_every=2)
    model = mlp()

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                           shuffle=True,
                                           generator=torch.Generator().manual_seed(0))

    full = finetune(copy.deepcopy(model), loader(), **kw)
    finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 9, **kw)  # mid-way through epoch 2
    resumed = finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path, resume=True,
                       **kw)
    assert resumed.steps == 12 and state_equal(resumed.model, full.model)


class _Stream(torch.utils.data.IterableDataset):
    """Batches with no length: the end of an epoch is seen only when it runs out."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.y), 16):
            yield self.x[i:i + 16], self.y[i:i + 16]


def test_a_loader_without_a_length_resumes_at_the_end_of_an_epoch(tmp_path):
    """A checkpoint at the last batch of a length-less loader's epoch (its end not seen yet):
    the resumed run finds the epoch empty and goes on to the next, as the uninterrupted did."""
    x, y = blobs(64)
    kw = dict(steps=8, lr=0.05, seed=3, progress=False, checkpoint_every=4)
    model = mlp()

    def loader():
        return torch.utils.data.DataLoader(_Stream(x, y), batch_size=None)

    full = finetune(copy.deepcopy(model), loader(), **kw)
    finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 4, **kw)
    resumed = finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path, resume=True,
                       **kw)
    assert resumed.steps == 8 and state_equal(resumed.model, full.model)
    # with validation at each epoch's end, and a random transform: the resumed run validates
    # the epoch it found ended (it skipped that, and drew other numbers after)
    kw = {**kw, "val_data": (x, y), "transform": lambda v: v + 0.1 * torch.randn_like(v)}
    full = finetune(copy.deepcopy(model), loader(), **kw)
    finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path / "v",
             callback=lambda info: info["step"] == 4, **kw)
    resumed = finetune(copy.deepcopy(model), loader(), checkpoint_dir=tmp_path / "v",
                       resume=True, **kw)
    assert no_time(resumed.history) == no_time(full.history)
    assert state_equal(resumed.model, full.model)
    # the epoch's-end validation labelled as of the epochs done (1.0, as a sized loader's);
    # the last step's, mid-epoch (a length-less loader's position is its whole epochs)
    assert [(e["step"], e["epoch"]) for e in full.history if e["split"] == "val"] == [
        (4, 1.0), (8, 1.0)]


def test_a_loader_without_a_length_is_validated_and_checkpointed_at_each_epochs_end(tmp_path):
    """The end of a length-less loader's epoch is seen when it runs out: then, with no
    eval_every / checkpoint_every, it is validated and checkpointed as a sized loader is."""
    x, y = blobs(64)  # 4 batches an epoch
    loader = torch.utils.data.DataLoader(_Stream(x, y), batch_size=None)
    result = finetune(mlp(), loader, steps=10, lr=0.05, seed=3, progress=False,
                      checkpoint_dir=tmp_path, val_data=(x, y))
    assert [e["step"] for e in result.history if e["split"] == "val"] == [4, 8, 10]
    saved = []
    finetune(mlp(), loader, steps=10, lr=0.05, seed=3, progress=False,
             checkpoint_dir=tmp_path / "b",
             callback=lambda info: saved.append(
                 (tmp_path / "b" / "last.pt").is_file()) and False)
    assert saved[4] and not saved[3]  # saved when step 4 (the first epoch) ran out, after it


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """A subprocess trains and is SIGKILLed at step 10 (checkpoints every 4 steps, so the last
    one is from step 8, mid-epoch 2); resuming from it ends where an uninterrupted run ends."""
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "torch.set_num_threads(1)\n"
        "from tests.test_train import resume_problem\n"
        "from rankcut.train import finetune\n"
        "model, data, kw = resume_problem()\n"
        "def kill(info):\n"
        "    if info['step'] == 10:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "finetune(model, data, checkpoint_dir=sys.argv[1], log=sys.argv[2], callback=kill,\n"
        "         **kw)\n")
    ckpt_dir, log = tmp_path / "ckpt", tmp_path / "train.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(ckpt_dir), str(log)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    saved = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (8, 1, 2)
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert max(logged) == 10  # the killed run logged past its last checkpoint
    assert not list(ckpt_dir.glob(".*.tmp"))

    model, data, kw = resume_problem()
    full = finetune(copy.deepcopy(model), data, log=tmp_path / "full.jsonl", **kw)
    resumed = finetune(model, data, checkpoint_dir=ckpt_dir, resume=True, log=log, **kw)
    assert state_equal(resumed.model, full.model)
    # the log holds each step once, as the uninterrupted run's does
    read = [json.loads(line) for line in log.read_text().splitlines()]
    full_read = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert no_time(read) == no_time(full_read) == no_time(full.history)


def test_resume_refuses_a_changed_run(tmp_path):
    x, y = blobs(64)
    finetune(mlp(), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(mlp(), (x, y), steps=4, batch_size=32, checkpoint_dir=tmp_path, resume=True,
                 progress=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        finetune(mlp(hidden=16), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path,
                 resume=True, progress=False)
    # another precision (a CPU run resumed on CUDA turns float16 autocast on by default)
    with pytest.raises(ValueError, match="amp: checkpoint None, now 'torch.bfloat16'"):
        finetune(mlp(), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path, resume=True,
                 amp=True, progress=False)
    # another learning rate or warm-up: the schedule the checkpoint's steps were taken on
    with pytest.raises(ValueError, match="lr: checkpoint 0.01, now 0.005"):
        finetune(mlp(), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path, resume=True,
                 lr=0.005, progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        finetune(mlp(), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path, resume=True,
                 warmup_steps=2, progress=False)
    # what each step computes: the optimizer's other settings, the loss, the teacher
    base = dict(steps=4, batch_size=16, checkpoint_dir=tmp_path, resume=True, progress=False)
    for changed, match in [({"weight_decay": 0.1}, "weight_decay: checkpoint"),
                           ({"label_smoothing": 0.1}, "label_smoothing"),
                           ({"clip_grad_norm": 1.0}, "clip_grad_norm"),
                           ({"teacher": mlp()}, "teacher: checkpoint None")]:
        with pytest.raises(ValueError, match=match):
            finetune(mlp(), (x, y), **base, **changed)
    # a callable optimizer: its class and group settings are the run's (not the defaults')
    def sgd(lr, momentum=0.0):
        return lambda groups: torch.optim.SGD(groups, lr=lr, momentum=momentum)

    own = dict(steps=4, batch_size=16, checkpoint_dir=tmp_path / "own", progress=False)
    finetune(mlp(), (x, y), optimizer=sgd(0.01), **own)
    assert finetune(mlp(), (x, y), optimizer=sgd(0.01), resume=True, **own).steps == 4
    for other, match in ((sgd(0.5, 0.9), "optimizer_groups"),
                         (lambda g: torch.optim.Adam(g, lr=0.01), "optimizer: checkpoint")):
        with pytest.raises(ValueError, match=match):
            finetune(mlp(), (x, y), optimizer=other, resume=True, **own)
    # a checkpoint written before a setting was recorded is not refused for lacking it
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    del payload["settings"]["amp"]
    torch.save(payload, tmp_path / "last.pt")
    old = finetune(mlp(), (x, y), steps=4, batch_size=16, checkpoint_dir=tmp_path, resume=True,
                   progress=False)
    assert old.steps == 4
    # resume=True without a checkpoint yet starts afresh
    fresh = finetune(mlp(), (x, y), steps=2, batch_size=16, checkpoint_dir=tmp_path / "new",
                     resume=True, progress=False)
    assert fresh.steps == 2


def test_argument_errors():
    x, y = blobs(32)
    with pytest.raises(ValueError, match="epochs or steps"):
        finetune(mlp(), (x, y), epochs=1, steps=1, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        finetune(mlp(), (x, y), batch_size=64, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(mlp(), (x, y), optimizer="lion", batch_size=16, progress=False)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        finetune(mlp(), (x, y), resume=True, batch_size=16, progress=False)


# ---- real data --------------------------------------------------------------------------------
def test_distilling_a_compressed_pretrained_resnet20(shared_data):
    """Channel-SVD at rank 16 on layer3 of the pretrained ResNet-20 loses most of its accuracy;
    eight steps of distillation from the original on 512 training images win much of it back."""
    from rankcut.data import read_cifar10_bin
    from rankcut.models import PRETRAINED, create, normalizer

    weights = shared_data / PRETRAINED["resnet20_cifar"]
    if not weights.is_file():
        pytest.skip(f"pretrained weights not found at {weights}")
    original = create("resnet20_cifar", weights=weights)
    train = read_cifar10_bin(shared_data, "train", limit=512)
    images, labels = read_cifar10_bin(shared_data, "test", limit=512)
    normalize = normalizer("resnet20_cifar")
    plan = rc.Plan({f"layer3.{b}.conv{c}": rc.LayerPlan("svd", (16,))
                    for b in range(3) for c in (1, 2)})
    small = rc.apply(original, plan)
    teacher_state = copy.deepcopy(original.state_dict())
    before = evaluate(small, (images, labels), transform=normalize)
    result = finetune(small, train, steps=8, batch_size=64, lr=0.01, teacher=original,
                      transform=normalize, log_every=4, progress=False)
    after = evaluate(small, (images, labels), transform=normalize)
    assert before["top1"] < 40
    assert after["top1"] > before["top1"] + 20 and after["loss"] < before["loss"]
    train_losses = [e["loss"] for e in result.history]
    assert train_losses[-1] < train_losses[0]
    assert all(torch.equal(v, teacher_state[k]) for k, v in original.state_dict().items())


def conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


class ViewHead(nn.Module):
    """Flattens a 2x2 activation with .view, which a channels_last activation cannot take."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = nn.functional.adaptive_avg_pool2d(self.conv(x), 2)
        return self.fc(h.view(h.shape[0], -1))


def images(n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_auto_memory_format_trains_channels_last_and_puts_the_layout_back():
    data = images()
    model, teacher = conv_net(), conv_net(seed=1)
    during = []

    def look(info):
        during.append([p.is_contiguous(memory_format=torch.channels_last)
                       for p in info["model"].parameters() if p.ndim == 4]
                      + [info["model"][0].weight.is_contiguous()])

    auto = finetune(copy.deepcopy(model), data, steps=3, batch_size=16, teacher=teacher,
                    callback=look, progress=False)
    assert during == [[True, True, False]] * 3
    assert all(p.is_contiguous() for m in (auto.model, teacher) for p in m.parameters())
    plain = finetune(copy.deepcopy(model), data, steps=3, batch_size=16, teacher=teacher,
                     memory_format=None, progress=False)
    for (name, a), b in zip(auto.model.state_dict().items(), plain.model.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(auto.model[0].weight, model[0].weight)  # it did train


@pytest.mark.parametrize("first, then", [("auto", "contiguous"), ("contiguous", "auto")])
def test_a_run_resumed_in_another_layout_updates_as_an_uninterrupted_one(tmp_path, first, then):
    """The momentum saved by a run training channels_last, resumed contiguous (or the other
    way): the fused SGD kernel pairs weights with momentum by memory order, so the state is put
    in its parameter's layout; it used to update each weight with another's momentum."""
    data = images()
    kw = dict(steps=6, batch_size=16, checkpoint_every=1, progress=False)
    full = finetune(conv_net(), data, memory_format=then, **kw)
    finetune(conv_net(), data, memory_format=first, checkpoint_dir=tmp_path,
             callback=lambda info: info["step"] == 3, **kw)
    resumed = finetune(conv_net(), data, memory_format=then, checkpoint_dir=tmp_path,
                       resume=True, **kw)
    assert resumed.steps == 6
    for (name, a), b in zip(resumed.model.state_dict().items(),
                            full.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_memory_format_falls_back_when_the_forward_cannot_take_channels_last():
    data = images()
    with pytest.warns(UserWarning, match="channels_last") as caught:
        result = finetune(ViewHead(), data, steps=2, batch_size=16, progress=False)
    assert result.steps == 2 and result.model.conv.weight.is_contiguous()
    assert caught[0].filename == __file__  # it names the caller's line
    volume = conv_net()
    volume.register_parameter("extra", nn.Parameter(torch.zeros(1, 1, 1, 1, 1)))
    assert finetune(volume, data, steps=1, batch_size=16, progress=False).steps == 1
    teacher = ViewHead()  # the teacher's forward is probed too
    with pytest.warns(UserWarning, match="channels_last"):
        result = finetune(conv_net(), data, steps=2, batch_size=16, teacher=teacher,
                          progress=False)
    assert result.steps == 2 and result.model[0].weight.is_contiguous()
    assert teacher.conv.weight.is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune(ViewHead(), data, steps=1, batch_size=16, memory_format="contiguous",
                 progress=False)
    with pytest.raises(RuntimeError, match="view"):  # asked for explicitly: not overruled
        finetune(ViewHead(), data, steps=1, batch_size=16, memory_format="channels_last",
                 progress=False)
    with pytest.raises(ValueError, match="memory_format"):
        finetune(ViewHead(), data, steps=1, memory_format="nhwc", progress=False)


def test_the_teacher_runs_as_a_fused_copy_and_is_left_as_it_was(monkeypatch):
    """Distillation runs the teacher with its BatchNorms folded (a copy: the teacher itself is
    not changed) and gives the same training as the unfused teacher, up to rounding."""
    data = images()
    model, teacher = conv_net(), conv_net(seed=1)
    with torch.no_grad():  # statistics that make the folding matter
        teacher[1].running_mean.uniform_(-1, 1)
        teacher[1].running_var.uniform_(0.5, 2)
    before = copy.deepcopy(teacher.state_dict())
    import rankcut.train.loop as loop

    made = []
    real = loop._inference_copy
    monkeypatch.setattr(loop, "_inference_copy", lambda t: made.append(real(t)) or made[-1])
    fused = finetune(copy.deepcopy(model), data, steps=3, batch_size=16, teacher=teacher,
                     memory_format=None, progress=False)
    # the teacher that ran: a copy with its BatchNorm folded away
    assert len(made) == 1 and made[0] is not teacher and isinstance(made[0][1], nn.Identity)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert teacher.training  # modes left as they were
    assert teacher[1].running_mean.abs().sum() > 0 and fused.steps == 3

    monkeypatch.setattr(loop, "_inference_copy", lambda t: t)  # the teacher as given
    plain = finetune(copy.deepcopy(model), data, steps=3, batch_size=16, teacher=teacher,
                     memory_format=None, progress=False)
    for a, b in zip(fused.model.state_dict().values(), plain.model.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_teacher_cache_serves_an_earlier_runs_outputs_and_changes_nothing(tmp_path, monkeypatch):
    """teacher_cache: a second run on the same batches (same data, seed, augmentation) runs no
    teacher forward and trains exactly as without the cache; another seed, or another teacher,
    misses. Settings that cannot work are refused before any work."""
    import rankcut.train.loop as loop

    calls = []

    class Counting(nn.Module):
        def __init__(self, inner):  # a copy, as the fused teacher is
            super().__init__()
            self.inner = copy.deepcopy(inner)

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    monkeypatch.setattr(loop, "_inference_copy", Counting)
    data, teacher, folder = images(), conv_net(seed=1), tmp_path / "teacher"
    kw = dict(steps=4, batch_size=16, teacher=teacher, progress=False, memory_format=None,
              transform=lambda t: t + 0.1 * torch.randn_like(t))  # augmentation: seeded draws

    def run(student_seed, cache, **more):
        before = len(calls)
        result = finetune(conv_net(seed=student_seed), data,
                          **{**kw, "teacher_cache": cache, **more})
        return result.model, len(calls) - before

    plain, n = run(0, None)
    assert n == 4
    cached, n = run(0, folder)
    assert n == 4 and state_equal(cached, plain)
    assert len(list(folder.glob("teacher-*.safetensors"))) == 1  # one shard, one save

    def teachers():  # one shard per save, named by the teacher's digest
        return {f.name.rsplit("-", 1)[0] for f in folder.glob("teacher-*.safetensors")}
    other, n = run(2, folder)  # another student, the same batches: every output kept
    assert n == 0
    hits = finetune(conv_net(seed=2), data, **{**kw, "teacher_cache": folder}).final
    assert hits["teacher_cache"] == {"hits": 4, "misses": 0}
    assert run(0, folder, memory_format="channels_last")[1] == 4  # another layout: misses
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast: misses
        assert run(0, folder)[1] == 4
    import rankcut.train.teacher_cache as tc

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    from safetensors import SafetensorError

    def io_error(*args, **kwargs):  # safetensors' own write error, not an OSError
        raise SafetensorError("Error while serializing: I/O error")

    for failing in (full_disk, io_error):  # a save that fails warns; the run goes on
        with monkeypatch.context() as m:
            m.setattr(tc, "save_file", failing)
            with pytest.warns(UserWarning, match="could not save 4 teacher outputs"):
                assert run(0, folder, seed=5)[1] == 4
    assert state_equal(other, run(2, None)[0])
    assert run(0, folder, seed=1)[1] == 4  # another seed draws other batches
    kw["teacher"] = conv_net(seed=3)
    assert run(0, folder)[1] == 4  # another teacher
    # teacher 1: the first run, the channels_last, autocast and seed-1 runs; teacher 3: one
    assert len(teachers()) == 2 and len(list(folder.glob("*.safetensors"))) == 5
    (tmp_path / "file").write_text("")
    for bad, words in [({"teacher": None}, "give a teacher"),
                       ({"teacher_cache": tmp_path / "file"}, "not a folder"),
                       ({"teacher_cache": 3}, "expected a folder")]:
        with pytest.raises(ValueError, match=words):
            finetune(conv_net(), data, **{**kw, "teacher_cache": folder, **bad})


def test_the_teacher_given_is_never_moved_or_changed():
    """finetune distils from a copy of the teacher on the training device: the caller's model
    (rc.compress passes the user's original) stays where it was, as it was."""
    calls = []

    class Recorded(nn.Sequential):
        def to(self, *args, **kwargs):
            calls.append(self)
            return super().to(*args, **kwargs)

    x, y = blobs(32)
    teacher = Recorded(*mlp().children())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    finetune(mlp(), (x, y), steps=2, batch_size=8, teacher=teacher, progress=False)
    assert not any(c is teacher for c in calls)  # (its copy is moved)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("option", ["checkpoint_dir", "tensorboard", "log"])
def test_where_a_run_writes_is_checked_before_any_step(option, tmp_path):
    (tmp_path / "f").write_text("a file")
    where = tmp_path / "f" if option != "log" else tmp_path / "f" / "log.jsonl"
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    steps = []
    with pytest.raises(ValueError, match=f"{option}: .*(is a file|which is a file)"):
        finetune(mlp(), (x, y), steps=2, batch_size=8, progress=False,
                 callback=lambda info: steps.append(info["step"]), **{option: where})
    assert steps == []


class AssertsContiguous(ViewHead):
    """A model whose own check (an assert) refuses channels_last activations."""

    def forward(self, x):
        h = self.conv(x)
        assert h.is_contiguous(), "expected a contiguous activation"
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def test_the_layout_probe_takes_a_models_assert_and_names_a_teacher_that_cannot_run():
    """memory_format="auto" falls back to the model's own layout when its forward refuses
    channels_last with an assert (not only a RuntimeError); a teacher that cannot take the
    inputs in any layout is named as the teacher, not blamed on the layout."""
    data = images()
    with pytest.warns(UserWarning, match="channels_last"):
        result = finetune(AssertsContiguous(), data, steps=2, batch_size=16, progress=False)
    assert result.steps == 2
    wrong = nn.Sequential(nn.Conv2d(5, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4))  # it takes 5 channels
    with pytest.raises(ValueError, match="teacher: the model's forward pass fails"):
        finetune(conv_net(), data, steps=1, batch_size=16, teacher=wrong, progress=False)
    with pytest.raises(ValueError, match="teacher: the model's forward pass fails"):
        finetune(conv_net(), data, steps=1, batch_size=16, teacher=wrong,
                 memory_format=None, progress=False)


def test_a_float64_model_trains_and_is_evaluated_on_a_float64_loss():
    logits = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    assert training_loss(logits, y).dtype == torch.float64
    assert training_loss(logits, y, logits.flip(0)).dtype == torch.float64
    assert training_loss(logits.half(), y).dtype == torch.float32  # autocast's: upcast
    model = mlp().double()
    x, y = blobs(64)
    # a loss of float64 logits differs from the float32 one's in its last float32 digits
    got = evaluate(model, (x.double(), y), batch_size=64)["loss"]
    with torch.no_grad():
        want = float(F.cross_entropy(model.eval()(x.double()), y))
    assert got == pytest.approx(want, rel=1e-12)


def test_settings_that_refuse_a_run_are_found_before_it_trains():
    x, y = blobs(64)
    with pytest.raises(ValueError, match="nesterov: needs a momentum above 0"):
        finetune(mlp(), (x, y), steps=1, batch_size=16, momentum=0.0, nesterov=True,
                 progress=False)


def test_a_dataset_of_images_that_do_not_batch_is_refused_by_name_without_drawing():
    """A torchvision dataset without a transform gives PIL images: refused naming the argument
    (not default_collate's error), and the look at its first example draws no random number
    the run would have drawn."""
    from PIL import Image

    class Pictures(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            torch.rand(1), random.random(), np.random.rand()  # noqa: NPY002 (a transform's)
            return Image.new("RGB", (8, 8)), i % 2

    states = torch.get_rng_state(), random.getstate(), np.random.get_state()  # noqa: NPY002
    with pytest.raises(ValueError, match="train_data: its examples' inputs are Image objects"):
        finetune(mlp(), Pictures(), steps=1, progress=False)
    with pytest.raises(ValueError, match="data: its examples' inputs are Image"):
        evaluate(mlp(), Pictures())
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2][1])  # noqa: NPY002


def test_a_4d_buffer_is_put_back_in_its_layout_after_training():
    data = images()
    model = conv_net()
    model[0].register_buffer("blur", torch.rand(8, 3, 3, 3))
    finetune(model, data, steps=1, batch_size=16, memory_format="channels_last",
             progress=False)
    assert model[0].blur.is_contiguous() and model[0].weight.is_contiguous()


def test_examples_without_class_labels_are_refused_before_any_work():
    """Unlabelled examples, one-hot labels: refused by name when the data is first taken (for
    compress, before planning), not at the first training step."""
    x, y = blobs(32)
    with pytest.raises(ValueError, match=r"train_data: expected \(input, class label\) "
                                         "examples, got tuple of 1"):
        finetune(mlp(), TensorDataset(x), steps=1, batch_size=8, progress=False)
    onehot = F.one_hot(y, 4)
    with pytest.raises(ValueError, match="train_data: expected one class index per input"):
        finetune(mlp(), (x, onehot), steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="data: expected each example's label to be a class "
                                         r"index .* of shape \(4,\)"):
        evaluate(mlp(), TensorDataset(x, onehot))
    with pytest.raises(ValueError, match="train_data: expected"):  # before planning
        rc.compress(mlp(), x[:1], method="svd", rank=2, train_data=TensorDataset(x), steps=1,
                    plan_options={"allow_slower": True})
    assert evaluate(mlp(), TensorDataset(x, y.float()))["n"] == 32  # whole-valued floats pass


def test_a_module_transform_is_moved_as_a_copy_not_the_callers():
    """finetune and evaluate run a Module transform on the training device: a copy is moved,
    so the caller's stays where it was (compress applies it to CPU calibration batches of a
    later round or layer too; a moved one failed there on a GPU)."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.tensor(1.0))
            self.moved = False

        def forward(self, x):
            return x * self.k

        def to(self, *args, **kwargs):
            self.moved = True
            return super().to(*args, **kwargs)

    x, y = blobs(32)
    scale = Scale()
    finetune(mlp(), (x, y), steps=1, batch_size=8, transform=scale, progress=False)
    evaluate(mlp(), (x, y), transform=scale)
    assert not scale.moved
