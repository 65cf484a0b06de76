"""Loss-aware allocation (network damage per layer) and BatchNorm re-estimation."""

import copy

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.calibrate import reestimate_batchnorm
from rankcut.select import damage


class TwoPaths(nn.Module):
    """``used`` feeds the output; ``ignored`` is computed and multiplied by zero."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.used = nn.Conv2d(16, 16, 3, padding=1)
        self.ignored = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.used(h)) + 0.0 * self.ignored(h)
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TwoPaths().eval()


CALIB = [torch.randn(32, 3, 8, 8) for _ in range(2)]
X = torch.rand(1, 3, 8, 8)


def test_a_layer_the_output_ignores_gets_the_least_weight(net):
    probes = {name: rc.layers.SVDConv2d.from_dense(net.get_submodule(name), 2)
              for name in ("used", "ignored")}
    errors = {name: probes[name].info["rel_error"] for name in probes}
    weights = damage.layer_weights(net, probes, errors, CALIB)
    assert weights["ignored"] == pytest.approx(1 / damage.MAX_RATIO)
    assert weights["used"] > 1 and weights["used"] <= damage.MAX_RATIO
    # the caller's model is left as it was
    assert isinstance(net.used, nn.Conv2d) and isinstance(net.ignored, nn.Conv2d)


class InPlace(nn.Module):
    """Convolutions whose outputs are changed in place downstream, one of them called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        y = self.shared(self.b(h))
        y += h
        z = self.c(y).relu_()
        z = self.shared(z)
        return self.head(z.mean((2, 3)))


@pytest.mark.parametrize("name, computed", [
    ("a", {"b": 1, "shared": 2, "c": 1}), ("b", {"shared": 2, "c": 1}),
    ("c", {"shared": 1}), ("shared", {"c": 1})])
