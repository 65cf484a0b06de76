"""Parameter and MAC counting, checked against torch.utils.flop_counter.FlopCounterMode.

How FlopCounterMode (torch 2.14) counts the ops these layers run, which makes ``flops // 2``
an exact oracle for our MACs:

- convolution: ``2 * N * prod(out_spatial) * C_out * w.shape[1] * kh * kw``. ``w.shape[1]`` is
  already ``C_in / groups``, so grouped and depthwise convs are right; the bias is ignored. The
  padding of a non-"zeros" padding_mode (and the extra pad of an even kernel with "same") is a
  separate F.pad, which it does not count.
- mm / addmm: ``2 * m * k * n``; addmm's bias (its ``self`` operand) is ignored. F.linear on a
  3-D input is flattened to a single 2-D mm/addmm, so it is counted the same way.

Every formula is 2 * (multiplications), so the total is always even and ``// 2`` loses nothing.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rankcut as rc
from rankcut.layers import FactorizedLayer
from rankcut.profile import (
    count_macs,
    count_params,
    layer_macs,
    layer_units,
    model_bytes,
    param_bytes,
    profile,
    with_batch,
)

from .conftest import DEVICES

aten = torch.ops.aten


def flop_counts(model: nn.Module, *inputs: torch.Tensor) -> dict:
    """FlopCounterMode's per-op flop counts (op packet -> flops) of one forward pass."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_flop_counts()["Global"]


def oracle_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of the convolution and matmul ops only, as FlopCounterMode counts them."""
    counts = flop_counts(model, *inputs)
    flops = sum(counts.get(op, 0) for op in (aten.convolution, aten.mm, aten.addmm))
    assert flops == sum(counts.values()), f"unexpected ops counted: {counts}"
    assert flops % 2 == 0
    return flops // 2


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    out_channels = in_channels if depthwise else groups * draw(st.integers(1, 3))
    if depthwise:
        groups = in_channels
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dilation = draw(st.sampled_from([1, 2, (1, 2)]))
    padding = draw(st.sampled_from([0, 1, 3, (2, 0), "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1), 3]))
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    )


@settings(max_examples=30, deadline=None)
@given(
    cfg=conv_configs(),
    batch=st.integers(1, 3),
    size=st.tuples(st.integers(16, 20), st.integers(16, 20)),
)
def test_conv2d_macs_match_flop_counter(cfg, batch, size):
    # Inputs of 16+ exceed the largest pad per side (6: "same", 7 taps, dilation 2), as reflect
    # padding requires.
    conv = nn.Conv2d(**cfg)
    x = torch.randn(batch, cfg["in_channels"], *size)
    out = conv(x)
    kh, kw = cfg["kernel_size"]
    expected = out.numel() * cfg["in_channels"] // cfg["groups"] * kh * kw
    assert count_macs(conv, x) == expected == oracle_macs(conv, x)
    assert layer_macs(conv, x) == {"": expected}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 8), (2, 5, 8), (8,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_macs_match_flop_counter(device, shape, bias):
    linear = nn.Linear(8, 3, bias=bias).to(device)
    x = torch.randn(*shape, device=device)
    rows = x.numel() // 8
    assert count_macs(linear, x) == rows * 8 * 3 == oracle_macs(linear, x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3, stride=2, groups=2),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        y = self.pool(self.features(x))
        return self.head(self.head(y))  # the head runs twice


@pytest.mark.parametrize("device", DEVICES)
def test_nested_model_names_and_values(device):
    model = Net().to(device)
    x = torch.randn(2, 3, 9, 9, device=device)
    macs = layer_macs(model, x)
    assert macs == {
        "features.0": 2 * 9 * 9 * 8 * 3 * 3 * 3,  # N * H * W * C_out * C_in * kh * kw
        "features.2": 2 * 4 * 4 * 4 * (8 // 2) * 3 * 3,  # 9 -> 4 with stride 2, no padding
        "head": 2 * (2 * 4 * 4),  # two calls of 2 rows * 4 in * 4 out
    }
    assert count_macs(model, x) == sum(macs.values()) == oracle_macs(model, x)


def test_resnet18_macs():
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 224, 224)
    macs = count_macs(model, x)
    assert macs == oracle_macs(model, x)
    assert macs == pytest.approx(1.81e9, rel=0.01)  # the well-known 1.8 GMACs


def test_count_params_counts_tied_parameters_once():
    model = Net()
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    tied = nn.Sequential(nn.Linear(5, 5, bias=False), nn.Linear(5, 5))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 25 + 5


# a list of tensors is accepted as positional inputs (one reader of example_inputs everywhere)
@pytest.mark.parametrize("bad", [None, [], (), (torch.ones(1, 4), 3), 1.5, [torch.ones(1, 4), 2]])
def test_bad_example_inputs_is_rejected(bad):
    with pytest.raises(ValueError, match="example_inputs must be a tensor"):
        count_macs(nn.Linear(4, 2), bad)


def test_bad_model_is_rejected():
    with pytest.raises(ValueError, match=r"model: expected an nn\.Module, got function"):
        count_macs(lambda x: x, torch.ones(1))
    with pytest.raises(ValueError, match=r"module: expected an nn\.Module, got str"):
        count_params("resnet")


@pytest.mark.parametrize("train", [True, False])
def test_model_state_is_unchanged(train):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Linear(6, 2))
    model.train(train)
    model[2].eval()  # a mixed state must be restored module by module
    stats = model[1].running_mean.clone()
    assert count_macs(model, torch.randn(2, 3, 8, 8)) > 0
    assert [m.training for m in model.modules()] == [train, train, train, False, train]
    assert torch.equal(model[1].running_mean, stats)  # batch-norm statistics not updated
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_removed_when_forward_raises():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2))  # shapes do not chain
    with pytest.raises(ValueError, match=r"example_inputs: the model's forward pass fails .*"
                                         "mat1 and mat2 shapes cannot be multiplied") as info:
        count_macs(model, torch.randn(1, 4))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, chained
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training


# ---- profile(): units, totals, bytes, latency; analytic MACs against FlopCounterMode ---------

class Mixed(nn.Module):
    """Convolutions for every factorization, a grouped conv, a Linear run on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 24, 3, padding=1)              # svd
        self.b = nn.Conv2d(24, 24, (3, 5), padding=(1, 2))     # spatial_svd
        self.c = nn.Conv2d(24, 32, 3, stride=2, padding=1)     # cp4
        self.d = nn.Conv2d(32, 32, 3, padding=1, groups=2)     # cp3, grouped
        self.e = nn.Conv2d(32, 32, 3, padding=1, bias=False)   # tucker
        self.f = nn.Conv2d(32, 32, 1)                          # cur
        self.head = nn.Linear(32, 10)                          # svd, on (N, 4, 32)
        self.unused = nn.Linear(10, 10)                        # never called

    def forward(self, x):
        for conv in (self.stem, self.a, self.b, self.c, self.d, self.e, self.f):
            x = torch.relu(conv(x))
        tokens = x.flatten(2)[:, :, :4].transpose(1, 2)        # (N, 4, 32)
        return self.head(tokens).mean(1)


