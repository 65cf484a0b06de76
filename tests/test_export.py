"""Export to ONNX and TorchScript: round trips, dynamic batch, the caller's model kept, atomic."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rankcut.export import export

from .conftest import DEVICES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Every kind of conv the exporters must handle, then BatchNorm, pooling and a Linear head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"),
        nn.Conv2d(8, 8, (3, 5), padding="same"),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from train mode
        model[8].running_mean.uniform_(-0.5, 0.5)
        model[8].running_var.uniform_(0.5, 2.0)
    return model


class FactorizedConv(nn.Module):
    """Mimics the CP layer: 1x1 S->R, depthwise (3,1) and (1,3) passes, 1x1 R->T with bias."""

    def __init__(self, s: int = 4, r: int = 3, t: int = 5):
        super().__init__()
        self.pointwise_in = nn.Conv2d(s, r, 1, bias=False)
        self.vertical = nn.Conv2d(r, r, (3, 1), padding=(1, 0), groups=r, bias=False)
        self.horizontal = nn.Conv2d(r, r, (1, 3), padding=(0, 1), groups=r, bias=False)
        self.pointwise_out = nn.Conv2d(r, t, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise_in(x)
        x = self.vertical(x)
        x = self.horizontal(x)
        return self.pointwise_out(x)


def run_onnx(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.cpu().numpy() for n, x in zip(names, inputs, strict=True)})


def load_torchscript(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load is deprecated (FutureWarning) in torch 2.10+
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x).cpu().numpy()
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("device", DEVICES)
def test_onnx_round_trip_with_dynamic_batch(tmp_path, device):
    model = small_cnn().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    path = export(model, tmp_path / "cnn.onnx", "onnx", x)

    assert path == tmp_path / "cnn.onnx" and path.is_file()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (out,) = run_onnx(path, x)
    np.testing.assert_allclose(out, eager(model, x), atol=1e-4, rtol=0)

    x5 = torch.randn(5, 3, 16, 16, device=device)  # a batch size the export never saw
    (out5,) = run_onnx(path, x5)
    assert out5.shape == (5, 5)
    np.testing.assert_allclose(out5, eager(model, x5), atol=1e-4, rtol=0)
    assert all(p.device.type == torch.device(device).type for p in model.parameters())


def test_onnx_static_batch_and_higher_opset(tmp_path):
    model, x = small_cnn(), torch.randn(1, 3, 16, 16)
    path = export(model, tmp_path / "cnn.onnx", example_inputs=(x,), opset=18, dynamic_batch=False)

    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 16, 16]


def test_factorized_module_exports_to_onnx(tmp_path):
    model, x = FactorizedConv(), torch.randn(2, 4, 9, 7)
    path = export(model, tmp_path / "cp.onnx", "onnx", x)

    for batch in (x, torch.randn(3, 4, 9, 7)):
        (out,) = run_onnx(path, batch)
        np.testing.assert_allclose(out, eager(model, batch), atol=1e-5, rtol=0)


# ~3 s, nearly all of it the dynamo-based exporter's first use
def test_onnx_falls_back_to_the_dynamo_exporter(tmp_path, monkeypatch):
    real_export = torch.onnx.export
    calls = []

    def torchscript_exporter_fails(*args, dynamo, **kwargs):
        calls.append(dynamo)
        if not dynamo:
            raise RuntimeError("simulated failure of the TorchScript-based exporter")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", torchscript_exporter_fails)
    model, x = FactorizedConv(), torch.randn(1, 4, 6, 6)  # batch 1: must still come out dynamic
    path = export(model, tmp_path / "cp.onnx", "onnx", x, opset=18)

    assert calls == [False, True]
    assert sorted(os.listdir(tmp_path)) == ["cp.onnx"]  # no side .data file, no temp file
    x3 = torch.randn(3, 4, 6, 6)
    (out,) = run_onnx(path, x3)
    np.testing.assert_allclose(out, eager(model, x3), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("method", ["script", "trace"])
@pytest.mark.parametrize("device", DEVICES)
def test_torchscript_round_trip(tmp_path, method, device):
    model = small_cnn().to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    path = export(model, tmp_path / "cnn.pt", "torchscript", x, method=method)

    loaded = load_torchscript(path)
    assert not loaded.training
    for batch in (x, torch.randn(4, 3, 16, 16, device=device)):
        with torch.no_grad():
            out = loaded(batch).cpu().numpy()
        np.testing.assert_allclose(out, eager(model, batch), atol=1e-5, rtol=0)


class TwoHeads(nn.Module):
    """A dict output, as torchvision's segmentation models give ({"out", "aux"})."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.body(x)
        return {"out": y, "aux": self.head(y.mean((2, 3)))}


