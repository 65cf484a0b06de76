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

from ._analyze import Analysis, LayerAnalysis, analyze, read_analysis
from ._common import Change, machine_info
from ._compare import SCHEMA, SCHEMA_VERSION, LayerRow, Report, compare, read_json
from ._plots import plot_layers, plot_sensitivity, plot_spectra, plot_sweep, write_plots

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
