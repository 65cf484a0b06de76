"""rankcut.compress schedules (one_shot, layerwise, multistage) and rankcut.transfer."""

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut import methods
from rankcut.compress import CP_SGD_LR, densify
from rankcut.layers import FactorizedLayer
from rankcut.profile import count_macs, count_params
from rankcut.train import evaluate

from .conftest import DEVICES

PLAN = {"min_params": 100, "allow_slower": True, "options": {"cp": {"max_iter": 5}}}
TUNE = {"batch_size": 32, "lr": 0.05, "progress": False}


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def task(n=256):
    """Labels a fixed function of the inputs, so a network can learn them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() * 2 + (x[:, 1, :4].mean((1, 2)) > 0).long()
    return x, y


@pytest.fixture(scope="module")
def trained():
    model, data = net(), task()
    rc.train.finetune(model, data, epochs=8, **TUNE)
    return model.eval(), data


def factorized(model):
    return {n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}


def test_one_shot_plans_applies_and_fine_tunes_with_the_original_untouched(trained):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = data[0][:1]
    result = rc.compress(model, x, target="macs=2x", train_data=data, steps=20,
                         plan_options=PLAN, finetune_options=TUNE)
    assert factorized(result.model) == set(result.plan.active) != set()
    assert count_macs(result.model, x) <= count_macs(model, x) / 2
    assert result.stages[0]["train"]["steps"] == 20
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    untuned = rc.apply(model, result.plan)
    assert evaluate(result.model, data)["loss"] < evaluate(untuned, data)["loss"]


@pytest.mark.parametrize("device", DEVICES)
def test_auto_with_data_plans_fits_tunes_and_fuses_on_the_models_device(trained, device):
    """The whole flow on the model's own device (CUDA where there is one): every method's
    candidates scored (Tucker-2's error table among them), calibrated, fitted, fine-tuned and
    fused, the outputs as the unfused model's."""
    model, (x, y) = trained
    model, x, y = copy.deepcopy(model).to(device), x.to(device), y.to(device)
    for name in ("tucker", "svd", "cp"):  # each curve, data-free, on the layer's device
        assert methods.get(name).candidates(model[2], (8, 8), None, {"max_iter": 3}, "macs")
    result = rc.compress(model, x[:1], method="auto", target="params=2x", calib_data=x[:64],
                         train_data=(x, y), steps=5, plan_options=PLAN, finetune_options=TUNE)
    assert factorized(result.model) and {p.device.type for p in
                                         result.model.parameters()} == {torch.device(device).type}
    assert count_params(result.model) <= count_params(model) / 2
    fused = rc.fuse(result.model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(fused(x[:16]), result.model.eval()(x[:16]), atol=1e-4,
                                   rtol=1e-4)


def test_layerwise_factorizes_one_layer_at_a_time_and_tunes_after_the_last(trained):
    model, data = trained
    result = rc.compress(model, data[0][:1], method="svd", rank=4,
                         schedule="layerwise", train_data=data, steps_per_layer=3,
                         plan_options=PLAN, finetune_options=TUNE)
    names = list(result.plan.active)
    assert len(names) >= 2
    assert [s["layers"] for s in result.stages] == [[n] for n in names]
    assert all(s["train"]["steps"] == 3 for s in result.stages)  # the last layer included
    assert factorized(result.model) == set(names)


class _HeadFirst(nn.Module):
    """Registers its layers in another order than they run."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 8)
        self.body = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_layerwise_goes_in_the_order_the_layers_run():
    torch.manual_seed(0)
    model = _HeadFirst().eval()
    data = (torch.randn(32, 8, 8, 8), torch.randint(0, 8, (32,)))
    result = rc.compress(model, data[0][:1], method="svd", rank=2, schedule="layerwise",
                         train_data=data, steps_per_layer=1, plan_options=PLAN,
                         finetune_options=TUNE)
    assert [s["layers"] for s in result.stages[:2]] == [["body"], ["head"]]


def test_batchnorm_is_reestimated_on_a_random_draw_not_the_first_examples():
    """An image tree is sorted by class: the first 2,048 examples of a larger dataset would
    give the statistics of a class or two."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 2)).eval()
    x = torch.cat([torch.randn(2048, 3, 4, 4), torch.randn(2048, 3, 4, 4) + 4])
    sorted_data = TensorDataset(x, torch.cat([torch.zeros(2048), torch.ones(2048)]).long())
    result = rc.compress(model, x[:1], method="svd", rank=2, train_data=sorted_data,
                         plan_options={**PLAN, "min_params": 10})
    seen = result.model[1].running_mean
    with torch.no_grad():  # what the statistics of the whole data are
        whole = result.model[0](x).mean((0, 2, 3))
    assert torch.allclose(seen, whole, atol=0.3), (seen, whole)


def test_layerwise_calibrates_each_layer_on_the_model_compressed_so_far(trained, monkeypatch):
    """Data-aware layers take their input statistics from the partly compressed model."""
    model, data = trained
    calls = []
    real = rc.surgery.input_second_moments

    def spy(m, names, batches, max_batches=None):
        calls.append((names, sorted(factorized(m))))
        return real(m, names, batches, max_batches=max_batches)

    monkeypatch.setattr(rc.surgery, "input_second_moments", spy)
    calib = [data[0][:64]]
    result = rc.compress(model, data[0][:1], method="svd", rank=4,
                         schedule="layerwise", calib_data=calib, plan_options=PLAN)
    names = list(result.plan.active)
    assert [c[0] for c in calls] == [[n] for n in names]
    assert [c[1] for c in calls] == [sorted(names[:i]) for i in range(len(names))]


def test_multistage_reaches_the_target_in_rounds_and_saves_like_one_shot(trained, tmp_path):
    model, data = trained
    x = data[0][:1]
    result = rc.compress(model, x, method="svd", target="macs=4x", schedule="multistage",
                         rounds=2, train_data=data, steps=10, val_data=data,
                         plan_options=PLAN, finetune_options=TUNE)
    assert [s["target"] for s in result.stages] == ["macs=0.5", "macs=0.25"]
    assert result.met_target
    assert count_macs(result.model, x) <= 0.25 * count_macs(model, x) * 1.01
    rc.save(result.model, tmp_path, plan=result.plan)
    again = rc.load(net(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(again.eval()(data[0][:8]), result.model.eval()(data[0][:8]),
                              atol=1e-5)


def test_multistage_stops_below_the_accuracy_floor(trained):
    model, data = trained
    classes = int(data[1].max()) + 1
    wrong = (data[0], (data[1] + 1) % classes)  # every label another: top-1 near 0%
    assert evaluate(model, wrong)["top1"] < 50
    result = rc.compress(model, data[0][:1], method="svd", target="macs=4x",
                         schedule="multistage", rounds=3, val_data=wrong, min_accuracy=50.0,
                         plan_options=PLAN)
    assert not result.met_target and len(result.stages) == 1
    assert "min_accuracy" in result.stages[0]["stopped"]


def test_densify_folds_factorized_layers_back_exactly(trained):
    model, data = trained
    small = rc.apply(model, rc.plan(model, data[0][:1], target="params=3x", **PLAN))
    dense = densify(small)
    assert not factorized(dense)
    with torch.no_grad():
        assert torch.allclose(dense.eval()(data[0][:16]), small.eval()(data[0][:16]), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target="macs=2x", schedule="greedy"), "schedule: expected one of"),
    (dict(rank=4, schedule="multistage"), "needs a target"),
    (dict(target="macs=2x", schedule="multistage", rounds=0), "rounds: expected"),
    (dict(target="macs=2x", min_accuracy=50), "min_accuracy: needs val_data"),
    # options a schedule would ignore
    (dict(target="macs=2x", min_accuracy=50, val_data=(torch.rand(2, 3, 8, 8),
                                                       torch.zeros(2, dtype=torch.long))),
     "min_accuracy: the floor of schedule 'multistage''s rounds; schedule 'one_shot'"),
    (dict(target="macs=2x", steps_per_layer=2), "steps_per_layer: .* schedule 'one_shot' would"),
])
def test_bad_compress_arguments(kwargs, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        rc.compress(model, torch.rand(1, 3, 8, 8), **kwargs)


def test_transfer_trains_only_a_new_head(trained):
    model, _ = trained
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 3, 8, 8, generator=g)
    y = (x[:, 2].mean((1, 2)) > 0).long() + 4 * (x[:, 0].mean((1, 2)) > 0).long()  # 0,1,4,5
    result = rc.transfer(model, (x, y), num_classes=6, epochs=5, **TUNE)
    new = result.model
    assert new[-1].out_features == 6 and model[-1].out_features == 4
    for (name, p), (_, q) in zip(model.named_parameters(), new.named_parameters(), strict=True):
        if not name.startswith("8."):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="head: the model has no module"):
        rc.transfer(model, (x, y), num_classes=6, head="fc")
    # steps alone (the default epochs gave "not both"); a factorized classifier is replaced
    # whole, not behind its frozen projection fitted to the old classes
    small = rc.apply(model, rc.Plan({"8": rc.LayerPlan("svd", (2,))}))
    moved = rc.transfer(small, (x, y), num_classes=6, steps=2, **TUNE).model
    assert type(moved[8]) is nn.Linear and moved[8].in_features == model[8].in_features
    assert moved[8].out_features == 6