@pytest.mark.parametrize(("format", "method"), [("onnx", "script"), ("torchscript", "script"),
                                                ("torchscript", "trace")])
def test_a_model_with_a_dict_output_exports_and_is_checked(tmp_path, format, method):
    """Its outputs were refused by the check (TypeError: a tensor or a tuple of tensors
    expected); trace also needs strict=False for a dict. The file's outputs are the dict's
    tensors in order."""
    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(2, 3, 10, 10)
    path = export(model, tmp_path / f"m.{format}", format, x, method=method)
    with torch.no_grad():
        want = model(x)
    if format == "onnx":
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input_0": x.numpy()})
    else:
        out = load_torchscript(path)(x)
        got = [out["out"].detach().numpy(), out["aux"].detach().numpy()]
    np.testing.assert_allclose(got[0], want["out"].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], want["aux"].numpy(), atol=1e-5, rtol=0)


def test_factorized_module_scripts(tmp_path):
    model, x = FactorizedConv(), torch.randn(2, 4, 9, 7)
    path = export(model, tmp_path / "cp.pt", "torchscript", x, method="script")

    loaded = load_torchscript(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), eager(model, x), atol=1e-6, rtol=0)


def test_script_needs_no_example_inputs_without_check(tmp_path):
    torch.manual_seed(0)
    model = FactorizedConv()
    path = export(model, tmp_path / "cp.pt", "torchscript", check=False)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():  # the scripted file computes what the model does
        np.testing.assert_allclose(load_torchscript(path)(x).numpy(), eager(model, x),
                                   atol=1e-6)


def test_no_deprecation_warnings_reach_the_caller(tmp_path, recwarn):
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    export(model, tmp_path / "cnn.onnx", "onnx", x)
    export(model, tmp_path / "cnn.pt", "torchscript", x, method="script")
    export(model, tmp_path / "cnn_traced.pt", "torchscript", x, method="trace")
    assert [str(w.message) for w in recwarn] == []


# ------------------------------------------------------------------------ the caller's model stays


@pytest.mark.parametrize(("format", "method"), [("onnx", "script"), ("torchscript", "script"),
                                                ("torchscript", "trace")])
def test_callers_model_is_unchanged(tmp_path, format, method):
    model = small_cnn()
    model.train()
    model[8].eval()  # a frozen BatchNorm inside a training model: mixed flags must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]

    export(model, tmp_path / "out", format, torch.randn(2, 3, 16, 16), method=method)

    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags


# ------------------------------------------------------------------------------ atomic writes


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward failed on purpose")


class DiffersWhenExported(nn.Module):
    """Eager output x, exported output x + 1: the export succeeds, the check must fail."""

    def forward(self, x):
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return x + 1
        return x


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_failing_forward_leaves_nothing(tmp_path, format):
    dest = tmp_path / "sub" / "model.bin"
    # (the model's forward failing on the example inputs: a ValueError that names them and
    # quotes the model's own message)
    with pytest.raises(ValueError, match="example_inputs: the model's forward pass fails on "
                                         r"them \(\(2, 3\) float32\): RuntimeError: .*on purpose"):
        export(Raises(), dest, format, torch.randn(2, 3), method="trace")
    assert not dest.exists()
    assert not dest.parent.exists()  # (refused before anything was written, or made)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # trace's own check sees it too
