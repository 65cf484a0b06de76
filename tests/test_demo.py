"""The embedded demo (``rankcut.demo``): trains a CNN on scikit-learn's digits, compresses it
3x in MACs, writes plan, weights and report, and the saved folder reloads to the same model."""

import contextlib
import importlib.util
import io
import json
import sys

import pytest
import torch

import rankcut as rc
from rankcut import demo

pytest.importorskip("sklearn")

HAS_REPORT = importlib.util.find_spec("rankcut.report") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = demo.run(out, epochs=3, finetune_epochs=1, seed=0, progress=False)
    res["printed"] = printed.getvalue()
    return res


def test_trains_well_and_keeps_the_accuracy_after_compression(result):
    before, after = result["top1"]
    assert before > 90
    assert after > before - 3


def test_meets_the_macs_target_and_factorizes_layers(result):
    dense, small = result["macs"]
    assert small <= dense / 3 * 1.01
    assert result["params"][1] < result["params"][0]
    assert result["plan"].active  # something was factorized
    assert all(ms > 0 for ms in result["latency_ms"])


def test_prints_the_before_after_table_and_the_methods(result):
    text = result["printed"]
    for row in ("params", "MACs per image", "latency, batch 1", "top-1", "wrote"):
        assert row in text
    for name in result["plan"].active:
        assert f"\n{name} " in text


def test_writes_non_empty_files(result):
    out = result["out_dir"]
    names = ["plan.json", "model.safetensors", demo.RECORD]
    if HAS_REPORT:
        names += ["report.json", "report.md"]
        assert list(out.glob("*.png")), "no plot written"
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {f.name for f in result["files"]} >= set(names)
    record = json.loads((out / demo.RECORD).read_text())  # the numbers printed
    assert record["top1"] == pytest.approx(result["top1"]) and record["seed"] == 0
    assert record["params"] == result["params"] and record["macs"] == result["macs"]
    assert [r["layer"] for r in record["layers"]] == [r["layer"] for r in result["layers"]]
    if HAS_REPORT:
        report = json.loads((out / "report.json").read_text())
        assert report["accuracy"]["original"]["top1"] == pytest.approx(result["top1"][0])


def test_saved_folder_reloads_to_the_same_predictions(result):
    out = result["out_dir"]
    plan = rc.load_plan(out)
    assert set(plan.active) == set(result["plan"].active)
    assert all(plan.layers[n].ranks == lp.ranks for n, lp in result["plan"].active.items())
    loaded = rc.load(demo.build_model(), out).eval()
    x = result["data"]["x_test"]
    with torch.no_grad():
        want = result["compressed"].eval()(x)
        got = loaded(x)
    torch.testing.assert_close(got, want)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_split_and_model_are_seeded():
    a, b = demo.load_data(1), demo.load_data(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["y_test"], demo.load_data(2)["y_test"])
    assert a["x_train"].shape[1:] == (1, 8, 8) and float(a["x_train"].max()) <= 1.0
    m1, m2 = demo.build_model(3), demo.build_model(3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


def test_main_passes_its_flags_to_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, **kw: seen.update(out=out, **kw))
    assert demo.main(["--out", "x", "--target", "params=2x", "--method", "svd", "--epochs", "2",
                      "--finetune-epochs", "0", "--seed", "5", "--quiet",
                      "--allow-slower"]) == 0
    assert seen == {"out": "x", "target": "params=2x", "method": "svd", "epochs": 2,
                    "finetune_epochs": 0, "seed": 5, "progress": False, "allow_slower": True}


def test_main_refuses_to_replace_a_folder_that_is_not_a_demo_output(monkeypatch, tmp_path,
                                                                     capsys):
    """The demo's folder is replaced whole at the end: a non-empty folder of something else is
    refused (its files would be deleted) unless --overwrite; an earlier demo output is not."""
    monkeypatch.setattr(demo, "run", lambda out, **kw: None)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path)])
    assert "not an earlier output" in capsys.readouterr().err
    assert demo.main(["--out", str(tmp_path), "--overwrite"]) == 0
    (tmp_path / "plan.json").write_text("{}")  # any rankcut save (a compress output) has one
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path)])
    (tmp_path / demo.RECORD).write_text("{}")
    assert demo.main(["--out", str(tmp_path)]) == 0


def test_the_cli_knows_the_demo_record_as_its_output_marker():
    from rankcut.cli import OUTPUT_MARKERS

    assert OUTPUT_MARKERS["demo"] == demo.RECORD


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install rankcut\[demo\]"):
        demo.load_data()


def test_rejects_bad_epochs(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        demo.run(tmp_path, epochs=0)
    with pytest.raises(ValueError, match="finetune_epochs"):
        demo.run(tmp_path, finetune_epochs=-1)


@pytest.mark.parametrize("refusal", [pytest.param("slower", marks=pytest.mark.slow),
                                     "unreachable"])  # ("slower": about 11 s; make test-all)
def test_plans_again_without_the_guard_only_when_it_refused_a_slower_plan(monkeypatch,
                                                                          tmp_path, refusal):
    """On a machine where the guard refuses the target as slower than dense, the demo plans
    again with allow_slower=True and says so; a target no plan meets at all is an error."""
    from rankcut.select import SlowerThanDense, TargetUnreachable

    calls, real = [], demo.compress

    def compress(model, x, plan_options, **kw):
        calls.append(plan_options["allow_slower"])
        if not plan_options["allow_slower"]:
            raise (SlowerThanDense if refusal == "slower" else TargetUnreachable)("target: no")
        return real(model, x, plan_options=plan_options, **kw)

    monkeypatch.setattr(demo, "compress", compress)
    printed = io.StringIO()
    if refusal == "unreachable":
        with pytest.raises(TargetUnreachable):
            demo.run(tmp_path / "out", epochs=1, finetune_epochs=0, progress=False)
        assert calls == [False]
        return
    with contextlib.redirect_stdout(printed):
        res = demo.run(tmp_path / "out", epochs=1, finetune_epochs=0, progress=False)
    assert calls == [False, True] and res["allow_slower"] is True
    assert "planning again with allow_slower=True" in printed.getvalue()


def test_main_says_a_bad_flag_in_one_line_before_training(monkeypatch, tmp_path, capsys):
    """A bad --target or --method is found before the CNN trains (it was compress's ValueError,
    a traceback, after minutes); --out the current folder is refused (it is replaced whole)."""
    monkeypatch.setattr(demo, "load_data", lambda seed: pytest.fail("trained before refusing"))
    for flags, said in ((["--target", "macs=abc"], "target"), (["--method", "magic"], "method")):
        with pytest.raises(SystemExit) as stop:
            demo.main(["--out", str(tmp_path / "o"), *flags])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        demo.main(["--out", ".", "--overwrite"])
    assert "the current folder" in capsys.readouterr().err
