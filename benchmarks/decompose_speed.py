"""rankcut.decompose against tensorly (PyTorch backend): time and error at equal work.

Cases: (a) every 3x3 conv kernel of the pretrained CIFAR-10 ResNet-56, (b) a VGG-16-sized
512x512x3x3 kernel (features.18 of the CIFAR-10 VGG-11-BN in the shared data, a trained kernel;
a seeded random one when the data is absent). Each case runs CP-ALS at two ranks and Tucker-2 at
two rank pairs, with the same rank, the same number of iterations (no early stop) and the same
kind of initialisation (SVD of the unfoldings) in both libraries, float32, on the CPU.

Prints, per case and in total, time ratio (tensorly / rankcut: above 1 means rankcut is faster)
and error ratio (rankcut / tensorly relative Frobenius error: at most 1 means rankcut is as
accurate or better). Last, data-aware SVD (output-norm truncation, float64 inside) of the same
512x512x3x3 kernel unfolded to 512 x 4608 (with a seeded input moment Σ of a decaying spectrum),
rankcut's
``decompose.svd(W, r, cov=Σ)`` against the formula of SVD-LLM it computes (L = chol(Σ + ridge),
the SVD of W L, B = [S Vᵀ]_r L⁻¹), with the output error ||(W - AB) L|| of each. Run from the
repository root:

    .venv/bin/python benchmarks/decompose_speed.py
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker

import rankcut as rc
from rankcut.data import find_data_root, load_conv_kernels
from rankcut.models import PRETRAINED

warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")


def load_cases():
    root = find_data_root()
    resnet = vgg = None
    if root is not None:
        resnet_file = root / PRETRAINED["resnet56_cifar"]
        vgg_file = root / PRETRAINED["vgg11_bn_cifar"]
        if resnet_file.is_file():
            resnet = [k for k in load_conv_kernels(resnet_file).values() if k.shape[2:] == (3, 3)]
        if vgg_file.is_file():
            vgg = [load_conv_kernels(vgg_file)["features.18.weight"]]
    g = torch.Generator().manual_seed(0)
    if resnet is None:
        print("note: ResNet-56 weights not found; using seeded random kernels of its shapes")
        shapes = [(16, 3)] + [(16, 16)] * 18 + [(32, 16)] + [(32, 32)] * 17 + [(64, 32)] + [
            (64, 64)] * 17
        resnet = [torch.randn(t, s, 3, 3, generator=g) for t, s in shapes]
    if vgg is None:
        print("note: VGG weights not found; using a seeded random 512x512x3x3 kernel")
        vgg = [torch.randn(512, 512, 3, 3, generator=g)]
    return {"ResNet-56 3x3 convs": resnet, "512x512x3x3 (VGG-16 size)": vgg}


def rel_err(X, approx):
    return float((X - approx).norm() / X.norm())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cp_pair(X, rank, iters):
    t_ours, ours = timed(lambda: rc.decompose.cp(X, rank, max_iter=iters, tol=0.0, init="svd"))
    t_tl, cpt = timed(lambda: parafac(X, rank, n_iter_max=iters, init="svd", tol=0.0,
                                      random_state=0))
    return t_ours, t_tl, ours.rel_error, rel_err(X, tl.cp_to_tensor(cpt))


def tucker_pair(X, ranks, iters):
    t_ours, ours = timed(lambda: rc.decompose.tucker(X, ranks, modes=(0, 1), max_iter=iters,
                                                     tol=0.0))
    t_tl, ((core, factors), _) = timed(lambda: partial_tucker(
        X, rank=list(ranks), modes=(0, 1), n_iter_max=iters, init="svd", tol=0.0))
    return t_ours, t_tl, ours.rel_error, rel_err(X, tl.tenalg.multi_mode_dot(core, factors,
                                                                             modes=(0, 1)))


def cp_rank(X, fraction):
    """Seed 000's rule: a fraction of floor(prod(dims) / sum(dims)) (CP-4 keeps ~that share)."""
    return max(1, int(fraction * math.floor(X.numel() / sum(X.shape))))


