"""rankcut.report: compare (Report), JSON/Markdown, plots, analyze."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.layers import LowRankLinear
from rankcut.profile import count_macs, count_params, model_bytes
from rankcut.report import (
    SCHEMA,
    SCHEMA_VERSION,
    Analysis,
    Change,
    Report,
    analyze,
    compare,
    plot_layers,
    plot_sensitivity,
    plot_spectra,
    plot_sweep,
    read_analysis,
    read_json,
    write_plots,
)
from rankcut.select import layer_ranks, layer_sensitivities, mean_loss
from rankcut.train import evaluate

PNG = b"\x89PNG\r\n\x1a\n"
FAST = {"warmup": 0, "repeats": 2}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1, stride=2)
        self.c = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for conv in (self.stem, self.a, self.b, self.c):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


PLAN = rc.Plan({
    "a": rc.LayerPlan("tucker", (8, 6), predicted={"error": 0.25}, reason="hand-picked"),
    "b": rc.LayerPlan("cp", (12,), form="cp3", options={"max_iter": 5}),
    "c": rc.LayerPlan("svd", (8,)),
    "fc": rc.LayerPlan.skipped("too small"),
})


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    small = rc.apply(model, PLAN)
    x = torch.randn(4, 3, 12, 12)
    data = (torch.randn(48, 3, 12, 12), torch.randint(0, 10, (48,)))
    report = compare(model, small, x, plan=PLAN, data=data, meta={"model": "Net"}, **FAST)
    return model, small, x, data, report


def assert_png(path):
    blob = path.read_bytes()
    assert blob[:8] == PNG and len(blob) > 1024, path


# ---- numbers ---------------------------------------------------------------------------------


def test_totals_are_the_models_and_sums_of_layers(setup):
    model, small, x, _, report = setup
    assert report.totals["params"] == [count_params(model), count_params(small)]
    assert report.totals["macs"] == [count_macs(model, x[:1]), count_macs(small, x[:1])]
    assert report.totals["model_bytes"] == [model_bytes(model), model_bytes(small)]
    for i in (0, 1):  # Net has parameters in its Conv2d/Linear units only
        assert sum(row.params[i] for row in report.layers) == report.totals["params"][i]
        assert sum(row.macs[i] for row in report.layers) == report.totals["macs"][i]
        assert sum(row.param_bytes[i] for row in report.layers) == report.totals["param_bytes"][i]


def test_layers_carry_method_ranks_predictions_and_reasons(setup):
    _, small, _, _, report = setup
    rows = {row.name: row for row in report.layers}
    assert [row.name for row in report.layers] == ["stem", "a", "b", "c", "fc"]
    assert (rows["stem"].method, rows["stem"].reason) == ("dense", "")
    assert (rows["a"].method, rows["a"].ranks, rows["a"].compressed_type) == (
        "tucker", [8, 6], "TuckerConv2d")
    assert rows["a"].predicted == {"error": 0.25} and rows["a"].reason == "hand-picked"
    assert rows["a"].weight_error == pytest.approx(small.a.info["rel_error"])
    assert (rows["b"].method, rows["b"].form) == ("cp", "cp3")
    assert (rows["fc"].method, rows["fc"].reason) == ("skip", "too small")
    assert rows["fc"].params[0] == rows["fc"].params[1] == 330
    assert rows["c"].params == [32 * 32 + 32, 8 * (32 + 32) + 32]
    assert report.plan == json.loads(PLAN.to_json())


def test_latency_at_batch_one_and_user_batch(setup):
    report = setup[4]
    assert report.batches == [1, 4]
    for entry in report.latency:
        for side in ("original", "compressed"):
            assert entry[side]["batch"] == entry["batch"] and entry[side]["median_ms"] > 0
    for row in report.layers:
        assert [e["batch"] for e in row.latency] == [1, 4]
        assert all(e["original"] > 0 and e["compressed"] > 0 for e in row.latency)
    assert report.machine["threads"] == torch.get_num_threads()
    assert report.machine["torch"] == torch.__version__ and report.machine["device"] == "cpu"


def test_accuracies_equal_a_direct_evaluate(setup):
    model, small, _, data, report = setup
    assert report.accuracy == {"original": evaluate(model, data),
                               "compressed": evaluate(small, data)}


def test_precomputed_accuracies_are_not_evaluated_again(setup):
    model, small, x, data, _ = setup
    given = {"original": {"top1": 50.0, "top5": 90.0, "loss": 1.5, "n": 10},
             "compressed": {"top1": 40.0, "top5": 80.0, "loss": 2.0, "n": 10}}
    report = compare(model, small, x, accuracy=given, data="not data", latency=False)
    assert report.accuracy == given
    assert "top-1 50.00% -> 40.00% (10.00 points lower)" in report.headline()
    half = compare(model, small, x, accuracy={"original": given["original"]}, data=data,
                   latency=False)
    assert half.accuracy["original"] == given["original"]
    assert half.accuracy["compressed"] == evaluate(small, data)
    with pytest.raises(ValueError, match="accuracy"):
        compare(model, small, x, accuracy={"after": {}}, latency=False)


def test_without_latency_nothing_is_timed(setup):
    model, small, x, _, _ = setup
    report = compare(model, small, x, latency=False)
    assert report.latency == [] and report.batches == [] and report.accuracy == {}
    assert all(row.latency == [] for row in report.layers)
    assert [c.kind for c in report.changes()] == ["params", "macs", "bytes"]


def test_user_batch_size_sets_the_second_latency_batch(setup):
    model, small, x, _, _ = setup
    report = compare(model, small, x[:1], batch_size=3, **FAST)
    assert report.batches == [1, 3]


# ---- ratios and their direction ---------------------------------------------------------------


def test_change_texts_state_direction():
    assert Change("params", "params", 269_722, 87_001).text == \
        "params 3.1x fewer (269,722 -> 87,001)"
    assert Change("latency", "latency", 1.4, 1.0).text == "latency 1.4x faster (1.400 ms -> " \
        "1.000 ms)"
    slow = Change("latency", "latency", 1.0, 1.4)
    assert slow.short == "1.4x slower" and slow.ratio == pytest.approx(1 / 1.4)
    assert Change("MACs", "macs", 100, 250).short == "2.5x more"
    assert Change("file size", "bytes", 2e6, 1e6).text == "file size 2x smaller (2 MB -> 1 MB)"
    assert Change("params", "params", 5, 5).short == "unchanged"
    assert Change("params", "params", 1000, 996).short == "1.004x fewer"
    assert math.isinf(Change("params", "params", 5, 0).ratio)


def test_report_ratios_on_a_constructed_case():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(100, 100))
    low = nn.Sequential(LowRankLinear.from_dense(dense[0], 10))
    wide = nn.Sequential(LowRankLinear.from_dense(dense[0], 80))
    x = torch.randn(2, 100)
    report = compare(dense, low, x, latency=False)
    assert report.totals["params"] == [10_100, 2_100]
    assert report.change("params").text == "params 4.81x fewer (10,100 -> 2,100)"
    assert report.change("macs").text == "MACs 5x fewer (10,000 -> 2,000)"
    assert report.change("bytes").direction == "smaller"
    assert report.layers[0].method == "svd" and report.layers[0].ranks == [10]
    worse = compare(dense, wide, x, latency=False)
    assert worse.change("params").text == "params 1.59x more (10,100 -> 16,100)"
    assert worse.change("bytes").direction == "larger"
    timed = compare(dense, low, x, **FAST)
    c = timed.change("latency@2")
    assert c.ratio == pytest.approx(timed.latency[1]["original"]["median_ms"]
                                    / timed.latency[1]["compressed"]["median_ms"])
    assert c.direction == ("faster" if c.ratio > 1 else "slower" if c.ratio < 1 else "unchanged")
    with pytest.raises(KeyError, match="latency@1"):
        timed.change("latency@8")


# ---- JSON and Markdown -----------------------------------------------------------------------


def test_json_round_trips_with_schema_and_version(setup, tmp_path):
    report = setup[4]
    d = report.to_dict()
    assert d["schema"] == SCHEMA == "rankcut.report" and d["version"] == SCHEMA_VERSION == 1
    assert d["headline"][0].startswith("params ") and "fewer" in d["headline"][0]
    assert {c["key"] for c in d["changes"]} == {"params", "macs", "bytes", "latency@1",
                                                "latency@4"}
    assert Report.from_json(report.to_json()) == report
    path = report.write_json(tmp_path / "out" / "report.json")
    assert read_json(path) == report
    assert json.loads(path.read_text())["totals"] == report.totals
    bad = dict(d, version=2)
    with pytest.raises(ValueError, match="version 2 is not supported"):
        Report.from_dict(bad)
    with pytest.raises(ValueError, match="rankcut.report"):
        Report.from_dict({"schema": "rankcut.plan", "version": 1})
    with pytest.raises(ValueError, match="meta"):
        compare(nn.Linear(2, 2), nn.Linear(2, 2), torch.ones(1, 2), latency=False,
                meta={"f": object()})


def test_markdown_holds_the_headline_numbers(setup, tmp_path):
    report = setup[4]
    md = report.to_markdown()
    p0, p1 = report.totals["params"]
    m0, m1 = report.totals["macs"]
    for text in (f"{p0:,}", f"{p1:,}", f"{m0:,}", f"{m1:,}", report.change("params").short,
                 report.change("macs").short, report.change("latency@4").short,
                 f"{report.accuracy['original']['top1']:.2f}%",
                 f"{report.accuracy['compressed']['top1']:.2f}%", torch.__version__,
                 f"threads: {torch.get_num_threads()}", "`Net`", "too small", "tucker", "8,6"):
        assert text in md, text
    for line in report.headline():
        assert f"- {line}" in md
    assert report.summary().splitlines() == report.headline()
    assert report.write_markdown(tmp_path / "r.md").read_text() == md
    # the plan's prediction in words that follow its direction
    for ratio, words in ((1.0, "params unchanged and MACs unchanged"),
                         (2.5, "params 2.5x fewer and MACs 2.5x fewer"),
                         (0.5, "params 2x more and MACs 2x more")):
        plan = {"meta": {"predicted": {"params_ratio": ratio, "macs_ratio": ratio}},
                "layers": {}}
        text = dataclasses.replace(report, plan=plan).to_markdown()
        assert f"- the plan predicted {words}" in text


# ---- plots ------------------------------------------------------------------------------------


def test_every_plot_writes_a_png(setup, tmp_path):
    model, _, _, _, report = setup
    points = [{"method": "svd", "ratio": 1.5, "accuracy": 80.0},
              {"method": "svd", "ratio": 3.0, "top1": 60.0},
              ("tucker", 1.5, 85.0), ("tucker", 3.0, 70.0), ("auto", 2.0, 88.0)]
    paths = [
        plot_sweep(points, tmp_path / "sweep.png", baseline=90.0),
        plot_layers(report, tmp_path / "layers_report.png"),
        plot_layers(PLAN, tmp_path / "layers_plan.png"),
        plot_spectra(model, tmp_path / "spectra_model.png"),
        plot_spectra({"a": model.a, "m": torch.randn(20, 30), "s": torch.rand(12)},
                     tmp_path / "spectra_mixed.png", cuts=("vbmf", "energy=0.9", 4)),
        plot_spectra({"s": [3.0, 2.0, 1.0]}, tmp_path / "spectra_cuts.png",
                     cuts={"s": {"mine": 2}}),
        plot_sensitivity({"a": 2.5, "b": 2.4, "c": 2.31}, tmp_path / "sens.png", baseline=2.3),
        *write_plots(report, tmp_path / "plots"),
    ]
    assert (tmp_path / "plots" / "layers.png") in paths
    for path in paths:
        assert_png(path)
    with pytest.raises(ValueError, match="points"):
        plot_sweep([("svd", 1.0)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="report_or_plan"):
        plot_layers({"a": 1}, tmp_path / "bad.png")


def test_write_plots_adds_sensitivity_from_the_plan(setup, tmp_path):
    model, _, x, _, _ = setup
    plan = rc.Plan({"a": rc.LayerPlan("svd", (4,), predicted={"sensitivity_loss": 2.4}),
                    "b": rc.LayerPlan("svd", (4,), predicted={"sensitivity_loss": 2.6})})
    report = compare(model, rc.apply(model, plan), x, plan=plan, latency=False)
    paths = write_plots(report, tmp_path)
    assert [p.name for p in paths] == ["layers.png", "sensitivity.png"]
    for path in paths:
        assert_png(path)


# ---- analyze ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysis(setup):
    model, _, x, data, _ = setup
    return analyze(model, x, calib_data=data, methods=("svd", "tucker"), max_batches=2,
                   latency=True, **FAST)


def test_analyze_costs_spectra_and_suggested_ranks(setup, analysis):
    model, _, x, _, _ = setup
    assert [la.name for la in analysis.layers] == ["stem", "a", "b", "c", "fc"]
    assert analysis.totals["params"] == count_params(model)
    assert analysis.totals["macs"] == count_macs(model, x[:1])
    assert sum(la.macs for la in analysis.layers) == analysis.totals["macs"]
    assert {la.name for la in analysis.eligible} == {"a", "b", "c"}
    assert "input stem" in analysis.layer("stem").reason
    assert analysis.rules == ["vbmf", "energy=0.95"]
    a = analysis.layer("a")
    assert a.full_rank == 32 == len(a.spectrum)
    assert a.spectrum == sorted(a.spectrum, reverse=True)
    assert a.input_shape == [1, 16, 12, 12] and set(a.latency_ms) == {"1", "4"}
    for rule in ("vbmf", "energy=0.95"):
        for method in ("svd", "tucker"):
            got = analysis.suggested_ranks(rule, method)
            for name in ("a", "b"):
                assert got[name] == layer_ranks(model.get_submodule(name), method, rule)
        assert "c" not in analysis.suggested_ranks(rule, "tucker")  # a 1x1 conv: SVD only
    svd = next(s for s in a.suggested if s["rule"] == "energy=0.95" and s["method"] == "svd")
    r = svd["ranks"][0]
    s2 = torch.tensor(a.spectrum, dtype=torch.float64).pow(2)
    assert svd["error"] == pytest.approx(math.sqrt(float(s2[r:].sum() / s2.sum())))
    assert svd["params"] == r * 16 * 9 + 32 * r + 32
    # Tucker-2's: the truncated HOSVD's, computed here from the kernel's two unfoldings
    tk = next(s for s in a.suggested if s["rule"] == "energy=0.95" and s["method"] == "tucker")
    r_out, r_in = tk["ranks"]
    W = model.a.weight.detach().double()
    U = torch.linalg.svd(W.reshape(32, -1))[0][:, :r_out]
    V = torch.linalg.svd(W.transpose(0, 1).reshape(16, -1))[0][:, :r_in]
    approx = torch.einsum("ta,ua,usij,sb,vb->tvij", U, U, W, V, V)
    assert tk["error"] == pytest.approx(float((W - approx).norm() / W.norm()), rel=1e-6)


def test_analyze_sensitivities_equal_a_direct_call(setup, analysis):
    model, _, _, data, _ = setup
    batches = [(data[0][i:i + 64], data[1][i:i + 64]) for i in range(0, 48, 64)]
    assert analysis.sensitivity["dense_loss"] == pytest.approx(
        mean_loss(model, batches, nn.functional.cross_entropy))
    rank = layer_ranks(model.a, "svd", "params=0.25", input_hw=(12, 12))[0]
    direct = layer_sensitivities(model, ["a"], batches, method="svd", trial_rank=rank)
    assert analysis.layer("a").sensitivity == pytest.approx(direct["a"])
    assert set(analysis.sensitivities()) == {"a", "b", "c"}


def test_analyze_without_labels_has_no_sensitivity(setup):
    model, _, x, data, _ = setup
    result = analyze(model, x, calib_data=[data[0][:8]], rank_rules="params=4x")
    assert result.sensitivity == {} and result.sensitivities() == {}
    assert result.rules == ["params=0.25"] and result.latency == []


def test_analysis_round_trips_and_reads(analysis, tmp_path):
    d = analysis.to_dict()
    assert d["schema"] == "rankcut.analysis" and d["version"] == 1
    assert Analysis.from_json(analysis.to_json()) == analysis
    assert read_analysis(analysis.write_json(tmp_path / "a.json")) == analysis
    md = analysis.to_markdown()
    for text in ("## Layers", "## Sensitivity", "`a`", f"{analysis.totals['params']:,}",
                 "vbmf: svd", "input stem", torch.__version__):
        assert text in md, text
    paths = write_plots(analysis, tmp_path / "plots")
    assert [p.name for p in paths] == ["costs.png", "spectra.png", "sensitivity.png"]
    for path in paths:
        assert_png(path)


def test_analyze_rejects_bad_arguments(setup):
    model, _, x, _, _ = setup
    with pytest.raises(ValueError, match="methods: expected some of .*got 'qr'"):
        analyze(model, x, methods=("qr",))
    with pytest.raises(ValueError, match="rank: expected an int >= 1.*got 'energy=2'"):
        analyze(model, x, rank_rules=("energy=2",))
    with pytest.raises(ValueError, match="model: expected an nn.Module, got str"):
        analyze("net", x)


def test_plots_of_an_analysis_with_no_eligible_layer(tmp_path):
    """Labelled calibration data but every layer skipped (min_params): the plots written are
    those there is something to plot (the sensitivity plot used to raise)."""
    from torch import nn

    import rankcut as rc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    x = torch.randn(8, 3, 2, 2)
    analysis = rc.report.analyze(model, x[:1], calib_data=[(x, torch.randint(0, 4, (8,)))],
                                 min_params=10**6)
    assert [p.name for p in analysis.write_plots(tmp_path)] == ["costs.png"]


def test_large_factors_print_as_whole_numbers_and_plans_without_errors_plot(tmp_path):
    from rankcut.report import plot_layers
    from rankcut.report._common import Change, bytes_text, factor_text

    assert factor_text(1141.82) == "1,142x" and factor_text(3.14159) == "3.14x"
    assert "1,142x fewer" in Change("params", "params", 102764544, 90000).text
    # what rounds to 1000 at three digits is written as such, never 1e+03
    assert factor_text(999.6) == "1,000x" and factor_text(999.4) == "999x"
    assert bytes_text(999_600) == "1 MB" and bytes_text(999_999_000) == "1 GB"
    assert bytes_text(2.5e12) == "2,500 GB" and bytes_text(512) == "512 B"
    plan = rc.Plan({"a": rc.LayerPlan("svd", (4,), predicted={"error": None}),
                    "b": rc.LayerPlan("svd", (3,), predicted={"error": 0.1})})
    path = plot_layers(plan, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_latency_of_models_on_two_devices_is_refused():
    from rankcut.profile import compare_latency

    model = nn.Linear(4, 2)
    elsewhere = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="different devices"):
        compare_latency(model, elsewhere, torch.randn(3, 4), warmup=1, repeats=1)


def test_attention_keyword_calls_and_repeated_layers_are_profiled_and_analysed(tmp_path):
    """nn.MultiheadAttention's own projections count in the total (they were a KeyError); a
    layer called with its input by keyword is seen as called and timed; a layer called twice
    is suggested MACs over both calls; a rank rule above the full rank is priced as built."""
    from rankcut.profile import count_macs, profile
    from rankcut.report import analyze, compare, plot_spectra

    torch.manual_seed(0)
    attn = nn.Sequential(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True),
                         nn.Linear(32, 4)).eval()
    x = torch.randn(2, 5, 32)
    assert profile(attn, x, latency=False).macs == count_macs(attn, x[:1])
    analyze(attn, x)
    compare(attn, attn, x, latency=False)

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(32, 64), nn.Linear(64, 64)

        def forward(self, v):
            return self.out(self.out(self.fc(input=v)))  # fc by keyword, out twice

    model, v = Keyword().eval(), torch.randn(2, 32)
    fc = profile(model, v, warmup=0, repeats=2).layers[0]
    assert fc.calls == 1 and fc.input_shape == [1, 32] and 1 in fc.latency
    layers = {la.name: la for la in analyze(model, v, rank_rules=(8, 100), min_params=0).layers}
    assert layers["fc"].reason is None
    out8, out100 = [s for s in layers["out"].suggested if s["method"] == "svd"]
    assert out8["macs"] == 2 * 8 * (64 + 64)  # both calls
    assert out100["ranks"] == [64] and out100["params"] == 64 * 64 * 2 + 64  # at full rank
    # a rule given alone, and spectra given as values in any order
    values = torch.tensor([1.0, 4.0, 2.0, 0.5])
    assert plot_spectra({"a": values}, tmp_path / "a.png", cuts="energy=0.9").is_file()
    from rankcut.report._plots import _cut

    assert _cut(values, "energy=0.9") == 2
    with pytest.raises(ValueError, match="'n' holds NaN"):
        plot_spectra({"n": torch.tensor([3.0, float("nan")])}, tmp_path / "n.png")


def test_latency_quartiles_lie_within_the_runs():
    from rankcut.profile import _summary

    lat = _summary([1.0, 2.0], 1, "cpu")
    assert (lat.q1_ms, lat.median_ms, lat.q3_ms) == (1.25, 1.5, 1.75)
    assert 1.0 <= _summary([1.0, 2.0, 10.0], 1, "cpu").q1_ms
    assert _summary([3.0, 1.0, 10.0], 1, "cpu").min_ms == 1.0  # (the fastest run)


def test_a_tucker_trial_takes_the_rules_pair_of_ranks():
    """A params rule's Tucker trial is its (R_out, R_in) pair: (19, 5) for a quarter of a
    16->64 conv, not (19, 19), which no such layer holds (clamped, with a warning, to 46%)."""
    import warnings

    from rankcut.report import analyze
    from rankcut.select.sensitivity import _uniform

    conv = nn.Conv2d(16, 64, 3)
    assert _uniform(conv, "tucker", (19, 5), None, None).ranks == (19, 5)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 4)).eval()
    x = torch.randn(8, 16, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rank clamped
        a = analyze(model, x[:1], calib_data=[(x, torch.randint(0, 4, (8,)))], min_params=0,
                    sensitivity_method="tucker", trial_rank="params=0.25")
    assert a.layers[0].sensitivity is not None


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_weight_tied_between_units_is_counted_once_in_their_total():
    from rankcut.profile import profile

    model, x = _Tied(), torch.randn(1, 64)
    p = profile(model, x, latency=False)
    assert p.params == p.layer_params == 4096 and p.to_dict()["layer_params"] == 4096
    report = compare(model, model, x, latency=False)
    assert report.totals["unit_params"] == [4096, 4096]
    row = next(line for line in report.to_markdown().splitlines() if "**units**" in line)
    assert row.split("|")[4].strip() == "4,096"  # (unchanged: one number)


def test_units_are_timed_on_the_inputs_they_get_in_their_own_model(monkeypatch):
    """A fused channels_last model's layers receive channels_last inputs: timed on the
    original's contiguous ones, they paid a layout conversion the deployed model never does."""
    import sys

    model = rc.models.create("resnet20_cifar").eval()
    x = torch.rand(2, 3, 32, 32)
    fused = rc.fuse(model, x, memory_format="channels_last")
    seen = []
    real = sys.modules["rankcut.report._compare"].compare_latency

    def spy(a, b, inputs, **kw):
        second = kw.get("second_inputs")
        if isinstance(a, nn.Conv2d) and a.in_channels > 3:
            seen.append(((second or inputs)[0]).is_contiguous(memory_format=torch.channels_last))
        return real(a, b, inputs, **{**kw, "warmup": 1, "repeats": 1})

    monkeypatch.setattr(sys.modules["rankcut.report._compare"], "compare_latency", spy)
    compare(model, fused, x, warmup=1, repeats=1)
    assert seen and all(seen)


