import contextlib
import json

import pytest
import torch
import torchvision
from torch import nn

import rankcut as rc

# These tests check the allocation; timing is tested in test_latency.py (allow_slower=True keeps
# them independent of the machine's speed).
from rankcut.decompose._tensor import cp_to_tensor, multi_mode_product
from rankcut.models import PRETRAINED, create
from rankcut.profile import count_macs, count_params
from rankcut.select import parse_target


def achieved(model, small, x, kind):
    if kind == "params":
        return count_params(small) / count_params(model)
    return count_macs(small, x) / count_macs(model, x)


@pytest.fixture(scope="module")
def resnet20(shared_data):
    weights = shared_data / PRETRAINED["resnet20_cifar"]
    if not weights.is_file():
        pytest.skip(f"pretrained weights not found at {weights}")
    return create("resnet20_cifar", weights=weights).eval()


@pytest.mark.parametrize("target", ["macs=2x", "params=3x", "macs=0.4"])
@pytest.mark.parametrize("method", ["tucker", "svd"])
def test_budget_is_met_within_one_percent_on_resnet20(resnet20, target, method):
    x = torch.rand(1, 3, 32, 32)
    plan = rc.plan(resnet20, x, method=method, target=target, allow_slower=True)
    small = rc.apply(resnet20, plan)
    kind, fraction = parse_target(target)
    kept = achieved(resnet20, small, x, kind)
    assert fraction * 0.99 <= kept <= fraction
    predicted = plan.meta["predicted"][kind]
    assert predicted[0] / predicted[1] == pytest.approx(1 / kept)  # the plan predicts it exactly


# (the MACs target: about 30 s on a slow 2-core machine; in make test-all)
@pytest.mark.parametrize("target", [pytest.param("macs=3x", marks=pytest.mark.slow), "params=4x"])
def test_budget_is_met_within_one_percent_on_torchvision_resnet18(target):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(1, 3, 64, 64)
    plan = rc.plan(model, x, method="tucker", target=target, allow_slower=True)
    kind, fraction = parse_target(target)
    kept = achieved(model, rc.apply(model, plan), x, kind)
    assert fraction * 0.99 <= kept <= fraction


def one_layer(kernel):
    model = nn.Sequential(nn.Conv2d(kernel.shape[1], kernel.shape[0], kernel.shape[2:]))
    with torch.no_grad():
        model[0].weight.copy_(kernel)
    return model.eval()


def test_auto_picks_cp_where_cp_is_exact_and_tucker_where_tucker_is():
    """Budgets just above the exact form's cost, where no other form is exact.

    A rank-4 CP-4 kernel (48, 40, 3, 3) costs 424 params as CP-4 (436 as CP-3, exact too);
    exact Tucker-2 (4, 4) needs 544 and exact spatial SVD (rank 4) 1104, so at 2.48% of the
    dense 17,328 (430 params) only CP-4 is exact (at 2.6% CP-3 was as exact, and which of the
    two had the smaller error at rounding level depended on the machine).
    A Tucker (6, 6) kernel costs 900 as Tucker-2; exact CP or SVD forms cost thousands.
    """
    g = torch.Generator().manual_seed(0)
    cp_kernel = cp_to_tensor(torch.ones(4), [torch.randn(s, 4, generator=g)
                                             for s in (48, 40, 3, 3)])
    core = torch.randn(6, 6, 3, 3, generator=g)
    tucker_kernel = multi_mode_product(core, {0: torch.randn(48, 6, generator=g),
                                              1: torch.randn(40, 6, generator=g)})
    x = torch.rand(1, 40, 16, 16)
    options = {"cp": {"max_iter": 500, "tol": 1e-10}}
    for kernel, target, expected in [(cp_kernel, "params=0.0248", ("cp", "cp4")),
                                     (tucker_kernel, "params=0.055", ("tucker", None))]:
        model = one_layer(kernel)
        plan = rc.plan(model, x, target=target, options=options, allow_slower=True)
        chosen = plan["0"]
        assert (chosen.method, chosen.form) == expected, str(plan)
        assert chosen.predicted["error"] < 1e-2
        small = rc.apply(model, plan)
        assert torch.allclose(small(x), model(x), atol=1e-2 * float(model(x).abs().max()))


