"""Running a model: reading ``example_inputs``; the model's device; eval mode for a while,
leaving its train/eval flags as they were; and with forward hooks attached for a while (how
profiling, planning and calibration watch layers)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize


def check_module(value, name: str = "model") -> nn.Module:
    """``value`` when it is an nn.Module; anything else is an error naming the argument."""
    if not isinstance(value, nn.Module):
        raise ValueError(f"{name}: expected an nn.Module, got {type(value).__name__}")
    return value


def as_path(value, name: str = "path") -> Path:
    """``value`` (a str or os.PathLike) as a Path, a leading ``~`` expanded to the home folder
    (as a shell would; ``"~/out"`` is not a folder named ``~``); anything else is an error
    naming the argument."""
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"{name}: expected a file or folder path (str or os.PathLike), got "
                         f"{type(value).__name__}")
    return Path(value).expanduser()


def logits_of(out, what: str = "model") -> torch.Tensor:
    """The logits in a model's output: the output itself, the first tensor of a tuple or list,
    a mapping's "logits" (else its first tensor); a ValueError naming ``what`` when there is
    none (training, evaluation and the damage probes read outputs the same way)."""
    found = _first_tensor(out)
    if found is None:
        raise ValueError(f"{what}: its output ({type(out).__name__}) holds no tensor of logits")
    return found


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        values = [out["logits"]] if "logits" in out.keys() else list(out.values())
    elif isinstance(out, tuple | list):
        values = list(out)
    else:
        return None
    return next((t for t in map(_first_tensor, values) if t is not None), None)


def as_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor, or a tuple or list of positional tensors) as a tuple; any
    other value is an error naming ``example_inputs``."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not (isinstance(inputs, tuple | list) and inputs
            and all(isinstance(x, torch.Tensor) for x in inputs)):
        raise ValueError(f"example_inputs must be a tensor or a non-empty tuple of tensors "
                         f"(e.g. torch.rand(1, 3, 32, 32)), got {type(example_inputs).__name__}"
                         f": {example_inputs!r:.80}")
    if inputs[0].ndim and inputs[0].shape[0] == 0:
        raise ValueError(f"example_inputs: an empty batch (shape {tuple(inputs[0].shape)}); "
                         "give at least one example")
    return tuple(inputs)


# what a model's forward raises on inputs it cannot take (its own asserts and indexing too)
FORWARD_ERRORS = (RuntimeError, TypeError, AssertionError, IndexError)


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of running sums kept on ``device`` (losses, hits, counts): float64, or float32
    on Apple's GPU, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@contextlib.contextmanager
def forward_on(inputs, what: str = "example_inputs") -> Iterator[None]:
    """Around a model's first forward pass on user-given ``inputs``: where the model cannot
    take them (a RuntimeError, TypeError, AssertionError or IndexError out of its forward:
    another image size, an integer tensor for a float model, a missing input), a ValueError
    naming ``what``, the inputs' shapes and dtypes, and the model's own first line, the error
    chained. Out of memory is not the inputs' fault and stays as it is."""
    try:
        yield
    except FORWARD_ERRORS as err:
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise
        given = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                          for x in as_inputs(inputs))
        said = (str(err).strip().splitlines() or [""])[0]
        hint = ("; integer inputs (images as uint8?): a transform to float may be missing"
                if any(not (x.is_floating_point() or x.is_complex()) for x in as_inputs(inputs))
                else "")
        raise ValueError(f"{what}: the model's forward pass fails on them ({given}): "
                         f"{type(err).__name__}" + (f": {said}" if said else "") + hint
                         ) from err


def model_device(model: nn.Module, fallback="cpu") -> torch.device | None:
    """Where ``model`` runs: the device of its first parameter, else of its first buffer, else
    ``fallback`` (a device, or a name; None: None, for a model that holds no tensor and so runs
    anywhere): the one way rankcut reads it."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    if first is not None:
        return first.device
    return None if fallback is None else torch.device(fallback)


def available_device(text: str) -> torch.device:
    """The device ``text`` names (``cpu``, ``cuda``, ``cuda:N``, ``mps``) when this machine has
    it; ValueError otherwise (a command refuses a missing GPU up front, not when it first uses
    it)."""
    expected = f"expected cpu, cuda, cuda:N or mps, got {text!r}"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(expected) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"{text!r} is not on this machine ({count} CUDA device(s))")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{text!r} is not on this machine (no Apple GPU)")
    elif device.type != "cpu":
        raise ValueError(expected)
    return device


def on_model_device(model: nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    """Positional ``inputs`` (a tensor or a tuple) on ``model``'s device (each left where it is
    when the model holds no tensor): a model fine-tuned on the GPU, example inputs on the CPU."""
    return tuple(x.to(model_device(model, x.device)) for x in as_inputs(inputs))


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every module's qualified names, by ``id``: more than one where the same module is held
    at several paths (it runs at each of them)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def model_dtype(model: nn.Module) -> torch.dtype:
    """What ``model`` computes in: the dtype of its first floating-point parameter (else
    buffer), float32 when it has none."""
    first = next((t for t in itertools.chain(model.parameters(), model.buffers())
                  if t.is_floating_point()), None)
    return torch.float32 if first is None else first.dtype


def batch_of(inputs: tuple[torch.Tensor, ...]) -> int:
    """The batch size of positional inputs: the first tensor's leading dimension (1 if 0-d)."""
    return int(inputs[0].shape[0]) if inputs[0].ndim else 1


