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

:func:`profile` puts it together per layer: a *unit* is a Conv2d or Linear that is not part of a
factorized layer, or a whole factorized layer (``rankcut.layers.FactorizedLayer``: its children
are plain Conv2d/Linear and count under its name). Each unit gets its params, MACs of one sample,
parameter bytes and, optionally, its latency timed on the input it really receives in the model
(recorded by a forward hook) at each batch; the whole model gets the same plus the size of its
safetensors file (:func:`model_bytes`).
"""

from __future__ import annotations

import functools
import itertools
import numbers
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._modes import (
    as_inputs,
    batch_of,
    check_module,
    eval_mode,
    forward_on,
    hooked,
    model_device,
    on_model_device,
    run_watching_layers,
)
from .layers import FactorizedLayer

__all__ = [
    "Latency",
    "LayerProfile",
    "Profile",
    "allocator",
    "allocator_advice",
    "compare_latency",
    "count_macs",
    "count_params",
    "keep_freed_memory",
    "layer_macs",
    "layer_units",
    "measure_latency",
    "model_bytes",
    "page_faults",
    "param_bytes",
    "profile",
    "with_batch",
]


def count_params(module: nn.Module) -> int:
    """The number of parameter elements of ``module``; a shared (tied) parameter counts once."""
    check_module(module, "module")
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
    check_module(model)
    inputs = as_inputs(example_inputs)

    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, _args, output: torch.Tensor) -> None:
            macs[name] = macs.get(name, 0) + output.numel() * _macs_per_output(module)

        return record

    # nn.MultiheadAttention projects with its weights directly (its out_proj Linear is never
    # called): its in-projections under its name, the output projection under out_proj's
    handles = [m.register_forward_hook(_attention_hook(name, macs), with_kwargs=True)
               for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    try:
        run_watching_layers(model, inputs, hook)
    finally:
        for h in handles:
            h.remove()
    return macs


def _attention_hook(name: str, macs: dict[str, int]):
    def record(module: nn.MultiheadAttention, args, kwargs, _output) -> None:
        named = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
        q, k, v = (named[key] for key in ("query", "key", "value"))

        def tokens(x: torch.Tensor) -> int:
            return x.numel() // x.shape[-1]

        E = module.embed_dim
        macs[name] = macs.get(name, 0) + (tokens(q) * E * E + tokens(k) * E * module.kdim
                                          + tokens(v) * E * module.vdim)
        out = f"{name}.out_proj" if name else "out_proj"
        macs[out] = macs.get(out, 0) + tokens(q) * E * E

    return record


def count_macs(model: nn.Module, example_inputs) -> int:
    """Total MACs of the Conv2d and Linear layers in one forward pass (see ``layer_macs``)."""
    return sum(layer_macs(model, example_inputs).values())


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass: median and quartiles over ``repeats`` timed passes;
    ``page_faults``: the process's minor page faults per timed pass (memory the OS mapped in
    afresh, :func:`page_faults`; None where the platform does not count them); ``min_ms``: the
    fastest timed pass (None where not recorded)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    batch: int
    threads: int
    device: str
    page_faults: float | None = None
    min_ms: float | None = None

    @property
    def spread_ms(self) -> float:
        """The interquartile range."""
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, batch "
                f"{self.batch}, {self.repeats} runs, {self.threads} threads, {self.device})")


# ------------------------------------------------------------------------- the C allocator
# PyTorch takes a CPU tensor's memory from the C library's malloc and gives it back on free.
# glibc's malloc hands large blocks back to the OS (unmapping them, trimming the heap) and takes
# them again at the next allocation, a page fault per 4 KB: an eager forward allocates every
# activation afresh, so a pass can spend more time in the kernel than in its kernels, and a
# factorized model (more, and wider, intermediate tensors) pays it more than the dense one
# (ResNet-20 at batch 32, CP-3 at 2x fewer MACs: 38 ms against 15 ms with freed memory kept;
# docs/benchmarks.md). keep_freed_memory() has glibc keep it.
KEPT_MMAP_THRESHOLD = 256 << 20  # blocks up to this size from the heap, not mapped afresh
# what older glibc takes at most (HEAP_MAX_SIZE / 2 on 64-bit): tried when it refuses the above
KEPT_MMAP_THRESHOLD_OLD_GLIBC = 32 << 20
KEPT_TRIM_THRESHOLD = 1 << 30  # freed memory up to this much kept, not returned to the OS
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
_kept = False  # set by keep_freed_memory in this process


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation, for this process, instead
    of returning it to the OS (``mallopt``: blocks up to :data:`KEPT_MMAP_THRESHOLD` from the
    heap, 32 MB where an older glibc takes no more, and up to :data:`KEPT_TRIM_THRESHOLD` kept
    free); what ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the environment, or
    a preloaded jemalloc or tcmalloc, give a deployment. CPU inference in eager PyTorch then
    takes no page faults for its activations: dense models run faster, and factorized ones far
    faster (docs/benchmarks.md). The process holds on to its peak memory. Call it before
    building latency tables: they record the allocator (:func:`allocator`), so timings taken
    with and without it are not mixed. Returns whether it was applied: False where the C
    library is not glibc or refused the settings (the allocator then left as it was)."""
    global _kept
    libc = _glibc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # (malloc.h)
    # both: setting one turns glibc's own adjustment of the other off
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
            or libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD_OLD_GLIBC)):
        return False
    if not libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD):
        return False
    _kept = True
    return True


