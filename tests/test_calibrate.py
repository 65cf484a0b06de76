import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rankcut as rc
from rankcut.calibrate import (
    ROWS_PER_WIDTH,
    conv_patches,
    corrected_weight,
    forward_order,
    input_second_moments,
    paired_moments,
    sampled_rows,
)
from rankcut.data import read_cifar10_bin
from rankcut.decompose import svd
from rankcut.models import PRETRAINED, create


@settings(max_examples=25, deadline=None)
@given(kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       padding=st.sampled_from([0, 1, (2, 1), "same", "valid"]),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       dilation=st.integers(1, 2), stride=st.integers(1, 2))
def test_patches_are_what_the_kernel_multiplies(kernel, padding, mode, dilation, stride):
    if padding == "same":
        stride = 1
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=mode, bias=False).double()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    y = conv(x)
    patches = conv_patches(conv, x)
    rows = patches @ conv.weight.reshape(5, -1).mT  # (N·L, T)
    assert torch.allclose(rows, y.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-10)
    at = torch.randperm(len(patches), generator=torch.Generator().manual_seed(3))[:7]
    assert torch.equal(conv_patches(conv, x, at), patches[at])  # gathered, not unfolded


def test_moments_sample_rows_of_wide_inputs_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)  # width 18: at most 16 * 18 = 288 rows a batch
    g = torch.Generator().manual_seed(0)
    assert sampled_rows(conv, torch.randn(1, 2, 16, 18), g) is None  # 288 rows: all
    at = sampled_rows(conv, torch.randn(2, 2, 16, 18), g)
    assert len(at) == ROWS_PER_WIDTH * 18 and len(set(at.tolist())) == len(at)
    assert int(at.max()) < 2 * 16 * 18
    model = nn.Sequential(conv)
    xs = [torch.randn(4, 2, 30, 30) for _ in range(3)]
    full = torch.cat([conv_patches(conv, x) for x in xs]).double()
    (moment,) = input_second_moments(model, ["0"], xs)["0"]
    exact = full.mT @ full / len(full)
    assert not torch.allclose(moment, exact)  # sampled, and close
    assert float((moment - exact).norm() / exact.norm()) < 0.2  # ~ sqrt(18 / 864)


def test_second_moments_per_group_and_for_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(6 * 5 * 5, 3))
    xs = [torch.randn(3, 4, 5, 5) for _ in range(2)]
    moments = input_second_moments(model, ["0", "2"], [(x, None) for x in xs])
    patches = torch.cat([conv_patches(model[0], x) for x in xs]).double()
    assert len(moments["0"]) == 2
    for g in range(2):
        p = patches[:, g * 18:(g + 1) * 18]
        assert torch.allclose(moments["0"][g], p.mT @ p / len(p))
    feats = torch.cat([model[:2](x) for x in xs]).double()
    assert torch.allclose(moments["2"][0], feats.mT @ feats / len(feats), atol=1e-10)
    with pytest.raises(ValueError, match="never ran"):
        input_second_moments(model, ["0"], [])


