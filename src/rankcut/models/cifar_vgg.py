"""CIFAR-size VGG and AlexNet variants.

``CifarVGG``: the layout of the project's pretrained CIFAR-10 VGG-11-BN
(``../shared/data/weights/vgg_cifar10/``): ``features`` is one Sequential of [conv 3x3 (padding 1,
no bias), BatchNorm, ReLU] per conv and MaxPool2d(2) per "M", so the indices match the
weights (``features.0`` conv, ``features.1`` BN, ``features.3`` the first pool, ...); a 32x32
input leaves 512x1x1, flattened into ``classifier``, one Linear 512 -> classes.

``vgg11_torchvision``: torchvision's VGG-11 (no BatchNorm) unchanged, with its 25088-4096-4096
classifier behind the adaptive 7x7 average pool, as seed 001 ran it on 32x32 inputs (MNIST
resized to 32 and repeated to 3 channels; CIFAR-10).

``alexnet_cifar``: torchvision's AlexNet with the first conv replaced by 3->64, 5x5, stride 1,
padding 2, the CIFAR-10 variant seed 002 compressed. On 32x32 inputs the feature maps are
32 -> 15 -> 7 -> 3 (after each max pool); the adaptive 6x6 pool then feeds the unchanged
9216-4096-4096 classifier. Parameter names are torchvision's.
"""

from __future__ import annotations

from torch import nn

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    def __init__(self, config: str | list[int | str] = "vgg11", num_classes: int = 10,
                 batch_norm: bool = True, in_channels: int = 3):
        super().__init__()
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else list(config)
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(nn.Conv2d(channels, int(v), 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg11_torchvision(num_classes: int = 10, batch_norm: bool = False, **kwargs) -> nn.Module:
    """torchvision's VGG-11 (``batch_norm=True``: VGG-11-BN), ``num_classes`` outputs."""
    import torchvision

    make = torchvision.models.vgg11_bn if batch_norm else torchvision.models.vgg11
    return make(weights=None, num_classes=num_classes, **kwargs)


def alexnet_cifar(num_classes: int = 10, **kwargs) -> nn.Module:
    """torchvision's AlexNet with a 5x5 stride-1 first conv (3->64, padding 2) for 32x32 inputs."""
    import torchvision

    model = torchvision.models.alexnet(weights=None, num_classes=num_classes, **kwargs)
    model.features[0] = nn.Conv2d(3, 64, kernel_size=5, stride=1, padding=2)
    return model