def test_rank_rule_alone_sets_every_eligible_layer(resnet20):
    x = torch.rand(1, 3, 32, 32)
    plan = rc.plan(resnet20, x, method="svd", rank="params=0.5", allow_slower=True)
    assert plan["conv1"].skip and "input stem" in plan["conv1"].reason
    for name, lp in plan.active.items():
        assert lp.method == "svd"
        assert lp.predicted["params"] <= 0.5 * resnet20.get_submodule(name).weight.numel()
    fixed = rc.plan(resnet20, x, method="tucker", rank=8, rank_multiple=8, allow_slower=True)
    assert {lp.ranks for lp in fixed.active.values()} == {(8, 8)}


def test_auto_with_a_spectral_rule_leaves_cp_out():
    model = one_layer(torch.randn(24, 16, 3, 3))
    plan = rc.plan(model, torch.rand(1, 16, 8, 8), rank="energy=0.9", allow_slower=True)
    assert plan["0"].method in ("svd", "spatial_svd", "tucker")


def test_rank_multiple_rounds_ranks(resnet20):
    plan = rc.plan(resnet20, torch.rand(1, 3, 32, 32), method="tucker", target="params=2x",
                   rank_multiple=4, allow_slower=True)
    assert all(r % 4 == 0 for lp in plan.active.values() for r in lp.ranks)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="macs=0.5x"), "target: expected 'params=Nx', 'macs=Nx'"),
    (dict(target="latency=0.5x"), "target: expected"),
    (dict(target="flops=2x"), "target: expected"),
    (dict(target="macs=2x", method="qr"), "method: expected one of auto, svd"),
    (dict(), "rank, target: give a rank rule, a target, or both"),
    (dict(target="macs=2x", rank_multiple=0), "rank_multiple: expected an int >= 1"),
    (dict(target="params=0.001", method="svd"), "target: cannot be met"),
])
def test_bad_planner_arguments(kwargs, match):
    model = one_layer(torch.randn(24, 16, 3, 3))
    with pytest.raises(ValueError, match=match):
        rc.plan(model, torch.rand(1, 16, 8, 8), **kwargs)


def test_planning_with_calibration_data_measures_output_error():
    """With calib_data, SVD layers become data-aware and every predicted error is the output
    error on the calibration statistics (checked against the applied layer's real output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.Flatten(), nn.Linear(32 * 6 * 6, 64)).eval()
    mix = torch.randn(12, 12) * torch.exp(-torch.arange(12.0) / 2)
    batches = [torch.einsum("ij,njhw->nihw", mix, torch.randn(16, 12, 8, 8)) for _ in range(2)]
    x = batches[0][:1]
    plan = rc.plan(model, x, method="svd", target="macs=0.6", calib_data=batches,
                   min_params=100, allow_slower=True)
    assert plan.active and all(lp.options.get("data_aware") for lp in plan.active.values())
    assert "0" in plan.active, str(plan)  # the first conv carries the most MACs
    small = rc.apply(model, plan, calib_data=batches)
    first = plan["0"]
    data = torch.cat(batches)
    with torch.no_grad():
        dense_out, new_out = model[0](data), small[0](data)
        bias = model[0].bias[None, :, None, None]
        measured = float((new_out - dense_out).norm() / (dense_out - bias).norm())
        plain = rc.apply(model, rc.Plan({"0": rc.LayerPlan("svd", first.ranks)}))[0](data)
    assert first.predicted["error"] == pytest.approx(measured, rel=1e-3)
    assert measured < float((plain - dense_out).norm() / (dense_out - bias).norm())
    auto = rc.plan(model, x, target="params=0.5", calib_data=batches, min_params=100,
                   options={"cp": {"max_iter": 10}}, allow_slower=True)
    assert auto.active


def test_a_loss_aware_plan_forms_each_layers_whitened_gram_once(monkeypatch):
    """The network-damage probes factorize layers whose whitened Gram W Σ Wᵀ the scoring
    formed already (minutes for a VGG's 4096 x 25,088 layer): they reuse it."""
    import importlib

    svd_module = importlib.import_module("rankcut.decompose.svd")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.Flatten(), nn.Linear(32 * 6 * 6, 64)).eval()
    batches = [torch.randn(16, 12, 8, 8) for _ in range(2)]
    formed, gram = [], svd_module.whitened_gram

    def counted(W, cov, ridge=1e-6):
        formed.append(tuple(W.shape))
        return gram(W, cov, ridge)

    monkeypatch.setattr(svd_module, "whitened_gram", counted)
    plan = rc.plan(model, batches[0][:1], method="svd", target="params=0.5",
                   calib_data=batches, min_params=100, allow_slower=True)
    assert len(plan.meta["damage_weights"]) == 3  # every layer probed
    assert sorted(formed) == sorted({(32, 108), (32, 288), (64, 1152)})