def test_transfer_is_repeatable_from_its_seed(trained):
    """The new head's initial weights come from finetune's seed, not from whatever torch's
    global random state happens to be (seed 000's transfer runs gave other heads per call)."""
    model, _ = trained
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    heads = []
    for seed, noise in ((5, 1), (5, 2), (6, 1)):
        torch.manual_seed(noise)  # another global random state before each call
        out = rc.transfer(model, (x, y), num_classes=3, steps=1, seed=seed, **TUNE).model
        heads.append(out[-1].weight.detach())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    for bad in (None, "x", -1, 2**64):
        with pytest.raises(ValueError, match="seed: expected an int >= 0"):
            rc.transfer(model, (x, y), num_classes=3, steps=1, seed=bad, **TUNE)


def test_a_stream_as_train_data_is_refused_before_any_work(trained):
    model, _ = trained

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.randn(3, 8, 8), 0

    with pytest.raises(ValueError, match="train_data: an IterableDataset .* pass DataLoader"):
        rc.compress(model, torch.randn(1, 3, 8, 8), method="svd", rank=2,
                    train_data=Stream(), steps=1, plan_options=PLAN)


def test_models_with_cp_layers_fine_tune_at_the_cp_rate_unless_told(trained):
    model, data = trained
    kw = dict(method="cp", rank=8, train_data=data, steps=2, plan_options=PLAN)
    tune = {"batch_size": 32, "progress": False}
    cp = rc.compress(model, data[0][:1], finetune_options=tune, **kw)
    assert cp.stages[0]["train"]["lr"] == CP_SGD_LR
    told = rc.compress(model, data[0][:1], finetune_options={**tune, "lr": 0.05}, **kw)
    assert told.stages[0]["train"]["lr"] == 0.05
    unset = rc.compress(model, data[0][:1], finetune_options={**tune, "lr": None}, **kw)
    assert unset.stages[0]["train"]["lr"] == CP_SGD_LR  # None: not given, as finetune reads it
    svd = rc.compress(model, data[0][:1], method="svd", rank=4, train_data=data, steps=2,
                      plan_options=PLAN, finetune_options=tune)
    assert svd.stages[0]["train"]["lr"] == rc.train.DEFAULT_LR["sgd"]  # finetune's default


