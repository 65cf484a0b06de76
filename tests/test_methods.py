"""The registry of factorization methods: every registered method works end to end through
plan, apply, save/load, costs and the planner, from its one declaration."""

import dataclasses

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut import methods
from rankcut.layers import FactorizedLayer
from rankcut.profile import count_macs, count_params


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.point = nn.Conv2d(24, 24, 1)
        self.head = nn.Linear(24 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.point(x)).flatten(1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


X = torch.rand(2, 3, 8, 8)


def every_variant():
    return [(m.name, f) for m in methods.REGISTRY.values() for f in (m.forms or (None,))]


def test_the_registry_names_each_method_once_with_its_forms():
    assert methods.names() == ("svd", "cur", "spatial_svd", "cp", "tucker")
    assert methods.aliases() == ("svd", "cur", "spatial_svd", "cp", "cp4", "cp3", "tucker")
    assert methods.resolve("cp3") == (methods.get("cp"), "cp3")
    assert methods.resolve("cp") == (methods.get("cp"), "cp4")
    with pytest.raises(ValueError, match="method: expected one of svd, cur"):
        methods.resolve("qr")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("svd"))
    # plan() and LayerPlan accept the same vocabulary
    assert set(rc.select.planner.method_choices()) == {"auto", *methods.aliases()}
    for name in methods.aliases():
        lp = rc.LayerPlan(name, (3, 3) if name == "tucker" else (3,))
        assert lp.method in methods.names()


@pytest.mark.parametrize("name, form", every_variant())
def test_each_method_builds_prices_saves_and_reloads(net, name, form, tmp_path):
    spec = methods.get(name)
    layer_name = "conv"
    ranks = (6, 6) if spec.n_ranks == 2 else (6,)
    plan = rc.Plan({layer_name: rc.LayerPlan(name, ranks, form=form)})
    small = rc.apply(net, plan)
    layer = small.get_submodule(layer_name)
    assert isinstance(layer, spec.conv) and isinstance(layer, FactorizedLayer)
    # the registry's price is the built layer's count (at its realised ranks: a sampled CUR
    # picks its own number of columns)
    _, real, _ = methods.plan_of(layer)
    cost = spec.cost(net.conv, real, form, (8, 8))
    assert cost.params == count_params(layer)
    assert cost.macs == count_macs(layer, torch.rand(1, 16, 8, 8))
    # the layer tells which plan rebuilds it, and load rebuilds it from the plan alone
    assert methods.plan_of(layer)[0] == name
    rc.save(small, tmp_path, plan=plan)
    again = rc.load(Net(), tmp_path)
    assert torch.allclose(again(X), small(X), atol=1e-6)


@pytest.mark.parametrize("name", methods.names())
def test_each_method_is_plannable_to_a_target(net, name):
    plan = rc.plan(net, X, method=name, target="params=2x", allow_slower=True, min_params=100)
    assert plan.active, plan
    assert plan.meta["predicted"]["params_ratio"] >= 1.9
    conv_methods = {lp.method for n, lp in plan.active.items() if n in ("conv",)}
    assert conv_methods <= {name, methods.FALLBACK}
    small = rc.apply(net, plan)
    assert count_params(small) < count_params(net)


def test_cur_is_planned_with_actual_columns_on_linear_layers(net):
    plan = rc.plan(net, X, method="cur", target="params=3x", allow_slower=True)
    head = plan["head"]
    assert head.method == "cur" and head.options == {"solver": "deim"}
    small = rc.apply(net, plan)
    assert small.head.info["decomposition"] == "cur"
    # CUR never beats SVD's error at the same width (Eckart-Young): auto does not score it
    assert not methods.get("cur").auto
    auto = [m.name for m, _ in methods.variants("auto", net.head)]
    assert auto == ["svd"]


def test_variants_fall_back_to_svd_where_a_method_does_not_apply(net):
    assert [(m.name, f) for m, f in methods.variants("tucker", net.point)] == [("svd", None)]
    assert [(m.name, f) for m, f in methods.variants("cp3", net.conv)] == [("cp", "cp3")]
    assert [(m.name, f) for m, f in methods.variants("auto", net.conv)] == [
        ("svd", None), ("spatial_svd", None), ("cp", "cp3"), ("cp", "cp4"), ("tucker", None)]