def _cached_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _cache_setup():
    """(the planner module, _cached_net(), calibration batches, example inputs)."""
    import importlib

    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))]
    return (importlib.import_module("rankcut.select.planner"), _cached_net(), calib,
            calib[0][0][:1])


def _refuse(*args, **kwargs):
    raise AssertionError("scored again despite the cache")


@contextlib.contextmanager
def _moments_doubled(monkeypatch, planner):
    """The layers' inputs changed (a forward edited without its weights or printed structure
    showing it): every moment measured is twice what it was."""
    real = planner.input_second_moments
    with monkeypatch.context() as m:
        m.setattr(planner, "input_second_moments",
                  lambda *a, **k: {n: [2 * c for c in cs] for n, cs in real(*a, **k).items()})
        yield


def test_the_cache_key_reads_the_calibration_data_as_the_moments_do():
    """data_fingerprint cuts a tensor or Dataset into the moments' batches (64 samples), so two
    calibration sets that differ inside the first batch are two keys with max_batches=1."""
    from rankcut.select.cache import data_fingerprint

    x = torch.randn(128, 3, 8, 8)
    other = x.clone()
    other[5] += 1  # the first batch of 64, but not the first sample
    assert data_fingerprint(x, 1) != data_fingerprint(other, 1)
    assert data_fingerprint(x, 1) == data_fingerprint(x.clone(), 1)
    assert data_fingerprint(x, 1) != data_fingerprint(x, 2)  # the second batch is read too
    labels = torch.zeros(128, dtype=torch.long)  # (inputs, targets): the inputs are the key
    assert data_fingerprint((x, labels), 1) == data_fingerprint(x, 1)
    assert data_fingerprint(None, 1) is None


def test_a_candidate_cache_plans_later_targets_without_scoring_again(monkeypatch):
    """A sweep of ratios measures moments and candidates once; each plan equals the plan made
    without the cache; a changed weight or other calibration data is a miss, never stale."""
    planner, model, calib, x = _cache_setup()
    opts = dict(method="auto", calib_data=calib, allow_slower=True, min_params=100,
                options={"cp": {"max_iter": 5}})
    cache = rc.select.CandidateCache()
    first = rc.plan(model, x, target="params=2x", cache=cache, **opts)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    cached = {}
    with monkeypatch.context() as m:
        m.setattr(planner, "_layer_candidates", _refuse)
        m.setattr(planner, "input_second_moments", _refuse)
        for target in ["params=3x", "params=2x"]:
            cached[target] = rc.plan(model, x, target=target, cache=cache, **opts)
    assert cache.hits == 2
    assert cached["params=2x"].to_dict()["layers"] == first.to_dict()["layers"]
    assert cached["params=3x"].to_dict()["layers"] == \
        rc.plan(model, x, target="params=3x", **opts).to_dict()["layers"]
    with torch.no_grad():
        model[3].weight.mul_(1.5)
    rc.plan(model, x, target="params=2x", cache=cache, **opts)
    other = [(calib[0][0] * 2, calib[0][1])]
    rc.plan(model, x, target="params=2x", cache=cache, **{**opts, "calib_data": other})
    assert cache.misses == 3 and len(cache) == 3
    with pytest.raises(ValueError, match="cache: expected"):
        rc.plan(model, x, target="params=2x", cache={}, **opts)