def correlated(n, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.exp(-torch.arange(n) / 6)
    return torch.randn(count, n, generator=g, dtype=torch.float64) @ mix.mT


def test_whitened_svd_minimises_the_output_error_on_correlated_inputs():
    W = torch.randn(40, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = correlated(60, 4000)
    C = X.mT @ X / len(X)
    plain, aware = svd(W, 8), svd(W, 8, cov=C)

    def out_err(res):
        return float((X @ (W - res.to_matrix()).mT).norm() / (X @ W.mT).norm())

    assert out_err(aware) < 0.5 * out_err(plain)
    assert abs(aware.rel_error - out_err(aware)) < 1e-4  # reported in the output norm
    assert aware.method == "whitened"
    with pytest.raises(ValueError, match=r"cov: expected shape \(60, 60\)"):
        svd(W, 8, cov=torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("shape, rows, dtype", [((24, 90), 500, torch.float64),
                                                ((24, 90), 40, torch.float32),
                                                ((90, 24), 500, torch.float64)],
                         ids=["wide", "wide-rank-deficient-float32", "tall"])
def test_whitened_svd_is_the_cholesky_formula_for_wide_and_tall_weights(shape, rows, dtype):
    # a wide W (m < n) goes through the m x m Gram W Σ Wᵀ, a tall one through L = chol(Σ):
    # both must give [W L]_r L⁻¹, its singular values and its error, for every balance; also
    # with fewer calibration rows than inputs (Σ singular but for the ridge) and a float32 W
    from rankcut.curves import whitened_svd_errors
    from rankcut.decompose.svd import whitening_factor

    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, dtype=torch.float64, generator=g)
    W[3] = 0  # a zero row: a zero singular value on the wide route's division
    X = correlated(shape[1], rows)
    C = X.mT @ X / len(X)
    L = whitening_factor(C)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    W = W.to(dtype)
    for r in (1, 7, min(shape)):
        want = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(L)
        for balance in ("sqrt", "left", "right"):
            res = svd(W, r, cov=C, balance=balance)
            assert res.A.dtype == dtype
            # compared in the output norm (times L): with fewer rows than inputs the
            # directions the data never takes are fixed only by the ridge
            got, want_ = res.to_matrix().double() @ L, want @ L
            assert torch.allclose(got, want_, atol=tol * float(want_.norm()))
            assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
        # the Gram squares the spectrum: values below ~1e-8 of the largest are not resolved
        assert torch.allclose(res.S.double(), S[:r], rtol=tol * 100, atol=1e-7 * float(S[0]))
        assert abs(res.rel_error - float(S[r:].norm() / S.norm())) < tol
    layer = nn.Linear(shape[1], shape[0], bias=False)
    layer.weight.data = W.float()
    errors = whitened_svd_errors(layer, [C])
    tails = (S.pow(2).flip(0).cumsum(0).flip(0) / S.pow(2).sum()).sqrt()
    assert torch.allclose(errors[:-1], tails[1:].to(errors), atol=1e-5)
    with pytest.raises(ValueError, match="cov: not positive semi-definite"):
        svd(W, 4, cov=-C)


def test_apply_with_data_aware_plans():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    mix = torch.randn(8, 8) * torch.exp(-torch.arange(8.0))
    batches = [torch.einsum("ij,njhw->nihw", mix, torch.randn(4, 8, 10, 10)) for _ in range(3)]
    plan = rc.Plan({"0": rc.LayerPlan("svd", (3,), options={"data_aware": True})})
    with pytest.raises(ValueError, match="calib_data: the plan asks for data-aware"):
        rc.apply(model, plan)
    aware = rc.apply(model, plan, calib_data=batches)
    plain = rc.apply(model, rc.Plan({"0": rc.LayerPlan("svd", (3,))}))
    assert aware[0].info["data_aware"] and not plain[0].info["data_aware"]
    x = batches[0]

    def err(m):
        return float((m[0](x) - model[0](x)).norm() / model[0](x).norm())

    assert err(aware) < err(plain)
    with pytest.raises(ValueError, match="data_aware is implemented for methods 'svd', "
                                         "'cur', 'cp', 'tucker' only, not 'spatial_svd'"):
        rc.apply(model, rc.Plan({"2": rc.LayerPlan("spatial_svd", (4,),
                                                   options={"data_aware": True})}),
                 calib_data=batches)


@pytest.mark.parametrize("solver", ["deim", "rx"])
def test_data_aware_cur_is_planned_applied_and_fits_the_outputs(solver):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 40)).eval()
    mix = torch.randn(8, 8) * torch.exp(-torch.arange(8.0))
    batches = [torch.einsum("ij,njhw->nihw", mix, torch.randn(8, 8, 6, 6)) for _ in range(3)]
    opts = {"solver": solver}
    plan = rc.plan(model, batches[0], method="cur", target="params=3x", calib_data=batches,
                   options={"cur": opts}, allow_slower=True)
    assert plan.active and all(lp.options.get("data_aware") for lp in plan.active.values())
    aware = rc.apply(model, plan, calib_data=batches)
    plain_plan = rc.Plan({n: rc.LayerPlan("cur", lp.ranks, options=opts)
                          for n, lp in plan.active.items()})
    plain = rc.apply(model, plain_plan)
    x = batches[0]
    for name in plan.active:
        layer = aware.get_submodule(name)
        assert layer.info["data_aware"] and "output_error" in layer.info
        assert not plain.get_submodule(name).info["data_aware"]
    with torch.no_grad():
        ref = model(x)
        err = {k: float((m(x) - ref).norm() / ref.norm()) for k, m in (("aware", aware),
                                                                      ("plain", plain))}
    assert err["aware"] < err["plain"]
    # sequential fitting (the default with data) keeps W's own rows (and columns): with the
    # first layer factorized, the second one's inputs change, and its factors are still entries
    # of the dense weight, not of the corrected one
    both = rc.Plan({n: rc.LayerPlan("cur", (r,), options={**opts, "data_aware": True})
                    for n, r in (("0", 4), ("3", 6))})
    seq = rc.apply(model, both, calib_data=batches)
    second = seq.get_submodule("3")
    # ... and it fits the corrected weight: the errors of the first layer are not compounded
    one_shot = rc.apply(model, both, calib_data=batches, sequential=False)
    with torch.no_grad():
        assert float((seq(x) - ref).norm()) < float((one_shot(x) - ref).norm())
    W = model[3].weight.detach()
    A, B = second.second.weight.detach(), second.first.weight.detach()
    if solver == "rx":
        rows = [int((W - b).abs().sum(1).argmin()) for b in B]
        assert torch.equal(B, W[rows])
    else:
        cols = [int((W - a[:, None]).abs().sum(0).argmin()) for a in A.mT]
        assert torch.equal(A, W[:, cols])


