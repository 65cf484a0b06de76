"""The catalogue of bad inputs (issue 10, part B): the command line, save/load, data, training
and export answer each with a clear error naming the bad input, and nothing is written, lost or
silently wrong.

Every command-line case asserts exit code 2, exactly one line on stderr that names the flag,
config key or file at fault (no traceback), and that the test's folder is byte-for-byte as it
was (no output folder appears, no input changes). API cases assert the exception type, the name
in its message, and that inputs are unchanged. A tiny model defined here (``TINY``) keeps the few
cases that run a compression to about a second.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import rankcut as rc
from rankcut import atomic
from rankcut.cli import build_parser
from rankcut.defaults import COMPRESS
from rankcut.train import finetune
from tests._cli import run


def tiny(num_classes: int = 10) -> nn.Module:
    """Two convs and a classifier; plans and compresses in well under a second."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def not_a_module():
    return 42


class _Picky(nn.Module):
    """A model that checks its input's size itself (as torchvision's ViT does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        assert x.shape[-1] == 8, f"expected 8 features, got {x.shape[-1]}"
        return self.fc(x)


def picky():
    return _Picky()


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, x, mask):
        return self.fc(x * mask)


def two_inputs():
    return _TwoInputs()


def raises_key_error():
    return {}["no such layer"]


TINY = f"{__name__}:tiny"
# the tiny model, planned by an explicit rule (the latency guard off: its layers are too small
# to time meaningfully)
T = ["--model", TINY, "--input-shape", "3,8,8", "--no-latency", "--quiet"]
PLAN_FLAGS = ["--method", "svd", "--rank", "4", "--allow-slower"]
# the S: the ResNet-20 at 2x fewer MACs (plans in about a second)
S = ["--model", "resnet20_cifar", "--input-shape", "3,32,32", "--method", "svd", "--target",
     "macs=2x", "--no-latency", "--allow-slower", "--quiet"]


# ---------------------------------------------------------------------------------- helpers


def tree(folder) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its contents (links by target)."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                state[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                state[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    state[rel] = hashlib.sha256(f.read()).hexdigest()
    return state


def assert_refused(code, err, *names):
    """Exit code 2 and one line, ``rankcut: error: ...``, that names each of ``names``."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("rankcut: error: ") and "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def tiny_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return tiny(num_classes).state_dict()


