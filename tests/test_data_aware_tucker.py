"""Data-aware Tucker-2: factors fitted in the output norm on the layer's input statistics."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankcut as rc
from rankcut import data
from rankcut.calibrate import input_second_moments
from rankcut.decompose import tucker
from rankcut.layers import TuckerConv2d
from rankcut.models import PRETRAINED, create

tucker_module = importlib.import_module("rankcut.decompose.tucker")


def correlated_images(channels, count=2, n=8, size=12, seed=0):
    """Batches whose channels are mixed (decaying spectrum) and whose pixels are smoothed, with
    a mean offset: the correlated inputs of a trained network's inner layers."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=g) * torch.exp(-torch.arange(channels) / 3)
    blur = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = (blur[:, None] * blur[None, :]).expand(channels, 1, 3, 3)
    out = []
    for _ in range(count):
        x = torch.einsum("ij,njhw->nihw", mix, torch.randn(n, channels, size, size, generator=g))
        out.append(F.conv2d(x, blur, padding=1, groups=channels) + 0.3)
    return out


def output_error(dense, layer, xs):
    """||layer(x) - dense(x)|| / ||dense(x) - bias|| over the batches."""
    with torch.no_grad():
        ref = torch.cat([dense(x) for x in xs])
        new = torch.cat([layer(x) for x in xs])
        bias = 0 if dense.bias is None else dense.bias[None, :, None, None]
        return float((new - ref).norm() / (ref - bias).norm())


def conv_covs(conv, xs):
    return input_second_moments(nn.Sequential(conv), ["0"], xs)["0"]


@pytest.mark.parametrize("T, S, kernel, stride, padding, groups, ranks", [
    (24, 16, 3, 1, 1, 1, (8, 5)),
    (32, 24, 3, 2, 1, 2, (6, 5)),      # grouped, strided
    (16, 12, (3, 5), 1, "same", 1, (6, 4)),
    (20, 8, 5, 2, 2, 1, (5, 3)),
])
def test_lower_output_error_than_plain_tucker_on_correlated_inputs(T, S, kernel, stride, padding,
                                                                    groups, ranks):
    torch.manual_seed(0)
    conv = nn.Conv2d(S, T, kernel, stride=stride, padding=padding, groups=groups).eval()
    xs = correlated_images(S)
    covs = conv_covs(conv, xs)
    plain = TuckerConv2d.from_dense(conv, ranks)
    aware = TuckerConv2d.from_dense(conv, ranks, cov=covs)
    assert aware.ranks == plain.ranks == ranks
    assert aware.info["data_aware"] and not plain.info["data_aware"]
    e_plain, e_aware = output_error(conv, plain, xs), output_error(conv, aware, xs)
    assert e_aware < 0.8 * e_plain, (e_aware, e_plain)
    # both 1x1 factors keep orthonormal rows / columns, as in plain Tucker
    per = S // groups
    B = aware.first.weight.reshape(groups, ranks[1], per)
    eye = torch.eye(ranks[1]).expand(groups, -1, -1)
    assert torch.allclose(B @ B.mT, eye, atol=1e-5)


