"""rc.fuse: BatchNorm folded into the convolution before it, factorizations that save nothing
turned back into dense layers, outputs unchanged."""

import sys

import pytest
import torch
from torch import nn

import rankcut as rc
from rankcut.layers import CPConv2d, FactorizedLayer, LowRankLinear, SVDConv2d, TuckerConv2d
from rankcut.models import create
from rankcut.profile import Latency


def _randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    model = _randomise_batchnorm(create("resnet20_cifar").eval())
    names = [n for n, r in rc.target_layers(model).items() if r is None]
    x = torch.rand(1, 3, 32, 32)
    # Tucker-2 and CP layers, each followed by a BatchNorm
    tucker = rc.apply(model, rc.plan(model, x, method="tucker", rank=4, include=names[:6],
                                         allow_slower=True))
    small = rc.apply(tucker, rc.plan(tucker, x, method="cp", rank=6, include=names[6:10],
                                        allow_slower=True))
    return model, small


def test_every_batchnorm_after_a_convolution_is_folded_and_the_outputs_stand(compressed):
    _, small = compressed
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    modes = [m.training for m in small.modules()]
    fused = rc.fuse(small, x)
    assert [m.training for m in small.modules()] == modes  # its modes too
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    folded = fused.rankcut_fuse["folded"]
    assert len(folded) == sum(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    with torch.no_grad():
        assert torch.allclose(fused(x), small.eval()(x), atol=1e-4, rtol=1e-4)
    kinds = {type(m) for m in fused.modules() if isinstance(m, FactorizedLayer)}
    assert {CPConv2d, TuckerConv2d} <= kinds
    for m in fused.modules():
        if isinstance(m, FactorizedLayer):  # the BatchNorm's shift is the last factor's bias
            assert m._last().bias is not None and m.geometry.bias
            dense = m.to_dense()  # still converts exactly, bias included
            y = torch.randn(2, m.geometry.in_channels, 8, 8)
            with torch.no_grad():
                assert torch.allclose(dense(y), m(y), atol=1e-4, rtol=1e-4)
    # the caller's model is untouched: its BatchNorms, every tensor bitwise
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) == len(folded)
    after = small.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_fused_model_exports_without_batchnorm_nodes(compressed, tmp_path):
    onnx = pytest.importorskip("onnx")
    _, small = compressed
    x = torch.randn(2, 3, 32, 32)
    path = rc.export(rc.fuse(small, x), tmp_path / "fused.onnx", example_inputs=x)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


