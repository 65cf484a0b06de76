"""Latency: measurement, the latency table, the planner's guard against plans slower than
dense, and latency targets."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.profile import compare_latency, measure_latency
from rankcut.select import SlowerThanDense, parse_target
from rankcut.select.latency import RANK_STEP, LatencyTable, primitive_key


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1)).eval()


def test_measure_latency_reports_median_quartiles_and_setting():
    model = nn.Conv2d(8, 8, 3)
    lat = measure_latency(model, torch.randn(4, 8, 16, 16), warmup=1, repeats=7)
    assert lat.repeats == 7 and lat.batch == 4 and lat.device == "cpu"
    assert lat.threads == torch.get_num_threads()
    assert 0 < lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms
    assert lat.to_dict()["median_ms"] == lat.median_ms
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.randn(1, 8, 8, 8), repeats=0)


def test_a_slow_kernel_is_timed_by_its_fastest_of_three_runs(monkeypatch):
    """A primitive slower than RUNS_MS / repeats is timed by the fastest of the 3 runs after
    one untimed (the first runs of a fresh kernel still map in its output: their median took
    that in); a faster one gets more runs and their median."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    calls = []

    def fake(module, x, *, warmup=0, repeats=1, engine="eager"):
        calls.append((warmup, repeats))
        median = 40.0 if module.out_channels == 4 else 0.001  # (ms: a slow kernel, a fast one)
        return Latency(median, median, median, repeats, x.shape[0], 1, "cpu", None,
                       0.6 * median)

    monkeypatch.setattr(latency, "measure_latency", fake)
    table = LatencyTable()
    assert table.layer_ms(nn.Conv2d(8, 4, 3), (8, 8), None, 1) == pytest.approx(24.0)
    assert calls == [(1, 3)]
    assert table.layer_ms(nn.Conv2d(8, 5, 3), (8, 8), None, 1) == 0.001  # its median
    assert len(calls) == 3 and calls[-1][1] > table.repeats


def test_dense_layers_timed_slower_than_their_model_are_timed_again(monkeypatch):
    """Where a model's dense layers, as the table keeps them, take longer than the whole model
    (readings from different moments of the machine), the layers and the model are timed again
    and each kept at its faster reading; where they agree, nothing is timed again."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    readings = {"conv": iter([10.0, 1.0, 20.0]), "model": iter([5.0, 6.0])}

    def fake(module, x, *, warmup=0, repeats=1, engine="eager"):
        ms = next(readings["conv" if isinstance(module, nn.Conv2d) else "model"])
        return Latency(ms, ms, ms, repeats, 1, 1, "cpu", None, ms)

    monkeypatch.setattr(latency, "measure_latency", fake)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.rand(1, 8, 8, 8)
    layers = {"0": (model[0], (8, 8)), "2": (model[2], (8, 8))}  # (one primitive: one timing)
    table = LatencyTable()
    times, model_ms = table.dense_ms(model, x, layers, 1)
    assert times == {"0": 1.0, "2": 1.0} and model_ms == 5.0  # (20 > 5: again; min(5, 6))
    assert table.measured == 4
    assert table.dense_ms(model, x, layers, 1) == ({"0": 1.0, "2": 1.0}, 5.0)
    assert table.measured == 4  # agreeing now: kept


def test_compare_latency_orders_a_large_and_a_tiny_layer():
    big, tiny = nn.Conv2d(64, 64, 5, padding=2), nn.Conv2d(64, 1, 1)
    a, b = compare_latency(big, tiny, torch.randn(2, 64, 32, 32), warmup=1, repeats=5)
    assert a.median_ms > 3 * b.median_ms


def by_weights(module):
    """A fake time: 1e-3 ms per weight of every conv in ``module``, depthwise convs 50x slower
    (as they are on CPUs), plus 0.01 ms per model for the rest."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    ms = sum(m.weight.numel() * 1e-3 * (50 if getattr(m, "groups", 1) > 1 else 1)
             for m in convs)
    return ms + (0.01 if len(convs) > 1 else 0.0)


def test_table_times_a_layer_as_the_sum_of_its_sub_layers_and_keeps_them(fake_latency):
    fake_latency(by_weights)
    table = LatencyTable()
    conv = nn.Conv2d(16, 32, 3, padding=1)
    dense = table.layer_ms(conv, (8, 8), None, 4)
    assert dense == pytest.approx(32 * 16 * 9 * 1e-3)
    tucker = {"layer": "TuckerConv2d", "ranks": [8, 8]}
    t = table.layer_ms(conv, (8, 8), tucker, 4)
    assert t == pytest.approx((8 * 16 + 8 * 8 * 9 + 32 * 8) * 1e-3)
    taken = table.measured
    assert taken == 4  # the dense conv and Tucker-2's three sub-convs, measured once each
    assert table.layer_ms(conv, (8, 8), tucker, 4) == t and table.measured == taken
    # a CP-3 layer at rank 8 shares its 1x1 convs 16->8 and 8->32 with Tucker-2 at (8, 8):
    # only its depthwise stage is new; a rank is timed at its multiple of RANK_STEP (1 -> 8)
    table.layer_ms(conv, (8, 8), {"layer": "CPConv2d", "rank": 8, "form": "cp3"}, 4)
    assert table.measured == taken + 1
    taken = table.measured
    assert table.layer_ms(conv, (8, 8), {"layer": "TuckerConv2d", "ranks": [5, 8 - RANK_STEP + 1]},
                          4) == t and table.measured == taken
    # another batch or input size is another entry
    table.layer_ms(conv, (8, 8), None, 1)
    table.layer_ms(conv, (16, 16), None, 4)
    assert table.measured == taken + 2
    assert set(table.entries[primitive_key(conv, (8, 8))]) == {"1", "4"}