@pytest.mark.parametrize(("format", "method"), [("onnx", "script"), ("torchscript", "trace")])
def test_failed_check_keeps_the_old_file_and_no_temp(tmp_path, format, method):
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match=r"differs from PyTorch: max abs diff 1 >"):
        export(DiffersWhenExported(), dest, format, torch.zeros(2, 3), method=method)
    assert dest.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


@pytest.mark.parametrize("format", ["onnx", "torchscript"])
def test_the_file_is_checked_against_the_model_not_its_fused_copy(tmp_path, monkeypatch,
                                                                   format):
    """The fused copy drifts (a stand-in for folds within tolerance adding up): the file matches
    the copy, not the model, and is refused."""
    import sys

    export_module = sys.modules["rankcut.export"]  # (rankcut.export is also the function)
    real = export_module.fused_copy

    def drifted(model, inputs, **kwargs):
        fused = real(model, inputs, check=False)
        with torch.no_grad():
            for p in fused.parameters():
                p.mul_(1.5)
        return fused

    monkeypatch.setattr(export_module, "fused_copy", drifted)
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export(model, tmp_path / "m.bin", format, torch.ones(2, 3))
    assert not (tmp_path / "m.bin").exists()


def test_check_false_writes_even_a_diverging_export(tmp_path):
    path = export(DiffersWhenExported(), tmp_path / "m.onnx", "onnx", torch.zeros(2, 3),
                  check=False)
    (out,) = run_onnx(path, torch.zeros(2, 3))
    assert np.all(out == 1)


def test_export_replaces_an_existing_file(tmp_path):
    dest = tmp_path / "cp.onnx"
    dest.write_bytes(b"stale")
    export(FactorizedConv(), dest, "onnx", torch.randn(1, 4, 5, 5))
    onnx.checker.check_model(str(dest))
    assert sorted(os.listdir(tmp_path)) == ["cp.onnx"]


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "tflite"}, r"format: expected one of \('onnx', 'torchscript'\), got 'tflite'"),
        ({"format": "onnx", "example_inputs": None}, r"example_inputs: .*format='onnx'.*None"),
        ({"format": "torchscript", "method": "trace", "example_inputs": None},
         r"example_inputs: .*method='trace'"),
        ({"format": "torchscript", "check": True, "example_inputs": None},
         r"example_inputs: .*check=True"),
        ({"opset": 16}, r"opset: expected an integer >= 17, got 16"),
        ({"opset": 17.0}, r"opset: expected an integer >= 17, got 17.0"),
        ({"opset": True}, r"opset: expected an integer >= 17, got True"),
        ({"method": "compile"}, r"method: expected one of \('script', 'trace'\), got 'compile'"),
        ({"atol": -1.0}, r"atol: expected a number >= 0, got -1.0"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    kwargs = {"example_inputs": torch.randn(1, 4, 5, 5), **kwargs}
    with pytest.raises(ValueError, match=match):
        export(FactorizedConv(), tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_example_inputs_must_be_tensors(tmp_path):
    with pytest.raises(TypeError, match="example_inputs: expected a tensor or a tuple of tensors"):
        export(FactorizedConv(), tmp_path / "m.onnx", "onnx", [[1.0, 2.0]])


def test_a_float64_onnx_export_onnxruntime_cannot_run_is_a_clear_error(tmp_path):
    """onnxruntime's CPU convolutions take float32: its own NotImplemented error becomes a
    RuntimeError that says so, and no file is written."""
    import numpy as np

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval().double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="onnxruntime cannot run the exported model.*float64"):
        export(model, tmp_path / "m.onnx", "onnx", x)
    assert not (tmp_path / "m.onnx").exists()
    # a NumPy number is a number for the tolerance (export's check and fuse's alike)
    export(model.float(), tmp_path / "m.pt", "torchscript", x.float(), atol=np.float32(1e-3))
    assert (tmp_path / "m.pt").is_file()