def test_probing_from_the_layer_on_gives_what_the_whole_network_gives(name, computed,
                                                                     monkeypatch):
    """Only the dense layers from the probed one on are computed again (``shared`` runs once
    before ``c`` and once after); the result equals a whole run's, and in-place ops downstream
    do not change the cache."""
    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(6, 3, 8, 8)
    names = {m: n for n, m in model.named_children()}
    ran = []
    real = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: (
        ran.append(names.get(self)), real(self, *a))[1])
    with torch.no_grad():
        prefix = damage._Prefix(model, x)
        assert torch.equal(prefix.reference, damage._log_probs(model, x))
        original = model.get_submodule(name)
        rc.surgery.set_submodule(model, name, rc.layers.SVDConv2d.from_dense(original, 2))
        whole = damage._log_probs(model, x)
        ran.clear()
        reused = prefix.run(model, x, original)
        again = prefix.run(model, x, original)
    assert torch.allclose(reused, whole, atol=1e-12, rtol=0)
    assert not torch.equal(whole, prefix.reference)  # the probe did change the output
    dense_runs = [n for n in ran[:len(ran) // 2] if n is not None]
    assert {n: dense_runs.count(n) for n in dense_runs} == computed
    assert torch.equal(again, reused)


def test_loss_aware_planning_spends_the_budget_where_the_network_feels_it(net):
    plan = rc.plan(net, X, method="svd", target="params=2x", calib_data=CALIB,
                   allow_slower=True, min_params=100)
    weights = plan.meta["damage_weights"]
    assert weights["ignored"] < weights["used"]
    assert plan["ignored"].ranks[0] <= plan["used"].ranks[0]
    lp = plan["used"]
    assert lp.predicted["damage"] == pytest.approx(lp.predicted["error"] ** 2
                                                   * lp.predicted["damage_weight"])
    assert plan.meta["predicted"]["damage"] > 0
    plain = rc.plan(net, X, method="svd", target="params=2x", calib_data=CALIB,
                    allow_slower=True, min_params=100, loss_aware=False)
    assert "damage_weights" not in plain.meta
    with pytest.raises(ValueError, match="loss_aware: needs calib_data and a target"):
        rc.plan(net, X, method="svd", target="params=2x", loss_aware=True)


class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_reestimating_batchnorm_averages_the_statistics_and_restores_modes():
    torch.manual_seed(0)
    model = WithBN().train()
    model.head.eval()
    batches = [torch.randn(16, 3, 6, 6) + 2 for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 1
    with torch.no_grad():
        out = torch.cat([model.conv(b) for b in batches]).transpose(0, 1).reshape(8, -1)
    assert torch.allclose(model.bn.running_mean, out.mean(1), atol=1e-5)
    assert model.bn.momentum == 0.1 and model.training and not model.head.training
    assert reestimate_batchnorm(nn.Linear(3, 2), batches) == 0


def test_reestimating_batchnorm_reads_a_generator_once():
    from rankcut.calibrate import reestimate_batchnorm

    torch.manual_seed(0)
    model = WithBN().eval()
    before = model.bn.running_mean.clone()
    assert reestimate_batchnorm(model, (torch.randn(8, 3, 6, 6) + 1 for _ in range(2))) == 1
    assert not torch.equal(model.bn.running_mean, before)


def test_reestimation_weights_batches_by_their_examples_and_skips_a_lone_one():
    """130 examples in batches of 128 and 2: the mean is the 130 examples' (the 2 counted as
    half of it before); a final batch of 1 (BatchNorm1d refuses it in training) is skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16)).eval()
    x = torch.randn(131, 8)
    x[128:] += 5  # the small batches differ
    assert reestimate_batchnorm(model, [x[:128], x[128:130], x[130:]]) == 1
    with torch.no_grad():
        out = model[0](x[:130])
    assert torch.allclose(model[1].running_mean, out.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="no batch of two examples"):
        reestimate_batchnorm(model, [x[:1]])


def test_a_failed_reestimation_leaves_the_statistics_as_they_were():
    torch.manual_seed(0)
    model = WithBN().eval()
    model.bn.running_mean.fill_(5.0)
    model.bn.running_var.fill_(9.0)
    bad = torch.randn(8, 3, 6, 6)
    bad[0, 0, 0, 0] = float("nan")
    for data, match in (([], "no batches"), ([bad], "NaN or infinite")):
        with pytest.raises(ValueError, match=match):
            reestimate_batchnorm(model, data)
        assert bool((model.bn.running_mean == 5).all()) and bool((model.bn.running_var == 9).all())
        assert model.bn.momentum == 0.1 and not model.bn.training


def test_compress_reestimates_batchnorm_on_examples_drawn_at_random():
    """Training data sorted by class (an image tree; tensors in class order) is drawn from at
    random, so the statistics are those of the whole data, not of a class per batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.cat([torch.full((256, 1, 2, 2), -1.0), torch.full((256, 1, 2, 2), 1.0)])
    x = x + 0.1 * torch.randn_like(x)
    y = torch.cat([torch.zeros(256), torch.ones(256)]).long()
    # statistics far from the data's (mean about 0, variance about 1.01): a re-estimation that
    # did not run, or ran on one class (variance about 0.01), leaves them far from the data's
    model[0].running_mean.fill_(5.0)
    model[0].running_var.fill_(9.0)
    for data in ((x, y), torch.utils.data.TensorDataset(x, y)):
        result = rc.compress(model, x[:1], method="svd", rank=1, train_data=data,
                             reestimate_bn=True, plan_options={"allow_slower": True,
                                                               "min_params": 1})
        assert result.stages[-1]["reestimated_bn"] == {"batchnorms": 1}
        assert abs(float(result.model[0].running_var) - float(x.var())) < 0.1
        assert abs(float(result.model[0].running_mean) - float(x.mean())) < 0.1


def test_compress_applies_its_transform_to_the_calibration_inputs_too():
    """compress(transform=...) normalises calib_data's inputs as it does the training and
    evaluation batches: the moments and fits see what the model will see."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            seen.append(float(x.mean()))
            return self.fc(x)

    torch.manual_seed(0)
    calib = [(torch.rand(16, 4), torch.zeros(16).long())]
    rc.compress(Probe(), torch.rand(1, 4) + 100, method="svd", rank=2, calib_data=calib,
                transform=lambda x: x + 100, plan_options={"allow_slower": True,
                                                            "min_params": 1})
    assert seen and min(seen) > 99  # every forward, the calibration ones included


def test_compress_reestimates_batchnorm_on_training_examples():
    torch.manual_seed(0)
    model = WithBN().eval()
    data = (torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,)))
    before = model.bn.running_mean.clone()
    result = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data,
                         plan_options={"allow_slower": True, "min_params": 10})
    assert result.stages[0]["reestimated_bn"] == {"batchnorms": 1}
    assert not torch.equal(result.model.bn.running_mean, before)
    assert torch.equal(model.bn.running_mean, before)  # the caller's model is untouched
    off = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data,
                      reestimate_bn=False, plan_options={"allow_slower": True,
                                                         "min_params": 10})
    assert off.stages[0]["reestimated_bn"] is None
    with pytest.raises(ValueError, match="reestimate_bn: needs train_data"):
        rc.compress(model, data[0][:1], method="svd", rank=2, reestimate_bn=True)


def test_compress_fits_sequentially_with_calibration_data_and_then_keeps_batchnorm():
    """With calibration data the layers are fitted in order to reproduce the dense outputs, so
    the stored BatchNorm statistics are kept unless asked; without it they are re-estimated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    for bn in (model[1], model[4]):  # trained-looking statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    data = (torch.randn(64, 3, 6, 6), torch.randint(0, 4, (64,)))
    calib = [data[0][:32], data[0][32:]]
    opts = {"allow_slower": True, "min_params": 10}
    seq = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data,
                      calib_data=calib, plan_options=opts)
    assert len(seq.plan.active) >= 2 and seq.stages[0]["reestimated_bn"] is None
    assert torch.equal(seq.model[1].running_mean, model[1].running_mean)
    plain = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data,
                        calib_data=calib, sequential=False, plan_options=opts)
    assert plain.stages[0]["reestimated_bn"] == {"batchnorms": 2}
    asked = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data,
                        calib_data=calib, reestimate_bn=True, plan_options=opts)
    assert asked.stages[0]["reestimated_bn"] == {"batchnorms": 2}
    # the later layers, fitted to what the factorized ones before give, land closer to dense
    fitted_alone = rc.compress(model, data[0][:1], method="svd", rank=2, calib_data=calib,
                               sequential=False, plan_options=opts)
    x = data[0]
    with torch.no_grad():
        dense = model(x)
        assert float((seq.model(x) - dense).norm()) < float((fitted_alone.model(x) - dense).norm())
    with pytest.raises(ValueError, match="sequential: needs calib_data"):
        rc.compress(model, data[0][:1], method="svd", rank=2, sequential=True)