MIXED_PLAN = {
    "a": rc.LayerPlan("svd", (6,)),
    "b": rc.LayerPlan("spatial_svd", (8,)),
    "c": rc.LayerPlan("cp", (10,), form="cp4", options={"max_iter": 5}),
    "d": rc.LayerPlan("cp", (6,), form="cp3", options={"max_iter": 5}),
    "e": rc.LayerPlan("tucker", (8, 6)),
    "f": rc.LayerPlan("cur", (8,)),
    "head": rc.LayerPlan("svd", (4,)),
}


@pytest.fixture(scope="module")
def mixed_pair():
    torch.manual_seed(0)
    model = Mixed().eval()
    small = rc.apply(model, rc.Plan(dict(MIXED_PLAN)))
    return model, small


def module_oracle(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FlopCounterMode's MACs per module (keys as qualified names) and in total (key None)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    prefix = type(model).__name__
    out = {}
    for key, ops in counter.get_flop_counts().items():
        flops = sum(ops.values())
        assert flops % 2 == 0
        if key == "Global":
            out[None] = flops // 2
        elif key.startswith(prefix + "."):
            out[key[len(prefix) + 1:]] = flops // 2
    return out


def check_against_flop_counter(model: nn.Module, x: torch.Tensor) -> None:
    prof = profile(model, x, latency=False)
    oracle = module_oracle(model, x[:1])  # profile counts MACs for one sample
    assert prof.macs == oracle[None] == count_macs(model, x[:1])
    for layer in prof.layers:
        assert layer.macs == oracle.get(layer.name, 0), layer.name


def test_profile_macs_match_flop_counter_on_factorized_model(mixed_pair):
    model, small = mixed_pair
    kinds = {layer.kind for layer in profile(small, torch.randn(1, 3, 12, 12),
                                             latency=False).layers}
    assert {"SVDConv2d", "SpatialConv2d", "CPConv2d", "TuckerConv2d", "LowRankLinear"} <= kinds
    for m in (model, small):
        check_against_flop_counter(m, torch.randn(3, 3, 12, 12))


def test_profile_macs_match_flop_counter_on_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    check_against_flop_counter(model, torch.randn(2, 3, 32, 32))


def test_layer_units_count_factorized_layers_once(mixed_pair):
    model, small = mixed_pair
    assert list(layer_units(model)) == ["stem", "a", "b", "c", "d", "e", "f", "head", "unused"]
    units = layer_units(small)
    assert list(units) == list(layer_units(model))
    assert all(isinstance(units[n], FactorizedLayer) for n in MIXED_PLAN)
    lone = rc.apply(nn.Sequential(nn.Linear(20, 20)),
                    rc.Plan({"0": rc.LayerPlan("svd", (3,))}))[0]
    assert list(layer_units(lone)) == [""]  # a factorized layer as the whole model
    # made dense again (densify) or fused, it is the model itself, not a child of it
    from rankcut.compress import densify

    x = torch.randn(4, 20)
    assert isinstance(densify(lone), nn.Linear)
    assert torch.allclose(densify(lone)(x), lone(x), atol=1e-5)
    assert torch.allclose(rc.fuse(lone)(x), lone(x), atol=1e-5)


def test_profile_totals_are_sums_and_bytes_match_saved_file(mixed_pair, tmp_path):
    _, small = mixed_pair
    x = torch.randn(3, 3, 12, 12)
    prof = profile(small, x, latency=False)
    assert prof.params == count_params(small) == prof.layer_params  # no params outside units
    assert prof.macs == sum(layer.macs for layer in prof.layers)
    assert prof.param_bytes == sum(layer.param_bytes for layer in prof.layers) == 4 * prof.params
    for layer in prof.layers:
        unit = small.get_submodule(layer.name)
        assert layer.params == count_params(unit)
        assert layer.param_bytes == param_bytes(unit)
    assert prof.layer("unused").calls == 0 and prof.layer("unused").macs == 0
    assert prof.layer("head").input_shape == [1, 4, 32]
    rc.save(small, tmp_path, plan=rc.Plan(dict(MIXED_PLAN)))
    assert prof.model_bytes == model_bytes(small) == (tmp_path / "model.safetensors").stat().st_size
    assert prof.batch == 3 and prof.latency == {}
    d = prof.to_dict()
    assert d["macs"] == prof.macs and len(d["layers"]) == len(prof.layers)
    assert "total" in str(prof)


def test_profile_params_outside_units_and_bf16_bytes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    prof = profile(model, torch.randn(2, 3, 3, 3), latency=False)
    assert prof.params == prof.layer_params + 16  # the BatchNorm's weight and bias
    half = nn.Linear(10, 10).to(torch.bfloat16)
    assert param_bytes(half) == 2 * 110


def test_profile_latency_per_unit_at_batch_one_and_user_batch(mixed_pair):
    _, small = mixed_pair
    prof = profile(small, torch.randn(3, 3, 12, 12), batches=(1, 2), warmup=0, repeats=2)
    assert sorted(prof.latency) == [1, 2, 3]
    for batch, lat in prof.latency.items():
        assert lat.batch == batch and lat.repeats == 2 and lat.median_ms > 0
        assert lat.threads == torch.get_num_threads() == prof.threads
    for layer in prof.layers:
        if layer.calls:
            assert sorted(layer.latency) == [1, 2, 3]
            assert layer.latency[2].batch == 2  # timed on its own input at batch 2
        else:
            assert layer.latency == {}
    assert prof.device == "cpu"
    assert prof.to_dict()["latency"]["3"]["batch"] == 3


def test_with_batch_takes_and_repeats_samples():
    x = torch.arange(3.0)[:, None]
    assert with_batch(x, 2)[0].flatten().tolist() == [0, 1]
    assert with_batch(x, 5)[0].flatten().tolist() == [0, 1, 2, 0, 1]
    assert with_batch((x, torch.tensor(2.0)), 1)[1].item() == 2.0
    with pytest.raises(ValueError, match="batch"):
        with_batch(x, 0)


def test_multihead_attention_projections_are_counted():
    """nn.MultiheadAttention projects with its weights directly (its out_proj Linear is never
    called): its in-projections count under its name, the output projection under out_proj's."""
    from rankcut.profile import layer_macs

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=12)
            self.fc = nn.Linear(16, 4)

        def forward(self, x, memory_k, memory_v):
            out, _ = self.attn(x, key=memory_k, value=memory_v)
            return self.fc(out)

    x, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 8), torch.randn(2, 7, 12)
    macs = layer_macs(Block().eval(), (x, k, v))
    assert macs["attn"] == 10 * 16 * 16 + 14 * 16 * 8 + 14 * 16 * 12
    assert macs["attn.out_proj"] == 10 * 16 * 16 and macs["fc"] == 10 * 16 * 4


