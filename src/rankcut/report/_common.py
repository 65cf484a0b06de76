"""Shared pieces of reports: stated changes, the machine a report was made on, formatting."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# A metric's words for "the compressed value is lower" and "... is higher".
_WORDS = {"params": ("fewer", "more"), "macs": ("fewer", "more"),
          "bytes": ("smaller", "larger"), "latency": ("faster", "slower")}


def factor_text(factor: float) -> str:
    """``3.1`` -> ``"3.1x"``: three significant digits; three decimals below 1.01 (``"1.004x"``),
    so a near tie does not read as "1x faster"."""
    if math.isinf(factor):
        return "inf x"
    if factor >= 999.5:  # (".3g" would print 1.14e+03, and 1e+03 for 999.6)
        return f"{factor:,.0f}x"
    return f"{factor:.3g}x" if factor >= 1.01 else f"{factor:.3f}x"


def int_text(value) -> str:
    return f"{int(value):,}"


def bytes_text(value) -> str:
    """Bytes in decimal units (1 kB = 1000 B), three significant digits."""
    value = float(value)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        # (compared as printed: 999.6 kB rounds to "1e+03" at three digits, so it is 1 MB)
        if value >= size * 0.9995:
            shown = value / size
            return f"{shown:,.0f} {unit}" if shown >= 999.5 else f"{shown:.3g} {unit}"
    return f"{int(value)} B"


def ms_text(value) -> str:
    return "" if value is None else f"{value:.3f} ms"


@dataclass(frozen=True)
class Change:
    """A cost before and after compression, stated with its direction.

    ``kind`` is ``"params"``, ``"macs"``, ``"bytes"`` or ``"latency"`` (it picks the words:
    fewer/more, smaller/larger, faster/slower). ``ratio`` is before / after: above 1 means the
    compressed model costs less. ``text`` reads e.g. "params 3.1x fewer (269,722 -> 87,001)".
    """

    metric: str
    kind: str
    before: float
    after: float

    @property
    def ratio(self) -> float:
        if self.after == 0:
            return math.inf if self.before > 0 else 1.0
        return self.before / self.after

    @property
    def direction(self) -> str:
        if self.before == self.after:
            return "unchanged"
        lower, higher = _WORDS[self.kind]
        return lower if self.after < self.before else higher

    @property
    def factor(self) -> float:
        """How many times lower (or higher) the compressed cost is: max(ratio, 1 / ratio)."""
        r = self.ratio
        return r if r >= 1 else (math.inf if r == 0 else 1 / r)

    def values_text(self) -> str:
        show = {"params": int_text, "macs": int_text, "bytes": bytes_text,
                "latency": ms_text}[self.kind]
        return f"{show(self.before)} -> {show(self.after)}"

    @property
    def short(self) -> str:
        """``"3.1x fewer"`` (or ``"unchanged"``)."""
        if self.direction == "unchanged":
            return "unchanged"
        return f"{factor_text(self.factor)} {self.direction}"

    @property
    def text(self) -> str:
        return f"{self.metric} {self.short} ({self.values_text()})"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "kind": self.kind, "before": self.before,
                "after": self.after, "ratio": self.ratio, "factor": self.factor,
                "direction": self.direction, "text": self.text}


def accuracy_change_text(name: str, before: float, after: float, *, percent: bool) -> str:
    """``"top-1 91.64% -> 89.80% (1.84 points lower)"``; the loss without percent signs."""
    unit, delta_unit = ("%", " points") if percent else ("", "")
    digits = 2 if percent else 4
    diff = after - before
    if diff == 0:
        how = "unchanged"
    else:
        how = f"{abs(diff):.{digits}f}{delta_unit} {'lower' if diff < 0 else 'higher'}"
    return f"{name} {before:.{digits}f}{unit} -> {after:.{digits}f}{unit} ({how})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: versions, threads, device (and its name), date (UTC);
    on the CPU the C allocator too (``rankcut.profile.allocator``: eager CPU timings hang on
    it)."""
    from .. import __version__
    from ..profile import allocator

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "rankcut": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        **({"allocator": allocator()} if device.type == "cpu" else {}),
    }


def jsonable(value, what: str):
    """``value`` as JSON would give it back (tuples become lists, keys strings): what a report
    holds is exactly what it writes and reads. Refuses what JSON cannot store, naming ``what``."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: must be JSON-serialisable ({err})") from None


def check_schema(d: Mapping, schema: str, version: int, what: str) -> None:
    if not isinstance(d, Mapping) or d.get("schema") != schema:
        raise ValueError(f"{what}: expected a JSON object with \"schema\": \"{schema}\"")
    if d.get("version") != version:
        raise ValueError(f"{what}: schema version {d.get('version')!r} is not supported (this "
                         f"rankcut reads version {version})")


def document_fields(d: Mapping, what: str, required: dict[str, type],
                    optional: dict[str, type], totals: dict[str, int]) -> dict[str, Any]:
    """The fields of a report-like document's JSON ``d`` (whose schema the caller has checked
    with :func:`check_schema`): each of
    ``required`` (name -> dict or list) present, each of ``optional`` absent (an empty one
    then), null (for a dict: empty too) or of its type, and ``totals`` holding each named
    figure as a number (0) or a [before, after] pair of numbers (2); else a ValueError naming
    the field (a hand-edited or truncated file fails here, not in a later KeyError)."""
    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    out = {}
    for name, kind in {**required, **optional}.items():
        value = d.get(name)
        if value is None and name in optional:
            value = kind()
        if not isinstance(value, kind):
            raise ValueError(f"{what}: field {name!r}: expected a JSON "
                             f"{'object' if kind is dict else 'array'}, got "
                             + ("nothing" if name not in d else type(value).__name__))
        out[name] = kind(value)
    for name, size in totals.items():
        value = out["totals"].get(name)
        if not (number(value) if size == 0 else isinstance(value, list) and len(value) == size
                and all(number(v) for v in value)):
            raise ValueError(f"{what}: totals[{name!r}]: expected "
                             + ("a number" if size == 0 else "[before, after] numbers")
                             + f", got {value!r}")
    return out


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see ``rankcut.io.atomic_path``); returns the path."""
    from ..atomic import atomic_path, file_target_problem

    path = Path(path)
    problem = file_target_problem(path)  # (a folder there: os.replace's raw error, named
    if problem is not None:              # after the hidden temporary file)
        raise ValueError(f"path: {problem}")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # (σ₁² and … in any locale)
    return path


class Document:
    """JSON and Markdown files of a report-like dataclass: subclasses define ``to_dict``,
    ``from_dict``, ``to_markdown`` and ``KIND`` (the word their errors start with)."""

    KIND = "document"

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_json() + "\n")

    def write_markdown(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_markdown())

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"{cls.KIND}: not valid JSON ({err})") from None

    @classmethod
    def read(cls, path: str | os.PathLike):
        """The document written by :meth:`write_json` at ``path``; errors name the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:  # (a folder, a missing file: named as the path)
            text = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise ValueError(f"{path}: {text}") from None


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub Markdown table. ``align``: one of 'l', 'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)