def test_decomposition_reports_the_output_error_and_refines_it():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    xs = correlated_images(16, count=3)
    (cov,) = conv_covs(conv, xs)
    W = conv.weight.detach().double()
    one_pass = tucker(W, (8, 6), modes=(0, 1), cov=cov, method="hosvd")
    res = tucker(W, (8, 6), modes=(0, 1), cov=cov)
    assert res.method == one_pass.method == "whitened" and one_pass.n_iter == 0
    assert res.rel_error <= one_pass.rel_error + 1e-12
    assert all(b < a for a, b in zip(res.errors, res.errors[1:], strict=False))
    assert res.core.shape == (8, 6, 3, 3) and res.core.dtype == torch.float64
    layer = nn.Conv2d(16, 24, 3, padding=1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(res.to_tensor())
    measured = output_error(conv.double(), layer, [x.double() for x in xs])
    assert res.rel_error == pytest.approx(measured, rel=1e-3)
    with pytest.raises(ValueError, match=r"cov: expected shape \(144, 144\)"):
        tucker(W, (8, 6), modes=(0, 1), cov=torch.eye(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="modes: data-aware Tucker"):
        tucker(W, (8, 6, 2), modes=(0, 1, 2), cov=cov)


def _fresh(W, ranks, cov):
    tucker_module._last_prepared.clear()
    return tucker(W, ranks, modes=(0, 1), cov=cov)


def _same(a, b):
    return a.rel_error == b.rel_error and torch.equal(a.core, b.core) and all(
        torch.equal(x, y) for x, y in zip(a.factors, b.factors, strict=True))


def test_rank_independent_work_is_reused_only_for_the_same_kernel_and_moment():
    """Scoring many rank pairs of one layer reuses the n x n work; a reused run gives what a
    fresh one does, and another kernel or a moment changed in place is never served stale."""
    torch.manual_seed(2)
    conv = nn.Conv2d(12, 20, 3, padding=1, bias=False)
    (cov,) = conv_covs(conv, correlated_images(12, count=3))
    W = conv.weight.detach().double()
    first = _fresh(W, (8, 6), cov)
    assert len(tucker_module._last_prepared) == 1
    kept = tucker_module._last_prepared[0]
    for ranks in [(8, 6), (4, 5), (12, 9)]:
        reused = tucker(W.clone(), ranks, modes=(0, 1), cov=cov)
        assert tucker_module._last_prepared[0] is kept
        assert _same(reused, _fresh(W, ranks, cov))
        kept = tucker_module._last_prepared[0]
    assert _same(tucker(W, (8, 6), modes=(0, 1), cov=cov), first)
    other = W + 0.1 * torch.randn_like(W)
    assert not _same(tucker(other, (8, 6), modes=(0, 1), cov=cov), first)
    assert _same(tucker(other, (8, 6), modes=(0, 1), cov=cov), _fresh(other, (8, 6), cov))
    cov.add_(torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean())  # in place
    changed = tucker(W, (8, 6), modes=(0, 1), cov=cov)
    assert not _same(changed, first) and _same(changed, _fresh(W, (8, 6), cov))
    del cov, changed
    import gc

    gc.collect()
    assert tucker_module._last_prepared == []  # the large moment goes with the layer's cov


def test_white_inputs_match_plain_tucker():
    """Σ = I makes the output norm the weight norm: the method is then HOOI (fewer sweeps)."""
    torch.manual_seed(2)
    for shape, ranks in [((32, 24, 3, 3), (10, 8)), ((16, 16, 3, 3), (4, 12))]:
        W = torch.randn(shape, dtype=torch.float64) * torch.exp(-torch.arange(shape[1]) / 8)[
            :, None, None]
        n = shape[1] * 9
        aware = tucker(W, ranks, modes=(0, 1), cov=torch.eye(n, dtype=torch.float64))
        plain = tucker(W, ranks, modes=(0, 1))
        assert aware.rel_error <= plain.rel_error + 1e-4, (aware.rel_error, plain.rel_error)
    # i.i.d. inputs (an empirical Σ near the identity): no worse than plain in the output norm
    conv = nn.Conv2d(12, 20, 3).eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 12, 10, 10, generator=g) for _ in range(2)]
    plain = TuckerConv2d.from_dense(conv, (6, 5))
    aware = TuckerConv2d.from_dense(conv, (6, 5), cov=conv_covs(conv, xs))
    assert output_error(conv, aware, xs) <= output_error(conv, plain, xs) * 1.01