def test_a_generator_option_is_keyed_by_its_state_and_other_objects_are_not_cached():
    """A torch.Generator among the solver options is told apart by its state (its repr is an
    address a new generator may reuse: another seed's candidates were served); an option that
    is neither JSON nor a generator turns the cache off for that plan."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    x = torch.rand(1, 8, 10, 10)
    cache = rc.select.CandidateCache()

    def plan(seed, cache=None):
        return rc.plan(model, x, method="cp", target="params=2x", allow_slower=True,
                       min_params=0, cache=cache, options={"cp": {
                           "init": "random", "max_iter": 3,
                           "seed": torch.Generator().manual_seed(seed)}})

    def scored(p):
        return {n: (lp.ranks, lp.form, lp.predicted["error"]) for n, lp in p.active.items()}

    seen = [scored(plan(seed, cache)) for seed in (1, 2, 1)]
    assert seen == [scored(plan(seed)) for seed in (1, 2, 1)] and seen[0] != seen[1]
    assert (cache.misses, cache.hits) == (2, 1)
    from rankcut.select.planner import _options_key

    assert _options_key({"cp": {"max_iter": 3}}) == ('{"cp": {"max_iter": 3}}', True)
    assert _options_key({"cp": {"seed": object()}}) == (None, False)  # not cached at all


def test_a_cache_with_a_moment_limit_keeps_the_candidates_and_measures_the_moments_again(
        monkeypatch):
    """max_moment_bytes: an entry whose moments are larger is kept without them (as a file's
    entry is): the next plan measures them again, scores nothing, and gives the same plan; if
    the layers' inputs changed, it is a miss."""
    planner, model, calib, x = _cache_setup()
    opts = dict(method="svd", calib_data=calib, allow_slower=True, min_params=100,
                target="params=2x")
    cache = rc.select.CandidateCache(max_moment_bytes=0)
    first = rc.plan(model, x, cache=cache, **opts)
    (entry,) = cache._entries.values()
    assert entry[0] is None and entry[1]
    with monkeypatch.context() as m:
        m.setattr(planner, "_layer_candidates", _refuse)
        again = rc.plan(model, x, cache=cache, **opts)
    assert (cache.hits, cache.misses) == (1, 1)
    assert again.to_dict()["layers"] == first.to_dict()["layers"]
    with _moments_doubled(monkeypatch, planner):
        rc.plan(model, x, cache=cache, **opts)
    assert (cache.hits, cache.misses, cache.disk_hits) == (1, 2, 0)
    kept = rc.select.CandidateCache(max_moment_bytes=10**12)
    rc.plan(model, x, cache=kept, **opts)
    assert next(iter(kept._entries.values()))[0]  # under the limit: the moments are kept
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_moment_bytes"):
            rc.select.CandidateCache(max_moment_bytes=bad)


def test_candidates_kept_on_disk_serve_a_later_process(monkeypatch, tmp_path):
    """CandidateCache.cached() writes the candidates to this machine's cache folder: a new cache
    (a later process) plans from the file without scoring (the moments are measured again) and
    gives the same plan; another thread count or other code is another file; a damaged file is
    a miss; a folder that cannot be written warns and planning goes on."""
    import importlib

    planner, model, calib, x = _cache_setup()
    cache_module = importlib.import_module("rankcut.select.cache")
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "machine"))
    opts = dict(method="auto", calib_data=calib, allow_slower=True, min_params=100,
                target="params=2x", options={"cp": {"max_iter": 5}})
    first = rc.plan(model, x, cache=rc.select.CandidateCache.cached(), **opts)
    files = list((tmp_path / "machine").glob("candidates-*.json"))
    assert len(files) == 1
    later = rc.select.CandidateCache.cached()
    with monkeypatch.context() as m:
        m.setattr(planner, "_layer_candidates", _refuse)
        again = rc.plan(model, x, cache=later, **opts)
    assert (later.hits, later.disk_hits) == (1, 1)
    assert again.to_dict()["layers"] == first.to_dict()["layers"]
    # a killed writer's temporary file is removed by the next write, a live writer's is not
    import os

    stale, live = (tmp_path / "machine" / f".candidates-{n}.json.0.tmp" for n in ("a", "b"))
    for f in (stale, live):
        f.write_text("{")
    os.utime(stale, (1, 1))
    # the moments measured again differ from the file's: a miss
    with _moments_doubled(monkeypatch, planner):
        changed = rc.select.CandidateCache.cached()
        rc.plan(model, x, cache=changed, **opts)
    assert (changed.hits, changed.disk_hits, changed.misses) == (0, 0, 1)
    assert len(list((tmp_path / "machine").glob("candidates-*.json"))) == 1  # written over
    assert not stale.exists() and live.exists()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = rc.select.CandidateCache.cached()
        assert other.get(next(iter(later._entries))) is None  # another thread count: a miss
    finally:
        torch.set_num_threads(threads)
    with monkeypatch.context() as m:
        m.setattr(cache_module, "code_digest", lambda: "other code")
        assert rc.select.CandidateCache.cached().get(next(iter(later._entries))) is None
    files[0].write_text("{damaged")
    assert rc.select.CandidateCache.cached().get(next(iter(later._entries))) is None
    # a damaged file, or one that lacks a layer's candidates, is a miss, and the plan that
    # missed writes it over: the next process reads it
    for damage in ("{damaged", "a layer missing"):
        if damage == "a layer missing":
            data = json.loads(files[0].read_text())
            data["layers"].popitem()
            files[0].write_text(json.dumps(data))
        else:
            files[0].write_text(damage)
        fixing = rc.select.CandidateCache.cached()
        assert rc.plan(model, x, cache=fixing, **opts).to_dict()["layers"] == \
            first.to_dict()["layers"]
        assert (fixing.disk_hits, fixing.misses) == (0, 1)
        reread = rc.select.CandidateCache.cached()
        rc.plan(model, x, cache=reread, **opts)
        assert reread.disk_hits == 1, damage

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "file" / "below"))
    unwritable = rc.select.CandidateCache.cached()
    with pytest.warns(UserWarning, match="candidate cache: could not write"):
        unwritable.put(("key",), ({}, later._entries[next(iter(later._entries))][1]))
    assert unwritable.get(("key",)) is not None  # still kept in memory
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "other"))
    memory_only = rc.select.CandidateCache.cached()  # options that are not JSON: not on disk
    memory_only.put(("key",), ({}, {}), disk=False)
    assert not (tmp_path / "other").exists() and memory_only.get(("key",)) is not None
    monkeypatch.setenv("RANKCUT_CACHE", "off")
    assert rc.select.CandidateCache.cached().folder is None