class _Mkdir:
    """A pickle that would create a folder when unpickled: running code from a weights file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def cifar_records(labels) -> bytes:
    rows = [np.asarray(labels, np.uint8)[:, None],
            np.random.default_rng(0).integers(0, 256, (len(labels), 3072), dtype=np.uint8)]
    return np.concatenate(rows, 1).tobytes()


def idx(array: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    return head + array.astype(np.uint8).tobytes()


# --------------------------------------------------------- command line: refused up front
# Each case: (id, setup(tmp) -> argv, names the error line must contain). The setup makes the
# inputs in tmp; the run must leave tmp exactly as the setup left it.

def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _weights_text(tmp):
    _write(tmp / "w.th", b"this is not a checkpoint\n")
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.th", "--out", tmp / "o"]


def _weights_empty(tmp):
    _write(tmp / "w.th", b"")
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.th", "--out", tmp / "o"]


def _weights_truncated_safetensors(tmp):
    save_file(tiny_state(), tmp / "w.safetensors")
    data = (tmp / "w.safetensors").read_bytes()
    _write(tmp / "w.safetensors", data[:len(data) // 2])
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.safetensors", "--out", tmp / "o"]


def _weights_truncated_th(tmp):
    torch.save(tiny_state(), tmp / "w.th")
    data = (tmp / "w.th").read_bytes()
    _write(tmp / "w.th", data[:len(data) // 2])
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.th", "--out", tmp / "o"]


def _weights_code_pickle(tmp):
    _write(tmp / "w.th", pickle.dumps({"weight": _Mkdir(tmp / "pwned")}))
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.th", "--out", tmp / "o"]


def _weights_pickle_named_safetensors(tmp):
    _write(tmp / "w.safetensors", pickle.dumps({"weight": torch.zeros(2)}))
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.safetensors", "--out", tmp / "o"]


def _weights_of_another_model(tmp):
    save_file(nn.Linear(4, 2).state_dict(), tmp / "w.safetensors")
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.safetensors", "--out", tmp / "o"]


def _weights_other_shapes(tmp):
    save_file(tiny_state(num_classes=5), tmp / "w.safetensors")
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w.safetensors", "--out", tmp / "o"]


def _weights_nan_evaluate(tmp):
    state = tiny_state()
    state["2.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, tmp / "w.safetensors")
    (tmp / "data").mkdir()
    return ["evaluate", "--model", TINY, "--weights", tmp / "w.safetensors", "--data", "cifar10",
            "--data-dir", tmp / "data"]


def _weights_missing(tmp):
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "nope.th", "--out", tmp / "o"]


def _cifar_binary_labels_out_of_range(tmp):
    _write(tmp / "cifar-10-batches-bin/test_batch.bin", cifar_records([3, 88, 1]))
    return ["evaluate", "--model", TINY, "--data", "cifar10", "--data-dir", tmp]


def _out_is_a_file(tmp):
    _write(tmp / "o", b"precious\n")
    return ["compress", *T, *PLAN_FLAGS, "--out", tmp / "o"]


def _out_under_a_file(tmp):
    _write(tmp / "f", b"precious\n")
    return ["compress", *T, *PLAN_FLAGS, "--out", tmp / "f" / "o"]


def _out_not_rankcut(tmp):
    _write(tmp / "o" / "thesis.tex", b"years of work\n")
    return ["compress", *T, *PLAN_FLAGS, "--out", tmp / "o"]


def _transfer_out_a_compress_output(tmp):
    """Every rankcut save holds a plan.json: a compress output (its report beside) was taken
    for an earlier transfer output and replaced whole."""
    for name in ("plan.json", "model.safetensors", "report.json", "report.md"):
        _write(tmp / "o" / name, b"{}")
    (tmp / "data").mkdir()
    return ["transfer", "--model", TINY, "--data", "cifar10", "--data-dir", tmp / "data",
            "--quiet", "--out", tmp / "o"]


def _compress_out_a_transfer_output(tmp):
    for name in ("plan.json", "model.safetensors", "transfer.json"):
        _write(tmp / "o" / name, b"{}")
    return ["compress", *T, *PLAN_FLAGS, "--out", tmp / "o"]


def _sweep_out_not_rankcut(tmp):
    _write(tmp / "o" / "notes.txt", b"keep\n")
    (tmp / "data").mkdir()
    return ["sweep", "--model", TINY, "--data", "cifar10", "--data-dir", tmp / "data",
            "--targets", "macs=2x", "--out", tmp / "o", "--quiet"]


def _export_output_is_a_folder(tmp):
    _write(tmp / "m.onnx" / "keep.txt", b"keep\n")
    return ["export", "--model", TINY, "--input-shape", "3,8,8", "--output", tmp / "m.onnx"]


def _export_output_under_a_file(tmp):
    _write(tmp / "f", b"precious\n")
    return ["export", "--model", TINY, "--input-shape", "3,8,8", "--output", tmp / "f/m.onnx"]


def _model_not_a_module(tmp):
    return ["compress", "--model", "os:getcwd", "--input-shape", "3,8,8", *PLAN_FLAGS,
            "--out", tmp / "o"]


def _model_takes_no_num_classes(tmp):
    return ["compress", "--model", f"{__name__}:not_a_module", "--num-classes", 3,
            "--input-shape", "3,8,8", *PLAN_FLAGS, "--out", tmp / "o"]


def _compress(*extra):
    return lambda tmp: ["compress", *T, *PLAN_FLAGS, *extra, "--out", tmp / "o"]


def _compress_plain(*extra):
    return lambda tmp: ["compress", *T, *extra, "--out", tmp / "o"]


def _saved_plan(tmp):
    _write(tmp / "p" / "plan.json", rc.Plan({"2": rc.LayerPlan("svd", (4,))}).to_json().encode())
    return tmp / "p" / "plan.json"


def _plan_inside_out(tmp):
    _write(tmp / "o" / "plan.json", rc.Plan({"2": rc.LayerPlan("svd", (4,))}).to_json().encode())
    _write(tmp / "o" / "report.json", b"{}")  # an earlier compress output
    return ["compress", *T, "--plan", tmp / "o" / "plan.json", "--out", tmp / "o"]


def _config_with_debug(tmp):
    _write(tmp / "c.yaml", b"debug: true\n")
    return ["compress", *T, *PLAN_FLAGS, "--config", tmp / "c.yaml", "--out", tmp / "o"]


def _plan_with(*flags):
    return lambda tmp: ["compress", *T, "--plan", _saved_plan(tmp), *flags, "--out", tmp / "o"]


def _plan_with_config_method(tmp):
    _write(tmp / "c.yaml", b"method: tucker\n")
    return ["compress", *T, "--plan", _saved_plan(tmp), "--config", tmp / "c.yaml",
            "--out", tmp / "o"]


def _plan_not_a_plan(tmp):
    torch.save(tiny_state(), tmp / "text.th")
    return ["compress", *T, "--plan", tmp / "text.th", "--out", tmp / "o"]


def _plan_rank_too_large(tmp):
    _write(tmp / "p" / "plan.json",
           rc.Plan({"2": rc.LayerPlan("svd", (1000,))}).to_json().encode())
    return ["compress", *T, "--plan", tmp / "p" / "plan.json", "--out", tmp / "o"]


def _config_inside_out(tmp):
    _write(tmp / "o" / "report.json", b"{}")  # an earlier output, holding the run's config
    _write(tmp / "o" / "run.yaml", b"method: svd\n")
    return ["compress", *T, *PLAN_FLAGS, "--config", tmp / "o" / "run.yaml", "--out", tmp / "o"]


def _analyze_batch_size(tmp):
    return ["analyze", "--model", TINY, "--input-shape", "3,8,8", "--quiet", "--batch-size", 4,
            "--out", tmp / "o"]


def _export_eval_limit(tmp):
    (tmp / "data").mkdir(exist_ok=True)
    return ["export", "--model", TINY, "--data", "cifar10", "--data-dir", tmp / "data",
            "--eval-limit", 5, "--output", tmp / "m.pt", "--format", "torchscript", "--quiet"]


def _plan_missing(tmp):
    return ["compress", *T, "--plan", tmp / "nowhere", "--out", tmp / "o"]


def _config(text: str, command: str = "compress"):
    def setup(tmp):
        _write(tmp / "c.yaml", text.encode())
        base = ["compress", *T, *PLAN_FLAGS] if command == "compress" else [command]
        return [*base, "--config", tmp / "c.yaml", "--out", tmp / "o"]
    return setup


def _benchmark(*extra):
    def setup(tmp):
        _saved_plan(tmp)
        return ["benchmark", "--model", TINY, "--input-shape", "3,8,8", "--compressed",
                tmp / "p", *extra]
    return setup


def _weights_with_compressed(tmp):
    save_file(tiny_state(), str(tmp / "w.safetensors"))
    return [*_benchmark()(tmp), "--weights", tmp / "w.safetensors"]


def _sweep(*extra):
    def setup(tmp):
        (tmp / "data").mkdir()
        return ["sweep", "--model", TINY, "--data", "cifar10", "--data-dir", tmp / "data",
                "--quiet", *extra, "--out", tmp / "o"]
    return setup


def _transfer_head(head):
    def setup(tmp):
        (tmp / "data").mkdir()
        return ["transfer", "--model", TINY, "--data", "cifar10", "--data-dir", tmp / "data",
                "--head", head, "--quiet", "--out", tmp / "t"]
    return setup


def _checkpoint_held(tmp):
    """An interrupted run's checkpoint, and the same command again without --resume: its
    first checkpoint replaced the earlier one, in silence."""
    (tmp / "data").mkdir()
    _write(tmp / "ck" / "last.pt", b"an earlier run's checkpoint")
    return ["compress", *T, *PLAN_FLAGS, "--data", "cifar10", "--data-dir", tmp / "data",
            "--finetune-steps", 1, "--checkpoint-dir", tmp / "ck", "--out", tmp / "o"]


def _checkpoint_inside_out(tmp):
    (tmp / "data").mkdir()
    return ["compress", *T, *PLAN_FLAGS, "--data", "cifar10", "--data-dir", tmp / "data",
            "--finetune-steps", 1, "--checkpoint-dir", tmp / "o" / "ckpt", "--out", tmp / "o"]


def _compressed_not_rankcut(tmp):
    (tmp / "c").mkdir()
    return ["benchmark", "--model", TINY, "--input-shape", "3,8,8", "--compressed", tmp / "c"]


def _compressed_rank_overflow(tmp):
    """A saved folder whose plan was edited to a rank no layer can have (not verified)."""
    plan = rc.Plan({"2": rc.LayerPlan("svd", (4,))})
    rc.save(rc.apply(tiny().eval(), plan), tmp / "c", plan=plan)
    doc = json.loads((tmp / "c" / "plan.json").read_text())
    doc["layers"]["2"]["ranks"] = [10**20]
    (tmp / "c" / "plan.json").write_text(json.dumps(doc))
    return ["export", "--model", TINY, "--input-shape", "3,8,8", "--compressed", tmp / "c",
            "--no-verify", "--output", tmp / "m.onnx"]


def _plan_with_internal_option(tmp):
    _write(tmp / "p" / "plan.json",
           rc.Plan({"2": rc.LayerPlan("svd", (4,), options={"cov": 1})}).to_json().encode())
    return ["compress", *T, "--plan", tmp / "p" / "plan.json", "--out", tmp / "o"]


def _idx_header_beyond_the_file(tmp):
    head = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 0xFFFFFFFF, 0x0FFFFFFF, 1)
    _write(tmp / "mnist/t10k-images-idx3-ubyte", head + bytes(100))
    _write(tmp / "mnist/t10k-labels-idx1-ubyte", idx(np.array([0, 9, 2])))
    return ["evaluate", "--model", TINY, "--data", "mnist", "--data-dir", tmp, "--quiet"]


def _weights_folder(tmp):
    (tmp / "w").mkdir()
    return ["compress", *T, *PLAN_FLAGS, "--weights", tmp / "w", "--out", tmp / "o"]


def _image_tree(tmp, *folders):
    """Two 8x8 PNG images of classes a and b in each of ``folders`` (relative to tmp/imgs)."""
    from PIL import Image

    for folder in folders:
        for cls in ("a", "b"):
            (tmp / "imgs" / folder / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "imgs" / folder / cls /
                                                                 "0.png")
    return tmp / "imgs"


def _evaluate_images(*folders, flags=()):
    def setup(tmp):
        root = _image_tree(tmp, *folders)
        return ["evaluate", "--model", TINY, "--data", "imagefolder", "--data-dir", root,
                "--image-size", 8, "--quiet", *flags]
    return setup


def _export_over_its_weights(tmp):
    save_file(tiny_state(), tmp / "w.safetensors")
    return ["export", "--model", TINY, "--input-shape", "3,8,8", "--weights",
            tmp / "w.safetensors", "--output", tmp / "w.safetensors"]


def _export_into_its_compressed_folder(tmp):
    _write(tmp / "cc" / "plan.json", rc.Plan({"2": rc.LayerPlan("svd", (4,))}).to_json().encode())
    return ["export", "--model", TINY, "--input-shape", "3,8,8", "--compressed", tmp / "cc",
            "--output", tmp / "cc" / "model.safetensors"]


def _model_asserts_on_the_data(command):
    def setup(tmp):
        _write(tmp / "cifar-10-batches-bin/test_batch.bin", cifar_records([3, 1, 2]))
        return [command, "--model", f"{__name__}:picky", "--data", "cifar10", "--data-dir", tmp,
                "--quiet", *(["--method", "svd", "--rank", "4", "--allow-slower", "--out",
                              tmp / "o"] if command == "compress" else [])]
    return setup


def _plan_data_aware_no(tmp):
    plan = rc.Plan({"2": rc.LayerPlan("svd", (4,), options={"data_aware": "no"})})
    _write(tmp / "p" / "plan.json", plan.to_json().encode())
    return ["compress", *T, "--plan", tmp / "p" / "plan.json", "--out", tmp / "o"]


def _empty_test_split(tmp):
    root = _image_tree(tmp, "train")
    (root / "test" / "a").mkdir(parents=True)
    return ["compress", "--model", TINY, "--num-classes", 2, "--data", "imagefolder",
            "--data-dir", root, "--image-size", 8, "--normalization", "none", *PLAN_FLAGS,
            "--quiet", "--out", tmp / "o"]


def _data_aware_plan_without_data(tmp):
    plan = rc.Plan({"2": rc.LayerPlan("svd", (4,), options={"data_aware": True})})
    _write(tmp / "p" / "plan.json", plan.to_json().encode())
    return ["compress", *T, "--plan", tmp / "p" / "plan.json", "--out", tmp / "o"]


CLI_CASES = [
    # outputs that would replace the command's own inputs
    ("export-over-its-weights", _export_over_its_weights,
     ["--output", "--weights", "an input of this command"]),
    ("export-into-its-compressed-folder", _export_into_its_compressed_folder,
     ["--output", "inside --compressed", "an input of this command"]),
    # a model's own checks on the data's first example, and a forward of two inputs
    ("model-asserts-on-the-data", _model_asserts_on_the_data("compress"),
     ["--data", "(1, 3, 32, 32)", "expected 8 features", "--image-size"]),
    ("model-asserts-on-the-data-evaluate", _model_asserts_on_the_data("evaluate"),
     ["AssertionError", "expected 8 features"]),
    ("model-forward-of-two-inputs", lambda tmp: [
        "compress", "--model", f"{__name__}:two_inputs", "--input-shape", "8", *PLAN_FLAGS,
        "--out", tmp / "o"], ["--input-shape", "mask", "Python API"]),
    # calibration data asked for but not given
    ("data-aware-plan-without-calibration", _data_aware_plan_without_data,
     ["--plan", "2 (1 layer(s))", "--synthetic-calib"]),
    ("plan-data-aware-not-a-boolean", _plan_data_aware_no,
     ["--plan", "'2'", "data_aware: expected true or false", "'no'"]),
    ("imagefolder-with-an-empty-test-split", _empty_test_split,
     ["--data", "test split of imagefolder", "no examples"]),
    ("imagefolder-without-data-dir", lambda tmp: ["evaluate", "--model", TINY, "--data",
                                                  "imagefolder"], ["--data imagefolder",
                                                                   "--data-dir"]),
    # 1. weights files rankcut cannot read: one clear error naming the file and the formats
    ("weights-text-file", _weights_text, ["w.th", "not a readable torch checkpoint",
                                          "safetensors"]),
    ("weights-empty-file", _weights_empty, ["w.th", "is empty", "safetensors"]),
    ("weights-truncated-safetensors", _weights_truncated_safetensors,
     ["w.safetensors", "not a readable safetensors file"]),
    ("weights-truncated-th", _weights_truncated_th, ["w.th", "not a readable torch checkpoint"]),
    ("weights-pickle-with-code", _weights_code_pickle, ["w.th", "refused"]),
    ("weights-pickle-named-safetensors", _weights_pickle_named_safetensors,
     ["w.safetensors", "not a safetensors file"]),
    ("weights-of-another-model", _weights_of_another_model,
     ["w.safetensors", "missing 0.weight", "unexpected bias, weight"]),
    ("weights-other-shapes", _weights_other_shapes,
     ["w.safetensors", "size mismatch: 6.weight (5, 32) in the file, (10, 32) in the model"]),
    ("weights-nan-evaluate", _weights_nan_evaluate, ["w.safetensors", "'2.weight'", "NaN"]),
    ("weights-missing", _weights_missing, ["--weights", "nope.th", "not found"]),
    # 2. data: labels out of range are a data error naming the file
    ("cifar-binary-labels-out-of-range", _cifar_binary_labels_out_of_range,
     ["test_batch.bin", "label 88", "0..9"]),
    # 3. output folders checked before any work
    ("out-is-a-file", _out_is_a_file, ["--out", "is a file, not a folder"]),
    ("out-under-a-file", _out_under_a_file, ["--out", "which is a file"]),
    # 10. a non-empty folder that is no rankcut output needs --overwrite
    ("out-not-a-rankcut-output", _out_not_rankcut, ["--out", "not empty", "--overwrite"]),
    ("transfer-out-a-compress-output", _transfer_out_a_compress_output,
     ["--out", "no transfer.json", "--overwrite"]),
    ("compress-out-a-transfer-output", _compress_out_a_transfer_output,
     ["--out", "no report.json", "--overwrite"]),
    ("sweep-out-not-a-sweep-output", _sweep_out_not_rankcut,
     ["--out", "no sweep.json", "--overwrite"]),
    # 4. export destinations
    ("export-output-is-a-folder", _export_output_is_a_folder, ["--output", "is a folder"]),
    ("export-output-under-a-file", _export_output_under_a_file, ["--output", "which is a file"]),
    # 5. a model constructor that does not build an nn.Module
    ("model-not-a-module", _model_not_a_module, ["--model", "os:getcwd", "not an nn.Module"]),
    ("model-rejects-num-classes", _model_takes_no_num_classes,
     ["--model", "not_a_module", "num_classes="]),
    # 6. numbers checked at the start
    ("lr-nan", _compress("--lr", "nan"), ["--lr", "nan"]),
    ("lr-negative", _compress("--lr", "-0.1"), ["--lr", "-0.1"]),
    ("lr-inf", _compress("--lr", "inf"), ["--lr", "inf"]),
    # sequential fitting needs calibration data (the tiny model has no --data here)
    ("sequential-without-data", _compress("--sequential"),
     ["--sequential", "--data", "--synthetic-calib"]),
    # 7. a plan together with explicit planning flags is a conflict
    ("plan-with-method", _plan_with("--method", "tucker"), ["--plan", "--method"]),
    ("plan-with-target", _plan_with("--target", "macs=3x"), ["--plan", "--target"]),
    ("plan-with-rank", _plan_with("--rank", "8"), ["--plan", "--rank"]),
    ("plan-with-config-method", _plan_with_config_method, ["--plan", "--method"]),
    ("plan-with-multistage", _plan_with("--schedule", "multistage"), ["--plan", "multistage"]),
    ("plan-with-solver-option", _plan_with("--solver-option", "cur.solver=rx"),
     ["--plan", "--solver-option"]),
    ("plan-with-exclude", _plan_with("--exclude", "0"), ["--plan", "--exclude"]),
    ("plan-with-min-params", _plan_with("--min-params", "0"), ["--plan", "--min-params"]),
    ("plan-not-a-plan", _plan_not_a_plan, ["--plan", "text.th", "plan.json"]),
    ("plan-missing", _plan_missing, ["--plan", "nowhere", "plan.json"]),
    ("plan-rank-too-large", _plan_rank_too_large,
     ["--plan", "layer '2' has ranks [1000], above what it can hold ([32])"]),
    ("config-inside-out", _config_inside_out, ["--config", "lies inside --out"]),
    ("analyze-batch-size", _analyze_batch_size, ["--batch-size", "analyze does not use it"]),
    ("export-eval-limit", _export_eval_limit, ["--eval-limit", "export evaluates nothing"]),
    # 8. config values of the wrong type name the key
    ("config-flag-string-false", _config('no-latency: "false"\n'),
     ["--config", "'no-latency'", "true or false"]),
    ("config-flag-string-true", _config('allow_slower: "true"\n'),
     ["--config", "'allow_slower'", "true or false"]),
    ("config-distill-string", _config('distill: "no"\n'), ["--config", "'distill'"]),
    ("config-int-word", _config("calib: ten\n"), ["--config", "'calib'", "integer", "'ten'"]),
    ("config-int-float", _config("batch-size: 2.5\n"), ["--config", "'batch-size'", "integer"]),
    ("config-float-word", _config("lr: fast\n"), ["--config", "'lr'", "number", "'fast'"]),
    ("config-bad-choice", _config("schedule: greedy\n"), ["--config", "'schedule'", "one_shot"]),
    ("config-list-for-single", _config("target: [macs=2x, macs=3x]\n"), ["--config", "'target'"]),
    ("config-is-a-folder", lambda tmp: (tmp / "cdir").mkdir() or [
        "compress", *T, *PLAN_FLAGS, "--config", tmp / "cdir", "--out", tmp / "o"],
     ["--config", "is a folder"]),
    ("config-null-for-a-required-flag", _config("out: ~\n"), ["--config", "'out'", "null"]),
    ("config-null-for-a-flag-with-a-default", _config("seed: ~\n"),
     ["--config", "'seed'", "null", "its default is 0"]),
    # an output folder that would swallow the current folder or an input
    ("out-is-the-current-folder", lambda tmp: ["compress", *T, *PLAN_FLAGS, "--out", "."],
     ["--out", "current folder"]),
    ("weights-inside-out", lambda tmp: ["compress", *T, *PLAN_FLAGS, "--weights",
                                        tmp / "o" / "w.safetensors", "--out", tmp / "o"],
     ["--weights", "inside --out"]),
    # 12. normalisation, image trees and class counts
    ("normalization-without-data", _compress("--normalization", "cifar10"),
     ["--normalization", "--data"]),
    ("normalization-unknown", _compress("--data", "cifar10", "--normalization", "bogus"),
     ["--normalization", "bogus"]),
    ("imagefolder-without-statistics", _evaluate_images("train", "test"),
     ["--normalization", "imagefolder", "none"]),
    ("imagefolder-train-without-test", _evaluate_images("train", "extra",
                                                        flags=["--normalization", "none"]),
     ["imagefolder", "train/", "test/", "val/"]),
    ("num-classes-below-the-data", _evaluate_images("train", "validation", flags=[
        "--normalization", "none", "--num-classes", 1]), ["class 1", "1 outputs",
                                                          "--num-classes"]),
    ("calib-without-data", _compress("--calib", 16), ["--calib", "--data"]),
    # solver options: the form, the method, the option and its value, before any work
    ("solver-option-no-equals", _compress("--solver-option", "cur.solver"),
     ["--solver-option", "METHOD.KEY=VALUE", "'cur.solver'"]),
    ("solver-option-no-method", _compress("--solver-option", "solver=rx"),
     ["--solver-option", "METHOD.KEY=VALUE"]),
    ("solver-option-unknown-method", _compress("--solver-option", "auto.solver=rx"),
     ["--solver-option", "'auto' is not a method", "cur"]),
    ("solver-option-of-an-unused-method", _compress("--solver-option", "cur.solver=rx"),
     ["--solver-option: cur is not among the methods this run uses", "--method svd"]),
    ("solver-option-unknown-value", _compress("--solver-option", "cur.solver=qr"),
     ["--solver-option: cur: ", "solver", "'rx'", "'qr'"]),
    ("solver-option-unknown-key", _compress("--solver-option", "svd.max_iter=5"),
     ["--solver-option: svd: ", "max_iter"]),
    ("solver-option-value-out-of-range", _compress("--solver-option", "cp.max_iter=0"),
     ["--solver-option: cp: ", "max_iter", "integer >= 1", "0"]),
    ("solver-option-float-for-an-integer", _compress("--solver-option", "cp.max_iter=1e3"),
     ["--solver-option: cp: ", "max_iter", "integer", "1000.0"]),
    ("solver-option-negative-tol", _compress("--solver-option", "tucker.tol=-1"),
     ["--solver-option: tucker: ", "tol", ">= 0"]),
    ("rounds-with-one-shot", _compress("--rounds", 2), ["--rounds", "multistage"]),
    ("latency-batch-0", _compress("--latency-batch", 0), ["--latency-batch", ">= 1"]),
    ("device-garbage", _compress("--device", "gpu0"), ["--device", "gpu0"]),
    ("device-absent-gpu", _compress("--device", "cuda:64"), ["--device", "cuda:64",
                                                            "not on this machine"]),
    # 11. and the other integer flags' ranges
    ("benchmark-batches-0", _benchmark("--batches", 0), ["--batches", "0"]),
    ("benchmark-repeats-0", _benchmark("--repeats", 0), ["--repeats", ">= 1"]),
    ("num-classes-0", _compress("--num-classes", 0), ["--num-classes", ">= 1"]),
    ("calib-negative", _compress("--calib", -5), ["--calib", "-5"]),
    ("batch-size-0", _compress("--batch-size", 0), ["--batch-size", ">= 1"]),
    ("finetune-epochs-0", _compress("--finetune-epochs", 0), ["--finetune-epochs", ">= 1"]),
    ("finetune-steps-0", _compress("--finetune-steps", 0), ["--finetune-steps", ">= 1"]),
    ("eval-limit-0", _compress("--eval-limit", 0), ["--eval-limit", ">= 1"]),
    ("image-size-0", _compress("--image-size", 0), ["--image-size", ">= 1"]),
    ("threads-0", _compress("--threads", 0), ["--threads", ">= 1"]),
    ("rounds-0", _compress("--rounds", 0), ["--rounds", ">= 1"]),
    ("steps-per-layer-0", _compress("--steps-per-layer", 0), ["--steps-per-layer", ">= 1"]),
    ("min-params-negative", _compress("--min-params", -1), ["--min-params", ">= 0"]),
    ("rank-multiple-0", _compress("--rank-multiple", 0), ["--rank-multiple", ">= 1"]),
    ("speed-slack-negative", _compress("--speed-slack", -0.5), ["--speed-slack", ">= 0"]),
    ("min-accuracy-150", _compress("--min-accuracy", 150), ["--min-accuracy", "150"]),
    ("val-split-1.5", _compress("--val-split", 1.5), ["--val-split", "1.5"]),
    ("val-split-0", _compress("--val-split", 0), ["--val-split", "fraction"]),
    ("val-split-inf", _compress("--val-split", "inf"), ["--val-split", "inf"]),
    ("val-split-without-floor", _compress("--val-split", 0.2), ["--val-split", "--min-accuracy"]),
    ("input-shape-with-data", _compress("--data", "cifar10"), ["--input-shape", "--data"]),
    # flags that would do nothing with the others given
    ("lr-without-fine-tuning", _compress("--lr", 0.01), ["--lr", "only with fine-tuning"]),
    ("optimizer-without-fine-tuning", _compress("--optimizer", "adamw"),
     ["--optimizer", "only with fine-tuning"]),
    ("one-shot-checkpoints-without-fine-tuning", _compress("--checkpoint-dir", "ck"),
     ["--checkpoint-dir", "only with fine-tuning"]),
    ("latency-batch-with-allow-slower", _compress("--latency-batch", 32),
     ["--latency-batch", "--allow-slower"]),
    ("speed-slack-with-allow-slower", _compress("--speed-slack", 0.5),
     ["--speed-slack", "--allow-slower"]),
    ("multistage-without-target", _compress("--schedule", "multistage"),
     ["--schedule multistage", "--target"]),
    ("eval-limit-without-data", _compress("--eval-limit", 5), ["--eval-limit", "--data"]),
    ("image-size-without-data", _compress("--image-size", 64), ["--image-size", "--data"]),
    ("no-verify-without-compressed",
     lambda tmp: ["export", "--model", TINY, "--input-shape", "3,8,8", "--no-verify",
                  "--output", tmp / "m.onnx"], ["--no-verify", "--compressed"]),
    ("export-device",
     lambda tmp: ["export", "--model", TINY, "--input-shape", "3,8,8", "--device", "cpu",
                  "--output", tmp / "m.onnx"], ["--device", "export"]),
    ("export-batch-size",
     lambda tmp: ["export", "--model", TINY, "--input-shape", "3,8,8", "--batch-size", "8",
                  "--output", tmp / "m.onnx"], ["--batch-size", "export"]),
    ("epochs-and-steps-for-transfer",
     lambda tmp: ["transfer", "--model", TINY, "--data", "cifar10", "--finetune-epochs", 1,
                  "--finetune-steps", 5, "--out", tmp / "t"],
     ["--finetune-epochs", "--finetune-steps"]),
    ("plan-inside-out", _plan_inside_out, ["--plan", "inside --out"]),
    # argparse's own errors: one line too, not the usage text
    ("not-a-number", _compress("--batch-size", "two"), ["--batch-size", "invalid int value"]),
    ("unknown-command", lambda tmp: ["frobnicate"], ["invalid choice", "frobnicate"]),
    ("debug-in-a-config", _config_with_debug, ["--config", "unknown key 'debug'"]),
    ("input-shape-zero", lambda tmp: ["compress", "--model", TINY, "--input-shape", "3,0,8",
                                      *PLAN_FLAGS, "--out", tmp / "o"], ["--input-shape"]),
    # a shape the model cannot run on: named with the batch tried, before any planning
    ("input-shape-two-numbers", lambda tmp: ["compress", "--model", TINY, "--input-shape",
                                             "3,8", *PLAN_FLAGS, "--out", tmp / "o"],
     ["--input-shape", "(1, 3, 8)"]),
    ("input-shape-channels", lambda tmp: ["export", "--model", TINY, "--input-shape", "1,8,8",
                                          "--output", tmp / "m.onnx"],
     ["--input-shape", "(1, 1, 8, 8)", "channels"]),
    ("input-shape-model-assertion", lambda tmp: ["compress", "--model", f"{__name__}:picky",
                                                 "--input-shape", "5", *PLAN_FLAGS, "--out",
                                                 tmp / "o"],
     ["--input-shape", "(1, 5)", "expected 8 features"]),
    ("unknown-method", _compress_plain("--method", "tensor_train", "--target", "macs=2x"),
     ["--method", "tensor_train"]),
    ("bad-rank-rule", _compress_plain("--rank", "energy=2"), ["--rank", "energy"]),
    ("bad-target", _compress_plain("--target", "macs=0.5x"), ["--target", "macs=0.5x"]),
    ("epochs-and-steps", _compress("--data", "cifar10", "--finetune-epochs", 1,
                                   "--finetune-steps", 1), ["--finetune-epochs",
                                                            "--finetune-steps"]),
    ("finetune-without-data", _compress("--finetune-steps", 2), ["--finetune-steps", "--data"]),
    ("resume-without-checkpoint-dir", _compress("--resume"), ["--resume", "--checkpoint-dir"]),
    ("checkpoint-dir-inside-out", _checkpoint_inside_out, ["--checkpoint-dir", "--out"]),
    ("checkpoint-dir-of-an-earlier-run", _checkpoint_held, ["--checkpoint-dir", "last.pt",
                                                            "--resume"]),
    ("unknown-dataset", _compress("--data", "imagenet"), ["--data", "imagenet"]),
    ("compressed-not-rankcut", _compressed_not_rankcut, ["--compressed", "plan.json"]),
    # sweep parses all its targets and methods before the first row
    ("sweep-bad-second-target", _sweep("--targets", "macs=2x", "macs=0.5x"),
     ["--targets", "macs=0.5x"]),
    ("sweep-bad-method", _sweep("--methods", "svd", "magic"), ["--methods", "magic"]),
    ("sweep-single-target-flag", _sweep("--target", "macs=2x"), ["--target", "--targets"]),
    # a repeated list flag: argparse would keep the last only (conv1 compressed after all)
    ("exclude-twice", _compress("--exclude", "0", "--exclude", "2"),
     ["--exclude: given 2 times", "after one --exclude"]),
    ("sweep-methods-twice", _sweep("--methods", "svd", "--methods=tucker"),
     ["--methods: given 2 times"]),
    # sweep --latency times its plans: it takes the timing's batch and engine, not the
    # planning's table and slack, which --allow-slower leaves unread
    ("sweep-latency-table-with-allow-slower", _sweep("--allow-slower", "--latency",
                                                    "--latency-table", "t.json"),
     ["--latency-table", "--allow-slower"]),
    # a spectral rank rule and a method without singular values: found after the other
    # methods' points were planned and fine-tuned, before
    ("sweep-vbmf-with-cp", _sweep("--rank", "vbmf", "--methods", "svd", "cp"),
     ["--rank vbmf", "--methods cp", "no singular values"]),
    ("benchmark-compressed-without-weights", _benchmark(),
     ["--compressed", "model.safetensors"]),
    ("benchmark-device-with-onnxruntime", _benchmark("--engine", "onnxruntime", "--device",
                                                     "cpu"), ["--device", "onnxruntime"]),
    ("transfer-head-missing", _transfer_head("fc"), ["--head", "no module 'fc'"]),
    # found before the data is read and the model compressed, not after
    ("transfer-head-a-conv", _transfer_head("0"), ["--head", "'0' is a Conv2d", "nn.Linear"]),
    ("transfer-head-empty", _transfer_head(""), ["--head", "name of a module"]),
    ("compress-vbmf-with-cp", _compress_plain("--method", "cp", "--rank", "vbmf"),
     ["--rank vbmf", "--method cp", "no singular values"]),
    ("min-accuracy-a-fraction", _compress("--min-accuracy", 0.9, "--schedule", "multistage"),
     ["--min-accuracy", "above 1", "90 for 90%"]),
    ("sequential-with-layerwise", _compress("--schedule", "layerwise", "--sequential",
                                            "--synthetic-calib", 8),
     ["--sequential", "layerwise"]),
    ("speed-slack-without-a-budget", _compress_plain("--method", "svd", "--rank", 4,
                                                     "--speed-slack", 0.2),
     ["--speed-slack", "MACs --target"]),
    ("speed-slack-with-a-latency-target", _compress_plain(
        "--method", "svd", "--target", "latency=1.5x", "--speed-slack", 0.2),
     ["--speed-slack", "latency target"]),
    ("weights-with-compressed", _weights_with_compressed,
     ["--weights", "--compressed holds every weight"]),
    # options the layers pass to the solvers themselves are not the user's to set
    ("solver-option-set-by-rankcut", _compress("--solver-option", "svd.cov=5"),
     ["--solver-option", "cov", "sets it itself"]),
    ("solver-option-tucker-modes", _compress_plain("--method", "tucker", "--rank", "4",
                                                   "--allow-slower", "--solver-option",
                                                   "tucker.modes=5"), ["modes"]),
    ("plan-option-set-by-rankcut", _plan_with_internal_option, ["--plan", "'2'", "cov"]),
    # integers beyond what torch's sizes hold: refused with the flag's range
    ("input-shape-overflow", lambda tmp: ["export", "--model", TINY, "--input-shape",
                                          "3,8,99999999999999999999", "--output",
                                          tmp / "m.onnx"], ["--input-shape"]),
    ("latency-batch-overflow", _compress("--latency-batch", 10**20),
     ["--latency-batch", "<= 2147483647"]),
    ("seed-overflow", _compress("--seed", 2**64), ["--seed", "<= 9223372036854775807"]),
    ("num-classes-overflow", _compress("--num-classes", 10**20), ["--num-classes"]),
    ("threads-too-many", _compress("--threads", 2**31), ["--threads", "<= 1024"]),
    ("compressed-rank-overflow", _compressed_rank_overflow,
     ["--compressed", "plan.json", "'2'", "ranks"]),
    ("idx-header-beyond-the-file", _idx_header_beyond_the_file,
     ["t10k-images-idx3-ubyte", "truncated"]),
    ("weights-a-folder", _weights_folder, ["--weights", "is a folder"]),
]


@pytest.mark.parametrize("setup, names", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input_up_front(setup, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path)
    before = tree(tmp_path)
    code, out, err = run(capsys, *argv)
    assert_refused(code, err, *names)
    assert tree(tmp_path) == before  # nothing written, nothing changed, no code run
    assert "top-1" not in out and "wrote" not in out


def test_a_path_under_home_written_with_a_tilde_is_checked_where_it_is_written(
        capsys, tmp_path, monkeypatch):
    """--flag=~/x (or a config file's value) reaches rankcut unexpanded: the checks must read
    the same home folder the work would write (before, a checkpoint there was not seen, and a
    fresh run removed it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    _write(tmp_path / "home" / "ck" / "last.pt", b"an earlier run's checkpoint")
    before = tree(tmp_path)
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--data", "cifar10", "--data-dir",
                       tmp_path / "data", "--finetune-steps", 1, "--checkpoint-dir=~/ck",
                       "--out", tmp_path / "o")
    assert_refused(code, err, "--checkpoint-dir", "last.pt", "--resume")
    assert tree(tmp_path) == before
    config = tmp_path / "c.yaml"
    config.write_text("checkpoint-dir: ~/ck\n")
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--data", "cifar10", "--data-dir",
                       tmp_path / "data", "--finetune-steps", 1, "--config", "~/../c.yaml",
                       "--out", tmp_path / "o")
    assert_refused(code, err, "--checkpoint-dir", "last.pt", "--resume")


