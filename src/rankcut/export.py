"""Export a model to ONNX or TorchScript: checked against PyTorch, written atomically.

:func:`export` is the one entry point. It exports the model in eval mode without changing the
caller's module (parameters, buffers, device and every submodule's training flag stay as they
were), writes to a temporary file beside the destination and moves it into place only once the
export, and the round-trip check if asked for, succeeded: a failed export leaves no file behind
and an existing file untouched.

ONNX uses the TorchScript-based exporter of ``torch.onnx.export`` (``dynamo=False``) first; see
:func:`_export_onnx` for why, and for the fallback to the dynamo-based one. The check runs the
file with onnxruntime on the CPU and compares with PyTorch on the CPU, in float32.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ._modes import (
    as_path,
    as_tensor_tuple,
    check_module,
    compare_outputs,
    eval_mode,
    forward_on,
    model_device,
    on_model_device,
    output_tensors,
)
from .atomic import atomic_path, file_target_problem
from .fuse import fuse as fused_copy

FORMATS = ("onnx", "torchscript")
METHODS = ("script", "trace")
MIN_OPSET = 17

# Warnings torch emits on every use of the exporters chosen here. They say nothing about the model
# at hand, so they are silenced for the duration of the export only; anything else (TracerWarning
# included: it flags a trace that may not generalise) reaches the caller.
_EXPECTED_WARNINGS = (
    # the TorchScript-based ONNX exporter is deprecated in favour of the dynamo-based one
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    # ... and calls a deprecated helper of its own
    (DeprecationWarning, r"The feature will be removed"),
    # circular padding slices with a negative step, which constant folding skips (harmless)
    (UserWarning, r"Constant folding - Only steps=1 can be constant folded"),
    # torch.jit.script / trace / save / load are deprecated in favour of torch.export
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    method: str = "script",
    atol: float = 1e-4,
    fuse: bool = True,
) -> Path:
    """Export ``model`` to ``path`` as ONNX or TorchScript and return the path written.

    Args:
        model: the module to export; it is exported in eval mode and left as it was.
        path: the destination file; its parent directory is created if missing.
        format: ``"onnx"`` or ``"torchscript"``.
        example_inputs: a tensor or a tuple of tensors, the positional inputs of ``forward``.
            Required for ONNX, for ``method="trace"`` and for ``check=True``.
        opset: ONNX operator set version, at least 17.
        dynamic_batch: ONNX only: make dimension 0 of every input (and output) dynamic.
        check: ONNX: run ``onnx.checker`` on the file, then run it with onnxruntime (CPU) on
            ``example_inputs``. TorchScript: load the file back and run it. Either way the
            outputs must match PyTorch's to within ``atol * max(1, max |output|)`` in float32
            (``atol`` at least 8 units in the last place of the output's dtype), else a
            RuntimeError is raised and nothing is written (also when onnxruntime cannot run
            the file: its CPU convolutions take float32, not float64).
        method: TorchScript only: ``"script"`` (:func:`torch.jit.script`, keeps control flow)
            or ``"trace"`` (:func:`torch.jit.trace`, records one run on ``example_inputs``).
        atol: the tolerance of the check, relative to the output's scale when that exceeds 1.
        fuse: export :func:`rankcut.fuse`'s deployable copy of the model (BatchNorm folded into
            the convolution before it, factorizations that save nothing made dense again);
            the check still compares with ``model`` itself.

    Raises:
        ValueError: an argument outside what is accepted (the message names it), or a ``path``
            that is a folder or lies under a regular file (checked before any work).
        TypeError: ``example_inputs`` or the model's output is not a tensor or tuple of tensors.
        RuntimeError: the exported model's output differs from PyTorch's.
        ImportError: ``check=True`` for ONNX without onnx and onnxruntime installed.
    """
    check_module(model)
    _check_arguments(format, example_inputs, opset, method, check, atol)
    for name, value in (("fuse", fuse), ("dynamic_batch", dynamic_batch), ("check", check)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected True or False, got {value!r}")
    inputs = as_tensor_tuple(example_inputs, "example_inputs")
    path, opset = as_path(path), int(opset)
    problem = file_target_problem(path)  # (an unwritable folder too: not an exporter's error)
    if problem is not None:
        raise ValueError(f"path: {problem}")
    with eval_mode(model), torch.no_grad(), _expected_warnings_ignored():
        # before anything is written: inputs the model cannot take are said as theirs, not as
        # the exporter's error (fuse says so itself, first thing)
        original = model
        if fuse:  # the fused copy is checked against the model, and so is the file
            model = fused_copy(model, inputs or None, check=check and bool(inputs), atol=atol)
        elif inputs:
            with forward_on(inputs):
                model(*on_model_device(model, inputs))
        with atomic_path(path) as tmp:
            if format == "onnx":
                _export_onnx(model, inputs, tmp, opset, dynamic_batch, check, atol, original)
            else:
                _export_torchscript(model, inputs, tmp, method, check, atol, original)
    return path


def _check_arguments(format, example_inputs, opset, method, check, atol) -> None:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < MIN_OPSET:
        raise ValueError(f"opset: expected an integer >= {MIN_OPSET}, got {opset!r}")
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not atol >= 0:  # NaN too
        raise ValueError(f"atol: expected a number >= 0, got {atol!r}")
    if example_inputs is None or (isinstance(example_inputs, tuple | list)
                                   and not example_inputs):
        needed_by = (
            "format='onnx'" if format == "onnx"
            else "method='trace'" if method == "trace"
            else "check=True" if check
            else None
        )
        if needed_by is not None:
            raise ValueError(
                f"example_inputs: expected a tensor or a tuple of tensors (required with "
                f"{needed_by}), got {example_inputs!r}"
            )


@contextlib.contextmanager
def _expected_warnings_ignored() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


# --------------------------------------------------------------------------------------------- ONNX


def _export_onnx(model, inputs, tmp, opset, dynamic_batch, check, atol,
                 reference=None) -> None:
    """Export to ONNX from a CPU model, so that the check compares like with like; the file's
    outputs are checked against ``reference``'s (the model as given, before fusing: each
    step's tolerance would otherwise add up).

    Exporter choice, tried on torch 2.14 with convs of every kind (grouped, depthwise, padding
    modes reflect / replicate / circular, ``padding="same"`` with a (3, 5) kernel, 1x1), BatchNorm
    and Linear: both exporters give the right numbers, but the dynamo-based one (``dynamo=True``)
    has no implementation below opset 18 and cannot convert the Pad of reflect / replicate /
    circular convs down to 17, so it silently writes opset 18 when 17 is asked for; it also
    specialises a batch of 1 unless told otherwise, writes weights to a side ``.data`` file by
    default, and takes seconds where the TorchScript-based one takes tens of milliseconds. So the
    TorchScript-based exporter (``dynamo=False``), which writes the opset asked for, goes first,
    and the dynamo-based one is the fallback for models it cannot handle (or a torch without it).
    """
    cpu_model = _cpu_view(model)
    cpu_inputs = tuple(x.detach().cpu() for x in inputs)
    expected = output_tensors(
        (cpu_model if reference is None or reference is model
         else _cpu_view(reference))(*cpu_inputs),
        "model output")
    input_names = [f"input_{i}" for i in range(len(cpu_inputs))]
    output_names = [f"output_{i}" for i in range(len(expected))]
    batch_axes = _batch_axes(input_names, cpu_inputs) | _batch_axes(output_names, expected)
    try:
        torch.onnx.export(
            cpu_model, cpu_inputs, str(tmp), **_TORCHSCRIPT_EXPORTER, opset_version=opset,
            input_names=input_names, output_names=output_names,
            dynamic_axes=batch_axes if dynamic_batch else None,
        )
    except Exception as torchscript_error:
        try:
            _export_onnx_dynamo(
                cpu_model, cpu_inputs, tmp, opset, dynamic_batch, input_names, output_names
            )
        except Exception as dynamo_error:
            raise RuntimeError(
                f"ONNX export failed with both exporters: TorchScript-based: {torchscript_error!r}"
                f"; dynamo-based: {dynamo_error!r}"
            ) from dynamo_error
    if check:
        _check_onnx(tmp, dict(zip(input_names, cpu_inputs, strict=True)), expected, atol)


# the TorchScript-based exporter: torch.onnx.export's default before torch 2.5 gave it a
# ``dynamo`` switch (a keyword those versions refuse), named since (2.9 made dynamo the default)
_TORCHSCRIPT_EXPORTER = ({"dynamo": False} if "dynamo" in inspect.signature(
    torch.onnx.export).parameters else {})


def _batch_axes(names, tensors) -> dict[str, dict[int, str]]:
    """Dimension 0 of each tensor that has one, named "batch", as ``dynamic_axes`` wants it."""
    return {name: {0: "batch"} for name, t in zip(names, tensors, strict=True) if t.ndim}


def _export_onnx_dynamo(model, inputs, tmp, opset, dynamic_batch, input_names, output_names):
    dim = torch.export.Dim.DYNAMIC  # not a named Dim: those refuse an example batch of 1
    torch.onnx.export(
        model, inputs, str(tmp), dynamo=True, opset_version=opset, verbose=False,
        input_names=input_names, output_names=output_names,
        dynamic_shapes=(
            tuple({0: dim} if x.ndim else None for x in inputs) if dynamic_batch else None
        ),
        external_data=False,  # a side file would be named after the temporary file
    )
    import onnx  # present: the dynamo-based exporter needs it

    opsets = onnx.load(str(tmp)).opset_import
    written = next(o.version for o in opsets if o.domain in ("", "ai.onnx"))
    if written != opset:
        warnings.warn(
            f"the dynamo-based ONNX exporter wrote opset {written}, not the {opset} asked for "
            "(it could not convert the model down)",
            stacklevel=4,
        )


def _cpu_view(model: nn.Module) -> nn.Module:
    """``model`` itself when all its tensors are on the CPU, else a copy of it on the CPU.

    The copy is made tensor by tensor straight to the CPU (deepcopy's memo maps each device
    tensor to its CPU copy), so the device never holds two copies of the weights.
    """
    on_device = [t for t in (*model.parameters(), *model.buffers()) if t.device.type != "cpu"]
    if not on_device:
        return model
    memo = {
        id(t): (
            nn.Parameter(t.detach().cpu(), t.requires_grad)
            if isinstance(t, nn.Parameter) else t.cpu()
        )
        for t in on_device
    }
    return copy.deepcopy(model, memo)


def _check_onnx(file: Path, feeds: dict[str, torch.Tensor], expected, atol: float) -> None:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking an ONNX export needs onnx and onnxruntime: pip install 'rankcut[export]' "
            "(or pass check=False)"
        ) from error
    onnx.checker.check_model(str(file))  # given the path, it handles models over 2 GB too
    try:
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in session.get_inputs()}  # inputs forward ignores: dropped
        actual = session.run(
            None, {name: x.numpy() for name, x in feeds.items() if name in graph_inputs}
        )
    except Exception as err:  # onnxruntime's own error types (NotImplemented, Fail, ...)
        dtypes = sorted({str(x.dtype).removeprefix("torch.") for x in feeds.values()})
        raise RuntimeError(
            f"onnxruntime cannot run the exported model on the CPU (inputs {', '.join(dtypes)}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; its CPU kernels "
            "cover float32 convolutions (export model.float(), or pass check=False to write "
            "the file unchecked)") from None
    compare_outputs("ONNX (onnxruntime)", [torch.from_numpy(a) for a in actual], expected, atol)


# -------------------------------------------------------------------------------------- TorchScript


def _export_torchscript(model, inputs, tmp, method, check, atol, reference=None) -> None:
    """Script or trace the model where it is (its device), save it, and optionally reload it
    and check its outputs against ``reference``'s (the model as given, before fusing)."""
    device = model_device(model)
    inputs = tuple(x.to(device) for x in inputs)
    if method == "script":
        compiled = torch.jit.script(model)
    else:
        compiled = torch.jit.trace(model, inputs, strict=False)  # (a dict output: strict=False)
    torch.jit.save(compiled, str(tmp))
    if check:
        expected = output_tensors((model if reference is None else reference)(*inputs),
                                   "model output")
        loaded = torch.jit.load(str(tmp))
        actual = output_tensors(loaded(*inputs), "TorchScript output")
        compare_outputs(f"TorchScript ({method})", actual, expected, atol)
