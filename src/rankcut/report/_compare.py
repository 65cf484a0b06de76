"""``compare``: an original and a compressed model measured side by side, as a :class:`Report`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .._modes import as_inputs, check_module, model_device
from ..io import layer_plan_of
from ..layers import FactorizedLayer
from ..plans import Plan
from ..profile import (
    allocator_advice,
    compare_latency,
    layer_units,
    measure_latency,
    profile,
    unit_call_args,
    with_batch,
)
from ._common import (
    Change,
    Document,
    accuracy_change_text,
    bytes_text,
    check_schema,
    document_fields,
    int_text,
    jsonable,
    machine_info,
    md_table,
)

SCHEMA = "rankcut.report"
SCHEMA_VERSION = 1
ACCURACY_KEYS = ("top1", "top5", "loss", "n")


@dataclass
class LayerRow:
    """One unit (a Conv2d/Linear, or the factorized layer that replaced it), before and after.

    ``params``, ``macs``, ``param_bytes``: ``[original, compressed]`` (MACs of one sample; 0 when
    the model does not have or call the unit). ``latency``: one entry per batch,
    ``{"batch", "original", "compressed"}``, medians in ms of one call (None: not timed).
    ``method``: ``"dense"`` (unchanged), ``"skip"`` (the plan skipped it; ``reason`` says why) or
    the factorization with its ``ranks`` and ``form``. ``predicted``: what the plan expected
    (``error``, ``params``, ``macs``, ``latency_ms``, ...). ``weight_error``: the relative weight
    error the factorization reported when it was built (absent for loaded models).
    """

    name: str
    method: str
    ranks: list[int]
    form: str | None
    original_type: str | None
    compressed_type: str | None
    params: list[int]
    macs: list[int]
    param_bytes: list[int]
    latency: list[dict] = field(default_factory=list)
    predicted: dict = field(default_factory=dict)
    weight_error: float | None = None
    reason: str = ""

    @property
    def factorized(self) -> bool:
        return self.method not in ("dense", "skip")

    def change(self, kind: str) -> Change:
        before, after = {"params": self.params, "macs": self.macs,
                         "bytes": self.param_bytes}[kind]
        return Change(kind, kind, before, after)

    def latency_at(self, batch: int) -> tuple[float | None, float | None]:
        for entry in self.latency:
            if entry["batch"] == batch:
                return entry["original"], entry["compressed"]
        return None, None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report(Document):
    """Before/after of a compression, per layer and in total (see :func:`compare`).

    ``totals``: ``{"params", "macs", "param_bytes", "model_bytes", "unit_params"}`` ->
    ``[original, compressed]`` (MACs of one sample; ``model_bytes`` the safetensors file;
    ``unit_params`` the Conv2d/Linear units' parameters, a tied one counted once). ``latency``: one
    entry per batch, ``{"batch", "original", "compressed"}`` holding
    ``rankcut.profile.Latency.to_dict()``. ``accuracy``: ``{"original": {...}, "compressed":
    {...}}`` with ``top1``, ``top5`` (percent), ``loss``, ``n`` (may be empty). ``machine``:
    versions, device, threads, date. ``plan``: the plan's JSON (or None). ``meta``: free-form.
    """

    KIND = "report"

    totals: dict[str, list]
    layers: list[LayerRow]
    latency: list[dict] = field(default_factory=list)
    accuracy: dict[str, dict] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    plan: dict | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    # ---- derived numbers -------------------------------------------------------------------

    @property
    def batches(self) -> list[int]:
        return [entry["batch"] for entry in self.latency]

    def changes(self) -> list[Change]:
        """params, MACs, file size and latency at each batch, each with its direction."""
        out = [Change("params", "params", *self.totals["params"]),
               Change("MACs", "macs", *self.totals["macs"]),
               Change("file size", "bytes", *self.totals["model_bytes"])]
        for entry in self.latency:
            out.append(Change(f"latency (batch {entry['batch']})", "latency",
                              entry["original"]["median_ms"], entry["compressed"]["median_ms"]))
        return out

    def change(self, metric: str) -> Change:
        """The change named ``"params"``, ``"macs"``, ``"bytes"`` or ``"latency@B"``."""
        for c in self.changes():
            if (c.kind == metric and c.kind != "latency") or metric == _change_key(c):
                return c
        raise KeyError(f"no change {metric!r} in this report (have: "
                       f"{', '.join(_change_key(c) for c in self.changes())})")

    def accuracy_texts(self) -> list[str]:
        a, b = self.accuracy.get("original"), self.accuracy.get("compressed")
        if not a or not b:
            return []
        out = [accuracy_change_text("top-1", a["top1"], b["top1"], percent=True)]
        if "top5" in a and "top5" in b:
            out.append(accuracy_change_text("top-5", a["top5"], b["top5"], percent=True))
        if "loss" in a and "loss" in b:
            out.append(accuracy_change_text("loss", a["loss"], b["loss"], percent=False))
        return out

    def headline(self) -> list[str]:
        """The report in sentences: every change with its direction, then the accuracies."""
        return [c.text for c in self.changes()] + self.accuracy_texts()

    def summary(self) -> str:
        """The headline, one change per line, and the allocator's note where there is one
        (what a command prints)."""
        note = self.timing.get("allocator_note")
        return "\n".join([*self.headline(), *([f"note: {note}"] if note else [])])

    # ---- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, "machine": self.machine,
                "meta": self.meta, "totals": self.totals, "latency": self.latency,
                "timing": self.timing, "accuracy": self.accuracy,
                "changes": [{"key": _change_key(c), **c.to_dict()} for c in self.changes()],
                "headline": self.headline(),
                "layers": [row.to_dict() for row in self.layers], "plan": self.plan}

    @classmethod
    def from_dict(cls, d: Mapping) -> Report:
        """The report from its JSON (``changes`` and ``headline`` are derived, so not read)."""
        check_schema(d, SCHEMA, SCHEMA_VERSION, "report")
        try:
            layers = [LayerRow(**row) for row in d.get("layers", [])]
        except TypeError as err:
            raise ValueError(f"report: a layer entry does not fit ({err})") from None
        f = document_fields(d, "report", {"totals": dict},
                            {"latency": list, "accuracy": dict, "machine": dict, "meta": dict,
                             "timing": dict}, {"params": 2, "macs": 2, "model_bytes": 2})
        plan = d.get("plan")
        if plan is not None and not isinstance(plan, Mapping):
            raise ValueError(f"report: field 'plan': expected a JSON object or null, got "
                             f"{type(plan).__name__}")
        return cls(layers=layers, plan=plan, **f)

    # ---- Markdown --------------------------------------------------------------------------

    def _predicted_ratios(self) -> tuple[float, float] | None:
        """The plan's predicted (params, MACs) ratios, where its free-form meta has both as
        positive numbers (a hand-edited plan's may not)."""
        meta = (self.plan or {}).get("meta")
        predicted = meta.get("predicted") if isinstance(meta, Mapping) else None
        if not isinstance(predicted, Mapping):
            return None
        ratios = [predicted.get(f"{kind}_ratio") for kind in ("params", "macs")]
        if not all(isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r)
                   and r > 0 for r in ratios):
            return None
        return ratios[0], ratios[1]

    def to_markdown(self) -> str:
        title = self.meta.get("title") or "rankcut report"
        lines = [f"# {title}", ""]
        model = self.meta.get("model")
        what = f"`{model}`" if model else "The model"
        factorized = [row for row in self.layers if row.factorized]
        lines += [f"{what}: {len(factorized)} of {len(self.layers)} Conv2d/Linear layers "
                  f"factorized. Measured {self.machine.get('date', '')} on "
                  f"{_machine_line(self.machine)}.", ""]
        lines += ["## Headline", "", self._headline_table(), ""]
        lines += [f"- {text}" for text in self.headline()]
        if self.timing.get("allocator_note"):
            lines.append(f"- note: {self.timing['allocator_note']}")
        if (ratios := self._predicted_ratios()) is not None:
            said = [f"{kind} {Change(kind, kind, ratio, 1.0).short}"
                    for kind, ratio in zip(("params", "macs"), ratios, strict=True)]
            lines.append(f"- the plan predicted {said[0]} and {said[1].replace('macs', 'MACs')}")
        lines += ["", "Ratios are original / compressed: \"3x fewer\" means the compressed "
                  "model has a third of the original's cost. MACs are for one sample; latency is "
                  "the median of one forward pass.", ""]
        lines += ["## Layers", "", self._layer_table(), ""]
        notes = [(row.name, row.reason) for row in self.layers
                 if row.reason and not row.factorized]
        if notes:
            lines += ["Layers left dense:", ""]
            lines += [f"- `{name}`: {reason}" for name, reason in notes] + [""]
        lines += ["## Machine", "", *(f"- {k}: {v}" for k, v in self.machine.items())]
        if self.timing:
            lines.append("- latency: " + ", ".join(f"{k} {v}" for k, v in self.timing.items()
                                                   if k != "allocator_note"))
        if self.meta:
            lines += ["", "## Meta", "", *(f"- {k}: {v}" for k, v in self.meta.items()
                                           if k != "title")]
        return "\n".join(lines).rstrip() + "\n"

    def _headline_table(self) -> str:
        t = self.totals
        rows = [["params", int_text(t["params"][0]), int_text(t["params"][1]),
                 self.change("params").short],
                ["MACs (one sample)", int_text(t["macs"][0]), int_text(t["macs"][1]),
                 self.change("macs").short],
                ["file size (safetensors)", bytes_text(t["model_bytes"][0]),
                 bytes_text(t["model_bytes"][1]), self.change("bytes").short]]
        for entry in self.latency:
            c = self.change(f"latency@{entry['batch']}")
            rows.append([f"latency, batch {entry['batch']} (median)", f"{c.before:.3f} ms",
                         f"{c.after:.3f} ms", c.short])
        a, b = self.accuracy.get("original"), self.accuracy.get("compressed")
        if a and b:
            n = f" (n={b['n']:,})" if "n" in b else ""
            for key, name in (("top1", "top-1"), ("top5", "top-5")):
                if key in a and key in b:
                    diff = b[key] - a[key]
                    rows.append([f"{name}{n}", f"{a[key]:.2f}%", f"{b[key]:.2f}%",
                                 f"{diff:+.2f} points"])
            if "loss" in a and "loss" in b:
                rows.append(["loss", f"{a['loss']:.4f}", f"{b['loss']:.4f}",
                             f"{b['loss'] - a['loss']:+.4f}"])
        return md_table(["", "original", "compressed", "change"], rows, "lrrl")

    def _layer_table(self) -> str:
        header = ["layer", "method", "ranks", "params", "MACs"]
        header += [f"ms @{b}" for b in self.batches]
        header += ["pred. error", "weight error"]
        rows = []
        for row in self.layers:
            method = f"{row.method}/{row.form}" if row.form else row.method
            cells = [f"`{row.name}`", method, ",".join(map(str, row.ranks)),
                     _pair_text(row.params, int_text), _pair_text(row.macs, int_text)]
            for b in self.batches:
                before, after = row.latency_at(b)
                cells.append(_pair_text([before, after], lambda v: f"{v:.3f}", "latency"))
            err = row.predicted.get("error")
            cells.append("" if err is None else f"{err:.3f}")
            cells.append("" if row.weight_error is None else f"{row.weight_error:.3f}")
            rows.append(cells)
        unit_params = self.totals.get("unit_params") or [  # (a report from before it)
            sum(r.params[i] for r in self.layers) for i in (0, 1)]
        sums = ["**units**", "", "", _pair_text(unit_params, int_text),
                _pair_text([sum(r.macs[i] for r in self.layers) for i in (0, 1)], int_text)]
        rows.append(sums + [""] * (len(header) - len(sums)))
        return md_table(header, rows, "lll" + "r" * (len(header) - 3))


def _change_key(c: Change) -> str:
    if c.kind == "latency":
        return "latency@" + c.metric.rsplit(" ", 1)[1].rstrip(")")
    return c.kind


def _pair_text(pair, show, kind: str = "params") -> str:
    before, after = pair
    if before is None and after is None:
        return ""
    if before is None or after is None:
        left = "-" if before is None else show(before)
        return f"{left} -> {'-' if after is None else show(after)}"
    if before == after:
        return show(before)
    return f"{show(before)} -> {show(after)} ({Change('', kind, before, after).short})"


def _machine_line(machine: Mapping) -> str:
    if not machine:
        return "an unrecorded machine"
    threads = machine.get("threads", "?")
    return (f"{machine.get('device', '?')} ({machine.get('device_name', '')}), "
            f"{threads} thread{'' if threads == 1 else 's'}, torch {machine.get('torch', '?')}")


def read_json(path: str | os.PathLike) -> Report:
    """A report written by :meth:`Report.write_json`."""
    return Report.read(path)


# ---- compare ------------------------------------------------------------------------------


def _check_accuracy(accuracy) -> dict[str, dict]:
    if accuracy is None:
        return {}
    if not isinstance(accuracy, Mapping) or set(accuracy) - {"original", "compressed"}:
        raise ValueError("accuracy: expected {\"original\": {...}, \"compressed\": {...}} with "
                         "rankcut.train.evaluate's results (top1, top5, loss, n), got "
                         f"{accuracy!r:.120}")
    out = {}
    for side, result in accuracy.items():
        if result is None:
            continue
        if not isinstance(result, Mapping) or "top1" not in result:
            raise ValueError(f"accuracy[{side!r}]: expected a dict with at least 'top1' (as "
                             f"rankcut.train.evaluate returns), got {result!r:.120}")
        out[side] = {k: (int(v) if k == "n" else float(v)) for k, v in result.items()
                     if k in ACCURACY_KEYS}
    return out


def _layer_method(unit: nn.Module | None, original: nn.Module | None, lp) -> dict:
    """method, ranks, form, weight error and reason of one unit of the compressed model."""
    if isinstance(unit, FactorizedLayer):
        dense_type = type(original).__name__ if original is not None else ""
        real = layer_plan_of(unit, dense_type)
        info = getattr(unit, "info", None) or {}
        return {"method": real.method, "ranks": list(real.ranks), "form": real.form,
                "weight_error": info.get("rel_error"), "reason": lp.reason if lp else ""}
    if lp is not None and lp.skip:
        return {"method": "skip", "ranks": [], "form": None, "weight_error": None,
                "reason": lp.reason}
    reason = ""
    if lp is not None:
        reason = f"planned as {lp.method} but not factorized in the compressed model"
    return {"method": "dense", "ranks": [], "form": None, "weight_error": None, "reason": reason}


def _time_units(original, compressed, units_o, units_c, inputs, batch, warmup, repeats):
    """Per unit name: (original ms, compressed ms) of one call at ``batch``, each on the input
    it receives in its own model (a fused model's layers get channels_last ones), timed
    interleaved where both models have the unit and see inputs of one shape."""
    x = with_batch(inputs, batch)
    seen_o = unit_call_args(original, x, units_o)
    seen_c = unit_call_args(compressed, x, units_c)
    out: dict[str, list] = {}
    for name in {*seen_o, *seen_c}:
        a, b = seen_o.get(name), seen_c.get(name)
        if a is not None and b is not None and [t.shape for t in a[1]] == [t.shape for t in b[1]]:
            la, lb = compare_latency(units_o[name], units_c[name], a[1], warmup=warmup,
                                     repeats=repeats, second_inputs=b[1])
            out[name] = [la.median_ms, lb.median_ms]
        else:
            out[name] = [None if a is None else measure_latency(
                             units_o[name], a[1], warmup=warmup, repeats=repeats).median_ms,
                         None if b is None else measure_latency(
                             units_c[name], b[1], warmup=warmup, repeats=repeats).median_ms]
    return out


def compare(original: nn.Module, compressed: nn.Module, example_inputs, *, plan: Plan | None = None,
            data=None, transform=None, latency: bool = True, batch_size: int | None = None,
            accuracy: Mapping | None = None, meta: Mapping | None = None, warmup: int = 5,
            repeats: int = 30) -> Report:
    """Measure ``original`` and ``compressed`` side by side.

    Per unit (a Conv2d/Linear, or the factorized layer that replaced it; matched by qualified
    name): params, MACs of one sample, parameter bytes, latency of one call, the method and
    ranks the compressed model really has, and from ``plan`` the predicted error and the reason
    (a skip's reason, or the planner's rationale). In total: params, MACs, the safetensors size,
    latency at batch 1 and at ``batch_size`` (default: the batch of ``example_inputs``), and
    with ``data`` top-1/top-5/loss from ``rankcut.train.evaluate`` (``transform`` applied to each
    batch; ``batch_size`` also sets the evaluation batch).

    ``accuracy``: results already computed, ``{"original": evaluate(...), "compressed": ...}``;
    a side given there is not evaluated again. ``latency=False`` skips all timing. Timing runs
    each model's passes interleaved with the other's (``warmup`` + ``repeats`` each) so that drift
    in the machine's speed affects both alike; whole models run on ``example_inputs``' samples
    (repeated to fill a larger batch), units on the inputs they receive inside the model.
    ``meta``: free-form JSON-serialisable facts to keep in the report (model name, command, ...).
    """
    for name, model in (("original", original), ("compressed", compressed)):
        check_module(model, name)
    if plan is not None and not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a rankcut Plan, got {type(plan).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    inputs = as_inputs(example_inputs)
    given = _check_accuracy(accuracy)
    if data is not None and len(given) < 2:  # to evaluate on: checked before the timing
        from ..train.batches import as_data

        data = as_data(data, "data")
    meta = jsonable(dict(meta or {}), "meta")
    # the plan as it saves (NumPy numbers as JSON numbers; what cannot be saved refused now,
    # before the timing and evaluation)
    plan_dict = json.loads(plan.to_json()) if plan is not None else None
    user_batch = batch_size or (int(inputs[0].shape[0]) if inputs[0].ndim else 1)

    prof_o = profile(original, inputs, latency=False)
    prof_c = profile(compressed, inputs, latency=False)
    units_o, units_c = layer_units(original), layer_units(compressed)
    names = list(units_o) + [n for n in units_c if n not in units_o]

    unit_times: dict[int, dict[str, list]] = {}
    whole: list[dict] = []
    device = str(model_device(compressed, inputs[0].device))
    if latency:
        for batch in sorted({1, user_batch}):
            x = with_batch(inputs, batch)
            lo, lc = compare_latency(original, compressed, x, warmup=warmup, repeats=repeats)
            whole.append({"batch": batch, "original": lo.to_dict(), "compressed": lc.to_dict()})
            device = lc.device
            unit_times[batch] = _time_units(original, compressed, units_o, units_c, inputs,
                                            batch, warmup, repeats)

    rows = []
    for name in names:
        po = prof_o.layer(name) if name in units_o else None
        pc = prof_c.layer(name) if name in units_c else None
        lp = plan.layers.get(name) if plan is not None else None
        how = _layer_method(units_c.get(name), units_o.get(name), lp)
        rows.append(LayerRow(
            name=name, original_type=po.kind if po else None,
            compressed_type=pc.kind if pc else None,
            params=[po.params if po else 0, pc.params if pc else 0],
            macs=[po.macs if po else 0, pc.macs if pc else 0],
            param_bytes=[po.param_bytes if po else 0, pc.param_bytes if pc else 0],
            latency=[{"batch": b, "original": t.get(name, [None, None])[0],
                      "compressed": t.get(name, [None, None])[1]}
                     for b, t in sorted(unit_times.items())],
            predicted=dict(plan_dict["layers"][name].get("predicted", {})) if lp else {},
            **how))

    acc = dict(given)
    for side, model in (("original", original), ("compressed", compressed)):
        if side not in acc and data is not None:
            from ..train import evaluate

            kwargs = {"batch_size": batch_size} if batch_size else {}
            acc[side] = evaluate(model, data, transform=transform, **kwargs)

    totals = {"params": [prof_o.params, prof_c.params], "macs": [prof_o.macs, prof_c.macs],
              "param_bytes": [prof_o.param_bytes, prof_c.param_bytes],
              "model_bytes": [prof_o.model_bytes, prof_c.model_bytes],
              # the units' own (a weight tied between two counted once, as params counts it)
              "unit_params": [prof_o.layer_params, prof_c.layer_params]}
    timing = ({"warmup": warmup, "repeats": repeats, "interleaved": True} if latency else {})
    for entry in whole:  # (said once: the first batch whose compressed pass pays the allocator)
        advice = allocator_advice(entry["original"]["page_faults"],
                                  entry["compressed"]["page_faults"], device=device)
        if advice is not None:
            timing["allocator_note"] = f"at batch {entry['batch']}, {advice}"
            break
    return Report(totals=totals, layers=rows, latency=whole, accuracy=acc,
                  machine=machine_info(device),
                  plan=plan_dict,
                  meta=meta, timing=timing)