def test_out_that_holds_the_data_root_found_by_default_is_refused(capsys, tmp_path,
                                                                  monkeypatch):
    """--overwrite replaces --out whole: a data root found from $RANKCUT_DATA inside it (as
    an explicit --data-dir inside it) is refused before any work, the data left as it was."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "o" / "data" / "cifar-10-batches-bin" / "test_batch.bin",
           cifar_records([3, 1, 2]))
    monkeypatch.setenv("RANKCUT_DATA", str(tmp_path / "o" / "data"))
    before = tree(tmp_path)
    code, _, err = run(capsys, "compress", "--model", TINY, "--data", "cifar10", *PLAN_FLAGS,
                       "--quiet", "--out", tmp_path / "o", "--overwrite")
    assert_refused(code, err, "--out", "data root", "RANKCUT_DATA")
    assert tree(tmp_path) == before


def test_an_input_reached_through_a_symbolic_link_is_still_an_input(capsys, tmp_path,
                                                                   monkeypatch):
    """export --output onto its --weights, or --out holding the data root, through a link:
    refused as written straight (the file or folder it leads to would be replaced)."""
    monkeypatch.chdir(tmp_path)
    save_file(tiny_state(), _write(tmp_path / "real" / "w.safetensors", b""))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = tree(tmp_path)
    code, _, err = run(capsys, "export", "--model", TINY, "--input-shape", "3,8,8", "--weights",
                       tmp_path / "real" / "w.safetensors", "--output",
                       tmp_path / "link" / "w.safetensors")
    assert_refused(code, err, "--output", "--weights", "an input of this command")
    assert tree(tmp_path) == before
    _write(tmp_path / "out" / "data" / "cifar-10-batches-bin" / "test_batch.bin",
           cifar_records([3, 1, 2]))
    (tmp_path / "out-link").symlink_to(tmp_path / "out")
    monkeypatch.setenv("RANKCUT_DATA", str(tmp_path / "out-link" / "data"))
    before = tree(tmp_path)
    code, _, err = run(capsys, "compress", "--model", TINY, "--data", "cifar10", *PLAN_FLAGS,
                       "--quiet", "--out", tmp_path / "out", "--overwrite")
    assert_refused(code, err, "--out", "data root")
    assert tree(tmp_path) == before


def test_keep_freed_memory_is_applied_and_refused_where_malloc_is_not_glibc(capsys, tmp_path,
                                                                            monkeypatch):
    from rankcut import profile

    calls = []
    monkeypatch.setattr(profile, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "export", "--model", TINY, "--input-shape", "3,8,8",
                         "--keep-freed-memory", "--output", tmp_path / "m.onnx", "--format",
                         "torchscript")
    assert code == 0 and calls == [1] and (tmp_path / "m.onnx").is_file(), err
    monkeypatch.setattr(profile, "keep_freed_memory", lambda: False)
    code, _, err = run(capsys, "export", "--model", TINY, "--input-shape", "3,8,8",
                       "--keep-freed-memory", "--output", tmp_path / "n.pt", "--format",
                       "torchscript")
    assert_refused(code, err, "--keep-freed-memory", "not glibc")
    assert not (tmp_path / "n.pt").exists()


def test_a_latency_target_is_recognised_in_any_case():
    """--latency-batch with --allow-slower is refused unless a latency target is asked for
    (then the plan is timed); the target's spelling is parse_target's, case and all."""
    from rankcut.cli import UserError, _check_args, _with_config

    base = ["compress", *T, "--allow-slower", "--latency-batch", "2", "--out", "o"]
    for target in ("LATENCY=0.99", " Latency=2x", "latency=2x"):
        _check_args(_with_config(build_parser(), [*base, "--target", target]))
    with pytest.raises(UserError, match="--latency-batch: --allow-slower"):
        _check_args(_with_config(build_parser(), [*base, "--target", "MACS=2x"]))


def test_a_user_model_module_that_does_not_parse_names_the_file_and_line(capsys, tmp_path,
                                                                         monkeypatch):
    _write(tmp_path / "broken_model_mod.py", b"def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "compress", "--model", "broken_model_mod:f", "--input-shape",
                       "3,8,8", *PLAN_FLAGS, "--out", tmp_path / "o")
    assert_refused(code, err, "broken_model_mod:f", "does not parse", "broken_model_mod.py",
                   "line 1")


def test_a_failure_in_the_model_s_own_code_is_one_line_with_exit_code_1(capsys, tmp_path,
                                                                        monkeypatch):
    """Not a user error rankcut can name (a KeyError raised by the model's constructor): one
    line naming its type, exit code 1, no traceback; --debug raises it."""
    monkeypatch.chdir(tmp_path)
    argv = ["compress", "--model", f"{__name__}:raises_key_error", "--input-shape", "3,8,8",
            *PLAN_FLAGS, "--out", tmp_path / "o"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("rankcut: error: KeyError: ") and "'no such layer'" in err
    with pytest.raises(KeyError, match="no such layer"):
        run(capsys, *argv, "--debug")
    assert not (tmp_path / "o").exists()


def test_out_on_a_read_only_file_system_is_refused_before_any_work(capsys, tmp_path,
                                                                   monkeypatch):
    """Item 3: we run as root, so chmod does not stop writes; a read-only mount is mocked at
    os.mkdir (which the output check's probe and atomic_folder both go through)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    planned = []
    compress_module = importlib.import_module("rankcut.compress")  # rc.compress is the function
    monkeypatch.setattr(compress_module, "compress", lambda *a, **k: planned.append(1))
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--out", read_only / "o")
    assert_refused(code, err, "--out", "Read-only file system")
    assert not planned and os.listdir(read_only) == []


# ------------------------------------------------------------------------ the API catalogue

def test_atomic_path_surfaces_the_real_error_when_the_clean_up_fails_too(tmp_path, monkeypatch):
    """Item 3: on a read-only file system the clean-up of the temporary file fails as well; the
    error raised must be the write's, not the clean-up's."""
    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "clean-up failed")

    monkeypatch.setattr("pathlib.Path.unlink", unlink)
    with pytest.raises(OSError, match="Read-only file system") as caught:
        with atomic.atomic_path(tmp_path / "f.json"):
            raise OSError(errno.EROFS, "Read-only file system")
    assert "clean-up" not in str(caught.value)
    assert not (tmp_path / "f.json").exists()


def test_atomic_folder_leaves_the_old_folder_whole_when_the_block_fails(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "plan.json").write_text("old plan")
    (out / "report.json").write_text("old report")
    before = tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(out) as tmp:
            (tmp / "plan.json").write_text("new plan")
            raise KeyboardInterrupt  # killed midway
    assert tree(tmp_path) == before  # no mix, no temporary sibling left


def test_atomic_folder_refuses_to_replace_a_regular_file(tmp_path):
    (tmp_path / "o").write_text("precious")
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        with atomic.atomic_folder(tmp_path / "o"):
            pass
    assert (tmp_path / "o").read_text() == "precious" and os.listdir(tmp_path) == ["o"]


@pytest.mark.parametrize("option, value", [
    ("lr", float("nan")), ("lr", 0.0), ("momentum", 1.5), ("momentum", float("nan")),
    ("weight_decay", -1e-4), ("weight_decay", float("inf")), ("kd_alpha", float("nan")),
    ("kd_alpha", 2.0), ("kd_temperature", 0.0), ("kd_temperature", float("nan")),
    ("label_smoothing", 1.0), ("batch_size", 0), ("steps", 0), ("warmup_steps", -1),
    ("lr_schedule", "linear"),
])
def test_finetune_checks_its_arguments_before_any_work(option, value):
    """Item 6: numbers out of range (NaN included) are refused before anything trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    options = {"steps": 2, "batch_size": 8, "progress": False, option: value}
    with pytest.raises(ValueError, match=rf"^{option}: expected .*, got {re.escape(repr(value))}$"):
        finetune(model, (x, y), **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_finetune_lost_its_ambiguous_schedule_argument():
    """finetune's learning-rate schedule is ``lr_schedule``; ``schedule`` is compress's."""
    model = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="schedule"):
        finetune(model, (torch.randn(8, 4), torch.randint(0, 3, (8,))), steps=1, batch_size=8,
                 schedule="constant", progress=False)


def test_data_readers_refuse_labels_out_of_range(tmp_path):
    """Item 2, the python version of CIFAR and MNIST's idx: a label outside the classes is an
    error naming the file (not an IndexError deep in the loss)."""
    images = np.zeros((2, 3072), np.uint8)
    folder = tmp_path / "cifar10/cifar-10-batches-py"
    _write(folder / "test_batch", pickle.dumps({"data": images, "labels": [1, 10]}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: label 10 of record 1 is outside 0\.\.9"):
        rc.data.dataset("cifar10", "test", root=tmp_path)
    _write(tmp_path / "mnist/t10k-images-idx3-ubyte", idx(np.zeros((3, 28, 28))))
    _write(tmp_path / "mnist/t10k-labels-idx1-ubyte", idx(np.array([0, 9, 200])))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: label 200 of record 2"):
        rc.data.dataset("mnist", "test", root=tmp_path)
    _write(tmp_path / "c100/cifar-100-binary/test.bin",
           np.concatenate([np.array([[1, 100]], np.uint8), np.zeros((1, 3072), np.uint8)],
                          1).tobytes())
    with pytest.raises(ValueError, match=r"test.bin: label 100 .* outside 0\.\.99"):
        rc.data.dataset("cifar100", "test", root=tmp_path / "c100")


def test_data_readers_read_no_more_than_the_file_holds(tmp_path):
    """A record limit far beyond the file reads what is there (no allocation of the limit's
    size); a damaged CIFAR python batch is a ValueError naming the file, whatever the pickle
    machinery raised."""
    from rankcut.data._formats import read_cifar_binary_batch

    path = _write(tmp_path / "b.bin", cifar_records([3, 1, 2]))
    images, labels = read_cifar_binary_batch(path, 1, limit=2**40)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [3, 1, 2]
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, protocol=2)
    assert b"latin1" in good  # numpy writes its arrays' bytes through a latin1 codec
    folder = tmp_path / "cifar10/cifar-10-batches-py"
    _write(folder / "test_batch", good.replace(b"latin1", b"Datin1"))
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR python batch \(LookupError"):
        rc.data.dataset("cifar10", "test", root=tmp_path)


def test_an_image_too_large_for_pil_names_the_file(capsys, tmp_path, monkeypatch):
    from PIL import Image

    _image_tree(tmp_path, "test")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # an 8x8 image now counts as a bomb
    code, _, err = run(capsys, "evaluate", "--model", TINY, "--data", "imagefolder",
                       "--data-dir", tmp_path / "imgs", "--normalization", "none", "--quiet")
    assert_refused(code, err, "too large to read", ".png")


def test_a_plan_meta_without_both_predicted_ratios_still_reports(capsys, tmp_path):
    """meta is free-form: a hand-edited predicted entry without both ratios leaves the
    report's predicted line out instead of failing after all the work."""
    plan = rc.Plan({"2": rc.LayerPlan("svd", (4,))},
                   meta={"predicted": {"macs_ratio": 2.0}, "note": "by hand"})
    _write(tmp_path / "p" / "plan.json", plan.to_json().encode())
    code, _, err = run(capsys, "compress", *T, "--plan", tmp_path / "p" / "plan.json", "--out",
                       tmp_path / "o")
    assert code == 0, err
    report = (tmp_path / "o" / "report.md").read_text()
    assert "factorized" in report and "the plan predicted" not in report


def test_plans_and_paths_of_the_wrong_type_name_the_argument(tmp_path, saved):
    from rankcut.io import save_plan

    folder, small = saved
    with pytest.raises(ValueError, match="meta: expected a mapping"):
        rc.Plan({}, meta=5)
    with pytest.raises(ValueError, match="layers: expected a mapping"):
        rc.Plan("abc")
    with pytest.raises(ValueError, match="plan: expected a rankcut.Plan, got dict"):
        save_plan({"a": 1}, tmp_path / "p.json")
    with pytest.raises(IsADirectoryError, match="a folder; save_plan writes a JSON file"):
        save_plan(rc.Plan(), folder)
    for call in (lambda: rc.load_plan(None), lambda: rc.load(tiny(), None),
                 lambda: rc.save(small, None),
                 lambda: rc.export(tiny(), None, "onnx", example_inputs=torch.rand(1, 3, 8, 8))):
        with pytest.raises(ValueError, match="path: expected a file or folder path"):
            call()
    assert not (tmp_path / "p.json").exists()


def test_export_refuses_a_folder_or_a_path_under_a_file(tmp_path):
    (tmp_path / "m.onnx").mkdir()
    (tmp_path / "f").write_text("precious")
    for path in (tmp_path / "m.onnx", tmp_path / "f" / "m.pt"):
        with pytest.raises(ValueError, match="path: .*(is a folder|which is a file)"):
            rc.export(tiny(), path, "torchscript", example_inputs=torch.rand(1, 3, 8, 8))
    assert os.listdir(tmp_path / "m.onnx") == [] and (tmp_path / "f").read_text() == "precious"


def test_models_create_names_the_problem():
    with pytest.raises(ValueError, match="num_classes: expected an int >= 1, got 0"):
        rc.models.create("resnet20_cifar", num_classes=0)
    with pytest.raises(TypeError, match="'os:getcwd' built a str, not an nn.Module"):
        rc.models.create("os:getcwd")


# --------------------------------------------------- save/load: altered folders are refused

@pytest.fixture()
def saved(tmp_path):
    """A tiny compressed model saved by rankcut, and the model itself."""
    torch.manual_seed(0)
    small = rc.apply(tiny().eval(), rc.Plan({"2": rc.LayerPlan("svd", (4,))}))
    rc.save(small, tmp_path / "saved", plan=rc.Plan({"2": rc.LayerPlan("svd", (4,))}))
    return tmp_path / "saved", small


def _edit_plan(folder, **meta):
    doc = json.loads((folder / "plan.json").read_text())
    for key, value in meta.items():
        if value is None:
            doc["meta"].pop(key, None)
        else:
            doc["meta"][key] = value
    (folder / "plan.json").write_text(json.dumps(doc))


def test_benchmark_notes_page_faults_the_compressed_model_pays_glibc(saved, capsys,
                                                                    monkeypatch):
    """`rankcut benchmark` adds one note when a compressed model's pass took far more page
    faults than the original's under glibc's default malloc (what removes them), none when
    the counts are alike."""
    from rankcut import profile

    folder, _ = saved
    counts = {"dense_faults": 10.0, "compressed_faults": 10.0 + profile.NOTABLE_FAULTS}

    def fake_speedups(dense, small, x, batches, **kw):
        return [{"batch": b, "form": form, "engine": "eager", "dense_ms": 2.0,
                 "compressed_ms": 3.0, "speedup": 2 / 3, **counts}
                for b in batches for form in ("plain", "fused")]

    monkeypatch.setattr(profile, "speedups", fake_speedups)
    monkeypatch.setattr(profile, "allocator", lambda: "glibc")
    argv = ["benchmark", "--model", TINY, "--input-shape", "3,8,8", "--compressed", folder,
            "--batches", 1, 4, "--repeats", 1, "--device", "cpu"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: plain at batch 1, the compressed "
                                                   "model took 1,034 page faults a pass"), out
    counts["compressed_faults"] = 10.0
    code, out, err = run(capsys, *argv)
    assert code == 0 and "speed-up" in out and "note:" not in out, err


def test_load_refuses_a_plan_without_its_weights_hash(saved, capsys):
    """Item 9: rankcut always records the hash, so its absence means the folder was altered;
    verify=False / --no-verify load a hand-written plan."""
    folder, small = saved
    _edit_plan(folder, weights_sha256=None)
    before = tree(folder)
    with pytest.raises(ValueError, match="no weights_sha256.*verify=False"):
        rc.load(tiny(), folder)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(rc.load(tiny(), folder, verify=False)(x), small(x))
    argv = ["benchmark", "--model", TINY, "--input-shape", "3,8,8", "--compressed", folder,
            "--batches", 1, "--repeats", 1]
    code, _, err = run(capsys, *argv)
    assert_refused(code, err, "plan.json", "weights_sha256", "--no-verify")
    code, out, err = run(capsys, *argv, "--no-verify")
    assert code == 0 and "speed-up" in out, err
    assert tree(folder) == before


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_load_refuses_a_weights_file_outside_the_folder(saved, tmp_path, where):
    folder, _ = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    if where == "parent":
        _edit_plan(folder, weights_file="../elsewhere/model.safetensors")
    elif where == "absolute":
        _edit_plan(folder, weights_file=str(elsewhere / "model.safetensors"))
    else:
        (folder / "link.safetensors").symlink_to(elsewhere / "model.safetensors")
        _edit_plan(folder, weights_file="link.safetensors")
    with pytest.raises(ValueError, match="weights_file .*(leaves|leads out of) the folder"):
        rc.load(tiny(), folder)
    with pytest.raises(ValueError, match="leaves|leads out of"):
        rc.load(tiny(), folder, verify=False)  # the opt-out is for the hash only


def test_load_refuses_non_finite_weights_naming_the_tensor(saved):
    folder, small = saved
    state = small.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state = {k: v.clone().contiguous() for k, v in state.items()}
    state[name].view(-1)[0] = float("inf")
    save_file(state, folder / "model.safetensors")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    _edit_plan(folder, weights_sha256=digest)  # consistent hash: the weights themselves are bad
    with pytest.raises(ValueError, match=f"tensor '{name}' holds NaN or infinite values"):
        rc.load(tiny(), folder)


def test_load_takes_a_base_whose_weights_are_not_set(saved):
    """The base model's weights are replaced by the saved ones: a base made with uninitialised
    (here NaN) weights, as skip_init or to_empty gives, loads."""
    folder, small = saved
    base = tiny()
    with torch.no_grad():
        for p in base.parameters():
            p.fill_(float("nan"))
    loaded = rc.load(base, folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 small.state_dict().values(), strict=True))


