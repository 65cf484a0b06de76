"""rankcut.models: the registry, torchvision and user models by name, weights loading; and the
pretrained CIFAR-10 models' accuracy through rankcut.data, when ../shared/data is present."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rankcut import data, models
from rankcut.models import create


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_vgg_bn_cifar_layout():
    vgg = create("vgg11_bn_cifar")
    assert n_params(vgg) == 9_228_362  # as the pretrained file (README)
    convs = {i: (m.in_channels, m.out_channels) for i, m in enumerate(vgg.features)
             if isinstance(m, nn.Conv2d)}
    assert convs == {0: (3, 64), 4: (64, 128), 8: (128, 256), 11: (256, 256), 15: (256, 512),
                     18: (512, 512), 22: (512, 512), 25: (512, 512)}
    assert all(vgg.features[i + 1].num_features == c for i, (_, c) in convs.items())
    assert [i for i, m in enumerate(vgg.features) if isinstance(m, nn.MaxPool2d)] == \
        [3, 7, 14, 21, 28]
    assert all(m.bias is None and m.kernel_size == (3, 3) and m.padding == (1, 1)
               for m in vgg.features if isinstance(m, nn.Conv2d))
    assert isinstance(vgg.classifier, nn.Linear) and vgg.classifier.in_features == 512
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    vgg16 = create("vgg16_bn_cifar", num_classes=100)
    assert sum(isinstance(m, nn.Conv2d) for m in vgg16.features) == 13
    assert vgg16.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_seed_models():
    vgg = create("vgg11_torchvision")  # seed 001: 25088-4096-4096-10 behind the 7x7 pool
    linears = [(m.in_features, m.out_features) for m in vgg.classifier if isinstance(m, nn.Linear)]
    assert linears == [(25088, 4096), (4096, 4096), (4096, 10)]
    assert n_params(vgg) == 132_863_336 - 4096 * 990 - 990  # seed 001's count with 1000 classes
    assert sum(n_params(m) for m in vgg.features) == 9_220_480
    assert vgg.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    alex = create("alexnet_cifar")  # seed 002
    first = alex.features[0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride,
            first.padding) == (3, 64, (5, 5), (1, 1), (2, 2))
    assert alex.classifier[-1].out_features == 10
    assert alex.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_models_by_name(tmp_path):
    model = create("resnet18", num_classes=10).eval()
    assert model.fc.out_features == 10
    assert create("mobilenet_v3_small").classifier[-1].out_features == 1000
    assert "resnet18" in models.torchvision_names() and "vit_b_16" in models.torchvision_names()
    # weights= is a state-dict file, safetensors or torch
    x = torch.randn(1, 3, 32, 32)
    save_file(model.state_dict(), tmp_path / "r18.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "r18.pt")
    for file in ("r18.safetensors", "r18.pt"):
        loaded = create("resnet18", weights=tmp_path / file, num_classes=10).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(RuntimeError, match="size mismatch"):  # loaded strictly
        create("resnet18", weights=tmp_path / "r18.safetensors")


def test_user_models(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "def mlp(width=8, num_classes=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, width), nn.Linear(width, "
        "num_classes))\n"
        "class Factory:\n"
        "    @staticmethod\n"
        "    def build(**kw):\n"
        "        return mlp(**kw)\n"
        "def not_a_model():\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create("my_nets:mlp", width=5, num_classes=7)
    assert model[1].out_features == 5 and model[2].out_features == 7
    assert create("my_nets:Factory.build")[2].out_features == 3
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        create("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        create("my_nets:missing")
    with pytest.raises(TypeError, match="built a int, not an nn.Module"):
        create("my_nets:not_a_model")


def test_unknown_name_lists_what_is_known():
    with pytest.raises(ValueError) as e:
        create("resnet21_cifar")
    message = str(e.value)
    for part in ("resnet20_cifar", "vgg11_bn_cifar", "vgg11_torchvision", "alexnet_cifar",
                 "torchvision", "package.module:function"):
        assert part in message
    # the same dispatch answers without building anything
    assert [models.check_name(n) for n in ("resnet20_cifar", "my_nets:net", "resnet18")] == [
        "registry", "user", "torchvision"]
    for bad in ("resnet21_cifar", 5, None):
        with pytest.raises(ValueError, match="model: unknown name"):
            models.check_name(bad)


def test_dataset_names_are_spelled_one_way():
    assert [data.dataset_key(n) for n in ("Fashion-MNIST", "cifar10", "MNIST")] == [
        "fashion_mnist", "cifar10", "mnist"]
    # class counts from the formats alone (an image folder's are its folders, read later)
    assert [data.num_classes(n) for n in ("Fashion-MNIST", "cifar100", "MNIST", "imagefolder")
            ] == [10, 100, 10, None]


def test_normalization_by_model():
    # the published statistics, written out (the real-data tests check CIFAR-10's on the files)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cifar10 = ((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))
    assert models.IMAGENET_STATS == imagenet and models.CIFAR10_STATS == cifar10
    assert models.NORMALIZATION["vgg11_bn_cifar"] == data.DATASET_STATS["cifar10"] == cifar10
    assert models.normalization("resnet56_cifar") == imagenet  # akamaster's ResNets
    assert models.normalization("resnet18") == imagenet  # torchvision's weights
    with pytest.raises(ValueError, match="no normalisation known for 'alexnet_cifar'"):
        models.normalization("alexnet_cifar")  # no pretrained weights: use the data's stats
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (torch.tensor(v)[:, None, None] for v in cifar10)
    assert torch.allclose(models.normalizer("vgg16_bn_cifar")(x), (x / 255 - mean) / std)


# ---------------------------------------------------------------------------------------------
# pretrained CIFAR-10 models on test images 0..1016, through rankcut.data

# top-1 % on test images 0..1016 (../shared/data/README.md) of rankcut.models.PRETRAINED
TOP1 = {"resnet20_cifar": 91.64, "resnet56_cifar": 92.72, "vgg11_bn_cifar": 90.95}


@pytest.mark.parametrize("name", list(TOP1))
def test_pretrained_accuracy(shared_data, name):
    file, expected = models.PRETRAINED[name], TOP1[name]
    if not (shared_data / file).is_file():
        pytest.skip(f"{file} not found")
    try:
        ds = data.dataset("cifar10", "test", root=shared_data,
                          transform=data.transforms("cifar10", train=False, normalization=name))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = create(name, weights=shared_data / file).eval()
    assert all(p.dtype == torch.float32 for p in model.state_dict().values()
               if p.is_floating_point())
    correct = 0
    with torch.no_grad():
        for x, y in data.loader(ds, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    assert len(ds) == 1017
    assert abs(100 * correct / len(ds) - expected) <= 0.3