def test_a_table_records_the_allocator_its_times_were_taken_with(tmp_path, fake_latency,
                                                                 monkeypatch):
    """Eager CPU timings hang on malloc (rankcut.profile.keep_freed_memory): a table says
    which it was measured with, and one of the other is refused; a table written before the
    allocator was recorded was measured on glibc's defaults."""
    import rankcut.select.latency as latency

    fake_latency(by_weights)
    monkeypatch.setattr(latency, "allocator", lambda: "glibc")
    table = LatencyTable()
    assert table.setting["allocator"] == "glibc"
    table.layer_ms(nn.Linear(64, 32), (1,), None, 2)
    path = table.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    del data["setting"]["allocator"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert LatencyTable.load(tmp_path / "old.json").entries == table.entries
    monkeypatch.setattr(latency, "allocator", lambda: "glibc, freed memory kept")
    for old in (path, tmp_path / "old.json"):
        with pytest.raises(ValueError, match="another setting.*allocator: 'glibc' in the "
                                             "table, 'glibc, freed memory kept' here"):
            LatencyTable.load(old)
    kept = LatencyTable()
    assert latency.cache_path(kept.setting) != latency.cache_path(table.setting)
    # the default allocator's cache file is the one written before the key was recorded
    old_setting = {k: v for k, v in table.setting.items() if k != "allocator"}
    assert latency.cache_path(old_setting) == latency.cache_path(table.setting)
    # a live table of the other allocator is refused for planning, and not written back
    with pytest.raises(ValueError, match="latency_table: measured with the allocator 'glibc'"):
        latency.as_table(table, "cpu")
    assert latency.as_table(kept, "cpu") is kept
    table.file = tmp_path / "live.json"
    with pytest.warns(UserWarning, match="not saved.*allocator 'glibc'"):
        assert table.write_back() is None


def test_table_saves_loads_and_refuses_another_setting(tmp_path, fake_latency):
    fake_latency(by_weights)
    table = LatencyTable()
    table.layer_ms(nn.Linear(64, 32), (1,), {"layer": "LowRankLinear", "rank": 8}, 2)
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path)
    assert again.entries == table.entries and again.setting == table.setting
    assert again.layer_ms(nn.Linear(64, 32), (1,), {"layer": "LowRankLinear", "rank": 8}, 2) \
        == pytest.approx((64 * 8 + 8 * 32) * 1e-3) and again.measured == 0
    data = json.loads(path.read_text())
    data["setting"]["threads"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measured in another setting.*threads"):
        LatencyTable.load(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a rankcut latency table"):
        LatencyTable.load(path)
    del data["setting"]["dtype"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="a damaged setting"):
        LatencyTable.load(path)
    with pytest.raises(ValueError, match="memory_format"):
        LatencyTable(memory_format="nhwc")
    # timing counts checked as the profiler checks them: NumPy ints taken (stored as ints,
    # so the table still saves), bools and floats refused
    import numpy as np

    counted = LatencyTable(warmup=np.int64(1), repeats=np.int32(4))
    assert (counted.warmup, counted.repeats) == (1, 4) and type(counted.repeats) is int
    counted.save(tmp_path / "counted.json")
    for warmup, repeats in ((1, True), (1, 4.0), (-1, 4)):
        with pytest.raises(ValueError, match="warmup, repeats: expected ints"):
            LatencyTable(warmup=warmup, repeats=repeats)


def test_the_guard_keeps_a_budgeted_plan_no_slower_than_dense(fake_latency):
    """Depthwise convs (CP's spatial stages) 50x slower: without the guard the plan takes CP;
    with it, the predicted time stays within the dense model's and the MACs target is met."""
    fake_latency(by_weights)
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    opts = {"options": {"cp": {"max_iter": 10}}, "min_params": 100}
    free = rc.plan(model, x, target="macs=3x", allow_slower=True, **opts)
    assert "latency" not in free.meta
    assert any(lp.method == "cp" for lp in free.active.values()), str(free)
    guarded = rc.plan(model, x, target="macs=3x", **opts)
    lat = guarded.meta["latency"]
    assert lat["predicted_ratio"]["2"] <= 1.0 and lat["limit"] == 1.0
    assert not any(lp.method == "cp" for lp in guarded.active.values()), str(guarded)
    assert guarded.meta["predicted"]["macs_ratio"] >= 3.0
    for lp in guarded.active.values():
        assert lp.predicted["latency_ratio"] == pytest.approx(
            lp.predicted["latency_ms"]["2"] / lp.predicted["dense_latency_ms"]["2"])


def test_the_guard_refuses_a_target_it_cannot_meet_no_slower(fake_latency):
    """Every primitive alike, so every factorized layer is slower than dense: no plan meets the
    MACs target no slower than dense, and the planner says so (a compressed model slower than
    the original defeats the purpose) instead of handing one over; allow_slower=True takes it.
    (A whole model takes its convs' time: timed whole, the plan is slower too.)"""
    fake_latency(lambda m: 9.0 * sum(isinstance(c, nn.Conv2d) for c in m.modules()))
    model, x = convnet(), torch.rand(1, 16, 16, 16)
    with pytest.raises(SlowerThanDense, match=r"target: macs=2x cannot be met no slower than "
                                              r"the dense model at batch 1 on this device: the "
                                              r"plan that meets it is predicted at 1\.[0-9]+ of "
                                              r"the dense model's time there \(measured whole: "
                                              r"1\.[0-9]+\).*allow_slower=True"):
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100)
    free = rc.plan(model, x, method="svd", target="macs=2x", min_params=100, allow_slower=True)
    assert free.meta["predicted"]["macs_ratio"] >= 2.0 and "latency" not in free.meta


def test_a_rank_rule_leaves_layers_measured_slower_dense(fake_latency):
    fake_latency(lambda m: 9.0)
    model, x = convnet(), torch.rand(1, 16, 16, 16)
    with pytest.warns(UserWarning, match="measured slower than its dense layer"):
        plan = rc.plan(model, x, method="svd", rank=4, min_params=100)
    assert not plan.active
    assert all("measured slower than dense" in lp.reason for lp in plan.layers.values())
    assert plan.meta["latency"]["vetoed"]
    # a rank no smaller than dense: nothing was timed, and the reason says so
    with pytest.warns(UserWarning, match="no layer's factorization is smaller"):
        big = rc.plan(model, x, method="svd", rank=100, min_params=100)
    assert not big.meta["latency"]["vetoed"]
    assert all("within the rank rule" in lp.reason for lp in big.layers.values())


def test_a_plan_measured_slower_than_predicted_is_chosen_again(fake_latency):
    """A fake world where a whole model pays 2 ms per conv on top of its layers' times (as
    small kernels in a row do): the first plan for a latency target, predicted to meet it,
    measures slower, so the budget is tightened until the measured time meets it (or misses it
    by no more than LATENCY_TOLERANCE, a timing's noise). The checks are kept in the table:
    planning again times nothing and gives the same plan."""
    from rankcut.select.planner import LATENCY_TOLERANCE

    def ms(module):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return by_weights(module) + (2.0 * len(convs) if len(convs) > 1 else 0.0)

    fake_latency(ms)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1),
                                                          nn.ReLU())]).eval()
    x, table = torch.rand(2, 32, 8, 8), LatencyTable()
    kw = {"method": "svd", "target": "latency=1.25x", "min_params": 100, "latency_table": table}
    plan = rc.plan(model, x, **kw)
    lat = plan.meta["latency"]
    checks = lat["checks"]
    assert len(checks) >= 2 and checks[0]["measured"] > 0.8 >= checks[0]["predicted"]
    assert lat["ratio"] == checks[-1]["measured"] <= 0.8 * (1 + LATENCY_TOLERANCE)
    assert lat["goal_ratio"] == 0.8
    taken = table.measured
    again = rc.plan(model, x, **kw)
    assert table.measured == taken and again.active == plan.active