def page_faults() -> int | None:
    """This process's minor page faults so far (``getrusage``: pages the OS mapped in on first
    touch, every thread's), or None where the platform does not count them (no ``resource``
    module: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# A compressed model whose pass takes this many more page faults than its original's (4 MB at
# 4 KB pages) is paying the allocator, not its kernels: allocator_advice says so
NOTABLE_FAULTS = 1024


def allocator_advice(original_faults: float | None, compressed_faults: float | None,
                     device: str | torch.device = "cpu", engine: str = "eager") -> str | None:
    """Where a compressed model, timed on the CPU (``device``) in eager PyTorch (``engine``, as
    :func:`measure_latency` takes it) under glibc's default malloc,
    took at least :data:`NOTABLE_FAULTS` more page faults a pass than its original (per-pass
    counts, :attr:`Latency.page_faults`): a sentence saying so and what removes that cost;
    else None (counts unknown, another device or engine, another allocator, or no such gap).
    A count that is not a number >= 0 (or None) is refused with a ValueError."""
    for name, count in (("original_faults", original_faults),
                        ("compressed_faults", compressed_faults)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Real)
                                  or not count >= 0 or count == float("inf")):
            raise ValueError(f"{name}: expected a count of page faults >= 0 or None, got "
                             f"{count!r}")
    if original_faults is None or compressed_faults is None or str(device) != "cpu" or \
            check_engine(engine) != "eager" or allocator() != "glibc":
        return None
    extra = compressed_faults - original_faults
    if extra < NOTABLE_FAULTS:
        return None
    import resource

    mb = extra * resource.getpagesize() / 2**20
    return (f"the compressed model took {compressed_faults:,.0f} page faults a pass against "
            f"{original_faults:,.0f} for the original ({mb:,.0f} MB more memory mapped in "
            f"afresh every pass): glibc's malloc gives freed memory back to the OS and faults "
            f"it in again at the next allocation, and a factorized model has more intermediate "
            f"tensors. Keeping freed memory removes that cost: "
            f"rankcut.profile.keep_freed_memory() (--keep-freed-memory) in this process, "
            f"MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824 or a preloaded "
            f"jemalloc in a deployment (docs/benchmarks.md, 'The C allocator')")


def default_allocator() -> str:
    """What :func:`allocator` says of this platform's C allocator left as it is."""
    import platform

    return "glibc" if _glibc() is not None else (platform.libc_ver()[0] or platform.system())


def _env_bytes(name: str) -> int | None:
    import os

    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def allocator() -> str:
    """What gives CPU tensors their memory in this process, as timings depend on it: a
    preloaded ``"jemalloc"``, ``"tcmalloc"`` or ``"mimalloc"``; ``"glibc, freed memory kept"``
    after :func:`keep_freed_memory`, or with ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` both at least 32 MB in the environment; ``"glibc, tuned by the
    environment"`` with other ``MALLOC_*_`` or ``GLIBC_TUNABLES`` malloc settings; else
    :func:`default_allocator` (``"glibc"``: its defaults)."""
    import os

    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED:
        if name in preload:
            return name
    if _glibc() is None:
        return default_allocator()
    if _kept:
        return "glibc, freed memory kept"
    mmap, trim = _env_bytes("MALLOC_MMAP_THRESHOLD_"), _env_bytes("MALLOC_TRIM_THRESHOLD_")
    if mmap is not None and trim is not None and min(mmap, trim) >= 32 << 20:
        return "glibc, freed memory kept"
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc, tuned by the environment"
    return "glibc"


