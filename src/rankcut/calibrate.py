"""Input statistics of layers on calibration data, for data-aware factorization.

The second moment Σ = E[x xᵀ] of what a layer's weight multiplies: for a Linear its input
features; for a Conv2d the unfolded input patches of each group ((S/g)·kh·kw wide), padded
exactly as the layer pads (any padding mode, "same" included). Factorizing W to minimise
||(W - W~) Σ^½|| minimises the layer's output error on such data (METHODS.md §5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._modes import forward_on, hooked, model_device
from .decompose.svd import ridge_of


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that F.pad takes, from the conv's padding option."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        out = []
        for axis in (1, 0):  # F.pad lists the last dimension (width) first
            total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def _output_hw(conv: nn.Conv2d, padded_hw) -> tuple[int, int]:
    """The conv's output height and width on an input already padded to ``padded_hw``."""
    return tuple((n - d * (k - 1) - 1) // s + 1 for n, d, k, s in zip(
        padded_hw, conv.dilation, conv.kernel_size, conv.stride, strict=True))


def conv_patches(conv: nn.Conv2d, x: torch.Tensor, at: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The patches the conv's kernel sees, (N·L, S·kh·kw), in the order of ``weight.reshape(T,
    -1)``'s columns (channel, then kernel row, then kernel column); with ``at`` (indices into
    the N·L output positions, image-major) only those rows, gathered without unfolding the
    rest."""
    pad = _explicit_padding(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    if at is None:
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    out_h, out_w = _output_hw(conv, x.shape[2:])
    image, pos = at // (out_h * out_w), at % (out_h * out_w)
    top, left = (pos // out_w) * sh, (pos % out_w) * sw
    taps = [x[image, :, top + i * dh, left + j * dw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=-1).reshape(len(at), -1)


def check_reusable(calib_data, what: str = "calib_data") -> None:
    """Refuse a one-shot iterator (a generator) where the batches are read more than once
    (planning: moments, probes, a cache's fingerprint; sequential fitting: one pass per layer):
    it would be empty after the first read."""
    if isinstance(calib_data, Iterator):
        raise ValueError(f"{what}: a one-shot iterator ({type(calib_data).__name__}) is read "
                         "more than once; pass a list of batches or a DataLoader")


def calibration_batches(calib_data, max_batches: int | None = None, *,
                        transform: Callable | None = None, batch_size: int = 64,
                        allow_empty: bool = False) -> Iterator:
    """The batches of ``calib_data``, at most ``max_batches``: ``(inputs, targets)`` pairs
    where it has labels, bare inputs where it has none (``transform``, if given, applied to the
    inputs). ``calib_data`` is an iterable of batches (a DataLoader, a list), a Dataset, a tensor
    of inputs or an ``(inputs, targets)`` pair of tensors (the last three cut into batches of
    ``batch_size``; two tensors are a pair when the second holds class labels or is shaped
    unlike the first). Inputs with NaN or infinite values are an error naming the batch; so are
    no batches at all, unless ``allow_empty``."""
    if calib_data is None:
        raise ValueError("calib_data: expected batches of inputs or (inputs, targets), got None")
    if isinstance(max_batches, bool) or (max_batches is not None and (
            not isinstance(max_batches, int) or max_batches < 1)):
        raise ValueError(f"max_batches: expected an int >= 1 or None, got {max_batches!r}")
    if (isinstance(calib_data, tuple | list) and len(calib_data) == 2
            and all(isinstance(t, torch.Tensor) for t in calib_data)
            and ((calib_data[1].ndim == 1 and not calib_data[1].is_floating_point())
                 or calib_data[0].shape[1:] != calib_data[1].shape[1:])):
        # (inputs, targets): class labels, or targets of another shape than the inputs (soft
        # labels); two tensors of one shape are two batches of inputs
        x, y = calib_data
        if len(x) != len(y):
            raise ValueError(f"calib_data: {len(x)} inputs but {len(y)} targets")
        calib_data = [(x[i:i + batch_size], y[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]
    elif isinstance(calib_data, torch.Tensor):
        calib_data = list(calib_data.split(batch_size))
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, DataLoader):
        calib_data = DataLoader(calib_data, batch_size=batch_size)
    elif not isinstance(calib_data, Iterable):
        raise ValueError(f"calib_data: expected batches of inputs or (inputs, targets), got "
                         f"a {type(calib_data).__name__}")
    count = 0
    for batch in calib_data:
        if max_batches is not None and count >= max_batches:
            return
        if isinstance(batch, tuple | list) and len(batch) >= 2:
            x, y = batch[0], batch[1]
        elif isinstance(batch, torch.Tensor):
            x, y = batch, None
        else:
            raise ValueError(f"calib_data: expected batches of inputs or (inputs, targets), "
                             f"got a {type(batch).__name__}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"calib_data: batch {count}'s inputs are a {type(x).__name__}, "
                             "expected a tensor")
        if x.is_floating_point() and not bool(x.isfinite().all()):
            raise ValueError(f"calib_data: batch {count} has NaN or infinite inputs")
        x = transform(x) if transform is not None else x
        if x.numel() == 0:
            raise ValueError(f"calib_data: batch {count} is empty")
        if x.dtype == torch.uint8:
            raise ValueError(f"calib_data: batch {count}'s inputs are uint8 (raw images?); "
                             "expected the float inputs the model takes (converted and "
                             "normalised as for training)")
        yield x if y is None else (x, y)
        count += 1
    if count == 0 and not allow_empty:
        raise ValueError("calib_data: no batches")


class TransformedBatches:
    """``calib_data`` read through :func:`calibration_batches` with ``transform`` applied to
    each batch's inputs, every time it is iterated (re-iterable, nothing kept in memory): how
    :func:`rankcut.compress` gives its ``transform`` to planning and fitting too."""

    def __init__(self, calib_data, transform: Callable):
        self.calib_data, self.transform = calib_data, transform

    def __iter__(self) -> Iterator:
        return calibration_batches(self.calib_data, transform=self.transform)


# What the moments average over, at most, per batch and layer: this many times the layer's
# input width d of its N·L rows (patches or samples), drawn at random without replacement
# (the same rows of two models' inputs in paired_moments). A d x d moment from 16·d rows of
# every batch is as good as from all of them; the first layers of a CNN have thousands of
# times more patches than that.
ROWS_PER_WIDTH = 16


def calibration_inputs(calib_data, max_batches: int | None = None, **options) -> Iterator:
    """The input tensors of :func:`calibration_batches` (targets, where there are any, dropped);
    ``options`` as there."""
    for batch in calibration_batches(calib_data, max_batches, **options):
        yield batch[0] if isinstance(batch, tuple) else batch


def layer_rows(module: nn.Module, x: torch.Tensor, at: torch.Tensor | None = None
               ) -> list[torch.Tensor]:
    """What ``module``'s weight multiplies on input ``x``, float64, one (rows, width) matrix per
    group: a Conv2d's unfolded patches (:func:`conv_patches`), a Linear's input features; with
    ``at``, only those rows (see :func:`sampled_rows`)."""
    if isinstance(module, nn.Conv2d):
        rows = conv_patches(module, x.double(), at)
        groups = module.groups
    else:
        rows = x.reshape(-1, module.in_features)
        rows = (rows if at is None else rows[at]).double()
        groups = 1
    width = rows.shape[1] // groups
    return [rows[:, g * width:(g + 1) * width] for g in range(groups)]


def sampled_rows(module: nn.Module, x: torch.Tensor, generator: torch.Generator
                 ) -> torch.Tensor | None:
    """Indices of the rows of ``module``'s input ``x`` that the moments use: all (None) when
    there are at most ``ROWS_PER_WIDTH`` times the group width, else that many drawn at
    random."""
    count, width = row_count(module, x)
    limit = ROWS_PER_WIDTH * width
    if count <= limit:
        return None
    return torch.randperm(count, generator=generator)[:limit].sort().values.to(x.device)


def row_count(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of what ``module``'s weight multiplies on input ``x``: a Conv2d's patches
    and their length per group, a Linear's input vectors and their length."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        width = module.in_channels // module.groups * kh * kw
        left, right, top, bottom = _explicit_padding(module)
        out_h, out_w = _output_hw(module, (x.shape[2] + top + bottom, x.shape[3] + left + right))
        return x.shape[0] * out_h * out_w, width
    width = module.in_features
    return x.numel() // width, width


def _check_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    out = []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise ValueError(f"names: {name!r} is a {type(module).__name__}, expected a Conv2d "
                             "or Linear")
        out.append(module)
    return out


def _device(model: nn.Module) -> torch.device:
    return model_device(model)


def input_second_moments(model: nn.Module, names: Sequence[str], batches: Iterable, *,
                         max_batches: int | None = None) -> dict[str, list[torch.Tensor]]:
    """Σ = E[x xᵀ] (float64) of each named Conv2d/Linear's input over ``batches``, one matrix
    per group (over at most ``ROWS_PER_WIDTH`` times its width of each batch's rows, seeded:
    :func:`sampled_rows`; a sampled batch counts as many rows as it has, so batches of
    different sizes weigh by their sizes). ``batches`` yields inputs, or (inputs, targets)
    pairs whose targets are ignored. The model runs in eval mode under no_grad; its mode is
    restored."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}  # rows seen in all (a sampled batch stands for all its rows)
    generator = torch.Generator().manual_seed(0)

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach()
            parts = layer_rows(module, x, sampled_rows(module, x, generator))
            if name not in sums:  # (setdefault built d x d zeros at every batch, then dropped them)
                sums[name] = [torch.zeros(p.shape[1], p.shape[1], dtype=p.dtype, device=p.device)
                              for p in parts]
            acc = sums[name]
            rows = row_count(module, x)[0]
            scale = rows / parts[0].shape[0]  # 1 unless sampled: each batch by its rows
            for a, p in zip(acc, parts, strict=True):
                a.addmm_(p.mT, p, alpha=scale)
            counts[name] = counts.get(name, 0) + rows
        return hook

    hooks = [(module, hook_for(name))
             for name, module in zip(names, _check_layers(model, names), strict=True)]
    device = _device(model)
    with hooked(model, hooks):
        for x in calibration_inputs(batches, max_batches, allow_empty=True):
            with forward_on(x, "calib_data"):
                model(x.to(device))
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValueError(f"batches: layers {missing} never ran (no batches, or not on the "
                         "forward path)")
    for n, acc in sums.items():  # in place: a 25,088-wide layer's moment is 5 GB
        for a in acc:
            a.div_(counts[n])
    return sums


# ------------------------------------------------------------------ sequential calibration
class _Reached(Exception):
    """Raised by a hook to end a forward pass at the layer it watches (nothing after it runs)."""


def forward_order(model: nn.Module, names: Sequence[str], batches: Iterable,
                  sequential: bool = True) -> list[str]:
    """``names`` in the order their layers first run on the first batch; a layer that does not
    run is an error naming it, and (for ``sequential`` fitting, which reaches a layer's first
    call only) so is one that runs more than once."""
    seen: list[str] = []
    hooks = [(module, lambda m, args, n=name: seen.append(n))
             for name, module in zip(names, _check_layers(model, names), strict=True)]
    x = next(calibration_inputs(batches, 1))
    with hooked(model, hooks, pre=True), forward_on(x, "calib_data"):
        model(x.to(_device(model)))
    order = list(dict.fromkeys(seen))
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"batches: layers {missing} never ran (not on the forward path)")
    reused = [n for n in order if seen.count(n) > 1]
    if sequential and reused:
        raise ValueError(f"sequential: layer {reused[0]!r} runs {seen.count(reused[0])} times "
                         "in one forward pass, and its fit would see the first call only; "
                         "leave it dense (rankcut.plan does) or fit with sequential=False")
    return order