def leaves_parametrizations_as_they_were(fn: Callable) -> Callable:
    """Decorate ``fn(model, ...)``, a function that reads ``model``'s weights, so that the
    buffers of its parametrizations are as they were when it returns: reading a spectral-normed
    layer's weight in train mode runs a power iteration that moves its ``u`` and ``v``
    (``rc.plan`` and ``rc.apply`` read every planned weight several times)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        kept = []
        if isinstance(model, nn.Module):
            for module in model.modules():
                if parametrize.is_parametrized(module):
                    kept += [(b, b.detach().clone()) for b in module.parametrizations.buffers()]
        try:
            return fn(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in kept:
                    buffer.copy_(value)
    return wrapper


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own training flag (so a
    frozen BatchNorm kept in eval inside a training model stays that way)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: Iterable[tuple[nn.Module, Callable]], *,
           pre: bool = False, grad: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.no_grad()`` (``grad``: with gradients, for inputs
    optimised through it) with each ``(module, fn)`` of ``hooks``
    registered as a forward hook ``fn(module, args, output)`` (a forward pre-hook
    ``fn(module, args)`` with ``pre``), observers whose return value is ignored; ``args`` holds
    the input even when the module was called with it by keyword (``layer(input=x)``). On exit
    the hooks are removed and the modes restored, also after an error."""
    def positional(args: tuple, kwargs: dict) -> tuple:
        if args or not kwargs:
            return args
        named = kwargs.get("input")
        first = named if isinstance(named, torch.Tensor) else next(
            (v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        return args if first is None else (first,)

    def observe(fn: Callable):
        if pre:
            def pre_hook(module, args, kwargs) -> None:
                fn(module, positional(args, kwargs))
            return pre_hook

        def hook(module, args, kwargs, output) -> None:
            fn(module, positional(args, kwargs), output)
        return hook

    handles = []
    try:
        for module, fn in hooks:
            handles.append(
                module.register_forward_pre_hook(observe(fn), with_kwargs=True) if pre
                else module.register_forward_hook(observe(fn), with_kwargs=True))
        with eval_mode(model), torch.set_grad_enabled(grad):
            yield model
    finally:
        for handle in handles:
            handle.remove()


def run_watching_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                        make_hook: Callable[[str], Callable]) -> None:
    """One forward pass ``model(*inputs)`` (eval mode, no_grad) with ``make_hook(name)`` as a
    forward hook on every Conv2d and Linear (how MACs and input shapes are recorded)."""
    layers = [(module, make_hook(name)) for name, module in model.named_modules()
              if isinstance(module, nn.Conv2d | nn.Linear)]
    inputs = on_model_device(model, inputs)
    with hooked(model, layers), forward_on(inputs):
        model(*inputs)


def as_tensor_tuple(value, name: str) -> tuple[torch.Tensor, ...]:
    """``value`` as a tuple of tensors: a tensor, or a tuple or list of tensors (None: empty)."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise TypeError(f"{name}: expected a tensor or a tuple of tensors, got {type(value).__name__}")


def output_tensors(value, name: str) -> tuple[torch.Tensor, ...]:
    """The tensors of a model's output in order: a tensor, or tuples, lists and mappings of
    them, nested (a mapping's values in its own order, as torch.onnx flattens them; None
    skipped): what two models' outputs are compared by (a torchvision segmentation model
    returns a dict)."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return tuple(t for v in value for t in output_tensors(v, name))
    raise TypeError(f"{name}: expected tensors (alone, or in tuples, lists or dicts), got "
                    f"{type(value).__name__}")


def compare_outputs(what: str, actual, expected, atol: float) -> None:
    """Raise a RuntimeError unless each output is within ``tol * max(1, max |expected|)``, where
    ``tol`` is ``atol`` but at least 8 units in the last place of the expected output's dtype
    (a float16 or bfloat16 model's rounding). Non-finite entries must be the same in both
    (infinities of the same sign, NaN where the other has NaN); the rest is compared."""
    if len(actual) != len(expected):
        raise RuntimeError(f"{what} gives {len(actual)} outputs, PyTorch {len(expected)}")
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        tol = atol
        if e.is_floating_point():
            tol = max(atol, 8 * torch.finfo(e.dtype).eps)
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        if a.shape != e.shape:
            raise RuntimeError(
                f"{what} output {i} has shape {tuple(a.shape)}, PyTorch {tuple(e.shape)}"
            )
        finite = torch.isfinite(e)
        if not (torch.equal(torch.isnan(a), torch.isnan(e))
                and torch.equal(a[torch.isinf(e)], e[torch.isinf(e)])
                and bool(torch.isfinite(a[finite]).all())):
            raise RuntimeError(f"{what} output {i} differs from PyTorch in which entries are "
                               "infinite or NaN")
        a, e = a[finite], e[finite]
        if e.numel() == 0:
            continue
        scale = max(1.0, float(e.abs().max()))
        diff = float((a - e).abs().max())
        if not diff <= tol * scale:
            raise RuntimeError(
                f"{what} output {i} differs from PyTorch: max abs diff {diff:.3g} > "
                f"{tol * scale:.3g} (atol={tol:g} x max(1, max |output|={scale:.3g}))"
            )