def test_plan_apply_and_save_with_data_aware_tucker(tmp_path):
    """rc.plan(method="tucker", calib_data=...) plans data-aware Tucker layers whose predicted
    errors rc.apply realises; the saved model round-trips."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1)).eval()
    batches = correlated_images(12, count=2, n=16, size=8)
    plan = rc.plan(model, batches[0][:1], method="tucker", target="macs=2x", calib_data=batches,
                   min_params=100, allow_slower=True)
    assert plan.active, str(plan)
    for lp in plan.active.values():
        assert lp.method == "tucker" and lp.options.get("data_aware"), str(plan)
    # each layer fitted to the dense model's inputs, the inputs its predicted error is measured on
    small = rc.apply(model, plan, calib_data=batches, sequential=False)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0])) for n in plan.active]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    for name, lp in plan.active.items():
        dense, layer = model.get_submodule(name), small.get_submodule(name)
        assert isinstance(layer, TuckerConv2d) and layer.info["data_aware"]
        measured = output_error(dense, layer, inputs[name])
        assert lp.predicted["error"] == pytest.approx(measured, rel=1e-3), name
        plain = rc.apply(model, rc.Plan({name: rc.LayerPlan("tucker", lp.ranks)}))
        assert measured < output_error(dense, plain.get_submodule(name), inputs[name])
    rc.save(small, tmp_path / "small", plan)
    loaded = rc.load(model, tmp_path / "small")
    x = torch.cat(batches)
    with torch.no_grad():
        assert torch.allclose(loaded(x), small(x), atol=1e-6)
    stored = rc.io.load_plan(tmp_path / "small")
    assert all(stored[n].options.get("data_aware") for n in plan.active)


@pytest.fixture(scope="module")
def resnet20(shared_data):
    weights = shared_data / PRETRAINED["resnet20_cifar"]
    if not weights.is_file() or not (shared_data / "cifar10").is_dir():
        pytest.skip("CIFAR-10 or the ResNet-20 weights not in the shared data")
    evaluate = data.transforms("cifar10", train=False, normalization="resnet20_cifar")
    train = data.dataset("cifar10", "train", root=shared_data, transform=evaluate, limit=1024)
    test = data.dataset("cifar10", "test", root=shared_data)
    model = create("resnet20_cifar", weights=weights).eval()
    calib = data.calibration(train, n=256, batch_size=64, seed=0)
    images = torch.stack([evaluate(img) for img in test.images])
    return model, calib, images, test.labels


@pytest.mark.slow  # (about 27 s on a slow 2-core machine; in make test-all)
def test_pretrained_resnet20_keeps_far_more_with_data_aware_tucker(resnet20):
    """Uniform Tucker-2 at half the MACs of every 3x3 conv but the first, no fine-tuning: every
    layer's output error is lower, and top-1 goes from about 21% (plain) to about 80%; fitted
    sequentially, to about 88%."""
    model, calib, images, labels = resnet20
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]
    plain, aware = rc.Plan(), rc.Plan()
    for name in names:
        ranks = rc.select.layer_ranks(model.get_submodule(name), "tucker", "macs=0.5",
                                      input_hw=(32, 32))
        plain[name] = rc.LayerPlan("tucker", ranks)
        aware[name] = rc.LayerPlan("tucker", ranks, options={"data_aware": True})
    small_plain = rc.apply(model, plain)
    # each layer fitted to the dense model's inputs, the inputs its output error is measured on
    small_aware = rc.apply(model, aware, calib_data=calib, sequential=False)
    covs = input_second_moments(model, names, calib[:1])  # the output error on 64 images
    for name in names:
        dense = model.get_submodule(name)
        with torch.no_grad():
            errs = [rc.curves.output_error(dense, m.get_submodule(name).dense_weight(),
                                                  covs[name]) for m in (small_plain, small_aware)]
        assert errs[1] < 0.9 * errs[0], (name, errs)  # measured: 0.36x to 0.81x

    def top1(m):
        with torch.no_grad():
            return float((m(images).argmax(1) == labels).float().mean()) * 100

    acc_plain, acc_aware = top1(small_plain), top1(small_aware)
    assert acc_aware > acc_plain + 40, (acc_plain, acc_aware)
    # fitted in order to the inputs the factorized layers before give (the default)
    acc_sequential = top1(rc.apply(model, aware, calib_data=calib))
    assert acc_sequential > acc_aware + 3, (acc_aware, acc_sequential)  # measured: 81.0 -> 87.8


def test_the_layer_records_the_output_error_the_planner_would_measure():
    """Candidates are scored by the solver's own output error (no n x n product each); it is
    the error curves.output_error measures on the built layer."""
    from rankcut.curves import output_error

    torch.manual_seed(3)
    conv = nn.Conv2d(10, 14, 3, padding=1, bias=False)
    covs = conv_covs(conv, correlated_images(10, count=3))
    for ranks in [(4, 3), (8, 6), (14, 10)]:
        layer = TuckerConv2d.from_dense(conv, ranks, cov=covs)
        with torch.no_grad():
            measured = output_error(conv, layer.dense_weight(), covs)
        # abs: the built layer's float32 weights round at full rank
        assert layer.info["output_error"] == pytest.approx(measured, rel=1e-4, abs=1e-6)
