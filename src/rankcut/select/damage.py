"""What an error in one layer costs the whole network, measured on calibration data.

The allocation (:mod:`.budget`) minimises Σ error² over the layers, every layer weighted alike,
although the same relative output error costs the network far more in some layers than in
others (seed 000's sensitivity idea). Here each layer is replaced *alone* by a probe candidate
(the one the unweighted allocation picks for it, or where that keeps it dense, one at the
target's cost fraction; data-aware as the plan will apply it), the
network runs on calibration inputs, and the damage is the mean KL divergence between the dense
network's output distribution and the probed one's. For small errors that damage grows with the
square of the layer's output error, so ``weight = KL / error²`` is the price of a unit of squared
error in that layer; the allocation then minimises Σ weight·error², the predicted damage to the
network. (Probing is one forward pass of the calibration inputs per layer, from that layer on:
the outputs of the layers before it are the dense run's, reused.)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import eval_mode, logits_of, model_device
from ..calibrate import calibration_inputs
from ..curves import Candidate
from ..surgery import set_submodule

# Below this predicted error a probe says little (KL of a tiny change is mostly noise).
MIN_PROBE_ERROR = 1e-3
# How far the measured weights are trusted: w ** SHRINK, bounded to [1/MAX_RATIO, MAX_RATIO].
SHRINK = 0.5
MAX_RATIO = 4.0


def _log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the classes of each output position: (N, C) a classifier's;
    (N, S, V) a sequence model's, over its last dimension; (N, C, H, W) a segmentation's, over
    its channels. (One softmax over all of a sequence's positions would make the positions with
    the smaller logits count for almost nothing.) One logit per position ((N,) or (N, 1)) is a
    binary classifier's: the two classes' log-probabilities, logsigmoid(±z). A model returning
    a tuple or list is read by its first tensor, a mapping by its "logits" (else its first
    tensor)."""
    try:
        out = logits_of(model(x))
    except ValueError:
        raise ValueError("loss_aware: the model's output holds no tensor to measure the damage "
                         "on; plan with loss_aware=False") from None
    out = out.double()
    if out.ndim == 4:
        out = out.movedim(1, -1)
    out = out if out.ndim > 1 else out[:, None]
    if out.shape[-1] == 1:  # a binary classifier's one logit: a softmax over one class is 0
        return torch.cat([F.logsigmoid(out), F.logsigmoid(-out)], dim=-1)
    return F.log_softmax(out, dim=-1)


