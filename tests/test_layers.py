import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankcut import decompose as dec
from rankcut.decompose import RankClampWarning
from rankcut.decompose._tensor import cp_to_tensor
from rankcut.layers import (
    CPConv2d,
    LowRankLinear,
    SpatialConv2d,
    SVDConv2d,
    TuckerConv2d,
    layer_cost,
    rebuild,
)
from rankcut.profile import count_macs, count_params

from .conftest import DEVICES

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_pg, out_pg = draw(st.integers(2, 4)), draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.booleans()):
        stride, padding = (1, 1), draw(st.sampled_from(["same", "valid"]))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = draw(st.one_of(st.integers(0, 3),
                                 st.tuples(st.integers(0, 3), st.integers(0, 3))))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                  bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(PADDING_MODES)))
    hw = (draw(st.integers(14, 18)), draw(st.integers(14, 18)))
    return groups * in_pg, groups * out_pg, kernel, kwargs, hw


def make_conv(config, seed=0, dtype=torch.float64):
    S, T, kernel, kwargs, hw = config
    torch.manual_seed(seed)
    conv = nn.Conv2d(S, T, kernel, **kwargs).to(dtype)
    x = torch.randn(2, S, *hw, dtype=dtype)
    return conv, x


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def full_rank_layers(conv):
    g = conv.groups
    sg, tg = conv.in_channels // g, conv.out_channels // g
    kh, kw = conv.kernel_size
    return [
        SVDConv2d.from_dense(conv, min(tg, sg * kh * kw)),
        SpatialConv2d.from_dense(conv, min(sg * kh, tg * kw)),
        TuckerConv2d.from_dense(conv, (tg, sg)),
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_full_rank_layers_reproduce_the_dense_conv(config):
    conv, x = make_conv(config)
    y = conv(x)
    with warnings.catch_warnings():  # full channel rank can exceed what a 1x1 kernel holds
        warnings.simplefilter("ignore", RankClampWarning)
        layers = full_rank_layers(conv)
    for layer in layers:
        out = layer(x)
        assert out.shape == y.shape
        assert rel(out, y) < 1e-5, type(layer).__name__


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(1, 3))
def test_reduced_rank_layers_are_exactly_the_conv_of_their_approximated_kernel(config, rank):
    """Whatever the rank, a layer computes the dense conv of the kernel its factors compose to,
    and reports that kernel's relative error: the output error is the factorization's error."""
    conv, x = make_conv(config)
    W = conv.weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClampWarning)
        layers = [SVDConv2d.from_dense(conv, rank), SpatialConv2d.from_dense(conv, rank),
                  TuckerConv2d.from_dense(conv, (rank, rank)),
                  CPConv2d.from_dense(conv, rank, max_iter=20),
                  CPConv2d.from_dense(conv, rank, form="cp3", max_iter=20),
                  SVDConv2d.from_dense(conv, rank, decomposition="cur", solver="deim")]
    for layer in layers:
        dense = layer.to_dense()
        assert rel(layer(x), dense(x)) < 1e-10, type(layer).__name__
        assert abs(layer.info["rel_error"] - rel(dense.weight, W)) < 1e-10


def test_layer_kernels_match_the_decompositions_they_come_from():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 3, padding=1, groups=2).double()
    W = conv.weight.detach()
    svd_layer = SVDConv2d.from_dense(conv, 3)
    tucker_layer = TuckerConv2d.from_dense(conv, (2, 3))
    for g in range(2):
        Wg = W[5 * g:5 * (g + 1)]
        approx = dec.svd(Wg.reshape(5, -1), 3).to_matrix().reshape(Wg.shape)
        assert torch.allclose(svd_layer.dense_weight()[5 * g:5 * (g + 1)], approx, atol=1e-12)
        approx = dec.tucker(Wg, (2, 3), modes=(0, 1)).to_tensor()
        assert torch.allclose(tucker_layer.dense_weight()[5 * g:5 * (g + 1)], approx, atol=1e-12)


@pytest.mark.parametrize("form", ["cp4", "cp3"])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=(2, 1), groups=2,
                                                          padding_mode="reflect"),
                                    dict(padding="same", dilation=2, padding_mode="circular")])