def test_keep_freed_memory_is_recorded_as_the_allocator(monkeypatch):
    """On glibc (this machine's C library) it applies and allocator() says so; elsewhere it
    leaves the allocator alone and says it did nothing. (The mallopt stays in this process:
    it changes where memory comes from, not what any computation gives.)"""
    from rankcut import profile

    monkeypatch.setattr(profile, "_kept", False)  # (restored after the test)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    if profile._glibc() is None:
        pytest.skip("the C library here is not glibc")
    assert profile.allocator() == "glibc"
    assert profile.keep_freed_memory() is True
    assert profile.allocator() == "glibc, freed memory kept"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert profile.allocator() == "jemalloc"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(profile, "_kept", False)
    # the environment's settings: kept only with both thresholds high (the trim threshold
    # alone fixes the mmap threshold at its 128 KB default)
    for env, said in (({"MALLOC_TRIM_THRESHOLD_": "1073741824"}, "tuned by the environment"),
                      ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "1073741824"},
                       "tuned by the environment"),
                      ({"MALLOC_TRIM_THRESHOLD_": "1073741824",
                        "MALLOC_MMAP_THRESHOLD_": "268435456"}, "freed memory kept")):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert profile.allocator() == f"glibc, {said}", env
        for k in env:
            monkeypatch.delenv(k)
    assert profile.allocator() == profile.default_allocator() == "glibc"
    monkeypatch.setattr(profile, "_glibc", lambda: None)
    assert profile.keep_freed_memory() is False and profile._kept is False


