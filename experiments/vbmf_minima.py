"""Where EVBMF's free energy has a deeper minimum than the bounded search finds.

rankcut.decompose.evbmf estimates the noise variance sigma^2 as the reference implementation (the
seeds') does: a bounded 1-D search in log sigma^2 over the interval Nakajima et al. (2013) prove
holds the minimiser. The energy can have two minima there, and the search stops at the one its
bracket leads to. This script scans the interval on a grid for every convolution (but the
3-channel stems) of the pretrained ResNet-20, ResNet-56 and VGG-11-BN, both Tucker-2
unfoldings, and lists where the grid's least energy is lower than the search's, with the rank
each gives.

    .venv/bin/python experiments/vbmf_minima.py [--points 400]

Reads the pretrained weights from the shared data folder ($RANKCUT_DATA, else ../shared/data).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from rankcut import data as D
from rankcut.decompose import evbmf
from rankcut.decompose.vbmf import _free_energy, tau_bar
from rankcut.models import create, pretrained_path

MODELS = ("resnet20_cifar", "resnet56_cifar", "vgg11_bn_cifar")


def scan(M: torch.Tensor, points: int) -> tuple[float, int, float, int, float, float]:
    """(the search's sigma^2, its rank, the grid's least-energy sigma^2, its rank, their free
    energies) for the matrix ``M``."""
    V = M if M.shape[0] <= M.shape[1] else M.mT
    L, m = V.shape
    found = evbmf(V)
    g2 = torch.linalg.svdvals(V).double().numpy() ** 2
    g2 = g2[:max(int(np.sum(g2 > g2[0] * (max(L, m) * np.finfo(float).eps) ** 2)), 1)]
    L = len(g2)
    alpha = L / m
    t = tau_bar(alpha)
    x_bar = (1 + t) * (1 + alpha / t)
    h_bar = min(math.ceil(L / (1 + alpha)) - 1, L - 1)
    upper = g2.sum() / (L * m)
    lower = max(g2[h_bar] / (m * x_bar), g2[h_bar:].mean() / m, upper * 1e-12)
    grid = np.exp(np.linspace(math.log(lower), math.log(upper), points))
    energies = [_free_energy(s2, g2, m, alpha, x_bar) for s2 in grid]
    best = grid[int(np.argmin(energies))]
    rank = int(np.sum(np.sqrt(g2) > math.sqrt(m * best * x_bar)))
    return (found.sigma2, found.rank, float(best), rank,
            _free_energy(found.sigma2, g2, m, alpha, x_bar), float(min(energies)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=400, help="grid points in log sigma^2")
    args = parser.parse_args()
    root = D.require_data_root()
    print("| model | conv | unfolding | search: sigma^2, rank, energy | grid: sigma^2, rank, "
          "energy |\n|---|---|---|---|---|")
    convs = deeper = 0
    for name in MODELS:
        model = create(name, weights=pretrained_path(name, root)).eval()
        for layer, conv in model.named_modules():
            if not isinstance(conv, torch.nn.Conv2d) or conv.in_channels <= 3:
                continue
            convs += 1
            W = conv.weight.detach().double()
            found_here = False
            for unfolding, M in (("output", W.reshape(W.shape[0], -1)),
                                 ("input", W.transpose(0, 1).reshape(W.shape[1], -1))):
                s2, r, g_s2, g_r, e, g_e = scan(M, args.points)
                if g_e < e - 1e-9 and g_r != r:
                    found_here = True
                    print(f"| {name} | {layer} | {unfolding} | {s2:.3g}, {r}, {e:.3f} | "
                          f"{g_s2:.3g}, {g_r}, {g_e:.3f} |")
            deeper += found_here
    print(f"\n{deeper} of {convs} convolutions have a deeper minimum, at another rank, than "
          "the bounded search finds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