class _TwoScales(nn.Module):
    """A head shared by two resolutions (as FPN/RetinaNet heads are): it runs at 4x4 then at
    16x16, and a flag scales what the second conv sees."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 32, 3, padding=1)
        self.scale = 1.0

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x)) * self.scale))
        small = self.head(nn.functional.avg_pool2d(x, 4))
        return small.mean((2, 3)) + self.head(x).mean((2, 3))


def test_a_layer_reused_at_two_sizes_costs_each_calls_macs_and_the_target_holds():
    torch.manual_seed(0)
    model, x = _TwoScales().eval(), torch.randn(1, 3, 16, 16)
    plan = rc.plan(model, x, method="svd", target="macs=1.6x", allow_slower=True)
    assert "called 2 times" in plan.layers["head"].reason
    small = rc.apply(model, plan)
    dense_macs, small_macs = count_macs(model, x), count_macs(small, x)
    assert plan.meta["predicted"]["macs"] == [dense_macs, small_macs]  # priced as it runs
    assert dense_macs / small_macs >= 1.6


def test_a_cached_plan_is_not_reused_when_a_layers_inputs_changed():
    torch.manual_seed(0)
    model, x = _TwoScales().eval(), torch.randn(1, 3, 16, 16)
    calib = [torch.randn(8, 3, 16, 16)]
    cache = rc.select.CandidateCache(max_entries=4)
    kw = dict(method="svd", target="macs=1.6x", allow_slower=True, calib_data=calib,
              cache=cache)
    rc.plan(model, x, **kw)
    model.scale = 3.0  # the same weights; the body conv sees other inputs
    again = rc.plan(model, x, **kw)
    fresh = rc.plan(model, x, **{**kw, "cache": None})
    assert cache.hits == 0 and again == fresh


def test_sequential_fitting_refuses_a_layer_that_runs_twice():
    # its fit would see the first call only (rankcut.plan leaves such a layer dense)
    torch.manual_seed(0)
    model = _TwoScales().eval()
    calib = [torch.randn(8, 3, 16, 16)]
    plan = rc.Plan({"head": rc.LayerPlan("svd", (4,), options={"data_aware": True})})
    with pytest.raises(ValueError, match="layer 'head' runs 2 times"):
        rc.apply(model, plan, calib_data=calib)
    rc.apply(model, plan, calib_data=calib, sequential=False)  # each call's inputs, averaged


def test_loss_aware_probes_read_at_most_max_batches():
    # batches past max_batches would break the model (3 channels, not 5) if read
    torch.manual_seed(0)
    model, x = _TwoScales().eval(), torch.randn(1, 3, 16, 16)
    calib = [torch.randn(8, 3, 16, 16), torch.randn(8, 5, 16, 16), torch.randn(8, 5, 16, 16)]
    plan = rc.plan(model, x, method="svd", target="macs=1.6x", allow_slower=True,
                   calib_data=calib, max_batches=1, loss_aware=True)
    assert "damage_weights" in plan.meta


def test_with_data_spatial_svd_is_scored_in_the_output_norm_like_the_others():
    """Spatial SVD has no data-aware form: built from the weights, its candidates are still
    measured in the output norm on the calibration moments, the norm the other methods' are in
    (auto compared a weight-norm error with output-norm errors)."""
    from rankcut.calibrate import input_second_moments
    from rankcut.curves import output_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    calib = [torch.randn(16, 3, 8, 8) * torch.linspace(0.1, 3, 8).view(1, 1, 1, 8)]
    plan = rc.plan(model, x, method="spatial_svd", rank=6, calib_data=calib,
                   allow_slower=True, include=["2"])
    lp = plan.layers["2"]
    assert lp.method == "spatial_svd" and not lp.options.get("data_aware")
    small = rc.apply(model, plan)
    covs = input_second_moments(model, ["2"], calib)["2"]
    real = output_error(model[2], small[2].dense_weight(), covs)
    assert lp.predicted["error"] == pytest.approx(real, rel=1e-6)
    W = model[2].weight.detach().double()
    assert abs(lp.predicted["error"] - float((W - small[2].dense_weight().double()).norm()
                                              / W.norm())) > 1e-3


def test_a_solver_ridge_of_the_users_is_measured_on_the_inputs_own_moments():
    """With ridge= among the solver options the layer is fitted in the norm of Σ + ridge; its
    predicted error is still its output error on the inputs' Σ, as the built layer has it (the
    SVD spectrum and the solver's own error, both of Σ + the default ridge, were used)."""
    from rankcut.calibrate import input_second_moments
    from rankcut.curves import output_error

    torch.manual_seed(0)
    cases = {
        "svd": (nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval(),
                [torch.randn(64, 32) * torch.logspace(-2, 1, 32) for _ in range(2)]),
        "tucker": (nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1)).eval(),
                   [torch.randn(8, 16, 8, 8) * torch.logspace(-2, 1, 16)[None, :, None, None]
                    for _ in range(2)])}
    for method, (model, calib) in cases.items():
        plan = rc.plan(model, calib[0][:1], method=method, rank=4, calib_data=calib,
                       allow_slower=True, min_params=0, options={method: {"ridge": 1.0}})
        small = rc.apply(model, plan, calib_data=calib, sequential=False)
        covs = input_second_moments(model, list(plan.active), calib)
        for name, lp in plan.active.items():
            built = output_error(model.get_submodule(name),
                                 small.get_submodule(name).dense_weight().detach(), covs[name])
            assert lp.predicted["error"] == pytest.approx(built, abs=2e-3), (method, name)


