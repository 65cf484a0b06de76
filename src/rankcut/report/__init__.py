"""Reports of what compression gained, analyses of what a model offers, and their plots.

    from rankcut.report import analyze, compare, write_plots
    report = compare(model, small, x, plan=plan, data=(images, labels))
    report.write_json("out/report.json"); report.write_markdown("out/report.md")
    print("\\n".join(report.headline()))     # "params 3.1x fewer (269,722 -> 87,001)", ...
    write_plots(report, "out/plots")
    analysis = analyze(model, x, rank_rules=("vbmf", "energy=0.95"), calib_data=batches)

Every ratio states its cost and direction ("MACs 2x fewer", "latency 1.4x slower"); JSON
carries ``"schema": "rankcut.report"`` (or ``"rankcut.analysis"``) and ``"version": 1``.
See docs/reports.md.
"""

import os
from pathlib import Path

from ..atomic import written_folder_problem
from ._analyze import Analysis, LayerAnalysis, analyze, read_analysis
from ._common import Change, machine_info
from ._compare import SCHEMA, SCHEMA_VERSION, LayerRow, Report, compare, read_json
from ._plots import plot_layers, plot_sensitivity, plot_spectra, plot_sweep

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Analysis",
    "Change",
    "LayerAnalysis",
    "LayerRow",
    "Report",
    "analyze",
    "compare",
    "machine_info",
    "plot_layers",
    "plot_sensitivity",
    "plot_spectra",
    "plot_sweep",
    "read_analysis",
    "read_json",
    "write_plots",
]


def write_plots(report, out_dir: str | os.PathLike) -> list[Path]:
    """Every plot that ``report`` has the data for, written into ``out_dir``; returns the paths.

    A :class:`~rankcut.report.Report`: ``layers.png`` and, when its plan holds sensitivity
    losses (``rankcut.select.sensitivity_plan``), ``sensitivity.png``. An
    :class:`~rankcut.report.Analysis`: ``spectra.png``, ``costs.png`` and, with calibration
    data, ``sensitivity.png``.
    """
    out = Path(out_dir)
    problem = written_folder_problem(out)
    if problem is not None:
        raise ValueError(f"out_dir: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(report, Analysis):
        return report.write_plots(out)
    if not isinstance(report, Report):
        raise ValueError(f"report: expected a rankcut Report or Analysis, got "
                         f"{type(report).__name__}")
    # (a report of a model with no Conv2d/Linear unit has no layers to plot)
    paths = [plot_layers(report, out / "layers.png")] if report.layers else []
    losses = {row.name: row.predicted["sensitivity_loss"] for row in report.layers
              if "sensitivity_loss" in row.predicted}
    if losses:
        paths.append(plot_sensitivity(losses, out / "sensitivity.png"))
    return paths
