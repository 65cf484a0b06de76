"""Plans: which layer gets which factorization, at which ranks, and why. The contract between
deciding (planners, a person editing JSON) and doing (``rankcut.apply``, ``rankcut.load``).

A :class:`Plan` is an ordered mapping from a module's qualified name to a :class:`LayerPlan`.
It round-trips through JSON (schema ``rankcut.plan``, versioned) and prints as a table.

Methods and the layers they make:

==============  ===========================  ==============================================
method          Linear / 1x1 Conv2d          Conv2d
==============  ===========================  ==============================================
``svd``         LowRankLinear / SVDConv2d    SVDConv2d (channel SVD of (T, S·kh·kw))
``cur``         LowRankLinear / SVDConv2d    SVDConv2d with CUR factors
``spatial_svd`` -                            SpatialConv2d (kh x 1 then 1 x kw)
``cp``          -                            CPConv2d, ``form`` "cp4" (default) or "cp3"
``tucker``      -                            TuckerConv2d, ranks (R_out, R_in)
``skip``        left as is; ``reason`` says why
==============  ===========================  ==============================================
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

SCHEMA = "rankcut.plan"
SCHEMA_VERSION = 1
METHODS = ("svd", "cur", "spatial_svd", "cp", "tucker", "skip")
CP_FORMS = ("cp4", "cp3")


@dataclass
class LayerPlan:
    """One layer's decision.

    ``ranks``: one rank, or (R_out, R_in) for ``tucker``; per group for grouped convolutions.
    ``options``: passed to the layer's ``from_dense`` (solver options such as ``{"method":
    "als_qr", "max_iter": 100}`` for CP or ``{"method": "deim"}`` for CUR).
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
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.ranks, int):
            self.ranks = (self.ranks,)
        self.ranks = tuple(int(r) for r in self.ranks)
        if self.method == "skip":
            return
        want = 2 if self.method == "tucker" else 1
        if len(self.ranks) != want or any(r < 1 for r in self.ranks):
            raise ValueError(
                f"ranks: method {self.method!r} expects {want} rank(s) >= 1, got {self.ranks}")
        if self.method == "cp":
            self.form = self.form or "cp4"
            if self.form not in CP_FORMS:
                raise ValueError(f"form: expected one of 'cp4', 'cp3', got {self.form!r}")
        elif self.form is not None:
            raise ValueError(f"form: only method 'cp' takes a form, got {self.form!r}")

    @classmethod
    def skipped(cls, reason: str, module_type: str = "") -> LayerPlan:
        return cls("skip", reason=reason, module_type=module_type)

    @property
    def skip(self) -> bool:
        return self.method == "skip"

    def layer_config(self, module: nn.Module) -> dict[str, Any]:
        """The factorized layer's config (see ``rankcut.layers.rebuild``) for ``module``."""
        kind = type(module).__name__
        if self.skip:
            raise ValueError("a skipped layer has no factorized config")
        if isinstance(module, nn.Linear):
            if self.method not in ("svd", "cur"):
                raise ValueError(f"method {self.method!r} does not apply to Linear "
                                 "(use 'svd' or 'cur')")
            return {"layer": "LowRankLinear", "rank": self.ranks[0], "decomposition": self.method}
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"method {self.method!r} does not apply to {kind}")
        if self.method in ("svd", "cur"):
            return {"layer": "SVDConv2d", "rank": self.ranks[0], "decomposition": self.method}
        if tuple(module.kernel_size) == (1, 1):
            raise ValueError(f"method {self.method!r} does not apply to a 1x1 convolution "
                             "(use 'svd' or 'cur')")
        if self.method == "spatial_svd":
            return {"layer": "SpatialConv2d", "rank": self.ranks[0]}
        if self.method == "cp":
            return {"layer": "CPConv2d", "rank": self.ranks[0], "form": self.form}
        return {"layer": "TuckerConv2d", "ranks": list(self.ranks)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return {k: v for k, v in d.items() if v not in (None, "", {}, [])} | {"method": self.method}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"layer plan: unknown keys {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "ranks" else v) for k, v in d.items()})


class Plan(Mapping[str, LayerPlan]):
    """Ordered mapping: qualified module name -> :class:`LayerPlan`, plus free-form ``meta``."""

    def __init__(self, layers: Mapping[str, LayerPlan] | None = None,
                 meta: Mapping[str, Any] | None = None):
        self.layers: dict[str, LayerPlan] = dict(layers or {})
        self.meta: dict[str, Any] = dict(meta or {})
        for name, lp in self.layers.items():
            if not isinstance(lp, LayerPlan):
                raise ValueError(f"plan[{name!r}]: expected a LayerPlan, got {type(lp).__name__}")

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __setitem__(self, name: str, lp: LayerPlan) -> None:
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
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ValueError(f"plan: expected a JSON object with \"schema\": \"{SCHEMA}\"")
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan: schema version {version!r} is not supported (this rankcut "
                             f"reads version {SCHEMA_VERSION})")
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
                         f"{p['error']:.4f}" if "error" in p else "", lp.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan({len(self.active)} of {len(self)} layers factorized)"


def _fmt(value) -> str:
    return "" if value is None else f"{int(value):,}"