def test_predicted_totals_are_of_the_layers_as_built_and_count_attention():
    """plan.meta's predicted params and MACs are what the applied model has: a CP rank past
    break-even and a Tucker rank past a mode's channels priced as the layers clamp them (the
    rule's pair (16, 16) on 8 input channels is (16, 8), smaller than dense, not skipped); an
    nn.MultiheadAttention's own projections counted, so a MACs target is met on the model; a
    rule with no eligible layer warns instead of returning an empty plan silently."""
    import warnings

    from rankcut.profile import count_macs

    def realised(model, x, **kw):
        plan = rc.plan(model, x, allow_slower=True, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = rc.apply(model, plan)
        predicted = plan.meta["predicted"]
        assert predicted["params"][1] == count_params(small)
        assert predicted["macs"] == [count_macs(model, x[:1]), count_macs(small, x[:1])]
        return plan

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a CP rank past break-even, kept where it saves MACs: built clamped (to 23), and
        # counted as built (realised checks the totals)
        realised(conv, torch.randn(1, 8, 4, 4), method="cp3", rank=28, min_params=0)
        hand = rc.Plan({"0": rc.LayerPlan("cp", (28,), form="cp3")})
        small = rc.apply(conv, hand)
    assert small[0].rank == 23
    wide = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    plan = realised(wide, torch.randn(2, 8, 8, 8), method="tucker", rank=16)
    assert plan["0"].ranks == (16, 8) and plan["2"].ranks == (16, 16)
    attn = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, batch_first=True,
                                      dropout=0.0).eval()
    plan = realised(attn, torch.randn(2, 16, 32), target="macs=2x", min_params=0)
    assert plan.meta["predicted"]["macs_ratio"] >= 2
    tiny = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with pytest.warns(UserWarning, match="nothing to factorize: every Conv2d/Linear layer is"):
        assert not rc.plan(tiny, torch.randn(1, 8, 6, 6), rank=4, allow_slower=True).active