class SharedOutput(nn.Module):
    """``a``'s output goes to its BatchNorm and to the sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.a(x)
        return self.bn_b(self.b(self.bn_a(h))) + h


class Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_only_batchnorms_that_alone_read_a_convolution_are_folded():
    model = _randomise_batchnorm(SharedOutput().eval())
    x = torch.randn(2, 3, 8, 8)
    fused = rc.fuse(model, x)
    assert [f["batchnorm"] for f in fused.rankcut_fuse["folded"]] == ["bn_b"]
    assert isinstance(fused.bn_a, nn.BatchNorm2d) and isinstance(fused.bn_b, nn.Identity)


def test_an_untraceable_model_falls_back_to_sequential_neighbours():
    model = _randomise_batchnorm(Untraceable().eval())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="torch.fx cannot trace Untraceable"):
        fused = rc.fuse(model, x)
    assert isinstance(fused.body[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_a_factorization_that_saves_nothing_becomes_dense_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    model[0] = SVDConv2d.from_dense(model[0], 8)  # rank 8: 8·72 + 8·8 params > 8·72 dense
    model[1] = SVDConv2d.from_dense(model[1], 2)
    x = torch.randn(1, 8, 16, 16)
    fused = rc.fuse(model, x)
    assert type(fused[0]) is nn.Conv2d and isinstance(fused[1], SVDConv2d)
    assert "params" in fused.rankcut_fuse["reverted"]["0"]
    assert "MACs" in fused.rankcut_fuse["reverted"]["0"]
    without_inputs = rc.fuse(model)  # params alone decide; nothing checked
    assert type(without_inputs[0]) is nn.Conv2d


def test_revert_slower_times_each_factorized_layer_on_its_input(monkeypatch):
    """Timing is replaced by a stand-in that calls the second layer's factorization slower."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, stride=2))
    model[0] = SVDConv2d.from_dense(model[0], 2)
    model[1] = SVDConv2d.from_dense(model[1], 2)
    timed = []

    def fake(dense, layer, x, **kw):
        timed.append(tuple(x.shape))
        slow = 1.2 if layer.geometry.stride == (2, 2) else 1.0
        return (Latency(1.0, 1.0, 1.0, 15, 3, 2, "cpu"), Latency(slow, slow, slow, 15, 3, 2, "cpu"))

    monkeypatch.setattr(sys.modules["rankcut.fuse"], "compare_latency", fake)
    x = torch.randn(3, 8, 16, 16)
    kept = rc.fuse(model, x)  # no timing unless asked
    assert not timed and isinstance(kept[1], SVDConv2d)
    fused = rc.fuse(model, x, revert_slower=True)
    assert timed == [(3, 8, 16, 16), (3, 6, 16, 16)]  # each layer at the input shape it gets
    assert isinstance(fused[0], SVDConv2d) and type(fused[1]) is nn.Conv2d
    assert "1.200 ms > 1.000 ms dense (batch 3" in fused.rankcut_fuse["reverted"]["1"]
    timed.clear()
    loose = rc.fuse(model, x, revert_slower=True, latency_margin=0.25)
    assert isinstance(loose[1], SVDConv2d) and not loose.rankcut_fuse["reverted"]


def _layouts(*tensors_or_modules):
    """"cl" or "c" per argument: its (first 4-D weight's) memory format."""
    out = []
    for t in tensors_or_modules:
        if isinstance(t, nn.Module):
            t = next(p for p in t.parameters() if p.ndim == 4 and p.shape[1] > 1)
        out.append("c" if t.is_contiguous() else
                   "cl" if t.is_contiguous(memory_format=torch.channels_last) else "?")
    return out


def test_timings_use_the_memory_format_that_is_deployed(monkeypatch):
    """"auto" times a contiguous copy against a channels_last one even when the model's weights
    are channels_last already; revert_slower times the dense and factorized layer and their
    input in the format asked for (and in the layer's own without one), and the dense layer
    put back is in it."""
    torch.manual_seed(0)
    seen = []
    real = sys.modules["rankcut.fuse"].compare_latency

    def spy(a, b, x, **kw):
        seen.append(_layouts(a, b, *([x] if isinstance(x, torch.Tensor) else x)))
        return real(a, b, x, warmup=1, repeats=1)

    monkeypatch.setattr(sys.modules["rankcut.fuse"], "compare_latency", spy)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    rc.fuse(model.to(memory_format=torch.channels_last), x, memory_format="auto")
    assert seen == [["c", "cl", "c"]]
    model[2] = SVDConv2d.from_dense(model[2], 12)
    for asked, expected in (("channels_last", "cl"), ("contiguous", "c")):
        seen.clear()
        fused = rc.fuse(model, x, memory_format=asked, revert_slower=True)
        assert seen == [[expected] * 3]
        assert _layouts(fused[2]) == [expected]
    seen.clear()
    rc.fuse(model.to(memory_format=torch.channels_last), x, revert_slower=True)
    assert seen == [["cl"] * 3]


def test_the_fused_model_is_in_eval_mode_throughout():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)).eval()
    model[2] = SVDConv2d.from_dense(model[2], 4)  # saves nothing: made dense again
    fused = rc.fuse(model, torch.randn(1, 3, 8, 8))
    assert fused.rankcut_fuse["reverted"] and fused.rankcut_fuse["folded"]
    assert [n for n, m in fused.named_modules() if m.training] == []