def test_one_from_dense_signature_and_solver_option(net):
    for spec in methods.REGISTRY.values():
        layer = spec.conv.from_dense(net.conv, (4, 4) if spec.n_ranks == 2 else 4, cov=None,
                                     **dict(spec.layer_options))
        W = net.conv.weight.detach()
        actual = float((layer.to_dense().weight.detach() - W).norm() / W.norm())
        assert 0 < layer.info["rel_error"] < 1  # a rank-4 approximation of a random kernel
        assert layer.info["rel_error"] == pytest.approx(actual, rel=1e-4, abs=1e-6), spec.name
    layer = rc.layers.SVDConv2d.from_dense(net.conv, 4, decomposition="cur", solver="deim")
    assert layer.info["options"] == {"solver": "deim"}
    with pytest.raises(ValueError, match="chosen with 'solver'"):
        rc.layers.CPConv2d.from_dense(net.conv, 4, method="als")
    with pytest.raises(ValueError, match="solver: expected one of 'als'"):
        rc.layers.CPConv2d.from_dense(net.conv, 4, solver="sgd")


def test_cp_ranks_that_cannot_save_anything_are_clamped(net):
    geo = rc.layers.ConvGeometry.of(net.conv)
    most = rc.layers.cp_break_even(geo, "cp4")
    with pytest.warns(UserWarning, match=f"clamped to {most}"):
        layer = rc.layers.CPConv2d.from_dense(net.conv, 10 * most, max_iter=2)
    assert layer.rank == most and count_params(layer) <= count_params(net.conv)


def test_energy_rules_read_the_singular_values_each_method_cuts(net):
    """``Method.spectra``: the energy rule's rank is the energy rank of the matrix each rank
    truncates (spatial SVD: the (S·kh, T·kw) reshape; Tucker-2: one per mode); CP has none."""
    W = net.conv.weight.detach()
    t, s, kh, kw = W.shape

    def energy_rank(M):
        e = torch.linalg.svdvals(M.double()).pow(2)
        return int((e.cumsum(0) / e.sum() < 0.9).sum()) + 1

    spatial = W.permute(1, 2, 0, 3).reshape(s * kh, t * kw)
    assert rc.select.layer_ranks(net.conv, "spatial_svd", "energy=0.9") == (energy_rank(spatial),)
    assert rc.select.layer_ranks(net.conv, "svd", "energy=0.9") == (energy_rank(W.reshape(t, -1)),)
    r_out, r_in = energy_rank(W.reshape(t, -1)), energy_rank(W.transpose(0, 1).reshape(s, -1))
    assert rc.select.layer_ranks(net.conv, "tucker", "energy=0.9") == (
        min(r_out, r_in * kh * kw), min(r_in, r_out * kh * kw))
    with pytest.raises(ValueError, match="not defined for CP"):
        rc.select.layer_ranks(net.conv, "cp3", "energy=0.9")
    # one matrix a rank, or none
    with pytest.raises(ValueError, match="spectra gives 2 matrices for 1 rank"):
        methods.register(dataclasses.replace(methods.get("svd"), name="svd2",
                                             spectra=("channel", "input")))
    assert "svd2" not in methods.REGISTRY


def test_design_doc_shows_how_to_add_a_method():
    from pathlib import Path

    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    assert "rankcut.methods" in design and "register(Method(" in design


@pytest.mark.parametrize("name, form", every_variant())
def test_curve_candidates_are_priced_as_the_registry_prices_them(net, name, form):
    # (CUR by DEIM: as wide as its rank; a sampled CUR is priced at the width it realises,
    # tests/test_cur.py)
    spec = methods.get(name)
    options = {"cp": {"max_iter": 3}, "cur": {"solver": "deim"}}.get(name, {})
    for kind in ("params", "macs"):
        for c in spec.candidates(net.conv, (8, 8), form, options, kind):
            cost = spec.cost(net.conv, c.ranks, c.form, (8, 8))
            assert (c.params, c.macs) == (cost.params, cost.macs), c


def test_tucker_curve_keeps_the_frontier_of_aligned_rank_pairs_beside_the_full_one():
    """Every aligned rank pair (multiples of RANK_ALIGN, or a mode's full size) that no other
    such pair beats on MACs and error is on the curve, with the frontier of all pairs; every
    candidate is on one of them."""
    from rankcut.curves import aligned, pareto, tucker_errors

    torch.manual_seed(0)
    conv, spec = nn.Conv2d(24, 40, 3), methods.get("tucker")
    curve = spec.candidates(conv, (8, 8), None, {}, "macs")
    E = tucker_errors(conv)
    every = [curves_candidate(spec, conv, (t, s), float(E[t - 1, s - 1]))
             for t in range(1, 41) for s in range(1, 25)]
    full = {c.ranks for c in pareto(every, "macs")}
    on_grid = {c.ranks for c in pareto([c for c in every if aligned(c.ranks, (40, 24))],
                                       "macs")}
    got = {c.ranks for c in curve}
    assert on_grid <= got and full <= got and got <= full | on_grid
    assert on_grid - full  # the full frontier alone would miss them


