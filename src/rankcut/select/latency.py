"""Latency for the planner: a table of measured times, built once per device and reused.

A factorized layer does fewer MACs but runs several smaller kernels in a row; on a CPU at
batch 1, or for a depthwise CP stage, or at a rank that suits no kernel, it can be slower than
the dense layer it replaces. MACs do not say which: the planner spends measured time instead.

A :class:`LatencyTable` holds the median time of *primitives*: one ``nn.Conv2d`` or ``nn.Linear``
configuration at one input size and batch, measured alone on one device (the device, torch
threads, dtype, memory format and engine are the table's ``setting``). Every layer the planner
prices is a chain of primitives: a dense layer is one, a factorized layer is its sub-layers (read
off its structure, built on the ``meta`` device, so nothing is allocated), and its time is
their sum. Primitives are shared widely -- by the blocks of a ResNet stage, by candidates of one
method at neighbouring ranks (a Tucker-2 layer's first 1x1 conv is that of every Tucker-2 layer
with the same input rank, and of CP at that rank) -- so a model's table is built in a few
hundred small timings. The rest of a model (activations, additions, pooling) is measured once per
model: the fused dense model's time less its layers'.

Primitives are measured when first needed and kept; :meth:`LatencyTable.save` writes them as
JSON and :meth:`LatencyTable.load` reads them back, so planning again (another target, another
session) times nothing it has already timed, and the same table and inputs give the same plan.
A plan made without a table uses this machine's cached one (:func:`cache_dir`; one file per
setting) and adds what it measured to it: timing is paid once per device, not once per plan.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from pathlib import Path

import torch
from torch import nn

from .._fingerprint import code_digest
from .._modes import as_inputs, available_device, run_watching_layers
from ..atomic import atomic_path, file_target_problem
from ..curves import RANK_ALIGN
from ..fuse import fuse
from ..layers import input_shape, rebuild
from ..profile import (
    MEMORY_FORMATS,
    allocator,
    check_counts,
    check_engine,
    compare_latency,
    default_allocator,
    layer_input,
    measure_latency,
    with_batch,
)
from ..surgery import structure

FORMAT_VERSION = 1
# How a primitive is timed; a table whose times were taken another way keeps none of them (its
# times and these would not compare). 2: a slow kernel by the fastest of its 3 runs, not their
# median (2026-12-04)
TIMING_METHOD = 2
# Ranks are timed rounded up to a multiple of this. Convolution kernels work on blocks of
# channels: on the 2-core x86 CPU we measured (channels_last, oneDNN) a 1x1 or 3x1 conv with
# 29..32 or 37..40 output channels takes the time of 32 or 40 within noise, and steps between.
# Pricing rank r as its block keeps the table small (a layer's ranks in steps of 8) and costs
# the planner nothing: at equal time, the full block has the lower error. Above 8 blocks the step
# doubles with every doubling of the rank (16 from 128, 32 from 256, ...: at most 1/8 of it, so a
# rank is priced at most 12.5% high): VGG-11-BN's 512-channel layers at batch 32 otherwise put
# 3,495 primitives in its table, 189 s of its 304 s first plan at 2x fewer MACs.
RANK_STEP = RANK_ALIGN
# About this many milliseconds of timed runs per primitive (fewer runs than ``repeats`` above
# it). Two tables of torchvision ResNet-18 at 224x224 built alike at 25 ms differed by 3-5% in
# the median primitive and 16-20% at the 90th percentile, about as much as one at 5 ms differed
# from them (no bias: median ratio 0.99-1.0); the machine's state from minute to minute sets the
# noise more than the count of runs (benchmarks/latency_noise.py, docs/planning.md). At 5 ms
# its 1,878 timings took 20 s instead of 44 s.
RUNS_MS = 5.0
# A plan timed whole (``compare_plan``) whose first reading lands within this fraction of the
# goal it is checked against (the guard's limit, a latency target's fraction of the dense time)
# is timed twice more, and the reading with the median ratio is kept: the rounds of one whole
# model in one process move by up to 10-15% on this CPU (docs/benchmarks.md, run C), enough to
# pass a plan that runs slower or refuse one that does not. Further from the goal one reading
# decides (the same decision either way); so plans far from it cost no more time.
CONFIRM_BAND = 0.1
CONFIRM_ROUNDS = 3


# what a primitive's key starts with (a whole model's entries start otherwise: _model_key)
PRIMITIVE_KINDS = ("conv ", "linear ")


def primitive_key(module: nn.Module, shape: tuple) -> str:
    """The table's key of a Conv2d or Linear at its recorded input ``shape``."""
    if isinstance(module, nn.Conv2d):
        pad = module.padding if isinstance(module.padding, str) else \
            "x".join(map(str, module.padding))
        return (f"conv {module.in_channels}>{module.out_channels} "
                f"k{'x'.join(map(str, module.kernel_size))} s{'x'.join(map(str, module.stride))} "
                f"p{pad} d{'x'.join(map(str, module.dilation))} g{module.groups} "
                f"b{int(module.bias is not None)}"
                f"{'' if module.padding_mode == 'zeros' else ' pm' + module.padding_mode}"
                f" @{'x'.join(map(str, shape))}")
    return (f"linear {module.in_features}>{module.out_features} "
            f"b{int(module.bias is not None)} @{shape[0] if shape else 1}")


