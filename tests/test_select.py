import math

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.layers import layer_cost
from rankcut.select import (
    RankRule,
    TargetUnreachable,
    allocate_ranks,
    layer_ranks,
    parse_rank,
    sensitivity_plan,
)


@pytest.mark.parametrize("spec, rule", [
    (64, RankRule("fixed", 64)), ("12", RankRule("fixed", 12)), ("vbmf", RankRule("vbmf", 0.0)),
    ("vbmf=0.3", RankRule("vbmf", 0.3)), ("energy=0.95", RankRule("energy", 0.95)),
    ("params=0.25", RankRule("params", 0.25)), ("params=4x", RankRule("params", 0.25)),
    (" MACS = 2x ", RankRule("macs", 0.5)),
])
def test_rank_specs_parse(spec, rule):
    assert parse_rank(spec) == rule
    assert parse_rank(str(rule)) == rule  # printing gives a spec back


@pytest.mark.parametrize("spec", [0, -3, True, 2.5, "", "energy=1.5", "energy=0", "params=0",
                                  "params=0.5x", "energy=2x", "vbmf=2", "svd", "params=abc"])
def test_bad_rank_specs_are_rejected_with_what_is_accepted(spec):
    with pytest.raises(ValueError, match="rank: expected an int >= 1, 'vbmf', 'vbmf=W'"):
        parse_rank(spec)


CONV = nn.Conv2d(32, 48, 3, padding=1)
LIN = nn.Linear(100, 60)


@pytest.mark.parametrize("module, method", [(CONV, "svd"), (CONV, "cur"), (CONV, "spatial_svd"),
                                            (CONV, "tucker"), (CONV, "cp"), (LIN, "svd")])