class _UntraceableReuse(nn.Module):
    """fx cannot trace it; the stem's conv is also called on its own (its output read outside
    the stem), and a Sequential subclass adds its input before the BatchNorm."""

    class _Residual(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x) + x)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.res = self._Residual(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        if x.mean() > -100:
            x = x * 1.0
        return self.tail(self.res(self.stem(x) + self.stem[0](x)))


class _UntraceableChildren(nn.Module):
    """fx cannot trace it; it calls its Sequential's children one by one and reads the conv's
    output twice: the BatchNorm is fed by the conv's very tensor, each called once, yet the
    Sequential's own forward never ran."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > -1e9:
            x = x * 1.0
        h = self.body[0](x)
        return self.body[1](h) + h


def test_the_sequential_fallback_ignores_children_called_one_by_one():
    model = _randomise_batchnorm(_UntraceableChildren().eval())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="cannot trace"):
        fused = rc.fuse(model, x, check=False)
    assert fused.rankcut_fuse["folded"] == []
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_a_pair_with_a_forward_hook_is_not_folded():
    torch.manual_seed(0)
    model = _randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                               nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval())
    model[0].register_forward_hook(lambda m, args, out: out.clamp(max=0.1))
    x = torch.randn(2, 3, 8, 8)
    fused = rc.fuse(model, x)  # (outputs checked)
    assert [f["batchnorm"] for f in fused.rankcut_fuse["folded"]] == ["3"]


def test_the_sequential_fallback_folds_only_pairs_seen_feeding_each_other():
    torch.manual_seed(0)
    model = _randomise_batchnorm(_UntraceableReuse().eval())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="seen feeding it in one forward"):
        fused = rc.fuse(model, x)  # checks the outputs too
    assert [f["batchnorm"] for f in fused.rankcut_fuse["folded"]] == ["tail.1"]
    with pytest.warns(UserWarning, match="nothing is folded without example_inputs"):
        blind = rc.fuse(model, check=False)
    assert blind.rankcut_fuse["folded"] == []
    with torch.no_grad():
        assert torch.allclose(blind(x), model(x), atol=1e-5)


def test_batchnorm1d_after_a_linear_or_a_low_rank_linear_is_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(),
                          nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3), nn.BatchNorm1d(3)).eval()
    for bn in (model[1], model[4], model[7]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    model[3] = LowRankLinear.from_dense(model[3], 4)
    x = torch.randn(5, 12)
    fused = rc.fuse(model, x)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    assert isinstance(fused[3], LowRankLinear) and fused[3].second.bias is not None
    assert len(fused.rankcut_fuse["folded"]) == 3
    assert torch.allclose(fused(x), model(x), atol=1e-5)


def _random_stats(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_a_batchnorm1d_without_affine_parameters_folds_into_a_linear():
    torch.manual_seed(0)
    model = _random_stats(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, affine=False)))
    x = torch.randn(5, 6)
    fused = rc.fuse(model, x)
    assert isinstance(fused[1], nn.Identity) and torch.allclose(fused(x), model(x), atol=1e-5)


def test_a_batchnorm1d_fed_a_3d_linear_output_is_not_folded():
    """On (N, L, features) a BatchNorm1d normalises dim 1 (L here equals the features): folding
    it into the Linear's output features would change the outputs."""
    torch.manual_seed(0)
    model = _random_stats(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)))
    x = torch.randn(3, 6, 8)
    fused = rc.fuse(model, x)  # the check would raise, had it been folded
    assert isinstance(fused[1], nn.BatchNorm1d) and not fused.rankcut_fuse["folded"]