def _stop_at(step):
    return lambda info: info["step"] >= step


def _forbid(monkeypatch, *names):
    """Make rankcut.compress's planning (``"plan"``) or fitting (``"apply"``) fail if called."""
    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run planned or fitted again")

    module = importlib.import_module("rankcut.compress")
    for name in names:
        monkeypatch.setattr(*((module._Job, "plan") if name == "plan" else (module, name)),
                            refuse)


def test_one_shot_resumes_without_planning_or_fitting_again(trained, tmp_path, monkeypatch):
    """Killed mid fine-tuning and resumed, one_shot ends with the weights of a run never
    stopped, reading its plan and factorized model back instead of making them again."""
    model, data = trained
    x = data[0][:1]
    args = dict(target="macs=2x", train_data=data, steps=12, val_data=data, plan_options=PLAN)
    whole = rc.compress(model, x, finetune_options={**TUNE, "checkpoint_dir": tmp_path / "a"},
                        **args)
    ckpt = {**TUNE, "checkpoint_dir": tmp_path / "b", "checkpoint_every": 4, "resume": True}
    rc.compress(model, x, finetune_options={**ckpt, "callback": _stop_at(6)}, **args)
    assert (tmp_path / "b" / "start" / "plan.json").is_file()
    _forbid(monkeypatch, "plan", "apply")
    resumed = rc.compress(model, x, finetune_options=ckpt, **args)
    stage = resumed.stages[0]
    assert stage["resumed"] and stage["train"]["steps"] == 12
    assert stage["val_before"]["top1"] == whole.stages[0]["val_before"]["top1"]
    assert stage["val"]["loss"] < stage["val_before"]["loss"]
    assert resumed.plan.to_dict()["layers"] == whole.plan.to_dict()["layers"]
    for (k, v), w in zip(resumed.model.state_dict().items(), whole.model.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k


def test_a_checkpoint_dir_under_home_written_as_tilde_resumes(trained, tmp_path, monkeypatch):
    """"~/run" is the home folder's run for compress's stored plan and start model and for
    finetune's checkpoint and log alike (before, the stored plan was written under the home
    folder and looked for in a folder named "~" of the working directory: never resumed)."""
    model, data = trained
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    opts = {**TUNE, "checkpoint_dir": "~/run", "resume": True, "log": "~/train.jsonl"}
    first = rc.compress(model, data[0][:1], target="macs=2x", train_data=data, steps=2,
                        plan_options=PLAN, finetune_options=opts)
    run = tmp_path / "home" / "run"
    assert (run / "start" / "plan.json").is_file() and (run / "last.pt").is_file()
    assert (tmp_path / "home" / "train.jsonl").is_file() and not (tmp_path / "~").exists()
    again = rc.compress(model, data[0][:1], target="macs=2x", train_data=data, steps=2,
                        plan_options=PLAN, finetune_options=opts)
    assert again.stages[0]["resumed"]
    assert again.plan.to_dict()["layers"] == first.plan.to_dict()["layers"]


def test_a_fresh_run_clears_the_stages_an_earlier_run_left(trained, tmp_path):
    """Without resume, the stages an earlier run left in checkpoint_dir are removed before the
    run writes any: a later resume of this run must not read them (an earlier layerwise run's
    finished layer-4 holds a whole model over other layers 1-3). Files of other names stay."""
    model, data = trained
    for stale in ("layer-4", "round-2", "start"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "last.pt").write_bytes(b"an earlier run's")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "plan.json").write_text("{}")  # (perhaps the user's: kept)
    rc.compress(model, data[0][:1], target="macs=2x", train_data=data, steps=2,
                plan_options=PLAN, finetune_options={**TUNE, "checkpoint_dir": tmp_path})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.txt", "plan.json",
                                                          "start"]
    assert (tmp_path / "start" / "model.safetensors").is_file()
    assert not (tmp_path / "start" / "last.pt").exists()


