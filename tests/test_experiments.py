"""experiments/reproduce.py: a config's runs end in result.json and a loadable results folder,
and a finished run is not run again. On the real data (skipped without it)."""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import rankcut as rc
from rankcut import data as D
from rankcut.models import create
from rankcut.select import TargetUnreachable
from rankcut.train import evaluate

from .conftest import REPO

CONFIG = """
model: resnet20_cifar
method: svd
rank: 8
calib: 32
test_limit: 300
steps: 3
batch_size: 8
checkpoint_every: 2
latency: [2]
keep: {keep}
runs:
  tiny:
    export: {export}
  again:
    start_from: tiny
    steps: 2
  head:
    steps: null
    transfer: {{data: mnist, epochs: 1, train_limit: 64, test_limit: 100}}
  head2:
    steps: null
    start_from: head
    transfer: {{data: mnist, epochs: 1, train_limit: 32, test_limit: 100}}
  scratch:
    weights: {scratch}
    train: {{steps: 2, lr: 0.01}}
    latency: []
"""


def reproduce(config, runs, env):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                           str(config), "--runs-dir", str(runs), "--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_a_run_is_measured_exported_and_not_run_twice(resnet20_weights, shared_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    export = tmp_path / "results" / "tiny"
    scratch = tmp_path / "weights" / "r20.safetensors"
    keep = tmp_path / "kept"
    config.write_text(CONFIG.format(export=export, scratch=scratch, keep=keep))
    env = {**os.environ, "RANKCUT_DATA": str(shared_data)}
    done = reproduce(config, tmp_path / "runs", env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "runs" / "tiny" / "tiny" / "result.json").read_text())
    assert result["params"] < result["dense_params"] and result["macs_x"] > 1
    assert set(result["layers"]) == {"svd"}
    # the teacher's outputs are kept for the config's later runs on the same batches, one file
    # per teacher (the pretrained model; the "scratch" run's model trained here)
    shards = (tmp_path / "runs" / "tiny" / "teacher-outputs").glob("*.safetensors")
    assert len({f.name.rsplit("-", 1)[0] for f in shards}) == 2
    assert 0 < result["before_top1"] <= 100 and 0 < result["after_top1"] <= 100
    assert result["test_images"] == 300
    assert [(t["batch"], t["form"]) for t in result["latency"]] == [(2, "plain"), (2, "fused")]
    assert all(t["speedup"] == t["dense_ms"] / t["compressed_ms"] > 0 for t in result["latency"])
    # the exported folder is what a user loads from the model's name alone
    test = D.dataset("cifar10", "test", root=shared_data,
                     transform=D.transforms("cifar10", train=False,
                                            normalization="resnet20_cifar"), limit=300)
    loaded = rc.load(create("resnet20_cifar"), export)
    assert evaluate(loaded, test)["top1"] == result["export"]["top1_loaded"]
    assert abs(result["export"]["top1_loaded"] - result["after_top1"]) <= 0.1
    stamp = (tmp_path / "runs" / "tiny" / "tiny" / "result.json").stat().st_mtime_ns
    rerun = reproduce(config, tmp_path / "runs", env)
    assert rerun.returncode == 0 and "finished earlier" in rerun.stdout
    assert (tmp_path / "runs" / "tiny" / "tiny" / "result.json").stat().st_mtime_ns == stamp
    assert "| tiny | svd | 8 |" in rerun.stdout
    again = json.loads((tmp_path / "runs" / "tiny" / "again" / "result.json").read_text())
    assert again["resumed"] and again["before_top1"] == result["before_top1"]
    assert again["params"] == result["params"] and again["steps"] == 2
    # its two steps read the first two batches of "tiny": the teacher's outputs were kept
    assert result["teacher_cache"] == {"hits": 0, "misses": 3}
    assert again["teacher_cache"] == {"hits": 2, "misses": 0}
    # an export asked for after the run finished is made from its saved model
    late = tmp_path / "results" / "again"
    config.write_text(CONFIG.format(export=export, scratch=scratch, keep=keep).replace(
        "    start_from: tiny", f"    start_from: tiny\n    export: {late}"))
    rerun = reproduce(config, tmp_path / "runs", env)
    assert rerun.returncode == 0 and "exported to" in rerun.stdout, rerun.stderr[-2000:]
    exported = json.loads((tmp_path / "runs" / "tiny" / "again" / "result.json").read_text())
    assert exported["export"]["folder"] == str(late)
    assert abs(exported["export"]["top1_loaded"] - again["after_top1"]) <= 0.1
    assert evaluate(rc.load(create("resnet20_cifar"), late), test)["top1"] == \
        exported["export"]["top1_loaded"]
    head = json.loads((tmp_path / "runs" / "tiny" / "head" / "result.json").read_text())
    for key in ("transfer", "transfer_dense"):
        assert head[key]["data"] == "mnist" and head[key]["test_images"] == 100
        assert 0 <= head[key]["top1"] <= 100
    assert head["transfer"]["backbone_params"] < head["transfer_dense"]["backbone_params"]
    assert head["before_top1"] == head["after_top1"]  # no fine-tuning on CIFAR-10
    # weights trained here from scratch when the file is missing, then compressed
    trained = json.loads((tmp_path / "runs" / "tiny" / "scratch" / "result.json").read_text())
    assert trained["trained_weights"]["recipe"]["steps"] == 2 and "latency" not in trained
    assert trained["trained_weights"] == json.loads(scratch.with_suffix(".json").read_text())
    assert trained["dense_top1"] == trained["trained_weights"]["top1"]
    assert abs(trained["dense_top1"] - result["dense_top1"]) > 30  # not the pretrained model
    from safetensors.torch import load_file

    built = create("resnet20_cifar", weights=scratch).state_dict()  # the file loads as saved
    stored = load_file(str(scratch))
    assert built.keys() == stored.keys() and all(torch.equal(built[k], stored[k].to(
        built[k].dtype)) for k in stored)
    assert f"| head | mnist | 8 | {head['transfer']['backbone_params']:,} |" in rerun.stdout
    assert head["ranks"] == {n: [8] for n in head["ranks"]} and len(head["ranks"]) == 18
    # a run without fine-tuning that starts from a finished one takes its model as it is
    head2 = json.loads((tmp_path / "runs" / "tiny" / "head2" / "result.json").read_text())
    assert head2["resumed"] and head2["ranks"] == head["ranks"]
    assert head2["params"] == head["params"] and head2["before_top1"] == head["after_top1"]
    assert head2["transfer"]["backbone_params"] == head["transfer"]["backbone_params"]
    # --only prints the runs selected; the summary files keep every finished run
    only = subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                           str(config), "--runs-dir", str(tmp_path / "runs"), "--only", "tiny",
                           "--summary"], capture_output=True, text=True, env=env, timeout=120)
    assert only.returncode == 0 and "| tiny |" in only.stdout and "| again |" not in only.stdout
    written = (keep / "summary.md").read_text()
    assert all(f"| {name} |" in written for name in ("tiny", "again", "scratch"))
    # every finished result is kept (the late export's included); a run folder lost with the
    # machine is summarized from its kept copy
    for name in ("tiny", "again", "head", "head2", "scratch"):
        copy = json.loads((keep / f"{name}.json").read_text())
        folder = tmp_path / "runs" / "tiny" / name
        assert copy.pop("settings") == json.loads((folder / "settings.json").read_text())
        assert copy == json.loads((folder / "result.json").read_text())
    shutil.rmtree(tmp_path / "runs" / "tiny" / "tiny")
    lost = subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                           str(config), "--runs-dir", str(tmp_path / "runs"), "--summary"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert lost.returncode == 0 and "| tiny | svd | 8 |" in lost.stdout, lost.stderr[-2000:]
    # and it is finished: not run again (its result is committed; its folder held hours)
    rerun = reproduce(config, tmp_path / "runs", env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "[tiny] finished earlier (its folder is gone" in rerun.stdout
    assert not (tmp_path / "runs" / "tiny" / "tiny").exists()
    # a folder of an unfinished run beside the kept result that says it finished: refused
    (tmp_path / "runs" / "tiny" / "tiny" / "checkpoints").mkdir(parents=True)
    both = reproduce(config, tmp_path / "runs", env)
    assert both.returncode != 0 and "holds an unfinished run of it" in both.stderr


def test_a_runs_mapping_setting_changes_the_keys_it_names_the_shared_ones_kept():
    """A run's plan_options replaced the config's whole: the shared latency_batch was dropped
    from the run that only added rank_multiple (and nothing said so)."""
    reproduce_ = _reproduce_module()
    config = {"model": "resnet20_cifar", "plan_options": {"latency_batch": 32, "loss_aware": True},
              "finetune_options": {"lr": 1e-3},
              "runs": {"r": {"plan_options": {"rank_multiple": 8, "loss_aware": False},
                             "epochs": 2}, "plain": None}}
    s = reproduce_.settings_of(config, "r")
    assert s["plan_options"] == {"latency_batch": 32, "loss_aware": False, "rank_multiple": 8}
    assert s["finetune_options"] == {"lr": 1e-3} and s["epochs"] == 2
    assert reproduce_.settings_of(config, "plain")["plan_options"] == config["plan_options"]
    assert config["plan_options"] == {"latency_batch": 32, "loss_aware": True}  # not changed

def test_a_config_keeps_results_in_a_folder_it_names(tmp_path):
    """keep: a folder (text); anything else is refused by name; a kept copy is read when the
    run folder is gone, the folder's own result first."""
    reproduce_ = _reproduce_module()
    assert reproduce_.config_keep({"runs": {}}, tmp_path / "c.yaml") is None
    assert reproduce_.config_keep({"keep": "results/runs/c"}, tmp_path / "c.yaml") == \
        reproduce_.Path("results/runs/c")
    for bad in (3, "", ["a"]):
        with pytest.raises(SystemExit, match="keep: expected a folder"):
            reproduce_.config_keep({"keep": bad}, tmp_path / "c.yaml")
    keep, base = tmp_path / "kept", tmp_path / "runs"
    s = reproduce_.settings_of({"model": "resnet20_cifar", "runs": {"r": {"rank": 4}}}, "r")
    assert reproduce_.result_of(base, keep, "r") is None
    reproduce_.pin_settings(base / "r", "r", s)
    (base / "r" / "result.json").write_text('{"a": 1}')
    reproduce_.kept(keep, "r", base / "r")
    assert json.loads((keep / "r.json").read_text()) == {"a": 1,
                                                          "settings": reproduce_.pinned(s)}
    assert reproduce_.result_of(base, keep, "r", s) == base / "r" / "result.json"
    # the folder's result of other settings is refused too (the summary leaves it out)
    with pytest.raises(SystemExit, match=r"was made with other settings \(\['rank'\]"):
        reproduce_.result_of(base, keep, "r", {**s, "rank": 8})
    shutil.rmtree(base / "r")
    assert reproduce_.result_of(base, keep, "r", s) == keep / "r.json"
    # a kept result of other settings is not this run's: refused as a folder's would be
    with pytest.raises(SystemExit, match=r"kept result .* made with other settings \(\['rank'\]"):
        reproduce_.result_of(base, keep, "r", {**s, "rank": 8})
    assert reproduce_.result_of(base, keep, "r") == keep / "r.json"  # (not compared)
    reproduce_.kept(None, "r", base / "r")  # no keep: nothing to do


def test_weights_trained_by_another_recipe_are_refused(tmp_path):
    """A weights file trained here by another recipe than the config's, or a training in
    progress under another recipe, stops the run before any work instead of being used (or
    resumed) as if the config had made it."""
    import yaml

    reproduce_ = _reproduce_module()
    weights = tmp_path / "w.safetensors"
    config = yaml.safe_load(CONFIG.format(export=tmp_path / "e", scratch=weights,
                                          keep=tmp_path / "k"))
    s = reproduce_.settings_of(config, "scratch")
    recipe = {"batch_size": 8, "seed": 0, "steps": 2, "lr": 0.01}
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(json.dumps({"recipe": {**recipe, "lr": 0.1}}))
    with pytest.raises(SystemExit, match="trained by the recipe"):
        reproduce_.trained_weights(s, tmp_path, "cpu")
    weights.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "top1": 50.0}))
    assert reproduce_.trained_weights(s, tmp_path, "cpu")["top1"] == 50.0  # the same recipe
    # the same recipe on other inputs: here another training augmentation
    weights.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "augment": "shift"}))
    with pytest.raises(SystemExit, match=r"trained with other \['augment'\]"):
        reproduce_.trained_weights(s, tmp_path, "cpu")
    weights.with_suffix(".json").write_text(json.dumps({"recipe": recipe, "top1": 50.0}))
    weights.unlink()
    folder = tmp_path / "w-training"
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps({**recipe, "steps": 5}))
    with pytest.raises(SystemExit, match="in progress there"):
        reproduce_.trained_weights(s, tmp_path, "cpu")
    # weights without their record beside a training folder: a run killed between the two
    # writes, so the training resumes (here refused: its recipe differs) instead of taking the
    # weights for a user's own file
    weights.write_bytes(b"")
    weights.with_suffix(".json").unlink()
    with pytest.raises(SystemExit, match="in progress there"):
        reproduce_.trained_weights(s, tmp_path, "cpu")
    # the same recipe in progress on other inputs (another augmentation) is refused too
    weights.unlink()
    inputs = {k: json.loads(json.dumps(s[k])) for k in reproduce_.TRAINED_ON}
    (folder / "recipe.json").write_text(json.dumps(
        {"recipe": recipe, "inputs": {**inputs, "augment": "shift"}}))
    with pytest.raises(SystemExit, match=r"other \['augment'\] is in progress there"):
        reproduce_.trained_weights(s, tmp_path, "cpu")
    weights.write_bytes(b"")
    (folder / "recipe.json").unlink()
    folder.rmdir()
    assert reproduce_.trained_weights(s, tmp_path, "cpu") is None  # a user's file: no record