# What a pass is timed in: PyTorch itself, or the model exported to ONNX (as rc.export writes it)
# and run by ONNX Runtime on the CPU (all graph optimisations, torch's intra-op thread count).
ENGINES = ("eager", "onnxruntime")


def check_engine(engine) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def ort_session(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """An ONNX Runtime session (CPU) of ``model`` exported on ``inputs`` as :func:`rankcut.export`
    exports it (opset 17, fixed shapes), with every graph optimisation and torch's intra-op thread
    count."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("engine 'onnxruntime' needs onnx and onnxruntime: pip install "
                          "'rankcut[export]'") from None
    from .export import _expected_warnings_ignored, _export_onnx

    with tempfile.TemporaryDirectory() as tmp, eval_mode(model), torch.no_grad():
        path = Path(tmp) / "model.onnx"
        with _expected_warnings_ignored():
            _export_onnx(model, inputs, path, opset=17, dynamic_batch=False, check=False,
                         atol=0.0)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_timer(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    session = ort_session(model, inputs)
    feeds = {i.name: x.detach().cpu().numpy()
             for i, x in zip(session.get_inputs(), inputs, strict=True)}

    def run() -> float:
        start = time.perf_counter()
        session.run(None, feeds)
        return (time.perf_counter() - start) * 1e3

    return run, "cpu (onnxruntime)"


def _timer(model: nn.Module, inputs: tuple[torch.Tensor, ...], engine: str = "eager"):
    if check_engine(engine) == "onnxruntime":
        return _ort_timer(model, inputs)
    device = model_device(model, inputs[0].device)
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


def _summary(times: list[float], batch: int, device: str,
             faults: float | None = None) -> Latency:
    # (inclusive: quartiles within the runs' range; the default extrapolates past it, below
    # zero for two runs; the median is the same either way)
    q1, median, q3 = (statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1
                      else times * 3)
    return Latency(median, q1, q3, len(times), batch, torch.get_num_threads(), device, faults,
                   min(times))


def check_counts(warmup: int, repeats: int) -> None:
    """Refuse timing counts that are not whole numbers (``warmup`` >= 0, ``repeats`` >= 1)."""
    def whole(n) -> bool:
        return isinstance(n, numbers.Integral) and not isinstance(n, bool)

    if not (whole(warmup) and whole(repeats)) or warmup < 0 or repeats < 1:
        raise ValueError(f"warmup, repeats: expected ints >= 0 and >= 1, got {warmup!r}, "
                         f"{repeats!r}")


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _tensor_dims(modules) -> list[int]:
    return [t.ndim for m in modules if m is not None
            for t in itertools.chain(m.parameters(), m.buffers())]


def beyond_channels_last(*modules: nn.Module | None) -> bool:
    """Whether ``modules`` hold a parameter or buffer that channels_last cannot take (5-D and
    up: a Conv3d's)."""
    return any(d > 4 for d in _tensor_dims(modules))


def suits_channels_last(*modules: nn.Module | None) -> bool:
    """A 2-D convolution's weight among ``modules``' parameters, and nothing
    :func:`beyond_channels_last`: whether the layout is worth trying on them (the training
    loop and :func:`rankcut.fuse` ask)."""
    dims = _tensor_dims(modules)
    return 4 in dims and all(d <= 4 for d in dims)


def layer_input(module: nn.Module, shape: tuple, batch: int,
                memory_format: str = "contiguous") -> torch.Tensor:
    """A random input of ``batch`` samples for a Conv2d or Linear whose recorded input is
    ``shape`` ((H, W) of a Conv2d, or (rows,) per sample of a Linear): what a layer is timed
    on (the time of a pass does not depend on the values)."""
    device = module.weight.device
    dtype = module.weight.dtype
    if isinstance(module, nn.Conv2d):
        x = torch.randn(batch, module.in_channels, *shape, device=device, dtype=dtype)
        return x.contiguous(memory_format=MEMORY_FORMATS[memory_format])
    return torch.randn(batch * shape[0], module.in_features, device=device, dtype=dtype)


@torch.no_grad()
def measure_latency(model: nn.Module, example_inputs, *, warmup: int = 10,
                    repeats: int = 50, engine: str = "eager") -> Latency:
    """Time ``model(*example_inputs)`` on the device of the model's parameters: ``warmup``
    untimed passes, then ``repeats`` timed ones, in eval mode under no_grad (modes restored).
    ``engine="onnxruntime"``: the model exported to ONNX and run by ONNX Runtime on the CPU
    (:func:`ort_session`; the export is not timed)."""
    check_module(model)
    check_counts(warmup, repeats)
    inputs = as_inputs(example_inputs)
    with eval_mode(model), forward_on(inputs):
        run, device = _timer(model, inputs, engine)
        for _ in range(warmup):
            run()
        before = page_faults()
        times = [run() for _ in range(repeats)]
        faults = None if before is None else (page_faults() - before) / repeats
    return _summary(times, inputs[0].shape[0] if inputs[0].ndim else 1, device, faults)


@torch.no_grad()
def compare_latency(first: nn.Module, second: nn.Module, example_inputs, *, warmup: int = 5,
                    repeats: int = 30, engine: str = "eager",
                    second_inputs=None) -> tuple[Latency, Latency]:
    """Latencies of two modules on the same inputs (``second_inputs``: the second's own, e.g.
    what it receives inside its model, in its memory format), their timed passes interleaved
    (first, second, first, ...), so that a change in the machine's speed affects both alike;
    in ``engine`` (see :func:`measure_latency`)."""
    check_module(first, "first")
    check_module(second, "second")
    check_counts(warmup, repeats)
    inputs = as_inputs(example_inputs)
    other = inputs if second_inputs is None else as_inputs(second_inputs)
    with eval_mode(first), eval_mode(second):
        (run_a, dev_a), (run_b, dev_b) = (_timer(first, inputs, engine),
                                          _timer(second, other, engine))
        if dev_a != dev_b:  # a CPU time against a GPU's would read as a speed-up
            raise ValueError(f"the two models are on different devices ({dev_a} and {dev_b}); "
                             "put them on one to compare their latency")
        # the first pass of each, untimed, names the inputs it fails on
        with forward_on(inputs):
            run_a()
        with forward_on(other, "example_inputs" if second_inputs is None else "second_inputs"):
            run_b()
        with forward_on(inputs):
            for _ in range(warmup - 1):
                run_a()
                run_b()
            faults = [0, 0] if page_faults() is not None else None

            def counted(run, which: int) -> float:  # (the count outside the timed span)
                if faults is None:
                    return run()
                before = page_faults()
                ms = run()
                faults[which] += page_faults() - before
                return ms

            pairs = [(counted(run_a, 0), counted(run_b, 1)) for _ in range(repeats)]
    batch = inputs[0].shape[0] if inputs[0].ndim else 1
    per_pass = (None, None) if faults is None else (faults[0] / repeats, faults[1] / repeats)
    return (_summary([a for a, _ in pairs], batch, dev_a, per_pass[0]),
            _summary([b for _, b in pairs], batch, dev_b, per_pass[1]))


def speedups(dense: nn.Module, small: nn.Module, example_inputs, batches=(1, 32), *,
             fused: bool = True, repeats: int = 30, engine: str = "eager") -> list[dict]:
    """``dense`` against ``small`` at each batch size (``example_inputs`` repeated to it): the
    models as they are ("plain") and, with ``fused``, both as :func:`rankcut.export` deploys them
    (:func:`rankcut.fuse`, each in the memory format that runs it faster at that batch).
    One row per batch and form: dense and compressed medians (interleaved runs), the speed-up
    (dense time / compressed time, above 1 when the compressed model is faster), and each one's
    page faults a pass (``dense_faults``, ``compressed_faults``: :attr:`Latency.page_faults`;
    :func:`allocator_advice` reads them). ``engine``: see
    :func:`measure_latency` (ONNX Runtime: fused only, as :func:`rankcut.export` writes the file;
    ONNX Runtime chooses its own layouts)."""
    from .fuse import fuse

    check_engine(engine)
    rows = []
    for batch in _check_batches(batches):
        x = with_batch(example_inputs, batch)
        pairs = [("plain", dense, small)] if engine == "eager" else []
        if fused or engine != "eager":
            layout = "auto" if engine == "eager" else None
            pairs.append(("fused", fuse(dense, x, memory_format=layout, check=False),
                          fuse(small, x, memory_format=layout, check=False)))
        for form, a_model, b_model in pairs:
            a, b = compare_latency(a_model, b_model, x, repeats=repeats, engine=engine)
            rows.append({"batch": batch, "form": form, "engine": engine,
                         "dense_ms": a.median_ms, "compressed_ms": b.median_ms,
                         "speedup": a.median_ms / b.median_ms,
                         "dense_faults": a.page_faults, "compressed_faults": b.page_faults})
    return rows


# ---------------------------------------------------------------------------------------------
# Per-layer profile


def param_bytes(module: nn.Module) -> int:
    """Bytes that the parameters of ``module`` occupy (each tensor once; buffers excluded)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def model_bytes(model: nn.Module) -> int:
    """Size in bytes of ``model.state_dict()`` serialised as safetensors, as ``rankcut.save``
    writes it (parameters and buffers, shared tensors once, plus the JSON header)."""
    from safetensors.torch import save_model

    check_module(model)
    with tempfile.TemporaryDirectory(prefix="rankcut-bytes-") as folder:
        path = Path(folder) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def layer_units(model: nn.Module) -> dict[str, nn.Module]:
    """The units :func:`profile` reports, in module order: every factorized layer
    (``rankcut.layers.FactorizedLayer``) and every Conv2d / Linear outside one."""
    units: dict[str, nn.Module] = {}
    factorized: list[str] = []
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in factorized):
            continue
        if isinstance(module, FactorizedLayer):
            units[name] = module
            factorized.append(name)
        elif isinstance(module, nn.Conv2d | nn.Linear):
            units[name] = module
    return units


def with_batch(example_inputs, batch: int) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` with ``batch`` samples along dim 0: the first ones, or the samples
    repeated in order when more are asked for than given. 0-d tensors are left alone."""
    inputs = as_inputs(example_inputs)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    out = []
    for x in inputs:
        if x.ndim == 0 or x.shape[0] == batch:
            out.append(x)
        else:
            out.append(x[torch.arange(batch, device=x.device) % x.shape[0]])
    return tuple(out)


@torch.no_grad()
def unit_call_args(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                   units: dict[str, nn.Module]) -> dict[str, tuple[int, tuple]]:
    """Per unit: (times called, positional arguments of its first call) in one forward pass."""
    seen: dict[str, list] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            entry = seen.setdefault(name, [0, args])
            entry[0] += 1

        return record

    inputs = on_model_device(model, inputs)
    with hooked(model, [(unit, hook(name)) for name, unit in units.items()], pre=True):
        model(*inputs)
    return {name: (calls, args) for name, (calls, args) in seen.items()}


def _unit_of(leaf: str, units: dict[str, nn.Module]) -> str | None:
    """The unit a :func:`layer_macs` entry belongs to: itself, or its enclosing factorized
    layer; None for one no unit holds (an nn.MultiheadAttention's input projections, counted
    under the attention module's own name)."""
    if leaf in units:
        return leaf
    parts = leaf.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in units:
            return prefix
    return None


def _check_batches(batches) -> tuple[int, ...]:
    if isinstance(batches, int):
        batches = (batches,)
    if not isinstance(batches, tuple | list | range):
        raise ValueError(f"batches: expected an int or a sequence of ints >= 1, got {batches!r}")
    batches = tuple(batches)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches: expected ints >= 1, got {batches!r}")
    return batches


@dataclass
class LayerProfile:
    """One unit of a model (see :func:`profile`).

    ``macs``: for one sample, over all calls in a forward pass. ``calls``: how often the unit ran
    in that pass (0: never, so no input to time it on). ``input_shape``: its first call's input at
    batch 1. ``latency``: batch -> :class:`Latency` of one call at that batch.
    """

    name: str
    kind: str
    params: int
    macs: int
    param_bytes: int
    calls: int
    input_shape: list[int] | None = None
    latency: dict[int, Latency] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = {str(b): lat.to_dict() for b, lat in self.latency.items()}
        return d


@dataclass
class Profile:
    """What :func:`profile` measured: ``layers`` (units, in module order) and the whole model.

    ``params``: all parameters of the model (``layer_params`` of them in the units, the rest in
    norms, embeddings and the like); ``macs``: one sample, every Conv2d/Linear; ``model_bytes``:
    the safetensors file; ``latency``: batch -> whole-model :class:`Latency`; ``batch``: the batch
    of ``example_inputs`` (the user's batch).
    """

    layers: list[LayerProfile]
    params: int
    macs: int
    param_bytes: int
    model_bytes: int
    batch: int
    latency: dict[int, Latency]
    threads: int
    device: str
    torch_version: str = torch.__version__
    shared_params: int = 0  # parameter elements two or more units hold (tied weights)

    @property
    def layer_params(self) -> int:
        """The parameters in the units, a tied one counted once (as ``params`` counts it)."""
        return sum(layer.params for layer in self.layers) - self.shared_params

    def layer(self, name: str) -> LayerProfile:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no unit named {name!r} in this profile")

    def to_dict(self) -> dict:
        return {"layers": [layer.to_dict() for layer in self.layers], "params": self.params,
                "layer_params": self.layer_params, "macs": self.macs,
                "param_bytes": self.param_bytes, "model_bytes": self.model_bytes,
                "batch": self.batch,
                "latency": {str(b): lat.to_dict() for b, lat in self.latency.items()},
                "threads": self.threads, "device": self.device,
                "torch_version": self.torch_version}

    def __str__(self) -> str:
        batches = sorted(self.latency)
        head = ["layer", "type", "params", "MACs", *[f"ms @{b}" for b in batches]]
        rows = [head]
        for layer in self.layers:
            rows.append([layer.name, layer.kind, f"{layer.params:,}", f"{layer.macs:,}",
                         *[f"{layer.latency[b].median_ms:.3f}" if b in layer.latency else ""
                           for b in batches]])
        rows.append(["total", "", f"{self.params:,}", f"{self.macs:,}",
                     *[f"{self.latency[b].median_ms:.3f}" for b in batches]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{self.model_bytes:,} bytes as safetensors; {self.threads} threads, "
                     f"{self.device}, torch {self.torch_version}")
        return "\n".join(lines)


def profile(model: nn.Module, example_inputs, *, latency: bool = True, batches=(1,),
            warmup: int = 5, repeats: int = 30) -> Profile:
    """Params, MACs, bytes and (``latency=True``) measured latency of every unit of ``model``
    (see :func:`layer_units`) and of the whole model.

    MACs are counted analytically (as :func:`layer_macs`) for one sample, on the first sample of
    ``example_inputs``. Latency is timed with :func:`measure_latency` (``warmup`` untimed and
    ``repeats`` timed passes, median and quartiles) at each of ``batches`` and at the batch of
    ``example_inputs`` (the user's batch): the whole model on inputs of that batch (samples of
    ``example_inputs`` taken in order, repeated if needed), and every unit on the input it
    receives inside the model in that forward pass (one call; recorded by a hook). The model runs
    in eval mode under no_grad on its own device; modes are restored.
    """
    check_module(model)
    inputs = as_inputs(example_inputs)
    batches = _check_batches(batches)
    if latency:
        check_counts(warmup, repeats)
    user_batch = batch_of(inputs)
    one = with_batch(inputs, 1)
    units = layer_units(model)

    unit_macs = dict.fromkeys(units, 0)
    outside = 0  # MACs no unit holds (nn.MultiheadAttention's input projections): the total's
    for leaf, macs in layer_macs(model, one).items():
        unit = _unit_of(leaf, units)
        if unit is None:
            outside += macs
        else:
            unit_macs[unit] += macs
    first = unit_call_args(model, one, units)
    layers = []
    for name, unit in units.items():
        calls, args = first.get(name, (0, None))
        shape = list(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
        layers.append(LayerProfile(name, type(unit).__name__, count_params(unit),
                                   unit_macs[name], param_bytes(unit), calls, shape))

    device = str(model_device(model, inputs[0].device))
    whole: dict[int, Latency] = {}
    if latency:
        by_name = {layer.name: layer for layer in layers}
        for batch in sorted({*batches, user_batch}):
            x = with_batch(inputs, batch)
            whole[batch] = measure_latency(model, x, warmup=warmup, repeats=repeats)
            device = whole[batch].device
            for name, (_, args) in unit_call_args(model, x, units).items():
                by_name[name].latency[batch] = measure_latency(units[name], args, warmup=warmup,
                                                               repeats=repeats)
    # a parameter two units hold (tied weights) is in each unit's count: once too many
    held = {id(p): p for unit in units.values() for p in unit.parameters()}
    shared = sum(layer.params for layer in layers) - sum(p.numel() for p in held.values())
    return Profile(layers, count_params(model), sum(unit_macs.values()) + outside,
                   param_bytes(model),
                   model_bytes(model), user_batch, whole, torch.get_num_threads(), device,
                   shared_params=shared)