def test_planning_shows_its_stages_and_layers_when_asked(net, capsys):
    rc.plan(net, X, method="svd", target="params=2x", calib_data=CALIB, allow_slower=True,
            min_params=100, progress=True)
    err = capsys.readouterr().err
    assert "planning: scoring candidates" in err and "planning: network damage" in err
    assert "used" in err
    rc.plan(net, X, method="cp", target="params=2x", allow_slower=True, min_params=100,
            progress=True)  # CP candidates are measured for all layers at once, rank by rank
    err = capsys.readouterr().err
    assert "planning: measuring candidates" in err and "cp/cp4 at 1" in err
    rc.plan(net, X, method="svd", target="params=2x", allow_slower=True, min_params=100)
    assert capsys.readouterr().err == ""


def test_damage_is_measured_per_output_position():
    """A sequence model's (N, S, V) outputs are one distribution per position, a segmentation's
    (N, C, H, W) one per pixel: one softmax over all of them would let the positions with the
    smaller logits count for almost nothing."""
    from rankcut.select import damage

    x = torch.randn(2, 3, 5)
    for shape, dim in (((2, 3, 5), -1), ((2, 4, 3, 3), 1)):
        out = torch.randn(*shape) * torch.linspace(1, 20, shape[1]).view(1, -1, *[1] * (
            len(shape) - 2))
        lp = damage._log_probs(lambda _, out=out: out, x)
        total = lp.exp().sum(-1)  # (the class dimension moved last)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9), (shape, dim)
        assert lp.shape[-1] == shape[dim]