# ------------------------------------------------------- output folders: never a mix of runs

def test_an_earlier_output_is_replaced_whole(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text("{}")  # an earlier run's output ...
    (out / "stale.png").write_bytes(b"old plot")  # ... with a file this run does not write
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--out", out)
    assert code == 0, err
    names = sorted(os.listdir(out))
    assert "stale.png" not in names and {"plan.json", "model.safetensors", "report.json",
                                         "report.md"} <= set(names)
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temporary sibling left
    loaded = rc.load(tiny(), out)  # the new save, whole: it loads and is factorized
    assert rc.load_plan(out).active and any(
        isinstance(m, rc.layers.FactorizedLayer) for m in loaded.modules())


def test_overwrite_replaces_a_folder_that_is_no_rankcut_output(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("replace me")
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "plan.json").is_file()


def test_a_run_killed_before_its_report_leaves_the_earlier_output_untouched(capsys, tmp_path,
                                                                           monkeypatch):
    """Item 10: the plan and weights are written, then the run dies before the report: the
    folder still holds the earlier run, every file of it, and nothing of the new one."""
    out = tmp_path / "o"
    code, _, err = run(capsys, "compress", *T, *PLAN_FLAGS, "--out", out)
    assert code == 0, err
    before = tree(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rankcut.report.write_plots", killed)
    code, _, err = run(capsys, "compress", *T, "--method", "svd", "--rank", "2",
                       "--allow-slower", "--out", out)
    assert code == 130
    assert tree(tmp_path) == before


def test_plan_alone_applies_it_and_defaults_do_not_count_as_given(capsys, tmp_path):
    """Item 7's other side: argparse's defaults (--method auto, ...) are not a conflict."""
    plan = _saved_plan(tmp_path)
    code, _, err = run(capsys, "compress", *T, "--plan", plan, "--out", tmp_path / "o")
    assert code == 0, err
    assert rc.load_plan(tmp_path / "o")["2"].ranks == (4,)


def test_config_booleans_and_numbers_of_the_right_type_are_accepted(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("no-latency: true\nallow-slower: true\ncalib: 0\nrank: 4\nmethod: svd\n"
                      "exclude: '6'\n")
    code, _, err = run(capsys, "compress", "--model", TINY, "--input-shape", "3,8,8",
                       "--config", config, "--quiet", "--out", tmp_path / "o")
    assert code == 0, err


def test_cli_defaults_are_the_compress_table():
    """Part A: the command line's compression defaults come from rankcut.defaults.COMPRESS."""
    parser = build_parser()
    for argv in (["compress", "--model", "m", "--out", "o"],
                 ["sweep", "--model", "m", "--data", "cifar10", "--out", "o"]):
        args = parser.parse_args(argv)
        for key, value in COMPRESS.items():
            if argv[0] == "sweep" and key in ("schedule", "rounds", "synthetic_calib"):
                # sweep runs one-shot compressions only, and evaluates on --data
                assert not hasattr(args, key)
                continue
            assert getattr(args, key) == value, (argv[0], key)


# ---------------------------------------------------------- the real files in ../shared/data

def test_real_weights_of_the_wrong_model_name_the_keys(resnet20_weights, capsys, tmp_path):
    code, _, err = run(capsys, "compress", *S, "--model", "resnet32_cifar", "--weights",
                       resnet20_weights, "--out", tmp_path / "o")
    assert_refused(code, err, "resnet20-12fca82f.th", "missing layer1.3.conv1.weight")
    code, _, err = run(capsys, "compress", *S, "--weights", resnet20_weights, "--num-classes",
                       100, "--out", tmp_path / "o")
    assert_refused(code, err, "linear.weight (10, 64) in the file, (100, 64) in the model")
    assert os.listdir(tmp_path) == []


def test_real_weights_truncated(resnet20_weights, capsys, tmp_path):
    cut = tmp_path / "resnet20.th"
    cut.write_bytes(resnet20_weights.read_bytes()[:50_000])
    code, _, err = run(capsys, "compress", *S, "--weights", cut, "--out", tmp_path / "o")
    assert_refused(code, err, "resnet20.th", "not a readable torch checkpoint")
    assert os.listdir(tmp_path) == ["resnet20.th"]


def test_save_onto_a_file_says_it_writes_a_folder(saved, tmp_path):
    _, small = saved
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        rc.save(small, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_load_with_the_wrong_model_names_the_keys_and_shapes(saved):
    """A folder loaded on a base model of another size says which tensors differ (the state
    dict loader's own error spans lines, of which the CLI shows the first, empty one)."""
    folder, _ = saved
    with pytest.raises(ValueError, match=r"size mismatch: 6.weight \(10, 32\) in the file, "
                                         r"\(5, 32\) in the model"):
        rc.load(tiny(num_classes=5), folder)


def test_an_existing_checkpoint_folder_that_cannot_be_written_is_refused_up_front(
        capsys, tmp_path, monkeypatch):
    """Checkpoints are written into the folder (not beside it, as --out): an existing one is
    probed itself, before planning (the parent's probe passed it; the first checkpoint failed
    after the work). As root nothing is read-only, so the probe's answer is stood in for."""
    import rankcut.atomic as atomic

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    probe = atomic._not_writable
    monkeypatch.setattr(atomic, "_not_writable", lambda folder: "Permission denied" if
                        folder.name == "ck" else probe(folder))
    (tmp_path / "data").mkdir()
    code, _, err = run(capsys, "compress", "--model", TINY, "--no-latency", "--quiet",
                       *PLAN_FLAGS, "--finetune-steps", 1,
                       "--data", "cifar10", "--data-dir", tmp_path / "data",
                       "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "o")
    assert_refused(code, err, "--checkpoint-dir", "cannot write in", "Permission denied")