def _cp_plan_where_depthwise_is_slow(fake_latency, alone: float, whole: float):
    """A CP-only macs=3x plan of ``convnet`` in a world where a depthwise conv (CP's spatial
    stage) times ``alone`` x its weights timed alone and ``whole`` x in a whole model."""
    def ms(module):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        slow = alone if len(convs) == 1 else whole
        return sum(m.weight.numel() * 1e-3 * (slow if m.groups > 1 else 1) for m in convs)

    fake_latency(ms)
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    return rc.plan(model, x, method="cp", target="macs=3x", min_params=100,
                   options={"cp": {"max_iter": 10}})


def test_a_plan_the_table_prices_slower_but_measured_faster_whole_stands(fake_latency):
    """The table is pessimistic: alone, a depthwise conv times 500x its weights, but in a whole
    model it costs what its weights do. A CP-only plan the guard cannot bring within the limit
    by the table is timed whole, runs faster than dense, and stands: the measurement decides."""
    plan = _cp_plan_where_depthwise_is_slow(fake_latency, alone=500, whole=1)
    lat = plan.meta["latency"]
    assert not lat["guard"]["met"] and lat["checks"][0]["predicted"] > 1.0
    assert lat["ratio"] <= 1.0 and all(lp.method == "cp" for lp in plan.active.values())
    assert plan.meta["predicted"]["macs_ratio"] >= 3.0


def test_where_the_guard_gives_way_the_fastest_plan_within_its_bound_is_measured(fake_latency):
    """Alone, a depthwise conv times 500x its weights; in a whole model 60x. The CP plan without
    the limit measures slower than dense, the fastest plan within the guard's bound on damage
    measures faster: that one is kept, and meta["latency"]["guard"] describes it (not the
    plan without the limit)."""
    plan = _cp_plan_where_depthwise_is_slow(fake_latency, alone=500, whole=60)
    lat = plan.meta["latency"]
    first, last = lat["checks"][0], lat["checks"][-1]
    assert first["measured"] > 1.0 >= last["measured"] == lat["ratio"]
    assert last["predicted"] < first["predicted"]
    guard = lat["guard"]
    assert guard["damage"] == pytest.approx(plan.meta["predicted"]["error_sq_sum"])
    assert guard["damage_if_slower"] < guard["damage"] <= 1.25 * guard["damage_if_slower"]
    assert guard["ratio"] == pytest.approx(last["predicted"])


def test_a_plan_measured_a_hair_over_the_limit_is_tried_again_before_refusal(fake_latency):
    """A whole factorized model measures 0.4% over what its layers predict (timing noise, say),
    and the limit (latency_margin) sits exactly at the first plan's prediction: it measures a
    hair over. Aiming at limit x predicted / measured would change nothing; the planner aims at
    least 2% lower instead, and the plan it finds stands (it used to be refused)."""
    def ms(module):
        factorized = any(type(m).__module__.startswith("rankcut.layers")
                         for m in module.modules())
        return by_weights(module) * (1.004 if factorized else 1.0)

    fake_latency(ms)
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    kw = {"method": "cp", "target": "macs=3x", "min_params": 100, "rank_multiple": 8,
          "speed_slack": 0, "options": {"cp": {"max_iter": 10}}}  # (ranks timed as they are)
    first = rc.plan(model, x, latency_margin=5.0, **kw).meta["latency"]["checks"][0]
    assert first["measured"] == pytest.approx(1.004 * first["predicted"])
    limit = first["predicted"]
    plan = rc.plan(model, x, latency_margin=limit - 1, **kw)
    checks = plan.meta["latency"]["checks"]
    assert checks[0]["measured"] > limit >= checks[-1]["measured"] == plan.meta["latency"]["ratio"]
    assert plan.meta["predicted"]["macs_ratio"] >= 3.0


def test_the_guard_refuses_a_plan_measured_slower_than_dense(fake_latency):
    """A whole model pays 6 ms per conv on top of its layers' times: a MACs plan predicted no
    slower than dense (its layers timed alone) measures slower whole, no tighter plan within
    the guard's bound mends it, so the planner refuses it rather than hand over a model slower
    than the original; with a margin that covers the overhead, the same target is planned."""
    model, x = _slow_whole(fake_latency), torch.rand(2, 32, 8, 8)
    kw = {"method": "svd", "target": "macs=1.5x", "min_params": 100}
    with pytest.raises(SlowerThanDense, match=r"macs=1\.5x cannot be met no slower than the "
                                              r"dense model at batch 2 on this device: the plan "
                                              r"that meets it measured [1-9]\.[0-9]+ of the "
                                              r"dense model's time there, timed whole "
                                              r"\(predicted 0\.[0-9]+"):
        rc.plan(model, x, **kw)
    plan = rc.plan(model, x, latency_margin=2.0, **kw)
    lat = plan.meta["latency"]
    assert lat["checks"][0]["predicted"] <= 1.0 < lat["ratio"] <= 3.0
    assert plan.meta["predicted"]["macs_ratio"] >= 1.5


def _slow_whole(fake_latency, calls=None):
    """A whole model pays 6 ms per conv on top of its layers' times (a model of 3 convs)."""
    def ms(module):
        if calls is not None:
            calls.append(module)
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return by_weights(module) + (6.0 * len(convs) if len(convs) > 3 else 0.0)

    fake_latency(ms)
    return nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1),
                                                         nn.ReLU())]).eval()


def test_a_latency_target_measured_slower_than_dense_is_refused(fake_latency):
    """With the guard on, a latency target whose plans all measure slower than dense (not just
    short of the goal) is refused, as a MACs target's would be; allow_slower=True keeps it,
    with the warning that it misses its goal."""
    model, x = _slow_whole(fake_latency), torch.rand(2, 32, 8, 8)
    kw = {"method": "svd", "target": "latency=1.25x", "min_params": 100}
    with pytest.raises(SlowerThanDense, match=r"target: latency=1\.25x cannot be met on this "
                                              r"device at batch 2: the plan measured "
                                              r"[1-9]\.[0-9]+ of the dense model's time there.*"
                                              r"slower than the dense model.*allow_slower=True"):
        rc.plan(model, x, **kw)
    with pytest.warns(UserWarning, match="against a goal of 0.80"):
        plan = rc.plan(model, x, allow_slower=True, **kw)
    assert plan.meta["latency"]["ratio"] > 1.0


