"""Plain against data-aware (channel-whitened) CP-3 on layers of the pretrained ResNet-20:
relative output error ||(W - W~) L|| / ||W L|| on the layer's real input statistics (256 CIFAR-10
training images), at ranks T/2 and T. Run from the repository root:

    .venv/bin/python experiments/data_aware_cp.py
"""

import torch

from rankcut import data as D
from rankcut import decompose as dec
from rankcut.calibrate import input_second_moments
from rankcut.curves import output_error
from rankcut.layers.conv import _channel_moment
from rankcut.models import create, pretrained_path

LAYERS = ["layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv2"]


def main():
    root = D.require_data_root()
    model = create("resnet20_cifar",
                   weights=pretrained_path("resnet20_cifar", root)).eval()
    plain_ds = D.dataset("cifar10", "train", root=root, limit=1024, transform=D.transforms(
        "cifar10", train=False, normalization="resnet20_cifar"))
    covs = input_second_moments(model, LAYERS, D.calibration(plain_ds, n=256))
    print(f"{'layer':>16} {'rank':>5} {'plain CP-3':>11} {'data-aware':>11}")
    for name in LAYERS:
        conv = model.get_submodule(name)
        W = conv.weight.detach().double()
        t, s = W.shape[:2]
        X = W.reshape(t, s, -1)
        channel = _channel_moment(covs[name][0].double(), s)
        for rank in (t // 2, t):
            errors = []
            for cov in (None, channel):
                res = dec.cp(X, rank, max_iter=100, cov=cov)
                approx = dec._tensor.cp_to_tensor(res.weights, res.factors).reshape(W.shape)
                errors.append(output_error(conv, approx, covs[name]))
            print(f"{name:>16} {rank:>5} {errors[0]:11.3f} {errors[1]:11.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