def _leaves(layer: nn.Module, shape: tuple) -> list[tuple[str, nn.Module, tuple]]:
    """(key, primitive, input shape) of every Conv2d/Linear that ``layer`` (a Conv2d, a Linear or
    a factorized layer built on the meta device) runs, in order, for an input of ``shape``."""
    # (a parametrized one, spectral-normed say, holds its parametrizations as children)
    if isinstance(layer, nn.Conv2d | nn.Linear) and all(
            n == "parametrizations" for n, _ in layer.named_children()):
        return [(primitive_key(layer, shape), layer, shape)]
    if hasattr(layer, "geometry"):  # a factorized convolution
        x = torch.empty(1, layer.geometry.in_channels, *shape, device="meta")
    else:
        x = torch.empty(shape[0] if shape else 1, layer.in_features, device="meta")
    found = []

    def record(name):
        def hook(module, args, output):
            s = input_shape(module, args[0], 1)
            found.append((primitive_key(module, s), module, s))
        return hook

    run_watching_layers(layer, (x,), record)
    return found


def device_name(device: torch.device) -> str:
    """``"cuda: NVIDIA H200"``, ``"cpu: <model name>"``: what a table was measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {name}"


# Setting keys that name library versions: a table is still loaded where they differ (its times
# are then approximate), but the machine's cache keeps one file per version.
_VERSIONS = ("torch", "onnxruntime", "cudnn")


def _before_keys() -> dict:
    """What a table written before a setting's key was recorded was measured with: the
    platform's C allocator as it comes (every table so far)."""
    return {"allocator": default_allocator()}