def test_damage_reads_tuple_and_dict_outputs_and_a_single_logit():
    """A model returning (logits, features) or {"logits": ...} is measured on its logits; one
    logit per example is a binary classifier's (a softmax over one class would make every
    layer's damage 0, every weight 1)."""
    from rankcut.select import damage

    x = torch.randn(4, 3)
    logits = torch.randn(4, 5)
    plain = damage._log_probs(lambda _: logits, x)
    for out in ((logits, torch.randn(4, 7)), [logits], {"features": x, "logits": logits},
                {"out": logits}):
        assert torch.equal(damage._log_probs(lambda _, out=out: out, x), plain)
    with pytest.raises(ValueError, match="loss_aware=False"):
        damage._log_probs(lambda _: "text", x)
    z = torch.tensor([0.0, 2.0, -1.0])
    for one in (z, z[:, None]):
        lp = damage._log_probs(lambda _, one=one: one, x)
        assert lp.shape == (3, 2) and torch.allclose(lp[:, 0].exp(), torch.sigmoid(z.double()))
    probed = damage._log_probs(lambda _: z + 1, x)
    kl = torch.nn.functional.kl_div(probed, damage._log_probs(lambda _: z, x), log_target=True,
                                    reduction="sum")
    assert float(kl) > 0


def test_a_failed_solve_neither_probes_nor_spoils_the_other_weights():
    from rankcut.curves import Candidate
    from rankcut.select import damage

    dense = Candidate("dense", (), None, 1000, 1000, 0.0)
    cands = [Candidate("cp", (4,), "cp4", 100, 100, 0.5),
             Candidate("cp", (8,), "cp4", 200, 200, float("nan"))]
    assert damage.probe(cands, dense, "params", 0.3).ranks == (4,)
    assert damage.probe(cands[1:], dense, "params", 0.3) is None
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    probes = {n: rc.layers.LowRankLinear.from_dense(model.get_submodule(n), 2)
              for n in ("0", "2", "4")}
    weights = damage.layer_weights(model, probes, {"0": 0.3, "2": float("nan"), "4": 0.2},
                                   [torch.randn(16, 4)])
    assert weights["2"] == 1.0 and all(0.25 <= w <= 4 for w in weights.values())
    assert weights["0"] != weights["4"]  # measured, not all reset


def test_probing_keeps_user_hooks_and_instance_forwards_as_they_run():
    """A user's forward hook on a layer before the probed one runs once on a replay, as in a
    whole run; a forward set on the instance (a wrapper's) is used, and kept afterwards."""
    import types

    from rankcut.select import damage

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.l0(x)
            return self.l2(self.l1(torch.relu(h)) + h)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(6, 4)
    model.l0.register_forward_hook(lambda m, a, o: o * 2)
    own = types.MethodType(lambda self, v: nn.Linear.forward(self, v) * 3, model.l1)
    model.l1.forward = own
    with torch.no_grad():
        prefix = damage._Prefix(model, x)
        original = model.l2
        model.l2 = copy.deepcopy(original)  # an exact copy: no damage at all
        probed = prefix.run(model, x, original)
    assert torch.allclose(probed, prefix.reference, atol=1e-12)
    assert vars(model.l1)["forward"] is own


def test_the_damage_of_whole_models_is_their_outputs_kl_from_the_dense_one(net):
    cut = rc.apply(net, rc.plan(net, X, method="svd", rank=1, min_params=100,
                                allow_slower=True))
    measured = damage.output_damage(net, {"same": copy.deepcopy(net), "cut": cut}, CALIB,
                                    max_samples=40)
    assert measured["same"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():  # the first 40 calibration inputs: 32 of one batch, 8 of the next
        x = torch.cat(CALIB)[:40]
        p, q = torch.log_softmax(net(x).double(), 1), torch.log_softmax(cut(x).double(), 1)
    assert measured["cut"] == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()))
    assert measured["cut"] > 0


