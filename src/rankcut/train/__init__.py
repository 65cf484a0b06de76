"""Fine-tuning and evaluation of (compressed) classifiers: ``finetune`` and ``evaluate``.

    from rankcut.train import finetune, evaluate
    result = finetune(small, train_set, epochs=5, teacher=model, transform=normalize,
                      val_data=val_set, checkpoint_dir="ckpt/", resume=True, log="train.jsonl")
    evaluate(small, test_set, transform=normalize)   # {"top1", "top5", "loss", "n"}

``finetune`` runs unchanged on one CPU or GPU and under ``torchrun`` (DistributedDataParallel,
the global batch split over the processes); checkpoints resume exactly. See docs/training.md.
"""

from .evaluation import evaluate
from .loop import (
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    TrainResult,
    check_finetune_options,
    factorized_parameters,
    finetune,
)
from .losses import distillation_loss, training_loss

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "TrainResult",
    "check_finetune_options",
    "distillation_loss",
    "evaluate",
    "factorized_parameters",
    "finetune",
    "training_loss",
]