def test_a_refused_target_keeps_what_was_timed(fake_latency, tmp_path):
    """The timings a refused target took (its candidates and the whole-plan checks) are saved
    to the table's file: planning again times nothing and refuses the same way."""
    calls = []
    model, x = _slow_whole(fake_latency, calls), torch.rand(2, 32, 8, 8)
    kw = {"method": "svd", "target": "macs=1.5x", "min_params": 100,
          "latency_table": tmp_path / "t.json"}
    with pytest.raises(SlowerThanDense) as first:
        rc.plan(model, x, **kw)
    assert calls and (tmp_path / "t.json").is_file()
    calls.clear()
    with pytest.raises(SlowerThanDense) as again:
        rc.plan(model, x, **kw)
    assert calls == [] and str(again.value) == str(first.value)


def test_a_plan_measured_faster_than_a_latency_target_needs_is_loosened(fake_latency):
    """The other way round: a whole model saves 0.4 ms per conv against its layers timed alone,
    so the first plan for the target (more, smaller convs) beats it by far; the budget is
    loosened (fewer MACs cut), and the plan returned still meets the target as measured."""
    def ms(module):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return by_weights(module) - (0.4 * len(convs) if len(convs) > 1 else 0.0)

    fake_latency(ms)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1),
                                                          nn.ReLU())]).eval()
    x = torch.rand(2, 32, 8, 8)
    plan = rc.plan(model, x, method="svd", target="latency=2x", min_params=100)
    checks = plan.meta["latency"]["checks"]
    assert checks[0]["measured"] < 0.95 * 0.5 and len(checks) >= 2
    assert checks[-1]["measured"] <= 0.5 and plan.meta["latency"]["ratio"] == \
        checks[-1]["measured"]
    assert plan.meta["budget"]["latency"] > 0.5  # loosened: the prediction was pessimistic


def test_a_latency_target_is_searched_between_a_too_fast_and_a_too_slow_plan(fake_latency):
    """A whole model of r times the dense model's weights runs at r² times its layers' time
    (far faster than they predict when r is small): the first plan for latency=2x measures
    10x faster; aiming by that ratio picks the dense model, which misses, and aiming from it
    again picks the first plan: the search swung between the two and kept the 10x plan (all
    the accuracy spent for speed not asked for). Searched in the bracket, it ends on target:
    at most LATENCY_TOLERANCE slower than the goal, at most 5% faster."""
    from rankcut.select.planner import LATENCY_TOLERANCE

    def ms(module):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if len(convs) < 3:
            return by_weights(module)
        return by_weights(module) * (sum(m.weight.numel() for m in convs) / (3 * 32 * 32 * 9)) ** 2

    fake_latency(ms)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1),
                                                          nn.ReLU())]).eval()
    plan = rc.plan(model, torch.rand(2, 32, 8, 8), method="svd", target="latency=2x",
                   min_params=100)
    checks = plan.meta["latency"]["checks"]
    assert checks[0]["measured"] < 0.15  # the first plan: far faster than planned
    ratio = plan.meta["latency"]["ratio"]
    assert 0.95 * 0.5 <= ratio == checks[-1]["measured"] <= (1 + LATENCY_TOLERANCE) * 0.5


def test_planning_with_a_full_table_times_nothing_and_repeats_itself(tmp_path, monkeypatch):
    """Real timings: the first plan fills the table (saved to a path), the second, from the
    file, takes no timing, builds no candidate layer (the file keeps which primitives each one
    runs) and gives the same plan. A table written before those were kept is read, used, and
    written back with them."""
    import rankcut.select.latency as latency

    model, x = convnet(), torch.rand(2, 16, 16, 16)
    path = tmp_path / "latency.json"
    kw = {"target": "macs=2x", "min_params": 100, "latency_table": path,
          "options": {"cp": {"max_iter": 5}},
          "latency_margin": 1.0}  # tiny layers: a factorization may be slower on a busy machine
    first = rc.plan(model, x, **kw)
    assert path.exists() and first.meta["latency"]["timings_taken"] > 0
    saved = json.loads(path.read_text())
    assert saved["chains"] and all(keys for keys in saved["chains"].values())

    def no_rebuild(*args):
        raise AssertionError("a candidate layer was built though the table knows its chain")

    with monkeypatch.context() as m:
        m.setattr(latency, "rebuild", no_rebuild)
        second = rc.plan(model, x, **kw)
    assert second.meta["latency"]["timings_taken"] == 0
    assert second.active == first.active
    assert second.meta["latency"]["predicted_ms"] == first.meta["latency"]["predicted_ms"]
    chains = saved.pop("chains")  # as an earlier rankcut wrote it
    path.write_text(json.dumps(saved))
    third = rc.plan(model, x, **kw)
    assert third.active == first.active and third.meta["latency"]["timings_taken"] == 0
    assert json.loads(path.read_text())["chains"] == chains