@pytest.mark.parametrize("unweighted_nearer", [True, False])
def test_compress_keeps_the_plan_whose_applied_model_is_nearer_the_dense_one(
        net, monkeypatch, unweighted_nearer):
    """The loss-aware plan is applied beside the unweighted one and the model nearer the dense
    outputs is kept (the damage weights misjudged VGG-11-BN's Tucker-2 plan at 32x)."""
    weighted = rc.plan(net, X, method="svd", target="params=2x", calib_data=CALIB,
                       allow_slower=True, min_params=100)
    plain = rc.plan(net, X, method="svd", target="params=2x", calib_data=CALIB,
                    allow_slower=True, min_params=100, loss_aware=False)
    layers = {n: lp.ranks for n, lp in weighted.active.items()}
    assert layers != {n: lp.ranks for n, lp in plain.active.items()}
    seen, real = [], damage.output_damage

    def measured(model, others, calib_data, **kw):  # the real measure, with its verdict forced
        seen.append(real(model, others, calib_data, **kw))
        return ({"weighted": 1.0, "unweighted": 0.5} if unweighted_nearer
                else {"weighted": 0.5, "unweighted": 1.0})

    monkeypatch.setattr(damage, "output_damage", measured)
    result = rc.compress(net, X, method="svd", target="params=2x", calib_data=CALIB,
                         plan_options={"allow_slower": True, "min_params": 100},
                         progress=False)
    kept = plain if unweighted_nearer else weighted
    assert {n: lp.ranks for n, lp in result.plan.active.items()} == {
        n: lp.ranks for n, lp in kept.active.items()}
    check = result.plan.meta["loss_aware_check"]
    assert check["kept"] == ("unweighted" if unweighted_nearer else "weighted")
    assert len(seen) == 1 and set(seen[0]) == {"weighted", "unweighted"}
    small = rc.apply(net, kept, calib_data=CALIB)
    with torch.no_grad():
        assert torch.allclose(result.model(X), small(X), atol=1e-6)
    # asked for by name (loss_aware given), nothing is compared
    chosen = rc.compress(net, X, method="svd", target="params=2x", calib_data=CALIB,
                         plan_options={"allow_slower": True, "min_params": 100,
                                       "loss_aware": True}, progress=False)
    assert "loss_aware_check" not in chosen.plan.meta and len(seen) == 1
    assert {n: lp.ranks for n, lp in chosen.plan.active.items()} == layers


def test_compress_keeps_the_weighted_plan_where_the_unweighted_one_cannot_be_made(
        net, monkeypatch):
    """The second plan is timed afresh by the guard and can be refused: the weighted plan,
    which passed, is kept (compress used to fail); its warnings are not shown."""
    import functools
    import importlib
    import warnings

    C = importlib.import_module("rankcut.compress")  # (rc.compress is the function)

    real = C.make_plan

    @functools.wraps(real)  # (compress checks plan_options against its signature)
    def refusing(*args, **kwargs):
        if kwargs.get("loss_aware") is False:
            warnings.warn("the discarded plan's warning", stacklevel=2)
            raise rc.select.SlowerThanDense("target: measured 1.03x the dense model's time")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "make_plan", refusing)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = rc.compress(net, X, method="svd", target="params=2x", calib_data=CALIB,
                             plan_options={"allow_slower": True, "min_params": 100},
                             progress=False)
    check = result.plan.meta["loss_aware_check"]
    assert check["kept"] == "weighted" and "1.03x" in check["unweighted"]
    assert not any("discarded" in str(w.message) for w in said)
    # a latency target's plans are timed against its goal: not compared; nor where the
    # caller named loss_aware, or gave no target
    job = C._Job(net, X, {"calib_data": CALIB, "max_batches": None}, None, False, None, {},
                 False, sequential=True)
    assert job.checks_weights("params=2x") and not job.checks_weights("latency=2x")
    assert not job.checks_weights(None)
    job.plan_kwargs["loss_aware"] = True
    assert not job.checks_weights("params=2x")