def test_of_candidates_of_equal_cost_the_front_keeps_the_lowest_error_alone():
    """A pair at the same cost as a better one is beaten (the sort's tie-break by error was
    lost in the costs' rounding: error * 1e-30 beside costs of thousands)."""
    from rankcut.curves import _front

    cost = torch.tensor([5000.0, 5000.0, 9000.0, 7000.0], dtype=torch.float64)
    error = torch.tensor([0.5, 0.2, 0.1, 0.3], dtype=torch.float64)
    assert _front(cost, error, torch.arange(4)).tolist() == [1, 2]
    assert _front(cost, error, torch.tensor([0, 3, 2])).tolist() == [0, 3, 2]


def test_a_rank_is_aligned_at_a_multiple_of_8_or_at_its_modes_full_size():
    from rankcut.curves import RANK_ALIGN, aligned, aligned_ranks

    assert RANK_ALIGN == 8
    assert aligned((16, 8)) and not aligned((16, 3)) and aligned((16, 3), (64, 3))
    assert not aligned((16, 3), (64, 4)) and aligned((), ())
    assert aligned_ranks(20).nonzero().flatten().add(1).tolist() == [8, 16, 20]


def curves_candidate(spec, conv, ranks, error):
    from rankcut.curves import priced

    return priced(spec, conv, (8, 8), ranks, None, error)


def test_cp_is_scored_at_ranks_that_suit_the_kernels():
    from rankcut.curves import RANK_ALIGN, cp_grid

    for conv in (nn.Conv2d(64, 64, 3), nn.Conv2d(8, 16, 3)):
        ranks = [c.ranks[0] for c in cp_grid(methods.get("cp"), conv, (8, 8))]
        assert len(ranks) >= 4 and ranks == sorted(set(ranks))
        assert all(r < RANK_ALIGN or r % RANK_ALIGN == 0 for r in ranks), ranks


@pytest.mark.parametrize("name", methods.names())
def test_solver_choices_are_checked_before_any_work(name):
    spec = methods.get(name)
    assert "solver" in spec.choices  # every method names its algorithms
    for key, allowed in spec.choices.items():
        for value in allowed:
            spec.check_options({key: value})
        with pytest.raises(ValueError, match=f"{key}: expected one of .*'nope'"):
            spec.check_options({key: "nope"})


def test_a_ridge_of_zero_is_refused_before_any_work_exactly_where_the_solver_refuses_it():
    """check_options took ridge=0 for every method; SVD, CUR and Tucker-2 then refused it when
    they ran on calibration data (after the planning it followed). CP-ALS takes it."""
    from rankcut import decompose as dec

    W, X = torch.randn(6, 5), torch.randn(4, 5, 3, 3)
    calls = {"svd": lambda: dec.svd(W, 2, cov=torch.eye(5), ridge=0.0),
             "cur": lambda: dec.cur(W, 2, cov=torch.eye(5), ridge=0.0),
             "tucker": lambda: dec.tucker(X, (2, 2), (0, 1), cov=torch.eye(45), ridge=0.0),
             "cp": lambda: dec.cp(X, 2, ridge=0.0)}
    solver_refuses = {}
    for solver, call in calls.items():
        try:
            call()
            solver_refuses[solver] = False
        except ValueError as err:
            assert "ridge" in str(err)
            solver_refuses[solver] = True
    assert solver_refuses == {"svd": True, "cur": True, "tucker": True, "cp": False}
    for name in methods.names():
        spec = methods.get(name)
        if solver_refuses[spec.solver.__name__]:
            with pytest.raises(ValueError, match="ridge: expected a number > 0, got 0"):
                spec.check_options({"ridge": 0})
        else:
            spec.check_options({"ridge": 0})
        spec.check_options({"ridge": 1e-3})


def test_the_cur_grid_stays_within_the_layers_full_rank():
    """Rounded to multiples of 8, the top of a 13-rank layer's grid was 16: solved at 13 with a
    clamp warning and priced above the dense layer."""
    import warnings

    from rankcut import curves, methods

    spec, layer = methods.get("cur"), nn.Linear(2000, 13)
    assert max(c.ranks[0] for c in curves.cur_grid(spec, layer, (1,))) <= 13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        candidates = spec.candidates(layer, (1,), None, {"solver": "deim"})
    assert all(c.ranks[0] <= 13 for c in candidates)