def test_plots_of_a_nan_layer_or_a_report_without_layers_say_why(tmp_path):
    layer = nn.Linear(128, 128)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    for source in (layer, {"fc": layer}, nn.Sequential(nn.Linear(128, 128), nn.ReLU(), layer)):
        with pytest.raises(ValueError, match="holds NaN or infinite values"):
            plot_spectra(source, tmp_path / "spectra.png")
    model = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    report = compare(model, model, torch.randn(1, 8), latency=False)
    assert write_plots(report, tmp_path / "plots") == []  # no layers.png to draw


def test_files_and_folders_that_cannot_be_written_or_read_are_named(setup, tmp_path):
    """A report written onto a folder, read from one, or plotted into a file is a ValueError
    naming the path (it was os.replace's or mkdir's raw error, naming a hidden temporary file);
    Markdown with σ₁² is written as UTF-8 whatever the locale."""
    report = setup[4]
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match=r"path: .*taken is a folder"):
        report.write_json(tmp_path / "taken")
    with pytest.raises(ValueError, match="taken: Is a directory"):
        read_json(tmp_path / "taken")
    with pytest.raises(ValueError, match="missing.json: No such file"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="out_dir: .*a-file is a file, not a folder"):
        write_plots(report, tmp_path / "a-file")
    with pytest.raises(ValueError, match="path: .*lies under .*a-file"):
        plot_layers(report, tmp_path / "a-file" / "layers.png")
    md = report.write_markdown(tmp_path / "report.md")
    assert md.read_bytes().decode("utf-8") == report.to_markdown()