@pytest.mark.parametrize("device", DEVICES)
def test_cp_layer_is_exact_on_a_planted_cp_kernel(form, kwargs, device):
    g = kwargs.get("groups", 1)
    conv = nn.Conv2d(8, 6, (3, 5), **kwargs).double().to(device)
    gen = torch.Generator().manual_seed(1)
    shape = (6 // g, 8 // g, 3, 5) if form == "cp4" else (6 // g, 8 // g, 15)
    with torch.no_grad():
        for i in range(g):
            factors = [torch.randn(s, 3, generator=gen, dtype=torch.float64) for s in shape]
            kernel = cp_to_tensor(torch.ones(3, dtype=torch.float64), factors)
            conv.weight[i * 6 // g:(i + 1) * 6 // g] = kernel.reshape(6 // g, 8 // g, 3, 5)
    layer = CPConv2d.from_dense(conv, 3, form=form, max_iter=3000, tol=1e-15)
    x = torch.randn(2, 8, 15, 17, dtype=torch.float64, device=device)
    assert rel(layer(x), conv(x)) < 1e-5
    assert layer.info["rel_error"] < 1e-5
    assert layer.config() == {"layer": "CPConv2d", "rank": 3, "form": form}


@pytest.mark.parametrize("device", DEVICES)
def test_low_rank_linear(device):
    torch.manual_seed(0)
    lin = nn.Linear(20, 12).double().to(device)
    x = torch.randn(4, 7, 20, dtype=torch.float64, device=device)  # 3-D input
    full = LowRankLinear.from_dense(lin, 12)
    assert rel(full(x), lin(x)) < 1e-10
    low = LowRankLinear.from_dense(lin, 5)
    s = torch.linalg.svdvals(lin.weight.detach())
    assert abs(low.info["rel_error"] - float(s[5:].norm() / s.norm())) < 1e-10
    assert rel(low(x), low.to_dense()(x)) < 1e-12
    cur = LowRankLinear.from_dense(lin, 12, decomposition="cur", solver="deim")
    assert rel(cur(x), lin(x)) < 1e-8 and cur.decomposition == "cur"
    nobias = LowRankLinear.from_dense(nn.Linear(6, 4, bias=False), 2)
    assert nobias.second.bias is None and nobias.to_dense().bias is None


def test_a_1x1_conv_becomes_a_pair_of_1x1_convs():
    conv = nn.Conv2d(16, 8, 1, stride=2).double()
    layer = LowRankLinear.from_dense(conv, 8)
    assert isinstance(layer, SVDConv2d) and layer.first.kernel_size == (1, 1)
    x = torch.randn(1, 16, 9, 9, dtype=torch.float64)
    assert rel(layer(x), conv(x)) < 1e-10


def test_extra_repr_states_the_geometry_and_ranks():
    conv = nn.Conv2d(16, 32, (3, 5), stride=2, padding=(1, 2), groups=2, bias=False,
                     padding_mode="reflect")
    layer = CPConv2d.from_dense(conv, 4, max_iter=5)
    assert layer.extra_repr() == ("16, 32, kernel_size=(3, 5), stride=(2, 2), padding=(1, 2), "
                                  "groups=2, bias=False, padding_mode='reflect', rank=4, "
                                  "form='cp4'")
    assert TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, padding="same"), (2, 3)).extra_repr() == (
        "8, 8, kernel_size=(3, 3), padding='same', ranks=(2, 3)")


def test_depthwise_and_other_modules_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="depthwise convolution"):
        TuckerConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=8), (2, 2))
    with pytest.raises(ValueError, match="single-channel input: one input channel"):
        TuckerConv2d.from_dense(nn.Conv2d(1, 8, 3), (2, 1))
    with pytest.raises(ValueError, match=r"not an nn.Conv2d \(Linear\)"):
        CPConv2d.from_dense(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="form: expected one of 'cp4', 'cp3', got 'cp5'"):
        CPConv2d.from_dense(nn.Conv2d(4, 4, 3), 2, form="cp5")
    with pytest.raises(ValueError, match="decomposition: expected one of 'svd', 'cur'"):
        LowRankLinear.from_dense(nn.Linear(4, 4), 2, decomposition="qr")


def test_rebuild_gives_the_same_structure_and_loads_the_weights():
    conv = nn.Conv2d(12, 10, 3, padding=1, groups=2)
    x = torch.randn(1, 12, 8, 8)
    for layer in [CPConv2d.from_dense(conv, 3, max_iter=5), TuckerConv2d.from_dense(conv, (2, 3)),
                  SVDConv2d.from_dense(conv, 4), SpatialConv2d.from_dense(conv, 4),
                  SVDConv2d.from_dense(conv, 4, decomposition="cur", solver="leverage", seed=0)]:
        twin = rebuild(conv, layer.config())
        assert type(twin) is type(layer)
        assert {k: v.shape for k, v in twin.state_dict().items()} == {
            k: v.shape for k, v in layer.state_dict().items()}
        twin.load_state_dict(layer.state_dict())
        assert torch.equal(twin(x), layer(x))
    with pytest.raises(ValueError, match="config\\['layer'\\]: expected one of"):
        rebuild(conv, {"layer": "Nope"})