@pytest.mark.parametrize("how", [{"rank": "params=2x"}, {"target": "params=3x"}])
def test_a_plan_on_data_solves_cur_on_data_only(monkeypatch, how):
    # the planner builds a data-aware method's candidates on the data, by a rule or to a
    # target: a data-free solve first would be thrown away (a full SVD of a 4096 x 25,088 layer)
    import rankcut.decompose as dec

    calls = []
    real = dec.cur
    monkeypatch.setattr(dec, "cur", lambda *a, **k: calls.append(k.get("cov") is not None)
                        or real(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20)).eval()
    batches = [torch.randn(64, 40) for _ in range(2)]
    plan = rc.plan(model, batches[0], method="cur", calib_data=batches, min_params=0,
                   allow_slower=True, **how)
    assert len(plan.active) == 2 and calls and all(calls)
    assert all(lp.predicted["error"] < 1 for lp in plan.active.values())  # measured on data
    if "target" in how:  # 8 candidate ranks a layer, each solved once, on the data
        assert len(calls) >= 10


@pytest.fixture(scope="module")
def cifar(shared_data):
    folder = shared_data / "cifar10/cifar-10-batches-bin"
    weights = shared_data / PRETRAINED["resnet20_cifar"]
    if not folder.is_dir() or not weights.is_file():
        pytest.skip("CIFAR-10 binary batches or ResNet-20 weights not in the shared data")
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    train, _ = read_cifar10_bin(shared_data, "train", limit=256)
    test, labels = read_cifar10_bin(shared_data, "test")
    norm = lambda u8: (u8.float() / 255 - mean) / std  # noqa: E731
    return create("resnet20_cifar", weights=weights).eval(), norm(train), norm(test), labels


def top1(model, images, labels):
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean()) * 100


