"""Latency: measurement, the planner's guard against factorizations slower than dense, and
latency targets."""

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.curves import Candidate
from rankcut.profile import compare_latency, measure_latency
from rankcut.select import parse_target
from rankcut.select.latency import LatencyGuard, drop_slower


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
    assert 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms
    assert lat.to_dict()["median_ms"] == lat.median_ms
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.randn(1, 8, 8, 8), repeats=0)


def test_compare_latency_orders_a_large_and_a_tiny_layer():
    big, tiny = nn.Conv2d(64, 64, 5, padding=2), nn.Conv2d(64, 1, 1)
    a, b = compare_latency(big, tiny, torch.randn(2, 64, 32, 32), warmup=1, repeats=5)
    assert a.median_ms > 3 * b.median_ms


def test_drop_slower_removes_the_candidate_and_larger_ones_of_its_form():
    def c(method, ranks, form=None):
        return Candidate(method, ranks, form, 0, 0, 0.0)
    cands = [c("cp", (4,), "cp3"), c("cp", (8,), "cp3"), c("cp", (16,), "cp3"),
             c("cp", (8,), "cp4"), c("tucker", (8, 8)), c("tucker", (4, 16)),
             c("tucker", (16, 16))]
    kept = drop_slower(cands, c("cp", (8,), "cp3"))
    assert kept == [cands[0], *cands[3:]]
    assert drop_slower(cands, c("tucker", (8, 8))) == [*cands[:4], cands[5]]


def test_guard_vetoes_and_the_budget_moves_elsewhere(monkeypatch):
    """With CP and spatial SVD 'measured' slower (a stub, so the test does not depend on the
    machine), the plan uses neither, still meets the budget, and records why."""
    def fake(self, name, module, shape, cand):
        slow = cand.method in ("cp", "spatial_svd")
        return {"latency_ratio": 2.0 if slow else 0.5, "latency_ms": 1.0, "dense_latency_ms": 1.0}

    monkeypatch.setattr(LatencyGuard, "measure", fake)
    model, x = convnet(), torch.rand(1, 16, 16, 16)
    free = rc.plan(model, x, target="macs=3x", allow_slower=True, min_params=100,
                   options={"cp": {"max_iter": 10}})
    assert any(lp.method in ("cp", "spatial_svd") for lp in free.active.values()), str(free)
    guarded = rc.plan(model, x, target="macs=3x", min_params=100,
                      options={"cp": {"max_iter": 10}})
    assert guarded.active and all(lp.method in ("svd", "tucker")
                                  for lp in guarded.active.values()), str(guarded)
    assert all(lp.predicted["latency_ratio"] == 0.5
               for lp in guarded.active.values())
    assert guarded.meta["latency_guard"]["vetoed"]
    assert guarded.meta["predicted"]["macs_ratio"] >= 3.0


def test_guard_keeps_a_layer_dense_when_every_form_is_slower(monkeypatch):
    monkeypatch.setattr(LatencyGuard, "measure", lambda self, *a: {
        "latency_ratio": 3.0, "latency_ms": 3.0, "dense_latency_ms": 1.0})
    model, x = convnet(), torch.rand(1, 16, 16, 16)
    plan = rc.plan(model, x, method="svd", rank=4, min_params=100)
    assert not plan.active
    assert all("measured slower than dense" in lp.reason for lp in plan.layers.values())
    with pytest.raises(ValueError, match="vetoed as slower than dense"):
        rc.plan(model, x, method="svd", target="macs=2x", min_params=100)


def test_guarded_plan_has_no_layer_measured_slower_than_dense():
    """Real timings: every factorized layer of a guarded plan, timed again against its dense
    layer, is not slower beyond noise (the guard's own margin is 5%; a re-measurement on a busy
    machine gets 30%)."""
    model, x = convnet(), torch.rand(2, 16, 32, 32)
    plan = rc.plan(model, x, target="macs=2x", min_params=100, options={"cp": {"max_iter": 5}})
    small = rc.surgery.structure(model, plan)
    for name, lp in plan.active.items():
        assert lp.predicted["latency_ratio"] <= 1.05
        inp = torch.randn(1, *x.shape[1:]) if name == "0" else None
        if inp is None:  # the input of a later conv: run the dense prefix
            idx = int(name)
            inp = model[:idx](x[:1])
        dense, fact = compare_latency(model.get_submodule(name), small.get_submodule(name),
                                      inp, repeats=30)
        assert fact.median_ms <= 1.3 * dense.median_ms, (name, str(lp), dense, fact)


def test_latency_target_parses_and_is_met():
    assert parse_target("latency=2x") == ("latency", 0.5)
    assert parse_target("latency=0.8") == ("latency", 0.8)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.rand(4, 64, 32, 32)
    plan = rc.plan(model, x, method="svd", target="latency=1.5x", min_params=100)
    timing = plan.meta["latency"]
    assert timing["ratio"] <= timing["goal_ratio"] == pytest.approx(1 / 1.5)
    assert timing["batch"] == 4 and timing["threads"] == torch.get_num_threads()
    dense, small = compare_latency(model, rc.surgery.structure(model, plan), x, repeats=20)
    assert small.median_ms <= (1 / 1.5 + 0.15) * dense.median_ms