def _library_versions(device: torch.device, engine: str) -> dict:
    out = {}
    if engine == "onnxruntime":
        try:
            import onnxruntime

            out["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass  # refused when the first time is taken, with how to install it
    if device.type == "cuda" and torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    return out


class LatencyTable:
    """Measured milliseconds of layers on one device (see the module docstring).

    Args:
        device: where to measure (a torch device or its name); the planner uses the device of
            the model's parameters.
        memory_format: ``"channels_last"`` (the faster one for convolutions on the CPUs and GPUs
            we measured) or ``"contiguous"``; deploy the model in the same format
            (``rc.fuse(memory_format=...)``).
        warmup, repeats: untimed and (at least) timed runs of each primitive; the median is
            kept. A primitive faster than ``RUNS_MS``/``repeats`` ms gets more runs (up to 200,
            about ``RUNS_MS`` ms of them); a slower one is timed by the fastest of 3 runs after
            1 untimed (on VGG-11-BN at batch 32 its layers take tens of ms, and the table is
            most of the planning time; the first runs of a fresh kernel still pay for memory
            mapped in afresh, which their median took in: up to 1.4x).
        engine: what the times are of: ``"eager"`` (PyTorch) or ``"onnxruntime"`` (each layer,
            and the model, exported to ONNX and run by ONNX Runtime on the CPU:
            :func:`rankcut.profile.ort_session`), for a model that will be deployed there. A
            plan made with an ONNX Runtime table is kept no slower than dense (or meets its
            latency target) in ONNX Runtime.
    """

    def __init__(self, device="cpu", *, memory_format: str = "channels_last",
                 dtype: torch.dtype = torch.float32, warmup: int = 3, repeats: int = 9,
                 engine: str = "eager"):
        check_engine(engine)
        if engine == "onnxruntime" and (str(device).partition(":")[0] != "cpu"
                                        or dtype != torch.float32):
            raise ValueError(f"engine: 'onnxruntime' times float32 models on the CPU, not "
                             f"{_name(dtype)} on {device}")
        try:  # (a typo, or a GPU this machine lacks: torch's own error, or an assert, later)
            device = available_device(str(device))
        except ValueError as err:
            raise ValueError(f"device: {err}") from None
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format: expected one of {', '.join(MEMORY_FORMATS)}, got "
                             f"{memory_format!r}")
        check_counts(warmup, repeats)
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.dtype = dtype
        self.warmup, self.repeats = int(warmup), int(repeats)  # (NumPy ints: JSON)
        self.engine = engine
        self.setting = {"device": device_name(self.device), "threads": torch.get_num_threads(),
                        "dtype": _name(dtype),
                        "memory_format": memory_format, "engine": engine,
                        "torch": torch.__version__, **_library_versions(self.device, engine)}
        if self.device.type == "cpu":  # (eager CPU timings hang on it: profile.allocator)
            self.setting["allocator"] = allocator()
        self.entries: dict[str, dict[str, float]] = {}  # key -> {str(batch): ms}
        self.measured = 0  # timings taken by this object (not loaded)
        self._chains: dict[tuple, list] = {}
        # which primitives a factorized layer runs: "<layer key> <config JSON>" -> their keys.
        # Kept in the file, so that a later plan sums known times without building and
        # tracing thousands of candidate layers again (most of a reused plan's time)
        self.chains: dict[str, list[str]] = {}
        self._new_chains = 0
        self._deployed: dict[tuple, nn.Module] = {}  # dense models fused for compare_plan
        # compare_plan's page faults a pass, (dense, planned), per plan entry and batch: with
        # its times in the file, as they explain them (glibc's malloc; profile.allocator_advice
        # reads them), so a refusal read back from the table still says why. Eager CPU only:
        # elsewhere the host's faults are not the timed pass's cost
        self.page_faults: dict[str, dict[str, list[float]]] = {}
        self.file: Path | None = None  # where rc.plan writes it back (at(), cached())
        self._in_cache = False

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "setting": self.setting, "code": code_digest(),
                "timing": {"warmup": self.warmup, "repeats": self.repeats,
                           "method": TIMING_METHOD},
                "entries": dict(sorted(self.entries.items())),
                "chains": dict(sorted(self.chains.items())),
                "page_faults": dict(sorted(self.page_faults.items()))}

    def save(self, path) -> Path:
        """Write the table to ``path`` as JSON (atomically: a reader never sees half a file)."""
        problem = file_target_problem(path)
        if problem is not None:
            raise ValueError(f"latency table: {problem}")
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path, device="cpu") -> LatencyTable:
        """A table saved by :meth:`save`, to be used (and extended) on ``device``. Raises
        ValueError when it was measured in another setting (device, threads, dtype, engine):
        its times would not hold here."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"latency table: cannot read {path}: {err}") from None
        if (not isinstance(data, dict) or data.get("format") != FORMAT_VERSION
                or not isinstance(data.get("setting"), dict)
                or not isinstance(data.get("entries"), dict)):
            raise ValueError(f"latency table: {path} is not a rankcut latency table (format "
                             f"{FORMAT_VERSION})")
        setting = data["setting"]
        timing = data.get("timing", {})
        if not isinstance(timing, dict):
            raise ValueError(f"latency table: {path}: a damaged setting (timing: {timing!r})")
        if setting.get("engine") == "onnxruntime":  # timed on the CPU, whatever runs the model
            device = "cpu"
        try:
            table = cls(device, memory_format=setting["memory_format"],
                        dtype=getattr(torch, setting["dtype"]),
                        engine=setting.get("engine", "eager"),
                        **{k: v for k, v in timing.items() if k != "method"})
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"latency table: {path}: a damaged setting ({err!r})") from None
        setting = {**_before_keys(), **setting}  # (a table from before a key was recorded)
        differs = {k: (setting.get(k), v) for k, v in table.setting.items()
                   if k not in _VERSIONS and setting.get(k) != v}
        if differs:
            said = "; ".join(f"{k}: {a!r} in the table, {b!r} here" for k, (a, b) in
                             differs.items())
            raise ValueError(f"latency table: {path} was measured in another setting ({said}); "
                             "build a table on this device")
        bad = next((k for k, v in data["entries"].items() if not _times_ok(v)), None)
        if bad is not None:
            raise ValueError(f"latency table: {path}: a damaged entry {bad!r} (expected "
                             "{batch: milliseconds})")
        table.entries = {k: dict(v) for k, v in data["entries"].items()}
        faults = data.get("page_faults", {})  # (tables written before they were kept: none)
        bad = next((k for k, v in faults.items() if not _pairs_ok(v)), None) \
            if isinstance(faults, dict) else "page_faults"
        if bad is not None:
            raise ValueError(f"latency table: {path}: a damaged page-fault count {bad!r} "
                             "(expected {batch: [dense, planned]})")
        table.page_faults = {k: {b: list(v) for b, v in pairs.items()}
                             for k, pairs in faults.items()}
        chains = data.get("chains", {})  # tables written before chains were kept have none
        if timing.get("method", 1) != TIMING_METHOD:  # timed another way: dropped, not mixed
            table.entries, table.page_faults = {}, {}
        if data.get("code") != code_digest():
            # written by other rankcut code: a primitive's time holds, but which primitives a
            # factorized layer runs, and what a fused model runs besides its layers, may not
            chains = {}
            table.entries = {k: v for k, v in table.entries.items()
                             if k.startswith(PRIMITIVE_KINDS)}
            table.page_faults = {}  # (whole-model readings, dropped with them)
        if isinstance(chains, dict):
            table.chains = {k: list(v) for k, v in chains.items() if isinstance(v, list)
                            and all(isinstance(key, str) for key in v)}
        return table

    @classmethod
    def at(cls, path, device="cpu", *, engine: str | None = None,
           dtype: torch.dtype | None = None) -> LatencyTable:
        """The table kept in the file ``path``: loaded when it exists (``engine`` and
        ``dtype``, if given, must be those it was measured with), else a new one (a path where
        no file can be written is refused now, before any work); ``rc.plan`` adds what it times
        and writes it back there (:meth:`write_back`)."""
        if Path(path).is_file():
            table = cls.load(path, device)
            if engine is not None and table.engine != engine:
                raise ValueError(f"latency table: {path} holds {table.engine} times, not "
                                 f"{engine}; give another file")
            if dtype is not None and table.engine == "eager" and table.dtype != dtype:
                raise ValueError(f"latency table: {path} holds {_name(table.dtype)} times, not "
                                 f"{_name(dtype)}; give another file")
        else:
            problem = file_target_problem(path)
            if problem is not None:
                raise ValueError(f"latency table: {problem}")
            table = cls(device, engine=engine or "eager",
                        dtype=dtype if dtype is not None and engine != "onnxruntime"
                        else torch.float32)
        table.file = Path(path)
        return table

    @classmethod
    def cached(cls, device="cpu", *, engine: str = "eager",
               dtype: torch.dtype = torch.float32) -> LatencyTable:
        """This machine's table for the setting (device, threads, ``dtype``, memory format,
        ``engine``, library versions), kept in the cache folder (:func:`cache_dir`): what
        ``rc.plan`` uses without a table. It is written back after each plan, so timing is paid
        once per machine. A damaged file is built again; a cache that cannot be read or written
        is warned about and planning goes on with a table kept in memory; with
        ``RANKCUT_CACHE=off`` it is a new table that is not kept."""
        table = cls(device, engine=engine, dtype=dtype)
        try:
            path = cache_path(table.setting)
            if path is not None and path.is_file():
                try:
                    table = cls.load(path, device)
                except ValueError:  # damaged: built again, and written over
                    pass
        except (OSError, RuntimeError) as err:  # no home folder, an unreadable cache
            _cache_warning(f"could not read this machine's latency cache ({err})")
            return table
        table.file, table._in_cache = path, path is not None
        return table

    def write_back(self) -> Path | None:
        """Save the table to its file (:meth:`at`, :meth:`cached`), keeping what another
        process added there meanwhile; returns the file, or None when the table has none,
        nothing new to add, or the write failed. The cache folder is made when missing. A
        failed write is a warning, not an error: the plan stands."""
        if self.file is None or (not self.measured and not self._new_chains
                                 and self.file.is_file()):
            return None
        if self.setting["threads"] != torch.get_num_threads():
            _cache_warning(f"not saved to {self.file}: it was measured with "
                           f"{self.setting['threads']} threads and torch now runs "
                           f"{torch.get_num_threads()}")
            return None
        if self.setting.get("allocator", now := allocator()) != now:
            _cache_warning(f"not saved to {self.file}: it was measured with the allocator "
                           f"{self.setting['allocator']!r} and this process now has {now!r}")
            return None
        try:
            if self.file.is_file():
                there = LatencyTable.load(self.file, self.device)
                for key, times in there.entries.items():
                    self.entries[key] = {**times, **self.entries.get(key, {})}
                for key, pairs in there.page_faults.items():
                    self.page_faults[key] = {**pairs, **self.page_faults.get(key, {})}
                self.chains = {**there.chains, **self.chains}
        except ValueError:  # damaged, or another setting: replaced by this table
            pass
        except OSError:
            pass  # unreadable: the write below says so
        try:
            if self._in_cache:
                self.file.parent.mkdir(parents=True, exist_ok=True)
            return self.save(self.file)
        except (OSError, ValueError) as err:
            how = (f"; set ${CACHE_ENV} to a writable folder, or to off" if self._in_cache
                   else "")
            _cache_warning(f"could not save the timings to {self.file} ({err}){how}")
            return None

    # ------------------------------------------------------------------ lookups
    def _kept(self, key: str, batch: int, again: bool, measure) -> float:
        """The entry ``key``'s time at ``batch``: ``measure()`` where it has none (or
        ``again``: timed afresh even where kept, the faster of the two readings kept)."""
        times, b = self.entries.setdefault(key, {}), str(batch)
        if again or b not in times:
            new = measure()
            times[b] = min(times[b], new) if b in times else new
            self.measured += 1
        return times[b]

    def _time(self, key: str, module: nn.Module, shape: tuple, batch: int,
              again: bool = False) -> float:
        def measure() -> float:
            prim = _materialise(module).to(self.device, self.dtype)
            if isinstance(prim, nn.Conv2d):
                prim = prim.to(memory_format=MEMORY_FORMATS[self.memory_format])
            x = layer_input(prim, shape, batch, self.memory_format)
            reading = measure_latency(prim, x, warmup=1, repeats=3, engine=self.engine)
            first = reading.median_ms
            if first * self.repeats > RUNS_MS:  # a slow kernel: the fastest of 3 runs tells
                # its time (the first runs after the untimed one may still map in its output)
                return first if reading.min_ms is None else reading.min_ms
            # small kernels (tens of microseconds) get more runs, about RUNS_MS of them: their
            # medians are otherwise at the mercy of a few noisy runs
            repeats = max(self.repeats, min(200, int(RUNS_MS / max(first, 1e-3))))
            return measure_latency(prim, x, warmup=max(0, self.warmup - 1), repeats=repeats,
                                   engine=self.engine).median_ms

        return self._kept(key, batch, again, measure)

    def layer_ms(self, module: nn.Module, shape: tuple, config: dict | None,
                 batch: int, again: bool = False) -> float:
        """The time of ``module`` (``config=None``) or of its replacement ``config`` (a
        factorized layer's ``config()``) at its recorded input ``shape`` and ``batch``; a
        factorized layer is timed at its ranks rounded up (:data:`RANK_STEP`). ``again``:
        its primitives timed afresh, each kept at the faster of that and the kept reading
        (:meth:`dense_ms`)."""
        if config is not None:
            full = _full_ranks(module, config)
            config = {k: _rounded(v, full) if k in ("rank", "ranks") else v
                      for k, v in config.items()}
        cache = (primitive_key(module, shape), None if config is None else
                 json.dumps(config, sort_keys=True))
        named = None if config is None else " ".join(cache)  # its entry in self.chains
        if named is not None and cache not in self._chains and not again:
            keys, b = self.chains.get(named), str(batch)
            if keys is not None and all(b in self.entries.get(k, {}) for k in keys):
                return sum(self.entries[k][b] for k in keys)
        chain = self._chains.get(cache)
        if chain is None:
            if config is None:
                chain = _leaves(module, shape)
            else:
                with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
                    chain = _leaves(rebuild(_materialise(module), config), shape)
                keys = [key for key, _, _ in chain]
                if self.chains.get(named) != keys:
                    self.chains[named] = keys
                    self._new_chains += 1
            self._chains[cache] = chain
        return sum(self._time(key, prim, s, batch, again) for key, prim, s in chain)

    def dense_ms(self, model: nn.Module, example_inputs, layers: dict[str, tuple],
                 batch: int) -> tuple[dict[str, float], float]:
        """({name: time}, the model's time) at ``batch``: each of ``layers`` ({name: (module,
        its recorded input shape)}, Conv2d/Linear layers of ``model``) in its dense form
        (:meth:`layer_ms`), and the whole fused dense model (:meth:`model_ms`). Where the
        layers alone take longer than the model that runs them, readings taken at different
        moments disagree (a table kept from a busier hour of the machine, another job running
        then: ResNet-20's 3x3 layers at batch 32 once kept at 1.8x their time, and every
        factorization looked twice as fast as it ran): both are timed again, each kept at the
        faster reading."""
        times = {n: self.layer_ms(m, shape, None, batch) for n, (m, shape) in layers.items()}
        model_ms = self.model_ms(model, example_inputs, batch)
        if math.fsum(times.values()) > model_ms:
            once = {primitive_key(m, shape): (m, shape) for m, shape in layers.values()}
            for m, shape in once.values():  # (layers of one shape share their primitive)
                self.layer_ms(m, shape, None, batch, again=True)
            times = {n: self.layer_ms(m, shape, None, batch) for n, (m, shape) in layers.items()}
            model_ms = self.model_ms(model, example_inputs, batch, again=True)
        return times, model_ms

    def model_ms(self, model: nn.Module, example_inputs, batch: int,
                 again: bool = False) -> float:
        """The fused dense ``model``'s measured time at ``batch`` (in the table's memory
        format), kept in the table per model and input shape. ``again``: timed afresh, the
        faster of that and the kept reading kept."""
        inputs = as_inputs(example_inputs)

        def measure() -> float:
            x = with_batch(inputs, batch)
            # (with the inputs: a model fx cannot trace is folded only where seen in a forward)
            dense = fuse(model, x, check=False, memory_format=self.memory_format)
            return measure_latency(dense, x, warmup=self.warmup, repeats=self.repeats,
                                   engine=self.engine).median_ms

        return self._kept(_model_key("model", model, inputs), batch, again, measure)

    def compare_plan(self, model: nn.Module, plan, example_inputs, batch: int,
                     repeats: int = 15, goal: float | None = None) -> tuple[float, float]:
        """(dense ms, planned ms) of ``model`` and of ``plan`` applied to it (fresh weights:
        the time does not depend on them), both fused as deployed (``rc.fuse``, each in the
        memory format that runs it faster), timed whole at ``batch``, interleaved. ``goal``: the
        planned / dense ratio the reading decides against; a first reading within
        :data:`CONFIRM_BAND` of it is taken :data:`CONFIRM_ROUNDS` times in all, the median
        ratio's kept. Kept in the table per model, input shape and plan, so a plan checked
        once is not timed again."""
        inputs = as_inputs(example_inputs)
        key = _plan_key(model, plan, inputs)
        times = self.entries.setdefault(key, {})
        if str(batch) not in times:
            # each in its faster format, as deployed (and as benchmarks/latency.py times them):
            # a factorized model's faster format need not be the dense model's
            x = with_batch(inputs, batch)
            deployed = (_model_key("model", model, inputs), batch)
            if deployed not in self._deployed:  # fused, its format chosen, once for all plans
                self._deployed[deployed] = fuse(model, x, check=False, memory_format="auto")
            dense = self._deployed[deployed]
            small = fuse(structure(model, plan), x, check=False, memory_format="auto")

            def reading() -> tuple[list[float], tuple]:  # (ms, page faults), each (d, p)
                d, p = compare_latency(dense, small, x, warmup=self.warmup, repeats=repeats,
                                       engine=self.engine)
                return [d.median_ms, p.median_ms], (d.page_faults, p.page_faults)

            def ratio(r: tuple[list[float], tuple]) -> float:  # planned / dense
                return r[0][1] / max(r[0][0], 1e-12)

            readings = [reading()]
            if goal is not None and abs(ratio(readings[0]) - goal) <= CONFIRM_BAND * goal:
                readings += [reading() for _ in range(CONFIRM_ROUNDS - 1)]
            readings.sort(key=ratio)
            times[str(batch)], faults = readings[len(readings) // 2]
            if self.device.type == "cpu" and self.engine == "eager" and None not in faults:
                self.page_faults.setdefault(key, {})[str(batch)] = list(faults)
            self.measured += len(readings)
        return tuple(times[str(batch)])

    def plan_page_faults(self, model: nn.Module, plan, example_inputs,
                         batch: int) -> tuple[float, float] | None:
        """(dense, planned) page faults a pass (``rankcut.profile.page_faults``) of the reading
        :meth:`compare_plan` kept for ``plan`` at ``batch`` (taken in this process, or read
        back from the table's file), where the platform counts them and the table times eager
        PyTorch on the CPU; else None."""
        counts = self.page_faults.get(_plan_key(model, plan, as_inputs(example_inputs)), {})
        pair = counts.get(str(batch))
        return None if pair is None else tuple(pair)


def _plan_key(model: nn.Module, plan, inputs: tuple) -> str:
    """The entry of ``plan`` applied to ``model``, deployed, on ``inputs``' shapes."""
    layers = json.dumps({n: [lp.method, list(lp.ranks), lp.form]
                         for n, lp in sorted(plan.active.items())})
    digest = hashlib.sha1(layers.encode()).hexdigest()[:16]
    return _model_key(f"deployed plan {digest}", model, inputs)


def _model_key(what: str, model: nn.Module, inputs: tuple) -> str:
    """A whole-model entry's key: ``what``, the model (class, parameter count and a digest of
    its structure: every module's type and settings as ``repr`` shows them, not its weights)
    and its inputs' shapes per sample. Two models that print alike share the entry: a change
    inside a ``forward`` that no module's repr shows is not seen."""
    shapes = "|".join("x".join(map(str, x.shape[1:])) for x in inputs)
    structure_ = hashlib.sha256(repr(model).encode()).hexdigest()[:12]
    return (f"{what} {type(model).__name__} {sum(p.numel() for p in model.parameters())} "
            f"{structure_} @{shapes}")


def _amount(v) -> bool:
    """Whether ``v`` is a finite number >= 0 (a time in ms, a count)."""
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) \
        and v >= 0