@pytest.mark.slow  # (about 16 s on a slow 2-core machine; in make test-all)
def test_data_aware_svd_keeps_far_more_of_the_pretrained_resnet20(cifar):
    """Uniform channel SVD keeping half the MACs of every 3x3 conv but the first, no fine-tuning
    (METHODS.md: plain keeps about 15%, data-aware about 61%; 256 calibration images)."""
    model, calib, test, labels = cifar
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"]
    plain, aware = rc.Plan(), rc.Plan()
    for name in names:
        (rank,) = rc.select.layer_ranks(model.get_submodule(name), "svd", "macs=0.5",
                                        input_hw=(32, 32))
        plain[name] = rc.LayerPlan("svd", (rank,))
        aware[name] = rc.LayerPlan("svd", (rank,), options={"data_aware": True})
    batches = [calib[i:i + 64] for i in range(0, 256, 64)]
    acc_plain = top1(rc.apply(model, plain), test, labels)
    acc_aware = top1(rc.apply(model, aware, calib_data=batches), test, labels)
    assert acc_aware > acc_plain + 20, (acc_plain, acc_aware)


def test_calibration_and_evaluation_leave_mixed_train_eval_flags_alone():
    """A training model with a frozen (eval) BatchNorm keeps exactly those flags."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 2)).train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    x = torch.randn(4, 3, 6, 6)
    input_second_moments(model, ["0"], [x])
    rc.train.evaluate(model, (x, torch.zeros(4, dtype=torch.long)))
    rc.select.mean_loss(model, [(x, torch.zeros(4, dtype=torch.long))],
                        nn.functional.cross_entropy)
    rc.plan(model, x, method="svd", rank=2, min_params=10, allow_slower=True)
    assert [m.training for m in model.modules()] == flags


class _Backwards(nn.Module):
    """Registers its layers in the reverse of the order they run."""

    def __init__(self):
        super().__init__()
        self.last = nn.Linear(16 * 2 * 2, 10)
        self.second = nn.Conv2d(16, 16, 3, padding=1)
        self.first = nn.Conv2d(6, 16, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.second(torch.relu(self.first(x))))
        return self.last(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _correlated_images(count, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=g) * torch.exp(-torch.arange(6.0))
    return [torch.einsum("ij,njhw->nihw", mix, torch.randn(16, 6, 6, 6, generator=g))
            for _ in range(count)]


def test_paired_moments_and_the_corrected_weight():
    torch.manual_seed(0)
    model = _Backwards().eval()
    batches = _correlated_images(2, 1)
    assert forward_order(model, ["last", "first", "second"], batches) == [
        "first", "second", "last"]
    # the model against itself: both moments are the layer's input moment, and W' = W
    moments, cross, count = paired_moments(model, model, "second", batches)
    expected = input_second_moments(model, ["second"], batches)["second"]
    assert torch.allclose(moments[0], expected[0]) and torch.allclose(cross[0], expected[0])
    assert count == 2 * 16 * 6 * 6  # patches
    assert torch.allclose(corrected_weight(model.second, moments, cross, count),
                          model.second.weight, atol=1e-5)
    assert cross[0] is moments[0]  # x̃ = x: no second moment is accumulated, W' is W
    # against a perturbed first layer: W' maps what the layer now gets to what it should give
    small = rc.apply(model, rc.Plan({"first": rc.LayerPlan("svd", (2,))}))
    moments, cross, count = paired_moments(model, small, "second", batches)
    assert cross[0] is not moments[0]
    # the closed form W (Σ× + λI)(Σ̃ + λI)⁻¹, λ = (d / rows)·mean(diag Σ̃)
    A, B = moments[0].clone(), cross[0].clone()
    W = model.second.weight.detach().reshape(model.second.out_channels, -1)
    lam = A.shape[0] / count * A.diagonal().mean()
    eye = torch.eye(len(A), dtype=A.dtype)
    closed = W.double() @ (B + lam * eye) @ torch.linalg.inv(A + lam * eye)
    fixed = copy.deepcopy(model.second)
    with torch.no_grad():
        fixed.weight.copy_(corrected_weight(model.second, moments, cross, count))
    assert torch.allclose(fixed.weight.reshape(closed.shape).double(), closed, rtol=1e-4,
                          atol=1e-6)
    x = torch.cat(batches)
    want = model.second(torch.relu(model.first(x)))
    seen = torch.relu(small.first(x))

    def err(layer):
        return float((layer(seen) - want).norm() / want.norm())

    assert err(fixed) < 0.75 * err(model.second)
    # a first batch on which x̃ = x (zeros: the factorized layer gives its bias, as the dense
    # one) and then one on which it differs: Σ× counts both
    zeros = [torch.zeros_like(batches[0])]
    m0, c0, n0 = paired_moments(model, small, "second", zeros)
    assert c0[0] is m0[0]
    m1, c1, n1 = paired_moments(model, small, "second", batches[:1])
    both_m, both_c, both_n = paired_moments(model, small, "second", zeros + batches[:1])
    assert both_n == n0 + n1
    assert torch.allclose(both_c[0], (c0[0] * n0 + c1[0] * n1) / both_n)
    assert torch.allclose(both_m[0], (m0[0] * n0 + m1[0] * n1) / both_n)


def test_sequential_apply_fits_each_layer_to_the_compressed_inputs():
    """Three layers in a reverse-registered module, the first cut hard: fitted in forward order to
    what the factorized layers before them give, the network's output is much closer to the
    dense one than when each layer is fitted to the dense inputs."""
    torch.manual_seed(0)
    model = _Backwards().eval()
    batches = _correlated_images(4, 2)
    plan = rc.Plan({"first": rc.LayerPlan("svd", (3,), options={"data_aware": True}),
                    "second": rc.LayerPlan("tucker", (12, 12), options={"data_aware": True}),
                    "last": rc.LayerPlan("svd", (10,))})
    x = torch.cat(_correlated_images(2, 3))  # held-out inputs
    dense = model(x)

    def err(m):
        return float((m(x) - dense).norm() / dense.norm())

    one_shot = rc.apply(model, plan, calib_data=batches, sequential=False)
    sequential = rc.apply(model, plan, calib_data=batches)
    assert sequential.last.info["decomposition"] == "svd"
    assert err(sequential) < 0.85 * err(one_shot), (err(sequential), err(one_shot))
    assert not any(isinstance(m, nn.Linear | nn.Conv2d) and not isinstance(
        m, rc.layers.FactorizedLayer) for m in (sequential.first, sequential.second,
                                                sequential.last))
    inplace = copy.deepcopy(model)
    rc.apply(inplace, plan, calib_data=batches, inplace=True)
    assert torch.allclose(inplace(x), sequential(x), atol=1e-5)
    with pytest.raises(ValueError, match="sequential: needs calib_data"):
        rc.apply(model, plan, sequential=True)
    with pytest.raises(ValueError, match="reference: only sequential fitting"):
        rc.apply(model, plan, calib_data=batches, sequential=False, reference=model)
    # a reference whose planned layers are not the model's would be fitted in their place
    # (another head: a model of 7 classes out of one of 10, silently)
    for change in ({"last": nn.Linear(64, 7)}, {"second": nn.Conv2d(16, 16, 3, padding=2)}):
        other = copy.deepcopy(model)
        for name, layer in change.items():
            setattr(other, name, layer)
        with pytest.raises(ValueError, match=f"reference: its layer '{name}'"):
            rc.apply(model, plan, calib_data=batches, reference=other)


def test_two_tensors_are_inputs_and_targets_when_the_second_is_labels_or_shaped_otherwise():
    """calibration_batches reads (x, y) as a pair when y holds class labels or soft targets
    (another shape than x), and as two batches of inputs when both are inputs of one shape."""
    from rankcut.calibrate import calibration_batches, calibration_inputs

    x = torch.randn(10, 3, 4, 4)
    for y in (torch.arange(10), torch.softmax(torch.randn(10, 5), 1)):
        batches = list(calibration_batches((x, y), batch_size=4))
        assert [len(b[0]) for b in batches] == [4, 4, 2]
        assert torch.equal(torch.cat([b[1] for b in batches]), y)
        assert torch.equal(torch.cat(list(calibration_inputs((x, y), batch_size=4))), x)
    two = (torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4))  # two batches of inputs
    assert [b.shape[0] for b in calibration_batches(two)] == [4, 4]
    with pytest.raises(ValueError, match="10 inputs but 9 targets"):
        list(calibration_batches((x, torch.randn(9, 5))))


def test_moments_weigh_batches_by_their_rows_when_sampled():
    """A batch sampled down to 16·d rows stands for all its rows: 1000 rows of [1, 0] in one
    batch and 10 of [0, 1] in another average to what they are (0.99 / 0.0099), not to what
    32 sampled rows against 10 would say (0.76 / 0.24); so do the paired moments."""
    from rankcut.calibrate import input_second_moments, paired_moments

    model = nn.Sequential(nn.Linear(2, 4))
    batches = [torch.tensor([[1.0, 0.0]]).repeat(1000, 1),
               torch.tensor([[0.0, 1.0]]).repeat(10, 1)]
    exact = torch.tensor([1000 / 1010, 10 / 1010], dtype=torch.float64)
    got = input_second_moments(model, ["0"], batches)["0"][0]
    assert torch.allclose(got.diagonal(), exact) and float(got[0, 1]) == 0
    moments, cross, count = paired_moments(model, model, "0", batches)
    assert cross is moments  # (the inputs are the dense ones: one set kept)
    assert torch.allclose(moments[0].diagonal(), exact) and count == 32 + 10


def test_sequential_apply_runs_a_slow_cp_layer_as_its_dense_equivalent_in_later_passes(
        monkeypatch):
    """A CP layer at a quarter of the dense parameters or more runs slower than its conv on CPUs:
    the calibration passes of the layers after it run its composed weight instead (the same
    function, to rounding), and the model returned holds the CP layer itself, on success and
    when a later layer's fit fails. The fit is the one the CP layer itself would give."""
    import rankcut.surgery as surgery
    from rankcut.layers.conv import CPConv2d

    torch.manual_seed(0)
    model = _Backwards().eval()
    batches = _correlated_images(3, 2)
    plan = rc.Plan({"first": rc.LayerPlan("cp", (30,)),  # 30·(6+3+3+16) params of 864
                    "second": rc.LayerPlan("tucker", (12, 12), options={"data_aware": True}),
                    "last": rc.LayerPlan("svd", (10,))})
    calls = []
    forward = CPConv2d.forward
    monkeypatch.setattr(CPConv2d, "forward", lambda self, x: calls.append(1) or forward(self, x))
    small = rc.apply(model, plan, calib_data=batches)
    assert calls == [] and isinstance(small.first, CPConv2d)  # never run during the fits
    monkeypatch.setattr(surgery, "STAND_IN_CP_FRACTION", float("inf"))  # the layer itself
    slow = rc.apply(model, plan, calib_data=batches)
    assert calls and isinstance(slow.first, CPConv2d)
    x = torch.cat(_correlated_images(2, 3))
    assert torch.allclose(small(x), slow(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(small.state_dict().values(), slow.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    monkeypatch.setattr(surgery, "STAND_IN_CP_FRACTION", 0.25)
    failing = copy.deepcopy(model)
    real = surgery.factorize

    def fails_last(module, lp, *args, name=None, **kwargs):
        if name == "last":
            raise ValueError("cannot")
        return real(module, lp, *args, name=name, **kwargs)

    monkeypatch.setattr(surgery, "factorize", fails_last)
    with pytest.raises(ValueError, match="plan layer 'last': cannot"):
        rc.apply(failing, plan, calib_data=batches, inplace=True)
    assert isinstance(failing.first, CPConv2d) and isinstance(failing.last, nn.Linear)


def test_a_reference_on_another_dtype_is_refused_by_name():
    model = _Backwards().eval()
    plan = rc.Plan({"second": rc.LayerPlan("tucker", (8, 8))})
    with pytest.raises(ValueError, match="reference: it is on cpu in torch.float64, the model"):
        rc.apply(model, plan, calib_data=_correlated_images(1, 0),
                 reference=copy.deepcopy(model).double())
