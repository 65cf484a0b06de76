"""Plans: which layer gets which factorization, at which ranks, and why. The contract between
deciding (planners, a person editing JSON) and doing (``rankcut.apply``, ``rankcut.load``).

A :class:`Plan` is an ordered mapping from a module's qualified name to a :class:`LayerPlan`.
It round-trips through JSON (schema ``rankcut.plan``, versioned) and prints as a table.

The methods a LayerPlan may name, their forms and the layers they make are the registry's
(:mod:`rankcut.methods`); ``skip`` leaves a layer as it is, with ``reason`` saying why.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from . import methods
from .decompose._checks import are_counts

SCHEMA = "rankcut.plan"
SCHEMA_VERSION = 1
SKIP = "skip"


@dataclass
class LayerPlan:
    """One layer's decision.

    ``method``: a registered method (:func:`rankcut.methods.names`) or one of its forms
    (``"cp3"`` is method ``cp`` with form ``cp3``), or ``"skip"``.
    ``ranks``: one rank, or (R_out, R_in) for ``tucker``; per group for grouped convolutions.
    ``options``: passed to the layer's ``from_dense``: the solver's options (``{"solver":
    "als_qr", "max_iter": 100}`` for CP, ``{"solver": "deim"}`` for CUR) and rankcut's own
    ``"data_aware": true`` (fit the output norm on calibration data).
    ``predicted``: what a planner expects (``params``, ``macs``, ``latency_ms``, ``error``, ...).
    ``reason``: why (a skip's reason, or the planner's rationale).
    """

    method: str
    ranks: tuple[int, ...] = ()
    form: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    module_type: str = ""

    def __post_init__(self):
        if isinstance(self.ranks, numbers.Integral) and not isinstance(self.ranks, bool):
            self.ranks = (self.ranks,)
        if not isinstance(self.method, str):
            raise ValueError(f"method: expected a name (e.g. 'svd'), got {self.method!r}")
        for key in ("reason", "module_type"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key}: expected a string, got {getattr(self, key)!r}")
        bad = {k: v for k, v in self.predicted.items() if k in ("params", "macs", "error")
               and v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real))
               } if isinstance(self.predicted, dict) else None
        if bad is None or bad:  # the printed table formats them as numbers
            raise ValueError(f"predicted: expected a mapping whose params, macs and error are "
                             f"numbers, got {self.predicted!r}")
        shape = self.predicted.get("weight_shape")
        if shape is not None and not are_counts(shape):
            raise ValueError(f"predicted: weight_shape: expected a list of sizes >= 1 (the "
                             f"planned layer's weight), got {shape!r}")
        if self.method == SKIP:
            self.ranks = tuple(self.ranks)
            return
        if not isinstance(self.options, dict):
            raise ValueError(f"options: expected a mapping, got {type(self.options).__name__}")
        if "method" in self.options:  # plans written before the solver option was named
            raise ValueError(f"options: the decomposition algorithm is chosen with 'solver' "
                             f"(e.g. {{'solver': {self.options['method']!r}}}), not 'method'")
        try:
            spec, self.form = methods.resolve(self.method, self.form)
        except ValueError as err:
            if str(err).startswith("method:"):
                raise ValueError(f"method: expected one of {', '.join(methods.aliases())} or "
                                 f"'skip', got {self.method!r}") from None
            raise
        self.method = spec.name
        self.ranks = spec.check_ranks(self.ranks)

    @classmethod
    def skipped(cls, reason: str, module_type: str = "") -> LayerPlan:
        return cls(SKIP, reason=reason, module_type=module_type)

    @property
    def skip(self) -> bool:
        return self.method == SKIP

    @property
    def spec(self) -> methods.Method:
        """The registry's entry for this layer's method."""
        return methods.get(self.method)

    def layer_config(self, module: nn.Module) -> dict[str, Any]:
        """The factorized layer's config (see ``rankcut.layers.rebuild``) for ``module``."""
        if self.skip:
            raise ValueError("a skipped layer has no factorized config")
        return self.spec.config(module, self.ranks, self.form)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return {k: v for k, v in d.items() if v not in (None, "", {}, [])} | {"method": self.method}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"layer plan: expected a mapping of method, ranks, ..., got "
                             f"{type(d).__name__} {d!r}")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"layer plan: unknown keys {sorted(unknown)}")
        return cls(**d)  # (ranks as a list, or one number: LayerPlan checks them)


