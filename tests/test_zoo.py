"""End to end on real architectures: plan every eligible layer, apply, run, save, load into a
fresh instance, export to ONNX (checked against onnxruntime) and TorchScript."""

import pytest
import torch
import torchvision
from torch import nn

import rankcut as rc
from rankcut.models import PRETRAINED, create

# Solver options kept small: these tests check plumbing on real layer mixes, not accuracy.
FAST = {"cp": {"max_iter": 3}, "tucker": {"max_iter": 2}}


def reduced_plan(model: nn.Module, method: str) -> rc.Plan:
    """``method`` on every eligible layer it applies to (else channel SVD), at 1/4 rank for
    convolutions."""
    plan = rc.Plan()
    for name, reason in rc.target_layers(model).items():
        module = model.get_submodule(name)
        if reason is not None:
            plan[name] = rc.LayerPlan.skipped(reason)
            continue
        if isinstance(module, nn.Linear):  # 1/8: large classifiers take the randomized SVD
            rank = max(1, min(module.in_features, module.out_features) // 8)
            plan[name] = rc.LayerPlan(method if method in ("svd", "cur") else "svd", (rank,))
            continue
        g = module.groups
        t, s = module.out_channels // g, module.in_channels // g
        use = method if module.kernel_size != (1, 1) or method in ("svd", "cur") else "svd"
        ranks = (max(1, t // 4), max(1, s // 4)) if use == "tucker" else (max(1, min(t, s) // 4),)
        form = "cp3" if use == "cp" and name.endswith("2") else None  # both CP forms appear
        plan[name] = rc.LayerPlan(use, ranks, form=form, options=FAST.get(use, {}))
    return plan


def round_trip(name: str, method: str, make, x, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    plan = reduced_plan(model, method)
    assert plan.active, "nothing to factorize"
    small = rc.apply(model, plan)
    n_dense = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < n_dense  # layers really were replaced
    with torch.no_grad():
        out = small(x)
    assert torch.isfinite(out).all()
    rc.save(small, tmp_path / "saved", plan=plan)
    loaded = rc.load(make().eval(), tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    rc.export(loaded, tmp_path / "model.onnx", example_inputs=x)  # raises if ORT disagrees
    assert (tmp_path / "model.onnx").stat().st_size > 0
    return small


def torchvision_model(name):
    return lambda: torchvision.models.get_model(name, weights=None)


DEFAULT = [("resnet18", m) for m in ("svd", "cur", "spatial_svd", "cp", "tucker")] + [
    ("mobilenet_v2", "svd"), ("shufflenet_v2_x1_0", "cur")]
SLOW = [(n, m) for n in ("alexnet", "vgg11_bn", "resnet50", "densenet121", "efficientnet_b0",
                         "convnext_tiny") for m in ("svd", "cp", "tucker")] + [("vit_b_16", "svd"),
                                                                               ("vit_b_16", "cur")]


@pytest.mark.parametrize("name, method", DEFAULT)
def test_torchvision_models_compress_save_load_export(name, method, tmp_path):
    round_trip(name, method, torchvision_model(name), torch.randn(1, 3, 64, 64), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, method", SLOW)
def test_more_torchvision_models_compress_save_load_export(name, method, tmp_path):
    size = 224 if name.startswith("vit") else 64
    round_trip(name, method, torchvision_model(name), torch.randn(1, 3, size, size), tmp_path)


def test_pretrained_resnet20_compress_save_load_export(shared_data, tmp_path):
    weights = shared_data / PRETRAINED["resnet20_cifar"]
    if not weights.is_file():
        pytest.skip(f"pretrained weights not found at {weights}")
    model = create("resnet20_cifar", weights=weights).eval()
    plan = rc.Plan({
        "layer1.0.conv1": rc.LayerPlan("tucker", (8, 8)),
        "layer1.1.conv2": rc.LayerPlan("cp", (16,), options={"max_iter": 50}),
        "layer2.0.conv2": rc.LayerPlan("cp", (24,), form="cp3", options={"max_iter": 50}),
        "layer2.1.conv1": rc.LayerPlan("spatial_svd", (16,)),
        "layer3.0.conv1": rc.LayerPlan("svd", (24,)),
        "layer3.1.conv2": rc.LayerPlan("cur", (32,), options={"solver": "deim"}),
        "linear": rc.LayerPlan("svd", (8,)),
    })
    small = rc.apply(model, plan)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = small(x)
        # the same layers at full rank reproduce the pretrained model
        full = rc.Plan({"layer1.0.conv1": rc.LayerPlan("tucker", (16, 16)),
                        "layer3.0.conv1": rc.LayerPlan("svd", (64,)),
                        "linear": rc.LayerPlan("svd", (10,))})
        assert torch.allclose(rc.apply(model, full)(x), model(x), atol=1e-4)
    rc.save(small, tmp_path / "r20", plan=plan)
    loaded = rc.load(create("resnet20_cifar").eval(), tmp_path / "r20")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    rc.export(loaded, tmp_path / "r20.onnx", example_inputs=x)
    rc.export(loaded, tmp_path / "r20.pt", format="torchscript", example_inputs=x)
    scripted = torch.jit.load(str(tmp_path / "r20.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), out, atol=1e-5)
