"""What an error in one layer costs the whole network, measured on calibration data.

The allocation (:mod:`.budget`) minimises Σ error² over the layers, every layer weighted alike,
although the same relative output error costs the network far more in some layers than in
others (seed 000's sensitivity idea). Here each layer is replaced *alone* by a probe candidate
(a factorization at about the target's cost fraction, data-aware as the plan will apply it), the
network runs on calibration inputs, and the damage is the mean KL divergence between the dense
network's output distribution and the probed one's. For small errors that damage grows with the
square of the layer's output error, so ``weight = KL / error²`` is the price of a unit of squared
error in that layer; the allocation then minimises Σ weight·error², the predicted damage to the
network. (Probing is one forward pass of the calibration inputs per layer.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import eval_mode
from ..calibrate import calibration_inputs
from ..curves import Candidate
from ..surgery import set_submodule

# Below this predicted error a probe says little (KL of a tiny change is mostly noise).
MIN_PROBE_ERROR = 1e-3
# How far the measured weights are trusted: w ** SHRINK, bounded to [1/MAX_RATIO, MAX_RATIO].
SHRINK = 0.5
MAX_RATIO = 4.0


def _log_probs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        return [F.log_softmax(model(x.to(device)).flatten(1).double(), dim=1) for x in inputs]


def probe(cands: list[Candidate], dense: Candidate, kind: str, fraction: float) -> Candidate | None:
    """The candidate to probe a layer with: the most expensive one within ``fraction`` of the
    dense layer's cost (the regime the target asks for), else the cheapest."""
    if not cands:
        return None
    within = [c for c in cands if c.cost(kind) <= fraction * dense.cost(kind)]
    if within:
        return max(within, key=lambda c: (c.cost(kind), -c.error))
    return min(cands, key=lambda c: c.cost(kind))


def layer_weights(model: nn.Module, probes: dict[str, nn.Module], errors: dict[str, float],
                  calib_data, *, max_samples: int = 256,
                  progress: bool = False) -> dict[str, float]:
    """``{layer: KL(dense ‖ probed) / error²}``: the network damage per unit of squared output
    error of each layer, each replaced alone by its probe layer (``probes``, whose predicted
    relative errors are ``errors``), on the first ``max_samples`` calibration inputs. The
    weights are normalised to mean 1 (only their ratios matter to the allocation)."""
    inputs, seen = [], 0
    for x in calibration_inputs(calib_data):
        inputs.append(x[:max_samples - seen])
        seen += len(inputs[-1])
        if seen >= max_samples:
            break
    work = copy.deepcopy(model)
    reference = _log_probs(work, inputs)
    raw = {}
    steps = probes.items()
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="planning: network damage per layer", unit="layer")
    for name, layer in steps:
        original = work.get_submodule(name)
        set_submodule(work, name, layer)
        try:
            probed = _log_probs(work, inputs)
        finally:
            set_submodule(work, name, original)
        kl = sum(float(F.kl_div(q, p, log_target=True, reduction="sum"))
                 for p, q in zip(reference, probed, strict=True))
        kl /= sum(len(x) for x in inputs)
        raw[name] = max(kl, 0.0) / max(errors[name], MIN_PROBE_ERROR) ** 2
    mean = sum(raw.values()) / max(len(raw), 1)
    if mean <= 0:
        return {name: 1.0 for name in raw}
    # One probe measures the damage at one error; shrink toward uniform (square root) and bound
    # the ratio, so a layer probed where its damage happened to be small is not given away.
    return {name: min(max((w / mean) ** SHRINK, 1 / MAX_RATIO), MAX_RATIO)
            for name, w in raw.items()}


def weighted(cands: list[Candidate], weight: float) -> list[Candidate]:
    """``cands`` with errors scaled to predicted network damage (error·√weight), the layer's own
    error kept in ``extra["layer_error"]``."""
    scale = weight ** 0.5
    return [Candidate(c.method, c.ranks, c.form, c.params, c.macs, c.error * scale,
                      {**c.extra, "layer_error": c.error, "damage_weight": weight})
            for c in cands]
