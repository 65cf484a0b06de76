"""When is randomized SVD faster at equal error? The evidence behind svd(method="auto").

Matrices with a decaying spectrum like a trained layer's (s_i = exp(-8 i / min(m, n)) plus 1e-3
Gaussian noise), exact SVD against the randomized one at two oversampling settings, 4 power
iterations. Prints time and error ratio (randomized / exact). Run from the repository root:

    .venv/bin/python benchmarks/svd_auto.py
"""

import argparse
import time

import torch

import rankcut as rc


def trained_like(m, n, g):
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.exp(-torch.arange(k) / (k / 8))
    return (U * s) @ V.T + 1e-3 * torch.randn(m, n, generator=g)


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # (--help)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print(f"{'shape':>11} {'rank':>5} {'exact s':>8} {'rand(os=10) s':>14} {'err ratio':>9} "
          f"{'rand(os=rank) s':>16} {'err ratio':>9} {'auto':>10}")
    for m, n, r in [(1024, 1024, 64), (1024, 1024, 128), (2048, 1024, 128), (4096, 4096, 256),
                    (4096, 4096, 512), (512, 4608, 64)]:
        W = trained_like(m, n, g)
        t = time.perf_counter()
        exact = rc.decompose.svd(W, r, method="exact")
        t_exact = time.perf_counter() - t
        row = []
        for oversample in (10, r):
            t = time.perf_counter()
            res = rc.decompose.svd(W, r, method="randomized", oversample=oversample)
            row += [time.perf_counter() - t, res.rel_error / exact.rel_error]
        auto = rc.decompose.svd(W, r).method
        print(f"{m:>5}x{n:<5} {r:5d} {t_exact:8.2f} {row[0]:14.2f} {row[1]:9.5f} {row[2]:16.2f} "
              f"{row[3]:9.5f} {auto:>10}")


if __name__ == "__main__":
    main()