class _TouchesPages(nn.Module):
    """Maps ``pages`` fresh pages of memory and writes one byte in each (huge pages refused),
    every pass: that many page faults a pass, whatever the C allocator does."""

    def __init__(self, pages: int):
        super().__init__()
        self.pages = pages

    def forward(self, x):
        import mmap

        size = self.pages * mmap.PAGESIZE
        with mmap.mmap(-1, size) as memory:
            memory.madvise(mmap.MADV_NOHUGEPAGE)
            for offset in range(0, size, mmap.PAGESIZE):
                memory[offset] = 1
        return x


def test_latencies_count_the_page_faults_of_a_pass_and_tell_two_models_apart():
    """measure_latency and compare_latency report the process's minor page faults per timed
    pass; in an interleaved comparison each model gets its own."""
    import mmap

    from rankcut.profile import compare_latency, measure_latency, page_faults

    if page_faults() is None or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        pytest.skip("no page-fault count or madvise on this platform")
    x, pages = torch.rand(2, 4), 512
    quiet, faulting = compare_latency(nn.Identity(), _TouchesPages(pages), x, warmup=1,
                                      repeats=4)
    assert faulting.page_faults >= 0.9 * pages, faulting
    assert quiet.page_faults < 0.1 * pages, quiet
    alone = measure_latency(_TouchesPages(pages), x, warmup=1, repeats=3)
    assert alone.page_faults >= 0.9 * pages and alone.to_dict()["page_faults"] == \
        alone.page_faults


def test_allocator_advice_speaks_only_of_a_cpu_pass_under_glibcs_defaults(monkeypatch):
    """The note on page faults: where the compressed model's pass takes NOTABLE_FAULTS or more
    faults than the original's, on the CPU, under glibc's default malloc; silent otherwise."""
    from rankcut import profile

    notable = profile.NOTABLE_FAULTS
    monkeypatch.setattr(profile, "allocator", lambda: "glibc")
    said = profile.allocator_advice(100, 100 + notable)
    assert said is not None and "page faults a pass against 100 for the original" in said
    assert "keep_freed_memory" in said and "MALLOC_MMAP_THRESHOLD_" in said
    for quiet in [(100, 99 + notable), (None, 5000), (100, None), (5000, 100)]:
        assert profile.allocator_advice(*quiet) is None, quiet
    assert profile.allocator_advice(100, 100 + notable, device="cuda:0") is None
    assert profile.allocator_advice(100, 100 + notable, engine="onnxruntime") is None
    assert profile.allocator_advice(100, 100 + notable, device=torch.device("cpu")) == said
    monkeypatch.setattr(profile, "allocator", lambda: "glibc, freed memory kept")
    assert profile.allocator_advice(100, 100 + notable) is None