def _pair(v) -> bool:
    """Whether ``v`` is a (dense, planned) pair of amounts, as JSON keeps it: a list."""
    return isinstance(v, list) and len(v) == 2 and all(map(_amount, v))


def _times_ok(times) -> bool:
    """Whether a table entry is {batch: time}: a time in ms, or a (dense, planned) pair of
    them (a deployed plan's)."""
    return isinstance(times, dict) and all(
        isinstance(b, str) and (_amount(v) or _pair(v)) for b, v in times.items())


def _pairs_ok(pairs) -> bool:
    """Whether ``pairs`` is {batch: [dense, planned]} (page faults a pass)."""
    return isinstance(pairs, dict) and all(
        isinstance(b, str) and _pair(v) for b, v in pairs.items())


def _rounded(ranks, full: tuple[int, ...] | None = None):
    """The rank (or ranks) a layer is timed at: the next multiple of the step (see
    :data:`RANK_STEP`), but not past the layer's full rank ``full`` (one per rank; None: no
    bound), which no factorization of it has."""
    if isinstance(ranks, int):
        step = max(RANK_STEP, (1 << (max(ranks, 1).bit_length() - 1)) // 8)
        up = -(-ranks // step) * step
        return up if full is None else max(ranks, min(up, full[0]))
    return [_rounded(r, None if full is None else full[i:i + 1]) for i, r in enumerate(ranks)]


def _full_ranks(module: nn.Module, config: dict) -> tuple[int, ...] | None:
    """The most ``module`` holds under the factorized layer ``config`` describes: its method's
    ``max_rank`` in the config's form (a full factorization; CP's break-even rank, to which
    ``from_dense`` clamps); None for a layer no method builds."""
    from .. import methods

    for spec in methods.REGISTRY.values():
        if config.get("layer") in (getattr(spec.conv, "__name__", None),
                                   getattr(spec.linear, "__name__", None)):
            return spec.max_rank(module, config.get("form"))
    return None


def _materialise(module: nn.Module) -> nn.Module:
    """A real Conv2d/Linear shaped like ``module`` (which may live on the meta device)."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                         module.stride, module.padding, module.dilation, module.groups,
                         module.bias is not None, module.padding_mode).eval()
    return nn.Linear(module.in_features, module.out_features, module.bias is not None).eval()


CACHE_ENV = "RANKCUT_CACHE"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cache_warning(message: str) -> None:
    import warnings

    warnings.warn(f"latency table: {message}", stacklevel=4)


def cache_dir() -> Path | None:
    """Where the planner keeps this machine's latency tables between runs: ``$RANKCUT_CACHE``
    (``off``: nowhere), else ``$XDG_CACHE_HOME/rankcut``, else ``~/.cache/rankcut``."""
    import os

    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # RuntimeError: no home
    return Path(base) / "rankcut"


def cache_path(setting: dict) -> Path | None:
    """The cached table of ``setting`` (device, threads, dtype, memory format, engine, torch):
    one file per setting, so a table is only ever reused where its times hold."""
    root = cache_dir()
    if root is None:
        return None
    # (a key at what a table from before it was recorded counts as is left out: the same file)
    before = _before_keys()
    keyed = {k: v for k, v in setting.items() if before.get(k, ...) != v}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"latency-{digest}.json"


def as_table(latency_table, device, dtype: torch.dtype = torch.float32) -> LatencyTable:
    """``latency_table`` as given to ``rc.plan`` for a model on ``device`` computing in
    ``dtype``: a table, a path (:meth:`LatencyTable.at`), or None (this machine's cached table
    for that device and dtype, :meth:`LatencyTable.cached`). A table of another thread count,
    or (eager) of another device type or dtype, is refused: its layers' times would not be the
    model's, and the rest of the model (timed as it is) would be priced against them."""
    device = torch.device(device)
    if isinstance(latency_table, LatencyTable):
        if latency_table.setting["threads"] != torch.get_num_threads():
            raise ValueError(f"latency_table: measured with {latency_table.setting['threads']} "
                             f"threads, but torch now runs {torch.get_num_threads()}: its times "
                             "do not hold; plan with a table built at this thread count")
        if latency_table.setting.get("allocator", now := allocator()) != now:
            raise ValueError(f"latency_table: measured with the allocator "
                             f"{latency_table.setting['allocator']!r}, but this process now has "
                             f"{now!r} (rankcut.profile.keep_freed_memory): its times do not "
                             "hold; plan with a table built after it")
        if latency_table.engine == "eager" and (latency_table.device.type != device.type
                                                or latency_table.dtype != dtype):
            raise ValueError(f"latency_table: measured in {_name(latency_table.dtype)} on "
                             f"{latency_table.device}, but the model computes in {_name(dtype)} "
                             f"on {device}: its times do not hold; plan with a table built for "
                             "the model's device and dtype")
        return latency_table
    if latency_table is None:
        return LatencyTable.cached(device, dtype=dtype)
    if isinstance(latency_table, str | Path):
        return LatencyTable.at(latency_table, device, dtype=dtype)
    raise ValueError(f"latency_table: expected a LatencyTable, a path or None, got "
                     f"{type(latency_table).__name__}")