def _reproduce_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reproduce", REPO / "experiments" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_config_passes_the_checks_made_before_any_run():
    import yaml

    reproduce_ = _reproduce_module()
    configs = sorted((REPO / "experiments" / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        config = yaml.safe_load(path.read_text())
        for name in config["runs"]:
            reproduce_.check(config, name, reproduce_.settings_of(config, name))


def test_a_bad_run_is_refused_before_the_first_run_starts(tmp_path):
    import pytest

    reproduce_ = _reproduce_module()
    base = {"model": "resnet20_cifar", "runs": {"ok": {"rank": 8, "method": "svd"}}}
    bad = {
        "method": ({"method": "tensor_train"}, "method: expected one of"),
        "rank": ({"rank": "energy=2"}, "energy"),
        "target": ({"target": "macs=0.5x"}, "target: expected .*got 'macs=0.5x'"),
        "schedule": ({"schedule": "twice"}, "schedule: expected one_shot.*got 'twice'"),
        "latency": ({"latency": [0]}, r"latency: expected a list of batch sizes.*got \[0\]"),
        "test_limit": ({"test_limit": 0}, "test_limit: expected an integer >= 1.*got 0"),
        "options": ({"target": "params=3x", "sensitivity": {"options": {"method": "als"}}},
                    "solver"),
        "sens-key": ({"target": "params=3x", "sensitivity": {"lambda": 0.5}}, "lambda"),
        "transfer": ({"transfer": {"epochs": 1}}, "data"),
        "transfer-text": ({"transfer": "mnist"}, "mapping"),
        "match": ({"match_params": "nothing"}, "nothing"),
        "model": ({"model": "resnet21_cifar"}, "model: unknown name 'resnet21_cifar'"),
        "model-number": ({"model": 5}, "model: unknown name 5"),
        "train-pretrained": ({"train": {"epochs": 1}}, "weights: FILE"),
        "train-key": ({"weights": "w.safetensors", "train": {"epoch": 1}}, "epoch"),
        "epochs-negative": ({"epochs": -1}, "epochs: expected an integer >= 1"),
        "epochs-word": ({"epochs": "one"}, "epochs: expected an integer"),
        "epochs-and-steps": ({"epochs": 1, "steps": 10}, "not both"),
        "lr-word": ({"lr": "fast"}, "lr: expected a number > 0"),
        "batch-0": ({"batch_size": 0}, "batch_size"),
        "calib-negative": ({"calib": -5}, "calib: expected an integer >= 0, got -5"),
        "seed-word": ({"seed": "x"}, "seed: expected an integer >= 0, got 'x'"),
        "checkpoint-every-0": ({"checkpoint_every": 0}, "checkpoint_every"),
        "distill-string": ({"distill": "no"}, "distill: expected true or false"),
        "data-unknown": ({"data": "imagenet"}, "data: expected one of cifar10"),
        "augment-unknown": ({"augment": "crop"}, "augment: expected one of standard, none"),
        "plan-options-list": ({"plan_options": [1]}, "plan_options: expected a mapping"),
        "plan-options-typo": ({"plan_options": {"allow_slowr": True}}, "allow_slowr"),
        "finetune-options-typo": ({"finetune_options": {"lrr": 0.1}}, "lrr"),
        # keys the run sets itself: resume false planned and trained again on every invocation
        "finetune-managed": ({"finetune_options": {"resume": False}},
                             r"\['resume'\]: set by the run itself"),
        "start-from-layerwise": ({"schedule": "layerwise", "start_from": "ok"},
                                 "start_from: only with schedule: one_shot"),
        "export-bool": ({"export": True}, "export: expected a folder name, got True"),
        "weights-null": ({"weights": None}, "weights: expected 'pretrained' or a file"),
        "weights-missing": ({"weights": "missing.safetensors"},
                            "weights: missing.safetensors: no such file"),
        # transfer's values are first read after the backbone is compressed: checked before
        "transfer-epochs-word": ({"transfer": {"data": "mnist", "epochs": "two"}},
                                 "transfer: epochs: expected an integer >= 1"),
        "transfer-lr-string": ({"transfer": {"data": "mnist", "lr": "5e-3"}},
                               "transfer: lr: expected a number > 0 .YAML reads 5e-3"),
        "transfer-data": ({"transfer": {"data": "imagenet"}}, "transfer: data: expected one of"),
        # values finetune or the transforms would refuse only when the run reaches them
        "train-epochs-0": ({"weights": "w.safetensors", "train": {"epochs": 0}},
                           "train: epochs: expected an int >= 1"),
        "train-lr-word": ({"weights": "w.safetensors", "train": {"lr": "fast"}},
                          "train: lr: expected a finite number"),
        "finetune-optimizer": ({"finetune_options": {"optimizer": "adamx"}},
                               "finetune_options: optimizer: expected one of"),
        "normalization-bad": ({"normalization": [[0.5], "x"]}, "normalization"),
        "start-from-list": ({"start_from": ["ok"]}, "start_from: expected the name of a run"),
        "match-list": ({"match_params": ["ok"]}, "match_params: expected the name of a run"),
        "allow-slower-twice": ({"rank": 4, "plan_options": {"allow_slower": False}},
                               r"plan_options: \['allow_slower'\]: the run's own key"),
        "lr-twice": ({"rank": 4, "lr": 0.01, "finetune_options": {"lr": 0.1}},
                     r"finetune_options: \['lr'\]: the run's own key"),
        "method-list": ({"method": ["svd", "cp"], "rank": 4},
                        r"method: expected a method's name, got \['svd', 'cp'\]"),
        "transfer-limit-below-batch": ({"rank": 4, "transfer": {"data": "mnist",
                                                                 "train_limit": 100}},
                                       "transfer: train_limit: 100 images are fewer than one "
                                       "batch of 128"),
        # refused by rc.compress (or the sensitivity plan) after the model and data were loaded
        # and the runs before it had run
        "no-target": ({"method": "cp", "lr": 0.005}, "target: give a target"),
        "multistage-rank": ({"schedule": "multistage", "rank": 4},
                            "schedule: multistage needs a target"),
        "sequential-no-calib": ({"rank": 4, "calib": 0, "sequential": True},
                                "sequential: needs calibration images"),
        "sens-macs": ({"target": "macs=3x", "sensitivity": {"lam": 0.5}},
                      "sensitivity: needs a params target"),
        "sens-lam": ({"target": "params=3x", "sensitivity": {"lam": 1.5}},
                     r"sensitivity: lam: expected a number in \[0, 1\], got 1.5"),
        "sens-trial-rank": ({"target": "params=3x", "sensitivity": {"trial_rank": 0}},
                            "sensitivity: trial_rank: expected an integer >= 1"),
        "sens-no-calib": ({"target": "params=3x", "calib": 0, "sensitivity": {"lam": 0.5}},
                          "sensitivity: needs calibration images"),
    }
    for key, (own, words) in bad.items():
        config = {**base, "runs": {**base["runs"], key: own}}
        with pytest.raises(SystemExit, match=words) as refused:
            reproduce_.check(config, key, reproduce_.settings_of(config, key))
        assert ": model: model:" not in str(refused.value)  # the key is named once
        assert ": method: method:" not in str(refused.value)
    # a dataset spelled as the command line accepts it passes
    config = {**base, "runs": {"fm": {"rank": 8, "method": "svd", "data": "Fashion-MNIST"}}}
    reproduce_.check(config, "fm", reproduce_.settings_of(config, "fm"))
    # on the command line: refused with that message before "ok", listed first, runs
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet20_cifar\nruns:\n  ok: {rank: 8, method: svd}\n"
                    "  late: {method: tensor_train}\n")
    done = reproduce(path, tmp_path / "runs", {**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0 and "tensor_train" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_model_that_does_not_fit_its_weights_or_data_is_refused_before_the_first_run(
        tmp_path):
    """Built as the run builds it: a class count that is not the data's, or a weights file of
    another model, was found only when the run was reached (after the runs before it)."""
    import pytest
    from safetensors.torch import save_file

    from rankcut.models import create

    reproduce_ = _reproduce_module()

    def settings(**own):
        config = {"model": "resnet20_cifar", "runs": {"r": {"rank": 8, **own}}}
        return reproduce_.settings_of(config, "r")

    fit = tmp_path / "fit.safetensors"
    save_file(create("resnet20_cifar", num_classes=100).state_dict(), str(fit))
    other = tmp_path / "other.safetensors"
    save_file(create("resnet20_cifar", num_classes=10).state_dict(), str(other))
    ok = {"a": settings(weights=str(fit), num_classes=100, data="cifar100"),
          "b": settings(weights=str(tmp_path / "made-later.safetensors"), num_classes=10,
                        train={"epochs": 1})}  # not made yet: built without weights
    reproduce_.check_models(ok, tmp_path)
    with pytest.raises(SystemExit, match=r"run 'c': resnet20_cifar has 100 outputs "
                                         r"\(num_classes: 100\), but cifar10 has 10 classes"):
        reproduce_.check_models({"c": settings(weights=str(fit), num_classes=100)}, tmp_path)
    with pytest.raises(SystemExit, match=r"run 'd': model: weights: .*other.safetensors"):
        reproduce_.check_models({"d": settings(weights=str(other), num_classes=100,
                                               data="cifar100")}, tmp_path)
    with pytest.raises(SystemExit, match=r"run 'e': model: weights: .*not found"):
        reproduce_.check_models({"e": settings()}, tmp_path)  # no pretrained file under root


def test_a_config_file_that_is_no_config_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    import pytest

    reproduce_ = _reproduce_module()
    files = {"missing.yaml": None, "folder": "dir", "broken.yaml": "runs: [\n",
             "number-run.yaml": "model: resnet20_cifar\nruns: {r: 5}\n",
             "number-name.yaml": "model: resnet20_cifar\nruns: {50: {rank: 8}}\n",
             # a run block copied and not renamed replaced the first in silence
             "twice.yaml": "model: resnet20_cifar\nruns:\n  a: {rank: 8}\n  a: {rank: 4}\n",
             "setting-twice.yaml": "model: resnet20_cifar\nruns:\n  a: {rank: 8, rank: 4}\n"}
    words = {"missing.yaml": "no such config file", "folder": "no such config file",
             "broken.yaml": "not valid YAML", "number-run.yaml": "each run is a mapping",
             "number-name.yaml": r"runs \[50\]: a run's name is text",
             "twice.yaml": r"not valid YAML \(line 4\): key 'a' given twice",
             "setting-twice.yaml": r"not valid YAML \(line 3\): key 'rank' given twice"}
    for name, text in files.items():
        path = tmp_path / name
        if text == "dir":
            path.mkdir()
        elif text is not None:
            path.write_text(text)
        monkeypatch.setattr("sys.argv", ["reproduce.py", str(path)])
        with pytest.raises(SystemExit, match=words[name]):
            reproduce_.command_line("doc", "only", "summary")


def test_a_finished_match_params_run_is_refused_when_its_match_was_redone(tmp_path):
    reproduce_ = _reproduce_module()

    def finished(name, result):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / reproduce_.RESULT).write_text(json.dumps(result))

    s = {"match_params": "base", "target": None, "rank": None}
    reproduce_.check_still_matched(tmp_path, None, "auto", s)  # nothing finished: nothing to check
    finished("base", {"params": 250, "dense_params": 1000})
    finished("auto", {"target": reproduce_.matched_target(tmp_path, None, "auto", s)})
    reproduce_.check_still_matched(tmp_path, None, "auto", s)
    finished("base", {"params": 300, "dense_params": 1000})  # redone, at another size
    with pytest.raises(SystemExit, match="made at params=0.250000 to match 'base', which now "
                                         "keeps params=0.300000"):
        reproduce_.check_still_matched(tmp_path, None, "auto", s)
    reproduce_.check_still_matched(tmp_path, None, "auto", {**s, "match_params": None})


def test_runs_share_a_dense_transfer_baseline_only_under_the_same_head_settings(tmp_path):
    reproduce_ = _reproduce_module()
    s = {"model": "resnet56_cifar", "transfer": {"data": "mnist"}, "batch_size": 128,
         "weights": "pretrained"}
    path, made = reproduce_.dense_transfer(tmp_path / "p0.1", s)
    assert path.name.startswith("dense-transfer-resnet56_cifar-mnist-") and made["epochs"] == 2
    assert reproduce_.dense_transfer(tmp_path / "p0.5", s)[0] == path  # shared
    assert reproduce_.dense_transfer(tmp_path / "p0.5", {**s, "seed": 0})[0] == path
    for changed in ({"transfer": {"data": "mnist", "epochs": 3}}, {"batch_size": 64},
                    {"weights": "w.safetensors"}, {"seed": 1}, {"image_size": 28}):
        assert reproduce_.dense_transfer(tmp_path / "p0.5", {**s, **changed})[0] != path


def test_a_start_from_run_must_agree_on_what_made_the_model_it_takes(tmp_path):
    reproduce_ = _reproduce_module()
    s = {**reproduce_.SETTINGS, "model": "resnet56_cifar", "method": "cp", "rank": "params=0.1",
         "transfer": {"data": "fashion_mnist"}}
    reproduce_.pin_settings(tmp_path / "fmnist-p0.1", "fmnist-p0.1", s)
    same = {**s, "transfer": {"data": "mnist"}, "start_from": "fmnist-p0.1"}
    reproduce_.check_start_from(tmp_path / "mnist-p0.1", "mnist-p0.1", same)
    with pytest.raises(SystemExit, match=r"made its model with other \['rank'\]"):
        reproduce_.check_start_from(tmp_path / "mnist-p0.5", "mnist-p0.5",
                                    {**same, "rank": "params=0.5"})


def test_a_start_from_run_needs_a_source_that_makes_its_model_or_its_own_copy(tmp_path):
    """Refused before any run starts: a source that has not made its model and does not run
    earlier, or whose folder is gone (a kept result holds no model); not refused: a run that
    holds its own copy of the model (resumed, or carried from another machine)."""
    reproduce_ = _reproduce_module()
    base, keep = tmp_path / "runs", tmp_path / "kept"
    s = {**reproduce_.SETTINGS, "model": "resnet20_cifar", "start_from": "a", "epochs": 2}
    check = reproduce_.check_start_source
    with pytest.raises(SystemExit, match="names the run itself"):
        check(base, keep, "a", {**s, "start_from": "a"}, [], False)
    with pytest.raises(SystemExit, match="has not made its model yet"):
        check(base, keep, "b", s, [], False)
    check(base, keep, "b", s, ["a"], False)  # a runs first in this invocation
    check(base, keep, "b", s, [], True)  # b finished: nothing to take
    keep.mkdir()
    (keep / "a.json").write_text("{}")  # a finished on another machine: only its result left
    with pytest.raises(SystemExit, match="its folder is gone"):
        check(base, keep, "b", s, ["a"], False)
    (base / "b" / "checkpoints" / "start").mkdir(parents=True)  # b's own copy (carried)
    check(base, keep, "b", s, ["a"], False)
    check(base, keep, "b", s, [], False)


def test_a_start_from_run_may_take_the_model_of_a_match_params_run(tmp_path):
    """The match_params run's settings are kept with its target null (filled in from the
    matched run's result after): a run starting from it, with the same match_params, agrees."""
    reproduce_ = _reproduce_module()
    s = {**reproduce_.SETTINGS, "model": "resnet56_cifar", "match_params": "tucker"}
    reproduce_.pin_settings(tmp_path / "auto", "auto", s)
    later = {**s, "target": "params=2.81x", "start_from": "auto", "epochs": 3}
    reproduce_.check_start_from(tmp_path / "auto-e3", "auto-e3", later)
    with pytest.raises(SystemExit, match=r"other \['calib'\]"):
        reproduce_.check_start_from(tmp_path / "auto-e3", "auto-e3", {**later, "calib": 64})


def test_the_ratio_plot_keeps_datasets_and_weights_apart():
    """seed001_vgg11's runs are all vgg11_torchvision, on MNIST and CIFAR-10: one line must not
    join a 99% point to a 78% one, and each dense model gets its own dense line; a run
    fine-tuned at the default lr is not called "not fine-tuned"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reproduce_ = _reproduce_module()
    row = {"model": "vgg11_torchvision", "method": "auto", "epochs": 1, "lr": None,
           "params_x": 50.0}
    rows = [{**row, "data": "mnist", "dense_top1": 99.43, "after_top1": 99.4},
            {**row, "data": "mnist", "dense_top1": 99.43, "after_top1": 99.1, "params_x": 150.0},
            {**row, "data": "cifar10", "dense_top1": 78.76, "after_top1": 78.0}]
    fig, ax = plt.subplots()
    reproduce_._plot_ratios(ax, rows)
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 or
             line.get_label().startswith("vgg")]
    labels = sorted(line.get_label() for line in lines if not line.get_label().startswith("_"))
    assert len(labels) == 2 and all("1 ep, default lr" in label for label in labels), labels
    assert sorted(len(line.get_xdata()) for line in lines
                  if not line.get_label().startswith("_")) == [1, 2]
    dense = sorted({round(line.get_ydata()[0], 2) for line in ax.get_lines()
                    if line.get_label().startswith("_")})
    assert dense == [77.76, 78.76, 98.43, 99.43]
    plt.close(fig)


def test_summary_tables_and_plots_of_sensitivity_and_transfer_runs(tmp_path):
    reproduce_ = _reproduce_module()
    common = {"model": "resnet56_cifar", "method": "cp", "target": "params=3x", "rank": None,
              "params_x": 3.0, "macs_x": 2.5, "dense_top1": 92.7, "before_top1": 80.0,
              "after_top1": 91.0, "epochs": 1, "steps": None, "wall_s": 600.0, "commit": "c"}
    sens = [{**common, "name": f"lam{lam}", "ranks": {"a": [3], "b": [4 + i]},
             "sensitivity": {"lam": lam, "form": "cp3", "options": {"solver": "tpm"}}}
            for i, lam in enumerate((0.0, 0.5))]
    table = reproduce_.summary(sens)
    assert "| lam0.5 | resnet56_cifar | 0.5 | cp3 | tpm | 8 | 3.00 | 80.00 | 91.00 | 10 |" in table
    timed = {**sens[0], "latency": [{"batch": 1, "form": "plain", "speedup": 1.5},
                                    {"batch": 1, "form": "fused", "speedup": 1.25},
                                    {"batch": 32, "form": "fused", "speedup": 2.0}]}
    assert "| 1 | 1.25x b1, 2.00x b32 | 10 | c |" in reproduce_.summary([timed])
    noted = reproduce_.summary([{**sens[0], "note": "the 30-epoch recipe"}, sens[1]])
    assert "- lam0.0: the 30-epoch recipe" in noted and "- lam0.5:" not in noted
    moved = [{**common, "name": f"p{p}", "rank": f"params={p}", "target": None,
              "transfer": {"data": "mnist", "top1": 90.0 + p, "backbone_params": int(1e5 * p),
                           "test_images": 100},
              "transfer_dense": {"data": "mnist", "top1": 99.0, "backbone_params": 850000}}
             for p in (0.1, 0.5)]
    table = reproduce_.summary(moved)
    assert "| p0.5 | mnist | params=0.5 | 50,000 | 90.50 | 850,000 | 99.00 | 100 |" in table
    for rows in (sens, moved):
        path = reproduce_.plot(rows, tmp_path / "s.png")
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
        path.unlink()


SWEEP_CONFIG = """
model: resnet20_cifar
calib: 64
test_limit: 300
sweep:
  models: [r20]
  part: linear
  ratios: [1.5, 3]
  methods:
    svd: {}
    svd-data: {data: true, modes: [rule]}
    cur-leverage: {method: cur, options: {solver: leverage}, seeds: [0, 1], modes: [rule]}
  finetune: {series: [svd/rule], ratios: [1.5, 3, 6], tolerance: 100, batch_size: 64,
             train_limit: 256}
runs:
  r20: {method: svd, rank: 8}
"""


def _experiment(name: str):
    """experiments/<name>.py as a module (its sibling modules importable)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep_module():
    return _experiment("classifier_sweep")


def sweep(config, runs, env, *extra):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "classifier_sweep.py"),
                           str(config), "--runs-dir", str(runs), "--threads", "1", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def swept_once(tmp_path, name: str, text: str, shared_data, *extra):
    """(config, environment, sweep folder) after one successful sweep of config ``text``."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(text)
    env = {**os.environ, "RANKCUT_DATA": str(shared_data)}
    done = sweep(config, tmp_path / "runs", env, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    return config, env, tmp_path / "runs" / name / "sweep"


@pytest.mark.slow  # (six runs of the script, about 80 s on a slow 2-core machine; make test-all)
def test_classifier_sweep_points_match_the_whole_model_and_resume(resnet20_weights, shared_data,
                                                                 tmp_path):
    # --series sweeps only the series named, in their order; a later run adds the rest
    config, env, folder = swept_once(tmp_path, "sw", SWEEP_CONFIG, shared_data, "--no-finetune",
                                     "--series", "cur-leverage", "svd/target")
    lines = [json.loads(line) for line in (folder / "r20.jsonl").read_text().splitlines()]
    assert [(p["label"], p["mode"]) for p in lines[1:]] == (
        [("cur-leverage", "rule")] * 4 + [("svd", "target")] * 2)
    bad = sweep(config, tmp_path / "runs", env, "--series", "svd/global")
    assert bad.returncode != 0 and "--series: 'svd/global' is not a swept series" in bad.stderr
    rest = sweep(config, tmp_path / "runs", env, "--no-finetune")
    assert rest.returncode == 0 and "6 point(s) done earlier" in rest.stdout, rest.stderr[-2000:]
    lines = [json.loads(line) for line in (folder / "r20.jsonl").read_text().splitlines()]
    head, points = lines[0], lines[1:]
    # svd: 2 modes x 2 ratios; svd-data: 2 ratios; leverage CUR: 2 ratios x 2 seeds
    assert len(points) == 10 and head["part_params"] == 650 and head["test_images"] == 300
    commit = _reproduce_module().COMMIT
    for p in points:
        assert p["commit"] == commit  # the code that measured the point
        assert p["params"] < 650 and p["part_ratio"] == 650 / p["params"]
        assert p["whole_ratio"] == head["total_params"] / (head["total_params"] - 650 +
                                                           p["params"])
    # a point's top-1 (the part run on stored inputs) is the whole model's with that part
    test = D.dataset("cifar10", "test", root=shared_data,
                     transform=D.transforms("cifar10", train=False,
                                            normalization="resnet20_cifar"), limit=300)
    model = create("resnet20_cifar", weights=resnet20_weights).eval()
    assert abs(evaluate(model, test)["top1"] - head["dense_top1"]) < 1e-9
    x = test[0][0].unsqueeze(0)
    whole = rc.apply(model, rc.plan(model, x, method="svd", rank="params=3x", include=["linear"],
                                    allow_slower=True))
    svd3 = next(p for p in points if (p["label"], p["mode"], p["ratio"]) == ("svd", "rule", 3))
    assert abs(evaluate(whole, test)["top1"] - svd3["top1"]) < 1e-9
    assert svd3["top1"] < head["dense_top1"]  # rank 2 of 10 classes costs accuracy
    # leverage CUR samples: its two seeds pick different columns
    cur = [p for p in points if p["label"] == "cur-leverage" and p["ratio"] == 1.5]
    assert len(cur) == 2 and (cur[0]["params"], cur[0]["top1"]) != (cur[1]["params"],
                                                                     cur[1]["top1"])
    assert "| svd | rule | 1 |" in (folder / "r20.md").read_text()
    assert (folder / "r20.png").read_bytes()[:4] == b"\x89PNG"
    assert not (folder / "r20-finetuned.jsonl").exists()  # --no-finetune: the points only
    tuning = sweep(config, tmp_path / "runs", env)  # the fine-tuned stage, on a later run
    assert tuning.returncode == 0 and "10 point(s) done earlier" in tuning.stdout, \
        tuning.stderr[-2000:]
    # the fine-tuned stage: every swept ratio is within the (wide) tolerance, so the walk
    # starts at the largest, 3, and goes on to 6, past the sweep's ratios
    lines = (folder / "r20-finetuned.jsonl").read_text().splitlines()
    ft_head, tuned = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert ft_head["finetune"] == {"epochs": 1, "lr": 0.01, "batch_size": 64, "train_limit": 256,
                                   "tolerance": 100, "ratios": [1.5, 3, 6], "device": "cpu"}
    assert [(p["ratio"], p["start"], p["kept_before"]) for p in tuned] == [(3, True, True),
                                                                           (6, False, True)]
    # the fine-tuned point starts from the very model the sweep measured
    assert tuned[0]["top1_before"] == svd3["top1"] and tuned[0]["params"] == svd3["params"]
    assert tuned[1]["params"] < tuned[0]["params"]
    assert any(p["top1"] != p["top1_before"] for p in tuned)  # distillation moved it
    assert "Fine-tuned: 1 epoch(s)" in (folder / "r20.md").read_text()
    again = sweep(config, tmp_path / "runs", env)
    assert again.returncode == 0 and "10 point(s) done earlier" in again.stdout
    assert len((folder / "r20.jsonl").read_text().splitlines()) == 11
    assert "fine-tuned:" not in again.stdout
    assert len((folder / "r20-finetuned.jsonl").read_text().splitlines()) == 3
    # points of other settings are not mixed with these: refused, the file untouched
    config.write_text(SWEEP_CONFIG.replace("calib: 64", "calib: 32"))
    mixed = sweep(config, tmp_path / "runs", env)
    assert mixed.returncode != 0 and "other settings (['calib'] differ)" in mixed.stderr
    config.write_text(SWEEP_CONFIG.replace("solver: leverage", "solver: cx"))
    mixed = sweep(config, tmp_path / "runs", env)
    assert mixed.returncode != 0 and "['cur-leverage'] differ" in mixed.stderr
    assert len((folder / "r20.jsonl").read_text().splitlines()) == 11
    # a target below the smallest plan (650 params at rank 1 cost 84) ends its series, in the
    # file: the larger ratio is not planned, a rerun plans neither, the tables leave it out
    # (they would fail on a point without a top-1)
    config.write_text(SWEEP_CONFIG.replace("ratios: [1.5, 3]", "ratios: [1.5, 3, 20, 40]"))
    for run in range(2):
        ended = sweep(config, tmp_path / "runs", env, "--no-finetune", "--series", "svd/target")
        assert ended.returncode == 0, ended.stderr[-2000:]
        assert ("CR    20: target: cannot be met" in ended.stdout) == (run == 0)
        assert "CR    40" not in ended.stdout
        lines = [json.loads(x) for x in (folder / "r20.jsonl").read_text().splitlines()]
        assert len(lines) == 12 and lines[-1]["ratio"] == 20 and "unreachable" in lines[-1]
        assert "| svd | target | 1 |" in (folder / "r20.md").read_text()  # tables written


def test_classifier_sweep_a_series_stops_after_crs_at_chance(resnet20_weights, shared_data,
                                                            monkeypatch, tmp_path):
    # the model answering one class at two CRs in a row: the larger CRs are not swept (for
    # sampled CUR of a layer whose weight is mostly unseen initialisation, most of a sweep), and
    # a resumed run, counting from the points, does not sweep them either
    import yaml

    sweep_ = _sweep_module()
    raw = yaml.safe_load(SWEEP_CONFIG)
    raw["sweep"].update(ratios=[1.5, 3, 6, 12, 24], modes=["rule"], methods={"svd": {}})
    raw["sweep"].pop("finetune")
    sw = sweep_.sweep_settings(raw)
    assert sw["chance_stop"] == 2
    calls = []

    def fake(part, x, method, ratio, *args, **kwargs):
        calls.append(ratio)
        return {"top1": 90.0 if ratio < 3 else 10.0, "params": 650 // ratio, "ranks": {},
                "seconds": 0.0}

    monkeypatch.setattr(sweep_, "point", fake)
    monkeypatch.setenv("RANKCUT_DATA", str(shared_data))
    for run in range(2):
        sweep_.sweep_model(raw, "r20", sw, tmp_path, shared_data, "cpu")
        assert calls == ([1.5, 3, 6] if run == 0 else [])
        calls.clear()
    off = sweep_.sweep_settings({**raw, "sweep": {**raw["sweep"], "chance_stop": None}})
    sweep_.sweep_model(raw, "r20", off, tmp_path, shared_data, "cpu")
    assert calls == [12, 24]


def test_classifier_sweep_fine_tuning_walk_stops_at_the_first_loss(monkeypatch, tmp_path):
    """The walk of a series: from the largest ratio kept without fine-tuning (a lucky ratio
    past a failing one does not count), up the ratios until a fine-tuned point loses more than
    the tolerance; a rerun computes nothing again."""
    sweep_ = _sweep_module()
    import yaml

    raw = yaml.safe_load(SWEEP_CONFIG)
    raw["sweep"]["finetune"] = {"series": ["svd/rule"], "ratios": [2, 4, 8, 16, 32],
                                "tolerance": 1}
    raw["sweep"]["ratios"] = [2, 4, 8, 16]
    sw = sweep_.sweep_settings(raw)
    assert sw["finetune"]["series"] == [("svd", "rule")]

    def swept(ratio, top1):
        return {"label": "svd", "mode": "rule", "ratio": ratio, "seed": 0, "top1": top1}

    head = {"dense_top1": 90.0, "part_params": 1000, "total_params": 5000, "part": "fc"}
    run = {"name": "m", "head": head, "points": [swept(2, 89.5), swept(4, 88.0),
                                                 swept(8, 89.9), swept(16, 80.0)]}
    after = {2: 89.9, 4: 89.8, 8: 89.5, 16: 88.5, 32: 85.0}
    calls = []

    def fake(run_, method, ratio, mode, seed, train, ft, teachers, cache=None):
        calls.append(ratio)
        return {"top1_before": 0.0, "top1": after[ratio], "params": 1000 // ratio,
                "ranks": {}, "seconds": 0.0}

    monkeypatch.setattr(sweep_, "tuned_point", fake)
    monkeypatch.setattr(sweep_, "part_inputs", lambda *a, **k: "inputs")
    run["plain"], run["model"], run["device"] = [], None, "cpu"
    path = sweep_.finetune_model(run, sw, tmp_path)
    # 4 loses 2 points without fine-tuning, so 2 is the start (8's 89.9 does not count); the
    # walk stops at 16, the first to lose more than 1 point after fine-tuning
    assert calls == [2, 4, 8, 16]
    calls.clear()
    sweep_.finetune_model(run, sw, tmp_path)  # resumed: nothing computed again
    assert calls == []
    # the points without fine-tuning changed since (another kept CR): the walk would begin
    # elsewhere, so the file's walk is refused, not continued beside a second start
    moved = {**run, "points": [swept(2, 89.5), swept(4, 89.6), swept(8, 88.0)]}
    with pytest.raises(SystemExit, match="walk of svd rule began at CR 2.*now keep CR 4"):
        sweep_.finetune_model(moved, sw, tmp_path)
    assert calls == []
    looser = sweep_.sweep_settings({**raw, "sweep": {**raw["sweep"], "finetune": {
        "series": ["svd/rule"], "ratios": [2, 4, 8, 16, 32], "tolerance": 2}}})
    with pytest.raises(SystemExit, match="other settings"):  # the walks would differ
        sweep_.finetune_model(run, looser, tmp_path)
    head, tuned = sweep_.read_points(path)
    assert head["finetune"]["tolerance"] == 1
    table = sweep_.finetuned_table(head, tuned)
    assert "| svd | rule | 0 | 2.0 | 0.00 -> 89.90 | 8.0 | 89.50 | 125 | 1.21 |" in table
    # a series that keeps no CR without fine-tuning starts at the smallest, and says so
    run["points"] = [swept(2, 80.0)]
    calls.clear()
    path = sweep_.finetune_model(run, sw, tmp_path / "none")
    assert calls == [2, 4, 8, 16]
    table = sweep_.finetuned_table(*sweep_.read_points(path))
    assert "| svd | rule | 0 | 2.0 (none kept) | 0.00 -> 89.90 | 8.0 |" in table
    # a target below the smallest plan ends the series (the planner's refusal), the rest runs
    after[16] = 89.0

    def unreachable(run_, method, ratio, *args, **kwargs):
        if ratio >= 16:
            calls.append(ratio)
            raise TargetUnreachable("target: cannot be met; the cheapest plan costs more")
        return fake(run_, method, ratio, *args, **kwargs)

    monkeypatch.setattr(sweep_, "tuned_point", unreachable)
    calls.clear()
    path = sweep_.finetune_model(run, sw, tmp_path / "unreachable")
    assert calls == [2, 4, 8, 16]
    calls.clear()
    sweep_.finetune_model(run, sw, tmp_path / "unreachable")  # resumed: 16 not planned again
    assert calls == []
    assert [p["ratio"] for p in sweep_.read_points(path)[1] if "unreachable" in p] == [16]
    # a kill mid-append: the cut line is dropped from the file, so that point runs again
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    calls.clear()
    sweep_.finetune_model(run, sw, tmp_path / "unreachable")
    assert calls == [8, 16]
    assert len(path.read_text().splitlines()) == len(lines)
    path.write_text("\n".join([*lines[:1], "{cut", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        sweep_.read_points(path)
    monkeypatch.setattr(sweep_, "tuned_point", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("another error")))
    with pytest.raises(ValueError, match="another error"):
        sweep_.finetune_model(run, sw, tmp_path / "other")


def test_classifier_sweep_a_diverged_fine_tuning_ends_the_walk(monkeypatch, tmp_path):
    # a loss gone NaN (FloatingPointError from the training loop) is a point that lost: it is
    # measured as the fine-tuning left it, recorded, and the walk stops there (a crash would
    # end the whole sweep, every later series with it)
    import yaml

    sweep_ = _sweep_module()
    raw = yaml.safe_load(SWEEP_CONFIG)
    raw["sweep"]["finetune"] = {"series": ["svd/rule"], "ratios": [2, 4, 8], "tolerance": 1}
    sw = sweep_.sweep_settings(raw)
    head = {"dense_top1": 90.0, "part_params": 1000, "total_params": 5000, "part": "fc"}
    run = {"name": "m", "head": {**head, "exclude": []}, "plain": [], "model": None,
           "device": "cpu", "part": None, "x": None, "calib": None,
           "points": [{"label": "svd", "mode": "rule", "ratio": 2, "seed": 0, "top1": 89.5}]}
    torch.manual_seed(0)
    xs, ys = torch.randn(40, 6), torch.randint(0, 3, (40,))
    run["test"] = torch.utils.data.TensorDataset(xs, ys)
    models, calls = [], []

    def compressed(part, x, method, ratio, *args):
        models.append(torch.nn.Linear(6, 3))
        return models[-1], SimpleNamespace(active={}), 0.0

    def finetune(model, *args, **kwargs):
        calls.append(len(models))
        if len(models) == 2:  # the second point's loss goes NaN, its weights with it
            with torch.no_grad():
                model.weight.fill_(float("nan"))
            raise FloatingPointError("training loss is nan at step 50: lower lr")

    monkeypatch.setattr(sweep_, "compressed", compressed)
    monkeypatch.setattr(sweep_, "finetune", finetune)
    monkeypatch.setattr(sweep_, "part_inputs", lambda *a, **k: "inputs")
    monkeypatch.setattr(sweep_, "evaluate", lambda model, data: {
        "top1": 0.0 if model.weight.isnan().any() else 89.8})
    path = sweep_.finetune_model(run, sw, tmp_path)
    assert calls == [1, 2, 2]  # the second point tried twice (the retry at a lower lr); 8 not
    ft_head, tuned = sweep_.read_points(path)
    assert [p["ratio"] for p in tuned] == [2, 4]
    assert "diverged" not in tuned[0] and "lower lr" in tuned[1]["diverged"]
    assert tuned[1]["top1"] == 0.0 and tuned[1]["top1_before"] == 89.8
    assert tuned[1]["retried"]["lr"] == sw["finetune"]["lr"]
    assert tuned[1]["lr"] == pytest.approx(sw["finetune"]["lr"] * sweep_.RETRY_LR)
    sweep_.finetune_model(run, sw, tmp_path)  # resumed: the diverged point is not run again
    assert calls == [1, 2, 2]
    table = sweep_.finetuned_table(ft_head, tuned)
    row = next(line for line in table.splitlines() if line.startswith("| svd |"))
    cr = f"{1000 / 21:.1f}"  # both points' models: Linear(6, 3), 21 params
    assert f"| {cr} | 89.80 -> 89.80 | {cr} | 89.80 | 21 |" in row
    assert f"| {cr}: 89.80 -> diverged |" in row


def test_classifier_sweep_a_diverged_fine_tuning_is_tried_again_at_a_lower_rate(monkeypatch,
                                                                             tmp_path):
    """A loss gone NaN at the recipe's lr is tried once more from the same compressed start at
    RETRY_LR times it: kept there, the point counts (starred in the table) and the walk goes
    on. A point recorded as diverged before retries existed (no "lr") is tuned again on
    resume, its line replaced."""
    import yaml

    sweep_ = _sweep_module()
    raw = yaml.safe_load(SWEEP_CONFIG)
    raw["sweep"]["finetune"] = {"series": ["svd/rule"], "ratios": [2, 4], "tolerance": 1}
    sw = sweep_.sweep_settings(raw)
    lr = sw["finetune"]["lr"]
    head = {"dense_top1": 90.0, "part_params": 1000, "total_params": 5000, "part": "fc"}
    run = {"name": "m", "head": {**head, "exclude": []}, "plain": [], "model": None,
           "device": "cpu", "part": None, "x": None, "calib": None,
           "points": [{"label": "svd", "mode": "rule", "ratio": 2, "seed": 0, "top1": 89.5}]}
    torch.manual_seed(0)
    run["test"] = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    starts, rates = [], []

    def compressed(part, x, method, ratio, *args):
        starts.append(torch.nn.Linear(6, 3))
        return starts[-1], SimpleNamespace(active={}), 0.0

    def finetune(model, *args, lr, **kwargs):
        rates.append(lr)
        # each try gets the compressed start, not what an earlier try left
        assert torch.equal(model.weight, starts[-1].weight)
        with torch.no_grad():
            model.weight.add_(1.0)
        if lr == sw["finetune"]["lr"]:
            raise FloatingPointError("training loss is nan at step 50: lower lr")

    monkeypatch.setattr(sweep_, "compressed", compressed)
    monkeypatch.setattr(sweep_, "finetune", finetune)
    monkeypatch.setattr(sweep_, "part_inputs", lambda *a, **k: "inputs")
    monkeypatch.setattr(sweep_, "evaluate", lambda model, data: {"top1": 89.8})
    path = sweep_.finetune_model(run, sw, tmp_path)
    low = pytest.approx(lr * sweep_.RETRY_LR)
    assert rates == [lr, low, lr, low]  # both ratios walked: the retries kept them
    head, tuned = sweep_.read_points(path)
    assert [p["ratio"] for p in tuned] == [2, 4] and head["retry_lr"] == sweep_.RETRY_LR
    assert all("diverged" not in p and p["lr"] == low and p["retried"]["lr"] == lr
               for p in tuned)
    table = sweep_.finetuned_table(head, tuned)
    assert "-> 89.80\\* |" in table and f"\\* tuned at lr {lr * sweep_.RETRY_LR:g}" in table
    # a point recorded as diverged by code without retries: tuned again, its line replaced
    old = {**tuned[1], "diverged": "training loss is nan"}
    del old["lr"], old["retried"]
    path.write_text("".join(json.dumps(r) + "\n" for r in [head, tuned[0], old]))
    rates.clear()
    sweep_.finetune_model(run, sw, tmp_path)
    assert rates == [lr, low]
    _, again = sweep_.read_points(path)
    assert [p["ratio"] for p in again] == [2, 4] and "diverged" not in again[1]


def test_classifier_sweep_settings_are_checked_before_any_work():
    import pytest
    import yaml

    sweep_ = _sweep_module()
    committed = yaml.safe_load((REPO / "experiments" / "configs" /
                                "seed001_vgg11.yaml").read_text())
    s = sweep_.sweep_settings(committed)
    assert set(s["methods"]) >= {"svd", "svd-data", "cur-deim", "cur-leverage", "cx"}
    base = yaml.safe_load(SWEEP_CONFIG)
    bad = {
        "ratios": ({"ratios": [1, 4]}, "ratios"),
        "key": ({"ratio": [4]}, "unknown keys"),
        "models": ({"models": ["nothing"]}, "sweep.models"),
        "models-nested": ({"models": [["dense"]]}, "sweep.models"),
        "option": ({"methods": {"c": {"method": "cur", "options": {"solvr": "x"}}}}, "solvr"),
        "mode": ({"methods": {"s": {"modes": ["global"]}}}, "modes"),
        "method-key": ({"methods": {"s": {"seed": 1}}}, "unknown keys"),
        "methods-list": ({"methods": ["svd"]}, "sweep.methods: expected a mapping"),
        "ratios-scalar": ({"ratios": 4}, "sweep.ratios"),
        "seeds-text": ({"methods": {"c": {"method": "cur", "seeds": "0"}}}, "seeds"),
        "data-text": ({"methods": {"s": {"data": "false"}}}, "data: expected true or false"),
        "modes-empty": ({"methods": {"s": {"modes": []}}}, "modes"),
        "conv-only": ({"methods": {"c": {"method": "tucker"}}}, "does not factorize Linear"),
        "ft-mapping": ({"finetune": [1]}, "sweep.finetune: expected a mapping"),
        "ft-key": ({"finetune": {"epoch": 1}}, "unknown keys"),
        "ft-series": ({"finetune": {"series": ["svd-data/target"]}}, "not a swept series"),
        "ft-lr": ({"finetune": {"lr": 0}}, "finetune.lr: out of range"),
        "ft-limit": ({"finetune": {"train_limit": 0}}, "finetune.train_limit"),
        "ft-ratios": ({"finetune": {"ratios": [1]}}, "finetune.ratios"),
        "ft-batch": ({"finetune": {"train_limit": 100}}, "make no batch of 128"),
        "exclude-text": ({"exclude": "6"}, "sweep.exclude: expected a list"),
        # a series stops at the first CRs at chance: a CR added at the end would never run;
        # a CR, seed or mode twice would be swept twice (and resumed once)
        "ratios-unsorted": ({"ratios": [2, 8, 4]}, "increasing list"),
        "ratios-twice": ({"ratios": [2, 2, 4]}, "each once"),
        "seeds-twice": ({"methods": {"c": {"method": "cur", "seeds": [0, 0]}}}, "each once"),
        "modes-twice": ({"methods": {"s": {"modes": ["rule", "rule"]}}}, "each once"),
    }
    for change, words in bad.values():
        with pytest.raises(SystemExit, match=words):
            sweep_.sweep_settings({**base, "sweep": {**base["sweep"], **change}})


@pytest.mark.slow  # (a run of the script, about 16 s on a slow 2-core machine; make test-all)
def test_classifier_sweep_refuses_a_part_without_linear_layers_before_any_work(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(SWEEP_CONFIG.replace("part: linear", "part: layer1"))
    done = sweep(config, tmp_path / "runs", {**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "sweep.part: resnet20_cifar has no submodule 'layer1' holding Linear" in done.stderr
    assert "its Linear layers: linear" in done.stderr and not (tmp_path / "runs").exists()
    config.write_text(SWEEP_CONFIG.replace("part: linear", "part: linear\n  exclude: ['0']"))
    done = sweep(config, tmp_path / "runs", {**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "sweep.exclude: resnet20_cifar.linear has no Linear layer ['0']" in done.stderr


def test_classifier_sweep_points_leave_excluded_layers_dense():
    sweep_ = _sweep_module()
    torch.manual_seed(0)
    part = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x = torch.randn(8, 64)
    test = (torch.randn(32, 64), torch.randint(0, 10, (32,)))
    svd = {"method": "svd", "data": False, "options": {}}
    both = sweep_.point(part, x, svd, 4, "rule", 0, None, test)
    first = sweep_.point(part, x, svd, 4, "rule", 0, None, test, exclude=["2"])
    assert set(both["ranks"]) == {"0", "2"} and set(first["ranks"]) == {"0"}
    assert first["ranks"]["0"] == both["ranks"]["0"]
    assert first["params"] - both["params"] == 64 * 10 - both["ranks"]["2"][0] * (64 + 10)


def test_cur_seen_part_gives_the_layer_the_outputs_of_w_on_repeated_inputs():
    # experiments/cur_seen_part.py: W_seen = repeat(W_c / copies) equals W on inputs that repeat
    # each feature `copies` times, and its CUR at full width reproduces it
    seen_part = _experiment("cur_seen_part")
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 5 * 4, generator=g, dtype=torch.float64)
    Wc = seen_part.seen_part(W, 4)
    f = torch.randn(7, 5, generator=g, dtype=torch.float64)
    x = f.repeat_interleave(4, dim=1)
    spread = Wc.repeat_interleave(4, dim=1) / 4
    assert torch.allclose(x @ W.mT, f @ Wc.mT) and torch.allclose(x @ spread.mT, x @ W.mT)
    assert torch.allclose(seen_part.cur_weight(Wc, 5), Wc)
    assert (W - spread).norm() > 0.5 * W.norm()  # the unseen part: most of a random W


def _carry_module(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("carry", REPO / "experiments" / "carry.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    monkeypatch.setattr(carry, "CARRIED", tmp_path / "carried")
    return carry


def test_a_carried_run_resumes_on_another_machine_where_it_stopped(tmp_path, monkeypatch):
    """carry.py save on one machine, restore into another's empty runs/: finetune resumes from
    the carried checkpoint and ends exactly as an uninterrupted run; what a run must not carry
    (a finished run, a folder over the limit) and what it must not overwrite is refused."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from rankcut.train import finetune

    carry = _carry_module(tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def train(folder, stop=None, steps_seen=None):
        def callback(info):
            if steps_seen is not None:
                steps_seen.append(info["step"])
            return stop is not None and info["step"] >= stop

        return finetune(model(), data, steps=10, batch_size=8, lr=0.05, seed=0,
                        checkpoint_dir=str(folder / "checkpoints"), checkpoint_every=2,
                        resume=True, log=str(folder / "train.jsonl"), progress=False,
                        callback=callback).model

    here = tmp_path / "machine1" / "runs"
    run = here / "cfg" / "long"
    train(run, stop=5)  # the session ends after 5 of 10 steps (checkpointed at the stop)
    (run / "wall.json").write_text("{}")
    assert carry.main(["save", "configs/cfg.yaml", "long", "--runs-dir", str(here)]) == 0
    kept = tmp_path / "carried" / "cfg" / "long"
    assert sorted(p.name for p in kept.rglob("*")) == ["checkpoints", "last.pt", "train.jsonl",
                                                       "wall.json"]
    (kept / "stale.txt").write_text("from an earlier save")  # a save replaces the copy whole
    # (and leaves behind what a write killed half way left)
    (run / "checkpoints" / ".last.pt.0123456789ab.tmp").write_bytes(b"half")
    assert carry.main(["save", "configs/cfg.yaml", "long", "--runs-dir", str(here)]) == 0
    assert not (kept / "stale.txt").exists()
    assert not list(kept.rglob(".*"))
    # a run started afresh on a machine that did not restore: its shorter copy is refused
    fresh = tmp_path / "machine3" / "runs"
    train(fresh / "cfg" / "long", stop=2)
    with pytest.raises(SystemExit, match="further along"):
        carry.main(["save", "cfg.yaml", "long", "--runs-dir", str(fresh)])
    assert (kept / "checkpoints" / "last.pt").read_bytes() == \
        (run / "checkpoints" / "last.pt").read_bytes()

    there = tmp_path / "machine2" / "runs"
    assert carry.main(["restore", "cfg.yaml", "long", "--runs-dir", str(there)]) == 0
    moved = there / "cfg" / "long"
    assert (moved / "checkpoints" / "last.pt").read_bytes() == \
        (run / "checkpoints" / "last.pt").read_bytes()
    seen = []
    resumed = train(moved, steps_seen=seen)
    assert seen == list(range(6, 11))  # it went on from step 5, not from the start
    whole = train(tmp_path / "uninterrupted")
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    with pytest.raises(SystemExit, match="holds checkpoints or a result already"):
        carry.main(["restore", "cfg.yaml", "long", "--runs-dir", str(there)])
    with pytest.raises(SystemExit, match="nothing carried"):
        carry.main(["restore", "cfg.yaml", "other", "--runs-dir", str(there)])
    (moved / "result.json").write_text("{}")
    with pytest.raises(SystemExit, match="has finished"):
        carry.main(["save", "cfg.yaml", "long", "--runs-dir", str(there)])
    monkeypatch.setattr(carry, "LIMIT", 10)
    with pytest.raises(SystemExit, match="over the 0 MB limit"):
        carry.main(["save", "cfg.yaml", "long", "--runs-dir", str(here)])


def test_reproduce_refuses_to_start_afresh_a_run_that_was_carried(tmp_path, monkeypatch):
    reproduce_ = _experiment("reproduce")
    monkeypatch.setattr(reproduce_.carry, "CARRIED", tmp_path / "carried")
    base = tmp_path / "runs" / "cfg"
    reproduce_.refuse_uncarried(base, "long")  # nothing carried: it may start
    (tmp_path / "carried" / "cfg" / "long" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"carry.py restore cfg long --runs-dir .*runs\)"):
        reproduce_.refuse_uncarried(base, "long")
    (base / "long").mkdir(parents=True)  # a folder without checkpoints is no start either
    with pytest.raises(SystemExit, match="restore it first"):
        reproduce_.refuse_uncarried(base, "long")
    (base / "long" / "checkpoints").mkdir()  # restored (or resumed here): it goes on
    reproduce_.refuse_uncarried(base, "long")
    reproduce_.refuse_uncarried(base, "other")


def _results_rows() -> dict[str, float]:
    """results/README.md's table: folder -> the top-1 it states."""
    import re

    rows = {}
    for line in (REPO / "results" / "README.md").read_text().splitlines():
        m = re.match(r"\| `([^`]+)/` \|.*\| ([0-9.]+) \(([0-9.]+)\) \|", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def test_every_committed_result_loads_from_its_name_and_is_listed():
    """Each results/ folder loads with rc.load(create(NAME), FOLDER), NAME the folder's prefix,
    holds the parameters its plan predicted, runs, and is listed in results/README.md."""
    import torch

    rows = _results_rows()
    # (runs/: the experiments' kept result.json files, not models)
    folders = sorted(p for p in (REPO / "results").iterdir() if p.is_dir() and p.name != "runs")
    assert folders and {f.name for f in folders} == set(rows)
    for folder in folders:
        model = rc.load(create(folder.name.split("-")[0]), folder).eval()
        plan = json.loads((folder / "plan.json").read_text())
        assert sum(p.numel() for p in model.parameters()) == plan["meta"]["predicted"]["params"][1]
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_committed_results_keep_the_top1_the_readme_states(shared_data):
    """The headline models, loaded back, measure the top-1 results/README.md states on CIFAR-10
    test images 0..1016 (to one image: 0.098 point, as float rounding may flip a borderline one
    on another CPU). A model with pretrained weights takes their normalisation; one trained
    here (vgg11_torchvision, seed 001) that of CIFAR-10, what it was trained on."""
    for name, stated in _results_rows().items():
        model_name = name.split("-")[0]
        model = rc.load(create(model_name), REPO / "results" / name).eval()
        normalization = model_name if model_name in rc.models.NORMALIZATION else "cifar10"
        test = D.dataset("cifar10", "test", root=shared_data, limit=1017,
                         transform=D.transforms("cifar10", train=False,
                                                normalization=normalization))
        assert abs(evaluate(model, test)["top1"] - stated) < 0.1, name


def test_training_the_torchvision_vgg_without_its_pools_repetition_changes_no_number():
    """reproduce.unrepeated_pool: the 32x32 VGG's classifier sees each feature once, yet the
    outputs and every gradient (the first layer's whole weight too) are the plain model's. On a
    VGG of torchvision's layout, small: features to a 1x1 map, the 7x7 adaptive pool, a
    classifier whose first layer takes the 49 copies."""
    import torch
    import torchvision

    reproduce_ = _reproduce_module()
    torch.manual_seed(0)
    model = torchvision.models.VGG(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(32)),
        num_classes=10, init_weights=True)
    model.classifier = torch.nn.Sequential(torch.nn.Linear(8 * 49, 16), torch.nn.ReLU(),
                                           torch.nn.Linear(16, 10))
    x = torch.randn(2, 3, 32, 32)

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain, plain_grads = outputs_and_grads()
    keys = list(model.state_dict())
    with reproduce_.unrepeated_pool(model):
        assert not isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)
        assert list(model.state_dict()) == keys  # checkpoints resume either way
        folded, folded_grads = outputs_and_grads()
        # a larger input (not a 1x1 feature map) still takes the pool and the whole weight
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert "forward" not in vars(model.classifier[0])  # restored
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    for k, g in plain_grads.items():
        torch.testing.assert_close(folded_grads[k], g, rtol=1e-4, atol=1e-6, msg=k)
    # the seed's model has that layout; a model without it is left alone
    with torch.device("meta"):  # its layout only: nothing allocated
        vgg = create("vgg11_torchvision", num_classes=10)
    assert isinstance(vgg.avgpool, torch.nn.AdaptiveAvgPool2d) and vgg.classifier[0].in_features \
        == 512 * 49
    resnet = rc.models.create("resnet20_cifar")
    with reproduce_.unrepeated_pool(resnet) as same:
        assert same is resnet and "forward" not in vars(resnet)


def test_results_name_the_commit_of_the_code_that_ran():
    """experiments and benchmarks credit results to rankcut._provenance.source_commit: the
    checkout's HEAD (marked +dirty with changes to tracked files), read once."""
    import shutil
    import subprocess

    import pytest

    from rankcut._provenance import source_commit

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the commit is 'unknown'")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True, cwd=REPO).stdout.strip()
    assert source_commit().removesuffix("+dirty") == head
    assert source_commit() is source_commit()  # kept, not asked again
    assert _reproduce_module().COMMIT == source_commit()


def test_a_run_begun_under_other_settings_is_refused(tmp_path):
    """reproduce.py pins a run's settings in its folder when it starts: a later invocation with
    the config edited (calibration count here) refuses the run rather than reuse its result or
    its fitted model; the same settings go on; a folder from before settings were kept is not
    checked."""
    reproduce = _experiment("reproduce")
    s = {"model": "resnet20_cifar", "calib": 1024, "plan_options": {"exclude": ["fc"]}}
    reproduce.pin_settings(tmp_path / "r", "r", s)
    reproduce.pin_settings(tmp_path / "r", "r", dict(s))
    with pytest.raises(SystemExit, match=r"run 'r': .* other settings \(\['calib'\] differ\)"):
        reproduce.pin_settings(tmp_path / "r", "r", {**s, "calib": 512})
    # a setting the config format gained since, or a late one (export, note): not compared
    reproduce.pin_settings(tmp_path / "r", "r", {**s, "new_setting": 3, "note": "x"})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text("{}")
    reproduce.pin_settings(tmp_path / "old", "old", s)
    assert not (tmp_path / "old" / reproduce.SETTINGS_FILE).exists()
    # a first write of the settings cut short by a kill (its hidden temporary left behind)
    # is not "begun before settings were kept": the settings are pinned on the next start
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / f".{reproduce.SETTINGS_FILE}.0123abcd.tmp").write_text("{")
    reproduce.pin_settings(tmp_path / "cut", "cut", s)
    assert (tmp_path / "cut" / reproduce.SETTINGS_FILE).is_file()


