"""The training objective: cross-entropy (optionally label-smoothed), mixed with knowledge
distillation from a teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse class-index ``targets`` outside the model's ``logits.shape[1]`` outputs (a model
    built for fewer classes than the data has), a ValueError instead of cross-entropy's
    IndexError or a device-side assert (a negative label, cross-entropy's -100 "ignore" among
    them, is refused too: top-1 and the loss would count it differently). Reads two numbers
    from the device."""
    if targets.dtype.is_floating_point or targets.numel() == 0 or logits.ndim != 2:
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"labels: the data has class {low if low < 0 else high} but the model "
                         f"has {logits.shape[1]} outputs (classes 0..{logits.shape[1] - 1}); "
                         "build it with as many classes as the data has (--num-classes)")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s (2015) distillation term, averaged over the batch:

        T² · KL(softmax(teacher / T) ‖ softmax(student / T))
        = T² · mean_i Σ_c p_t[i, c] · (log p_t[i, c] − log p_s[i, c])

    The T² factor keeps the gradient's size (which is (p_s − p_t) / T per logit) independent of
    the temperature, so the same mixing weight works at any T. Computed in float32 (float64
    for float64 logits).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the "
                         f"student's {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t = float(temperature)
    log_p_s = F.log_softmax(at_least_float32(student_logits) / t, dim=1)
    log_p_t = F.log_softmax(at_least_float32(teacher_logits) / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32 where they are in a half type (autocast's), else as they are (a
    float64 model's loss stays float64)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def training_loss(logits: torch.Tensor, targets: torch.Tensor,
                  teacher_logits: torch.Tensor | None = None, *, label_smoothing: float = 0.0,
                  kd_alpha: float = 0.5, kd_temperature: float = 4.0) -> torch.Tensor:
    """``CE(logits, targets)`` with ``label_smoothing``; with a teacher,
    ``(1 − kd_alpha) · CE + kd_alpha · distillation_loss(logits, teacher_logits, T)``."""
    ce = F.cross_entropy(at_least_float32(logits), targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    kd = distillation_loss(logits, teacher_logits, kd_temperature)
    return (1.0 - kd_alpha) * ce + kd_alpha * kd