def test_a_given_plan_whose_ranks_the_layers_cap_resumes(trained, tmp_path):
    """A CP rank past break-even is built at break-even (a warning) and stored so; the same
    plan given again resumes instead of being refused as another plan."""
    model, data = trained
    plan = rc.Plan({"2": rc.LayerPlan("cp", (500,), options={"max_iter": 5})})
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    with pytest.warns(UserWarning, match="clamped"):
        first = rc.compress(model, data[0][:1], plan=plan, train_data=data, steps=2,
                            finetune_options=opts)
    assert first.plan["2"].ranks == (500,)  # (as given; the start folder records the built)
    assert rc.load_plan(tmp_path / "start")["2"].ranks[0] < 500
    again = rc.compress(model, data[0][:1], plan=plan, train_data=data, steps=2,
                        finetune_options=opts)
    assert again.stages[0]["resumed"]
    with pytest.raises(ValueError, match="another plan"):  # another rank is still refused
        rc.compress(model, data[0][:1], train_data=data, steps=2, finetune_options=opts,
                    plan=rc.Plan({"2": rc.LayerPlan("cp", (8,), options={"max_iter": 5})}))


def test_a_given_tucker_plan_whose_core_caps_a_rank_resumes(trained, tmp_path):
    """Tucker-2 at (32, 1) on a 3x3 conv holds a core of at most 1·9 output ranks: built at
    (9, 1) (a warning) and stored so; the same plan given again resumes (it was refused as
    another plan, the core's bound not being among the caps)."""
    model, data = trained
    plan = rc.Plan({"2": rc.LayerPlan("tucker", (32, 1))})
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    with pytest.warns(UserWarning, match="core sizes"):
        rc.compress(model, data[0][:1], plan=plan, train_data=data, steps=2,
                    finetune_options=opts)
    assert rc.load_plan(tmp_path / "start")["2"].ranks == (9, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = rc.compress(model, data[0][:1], plan=plan, train_data=data, steps=2,
                            finetune_options=opts)
    assert again.stages[0]["resumed"]


def test_a_checkpoint_dir_of_another_models_run_is_refused_by_name(trained, tmp_path):
    model, data = trained
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data, steps=1,
                plan_options=PLAN, finetune_options=opts)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="resume: .*was planned for another model"):
        rc.compress(other, data[0][:1], method="svd", rank=2, train_data=data, steps=1,
                    plan_options=PLAN, finetune_options=opts)
    # the same architecture with other weights (the untrained net): its factorized start and
    # checkpoints would be continued as if they were this model's
    with pytest.raises(ValueError, match="resume: .*planned for a model with other weights"):
        rc.compress(net().eval(), data[0][:1], method="svd", rank=2, train_data=data, steps=1,
                    plan_options=PLAN, finetune_options=opts)
    again = rc.compress(model, data[0][:1], method="svd", rank=2, train_data=data, steps=1,
                        plan_options=PLAN, finetune_options=opts)
    assert again.stages[0]["resumed"]