class Plan(Mapping[str, LayerPlan]):
    """Ordered mapping: qualified module name -> :class:`LayerPlan`, plus free-form ``meta``."""

    def __init__(self, layers: Mapping[str, LayerPlan] | None = None,
                 meta: Mapping[str, Any] | None = None):
        for what, value in (("layers", layers), ("meta", meta)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{what}: expected a mapping (or None), got "
                                 f"{type(value).__name__}")
        self.layers: dict[str, LayerPlan] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        for name, lp in (layers or {}).items():
            self[name] = lp

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __setitem__(self, name: str, lp: LayerPlan) -> None:
        if not isinstance(name, str):
            raise ValueError(f"plan: a layer's name must be a string (its path in the model), "
                             f"got {name!r}")
        if not isinstance(lp, LayerPlan):
            raise ValueError(f"plan[{name!r}]: expected a LayerPlan (e.g. LayerPlan('svd', 8)"
                             f", or LayerPlan.from_dict of a plan file's entry), got "
                             f"{type(lp).__name__}")
        self.layers[name] = lp

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    @property
    def active(self) -> dict[str, LayerPlan]:
        """The layers that will be factorized (not skipped)."""
        return {k: v for k, v in self.layers.items() if not v.skip}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, "meta": self.meta,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}

    def to_json(self, indent: int = 2) -> str:
        """The plan as JSON text. NumPy numbers and 0-d tensors become JSON numbers; any other
        value that is not JSON (an option holding a torch.Generator, say) is a ValueError
        naming the layer: a plan on disk holds JSON values only."""
        for name, lp in self.layers.items():
            try:
                json.dumps(lp.to_dict(), default=_json_number)
            except (TypeError, ValueError) as err:
                raise ValueError(f"plan layer {name!r}: {err}; a saved plan holds JSON values "
                                 "only (numbers, text, lists, mappings)") from None
        try:
            return json.dumps(self.to_dict(), indent=indent, default=_json_number)
        except (TypeError, ValueError) as err:
            raise ValueError(f"plan meta: {err}; a saved plan holds JSON values only") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ValueError(f"plan: expected a JSON object with \"schema\": \"{SCHEMA}\"")
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan: schema version {version!r} is not supported (this rankcut "
                             f"reads version {SCHEMA_VERSION})")
        for key in ("layers", "meta"):
            if not isinstance(d.get(key, {}), Mapping):
                raise ValueError(f"plan: \"{key}\" must be a JSON object, got "
                                 f"{type(d[key]).__name__}")
        layers = {}
        for name, entry in d.get("layers", {}).items():
            try:
                layers[name] = LayerPlan.from_dict(entry)
            except (TypeError, ValueError) as err:
                raise ValueError(f"plan layer {name!r}: {err}") from None
        return cls(layers, d.get("meta", {}))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"plan: not valid JSON ({err})") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        rows = [("layer", "method", "ranks", "pred. params", "pred. MACs", "pred. error", "note")]
        for name, lp in self.layers.items():
            p = lp.predicted
            method = f"{lp.method}/{lp.form}" if lp.form else lp.method
            rows.append((name, method, ",".join(map(str, lp.ranks)),
                         _fmt(p.get("params")), _fmt(p.get("macs")),
                         "" if p.get("error") is None else f"{p['error']:.4f}", lp.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({len(self.active)} of {len(self)} layers factorized)"


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{int(value):,}" if math.isfinite(value) else str(value)


def _json_number(value):
    """``json.dumps``'s fallback: a NumPy number or 0-d tensor as the Python number it holds."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        out = item()
        if isinstance(out, bool | int | float):
            return out
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