class _Prefix:
    """The dense network's Conv2d and Linear outputs on one batch, in the order they ran, so
    that a run with one layer replaced reuses every output computed before that layer's first
    call (those cannot differ) instead of recomputing it: probing a layer then costs the part of
    the network from it on, not the whole network."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        # per layer, (position among all layer calls, output) of each of its calls
        self.outputs: dict[nn.Module, list[tuple[int, torch.Tensor]]] = {}
        self.first: dict[nn.Module, int] = {}
        self.calls = 0
        # before the user's own hooks: the layer's own output, which a replay hands to them
        handles = [m.register_forward_hook(self._record, prepend=True) for m in model.modules()
                   if isinstance(m, nn.Conv2d | nn.Linear)]
        try:
            self.reference = _log_probs(model, x)
        finally:
            for h in handles:
                h.remove()

    def _record(self, module, args, output):  # returns None: the output is left alone
        self.first.setdefault(module, self.calls)
        # copies, here and when handed out: a later in-place op (ReLU(inplace=True), +=) must
        # not change what the next run is given
        self.outputs.setdefault(module, []).append((self.calls, output.clone()))
        self.calls += 1

    def run(self, model: nn.Module, x: torch.Tensor, replaced: nn.Module) -> torch.Tensor:
        """``model`` (with ``replaced``, a dense layer of this batch's run, swapped out) on
        ``x``, every layer call that came before ``replaced``'s first taken from the cache."""
        start = self.first.get(replaced, 0)
        counts = dict.fromkeys(self.outputs, 0)

        def cached(module, own):
            def forward(*args, **kwargs):
                k = counts[module]
                counts[module] += 1
                calls = self.outputs[module]
                if k < len(calls) and calls[k][0] < start:
                    return calls[k][1].clone()
                if own is not None:  # a forward set on the instance (a wrapper's) runs
                    return own(*args, **kwargs)
                return type(module).forward(module, *args, **kwargs)
            return forward

        patched = [m for m in self.outputs if m is not replaced and self.first[m] < start]
        own = {m: vars(m).get("forward") for m in patched}
        for m in patched:
            m.forward = cached(m, own[m])
        try:
            return _log_probs(model, x)
        finally:
            for m in patched:
                if own[m] is None:
                    del m.forward
                else:
                    m.forward = own[m]


def probe(cands: list[Candidate], dense: Candidate, kind: str, fraction: float) -> Candidate | None:
    """The candidate to probe a layer with: the most expensive one within ``fraction`` of the
    dense layer's cost (the regime the target asks for), else the cheapest."""
    cands = [c for c in cands if math.isfinite(c.error)]  # not a failed solve's
    if not cands:
        return None
    within = [c for c in cands if c.cost(kind) <= fraction * dense.cost(kind)]
    if within:
        return max(within, key=lambda c: (c.cost(kind), -c.error))
    return min(cands, key=lambda c: c.cost(kind))


def layer_weights(model: nn.Module, probes: dict[str, nn.Module], errors: dict[str, float],
                  calib_data, *, max_samples: int = 256, max_batches: int | None = None,
                  progress: bool = False) -> dict[str, float]:
    """Per layer, its weight in the allocation from ``KL(dense ‖ probed) / error²``: the
    network damage per unit of squared output error of each layer, each replaced alone by its
    probe layer (``probes``, whose predicted relative errors are ``errors``), on the first
    ``max_samples`` calibration inputs. The ratios to their mean are shrunk toward 1 (square
    root) and bounded to [1/4, 4] (one probe measures one point); a layer whose ratio is not
    finite (a failed solve's error) gets 1. ``max_batches``: of the first that many
    calibration batches at most (rankcut.plan's)."""
    inputs = _first_inputs(calib_data, max_samples, max_batches)
    work = copy.deepcopy(model)
    device = model_device(work)
    kl = dict.fromkeys(probes, 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(probes) * len(inputs), desc="planning: network damage per layer",
                   unit="probe")
    with eval_mode(work), torch.no_grad():
        for x in inputs:  # batch by batch: one batch's layer outputs are cached at a time
            x = x.to(device)
            prefix = _Prefix(work, x)
            for name, layer in probes.items():
                original = work.get_submodule(name)
                set_submodule(work, name, layer)
                try:
                    probed = prefix.run(work, x, original)
                finally:
                    set_submodule(work, name, original)
                kl[name] += float(F.kl_div(probed, prefix.reference, log_target=True,
                                           reduction="sum"))
                if bar is not None:
                    bar.set_postfix_str(name)
                    bar.update()
    if bar is not None:
        bar.close()
    total = sum(len(x) for x in inputs)
    raw = {name: max(kl[name] / total, 0.0) / max(errors[name], MIN_PROBE_ERROR) ** 2
           for name in probes}
    measured = {name: w for name, w in raw.items() if math.isfinite(w)}
    mean = sum(measured.values()) / max(len(measured), 1)
    if mean <= 0 or not math.isfinite(mean):
        return {name: 1.0 for name in raw}
    # One probe measures the damage at one error; shrink toward uniform (square root) and bound
    # the ratio, so a layer probed where its damage happened to be small is not given away.
    return {name: min(max((raw[name] / mean) ** SHRINK, 1 / MAX_RATIO), MAX_RATIO)
            if name in measured else 1.0 for name in raw}


def _first_inputs(calib_data, max_samples: int, max_batches: int | None) -> list[torch.Tensor]:
    """The first ``max_samples`` calibration inputs (of the first ``max_batches`` batches at
    most), batch by batch."""
    inputs, seen = [], 0
    for x in calibration_inputs(calib_data, max_batches):
        inputs.append(x[:max_samples - seen])
        seen += len(inputs[-1])
        if seen >= max_samples:
            break
    return inputs


def output_damage(model: nn.Module, others: dict[str, nn.Module], calib_data, *,
                  max_samples: int = 256, max_batches: int | None = None) -> dict[str, float]:
    """The damage each of ``others`` (e.g. ``model`` compressed by two plans) does, measured
    whole: the mean KL divergence between ``model``'s output distribution and each one's on
    the first ``max_samples`` calibration inputs (of the first ``max_batches`` batches)."""
    kl = dict.fromkeys(others, 0.0)
    seen = 0
    with eval_mode(model), contextlib.ExitStack() as stack, torch.no_grad():
        for other in others.values():
            stack.enter_context(eval_mode(other))
        for x in _first_inputs(calib_data, max_samples, max_batches):
            reference = _log_probs(model, x.to(model_device(model))).cpu()
            for key, other in others.items():  # (each on its own device)
                probed = _log_probs(other, x.to(model_device(other))).cpu()
                kl[key] += float(F.kl_div(probed, reference, log_target=True,
                                          reduction="sum"))
            seen += len(x)
    return {key: max(value / max(seen, 1), 0.0) for key, value in kl.items()}


def weighted(cands: list[Candidate], weight: float) -> list[Candidate]:
    """``cands`` with errors scaled to predicted network damage (error·√weight), the layer's own
    error kept in ``extra["layer_error"]``."""
    scale = weight ** 0.5
    return [dataclasses.replace(c, error=c.error * scale,
                                extra={**c.extra, "layer_error": c.error, "damage_weight": weight})
            for c in cands]
