"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one file, ``<checkpoint_dir>/last.pt``, replaced atomically (temporary file,
fsync, rename: see :func:`rankcut.io.atomic_path`), so a run killed while writing leaves the
previous checkpoint intact. It holds the model, optimizer, scheduler and gradient-scaler states,
the step, the position in the data order (epoch and batch within it), the history so far, the
RNG states of every process (torch, CUDA, numpy, Python) and the settings that fix the data
order, which a resumed run must share. It contains only tensors and plain Python values and is
read with ``torch.load(weights_only=True)``: loading it never runs pickled code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path

FORMAT = "rankcut.train.checkpoint"
VERSION = 1
FILENAME = "last.pt"


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The state of every random generator this process may draw from."""
    # the legacy global generator is the one user code (e.g. a transform) may draw from
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def path_in(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / FILENAME


def write(checkpoint_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format and version) atomically; returns the file."""
    path = path_in(checkpoint_dir)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return path


def read(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir``, or None when there is none yet."""
    path = path_in(checkpoint_dir)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file: say which
        raise ValueError(f"{path}: not a readable rankcut training checkpoint: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a rankcut training checkpoint")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not supported "
                         f"(expected {VERSION})")
    return payload


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run whose data order, length, precision or learning-rate schedule
    would differ from the saved one (a setting a checkpoint predates is not compared)."""
    diffs = [f"{k}: checkpoint {saved[k]!r}, now {v!r}" for k, v in current.items()
             if k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"{path}: cannot resume, the run's settings changed ("
                         + "; ".join(diffs) + "). Use the same settings, or another "
                         "checkpoint_dir to start afresh.")
