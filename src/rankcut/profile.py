"""Count the parameters and multiply-accumulates (MACs) of models built from Conv2d and Linear.

Factorized layers in rankcut are compositions of plain ``nn.Conv2d`` / ``nn.Linear`` children,
so counting those layers is enough to compare a model with its compressed version. MACs are
computed analytically from the shapes that forward hooks see during one forward pass:

- Conv2d: every output element costs ``(C_in / groups) * kh * kw`` MACs, i.e.
  ``N * H_out * W_out * C_out * (C_in / groups) * kh * kw`` in all. Stride, dilation, padding
  (and its mode) only change ``H_out`` and ``W_out``, which are read from the output.
- Linear: every output element costs ``in_features`` MACs, i.e.
  ``rows * in_features * out_features`` where ``rows = input.numel() / in_features``.

Bias additions are not MACs. Other layers (norms, activations, pooling) are not counted.

Latency is measured, not modelled: :func:`measure_latency` times whole forward passes (warm-up
first, then repeats; CUDA synchronised around each pass) and reports the median and quartiles
with the thread count and device, and :func:`compare_latency` times two modules interleaved so
that drift in the machine's speed hits both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._modes import eval_mode

__all__ = ["Latency", "compare_latency", "count_macs", "count_params", "layer_macs",
           "measure_latency", "top1_accuracy"]


def count_params(module: nn.Module) -> int:
    """The number of parameter elements of ``module``; a shared (tied) parameter counts once."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters())  # parameters() yields each tensor once


def _macs_per_output(module: nn.Module) -> int:
    """MACs that one output element of a Conv2d or Linear costs."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    return module.in_features


def layer_macs(model: nn.Module, example_inputs) -> dict[str, int]:
    """MACs of each Conv2d and Linear that ran in one forward pass of ``model(*example_inputs)``.

    Keys are qualified module names (``"features.0"``; ``""`` when ``model`` itself is such a
    layer). A layer called several times is summed under its name. ``example_inputs`` is a tensor
    or a tuple of positional tensors. The forward runs under ``torch.no_grad()`` in eval mode (so
    batch-norm statistics are left alone); every module's train/eval flag is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not (
        isinstance(inputs, tuple) and inputs and all(isinstance(x, torch.Tensor) for x in inputs)
    ):
        raise ValueError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
            f"{type(example_inputs).__name__}: {example_inputs!r:.80}"
        )

    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, _args, output: torch.Tensor) -> None:
            macs[name] = macs.get(name, 0) + output.numel() * _macs_per_output(module)

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return macs


def count_macs(model: nn.Module, example_inputs) -> int:
    """Total MACs of the Conv2d and Linear layers in one forward pass (see ``layer_macs``)."""
    return sum(layer_macs(model, example_inputs).values())


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  transform=None, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of ``model`` (run in eval mode, mode restored) on ``images``
    (optionally passed through ``transform`` batch by batch) against ``labels``."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images, labels: expected equal non-zero lengths, got {len(images)} "
                         f"and {len(labels)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = 0
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            x = transform(x) if transform is not None else x
            pred = model(x.to(device)).argmax(1).cpu()
            correct += int((pred == labels[i:i + batch_size]).sum())
    return 100.0 * correct / len(images)


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass: median and quartiles over ``repeats`` timed passes."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    batch: int
    threads: int
    device: str

    @property
    def spread_ms(self) -> float:
        """The interquartile range."""
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, batch "
                f"{self.batch}, {self.repeats} runs, {self.threads} threads, {self.device})")


def _as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not (isinstance(inputs, tuple | list) and inputs
            and all(isinstance(x, torch.Tensor) for x in inputs)):
        raise ValueError(f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
                         f"{type(example_inputs).__name__}")
    return tuple(inputs)


def _timer(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    device = next((p.device for p in model.parameters()), inputs[0].device)
    cuda = device.type == "cuda"
    inputs = tuple(x.to(device) for x in inputs)

    def run() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(*inputs)
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    return run, str(device)


def _summary(times: list[float], batch: int, device: str) -> Latency:
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return Latency(median, q1, q3, len(times), batch, torch.get_num_threads(), device)


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup, repeats: expected >= 0 and >= 1, got {warmup}, {repeats}")


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs, *, warmup: int = 10,
                    repeats: int = 50) -> Latency:
    """Time ``model(*example_inputs)`` on the device of the model's parameters: ``warmup``
    untimed passes, then ``repeats`` timed ones, in eval mode under no_grad (modes restored)."""
    _check_counts(warmup, repeats)
    inputs = _as_inputs(example_inputs)
    with eval_mode(model):
        run, device = _timer(model, inputs)
        for _ in range(warmup):
            run()
        times = [run() for _ in range(repeats)]
    return _summary(times, inputs[0].shape[0] if inputs[0].ndim else 1, device)


@torch.no_grad()
def compare_latency(first: nn.Module, second: nn.Module, example_inputs, *, warmup: int = 5,
                    repeats: int = 30) -> tuple[Latency, Latency]:
    """Latencies of two modules on the same inputs, their timed passes interleaved (first,
    second, first, ...), so that a change in the machine's speed affects both alike."""
    _check_counts(warmup, repeats)
    inputs = _as_inputs(example_inputs)
    with eval_mode(first), eval_mode(second):
        (run_a, dev_a), (run_b, dev_b) = _timer(first, inputs), _timer(second, inputs)
        for _ in range(warmup):
            run_a()
            run_b()
        pairs = [(run_a(), run_b()) for _ in range(repeats)]
    batch = inputs[0].shape[0] if inputs[0].ndim else 1
    return (_summary([a for a, _ in pairs], batch, dev_a),
            _summary([b for _, b in pairs], batch, dev_b))
