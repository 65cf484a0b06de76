"""The rankcut command end to end: user errors, config files, and compress -> evaluate ->
benchmark -> export on the pretrained ResNet-20 with the shared CIFAR-10 data."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.cli import main
from rankcut.models import create
from rankcut.train import evaluate
from tests._cli import run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["analyze", "compress", "evaluate", "benchmark", "export",
                                     "sweep", "transfer", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.fixture()
def weights(resnet20_weights):
    return resnet20_weights


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "resnet21", "--data", "cifar10"], "model: unknown name 'resnet21'"),
    (["evaluate", "--model", "resnet20_cifar", "--weights", "missing.th", "--data", "cifar10"],
     "missing.th not found"),
    (["compress", "--model", "resnet20_cifar", "--input-shape", "3,32,32", "--rank",
      "energy=2", "--out", "x"], "--rank: rank: expected an int >= 1"),
    (["compress", "--model", "resnet20_cifar", "--input-shape", "3,32,32", "--target",
      "macs=0.5x", "--out", "x"], "target: expected"),
    (["compress", "--model", "resnet20_cifar", "--input-shape", "3,32", "--target",
      "macs=2x", "--out", "x"], "--input-shape: the model does not run on a batch of shape "
                                "(1, 3, 32)"),
    (["compress", "--model", "resnet20_cifar", "--target", "macs=2x", "--out", "x"],
     "--input-shape"),
    (["evaluate", "--model", "resnet20_cifar", "--data", "imagenet"], "imagenet"),
    (["compress", "--model", "resnet20_cifar", "--input-shape", "3,32,32", "--target",
      "macs=2x", "--data", "cifar10", "--finetune-epochs", "1", "--no-distill",
      "--teacher-cache", "t", "--out", "x"], "needs --distill"),
    (["evaluate", "--model", "resnet20_cifar", "--data", "cifar10", "--config",
      "missing.yaml"], "missing.yaml not found"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rankcut: error: ")
    assert "Traceback" not in err
    assert message in lines[0]


def test_a_teacher_cache_that_cannot_be_a_folder_is_refused_before_any_work(capsys, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    for cache, words in [("a-file", "a-file is a file, not a folder"),
                         ("a-file/cache", "a-file/cache lies under a-file, which is a file")]:
        code, _, err = run(capsys, "compress", "--model", "resnet20_cifar", "--input-shape",
                           "3,32,32", "--target", "macs=2x", "--data", "cifar10",
                           "--finetune-epochs", "1", "--distill", "--teacher-cache", cache,
                           "--out", "x")
        assert code == 2 and f"--teacher-cache: {words}" in err and "Traceback" not in err


def test_incompatible_plan_is_a_user_error(capsys, tmp_path):
    plan = rc.Plan({"layer9.conv1": rc.LayerPlan("svd", (4,))})
    (tmp_path / "plan.json").write_text(plan.to_json())
    code, _, err = run(capsys, "compress", "--model", "resnet20_cifar", "--input-shape",
                       "3,32,32", "--plan", tmp_path / "plan.json", "--out", tmp_path / "o")
    assert code == 2 and "layer9.conv1" in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown name"):
        main(["evaluate", "--model", "resnet21", "--data", "cifar10", "--debug"])


def test_config_file_values_and_flags_overriding_them(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: resnet20_cifar\ninput-shape: 3,32,32\nmethod: svd\n"
                      "target: macs=3x\nallow_slower: true\nno-latency: true\n")
    code, _, err = run(capsys, "compress", "--config", config, "--target", "macs=2x",
                         "--out", tmp_path / "o")
    assert code == 0, err
    plan = rc.load_plan(tmp_path / "o" / "plan.json")
    assert plan.meta["target"] == "macs=2x" and plan.meta["method"] == "svd"
    config.write_text("modle: resnet20_cifar\n")
    code, _, err = run(capsys, "compress", "--config", config, "--out", tmp_path / "o")
    assert code == 2 and "unknown key 'modle'" in err
    # a null is "unset", not given: it does not clash with --plan as a --target would
    config.write_text("model: resnet20_cifar\ninput-shape: 3,32,32\ntarget: ~\n"
                      "no-latency: true\n")
    code, _, err = run(capsys, "compress", "--config", config, "--plan", tmp_path / "o",
                       "--quiet", "--out", tmp_path / "o2")
    assert code == 0, err


def test_an_on_off_flag_a_config_file_turns_on_the_command_line_turns_off(tmp_path):
    """allow_slower, quiet, resume, overwrite... were store_true flags: once a config file
    set one, no command line could turn it off again."""
    from rankcut.cli import _with_config, build_parser

    config = tmp_path / "c.yaml"
    config.write_text("allow_slower: true\nquiet: true\nresume: true\noverwrite: true\n"
                      "keep_freed_memory: true\n")
    base = ["compress", "--config", str(config), "--model", "resnet20_cifar", "--out", "o"]
    on = _with_config(build_parser(), base)
    assert (on.allow_slower, on.quiet, on.resume, on.overwrite, on.keep_freed_memory) == (
        True, True, True, True, True)
    off = _with_config(build_parser(), [*base, "--no-allow-slower", "--no-quiet", "--no-resume",
                                        "--no-overwrite", "--no-keep-freed-memory"])
    assert (off.allow_slower, off.quiet, off.resume, off.overwrite, off.keep_freed_memory) == (
        False, False, False, False, False)
    plain = _with_config(build_parser(), ["compress", *base[3:]])
    assert (plain.allow_slower, plain.quiet, plain.resume) == (False, False, False)


def test_solver_options_reach_the_plan(capsys, tmp_path):
    # --solver-option picks CUR's algorithm (RX: actual rows only); from a config file too,
    # where the command line's flag adds to the file's list (action "extend")
    config = tmp_path / "c.yaml"
    config.write_text("solver-option: [cur.solver=rx]\n")
    code, _, err = run(capsys, "compress", "--config", config, "--model", "resnet20_cifar",
                       "--input-shape", "3,32,32", "--method", "cur", "--rank", "8",
                       "--solver-option", "cur.seed=3", "svd.solver=exact", "--no-latency",
                       "--allow-slower",
                       "--quiet", "--out", tmp_path / "o")
    assert code == 0, err
    plan = rc.load_plan(tmp_path / "o" / "plan.json")
    cur = [lp for lp in plan.layers.values() if lp.method == "cur"]
    assert len(cur) > 10 and all(lp.options == {"solver": "rx", "seed": 3} for lp in cur)
    # an option of a method the run never uses would be ignored: refused (CP under --method cur)
    code, _, err = run(capsys, "compress", "--model", "resnet20_cifar", "--input-shape",
                       "3,32,32", "--method", "cur", "--rank", "8", "--solver-option",
                       "cp.tol=1e-5", "--no-latency", "--allow-slower", "--quiet", "--out",
                       tmp_path / "o2")
    assert code == 2 and "cp is not among the methods this run uses" in err
    from rankcut.cli import _solver_options

    # YAML 1.1 reads 1e-5 as text; the option is a number, checked before any work
    assert _solver_options(["cp.tol=1e-5", "cp.max_iter=7", "cp.solver=als_qr"]) == {
        "cp": {"tol": 1e-5, "max_iter": 7, "solver": "als_qr"}}


def test_latency_engine_and_table_flags(capsys, tmp_path, fake_latency):
    """--latency-engine onnxruntime plans with an ONNX Runtime table: kept in the
    --latency-table file, or in the machine's cache without one; a file of another engine is a
    one-line user error."""
    import os

    # time by weights: a factorized layer (fewer weights) runs faster than dense
    fake_latency(lambda m: 1e-3 + 1e-4 * sum(p.numel() for p in m.parameters()))
    common = ["compress", "--model", "resnet20_cifar", "--input-shape", "3,32,32", "--method",
              "svd", "--target", "macs=2x", "--no-latency"]
    table = tmp_path / "t.json"
    code, _, err = run(capsys, *common, "--latency-engine", "onnxruntime", "--latency-table",
                       table, "--out", tmp_path / "o")
    assert code == 0, err
    assert json.loads(table.read_text())["setting"]["engine"] == "onnxruntime"
    plan = rc.load_plan(tmp_path / "o" / "plan.json")
    assert plan.meta["latency"]["table"]["engine"] == "onnxruntime"
    code, _, err = run(capsys, *common, "--latency-engine", "eager", "--latency-table", table,
                       "--out", tmp_path / "o2")
    assert code == 2 and "latency table: " in err and "onnxruntime times" in err
    assert len(err.strip().splitlines()) == 1
    # without --latency-engine the engine is eager, its default: the file is refused too
    code, _, err = run(capsys, *common, "--latency-table", table, "--out", tmp_path / "o4")
    assert code == 2 and "onnxruntime times" in err
    code, _, err = run(capsys, *common, "--latency-engine", "onnxruntime", "--out",
                       tmp_path / "o3")
    assert code == 0, err
    cached = [json.loads(f.read_text())["setting"]["engine"]
              for f in Path(os.environ["RANKCUT_CACHE"]).glob("latency-*.json")]
    assert cached == ["onnxruntime"]


def test_compress_end_to_end_on_resnet20(weights, shared_data, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "compress", "--model", "resnet20_cifar", "--weights", weights, "--data",
        "cifar10", "--data-dir", shared_data, "--method", "tucker", "--target", "macs=2x",
        "--calib", 64, "--eval-limit", 200, "--finetune-steps", 3, "--distill",
        "--batch-size", 32, "--out", out, "--quiet",
        "--allow-slower")  # (at batch 1 on a CPU no 2x plan of ResNet-20 runs faster)
    assert code == 0, err
    for name in ["plan.json", "model.safetensors", "report.json", "report.md"]:
        assert (out / name).stat().st_size > 0, name
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG and p.stat().st_size > 1000 for p in pngs)
    small = rc.load(create("resnet20_cifar"), out).eval()
    assert rc.load_plan(out / "plan.json").active
    test = rc.data.dataset("cifar10", "test", root=shared_data, limit=200,
                           transform=rc.data.transforms("cifar10", train=False,
                                                        normalization="resnet20_cifar"))
    direct = evaluate(small, test)
    report = json.loads((out / "report.json").read_text())
    text = json.dumps(report)
    assert f"{direct['top1']:.2f}" in (out / "report.md").read_text()
    assert str(round(direct["top1"], 4))[:5] in text
    # the command recorded is the one run (main(argv), not this process's sys.argv)
    assert report["meta"]["command"].startswith("rankcut compress --model resnet20_cifar ")
    assert shlex.split(report["meta"]["command"])[-2:] == ["--quiet", "--allow-slower"]

    code, stdout, _ = run(capsys, "evaluate", "--model", "resnet20_cifar", "--compressed", out,
                          "--data", "cifar10", "--data-dir", shared_data, "--eval-limit", 200)
    assert code == 0 and f"top-1 {direct['top1']:.2f}%" in stdout
    code, stdout, _ = run(capsys, "benchmark", "--model", "resnet20_cifar", "--compressed", out,
                          "--input-shape", "3,32,32", "--batches", 1, 4, "--repeats", 5,
                          "--fused")
    assert code == 0 and "speed-up" in stdout
    rows = [line.split() for line in stdout.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("plain", "1"), ("fused", "1"), ("plain", "4"),
                                            ("fused", "4")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[4].endswith("x") for r in rows)
    code, stdout, _ = run(capsys, "benchmark", "--model", "resnet20_cifar", "--compressed", out,
                          "--input-shape", "3,32,32", "--batches", 2, "--repeats", 3,
                          "--engine", "onnxruntime")
    assert code == 0 and "ONNX Runtime on the CPU" in stdout
    assert [line.split()[:2] for line in stdout.splitlines()[2:]] == [["fused", "2"]]
    code, _, err = run(capsys, "export", "--model", "resnet20_cifar", "--compressed", out,
                       "--input-shape", "3,32,32", "--format", "torchscript", "--output",
                       tmp_path / "m.pt")
    assert code == 0, err
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert not any(m.original_name.startswith("BatchNorm") for m in scripted.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # BatchNorm folded into the convolutions: equal to rounding
        assert torch.allclose(scripted(x), small(x), atol=1e-4)

    # seed 000's transfer learning: a new MNIST head on the frozen compressed backbone
    code, stdout, err = run(
        capsys, "transfer", "--model", "resnet20_cifar", "--compressed", out, "--data", "mnist",
        "--data-dir", shared_data, "--image-size", 32, "--train-limit", 256, "--eval-limit",
        200, "--finetune-steps", 4, "--batch-size", 32, "--lr", 0.05, "--out",
        tmp_path / "t", "--quiet")
    assert code == 0, err
    moved = rc.load(create("resnet20_cifar", num_classes=10), tmp_path / "t").eval()
    kept, new = small.state_dict(), moved.state_dict()
    assert set(kept) == set(new)
    assert all(torch.equal(new[k], v) for k, v in kept.items() if not k.startswith("linear."))
    assert not torch.equal(new["linear.weight"], kept["linear.weight"])
    mnist = rc.data.dataset("mnist", "test", root=shared_data, limit=200,
                            transform=rc.data.transforms("mnist", train=False, size=32,
                                                         normalization="resnet20_cifar"))
    top1 = evaluate(moved, mnist)["top1"]
    assert f"top-1 {top1:.2f}%" in stdout
    record = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert record["test"]["top1"] == pytest.approx(top1) and record["num_classes"] == 10
    assert record["train_examples"] == 256 and record["backbone"] == str(out)
    assert shlex.split(record["command"])[:2] == ["rankcut", "transfer"]


def test_sweep_and_analyze_write_tables_and_plots(weights, shared_data, capsys, tmp_path):
    code, stdout, err = run(
        capsys, "sweep", "--model", "resnet20_cifar", "--weights", weights, "--data", "cifar10",
        "--data-dir", shared_data, "--eval-limit", 100, "--methods", "svd", "tucker",
        "--targets", "macs=1.5x", "macs=2x", "--calib", 0, "--allow-slower", "--latency",
        "--latency-batch", 4, "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert len(doc["points"]) == 4
    assert all(p["macs_ratio"] >= float(p["target"][5:-1]) for p in doc["points"])
    assert all(p["speedup"] == pytest.approx(p["dense_latency_ms"] / p["latency_ms"])
               for p in doc["points"])
    assert doc["latency"]["batch"] == 4
    assert "speed-up (measured)" in (tmp_path / "s" / "sweep.md").read_text()
    for png in ("sweep.png", "sweep_latency.png"):
        assert (tmp_path / "s" / png).read_bytes()[:8] == PNG

    code, stdout, err = run(
        capsys, "analyze", "--model", "resnet20_cifar", "--weights", weights, "--data",
        "cifar10", "--data-dir", shared_data, "--calib", 64, "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    assert (tmp_path / "a" / "analysis.json").stat().st_size > 0
    assert "layer1.0.conv1" in stdout


def test_sweep_points_checkpoint_each_in_its_own_folder(shared_data, capsys, tmp_path):
    """--checkpoint-dir with several points: each fine-tunes into its own subfolder (one folder
    for all made the second point resume the first's run, or write over it); a rerun with
    --resume picks each one up."""
    argv = ["sweep", "--model", "tests.test_bad_inputs_cli:tiny", "--data", "cifar10",
            "--data-dir", shared_data, "--eval-limit", 20, "--methods", "svd", "--targets",
            "params=1.5x", "params=2x", "--calib", 0, "--allow-slower",
            "--finetune-steps", 1, "--batch-size", 8, "--min-params", 0,
            "--checkpoint-dir", tmp_path / "ck", "--resume", "--quiet"]
    written = {}
    for out in ("s", "again"):
        code, _, err = run(capsys, *argv, "--out", tmp_path / out)
        assert code == 0, err
        written[out] = {p: p.stat().st_mtime_ns for p in (tmp_path / "ck").rglob("*")
                        if p.is_file()}
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["svd-params1.5x",
                                                                   "svd-params2x"]
    # picked up, not trained again: the second run wrote no checkpoint
    assert written["s"] and written["again"] == written["s"]
    first, again = (json.loads((tmp_path / o / "sweep.json").read_text())["points"]
                    for o in ("s", "again"))
    assert [p["top1"] for p in first] == [p["top1"] for p in again]


def test_sweep_skips_a_target_the_guard_refuses_and_keeps_the_rest(shared_data, capsys, tmp_path,
                                                                    fake_latency):
    """A world where a whole model pays 1 ms a conv beyond its weights' time: a small cut
    saves less than its extra convs cost and the guard refuses it; a deep cut pays. The sweep
    reports the refused point and keeps the other (one refusal used to end the sweep with
    nothing written); with every point refused it is a one-line error."""
    def ms(module):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        return sum(m.weight.numel() * 1e-3 for m in convs) + (
            1.0 * len(convs) if len(convs) > 1 else 0.0)

    fake_latency(ms)
    argv = ["sweep", "--model", "tests.test_bad_inputs_cli:tiny", "--data", "cifar10",
            "--data-dir", shared_data, "--eval-limit", 20, "--methods", "svd", "--calib", 0,
            "--min-params", 0, "--quiet"]
    code, _, err = run(capsys, *argv, "--targets", "params=1.2x", "params=4x",
                         "--out", tmp_path / "s")
    assert code == 0, err
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["target"] for p in doc["points"]] == ["params=4x"]
    assert [p["target"] for p in doc["skipped"]] == ["params=1.2x"]
    assert "cannot be met no slower" in doc["skipped"][0]["error"]
    assert "No plan:" in (tmp_path / "s" / "sweep.md").read_text()
    code, _, err = run(capsys, *argv, "--targets", "params=1.2x", "--out", tmp_path / "t")
    assert code == 2 and "no point of the sweep could be planned" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


def test_multistage_accuracy_floor_is_checked_on_held_out_training_data(weights, shared_data,
                                                                         capsys, tmp_path):
    """--min-accuracy is a choice made on data: it is checked on --val-split examples held out
    of the training split (and not trained on), never on the test images."""
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "compress", "--model", "resnet20_cifar", "--weights", weights, "--data",
        "cifar10", "--data-dir", shared_data, "--method", "tucker", "--target", "macs=1.05x",
        "--schedule", "multistage", "--rounds", 2, "--min-accuracy", 10, "--val-split", 96,
        "--min-params", 30000, "--allow-slower", "--calib", 32, "--eval-limit", 50,
        "--finetune-steps", 1, "--batch-size", 32, "--no-latency", "--out", out, "--quiet")
    assert code == 0, err
    stages = json.loads((out / "report.json").read_text())["meta"]["stages"]
    assert len(stages) == 2 and all(s["val"]["n"] == 96 for s in stages)
    # the held-out part is neither trained nor calibrated on: the rest of the training split is
    from rankcut.cli import _Context, build_parser

    args = build_parser().parse_args(["compress", "--model", "resnet20_cifar", "--data",
                                      "cifar10", "--data-dir", str(shared_data), "--target",
                                      "macs=2x", "--out", str(tmp_path / "o")])
    ctx = _Context(args)
    held = ctx.hold_out(96)
    rest = ctx.dataset("train", train_transform=True)
    assert len(held) == 96 and len(rest) == 50000 - 96
    assert not set(held.indices) & set(rest.indices)


def test_transfer_sizes_the_head_by_the_dataset_not_by_the_labels_it_read(capsys, tmp_path):
    """CIFAR-100 in its binary version without the class-name file: the head was sized from
    the largest label among the --train-limit examples read (4 classes here), and the test
    split's labels up to 99 then failed the evaluation after training."""
    from safetensors import safe_open

    folder = tmp_path / "data" / "cifar-100-binary"
    folder.mkdir(parents=True)

    def records(labels) -> bytes:  # (coarse label, fine label, 3072 pixels) each
        return b"".join(bytes([0, y]) + bytes(3 * 32 * 32) for y in labels)

    (folder / "train.bin").write_bytes(records([0, 1, 2, 3, 1, 0, 2, 3]))
    (folder / "test.bin").write_bytes(records([0, 50, 99, 7]))
    code, _, err = run(capsys, "transfer", "--model", "resnet20_cifar", "--data", "cifar100",
                       "--data-dir", tmp_path / "data", "--train-limit", 8,
                       "--finetune-steps", 1, "--batch-size", 4, "--out", tmp_path / "t",
                       "--quiet")
    assert code == 0, err
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        assert f.get_slice("linear.weight").get_shape()[0] == 100
