"""``analyze``: what a model's layers cost, how their spectra look, which ranks the rules
suggest, and (with labelled calibration data) how sensitive each layer is. Nothing is changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import methods as registry
from .._modes import as_inputs, check_module
from ..calibrate import calibration_batches
from ..defaults import COMPRESS
from ..layers import group_matrices
from ..profile import (
    count_params,
    layer_macs,
    param_bytes,
    profile,
    unit_call_args,
    with_batch,
)
from ._common import (
    Change,
    Document,
    bytes_text,
    check_schema,
    document_fields,
    int_text,
    jsonable,
    machine_info,
    md_table,
)
from ._plots import new_figure, plot_sensitivity, plot_spectra, save_figure, short_name

SCHEMA = "rankcut.analysis"
SCHEMA_VERSION = 1
# the methods whose ranks an analysis suggests: those that "auto" considers
ANALYSIS_METHODS = tuple(m.name for m in registry.REGISTRY.values() if m.auto)


@dataclass
class LayerAnalysis:
    """One Conv2d or Linear of the model.

    ``macs``: one sample. ``latency_ms``: batch (as a string, JSON keys are) -> median ms of one
    call. ``reason``: why ``rankcut.target_layers`` would skip it (None: eligible; only eligible
    layers get a spectrum and suggestions). ``spectrum``: singular values of the channel-SVD
    matrix (first group of a grouped conv), descending; ``stable_rank`` = ||W||²_F / σ_1².
    ``suggested``: per rule and method, ``{"rule", "method", "ranks", "params", "macs",
    "error"}`` (relative weight error; None where not computed, CP) or ``{"rule", "method",
    "note"}`` where the rule does not apply. ``sensitivity``: the calibration loss with this
    layer alone factorized at the trial rank.
    """

    name: str
    kind: str
    weight_shape: list[int]
    input_shape: list[int] | None
    params: int
    macs: int
    param_bytes: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    full_rank: int | None = None
    stable_rank: float | None = None
    spectrum: list[float] = field(default_factory=list)
    suggested: list[dict] = field(default_factory=list)
    sensitivity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Analysis(Document):
    """Result of :func:`analyze`: ``layers`` and whole-model ``totals`` (``params``, ``macs``,
    ``param_bytes``, ``model_bytes``), ``latency`` (whole model per batch, as
    ``rankcut.profile.Latency.to_dict()``), the ``rules`` and ``methods`` asked about,
    ``sensitivity`` settings and the dense loss (empty without labelled calibration data)."""

    KIND = "analysis"

    layers: list[LayerAnalysis]
    totals: dict[str, int]
    rules: list[str]
    methods: list[str]
    latency: list[dict] = field(default_factory=list)
    sensitivity: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> LayerAnalysis:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in this analysis")

    @property
    def eligible(self) -> list[LayerAnalysis]:
        return [layer for layer in self.layers if layer.reason is None]

    def suggested_ranks(self, rule: str, method: str = "svd") -> dict[str, tuple[int, ...]]:
        """Layer name -> ranks that ``rule`` suggests under ``method`` (where it applies)."""
        from ..select import parse_rank

        key = str(parse_rank(rule))
        return {layer.name: tuple(s["ranks"]) for layer in self.layers for s in layer.suggested
                if s["rule"] == key and s["method"] == method and "ranks" in s}

    def sensitivities(self) -> dict[str, float]:
        return {layer.name: layer.sensitivity for layer in self.layers
                if layer.sensitivity is not None}

    # ---- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, "machine": self.machine,
                "meta": self.meta, "totals": self.totals, "latency": self.latency,
                "rules": self.rules, "methods": self.methods, "sensitivity": self.sensitivity,
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Analysis:
        check_schema(d, SCHEMA, SCHEMA_VERSION, "analysis")
        try:
            layers = [LayerAnalysis(**layer) for layer in d.get("layers", [])]
        except TypeError as err:
            raise ValueError(f"analysis: a layer entry does not fit ({err})") from None
        f = document_fields(d, "analysis", {"totals": dict, "rules": list, "methods": list},
                            {"latency": list, "sensitivity": dict, "machine": dict,
                             "meta": dict}, {"params": 0, "macs": 0, "model_bytes": 0})
        return cls(layers, f["totals"], f["rules"], f["methods"], f["latency"],
                   f["sensitivity"], f["machine"], f["meta"])

    # ---- Markdown --------------------------------------------------------------------------

    def to_markdown(self) -> str:
        t = self.totals
        title = self.meta.get("title") or "rankcut analysis"
        m = self.machine
        lines = [f"# {title}", "",
                 f"{len(self.layers)} Conv2d/Linear layers, {len(self.eligible)} eligible for "
                 f"factorization. Params {int_text(t['params'])}, MACs {int_text(t['macs'])} "
                 f"(one sample), {bytes_text(t['model_bytes'])} as safetensors."]
        for entry in self.latency:
            lines.append(f"Latency at batch {entry['batch']}: {entry['median_ms']:.3f} ms "
                         f"(median of {entry['repeats']}).")
        lines += ["", "## Layers", "", self._layer_table(), ""]
        lines += ["Suggested ranks read \"rank (params change, relative weight error)\" for "
                  "the layer alone; \"MACs %\" is the layer's share of the model's MACs; the "
                  "stable rank ||W||²/σ₁² of the channel matrix shows how fast its spectrum "
                  "falls.", ""]
        skipped = [layer for layer in self.layers if layer.reason]
        if skipped:
            lines += ["## Not eligible", "",
                      md_table(["layer", "why"], [[f"`{s.name}`", s.reason] for s in skipped],
                               "ll"), ""]
        if self.sensitivity:
            s = self.sensitivity
            lines += ["## Sensitivity", "",
                      f"Loss on {s['samples']:,} calibration samples with one layer at a time "
                      f"factorized ({s['method']}, trial rank {s['trial_rank']}); dense loss "
                      f"{s['dense_loss']:.4f}. Higher: the layer deserves more rank.", ""]
            ranked = sorted(self.sensitivities().items(), key=lambda kv: -kv[1])
            lines += [md_table(["layer", "loss", "increase"],
                               [[f"`{n}`", f"{v:.4f}", f"{v - s['dense_loss']:+.4f}"]
                                for n, v in ranked], "lrr"), ""]
        lines += ["## Machine", "", *(f"- {k}: {v}" for k, v in m.items())]
        return "\n".join(lines).rstrip() + "\n"

    def _layer_table(self) -> str:
        combos = [(r, mth) for r in self.rules for mth in self.methods
                  if any(s["rule"] == r and s["method"] == mth and "ranks" in s
                         for layer in self.layers for s in layer.suggested)]
        batches = sorted({b for layer in self.layers for b in layer.latency_ms}, key=int)
        header = ["layer", "type", "params", "MACs", "MACs %", *[f"ms @{b}" for b in batches],
                  "full rank", "stable rank", *[f"{r}: {mth}" for r, mth in combos]]
        total_macs = max(self.totals["macs"], 1)
        rows = []
        for layer in self.layers:
            cells = [f"`{layer.name}`", layer.kind, int_text(layer.params),
                     int_text(layer.macs), f"{100 * layer.macs / total_macs:.1f}"]
            cells += [f"{layer.latency_ms[b]:.3f}" if b in layer.latency_ms else ""
                      for b in batches]
            cells += ["" if layer.full_rank is None else str(layer.full_rank),
                      "" if layer.stable_rank is None else f"{layer.stable_rank:.1f}"]
            for r, mth in combos:
                found = [s for s in layer.suggested if s["rule"] == r and s["method"] == mth]
                cells.append(_suggestion_text(found[0], layer) if found else "")
            rows.append(cells)
        return md_table(header, rows, "ll" + "r" * (len(header) - 2))

    # ---- plots -----------------------------------------------------------------------------

    def plot_spectra(self, path: str | os.PathLike, *, max_layers: int = 16) -> Path:
        """Spectra of the eligible layers with the rules' SVD cuts marked."""
        layers = [layer for layer in self.eligible if layer.spectrum][:max_layers]
        cuts = {layer.name: {s["rule"]: s["ranks"][0] for s in layer.suggested
                             if s["method"] == "svd" and "ranks" in s} for layer in layers}
        return plot_spectra({layer.name: layer.spectrum for layer in layers}, path, cuts=cuts,
                            max_layers=max_layers)

    def plot_sensitivity(self, path: str | os.PathLike) -> Path:
        if not self.sensitivity:
            raise ValueError("this analysis has no sensitivities (pass labelled calib_data)")
        return plot_sensitivity(self.sensitivities(), path,
                                baseline=self.sensitivity["dense_loss"])

    def plot_costs(self, path: str | os.PathLike) -> Path:
        """Each layer's share of the model's params and MACs (percent)."""
        names = [layer.name for layer in self.layers]
        fig = new_figure(6.4, max(2.5, 0.28 * len(names) + 1.2))
        ax = fig.add_subplot()
        y = list(range(len(names)))
        p_total, m_total = max(self.totals["params"], 1), max(self.totals["macs"], 1)
        ax.barh([i - 0.2 for i in y], [100 * la.params / p_total for la in self.layers], 0.4,
                label="params")
        ax.barh([i + 0.2 for i in y], [100 * la.macs / m_total for la in self.layers], 0.4,
                label="MACs")
        ax.set_yticks(y, [short_name(n, 34) for n in names], fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel("share of the model (%)")
        ax.set_title("where the params and MACs are")
        ax.legend(fontsize="small")
        ax.grid(True, axis="x", alpha=0.3)
        return save_figure(fig, path)

    def write_plots(self, out_dir: str | os.PathLike) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [self.plot_costs(out / "costs.png")]
        if any(layer.spectrum for layer in self.eligible):
            paths.append(self.plot_spectra(out / "spectra.png"))
        if self.sensitivity and self.sensitivities():  # (none when no layer is eligible)
            paths.append(self.plot_sensitivity(out / "sensitivity.png"))
        return paths


def _suggestion_text(s: dict, layer: LayerAnalysis) -> str:
    if "ranks" not in s:
        return "n/a"
    err = "" if s.get("error") is None else f", err {s['error']:.2f}"
    return (f"{','.join(map(str, s['ranks']))} "
            f"({Change('', 'params', layer.params, s['params']).short}{err})")


# ---- computing it -----------------------------------------------------------------------------


def read_analysis(path: str | os.PathLike) -> Analysis:
    """An analysis written by :meth:`Analysis.write_json`."""
    return Analysis.read(path)


def _suggest(module: nn.Module, rule, method: str, shape, calls: int = 1) -> dict:
    """What ``rule`` gives ``module`` under ``method``: its ranks (at most the layer's full
    ranks, as a built layer has them), params, MACs over its ``calls`` per forward pass, and
    weight error where a spectrum gives it."""
    from ..select import layer_ranks

    spec = registry.get(method)
    is_conv = isinstance(module, nn.Conv2d)
    hw = tuple(shape[-2:]) if is_conv and shape else None
    rows = max(1, math.prod(shape) // module.in_features) if not is_conv and shape else 1
    base = {"rule": str(rule), "method": method}
    if (why := spec.why_not(module)) is not None:
        return {**base, "note": why}
    try:
        form = spec.check_form(None)  # its default form
        ranks = spec.capped(module, layer_ranks(module, method, rule, input_hw=hw), form)
        shape = hw if is_conv else (rows,)
        cost = spec.cost(module, ranks, form, shape)
    except ValueError as err:
        return {**base, "note": str(err)}
    # the weight-norm error where it has a closed form (from the spectra: SVD, spatial SVD,
    # Tucker-2); a method with a grid (CP, CUR) must be measured, which the suggestions skip
    error = (None if spec.grid_fn is not None else
             float(spec.candidate_at(module, shape, ranks, form).error))
    return {**base, "ranks": list(ranks), "params": cost.params,
            "macs": cost.macs * max(calls, 1), "error": error}


def analyze(model: nn.Module, example_inputs, *, rank_rules=("vbmf", "energy=0.95"),
            calib_data=None, methods: Sequence[str] = ("svd", "tucker"), include=None,
            exclude=None, min_params: int = COMPRESS["min_params"], transform=None,
            max_batches: int | None = 8,
            loss_fn: Callable = nn.functional.cross_entropy, sensitivity_method: str = "svd",
            trial_rank="params=0.25", latency: bool = False, batches=(1,), warmup: int = 3,
            repeats: int = 10, meta: Mapping | None = None) -> Analysis:
    """Per-layer costs, spectra, suggested ranks and (with labelled ``calib_data``)
    sensitivities of ``model``; the model is not changed.

    Args:
        example_inputs: a tensor or tuple of tensors for one forward pass (MACs are for one
            sample; latency, if asked for, at ``batches`` and the batch of these inputs).
        rank_rules: rank rules (``rankcut.select.parse_rank``: ``"vbmf"``, ``"energy=0.95"``,
            ``"params=4x"``, ``64``) whose ranks are suggested for each eligible layer under each
            of ``methods`` (``svd``, ``spatial_svd``, ``tucker``, ``cp``; Linear and 1x1 convs
            take ``svd`` only), via ``rankcut.select.layer_ranks``, with the factorized layer's
            params and MACs and its relative weight error (CP: not computed).
        include, exclude, min_params: which layers are eligible (``rankcut.target_layers``).
        calib_data: batches of ``(inputs, targets)`` (a DataLoader, a list, a Dataset, or one
            ``(inputs, targets)`` pair of tensors), at most ``max_batches`` used, ``transform``
            applied to the inputs. With labels, each eligible layer is factorized alone by
            ``sensitivity_method`` at ``trial_rank`` (an int for every layer, as Astrid & Lee,
            or a rule per layer, ``"params=0.25"`` by default) and ``loss_fn`` measured
            (``rankcut.select.layer_sensitivities``).
        latency: time every layer and the whole model (``rankcut.profile.profile``).
        meta: free-form JSON-serialisable facts to keep (model name, command).
    """
    from ..select import layer_sensitivities, mean_loss, parse_rank
    from ..surgery import check_weights, target_layers

    check_module(model)
    if isinstance(rank_rules, str | int):
        rank_rules = (rank_rules,)
    rules = [parse_rank(r) for r in rank_rules]
    methods = list(methods)
    for m in methods:
        if m not in ANALYSIS_METHODS:
            raise ValueError(f"methods: expected some of {', '.join(ANALYSIS_METHODS)}, got {m!r}")
    if sensitivity_method not in ANALYSIS_METHODS:
        raise ValueError(f"sensitivity_method: expected one of {', '.join(ANALYSIS_METHODS)}, "
                         f"got {sensitivity_method!r}")
    inputs = as_inputs(example_inputs)
    meta = jsonable(dict(meta or {}), "meta")

    targets = target_layers(model, include, exclude, min_params=min_params)
    modules = {name: model.get_submodule(name) for name in targets}
    for name, reason in targets.items():  # as rankcut.plan refuses them (before any timing)
        if reason is None:
            check_weights(name, modules[name])
    prof = profile(model, inputs, latency=latency, batches=batches, warmup=warmup,
                   repeats=repeats)
    one = with_batch(inputs, 1)
    macs = layer_macs(model, one)
    seen = unit_call_args(model, one, modules)
    unit_latency = {layer.name: {str(b): lat.median_ms for b, lat in layer.latency.items()}
                    for layer in prof.layers}

    layers = []
    for name, reason in targets.items():
        module = modules[name]
        args = seen.get(name, (0, None))[1]
        shape = list(args[0].shape) if args else None
        if reason is None and shape is None:
            reason = "not called in the forward pass on example_inputs"
        la = LayerAnalysis(name, type(module).__name__, list(module.weight.shape), shape,
                           count_params(module), macs.get(name, 0), param_bytes(module),
                           unit_latency.get(name, {}), reason)
        if reason is None:
            s = torch.linalg.svdvals(group_matrices(module, "channel", torch.float64)[0])
            la.spectrum = s.tolist()
            la.full_rank = len(s)
            la.stable_rank = float(s.pow(2).sum() / s[0].pow(2)) if float(s[0]) > 0 else 0.0
            calls = seen.get(name, (0, None))[0]
            la.suggested = [_suggest(module, rule, m, shape, calls) for rule in rules
                            for m in methods if registry.get(m).why_not(module) is None]
        layers.append(la)

    sensitivity: dict[str, Any] = {}
    if calib_data is not None:
        calib = list(calibration_batches(calib_data, max_batches, transform=transform))
        if all(isinstance(b, tuple) for b in calib):
            dense_loss = mean_loss(model, calib, loss_fn)
            for la in layers:
                if la.reason is not None:
                    continue
                module = modules[la.name]
                use = registry.variants(sensitivity_method, module)[0][0].name
                rank = trial_rank
                if not isinstance(trial_rank, int):
                    hw = tuple(la.input_shape[-2:]) if isinstance(module, nn.Conv2d) else None
                    rank = _trial_rank(module, use, trial_rank, hw)
                la.sensitivity = layer_sensitivities(model, [la.name], calib, loss_fn,
                                                     method=use, trial_rank=rank)[la.name]
            sensitivity = {"method": sensitivity_method, "trial_rank": str(trial_rank),
                           "dense_loss": dense_loss, "batches": len(calib),
                           "samples": sum(len(b[0]) for b in calib)}
    totals = {"params": prof.params, "macs": prof.macs, "param_bytes": prof.param_bytes,
              "model_bytes": prof.model_bytes}
    whole = [{"batch": b, **lat.to_dict()} for b, lat in sorted(prof.latency.items())]
    return Analysis(layers, totals, [str(r) for r in rules], methods, whole, sensitivity,
                    machine_info(prof.device), meta)


def _trial_rank(module: nn.Module, method: str, rule, input_hw) -> int | tuple[int, ...]:
    """The ranks ``rule`` gives ``module`` under ``method``: the trial of one layer (one rank,
    or Tucker's (R_out, R_in) pair)."""
    from ..select import layer_ranks

    ranks = layer_ranks(module, method, rule, input_hw=input_hw)
    return ranks[0] if len(ranks) == 1 else ranks