def test_without_a_table_the_machine_cache_is_used_and_extended(tmp_path, monkeypatch,
                                                                  fake_latency):
    """latency_table=None plans with this machine's cached table ($RANKCUT_CACHE): the second
    plan times nothing and repeats the first; another setting gets its own file; off caches
    nothing; a damaged file is rebuilt; an unwritable cache warns, the plan stands."""
    from rankcut.select.latency import cache_path

    fake_latency(lambda m: 1.0 if isinstance(m, nn.Conv2d) else 5.0)
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    kw = {"target": "macs=2x", "min_params": 100, "options": {"cp": {"max_iter": 5}},
          "latency_margin": 1.0}  # (a factorized layer, 2-3 convs, is slower in this world)
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    first = rc.plan(model, x, **kw)
    files = list((tmp_path / "cache").glob("latency-*.json"))
    assert len(files) == 1 and first.meta["latency"]["timings_taken"] > 0
    assert files[0] == cache_path(first.meta["latency"]["table"])
    second = rc.plan(model, x, **kw)
    assert second.meta["latency"]["timings_taken"] == 0 and second.active == first.active
    # another setting (threads) is another table: nothing of the first is reused
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        other = rc.plan(model, x, **kw)
    finally:
        torch.set_num_threads(threads)
    assert other.meta["latency"]["timings_taken"] > 0
    assert len(list((tmp_path / "cache").glob("latency-*.json"))) == 2
    files[0].write_text("{ damaged")
    assert rc.plan(model, x, **kw).meta["latency"]["timings_taken"] > 0
    assert rc.plan(model, x, **kw).meta["latency"]["timings_taken"] == 0  # rewritten
    # valid JSON with a damaged entry (a bare number, a time that is text): rebuilt too
    saved = json.loads(files[0].read_text())
    for bad in (0.02, {"1": "abc"}):
        key = next(iter(saved["entries"]))
        files[0].write_text(json.dumps({**saved, "entries": {**saved["entries"], key: bad}}))
        assert rc.plan(model, x, **kw).meta["latency"]["timings_taken"] > 0
    monkeypatch.setenv("RANKCUT_CACHE", "off")
    assert rc.plan(model, x, **kw).meta["latency"]["timings_taken"] > 0
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("RANKCUT_CACHE", str(blocked / "cache"))
    with pytest.warns(UserWarning, match="could not save"):
        plan = rc.plan(model, x, **kw)
    assert plan.active == first.active
    # no home folder to find a cache in: a warning, and a table kept in memory
    monkeypatch.delenv("RANKCUT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    with pytest.warns(UserWarning, match="could not read"):
        assert rc.plan(model, x, **kw).active == first.active


def test_whole_model_timings_are_not_shared_by_models_that_differ_in_structure():
    from rankcut.select.latency import _model_key

    x = (torch.rand(1, 8),)
    relu = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    gelu = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    assert _model_key("rest", relu, x) != _model_key("rest", gelu, x)
    twin = nn.Sequential(nn.Linear(8, 8), nn.ReLU())  # other weights, same structure
    assert _model_key("rest", relu, x) == _model_key("rest", twin, x)


def test_a_table_object_of_another_thread_count_is_refused():
    table = rc.select.LatencyTable()
    table.setting["threads"] += 1
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    with pytest.raises(ValueError, match="threads"):
        rc.plan(model, x, target="macs=2x", min_params=100, latency_table=table)


def test_a_table_is_of_the_model_dtype_and_one_of_another_is_refused(tmp_path, monkeypatch,
                                                                      fake_latency):
    """A float64 model is priced with float64 timings (its own cached table, its own file); a
    float32 table given for it is refused: its layers' times are not the model's."""
    fake_latency(by_weights)
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    model, x = convnet().double(), torch.rand(2, 16, 16, 16, dtype=torch.float64)
    kw = {"target": "macs=2x", "min_params": 100, "options": {"cp": {"max_iter": 5}}}
    plan = rc.plan(model, x, **kw)
    assert plan.meta["latency"]["table"]["dtype"] == "float64"
    assert rc.plan(convnet(), x.float(), **kw).meta["latency"]["table"]["dtype"] == "float32"
    assert len(list((tmp_path / "cache").glob("latency-*.json"))) == 2
    with pytest.raises(ValueError, match="measured in float32 on cpu, but the model computes in "
                                         "float64"):
        rc.plan(model, x, latency_table=LatencyTable(), **kw)
    path = LatencyTable().save(tmp_path / "t32.json")
    with pytest.raises(ValueError, match="holds float32 times, not float64"):
        rc.plan(model, x, latency_table=path, **kw)
    made = rc.plan(model, x, latency_table=tmp_path / "t64.json", **kw)  # a new file: float64
    assert made.meta["latency"]["table"]["dtype"] == "float64"


def test_a_table_of_other_rankcut_code_keeps_its_primitives_only(tmp_path, fake_latency,
                                                                 monkeypatch):
    """Which primitives a factorized layer runs (its chain), and a whole model's time beside
    its layers, depend on rankcut's code: a table written by other code is read without them
    (timed again); a primitive's time still holds."""
    import rankcut.select.latency as latency

    fake_latency(by_weights)
    table = LatencyTable()
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    conv = model[0]
    table.layer_ms(conv, (16, 16), {"layer": "TuckerConv2d", "ranks": [8, 8]}, 2)
    table.model_ms(model, x, 2)
    path = table.save(tmp_path / "t.json")
    assert LatencyTable.load(path).chains == table.chains
    monkeypatch.setattr(latency, "code_digest", lambda: "other code")
    other = LatencyTable.load(path)
    assert other.chains == {} and set(other.entries) == {
        k for k in table.entries if k.startswith(("conv ", "linear "))} != set(table.entries)


def test_a_table_timed_another_way_keeps_no_times(tmp_path, fake_latency):
    """Times taken by another timing method (a table written before slow kernels were timed by
    their fastest run) are not mixed with this method's: none is kept, the chains are; a
    damaged timing setting is refused by name."""
    import json

    from rankcut.select.latency import TIMING_METHOD

    fake_latency(by_weights)
    table = LatencyTable()
    conv = convnet()[0]
    table.layer_ms(conv, (16, 16), {"layer": "TuckerConv2d", "ranks": [8, 8]}, 2)
    path = table.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["timing"]["method"] == TIMING_METHOD
    assert LatencyTable.load(path).entries == table.entries
    for old in (TIMING_METHOD - 1, None):
        if old is None:
            del data["timing"]["method"]  # (tables written before the method was recorded)
        else:
            data["timing"]["method"] = old
        path.write_text(json.dumps(data))
        again = LatencyTable.load(path)
        assert again.entries == {} and again.chains == table.chains
    data["timing"] = [3, 9]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="a damaged setting"):
        LatencyTable.load(path)


def test_primitives_that_pad_differently_are_timed_apart():
    zeros, reflect = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1,
                                                              padding_mode="reflect")
    assert primitive_key(zeros, (8, 8)) != primitive_key(reflect, (8, 8))
    assert "pm" not in primitive_key(zeros, (8, 8))  # tables written before keep their keys


def test_latency_target_parses_and_is_met():
    assert parse_target("latency=2x") == ("latency", 0.5)
    assert parse_target("latency=0.8") == ("latency", 0.8)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.rand(4, 64, 32, 32)
    plan = rc.plan(model, x, method="svd", target="latency=1.5x", min_params=100)
    timing = plan.meta["latency"]
    assert timing["goal_ratio"] == pytest.approx(1 / 1.5)
    # the first plan's prediction meets the goal by construction; a later one may be aimed above
    # it where the whole model measured faster than predicted (more than 5% under the goal)
    first = timing["checks"][0]
    assert first["predicted"] <= timing["goal_ratio"] + 1e-9
    if timing["predicted_ratio"]["4"] > timing["goal_ratio"]:
        assert first["measured"] < 0.95 * timing["goal_ratio"]
    assert timing["batch"] == 4 and timing["table"]["threads"] == torch.get_num_threads()
    # the whole planned model is timed against the dense one and reported; it runs faster
    # (how close to the goal is a benchmark's matter: benchmarks/latency.py)
    assert timing["ratio"] == timing["measured_ratio"]["4"] < 1.0
    dense_ms, planned_ms = timing["measured_ms"]["4"]
    assert planned_ms / dense_ms == pytest.approx(timing["ratio"])