def input_at(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``module`` gets when ``model`` runs on ``x``; the pass stops there."""
    got = []

    def stop(m, args):
        got.append(args[0].detach())
        raise _Reached

    with hooked(model, [(module, stop)], pre=True):
        try:
            model(x)
        except _Reached:
            pass
    if not got:
        raise ValueError("batches: the layer never ran (not on the forward path)")
    return got[0]


def paired_moments(reference: nn.Module, model: nn.Module, name: str, batches: Iterable, *,
                   max_batches: int | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """For layer ``name`` (a Conv2d/Linear of both models): (Σ̃, Σ×) per group, float64, with
    x̃ what the layer gets in ``model`` and x what it gets in ``reference`` on the same inputs:
    Σ̃ = E[x̃ x̃ᵀ] and Σ× = E[x x̃ᵀ]; and the number of rows (patches or samples) they average.
    Each pass stops at the layer. Where x̃ equals x on every batch (no layer before this one is
    factorized), Σ× is returned as the very tensors of Σ̃ and never accumulated (for a
    25,088-wide classifier layer, 5 GB saved), and :func:`corrected_weight` keeps W."""
    ref_module = _check_layers(reference, [name])[0]
    module = _check_layers(model, [name])[0]
    device = _device(model)
    generator = torch.Generator().manual_seed(0)
    moments = cross = None
    count = rows = 0  # rows used (the ridge's scale), rows they stand for (the average's)
    for x in calibration_inputs(batches, max_batches):
        x = x.to(device)
        x_ref, x_seen = input_at(reference, ref_module, x), input_at(model, module, x)
        at = sampled_rows(module, x_seen, generator)  # the same rows of both
        wanted, seen = layer_rows(ref_module, x_ref, at), layer_rows(module, x_seen, at)
        if moments is None:
            moments = [q.new_zeros(q.shape[1], q.shape[1]) for q in seen]
        if cross is None and not torch.equal(x_ref, x_seen):
            cross = [a.clone() for a in moments]  # the batches so far had x̃ = x
        batch_rows = row_count(module, x_seen)[0]
        scale = batch_rows / seen[0].shape[0]  # 1 unless sampled: each batch by its rows
        for i, (p, q) in enumerate(zip(wanted, seen, strict=True)):
            moments[i].addmm_(q.mT, q, alpha=scale)
            if cross is not None:
                cross[i].addmm_(p.mT, q, alpha=scale)
        count += seen[0].shape[0]
        rows += batch_rows
    for a in moments + (cross or []):  # in place: a 25,088-wide layer's moment is 5 GB
        a.div_(rows)
    return moments, moments if cross is None else cross, count


def corrected_weight(module: nn.Module, moments: Sequence[torch.Tensor],
                     cross: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """The weight W' (shaped as ``module.weight``) that best reproduces the reference outputs W x
    from the inputs x̃ the layer really gets, shrunk towards W: per group
    W' = W (Σ× + λI)(Σ̃ + λI)⁻¹, the minimiser of E||W x - W' x̃||² + λ||W' - W||², with
    λ = (d / ``count``)·mean(diag Σ̃) for d inputs (at least 10⁻⁶ of it): negligible with many
    more rows than inputs, a pull back to W where the rows are too few to fit d·d numbers.
    When ``cross`` is ``moments`` itself (:func:`paired_moments`: the inputs are unchanged) the
    result is ``module.weight`` itself (detached, not a copy: do not modify it in place).

    Otherwise ``cross`` is consumed: each Σ× is overwritten by the Cholesky factor of Σ̃ + λI,
    so that the solve needs no d x d matrix beyond the two given (a 25,088-wide classifier
    layer's are 5 GB each)."""
    W = module.weight.detach()
    if all(a is b for a, b in zip(moments, cross, strict=True)):  # x̃ = x: W itself
        return W
    groups = len(moments)
    t = W.shape[0] // groups
    out = []
    for g, (A, B) in enumerate(zip(moments, cross, strict=True)):
        d = A.shape[0]
        Wg = W[g * t:(g + 1) * t].reshape(t, -1).to(A)
        lam = ridge_of(A, max(d / max(count, 1), 1e-6))
        rhs = torch.addmm(Wg, Wg, B, beta=lam)  # W (Σ× + λI)
        del Wg  # each m x d float64 temporary freed once used (0.8 GB for a 4096 x 25,088 W)
        reg = B.copy_(A)  # Σ× is no longer needed: its storage becomes Σ̃ + λI, then its factor
        reg.diagonal().add_(lam)
        # factorized in place through the column-major view (LAPACK's layout: no copy); it
        # reads one triangle, so the moment's rounding-level asymmetry does not matter
        factor, info = reg.mT, torch.empty((), dtype=torch.int32, device=reg.device)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if bool(info):
            raise ValueError("moments: not positive semi-definite (the Cholesky factorization "
                             "of Σ̃ + λI failed); pass the moments of paired_moments")
        # W' = rhs (L Lᵀ)⁻¹ by two triangular solves from the right, each reading one triangle
        # of the factor in place (torch.cholesky_solve would copy it)
        half = torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False)
        del rhs
        out.append(torch.linalg.solve_triangular(factor, half, upper=False, left=False))
        del half
    return (out[0] if groups == 1 else torch.cat(out)).reshape(W.shape).to(W.dtype)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, calib_data, *, max_batches: int | None = None) -> int:
    """Recompute the running mean and variance of every BatchNorm in ``model`` (in place) from
    ``calib_data``, as the model now computes them (every other module in eval mode; the exact
    average over the batches, each weighted by its examples; a batch of one example is
    skipped). Returns the number of BatchNorm layers re-estimated; modes and momenta are
    restored.

    Not applied by default: the inputs must be distributed as the training inputs were
    (augmentation included). On the pretrained CIFAR-10 ResNet-20, re-estimating on 1024
    un-augmented training images takes the *dense* model from 91.64% to 88.40% top-1, and a
    3x-compressed one below where it was (experiments/bn_reestimation.py, docs/planning.md)."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    # what a failure (no batches, a forward that raises) puts back: the statistics as they were
    kept = [{k: v.clone() for k, v in m.state_dict().items()
             if k in ("running_mean", "running_var", "num_batches_tracked")} for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.train()
        seen = 0
        for x in calibration_inputs(calib_data, max_batches):
            if len(x) < 2:  # one example: no batch statistics (BatchNorm1d refuses it)
                continue
            for m in norms:  # an average over the batches weighted by their examples
                m.momentum = len(x) / (seen + len(x))
            model(x.to(device))
            seen += len(x)
        if seen == 0:
            raise ValueError("calib_data: no batch of two examples or more to re-estimate "
                             "BatchNorm statistics on")
        if any(not bool(torch.isfinite(m.running_var).all()) for m in norms
               if m.running_var is not None):
            raise ValueError("calib_data: the re-estimated BatchNorm variances are not finite "
                             "(NaN or infinite inputs?); the statistics are left as they were")
    except BaseException:
        with torch.no_grad():
            for m, state in zip(norms, kept, strict=True):
                for k, v in state.items():
                    getattr(m, k).copy_(v)
        raise
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return len(norms)