def test_a_batchnorm1d_is_not_folded_without_inputs_to_tell_its_input_rank():
    """Without example_inputs a BatchNorm1d's input may be 3-D (it then normalises dim 1, not
    the features) and nothing checks the fold: it is left as it is (it used to be folded,
    1.2 off on (3, 6, 8) inputs, and a TorchScript export without a check kept that)."""
    torch.manual_seed(0)
    model = _random_stats(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)))
    fused = rc.fuse(model)
    assert isinstance(fused[1], nn.BatchNorm1d) and not fused.rankcut_fuse["folded"]
    x = torch.randn(3, 6, 8)
    assert torch.allclose(fused(x), model(x))
    assert rc.fuse(model, torch.randn(5, 8)).rankcut_fuse["folded"]  # 2-D inputs: folded


class _ViewHead(nn.Module):
    """A conv, then .view of its (channels_last) activation: the forward fails in channels_last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 36, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).view(x.shape[0], -1))


def test_a_model_that_cannot_run_channels_last_is_kept_contiguous_or_refused():
    model, x = _ViewHead().eval(), torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="fails in channels_last"):
        auto = rc.fuse(model, x, memory_format="auto")
    assert auto.rankcut_fuse["memory_format"] == "contiguous"
    assert torch.allclose(auto(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="memory_format: the model's forward fails in "
                                         "channels_last .*view"):
        rc.fuse(model, x, memory_format="channels_last")
    conv3d, x3 = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten()).eval(), torch.rand(1, 2, 4, 4, 4)
    assert rc.fuse(conv3d, x3, memory_format="auto").rankcut_fuse["memory_format"] == "contiguous"
    with pytest.raises(ValueError, match="at most 4 dimensions.*Conv3d"):
        rc.fuse(conv3d, x3, memory_format="channels_last")


class _StandardisedConv(nn.Conv2d):
    """A Conv2d whose forward standardises its weight: a BatchNorm folded into the weight would
    be standardised away."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_a_parametrized_or_subclassed_conv_is_not_folded_into():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    from torch.nn.utils import spectral_norm as old_spectral_norm

    for conv in (weight_norm(nn.Conv2d(3, 4, 3)), _StandardisedConv(3, 4, 3),
                 # the older hook-based spectral norm: no weight Parameter either
                 old_spectral_norm(nn.Conv2d(3, 4, 3))):
        model = _randomise_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(4)).eval())
        fused = rc.fuse(model, x)
        assert isinstance(fused[1], nn.BatchNorm2d) and not fused.rankcut_fuse["folded"]
    # a subclass that keeps torch's forward computes conv(x, weight): folded
    keeps = type("Plain", (nn.Conv2d,), {})(3, 4, 3)
    fused = rc.fuse(_randomise_batchnorm(nn.Sequential(keeps, nn.BatchNorm2d(4)).eval()), x)
    assert isinstance(fused[1], nn.Identity)


class _Aliased(nn.Module):
    """A conv held at two paths, called through the second (fx names it by the first); a
    second conv whose weight the forward also reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.alias(x)) + self.bn2(self.conv2(x)) + torch.nn.functional.conv2d(
            x, self.conv2.weight, padding=1)


def test_a_layer_held_twice_or_whose_weight_is_read_elsewhere_is_not_folded():
    model = _randomise_batchnorm(_Aliased().eval())
    x = torch.randn(2, 3, 8, 8)
    fused = rc.fuse(model, x)  # its check would fail on a wrong fold
    assert fused.rankcut_fuse["folded"] == []


def test_the_check_allows_half_precision_rounding_and_matching_infinities():
    x = torch.randn(1, 16, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        model = _randomise_batchnorm(nn.Sequential(nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16))
                                     ).eval().to(dtype)
        fused = rc.fuse(model, x.to(dtype))
        assert isinstance(fused[1], nn.Identity)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, v):
            y = self.fc(v)
            return y.masked_fill(y < 0, float("-inf"))

    rc.fuse(Masked().eval(), torch.randn(4, 8))  # the same infinities in both: passes


def test_a_model_with_a_dict_output_is_fused_and_checked():
    """A model whose output is a dict (torchvision's segmentation models: {"out", "aux"}):
    the check refused it with a TypeError (a tensor or a tuple of tensors expected)."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = self.body(x)
            return {"out": y, "aux": [self.head(y.mean((2, 3))), None]}

    model, x = TwoHeads().eval(), torch.randn(2, 3, 10, 10)
    fused = rc.fuse(model, x)
    assert isinstance(fused.body[1], nn.Identity)
    with torch.no_grad():
        want, got = model(x), fused(x)
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["aux"][0], want["aux"][0], rtol=1e-4, atol=1e-5)