def test_half_precision_weights_are_decomposed_in_float32_and_kept_in_their_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3).to(torch.bfloat16)
    layer = TuckerConv2d.from_dense(conv, (4, 4))
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    # the decomposition of the float32 weight, then rounded to bfloat16
    W = conv.weight.detach().float()
    ref = dec.tucker(W, (4, 4), modes=(0, 1))
    # (the error is measured on the bfloat16 layer: to its 3 significant digits)
    assert layer.info["rel_error"] == pytest.approx(ref.rel_error, abs=5e-3)
    assert torch.allclose(layer.dense_weight().float(), ref.to_tensor(), atol=1e-2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(1, 3), st.sampled_from(["cp4", "cp3"]))
def test_analytic_costs_match_counted_params_and_macs(config, rank, form):
    conv, x = make_conv(config, dtype=torch.float32)
    x = x[:1]
    hw = tuple(x.shape[2:])
    dense = layer_cost(conv, input_hw=hw)
    assert (dense.params, dense.macs) == (count_params(conv), count_macs(conv, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClampWarning)
        layers = [SVDConv2d.from_dense(conv, rank), SpatialConv2d.from_dense(conv, rank),
                  TuckerConv2d.from_dense(conv, (rank, rank)),
                  CPConv2d.from_dense(conv, rank, form=form, max_iter=2)]
    for layer in layers:
        cost = layer_cost(conv, layer.config(), input_hw=hw)
        assert (cost.params, cost.macs) == (count_params(layer), count_macs(layer, x)), layer


def test_costs_agree_with_torch_flop_counter():
    conv = nn.Conv2d(32, 48, (3, 5), stride=2, padding=(1, 2), groups=2)
    x = torch.randn(1, 32, 20, 24)
    lin = nn.Linear(64, 10)
    for dense, layer, inp, kw in [
        (conv, CPConv2d.from_dense(conv, 6, max_iter=2), x, {"input_hw": (20, 24)}),
        (conv, TuckerConv2d.from_dense(conv, (5, 4)), x, {"input_hw": (20, 24)}),
        (conv, SpatialConv2d.from_dense(conv, 5), x, {"input_hw": (20, 24)}),
        (lin, LowRankLinear.from_dense(lin, 6), torch.randn(3, 64), {"rows": 3}),
    ]:
        with FlopCounterMode(display=False) as counter:
            layer(inp)
        assert layer_cost(dense, layer.config(), **kw).macs == counter.get_total_flops() // 2
        assert layer_cost(dense, layer.config(), **kw).params == sum(
            p.numel() for p in layer.parameters())


def test_every_layer_compiles_with_torch_jit_script():
    conv = nn.Conv2d(8, 6, (3, 5), stride=(2, 1), padding="valid", groups=2,
                     padding_mode="reflect")
    x = torch.randn(2, 8, 11, 13)
    layers = [CPConv2d.from_dense(conv, 3, max_iter=5),
              CPConv2d.from_dense(conv, 3, form="cp3", max_iter=5),
              TuckerConv2d.from_dense(conv, (2, 3)), SVDConv2d.from_dense(conv, 4),
              SpatialConv2d.from_dense(conv, 4)]
    for layer in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            scripted = torch.jit.script(layer)
        assert torch.allclose(scripted(x), layer(x), atol=1e-6), type(layer).__name__
    lin = LowRankLinear.from_dense(nn.Linear(10, 7), 3)
    v = torch.randn(4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(lin)
    assert torch.allclose(scripted(v), lin(v), atol=1e-6)


def test_ranks_may_be_numpy_or_tensor_integers_and_anything_else_is_named():
    import numpy as np

    conv = nn.Conv2d(4, 6, 3)
    for rank in (np.int64(2), torch.tensor(2), [2], (np.int32(2),)):
        assert SVDConv2d.from_dense(conv, rank).built_ranks() == (2,)
    for bad in (2.5, "2", True, [2, 3], None):
        with pytest.raises(ValueError, match="ranks: expected an integer"):
            SVDConv2d.from_dense(conv, bad)
    assert TuckerConv2d.from_dense(conv, np.int64(2)).built_ranks() == (2, 2)
    with pytest.raises(ValueError, match=r"ranks: expected \(R_T, R_S\)"):
        TuckerConv2d.from_dense(conv, [2.0, 1])
    with pytest.raises(ValueError, match="a Linear layer takes one input moment, got a list of 2"):
        LowRankLinear.from_dense(nn.Linear(6, 5), 2, cov=[torch.eye(6), torch.eye(6)])