def test_resuming_with_another_plan_is_refused(trained, tmp_path):
    model, data = trained
    x = data[0][:1]
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    first = rc.compress(model, x, target="macs=2x", train_data=data, steps=2, plan_options=PLAN,
                        finetune_options=opts)
    other = rc.plan(model, x, method="svd", rank=2, **PLAN)
    assert other.to_dict()["layers"] != first.plan.to_dict()["layers"]
    with pytest.raises(ValueError, match="another plan"):
        rc.compress(model, x, plan=other, train_data=data, steps=2, finetune_options=opts)
    # the settings edited between the runs: the stored plan is not used under the new ones
    for changed, said in (({"target": "macs=3x"}, "target macs=2x, this call asks for "
                           "target macs=3x"),
                          ({"target": "macs=2x", "method": "svd"}, "method 'auto'"),
                          ({"rank": 2}, "target macs=2x, this call asks for target None"),
                          ({"target": "macs=2x", "rank": "energy=0.9"},
                           "rank None, this call asks for rank energy=0.9")):
        with pytest.raises(ValueError, match=said):
            rc.compress(model, x, train_data=data, steps=2, plan_options=PLAN,
                        finetune_options=opts, **changed)
    # the same target written another way resumes
    again = rc.compress(model, x, target="macs=0.5", train_data=data, steps=2,
                        plan_options=PLAN, finetune_options=opts)
    assert again.stages[0]["resumed"]
    # a planning setting named at its default is no change
    named = rc.compress(model, x, target="macs=2x", train_data=data, steps=2,
                        plan_options={**PLAN, "rank_multiple": 1, "latency_margin": 0.0},
                        finetune_options=opts)
    assert named.stages[0]["resumed"]
    # other planning settings (layers excluded, min_params): refused, named, not ignored
    for changed in ({**PLAN, "exclude": ["0"]}, {**PLAN, "min_params": 50}):
        with pytest.raises(ValueError, match="was planned with other (exclude|min_params)"):
            rc.compress(model, x, target="macs=2x", train_data=data, steps=2,
                        plan_options=changed, finetune_options=opts)


