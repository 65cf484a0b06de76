"""``CandidateCache``: what ``rc.plan`` measures before any target matters, kept between calls.

Planning a model to several targets (a sweep of compression ratios, ``rankcut sweep``, the
reproductions' configs) repeats the costly part each time: the calibration moments of every
layer's input and every layer's error-versus-cost candidates (CP-ALS scoring, data-aware Tucker-2
at up to 32 rank pairs per layer). None of it depends on the target's value, only on its kind
(the candidate grids are drawn on params or MACs) and on the model, inputs, calibration data and
settings. A cache passed to ``rc.plan(..., cache=cache)`` keeps them, keyed by a fingerprint of
all of these (the SHA-256 of every parameter and buffer of the model and of the calibration
inputs, the input shapes, the method, rank rule, grid kind, rank multiple, solver options and the
eligible layers), so a hit is the same computation, never a stale one. It lives in memory and
holds at most ``max_entries`` fingerprints (least recently used dropped first). Memory: the
calibration moments are n x n per layer (n = input channels x kernel positions; a 512-channel
3x3 layer's is 170 MB in float64; a 25,088-wide classifier layer's 5 GB, which
``max_moment_bytes`` keeps out of memory while the plan is applied and fine-tuned).

With a ``folder`` (:meth:`CandidateCache.cached`: this machine's cache folder, where the latency
tables are kept too) the candidates are also written to disk, one small JSON file per
fingerprint, so a later process planning the same model, data and settings (another target from
the command line, a rerun) skips the scoring. The moments are not written (hundreds of MB): with
data they are measured again, and the candidates are used only if their SHA-256 is the one the
file recorded (a model whose forward changed without its weights or printed structure showing
it feeds its layers other inputs: a miss). A file's name also hashes what the scores depend on
besides the inputs: rankcut's source code, the torch version and the thread count (the key holds
the model's weights and printed structure, the device, the data and every setting). A file that
cannot be read is a miss; one that cannot be written is a warning: planning never fails for the
cache. The folder keeps the newest :data:`MAX_FILES` files; a temporary file a writer killed
mid-write left is removed by a later write once it is :data:`STALE_TMP_S` old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .._fingerprint import code_digest, model_fingerprint, update
from ..atomic import atomic_path
from ..curves import Candidate

__all__ = ["CandidateCache", "data_fingerprint", "model_fingerprint"]


def data_fingerprint(batches, max_batches: int | None) -> str | None:
    """SHA-256 of the inputs of the calibration batches the planner reads (None: no data):
    read as the moments read them (:func:`rankcut.calibrate.calibration_inputs`: a tensor or a
    Dataset in batches, ``max_batches`` of those), so that data differing anywhere the moments
    look differs here too."""
    from ..calibrate import calibration_inputs

    if batches is None:
        return None
    h = hashlib.sha256()
    for x in calibration_inputs(batches, max_batches, allow_empty=True):
        update(h, x)
    return h.hexdigest()


class CandidateCache:
    """Per-layer candidates and calibration moments of ``rc.plan``, reused by later calls on
    the same model, inputs, data and settings; with ``folder``, the candidates also on disk
    (see the module docstring). ``max_moment_bytes``: an entry whose moments take more memory
    keeps its candidates only, as a file's entry does (the next plan measures the moments again
    and uses the candidates if they are the same); None: no limit."""

    def __init__(self, max_entries: int = 4, folder=None, max_moment_bytes: int | None = None):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries: expected an int >= 1, got {max_entries!r}")
        if max_moment_bytes is not None and (isinstance(max_moment_bytes, bool) or not
                                             isinstance(max_moment_bytes, int)
                                             or max_moment_bytes < 0):
            raise ValueError(f"max_moment_bytes: expected an int >= 0 or None, got "
                             f"{max_moment_bytes!r}")
        if folder is not None and not isinstance(folder, str | Path):
            raise ValueError(f"folder: expected a folder (str or Path) or None, got "
                             f"{type(folder).__name__}")
        self.max_entries = max_entries
        self.max_moment_bytes = max_moment_bytes
        self.folder = None if folder is None else Path(folder)
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._moments: dict[tuple, str] = {}  # the moments' digest each file read recorded
        self._stale: set[tuple] = set()  # files read whose moments were not those measured
        self._checked: set[tuple] = set()  # keys whose moments same_moments just found equal
        self.hits = self.misses = self.disk_hits = 0

    @classmethod
    def cached(cls, max_entries: int = 4, max_moment_bytes: int | None = None
               ) -> CandidateCache:
        """A cache that also keeps its candidates in this machine's cache folder
        (:func:`rankcut.select.latency.cache_dir`: ``$RANKCUT_CACHE``, else ``~/.cache/rankcut``;
        ``RANKCUT_CACHE=off``: in memory only)."""
        from .latency import cache_dir

        try:
            folder = cache_dir()
        except RuntimeError as err:  # no home folder
            warnings.warn(f"candidate cache: no cache folder ({err}); kept in memory only",
                          stacklevel=2)
            folder = None
        return cls(max_entries, folder=folder, max_moment_bytes=max_moment_bytes)

    def get(self, key: tuple, disk: bool = True, layers=()):
        """``(moments, candidates per layer)`` kept for ``key``, or None; from disk (unless
        ``disk`` is False) the moments are None: measure them again and check them with
        :meth:`same_moments`. A file that lacks candidates for one of ``layers`` is damaged: a
        miss, written over by the next :meth:`put`."""
        if key in self._entries and all(n in self._entries[key][1] for n in layers):
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        read = self._read(key) if disk else None
        if read is not None and any(name not in read[1] for name in layers):
            self._stale.add(key)
            read = None
        if read is not None:
            self.hits += 1
            self.disk_hits += 1
            self._moments[key] = read[0]
            return None, read[1]
        self.misses += 1
        return None

    def same_moments(self, key: tuple, moments: dict) -> bool:
        """Whether ``moments`` are those the candidates kept for ``key`` without moments (read
        from disk, or held without them: ``max_moment_bytes``) were scored on (counted as a
        miss, not a hit, when not)."""
        if self._moments.get(key) == _moments_digest(moments):
            self._checked.add(key)
            return True
        self._stale.add(key)  # written over by the next put
        self.hits -= 1
        if key not in self._entries:  # the hit was a file's (a kept entry is in memory)
            self.disk_hits -= 1
        self.misses += 1
        return False

    def put(self, key: tuple, value, disk: bool = True) -> None:
        moments, cands = value
        # the digest of moments same_moments has just found equal to the recorded one is that
        # one (not hashed again: GBs); others are hashed when needed
        digest = self._moments.get(key) if key in self._checked else None
        self._checked.discard(key)
        if (self.max_moment_bytes is not None and moments
                and _nbytes(moments) > self.max_moment_bytes):
            # kept as a file's entry is: candidates only, the moments measured again by the
            # next plan and checked against this digest (a 25,088-wide layer's moment is 5 GB)
            digest = self._moments[key] = digest or _moments_digest(moments)
            value = (None, cands)
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        path = self.path(key) if disk else None
        try:
            if path is None or (path.is_file() and key not in self._stale):
                return
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({
                    "format": FORMAT, "moments": digest or _moments_digest(moments),
                    "layers": {name: [_to_json(c) for c in cands]
                               for name, cands in cands.items()}}))
            self._stale.discard(key)
            _prune(path.parent)
        except (OSError, TypeError, ValueError) as err:
            warnings.warn(f"candidate cache: could not write {path} ({err}); planning goes on",
                          stacklevel=3)

    def path(self, key: tuple) -> Path | None:
        """The file of ``key`` in the folder (None without one)."""
        if self.folder is None:
            return None
        h = hashlib.sha256(f"{key!r}|{code_digest()}|torch={torch.__version__}|"
                           f"threads={torch.get_num_threads()}".encode())
        return self.folder / f"candidates-{h.hexdigest()[:24]}.json"

    def _read(self, key: tuple) -> tuple[str, dict] | None:
        path = self.path(key)
        try:
            if path is None or not path.is_file():
                return None
            payload = json.loads(path.read_text())
            if payload.get("format") != FORMAT or not isinstance(payload["moments"], str):
                raise ValueError("not a candidate file of this format")
            return payload["moments"], {name: [_from_json(c) for c in cands]
                                        for name, cands in payload["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # unreadable or damaged: a miss, computed and written over by the next put
            self._stale.add(key)
            return None

    def clear(self) -> None:
        """Forget the entries held in memory (files on disk stay)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


