"""Every decomposition on real conv kernels at an equal parameter budget (the first embedded demo).

Reads the pretrained CIFAR-10 ResNet-20 from the shared data when it is there ($RANKCUT_DATA or
../shared/data) and otherwise uses seeded synthetic kernels of the same shapes, so it runs on a
fresh machine with nothing downloaded. For each 3x3 kernel but the first (3 input channels), it
sizes each method to keep a quarter of the kernel's parameters and prints the relative error of
the reconstructed kernel; Tucker-2 also runs at the ranks EVBMF picks (Kim et al. 2016).
Run from the repository root:

    .venv/bin/python experiments/kernel_errors.py [--ratio 4] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from rankcut import decompose as dec
from rankcut.data import find_data_root, load_conv_kernels
from rankcut.models import PRETRAINED

RESNET20 = PRETRAINED["resnet20_cifar"]


def load_kernels(data_dir=None) -> tuple[dict[str, torch.Tensor], str]:
    root = find_data_root(data_dir)
    if root is not None and (root / RESNET20).is_file():
        kernels = load_conv_kernels(root / RESNET20)
        source = f"pretrained CIFAR-10 ResNet-20 ({root / RESNET20})"
    else:
        # Kernels with a decaying channel spectrum, like trained ones, from a fixed seed.
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 3)] + [(16, 16)] * 6 + [(32, 16)] + [(32, 32)] * 5 + [(64, 32)] + [
            (64, 64)] * 5
        kernels = {}
        for i, (t, s) in enumerate(shapes):
            decay = torch.exp(-torch.arange(t, dtype=torch.float32) / (t / 4))
            kernels[f"conv{i}.weight"] = (decay[:, None, None, None]
                                          * torch.randn(t, s, 3, 3, generator=g))
        source = "synthetic kernels (no shared data found: set $RANKCUT_DATA for the real ones)"
    return {k: v for k, v in kernels.items() if v.shape[1] > 3 and v.shape[2:] == (3, 3)}, source


def _tucker2_rank_fraction(T, S, k2, ratio):
    """f with S·fS + k²·fT·fS + T·fT = T·S·k²/ratio (both channel ranks the same fraction)."""
    a, b, c = k2 * T * S, S * S + T * T, -T * S * k2 / ratio
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def methods_at(kernel: torch.Tensor, ratio: float):
    """(name, ranks text, params, thunk) for each method sized to 1/ratio of the params."""
    T, S, kh, kw = kernel.shape
    k2 = kh * kw
    dense = T * S * k2
    n = S * k2
    channel = kernel.reshape(T, n)
    r_svd = max(1, math.floor(dense / (ratio * (T + n))))
    r_cp4 = max(1, math.floor(dense / (ratio * (S + kh + kw + T))))
    r_cp3 = max(1, math.floor(dense / (ratio * (S + k2 + T))))
    f = _tucker2_rank_fraction(T, S, k2, ratio)
    rt, rs = max(1, math.floor(f * T)), max(1, math.floor(f * S))
    vt = dec.evbmf(kernel.reshape(T, -1)).rank
    vs = dec.evbmf(kernel.transpose(0, 1).reshape(S, -1)).rank
    vt, vs = max(1, vt), max(1, vs)
    kernel3 = kernel.reshape(T, S, k2)
    cp_opts = {"max_iter": 100, "tol": 1e-6}
    return [
        ("SVD (channel)", f"{r_svd}", r_svd * (T + n), lambda: dec.svd(channel, r_svd)),
        ("CUR leverage (channel)", f"{r_svd}", r_svd * (T + n),
         lambda: dec.cur(channel, r_svd, method="leverage", seed=0)),
        ("CUR DEIM (channel)", f"{r_svd}", r_svd * (T + n),
         lambda: dec.cur(channel, r_svd, method="deim")),
        ("CP-4 ALS", f"{r_cp4}", r_cp4 * (S + kh + kw + T),
         lambda: dec.cp(kernel, r_cp4, **cp_opts)),
        ("CP-4 ALS-QR", f"{r_cp4}", r_cp4 * (S + kh + kw + T),
         lambda: dec.cp(kernel, r_cp4, method="als_qr", **cp_opts)),
        ("CP-4 TPM", f"{r_cp4}", r_cp4 * (S + kh + kw + T),
         lambda: dec.cp(kernel, r_cp4, method="tpm", **cp_opts)),
        ("CP-3 ALS", f"{r_cp3}", r_cp3 * (S + k2 + T), lambda: dec.cp(kernel3, r_cp3, **cp_opts)),
        ("Tucker-2 HOOI", f"{rt},{rs}", S * rs + k2 * rs * rt + T * rt,
         lambda: dec.tucker(kernel, (rt, rs), modes=(0, 1))),
        ("Tucker-2 EVBMF ranks", f"{vt},{vs}", S * vs + k2 * vs * vt + T * vt,
         lambda: dec.tucker(kernel, (vt, vs), modes=(0, 1))),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="experiments/kernel_errors.py", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--ratio", type=float, default=4.0,
                        help="parameter compression per kernel, dense/compressed (default 4)")
    parser.add_argument("--data-dir", default=None, help="data root (default $RANKCUT_DATA or "
                        "../shared/data)")
    args = parser.parse_args(argv)
    if not args.ratio > 1:
        parser.error(f"--ratio: expected a number > 1, got {args.ratio}")
    torch.manual_seed(0)
    kernels, source = load_kernels(args.data_dir)
    print(f"rankcut demo: {len(kernels)} conv kernels from {source}")
    print(f"each method sized to keep 1/{args.ratio:g} of a kernel's parameters "
          "(Tucker-2 EVBMF: its own ranks); CP solvers at most 100 sweeps\n")

    rows: dict[str, list] = {}
    for kernel in kernels.values():
        for name, ranks, params, run in methods_at(kernel, args.ratio):
            start = time.perf_counter()
            result = run()
            row = rows.setdefault(name, [0.0, 0, 0, 0.0, []])
            row[0] += result.rel_error
            row[1] += params
            row[2] += kernel.numel()
            row[3] += time.perf_counter() - start
            row[4].append(ranks)

    name0, kernel0 = next(reversed(kernels.items()))
    print(f"{'method':24} {'mean rel. error':>15} {'params kept':>12} {'ratio':>7} "
          f"{'time s':>7}   ranks of {name0} {tuple(kernel0.shape)}")
    for name, (err, params, dense, seconds, ranks) in rows.items():
        print(f"{name:24} {err / len(kernels):15.4f} {params:12,d} {dense / params:6.2f}x "
              f"{seconds:7.2f}   {ranks[-1]}")
    print("\nrelative error = ||W - W~||_F / ||W||_F of the kernel, averaged over the kernels")


if __name__ == "__main__":
    main()