def per_kernel_table(configs):
    """rankcut and tensorly one kernel at a time, per case and in total."""
    header = (f"{'kernels':28} {'method':9} {'rank':24} {'n':>3} {'rankcut s':>10} "
              f"{'tensorly s':>10} {'time ratio':>10} {'err rankcut':>11} {'err tensorly':>12} "
              f"{'err ratio':>9}")
    print(header)
    print("-" * len(header))
    totals = {}
    for name, method, label, kernels, run in configs:
        t_ours = t_tl = e_ours = e_tl = 0.0
        for X in kernels:
            a, b, c, d = run(X)
            t_ours, t_tl, e_ours, e_tl = t_ours + a, t_tl + b, e_ours + c, e_tl + d
        n = len(kernels)
        tot = totals.setdefault(method, [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate((t_ours, t_tl, e_ours, e_tl)):
            tot[i] += v
        print(f"{name:28} {method:9} {label:24} {n:3d} {t_ours:10.3f} {t_tl:10.3f} "
              f"{t_tl / t_ours:9.1f}x {e_ours / n:11.4f} {e_tl / n:12.4f} {e_ours / e_tl:9.4f}")
    print("-" * len(header))
    for method, (t_ours, t_tl, e_ours, e_tl) in totals.items():
        print(f"{'total':28} {method:9} {'':24} {'':3} {t_ours:10.3f} {t_tl:10.3f} "
              f"{t_tl / t_ours:9.1f}x {'':11} {'':12} {e_ours / e_tl:9.4f}")
    print("\nerrors are mean relative Frobenius errors; err ratio = sum(rankcut) / sum(tensorly)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp-iters", type=int, default=25)
    parser.add_argument("--tucker-iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3,
                        help="the batched table times each side this many times, interleaved, "
                             "and keeps the fastest (this shared 2-core machine's timings vary "
                             "by 30%% from one run to the next)")
    parser.add_argument("--only-batched", action="store_true",
                        help="print the batched CP-ALS table only")
    parser.add_argument("--only-data-aware-svd", action="store_true",
                        help="print the data-aware SVD rows only")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    if args.only_data_aware_svd:
        data_aware_svd_rows(next(k[0] for k in load_cases().values() if k[0].shape[0] >= 512))
        return
    tl.set_backend("pytorch")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, tensorly {tl.__version__}, rankcut {rc.__version__}; "
          f"{platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}; float32, CPU")
    print(f"CP-ALS {args.cp_iters} sweeps, Tucker-2 (HOOI) {args.tucker_iters} sweeps, no early "
          "stop, SVD init in both\n")
    # Warm up both libraries so first-call costs are not timed.
    warm = torch.randn(8, 8, 3, 3)
    cp_pair(warm, 4, 2)
    tucker_pair(warm, (4, 4), 2)

    cases = load_cases()
    configs, batched = [], []
    for name, kernels in cases.items():
        big = kernels[0].shape[0] >= 512
        cp_ranks = [(f"R={r}", lambda X, r=r: r) for r in (64, 256)] if big else [
            (f"R={f}*floor(prod/sum)", lambda X, f=f: cp_rank(X, f)) for f in (0.25, 0.5)]
        for label, rank_of in cp_ranks:
            configs.append((name, "CP-ALS", label, kernels,
                            lambda X, rank_of=rank_of: cp_pair(X, rank_of(X), args.cp_iters)))
            batched.append((name, label, kernels, rank_of))
        for frac in (0.25, 0.5):
            configs.append((name, "Tucker-2", f"ranks=({frac}T, {frac}S)", kernels,
                            lambda X, frac=frac: tucker_pair(
                                X, (max(1, int(frac * X.shape[0])), max(1, int(frac * X.shape[1]))),
                                args.tucker_iters)))

    if not args.only_batched:
        per_kernel_table(configs)
    # rankcut.decompose.cp_many: the kernels of one shape (hence one rank) as one batched ALS,
    # what the planner does; tensorly has no batched CP, so its per-kernel time stands.
    print(f"\n{'kernels':28} {'CP-ALS, batched':24} {'n':>3} {'cp_many s':>10} "
          f"{'tensorly s':>10} {'time ratio':>10} {'err ratio':>9}")
    for name, label, kernels, rank_of in batched:
        by_rank = {}
        for X in kernels:
            by_rank.setdefault(rank_of(X), []).append(X)
        t_many = t_tl = float("inf")
        for _ in range(args.repeats):
            t, e_many = 0.0, 0.0
            for rank, group in by_rank.items():
                dt, results = timed(lambda group=group, rank=rank: rc.decompose.cp_many(
                    group, rank, max_iter=args.cp_iters, tol=0.0, init="svd"))
                t += dt
                e_many += sum(r.rel_error for r in results)
            t_many = min(t_many, t)
            t, e_tl = 0.0, 0.0
            for X in kernels:
                rank = rank_of(X)
                dt, cpt = timed(lambda X=X, rank=rank: parafac(
                    X, rank, n_iter_max=args.cp_iters, init="svd", tol=0.0, random_state=0))
                t += dt
                e_tl += rel_err(X, tl.cp_to_tensor(cpt))
            t_tl = min(t_tl, t)
        print(f"{name:28} {label:24} {len(kernels):3d} {t_many:10.3f} {t_tl:10.3f} "
              f"{t_tl / t_many:9.1f}x {e_many / e_tl:9.4f}")
    if not args.only_batched:
        data_aware_svd_rows(next(k[0] for k in cases.values() if k[0].shape[0] >= 512))


def moment(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded n x n input second moment with a decaying spectrum (float64)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * (1.0 / torch.arange(1, n + 1, dtype=torch.float64))) @ Q.T


def cholesky_whitened_svd(W, rank, cov, ridge=1e-6):
    """SVD-LLM's data-aware truncation, written out: AB = [W L]_r L⁻¹."""
    C = cov + ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    B = torch.linalg.solve_triangular(L.mT, (S[:rank, None] * Vh[:rank]).mT, upper=True).mT
    return U[:, :rank], B, L


def data_aware_svd_rows(vgg_kernel: torch.Tensor) -> None:
    print(f"\n{'data-aware SVD':28} {'rank':>5} {'rankcut s':>10} {'Cholesky s':>10} "
          f"{'time ratio':>10} {'err rankcut':>11} {'err Cholesky':>12}")
    cases = [("512x4608 (VGG 3x3, unfolded)", vgg_kernel.reshape(512, -1), (64, 256))]
    for name, W, ranks in cases:
        cov = moment(W.shape[1])
        for rank in ranks:
            t_ours, res = timed(lambda W=W, rank=rank, cov=cov: rc.decompose.svd(
                W, rank, cov=cov, method="exact"))
            t_ref, (A, B, L) = timed(lambda W=W, rank=rank, cov=cov: cholesky_whitened_svd(
                W, rank, cov))
            Wd = W.double()
            ours = ((Wd - res.A.double() @ res.B.double()) @ L).norm() / (Wd @ L).norm()
            ref = ((Wd - A @ B) @ L).norm() / (Wd @ L).norm()
            print(f"{name:28} {rank:5d} {t_ours:10.3f} {t_ref:10.3f} {t_ref / t_ours:9.1f}x "
                  f"{float(ours):11.4f} {float(ref):12.4f}")


if __name__ == "__main__":
    main()