def test_layerwise_resumes_each_layer_from_its_own_checkpoints(trained, tmp_path,
                                                               monkeypatch):
    model, data = trained
    x = data[0][:1]
    args = dict(method="svd", rank=4, schedule="layerwise", train_data=data, steps_per_layer=3,
                steps=4, plan_options=PLAN)
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    first = rc.compress(model, x, finetune_options=opts, **args)
    names = list(first.plan.active)
    assert sorted(p.name for p in tmp_path.glob("layer-*")) == [
        f"layer-{i}" for i in range(1, len(names) + 1)]
    _forbid(monkeypatch, "plan")
    steps = []  # every stage read back from its checkpoint: not one training step again
    again = rc.compress(model, x, finetune_options={
        **opts, "callback": lambda info: steps.append(info["step"]) is None and False}, **args)
    assert steps == []
    for (k, v), w in zip(again.model.state_dict().items(), first.model.state_dict().values(),
                         strict=True):
        assert torch.equal(v, w), k


def test_a_run_killed_while_saving_its_start_fits_again_from_the_stored_plan(trained, tmp_path,
                                                                            monkeypatch):
    """Killed after the factorized weights were written but before the plan recording their
    hash: the resumed run fits the stored plan again (no planning) instead of failing."""
    model, data = trained
    x = data[0][:1]
    opts = {**TUNE, "checkpoint_dir": tmp_path, "resume": True}
    args = dict(target="macs=2x", train_data=data, steps=2, plan_options=PLAN)
    rc.compress(model, x, finetune_options={**opts, "callback": _stop_at(1)}, **args)
    start = tmp_path / "start" / "plan.json"
    plan = rc.load_plan(start)
    plan.meta.pop("weights_sha256")
    start.write_text(plan.to_json())
    _forbid(monkeypatch, "plan")
    resumed = rc.compress(model, x, finetune_options=opts, **args)
    assert "resumed" not in resumed.stages[0] and resumed.stages[0]["train"]["steps"] == 2
    assert "weights_sha256" in rc.load_plan(start).meta