def test_allocate_with_a_price_on_time_trades_error_for_speed():
    from rankcut.curves import Candidate
    from rankcut.select.budget import allocate, frontier

    def c(name, macs, error, latency):
        return Candidate(name, (1,), None, 0, macs, error, latency=latency)

    dense = c("dense", 100, 0.0, 1.0)
    cands = {"a": [c("svd", 40, 0.1, 1.2), c("tucker", 50, 0.2, 0.3), dense],
             "b": [c("svd", 40, 0.1, 0.5), dense]}
    plain = allocate({n: frontier(f, "macs") for n, f in cands.items()}, "macs", 100)
    assert plain["a"].method == "svd"  # least error, slower than dense
    timed = allocate(cands, "macs", 100, score=lambda x: x.error ** 2 + 1.0 * x.latency)
    assert timed["a"].method == "tucker" and timed["b"].method == "svd"
    # the tucker candidate, beaten on MACs and error, is off the plain frontier: only a price
    # on time brings it back
    assert [x.method for x in frontier(cands["a"], "macs")] == ["svd", "dense"]


def test_where_no_price_of_time_reaches_the_limit_the_guard_gives_way():
    """Every factorized plan is predicted slower than dense: pricing time higher only buys
    damage (tucker: a little faster, a little worse; still slower). The guard keeps the plan
    without the limit (it used to hand on the tucker plan, 10% more damage for nothing), keeps
    the fastest plan within its bound to be timed whole too, and says why (priced_out)."""
    from types import SimpleNamespace

    from rankcut.curves import Candidate
    from rankcut.select.planner import _Chooser

    def c(name, params, error, latency):
        return Candidate(name, (1,), None, params, 0, error, latency=latency)

    rest = 0.2
    layers = {n: SimpleNamespace(cands=[c("svd", 50, 0.10, 0.6), c("tucker", 50, 0.105, 0.55)],
                                 dense=c("dense", 100, 0.0, 0.4)) for n in "ab"}
    dense = rest + sum(layer.dense.latency for layer in layers.values())
    clock = SimpleNamespace(ratio=lambda chosen: (rest + sum(
        x.latency for x in chosen.values())) / dense)
    choose = _Chooser(layers, "params", limit=1.0, clock=clock)
    chosen = choose(120)
    assert {x.method for x in chosen.values()} == {"svd"}
    assert choose.cost["priced_out"] and not choose.cost["met"]
    assert choose.cost["damage"] == pytest.approx(2 * 0.10 ** 2)
    fastest = choose.take_bounded(clock.ratio(chosen))
    assert {x.method for x in fastest.values()} == {"tucker"}


def test_speed_slack_searches_past_prices_whose_plans_are_no_faster():
    """The speed slack's search raises the price of time while the damage stays within its
    bound, whatever the time of the plans on the way: a small price whose plan is a hair
    slower (the budget filled with other candidates) used to end it, so the faster plans at
    higher prices, within the bound, were never reached (VGG-11-BN at 4x fewer MACs, batch 1:
    the slack bought nothing). Of the plans within the bound the fastest is kept."""
    from types import SimpleNamespace

    from rankcut.curves import Candidate
    from rankcut.select.planner import _Chooser

    def plan(error, time):
        return {"a": Candidate("svd", (1,), None, 1, 1, error, latency=time)}

    base, slower, faster, fastest = (plan(1.0, 0.55), plan(1.0, 0.56), plan(1.02, 0.45),
                                     plan(1.5, 0.30))

    def at(price):  # the allocation at each price of time
        return (base if price < 1e-3 else slower if price < 0.5 else faster if price < 5
                else fastest)

    clock = SimpleNamespace(ratio=lambda chosen: chosen["a"].latency)
    choose = _Chooser({}, "macs", limit=1.0, clock=clock, slack=0.1)
    assert choose._faster(base, at, 0.0) is faster  # (fastest: 2.25x the damage, beyond 1.1)
    assert choose.speed["ratio_before"] == 0.55 and choose.speed["ratio"] == 0.45
    # nothing faster within the bound: the plan stands
    choose = _Chooser({}, "macs", limit=1.0, clock=clock, slack=0.01)
    assert choose._faster(base, at, 0.0) is base


def test_speed_slack_buys_predicted_speed_with_a_bounded_share_of_damage(fake_latency):
    """Time by weights, ranks timed at their multiple of RANK_STEP: the plan for the same MACs
    target with speed_slack is predicted faster than the most accurate one, at most
    (1 + slack) times its damage, and meta says what it traded; with 0 nothing is traded."""
    fake_latency(by_weights)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(40, 56, 3, padding=1)).eval()
    x, table = torch.rand(2, 24, 8, 8), LatencyTable()
    kw = {"method": "tucker", "target": "macs=2x", "min_params": 100, "latency_table": table}
    base = rc.plan(model, x, speed_slack=0, **kw)
    assert "speed" not in base.meta["latency"]
    fast = rc.plan(model, x, speed_slack=0.5, **kw)
    speed = fast.meta["latency"]["speed"]
    assert speed["damage_before"] == pytest.approx(base.meta["predicted"]["error_sq_sum"])
    assert speed["damage_before"] <= speed["damage"] <= 1.5 * speed["damage_before"] + 1e-12
    assert speed["ratio"] < speed["ratio_before"]
    assert fast.meta["latency"]["predicted_ratio"]["2"] == pytest.approx(speed["ratio"])
    assert fast.meta["predicted"]["macs_ratio"] >= 2.0
    with pytest.raises(ValueError, match="speed_slack"):
        rc.plan(model, x, speed_slack=-0.1, **kw)