def test_a_later_run_with_changed_settings_is_refused_before_the_first_run_starts(tmp_path):
    """Every selected run's kept settings are compared before any run starts (a changed second
    run was found only when the queue reached it, after the first run's hours); and a --device
    that is not there is refused at once."""
    reproduce_ = _reproduce_module()
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet20_cifar\nruns:\n  first: {rank: 8, method: svd}\n"
                    "  second: {rank: 8, method: svd, calib: 64}\n")
    runs = tmp_path / "runs"
    config = {"model": "resnet20_cifar", "runs": {"second": {"rank": 8, "method": "svd"}}}
    reproduce_.pin_settings(runs / "c" / "second", "second",
                            reproduce_.settings_of(config, "second"))  # calib 1024 kept
    done = reproduce(path, runs, {**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0
    assert "run 'second'" in done.stderr and "['calib'] differ" in done.stderr
    assert not (runs / "c" / "first").exists()
    # a start_from whose source made its model otherwise: found before "first" starts too
    path.write_text("model: resnet20_cifar\nruns:\n  first: {rank: 8, method: svd}\n"
                    "  src: {rank: 8, method: svd}\n"
                    "  late: {rank: 4, method: svd, start_from: src, epochs: 1}\n")
    config = {"model": "resnet20_cifar", "runs": {"src": {"rank": 8, "method": "svd"}}}
    reproduce_.pin_settings(runs / "c" / "src", "src", reproduce_.settings_of(config, "src"))
    done = reproduce(path, runs, {**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0 and "run 'late': start_from 'src'" in done.stderr
    assert not (runs / "c" / "first").exists()
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"),
                               str(path), "--runs-dir", str(runs), "--device", "cuda"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode != 0 and "--device: 'cuda' is not on this machine" in done.stderr


def test_classifier_sweep_counts_a_loss_of_exactly_the_tolerance_as_within_it(tmp_path):
    """99.33 from a dense 99.43 loses 0.10 (99.43 - 0.1 is 99.33000000000001 in floating point:
    it was counted as more); seeds at one top-1 plot without negative error bars."""
    cs = _sweep_module()
    assert not cs.lost(99.33, 99.43, 0.1) and cs.lost(99.32, 99.43, 0.1)
    by_ratio = [(2, [{"top1": 99.43}]), (300, [{"top1": 99.33}]), (400, [{"top1": 68.9}])]
    assert [r for r, _ in cs.kept(by_ratio, 99.43, 0.1)] == [2, 300]
    same = 100 * 112 / 1017  # three seeds at one value: their mean can land a rounding off it
    points = [{"label": "cur-leverage", "mode": "rule", "ratio": 10, "seed": s, "top1": same,
               "part_ratio": 10.0, "params": 1000, "whole_ratio": 2.0, "seconds": 1.0}
              for s in range(3)]
    cs.plot({"dense_top1": 78.76, "model": "m", "data": "d", "part": "classifier"}, points,
            tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()


def test_classifier_sweep_refuses_a_points_file_of_other_settings_before_any_work(tmp_path):
    """A later model's points file made with other settings is refused before the first model
    is trained or swept (not when the queue reaches it); and a sweep needs calibration data."""
    import pytest
    import yaml

    sweep_ = _sweep_module()
    raw = yaml.safe_load(SWEEP_CONFIG)
    sw = sweep_.sweep_settings(raw)
    s = sweep_.settings_of(raw, "r20")
    path = tmp_path / "r20.jsonl"
    sweep_.check_points_file(path, s, sw, "cpu")  # no file yet: nothing to compare
    head = {**sweep_.settings_head(s, sw, "cpu"), "calib": 64, "dense_top1": 90.0}
    path.write_text(json.dumps(head) + "\n")
    sweep_.check_points_file(path, s, sw, "cpu")
    path.write_text(json.dumps({**head, "seed": 7}) + "\n")
    with pytest.raises(SystemExit, match=r"other settings \(\['seed'\] differ\)"):
        sweep_.check_points_file(path, s, sw, "cpu")
    path.write_text(json.dumps({**head, "calib": 128}) + "\n")
    with pytest.raises(SystemExit, match=r"\['calib'\] differ"):
        sweep_.check_points_file(path, s, sw, "cpu")
    config = tmp_path / "c.yaml"
    config.write_text(SWEEP_CONFIG.replace("calib: 64", "calib: 0"))
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "classifier_sweep.py"),
                           str(config), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RANKCUT_DATA": str(tmp_path)})
    assert done.returncode != 0 and "calib: expected an int >= 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_a_dataset_a_run_reads_is_found_before_the_first_run(tmp_path):
    """A transfer head's data was first opened after its backbone was compressed (hours in);
    every dataset a run to do reads is now looked for before the first run starts."""
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet20_cifar\nruns:\n  ok: {rank: 8, method: svd}\n"
                    "  head: {rank: 8, method: svd, transfer: {data: fashion_mnist}}\n")
    data = tmp_path / "data"
    (data / "cifar-10-batches-bin").mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (data / "cifar-10-batches-bin" / name).write_bytes(
            bytes([1]) + bytes(3072))  # one record of class 1
    done = reproduce(path, tmp_path / "runs", {**os.environ, "RANKCUT_DATA": str(data)})
    assert done.returncode != 0 and "data: fashion_mnist (train)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not any((tmp_path / "runs").rglob("result.json"))


def test_flags_and_queues_that_could_not_run_are_refused_before_the_first_run(tmp_path,
                                                                             monkeypatch):
    """--threads 0 (ignored before) or -1 (torch's traceback), a run named twice in --only, a
    keep: that is a file, a start_from run that runs later or is the run itself (found only
    when the run was reached, hours in), two runs exporting to one folder (the last won):
    each one line, before any run."""
    import pytest

    reproduce_ = _reproduce_module()
    config = tmp_path / "c.yaml"
    config.write_text("model: resnet20_cifar\nruns:\n  a: {rank: 8, method: svd}\n")
    for flags, words in ((["--threads", "0"], "--threads: expected a number of threads >= 1"),
                         (["--threads", "-1"], "--threads: expected"),
                         (["--only", "a", "a"], r"--only: \['a'\] named twice")):
        monkeypatch.setattr("sys.argv", ["reproduce.py", str(config), *flags])
        with pytest.raises(SystemExit, match=words):
            reproduce_.command_line("doc", "only", "summary")
    (tmp_path / "kept.json").write_text("{}")
    with pytest.raises(SystemExit, match="keep: .*kept.json is a file, not a folder"):
        reproduce_.config_keep({"keep": str(tmp_path / "kept.json")}, config)

    def refused(text, words, *only):
        config.write_text("model: resnet20_cifar\n" + text)
        monkeypatch.setenv("RANKCUT_DATA", str(tmp_path))
        monkeypatch.setattr("sys.argv", ["reproduce.py", str(config), "--runs-dir",
                                         str(tmp_path / "runs"),
                                         *(["--only", *only] if only else [])])
        with pytest.raises(SystemExit, match=words):
            reproduce_.main()
        assert not (tmp_path / "runs").exists()

    source = "runs:\n  a: {rank: 8, method: svd}\n  b: {rank: 8, method: svd, start_from: a}\n"
    refused(source, "run 'b': start_from 'a' has not made its model yet and does not run "
                    r"before it: list it first \(--only ... a b\)", "b", "a")
    refused(source, "run 'b': start_from 'a' has not made its model yet", "b")
    refused("runs:\n  a: {rank: 8, method: svd, start_from: a}\n",
            "run 'a': start_from names the run itself")
    refused("runs:\n  a: {rank: 8, method: svd, export: out/x}\n"
            "  b: {rank: 4, method: svd, export: out/x}\n",
            "runs 'a' and 'b': both export to out/x")


def test_classifier_sweep_a_points_file_of_other_settings_is_refused_before_any_model(tmp_path):
    """check_points_file, run for every model before the first is trained or swept, refuses a
    points file swept with another test_limit or a series fitted otherwise (both were found
    only when the sweep reached that model, hours into a config of several)."""
    import pytest
    import yaml

    sweep_ = _sweep_module()
    config = yaml.safe_load(SWEEP_CONFIG)
    name = next(iter(config["runs"]))
    s, sw = sweep_.settings_of(config, name), sweep_.sweep_settings(config)
    label, method = next(iter(sw["methods"].items()))
    head = sweep_.settings_head(s, sw, "cpu")
    point = {"label": label, "mode": "rule", "ratio": 4, "seed": 0,
             "fit": sweep_._fit(method)}
    path = tmp_path / "points.jsonl"

    def write(header, *points):
        path.write_text("\n".join(json.dumps(r) for r in (header, *points)) + "\n")

    write(head, point)
    sweep_.check_points_file(path, s, sw, "cpu")  # the same settings: taken
    write({**head, "test_limit": 100}, point)
    with pytest.raises(SystemExit, match=r"other settings \(\['test_limit'\] differ\)"):
        sweep_.check_points_file(path, s, sw, "cpu")
    write(head, {**point, "fit": {**point["fit"], "options": {"other": 1}}})
    with pytest.raises(SystemExit, match=rf"other settings \(\['{label}'\] differ\)"):
        sweep_.check_points_file(path, s, sw, "cpu")
    # the fine-tuned stage's file: its own settings too (found when the stage began, after
    # the sweep of its model)
    sw = {**sw, "finetune": sweep_.finetune_settings({"series": [label], "epochs": 1},
                                                     sw["methods"], [4])}
    tuned_head = {**head, **sweep_.finetune_head(sw, "cpu")}
    write(tuned_head, point)
    sweep_.check_points_file(path, s, sw, "cpu", finetuned=True)
    changed = {**tuned_head, "finetune": {**tuned_head["finetune"], "epochs": 3}}
    write(changed, point)
    with pytest.raises(SystemExit, match=r"\['finetune'\] differ\); move it away to tune"):
        sweep_.check_points_file(path, s, sw, "cpu", finetuned=True)


def test_an_export_into_a_folder_holding_a_model_is_refused_before_the_first_run(tmp_path,
                                                                                 monkeypatch):
    """A results/ folder holds a committed headline: a run (or a late export) that would write
    its model over it is refused before any run starts, unless --replace-exports."""
    reproduce_ = _reproduce_module()
    taken = tmp_path / "results" / "headline"
    taken.mkdir(parents=True)
    (taken / "plan.json").write_text("{}")
    path = tmp_path / "c.yaml"
    path.write_text(f"model: resnet20_cifar\nruns:\n  first: {{rank: 8, method: svd}}\n"
                    f"  second: {{rank: 4, method: svd, export: {taken}}}\n")
    runs = tmp_path / "runs"

    def main(*flags):  # (in this process: a subprocess's torch import is seconds)
        monkeypatch.setenv("RANKCUT_DATA", str(tmp_path))
        monkeypatch.setattr("sys.argv", ["reproduce.py", str(path), "--runs-dir", str(runs),
                                         *flags])
        with pytest.raises(SystemExit) as stop:
            reproduce_.main()
        return str(stop.value)

    said = main()
    assert "run 'second': export:" in said and "--replace-exports" in said
    assert not (runs / "c" / "first").exists()
    # with the flag the check lets it through (here to the missing data's refusal)
    assert "export:" not in main("--replace-exports")
    s = {"export": str(taken)}
    result = runs / "c" / "second" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"export": {"folder": str(taken)}}))
    reproduce_.refuse_overwrite("second", s, result, result)  # its own export: nothing to do
    result.write_text(json.dumps({}))  # finished, not exported: a late export would write
    with pytest.raises(SystemExit, match="already holds a saved model"):
        reproduce_.refuse_overwrite("second", s, result, result)
    kept = tmp_path / "kept" / "second.json"  # kept only, its folder gone: nothing is written
    reproduce_.refuse_overwrite("second", s, kept, result)
    reproduce_.refuse_overwrite("second", {"export": str(tmp_path / "free")}, None, result)