def test_multistage_returns_its_rounds_when_a_later_target_is_out_of_reach(tmp_path,
                                                                          monkeypatch):
    """The final target beyond the cheapest plan: the rounds done (planned, fitted and
    fine-tuned) are returned, met_target False, the round that could not be planned saying
    why, instead of an error that threw them away. Resumed, the run stops at the same round
    without planning it again (a latency guard's verdict depends on timings)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4)).eval()
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def run():
        return rc.compress(model, x[:1], method="svd", target="params=0.05",
                           schedule="multistage", rounds=3, train_data=(x, y), steps=2,
                           progress=False,
                           plan_options={"allow_slower": True, "min_params": 10},
                           finetune_options={"batch_size": 16, "progress": False,
                                             "checkpoint_dir": tmp_path, "resume": True})

    result = run()
    assert not result.met_target and result.plan.active
    assert "cannot be met" in result.stages[-1]["stopped"]
    assert [s.get("train") is not None for s in result.stages[:-1]] == [True, True]
    refused = [p.parent.name for p in tmp_path.rglob("refused.json")]
    assert refused == [f"round-{len(result.stages)}"]
    compress_module = importlib.import_module("rankcut.compress")
    planned = compress_module._Job.plan
    rounds_planned = []

    def counting(job, target, **kw):
        rounds_planned.append(target)
        return planned(job, target, **kw)

    monkeypatch.setattr(compress_module._Job, "plan", counting)
    again = run()
    assert rounds_planned == []  # the stored plans, and the stored refusal
    assert again.stages[-1]["stopped"] == result.stages[-1]["stopped"]
    assert again.stages[-1]["resumed"] and not again.met_target


def _small_mlp_run(**finetune_options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 3))
    x, y = torch.randn(64, 64), torch.randint(0, 3, (64,))
    return lambda **more: rc.compress(
        model, x[:1], method="svd", rank=8, schedule="layerwise", train_data=(x, y),
        steps_per_layer=3, steps=2, distill=True, progress=False,
        plan_options={"allow_slower": True},
        finetune_options={"batch_size": 8, **finetune_options, **more})


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_stage_stopped_by_the_callback_ends_compress_and_resume_finishes_it(tmp_path):
    """The later layers are not factorized on the half-trained model (their checkpoints
    would then be loaded whole on resume, overwriting what the resume finished)."""
    run = _small_mlp_run()
    whole = run()
    stopped = run(checkpoint_dir=tmp_path, callback=lambda info: info["step"] == 2)
    assert not stopped.met_target and stopped.stages[-1]["train"]["stopped"]
    assert [s["train"]["steps"] for s in stopped.stages] == [2]
    assert list(stopped.plan.active) == stopped.stages[0]["layers"]  # what was applied
    resumed = run(checkpoint_dir=tmp_path, resume=True)
    assert resumed.met_target and _same(resumed.model, whole.model)


def test_each_stage_keeps_its_own_log(tmp_path):
    log = tmp_path / "train.jsonl"
    _small_mlp_run(log=log, log_every=1)()
    lines = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("*.jsonl")}
    # (the two 64 x 64 layers are planned; the 64 -> 3 head is under min_params)
    assert lines == {"train.jsonl": 2, "train-layer-1.jsonl": 3, "train-layer-2.jsonl": 3}


def test_finetune_option_values_are_checked_before_planning(monkeypatch):
    import sys

    def no_planning(*args, **kwargs):
        raise AssertionError("planned before the options were checked")

    monkeypatch.setattr(sys.modules["rankcut.compress"], "make_plan", no_planning)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    for options, words in (({"lr": -1.0}, "finetune_options: lr: expected a finite number"),
                           ({"optimizer": "adamx"}, "finetune_options: optimizer")):
        with pytest.raises(ValueError, match=words):
            rc.compress(model, x[:1], method="svd", rank=2, train_data=(x, y), steps=1,
                        finetune_options=options)


@pytest.mark.parametrize("kind", ["SlowerThanDense", "TargetUnreachable", "ValueError"])
def test_a_planning_error_on_rank_0_keeps_its_kind_on_every_process(monkeypatch, kind):
    """Distributed, rank 0 plans and broadcasts the plan or its error: the other processes
    raise the same kind (a sweep skips an unreachable target; the demo retries a slower one)."""
    import torch.distributed as dist

    C = importlib.import_module("rankcut.compress")
    from rankcut.select import SlowerThanDense, TargetUnreachable

    errors = {"SlowerThanDense": SlowerThanDense, "TargetUnreachable": TargetUnreachable,
              "ValueError": ValueError}
    sent = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def fail():
        raise errors[kind]("target: no plan")

    for rank in (0, 1):  # rank 0 fills the box; rank 1 receives what it sent
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "broadcast_object_list",
                            lambda box, src, rank=rank: sent.append(box[0]) if rank == 0
                            else box.__setitem__(0, sent[0]))
        with pytest.raises(errors[kind], match="target: no plan") as raised:
            C._agreed(fail)
        assert type(raised.value) is errors[kind]


def test_layerwise_layers_train_on_other_batches_than_the_layers_before():
    """Each layer's few steps restart a sampler: with one seed for all of them, every layer
    trained on the same first batches (seed 000's 54 x 20 steps saw 20 batches)."""
    from torch.utils.data import Dataset

    class Seen(Dataset):
        def __init__(self, x, y):
            self.x, self.y, self.read = x, y, []

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

        def __getitems__(self, indices):  # (the DataLoader's batch reads: not the checks')
            self.read.extend(indices)
            return [self[i] for i in indices]

    model, (x, y) = net().eval(), task(64)
    data = Seen(x, y)
    result = rc.compress(model, x[:1], method="svd", rank=4, schedule="layerwise",
                         train_data=data, steps_per_layer=1, plan_options=PLAN,
                         finetune_options={**TUNE, "batch_size": 8})
    per_layer = [sorted(data.read[8 * i:8 * i + 8]) for i in range(len(result.stages))]
    assert len(per_layer) >= 2 and len(data.read) == 8 * len(per_layer)
    assert len({tuple(b) for b in per_layer}) == len(per_layer), per_layer


def test_a_latency_plan_that_missed_its_goal_is_not_a_met_target(trained):
    """A latency= plan measured slower than its goal (kept by the planner, with a warning,
    when it still beats dense) is reported as such: met_target False; within it, True."""
    model, data = trained
    x = data[0][:1]
    for ratio, met in ((0.62, False), (0.48, True)):
        plan = rc.Plan({"2": rc.LayerPlan("svd", (4,))},
                       meta={"target": "latency=2x",
                             "latency": {"goal_ratio": 0.5, "ratio": ratio}})
        assert rc.compress(model, x, plan=plan).met_target is met
    assert rc.compress(model, x, plan=rc.Plan({"2": rc.LayerPlan("svd", (4,))})).met_target