def test_a_slow_primitive_is_timed_by_few_runs_and_a_fast_one_by_many(monkeypatch):
    """A kernel whose first 3 runs say it takes tens of ms keeps their median (the table of a
    large model at batch 32 is otherwise most of the planning time); one of microseconds gets
    about RUNS_MS of runs, at least ``repeats``."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    calls = []

    def fake(module, x, *, warmup=0, repeats=1, engine="eager"):
        calls.append(repeats)
        v = 40.0 if module.out_channels == 64 else 0.01
        return Latency(v, v, v, repeats, x.shape[0], 1, "cpu")

    monkeypatch.setattr(latency, "measure_latency", fake)
    table = LatencyTable(repeats=9)
    assert table.layer_ms(nn.Conv2d(64, 64, 3), (8, 8), None, 2) == 40.0
    assert calls == [3]
    calls.clear()
    assert table.layer_ms(nn.Conv2d(8, 8, 3), (8, 8), None, 2) == 0.01
    assert calls[0] == 3 and calls[1] == min(200, int(latency.RUNS_MS / 0.01)) >= 9


def test_ranks_are_timed_at_steps_of_8_then_at_most_an_eighth_of_the_rank():
    from rankcut.select.latency import _rounded

    assert [_rounded(r) for r in (1, 8, 9, 64, 65, 128, 129, 256, 257, 1000)] == \
        [8, 8, 16, 64, 72, 128, 144, 256, 288, 1024]
    for r in range(1, 2000):
        t = _rounded(r)
        assert r <= t <= max(r + RANK_STEP - 1, r * 1.125) and t % RANK_STEP == 0
    assert _rounded([9, 300]) == [16, 320]
    # never past the layer's full rank: a 3-channel input's Tucker rank is timed at 3, a
    # 10-output Linear's SVD rank 9 at 10; CP's at most at its break-even rank in its form
    # (from_dense clamps to it): 16 channels 3x3, 2304 / 38 -> 60 (CP-4); 16 -> 24 channels,
    # 3456 / 46 -> 75 (CP-4), 3456 / 49 -> 70 (CP-3)
    from rankcut.select.latency import _full_ranks

    stem, head = nn.Conv2d(3, 16, 3), nn.Linear(64, 10)
    assert _rounded([16, 3], _full_ranks(stem, {"layer": "TuckerConv2d"})) == [16, 3]
    assert _rounded(9, _full_ranks(head, {"layer": "LowRankLinear"})) == 10
    assert _rounded(37, _full_ranks(nn.Conv2d(64, 64, 3), {"layer": "CPConv2d"})) == 40
    conv = nn.Conv2d(16, 16, 3)
    assert _rounded(58, _full_ranks(conv, {"layer": "CPConv2d", "form": "cp4"})) == 60
    wider = nn.Conv2d(16, 24, 3)
    assert _rounded(66, _full_ranks(wider, {"layer": "CPConv2d", "form": "cp3"})) == 70
    assert _rounded(66, _full_ranks(wider, {"layer": "CPConv2d", "form": "cp4"})) == 72
    assert _rounded(58, _full_ranks(conv, {"layer": "CPConv2d", "form": "cp4"})) == \
        rc.layers.cp_break_even(rc.layers.ConvGeometry.of(conv), "cp4")


def test_onnxruntime_engine_times_the_exported_model():
    pytest.importorskip("onnxruntime")
    big, tiny = nn.Conv2d(64, 64, 5, padding=2), nn.Conv2d(64, 1, 1)
    x = torch.randn(2, 64, 32, 32)
    lat = measure_latency(big, x, warmup=1, repeats=5, engine="onnxruntime")
    assert lat.device == "cpu (onnxruntime)" and lat.repeats == 5 and lat.median_ms > 0
    a, b = compare_latency(big, tiny, x, warmup=1, repeats=5, engine="onnxruntime")
    assert a.median_ms > 3 * b.median_ms
    with pytest.raises(ValueError, match="engine: expected one of eager, onnxruntime"):
        measure_latency(big, x, engine="tensorrt")
    rows = rc.profile.speedups(big, tiny, x[:1], batches=[2], repeats=3, engine="onnxruntime")
    assert [(r["form"], r["engine"]) for r in rows] == [("fused", "onnxruntime")]
    assert rows[0]["speedup"] == rows[0]["dense_ms"] / rows[0]["compressed_ms"] > 1


def test_an_onnxruntime_table_plans_for_onnxruntime_and_says_so(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = convnet(), torch.rand(2, 16, 16, 16)
    table = LatencyTable(engine="onnxruntime", repeats=3)
    plan = rc.plan(model, x, target="macs=2x", min_params=100, latency_table=table,
                   options={"cp": {"max_iter": 5}}, latency_margin=1.0)
    assert plan.active and table.measured > 0
    assert table.setting["engine"] == "onnxruntime" and table.entries
    saved = LatencyTable.load(table.save(tmp_path / "ort.json"))
    assert saved.engine == "onnxruntime" and saved.entries == table.entries
    with pytest.raises(ValueError, match="'onnxruntime' times float32 models on the CPU"):
        LatencyTable("cuda", engine="onnxruntime")
    with pytest.raises(ValueError, match="engine: expected one of"):
        LatencyTable(engine="ort")


def test_a_refusal_names_the_page_faults_glibc_costs_the_planned_model(fake_latency,
                                                                      monkeypatch, tmp_path):
    """A plan refused as slower whose whole-model timing took far more page faults a pass than
    the dense model's (glibc's malloc handing freed memory back to the OS: a factorized model
    has more intermediate tensors) says so and names what removes them; not under another
    allocator, nor with the counts alike. The counts go into the plan's checks."""
    from rankcut import profile

    def convs(m):
        return sum(isinstance(c, nn.Conv2d) for c in m.modules())

    model, x = convnet(), torch.rand(1, 16, 16, 16)
    fake_latency(lambda m: 9.0 * convs(m), faults=lambda m: 3000.0 * convs(m))
    monkeypatch.setattr(profile, "allocator", lambda: "glibc")
    said = (r"allow_slower=True.*Timed whole, the compressed model took [0-9,]+ page faults a "
            r"pass against [0-9,]+ for the original.*keep_freed_memory")
    with pytest.raises(SlowerThanDense, match=said):
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100,
                latency_table=LatencyTable.at(tmp_path / "t.json"))
    # planned again from the table's file (no timing taken): still said
    fake_latency(lambda m: pytest.fail("timed again"))
    with pytest.raises(SlowerThanDense, match=said):
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100,
                latency_table=LatencyTable.at(tmp_path / "t.json"))
    fake_latency(lambda m: 9.0 * convs(m), faults=lambda m: 3000.0 * convs(m))
    monkeypatch.setattr(profile, "allocator", lambda: "jemalloc")
    with pytest.raises(SlowerThanDense) as refused:
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100,
                latency_table=LatencyTable())
    assert "page faults" not in str(refused.value)
    monkeypatch.setattr(profile, "allocator", lambda: "glibc")
    fake_latency(lambda m: 9.0 * convs(m), faults=lambda m: 3000.0)  # both alike
    with pytest.raises(SlowerThanDense) as refused:
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100,
                latency_table=LatencyTable())
    assert "page faults" not in str(refused.value)
    # a plan that passes keeps the counts with its check
    fake_latency(lambda m: 9.0 / max(convs(m), 1), faults=lambda m: 10.0 * convs(m))
    plan = rc.plan(model, x, method="svd", target="macs=2x", min_params=100,
                   latency_table=LatencyTable())
    check = plan.meta["latency"]["checks"][-1]
    assert check["page_faults"] == [10.0 * convs(model), 10.0 * convs(rc.apply(model, plan))]