def test_a_tucker_fraction_rule_gives_ranks_the_core_can_hold():
    """R_out <= 9·R_in for a 3x3 kernel: on a 4 -> 96 conv the proportional pair (15, 1) would be
    built as (9, 1), a third of the layer's parameters; the rule gives the largest pair that
    is built as asked and fits."""
    from rankcut.select.rules import layer_ranks

    for conv in (nn.Conv2d(4, 96, 3, padding=1), nn.Conv2d(96, 4, 3, padding=1)):
        r_out, r_in = layer_ranks(conv, "tucker", "params=0.5")
        assert r_out <= 9 * r_in and r_in <= 9 * r_out
        built = rc.apply(nn.Sequential(conv),
                         rc.Plan({"0": rc.LayerPlan("tucker", (r_out, r_in))}))
        params = count_params(built)
        assert built[0].built_ranks() == (r_out, r_in)  # as asked: no clamp
        assert params <= 0.5 * count_params(conv)
    assert params > 0.25 * count_params(conv)  # (96 -> 4: (1, 9); R_in tied to R_out's multiple)
    assert layer_ranks(nn.Conv2d(4, 96, 3), "tucker", "params=0.5") == (14, 2)  # 48% of it


def test_a_parametrized_layer_counts_its_computed_weight_and_keys_the_cache():
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    class Scale(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k  # a plain attribute: in no parameter or buffer

        def forward(self, w):
            return w * self.k

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                          weight_norm(nn.Conv2d(64, 64, 3, padding=1)), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.rand(1, 16, 8, 8)
    assert rc.target_layers(model)["2"] is None  # 36,928 parameters, not the 64 of its own
    parametrize.register_parametrization(model[4], "weight", Scale(torch.ones(64, 1, 1, 1)))
    cache = rc.select.CandidateCache()
    kw = dict(method="svd", target="params=2x", allow_slower=True, min_params=0)
    rc.plan(model, x, cache=cache, **kw)
    model[4].parametrizations.weight[0].k = torch.linspace(0.01, 10, 64).reshape(64, 1, 1, 1)
    again, fresh = rc.plan(model, x, cache=cache, **kw), rc.plan(model, x, **kw)
    assert cache.hits == 0 and again == fresh


def test_a_layer_built_larger_than_the_plan_priced_is_warned_about():
    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    lp = rc.LayerPlan("svd", (4,), predicted={"params": 100, "macs": 1000, "error": 0.5})
    with pytest.warns(UserWarning, match=r"layer '0': built with 736 parameters where the plan "
                                         r"priced 100"):
        rc.apply(conv, rc.Plan({"0": lp}))


def test_fingerprinting_a_spectral_norm_model_in_training_mode_changes_nothing():
    """A spectral norm's power iteration runs when its weight is read in training mode: the
    fingerprint (cache keys, a checkpoint's teacher) and the eligibility census read it in
    eval mode, so they neither move its vectors nor differ from call to call."""
    from torch.nn.utils.parametrizations import spectral_norm

    from rankcut._fingerprint import model_fingerprint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.ReLU(),
                          spectral_norm(nn.Conv2d(64, 64, 3))).train()
    u = model[2].parametrizations.weight[0]._u.clone()
    first = model_fingerprint(model)
    assert rc.target_layers(model)["2"] is None
    assert model_fingerprint(model) == first and model.training
    assert torch.equal(model[2].parametrizations.weight[0]._u, u)