FORMAT = "rankcut.candidates/1"
MAX_FILES = 200  # candidate files kept in a cache folder (the oldest written are removed)
STALE_TMP_S = 3600  # a temporary candidate file older than this is a killed writer's: removed


def _moments_digest(moments: dict) -> str:
    """SHA-256 of the calibration moments, layer by layer ({} without data)."""
    h = hashlib.sha256()
    for name in sorted(moments):
        h.update(name.encode())
        for m in moments[name]:
            update(h, m)
    return h.hexdigest()


def _nbytes(moments: dict) -> int:
    return sum(m.numel() * m.element_size() for ms in moments.values() for m in ms)


def _prune(folder: Path) -> None:
    def written(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # removed meanwhile by another process's pruning
            return 0.0

    files = sorted(folder.glob("candidates-*.json"), key=written)
    for old in files[:-MAX_FILES]:
        with contextlib.suppress(OSError):
            old.unlink(missing_ok=True)
    # the temporary files of writers killed mid-write (a live writer's is seconds old)
    cutoff = time.time() - STALE_TMP_S
    for tmp in folder.glob(".candidates-*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def _to_json(c: Candidate) -> dict:
    return {"method": c.method, "ranks": list(c.ranks), "form": c.form, "params": c.params,
            "macs": c.macs, "error": c.error, "extra": c.extra}


def _from_json(d: dict) -> Candidate:
    return Candidate(d["method"], tuple(int(r) for r in d["ranks"]), d["form"], int(d["params"]),
                     int(d["macs"]), float(d["error"]), dict(d["extra"]))