def test_compare_plan_keeps_the_page_faults_of_its_reading_with_its_times(monkeypatch,
                                                                          tmp_path):
    """The (dense, planned) page faults a pass of the reading compare_plan kept, saved with the
    times they explain (a table read back from its file has both, and merges them with its
    file's), for eager CPU tables only; damaged counts in a file are refused by name."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    def fake_pair(first_model, second_model, example_inputs, **kw):
        return (Latency(10.0, 10.0, 10.0, 1, 1, 1, "cpu", 120.0),
                Latency(8.0, 8.0, 8.0, 1, 1, 1, "cpu", 4500.0))

    monkeypatch.setattr(latency, "compare_latency", fake_pair)
    model, x = convnet(), torch.rand(1, 16, 8, 8)
    plan = rc.plan(model, x, method="svd", rank=4, allow_slower=True, min_params=100)
    other = rc.plan(model, x, method="svd", rank=2, allow_slower=True, min_params=100)
    table = LatencyTable()
    assert table.plan_page_faults(model, plan, x, 2) is None  # not timed yet
    assert table.compare_plan(model, plan, x, 2) == (10.0, 8.0)
    assert table.plan_page_faults(model, plan, x, 2) == (120.0, 4500.0)
    assert table.plan_page_faults(model, plan, x, 1) is None  # another batch
    assert table.plan_page_faults(model, other, x, 2) is None  # another plan
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.compare_plan(model, plan, x, 2) == (10.0, 8.0)
    assert again.plan_page_faults(model, plan, x, 2) == (120.0, 4500.0)
    # written back next to another process's counts: both kept
    other_table = LatencyTable.at(tmp_path / "t.json")
    other_table.compare_plan(model, other, x, 2)
    assert other_table.write_back() is not None
    both = LatencyTable.load(tmp_path / "t.json")
    assert both.plan_page_faults(model, plan, x, 2) == (120.0, 4500.0)
    assert both.plan_page_faults(model, other, x, 2) == (120.0, 4500.0)
    # another engine times another process's memory: no counts kept
    ort = LatencyTable(engine="onnxruntime")
    assert ort.compare_plan(model, plan, x, 2) == (10.0, 8.0)
    assert ort.plan_page_faults(model, plan, x, 2) is None
    data = json.loads((tmp_path / "t.json").read_text())
    key = next(iter(data["page_faults"]))
    for damaged in ({"2": [1.0]}, {"2": [1.0, -3]}, {"2": "many"}, [1, 2]):
        data["page_faults"][key] = damaged
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="a damaged page-fault count"):
            LatencyTable.load(tmp_path / "bad.json")
    data["page_faults"] = "none"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="a damaged page-fault count 'page_faults'"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.parametrize("first, rounds", [(0.95, 3), (1.08, 3), (0.5, 1), (1.3, 1)])
def test_a_whole_model_reading_near_its_goal_is_confirmed_by_more_rounds(monkeypatch, first,
                                                                          rounds):
    """compare_plan takes three readings when the first lands within CONFIRM_BAND of the goal
    and keeps the median ratio's; far from it, one reading decides."""
    import rankcut.select.latency as latency
    from rankcut.profile import Latency

    ratios = iter([first, 0.7, 1.2, 9.0])  # the rounds after the first: 0.7, then 1.2
    calls = []

    def fake_pair(first_model, second_model, example_inputs, **kw):
        calls.append(kw)
        r = next(ratios)
        return (Latency(10.0, 10.0, 10.0, 1, 1, 1, "cpu", 5.0),
                Latency(10.0 * r, 10.0 * r, 10.0 * r, 1, 1, 1, "cpu", 100.0 * r))

    monkeypatch.setattr(latency, "compare_latency", fake_pair)
    model, x = convnet(), torch.rand(1, 16, 8, 8)
    plan = rc.plan(model, x, method="svd", rank=4, allow_slower=True, min_params=100)
    table = LatencyTable()
    dense, planned = table.compare_plan(model, plan, x, 2, goal=1.0)
    assert len(calls) == rounds and table.measured == rounds
    expected = sorted([first, 0.7, 1.2][:rounds])[rounds // 2]
    assert (dense, planned) == pytest.approx((10.0, 10.0 * expected))
    # the page faults kept are the kept reading's (the median ratio's), not the first's or last's
    assert table.plan_page_faults(model, plan, x, 2) == pytest.approx((5.0, 100.0 * expected))
    # kept in the table: the same check is not timed again
    assert table.compare_plan(model, plan, x, 2, goal=1.0) == (dense, planned)
    assert len(calls) == rounds
    # without a goal, one reading
    other = LatencyTable()
    ratios = iter([0.99, 0.7, 1.2])
    calls.clear()
    other.compare_plan(model, plan, x, 2)
    assert len(calls) == 1


def spectral_normed(model: nn.Module) -> nn.Module:
    """``model`` with a spectral norm on each of its convolutions (in place)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            spectral_norm(module)
    return model


def test_a_parametrized_layer_is_timed_and_planned_as_its_plain_twin(fake_latency):
    """A spectral-normed Conv2d holds its parametrization as a child module: the latency table
    took it for a factorized layer and asked it for ``in_features`` (AttributeError out of
    rc.plan with the guard on)."""
    fake_latency(by_weights)
    plain, x = convnet(), torch.rand(2, 16, 16, 16)
    normed = spectral_normed(copy.deepcopy(plain))
    opts = {"options": {"cp": {"max_iter": 10}}, "min_params": 100}
    ours, theirs = (rc.plan(m, x, target="macs=3x", **opts) for m in (plain, normed))
    assert {n: (lp.method, lp.ranks) for n, lp in theirs.active.items()} == {
        n: (lp.method, lp.ranks) for n, lp in ours.active.items()}
    assert theirs.meta["latency"]["predicted_ratio"] == pytest.approx(
        ours.meta["latency"]["predicted_ratio"])


def test_planning_and_applying_leave_a_spectral_normed_models_state_as_it_was(fake_latency):
    """Reading a spectral-normed weight in train mode runs a power iteration: rc.plan and
    rc.apply moved the model's u and v vectors (each read of the weight, several per layer)."""
    fake_latency(by_weights)
    model, x = spectral_normed(convnet()).train(), torch.rand(2, 16, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = rc.plan(model, x, method="svd", target="params=2x", min_params=100)
    copy_ = rc.apply(model, plan)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training and copy_.training
    assert [lp.method for lp in plan.active.values()] == ["svd"] * len(plan.active)