def test_a_plan_holding_numpy_numbers_is_reported_as_it_saves(setup):
    import numpy as np

    model, small, x, _, _ = setup
    plan = rc.Plan({"a": rc.LayerPlan("tucker", (8, 6),
                                      predicted={"error": np.float32(0.25)})})
    report = compare(model, small, x, plan=plan, latency=False)
    row = next(r for r in report.layers if r.name == "a")
    assert row.predicted == {"error": 0.25} and report.plan == json.loads(plan.to_json())


def test_a_report_notes_the_page_faults_a_compressed_pass_pays_glibc(monkeypatch, tmp_path):
    """Where the compressed model's whole pass took far more page faults than the original's
    under glibc's default malloc, the report says so once (the first such batch), in its
    Markdown headline and its JSON, and records the allocator with the machine; with the counts
    alike, no note."""
    import sys

    from rankcut import profile
    from rankcut.profile import Latency

    faults = {"original": 50.0, "compressed": 50.0 + profile.NOTABLE_FAULTS}

    def fake_pair(a, b, inputs, **kw):
        batch = (inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape[0]
        return (Latency(1.0, 1.0, 1.0, 1, batch, 1, "cpu", faults["original"]),
                Latency(2.0, 2.0, 2.0, 1, batch, 1, "cpu", faults["compressed"]))

    monkeypatch.setattr(sys.modules["rankcut.report._compare"], "compare_latency", fake_pair)
    monkeypatch.setattr(profile, "allocator", lambda: "glibc")
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    small = rc.apply(model, rc.Plan({"2": rc.LayerPlan("svd", (4,))}))
    x = torch.rand(4, 3, 12, 12)
    report = compare(model, small, x, warmup=0, repeats=1)
    note = report.timing["allocator_note"]
    assert note.startswith("at batch 1, the compressed model took 1,074 page faults a pass "
                           "against 50 for the original"), note
    assert report.machine["allocator"] == "glibc"
    text = report.to_markdown()
    assert f"- note: {note}" in text
    assert report.summary().splitlines() == [*report.headline(), f"note: {note}"]  # (printed)
    assert "allocator_note" not in text  # (not repeated among the timing settings)
    again = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.to_markdown() == text
    faults["compressed"] = 60.0
    quiet = compare(model, small, x, warmup=0, repeats=1)
    assert "allocator_note" not in quiet.timing and "note" not in quiet.summary()