@pytest.mark.parametrize("kind", ["params", "macs"])
def test_fraction_rules_pick_the_largest_rank_within_the_budget(module, method, kind):
    hw = (16, 16)
    frac = 0.3
    ranks = layer_ranks(module, method, f"{kind}={frac}", input_hw=hw)
    dense = getattr(layer_cost(module, input_hw=hw), kind)

    def cost(r):
        lp = rc.LayerPlan(method, r, form="cp4" if method == "cp" else None)
        return getattr(layer_cost(module, lp.layer_config(module), input_hw=hw), kind)

    if method == "cp" and kind == "params":  # seed 000's rule, exactly
        assert ranks == (int(frac * (32 * 48 * 9 // (32 + 48 + 3 + 3))),)
        return
    assert cost(ranks) <= frac * dense
    bigger = (ranks[0] + 1, round((ranks[0] + 1) * 32 / 48)) if method == "tucker" else (
        ranks[0] + 1,)
    assert cost(bigger) > frac * dense


def test_energy_rule_keeps_the_smallest_rank_reaching_the_energy():
    W = LIN.weight.detach()
    s2 = torch.linalg.svdvals(W).double().pow(2)
    cum = s2.cumsum(0) / s2.sum()
    (k,) = layer_ranks(LIN, "svd", "energy=0.8")
    assert cum[k - 1] >= 0.8 > cum[k - 2]


def planted_conv(t_rank, s_rank, seed=0, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(t_rank, s_rank, 3, 3, generator=g)
    U = torch.randn(40, t_rank, generator=g)
    V = torch.randn(30, s_rank, generator=g)
    W = torch.einsum("ta,abij,sb->tsij", U, core, V)
    conv = nn.Conv2d(30, 40, 3)
    with torch.no_grad():
        conv.weight.copy_(W + noise * W.std() * torch.randn(W.shape, generator=g))
    return conv


def test_vbmf_rule_finds_planted_tucker_ranks_on_the_unfoldings():
    conv = planted_conv(5, 7)
    assert layer_ranks(conv, "tucker", "vbmf") == (5, 7)
    assert layer_ranks(conv, "svd", "vbmf") == (5,)  # the (T, S·kh·kw) matrix has rank 5
    weak = layer_ranks(conv, "tucker", "vbmf=0.5")
    assert weak == (5 + round(0.5 * 35), 7 + round(0.5 * 23))


def test_spectral_rules_refuse_cp_and_macs_needs_the_input_size():
    import numpy as np

    with pytest.raises(ValueError, match="not defined for CP"):
        layer_ranks(CONV, "cp", "vbmf")
    # a CP form's name is CP: the same rules as "cp" with that form
    for form in ("cp3", "cp4"):
        with pytest.raises(ValueError, match="not defined for CP"):
            layer_ranks(CONV, form, "energy=0.9")
        assert layer_ranks(CONV, form, "params=0.25") == layer_ranks(CONV, "cp", "params=0.25",
                                                                     form=form)
    # a method that does not apply to the layer says so, whatever the rule
    for module, method, rule in ((LIN, "cp", "params=0.5"), (LIN, "tucker", "vbmf"),
                                 (nn.Conv2d(8, 8, 3, groups=8), "svd", "energy=0.9")):
        with pytest.raises(ValueError, match="module: .*(does not apply|depthwise)"):
            layer_ranks(module, method, rule)
    assert parse_rank(np.int64(64)) == parse_rank(torch.tensor(64)) == RankRule("fixed", 64)
    with pytest.raises(ValueError, match="input_hw: the 'macs=' rule needs"):
        layer_ranks(CONV, "svd", "macs=0.5")
    assert layer_ranks(CONV, "tucker", 7) == (7, 7)


def test_allocation_reproduces_seed_000_alexnet_ranks():
    """Seed 000's measured losses and layer sizes (thousands of params) give its ranks."""
    conv = allocate_ranks([8.34, 7.46, 8.66, 7.16, 6.66], [23, 307, 664, 885, 590], 750)
    fc = allocate_ranks([6.68, 6.77, 5.51], [37749, 16777, 4096], 900)
    assert conv == [164, 147, 169, 140, 130]
    assert fc == [318, 321, 261]


def test_allocation_follows_the_formula_on_made_up_losses():
    losses, sizes, total, lam = [1.0, 3.0, 6.0], [600, 300, 100], 97, 0.4
    ranks = allocate_ranks(losses, sizes, total, lam)
    shares = [(1 - lam) * l / 10 + lam * s / 1000 for l, s in zip(losses, sizes, strict=True)]
    floors = [math.floor(x * total) for x in shares]
    left = total - sum(floors)
    assert ranks == [f + (1 if i < left else 0) for i, f in enumerate(floors)]
    assert sum(ranks) == total
    assert allocate_ranks([1, 1], [1, 3], 8, lam=1.0) == [2, 6]  # λ = 1: by size alone
    assert allocate_ranks([100, 0.001], [1, 1], 10) == [9, 1]  # never below 1
    # shares whose product with the total is whole take exactly that (0.29 * 100 is 28.999...
    # in floating point)
    assert allocate_ranks([30, 41, 29], [1, 1, 1], 100) == [30, 41, 29]
    assert allocate_ranks([1, 1, 1], [10, 20, 30], 60, 0.5) == [15, 20, 25]


def test_sensitivity_ranks_stop_at_a_layers_full_rank_and_batches_are_read_again():
    """A rank above what the layer can hold (an 8x8 Linear: 8) is capped, not priced above its
    dense size; a one-shot generator of batches (read once per layer) is refused up front."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(),
                          nn.Linear(64, 64)).eval()
    batches = [(torch.randn(16, 8), torch.randint(0, 64, (16,)))]
    plan = sensitivity_plan(model, ["0", "2", "4"], batches, total=40, method="svd",
                            trial_rank=2)
    assert plan["0"].ranks == (8,) and all(plan[n].ranks[0] <= 8 for n in ("0", "2"))
    small = rc.apply(model, plan)
    assert small[0].rank == 8
    with pytest.raises(ValueError, match="batches: a one-shot iterator"):
        sensitivity_plan(model, ["0", "2"], iter(batches), total=10, method="svd")


@pytest.mark.parametrize("args, match", [
    (([], [], 5), "expected two non-empty sequences"),
    (([1.0], [1.0, 2.0], 5), "of equal length, got 1 and 2"),
    (([-1.0, 2.0], [1, 1], 5), "non-negative values"),
    (([1.0, 2.0], [1, 1], 1), r"total: expected an int >= the number of layers \(2\)"),
])
def test_allocation_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks(*args)


def test_sensitivity_plan_gives_the_fragile_layer_more_rank():
    """Layer 'a' is nearly rank 2 (decomposing it costs little); 'b' is full rank."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("a", planted_conv(2, 2))
    model.add_module("act", nn.ReLU())
    model.add_module("b", nn.Conv2d(40, 40, 3))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.eval()
    with torch.no_grad():
        xs = [torch.randn(8, 30, 12, 12) for _ in range(2)]
        batches = [(x, model(x)) for x in xs]  # match the dense model's outputs
    plan = sensitivity_plan(model, ["a", "b"], batches, total=40, loss_fn=nn.functional.mse_loss,
                            method="tucker", trial_rank=2, options={"max_iter": 5})
    ra, rb = plan["a"].ranks[0], plan["b"].ranks[0]
    assert ra + rb == 40 and rb > ra
    assert plan["b"].predicted["sensitivity_loss"] > plan["a"].predicted["sensitivity_loss"]
    assert plan["a"].method == "tucker" and plan["a"].module_type == "Conv2d"
    small = rc.apply(model, plan)
    assert small(xs[0]).shape == (8, 40)


@pytest.mark.parametrize("form", ["cp4", "cp3"])
def test_sensitivity_plan_to_a_params_target_takes_the_largest_total_that_fits(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 24, 3), nn.ReLU(), nn.Conv2d(24, 32, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    names = ["0", "2"]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 8, 10, 10, generator=g), torch.randint(0, 5, (8,), generator=g))]
    opts = dict(method="cp", form=form, options={"max_iter": 3})
    plan = sensitivity_plan(model, names, batches, target="params=3x", **opts)
    dense = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())

    def params(p):
        small = rc.apply(model, p)
        return sum(q.numel() for n in names for q in small.get_submodule(n).parameters())

    total = sum(plan[n].ranks[0] for n in names)
    assert plan.meta["rank"].startswith(f"sensitivity total={total} ")
    assert params(plan) <= dense / 3
    more = sensitivity_plan(model, names, batches, total=total + 1, **opts)
    assert params(more) > dense / 3
    with pytest.raises(ValueError, match="not both"):
        sensitivity_plan(model, names, batches, total=10, target="params=3x", **opts)
    with pytest.raises(ValueError, match="params target"):
        sensitivity_plan(model, names, batches, target="macs=3x", **opts)


def test_a_candidate_whose_solve_failed_beats_nothing():
    """A NaN error (a failed solve) on the cheapest candidate must not hide the others, and is
    never chosen: not when the budget is loose, not when only it would meet the budget (the
    target is then out of reach), not by a rank rule."""
    from rankcut.curves import Candidate, pareto
    from rankcut.select.budget import allocate, frontier

    cands = [Candidate("svd", (1,), None, 1, 1, float("nan")),
             Candidate("svd", (5,), None, 5, 5, 0.5), Candidate("dense", (), None, 10, 10, 0.0)]
    for kept in (frontier(cands, "params"), pareto(cands, "params")):
        assert [c.params for c in kept] == [5, 10]
    chosen = allocate({"a": cands}, "params", 100, score=lambda c: c.error ** 2)
    assert chosen["a"].method == "dense"
    with pytest.raises(TargetUnreachable):
        allocate({"a": cands}, "params", 3, score=lambda c: c.error ** 2)
    with pytest.raises(TargetUnreachable):
        allocate({"a": pareto(cands, "params")}, "params", 3)
    from types import SimpleNamespace

    from rankcut.select.planner import _Chooser

    layer = SimpleNamespace(cands=cands[:2], dense=cands[2])
    assert _Chooser({"a": layer}, "params", None)(None)["a"].params == 5