class _UntraceableShared(nn.Module):
    """fx cannot trace it (control flow on a value); one ReLU instance twice in a Sequential,
    and one convolution twice."""

    def __init__(self):
        super().__init__()
        act, conv = nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.BatchNorm2d(4),
                                  nn.Conv2d(4, 4, 3, padding=1), act, nn.BatchNorm2d(4),
                                  conv, nn.BatchNorm2d(4), conv, nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x


def test_the_sequential_fallback_folds_only_true_neighbours_used_once():
    """The BatchNorm after a shared ReLU is not folded into the conv before the ReLU (children
    listed without repeats made them look adjacent), nor is anything folded into a conv called
    twice (the fold would change both calls)."""
    torch.manual_seed(0)
    model = _randomise_batchnorm(_UntraceableShared().eval())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="cannot trace"):
        fused = rc.fuse(model)  # no inputs: nothing would catch a wrong fold
    assert fused.rankcut_fuse["folded"] == []
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_memory_format_is_set_or_chosen_by_timing(compressed, monkeypatch):
    _, small = compressed
    x = torch.rand(2, 3, 32, 32)
    cl = rc.fuse(small, x, memory_format="channels_last")
    convs = [m for m in cl.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         for m in convs)
    assert cl.rankcut_fuse["memory_format"] == "channels_last"
    assert torch.allclose(cl(x), small.eval()(x), atol=1e-4)
    # "auto" keeps the faster format: a stand-in timer that calls the second (channels_last)
    # model slower, then faster
    for cl_ms, expected in ((2.0, "contiguous"), (0.5, "channels_last")):
        def fake(a, b, x, cl_ms=cl_ms, **kw):
            return (Latency(1.0, 1.0, 1.0, 15, 2, 2, "cpu"),
                    Latency(cl_ms, cl_ms, cl_ms, 15, 2, 2, "cpu"))
        monkeypatch.setattr(sys.modules["rankcut.fuse"], "compare_latency", fake)
        assert rc.fuse(small, x, memory_format="auto").rankcut_fuse["memory_format"] == expected
    assert "memory_format" not in rc.fuse(small, x).rankcut_fuse


@pytest.mark.parametrize("args, kwargs, match", [
    (("model",), {}, "model: expected an nn.Module, got str"),
    ((nn.Conv2d(3, 3, 1),), {"atol": -1}, "atol: expected a number >= 0"),
    ((nn.Conv2d(3, 3, 1), "x"), {}, "example_inputs must be a tensor"),
    ((nn.Conv2d(3, 3, 1),), {"revert_slower": True}, "revert_slower: needs example_inputs"),
    ((nn.Conv2d(3, 3, 1),), {"revert_slower": 1}, "revert_slower: expected True or False"),
    ((nn.Conv2d(3, 3, 1),), {"latency_margin": -0.1}, "latency_margin: expected a number >= 0"),
    ((nn.Conv2d(3, 3, 1),), {"memory_format": "nhwc"}, "memory_format: expected None, 'auto'"),
    ((nn.Conv2d(3, 3, 1),), {"memory_format": "auto"}, "memory_format: needs example_inputs"),
])
def test_bad_arguments_are_refused_by_name(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rc.fuse(*args, **kwargs)
