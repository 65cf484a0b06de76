import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rankcut as rc
from rankcut.calibrate import conv_patches, input_second_moments
from rankcut.data import read_cifar10_bin
from rankcut.decompose import svd
from rankcut.models import create


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
    rows = conv_patches(conv, x) @ conv.weight.reshape(5, -1).mT  # (N·L, T)
    assert torch.allclose(rows, y.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-10)


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
                                         "'cp', 'tucker' only, not 'spatial_svd'"):
        rc.apply(model, rc.Plan({"2": rc.LayerPlan("spatial_svd", (4,),
                                                   options={"data_aware": True})}),
                 calib_data=batches)


@pytest.fixture(scope="module")
def cifar(shared_data):
    folder = shared_data / "cifar10/cifar-10-batches-bin"
    weights = shared_data / "weights/resnet_cifar10_akamaster/resnet20-12fca82f.th"
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
    rc.profile.top1_accuracy(model, x, torch.zeros(4, dtype=torch.long))
    rc.select.mean_loss(model, [(x, torch.zeros(4, dtype=torch.long))],
                        nn.functional.cross_entropy)
    rc.plan(model, x, method="svd", rank=2, min_params=10, allow_slower=True)
    assert [m.training for m in model.modules()] == flags
