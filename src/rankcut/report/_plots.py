"""Plots as PNG files, drawn headless: each function takes plain data and a path.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg renderer, never
through ``pyplot``, so no display is needed and matplotlib's global backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..layers import group_matrices
from ..plans import Plan

DPI = 110


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ..atomic import atomic_path, file_target_problem

    path = Path(path)
    problem = file_target_problem(path)
    if problem is not None:
        raise ValueError(f"path: {problem}")
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---- sweep ----------------------------------------------------------------------------------


def _sweep_point(p) -> tuple[str, float, float]:
    if isinstance(p, Mapping):
        acc = p.get("accuracy", p.get("top1"))
        if "method" not in p or "ratio" not in p or acc is None:
            raise ValueError(f"points: a point needs 'method', 'ratio' and 'accuracy' (or "
                             f"'top1'), got {dict(p)!r:.120}")
        return str(p["method"]), float(p["ratio"]), float(acc)
    if isinstance(p, Sequence) and len(p) == 3:
        return str(p[0]), float(p[1]), float(p[2])
    raise ValueError(f"points: expected dicts or (method, ratio, accuracy) triples, got {p!r:.80}")


def plot_sweep(points: Iterable, path: str | os.PathLike, *, baseline: float | None = None,
               xlabel: str = "compression ratio (original / compressed MACs)",
               ylabel: str = "top-1 accuracy (%)", title: str | None = None,
               dense_point: tuple[float, float] | None = None) -> Path:
    """Accuracy against compression ratio (or speed-up), one line per method.

    ``points``: dicts with ``method``, ``ratio`` and ``accuracy`` (or ``top1``), or
    ``(method, ratio, accuracy)`` triples. ``baseline``: the original model's accuracy, drawn as
    a dashed line; ``dense_point``: (x, accuracy) of the original model, marked. The x axis
    turns logarithmic when the ratios span more than 8x.
    """
    data: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        method, ratio, acc = _sweep_point(p)
        data.setdefault(method, []).append((ratio, acc))
    if not data:
        raise ValueError("points: expected at least one point")
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    for method, pts in data.items():
        pts.sort()
        ax.plot([r for r, _ in pts], [a for _, a in pts], marker="o", label=method)
    if baseline is not None:
        ax.axhline(baseline, color="0.3", linestyle="--", linewidth=1,
                   label=f"original ({baseline:.2f})")
    if dense_point is not None:
        ax.plot(*dense_point, marker="*", markersize=12, color="black", linestyle="none",
                label="dense")
    ratios = [r for pts in data.values() for r, _ in pts]
    if min(ratios) > 0 and max(ratios) / min(ratios) > 8:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "accuracy against compression")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


# ---- layers ---------------------------------------------------------------------------------


def short_name(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_layers(report_or_plan, path: str | os.PathLike) -> Path:
    """Per-layer bars: for a :class:`~rankcut.report.Report`, the params and MACs compression
    of every unit (original / compressed, 1 = unchanged), its ranks and, when timed, its
    latency before and after at batch 1; for a :class:`~rankcut.plans.Plan`, the planned ranks
    and the predicted relative error of every planned layer (skips shown empty)."""
    from ._compare import Report

    if isinstance(report_or_plan, Report):
        rows = report_or_plan.layers
        names = [row.name for row in rows]
        ranks = [list(row.ranks) for row in rows]
        panels = ["compression", "ranks"]
        timed = report_or_plan.batches
        if timed:
            panels.append("latency")
    elif isinstance(report_or_plan, Plan):
        names = list(report_or_plan)
        ranks = [list(lp.ranks) for lp in report_or_plan.values()]
        rows = None
        panels = ["ranks", "error"]
    else:
        raise ValueError(f"report_or_plan: expected a rankcut Report or Plan, got "
                         f"{type(report_or_plan).__name__}")
    if not names:
        raise ValueError("report_or_plan: no layers to plot")
    n = len(names)
    fig = new_figure(max(6.4, 0.32 * n + 2), 2.6 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = list(range(n))
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "compression":
            width = 0.4
            for k, (kind, label) in enumerate((("params", "params"), ("macs", "MACs"))):
                ratios = [min(row.change(kind).ratio, 1e6) for row in rows]
                ax.bar([i + (k - 0.5) * width for i in x], ratios, width, label=label)
            ax.axhline(1, color="0.3", linewidth=0.8)
            ax.set_ylabel("original / compressed")
            ax.set_title("compression per layer (above 1: fewer)")
            ax.legend(fontsize="small")
        elif panel == "ranks":
            tucker = any(len(r) == 2 for r in ranks)
            width = 0.4 if tucker else 0.7
            first = [r[0] if r else 0 for r in ranks]
            ax.bar([i - (width / 2 if tucker else 0) for i in x], first, width,
                   label="rank (out for Tucker)" if tucker else "rank")
            if tucker:
                second = [r[1] if len(r) == 2 else 0 for r in ranks]
                ax.bar([i + width / 2 for i in x], second, width, label="rank (in, Tucker)")
                ax.legend(fontsize="small")
            ax.set_ylabel("rank")
            ax.set_title("ranks (none: kept dense or skipped)")
        elif panel == "latency":
            batch = min(report_or_plan.batches)
            pairs = [row.latency_at(batch) for row in rows]
            width = 0.4
            for k, label in enumerate(("original", "compressed")):
                ax.bar([i + (k - 0.5) * width for i in x],
                       [p[k] if p[k] is not None else 0 for p in pairs], width, label=label)
            ax.set_ylabel("ms per call")
            ax.set_title(f"latency per layer, batch {batch} (median)")
            ax.legend(fontsize="small")
        else:  # predicted error of a plan
            errors = [float("nan") if lp.predicted.get("error") is None  # none predicted
                      else float(lp.predicted["error"]) for lp in report_or_plan.values()]
            ax.bar(x, errors, 0.7, color="tab:red")
            ax.set_ylabel("relative error")
            ax.set_title("predicted relative error per layer")
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xticks(x, [short_name(nm) for nm in names], rotation=90, fontsize="small")
    return save_figure(fig, path)


# ---- spectra --------------------------------------------------------------------------------


def _cut(source, rule) -> int | None:
    """The rank ``rule`` gives: a module through ``rankcut.select.layer_ranks`` (channel SVD),
    a matrix through its singular values or ``rankcut.decompose.evbmf``; None if undefined."""
    from .. import decompose as dec
    from ..select import layer_ranks, parse_rank

    rule = parse_rank(rule)
    if isinstance(source, nn.Module):
        try:
            return layer_ranks(source, "svd", rule)[0]
        except ValueError:  # e.g. "macs=" without an input size
            return None
    if rule.kind == "fixed":
        return int(rule.value)
    if rule.kind == "energy":
        vals = (source.double().sort(descending=True).values if source.ndim == 1
                else torch.linalg.svdvals(source.double()))  # (given values in any order)
        return dec.energy_rank(vals, rule.value)
    if rule.kind == "vbmf" and source.ndim == 2:
        return max(1, dec.evbmf(source.double(), weakening=rule.value).rank)
    return None


def _spectra_sources(model_or_layers, max_layers: int) -> dict:
    from ..surgery import target_layers

    if isinstance(model_or_layers, nn.Conv2d | nn.Linear):
        return {"": model_or_layers}
    if isinstance(model_or_layers, nn.Module):
        eligible = [n for n, why in target_layers(model_or_layers).items() if why is None]
        return {n: model_or_layers.get_submodule(n) for n in eligible[:max_layers]}
    if isinstance(model_or_layers, Mapping):
        out = {}
        for name, value in list(model_or_layers.items())[:max_layers]:
            if isinstance(value, nn.Conv2d | nn.Linear):
                out[str(name)] = value
            elif isinstance(value, torch.Tensor | Sequence) and not isinstance(value, str):
                t = torch.as_tensor(value).detach().float().cpu()
                if t.ndim not in (1, 2):
                    raise ValueError(f"model_or_layers[{name!r}]: expected a matrix or a vector "
                                     f"of singular values, got shape {tuple(t.shape)}")
                out[str(name)] = t
            else:
                raise ValueError(f"model_or_layers[{name!r}]: expected a Conv2d/Linear, a "
                                 f"matrix or singular values, got {type(value).__name__}")
        return out
    raise ValueError(f"model_or_layers: expected an nn.Module or a mapping of layers, got "
                     f"{type(model_or_layers).__name__}")


def plot_spectra(model_or_layers, path: str | os.PathLike, cuts=("vbmf", "energy=0.95"), *,
                 max_layers: int = 16) -> Path:
    """Normalised singular-value spectra (sigma_i / sigma_1, log scale), one panel per layer,
    with the rank each rule in ``cuts`` chooses marked by a vertical line.

    ``model_or_layers``: a model (its layers that ``rankcut.target_layers`` finds eligible, the
    first ``max_layers``), a Conv2d/Linear, or a mapping name -> Conv2d/Linear, matrix, or 1-D
    singular values. The spectrum is that of the channel-SVD matrix (of the first group for a
    grouped conv).
    ``cuts``: rank rules (``"vbmf"``, ``"energy=0.95"``, ``64``: computed with
    ``rankcut.select.layer_ranks`` / ``rankcut.decompose.evbmf``; EVBMF needs a matrix, not bare
    singular values), or a mapping name -> {label: rank} of cuts already known.
    """
    from matplotlib.ticker import NullFormatter

    sources = _spectra_sources(model_or_layers, max_layers)
    if not sources:
        raise ValueError("model_or_layers: no layers to plot")
    if isinstance(cuts, str | int):  # one rule
        cuts = (cuts,)
    for name, src in sources.items():
        values = src.weight if isinstance(src, nn.Module) else src
        if not bool(torch.isfinite(values.detach()).all()):
            raise ValueError(f"model_or_layers: {name!r} holds NaN or infinite values")
    n = len(sources)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = new_figure(3.2 * cols, 2.6 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    for ax, (name, src) in zip(axes, sources.items(), strict=False):
        if isinstance(src, nn.Module):
            s = torch.linalg.svdvals(group_matrices(src, "channel", torch.float64)[0].cpu())
        else:
            s = src if src.ndim == 1 else torch.linalg.svdvals(src.double())
            s = s.double().sort(descending=True).values
        top = float(s[0]) if len(s) and float(s[0]) > 0 else 1.0
        values = (s / top).clamp_min(1e-12)
        ax.semilogy(range(1, len(s) + 1), values.tolist(), linewidth=1.2)
        ax.set_ylim(min(1e-2, 0.7 * float(values.min())), 1.3)  # two decades at least
        ax.yaxis.set_minor_formatter(NullFormatter())  # unlabelled minor ticks draw fast
        if isinstance(cuts, Mapping):
            marks = dict(cuts.get(name, {}))
        else:
            marks = {str(rule): _cut(src, rule) for rule in cuts}
        for k, (label, rank) in enumerate(marks.items()):
            if rank is not None:
                ax.axvline(rank, color=colors[k % len(colors)], linestyle="--", linewidth=1,
                           label=f"{label}: {rank}")
        ax.set_title(short_name(name or "layer", 34), fontsize="small")
        ax.set_xlabel("index", fontsize="small")
        ax.grid(True, alpha=0.3)
        if any(rank is not None for rank in marks.values()):
            ax.legend(fontsize="x-small")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].set_ylabel(r"$\sigma_i / \sigma_1$")
    fig.suptitle("singular-value spectra (channel SVD)")
    return save_figure(fig, path)


# ---- sensitivity ----------------------------------------------------------------------------


def plot_sensitivity(losses: Mapping[str, float], path: str | os.PathLike, *,
                     baseline: float | None = None, title: str | None = None) -> Path:
    """Horizontal bars: per layer, the loss with that layer alone factorized (see
    ``rankcut.select.layer_sensitivities``), in the mapping's order; ``baseline`` (the dense
    model's loss) drawn as a dashed line."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses: expected a non-empty mapping of layer name -> loss")
    names = list(losses)
    values = [float(losses[n]) for n in names]
    fig = new_figure(6.4, max(2.5, 0.28 * len(names) + 1.2))
    ax = fig.add_subplot()
    y = list(range(len(names)))
    ax.barh(y, values, color="tab:orange")
    if baseline is not None:
        ax.axvline(baseline, color="0.3", linestyle="--", linewidth=1,
                   label=f"dense loss ({baseline:.4f})")
        ax.legend(fontsize="small")
    ax.set_yticks(y, [short_name(n, 34) for n in names], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("loss with the layer alone factorized")
    ax.set_title(title or "layer sensitivity")
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, path)


# ---- all that fit ---------------------------------------------------------------------------
