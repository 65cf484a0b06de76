"""A distillation teacher's outputs kept on disk, so that runs distilling from the same teacher on
the same batches compute them once.

Fine-tuning a compressed model by distillation runs the dense teacher forward on every batch;
on the development CPU that was 43% of a fine-tuning step of VGG-11-BN at 32x fewer parameters
(a py-spy profile). The runs of one experiment (several ratios or methods of one model, the
same seed) read the same batches in the same order with the same augmentation, so their
teachers compute the same outputs. ``finetune(..., teacher_cache=FOLDER)`` keeps them: each
batch's outputs are stored under the SHA-256 of the teacher (the weights and printed structure
of its fused inference copy), how it runs (autocast dtype, process rank, device, memory layout,
torch version and threads, TF32 flags on CUDA) and the exact input tensor of the batch, so a hit
is the very computation, bit for bit, and a batch that differs in one pixel (another seed, other
augmentation) is a miss, computed as usual. A change of the teacher's code that neither its
weights nor its printed modules show is not seen: use another folder.

Outputs are written at every checkpoint (with ``checkpoint_dir``) and at the end of the run
(safetensors, atomically), merged with what another process wrote there; there is no lock, so
two processes saving at the same moment can lose one's new entries (computed again later). The
whole file is held in memory and rewritten at each save. On a GPU each batch is copied to the
host to be hashed.

Size: one output row per example and epoch (float32, or the autocast dtype), 5 kB per CIFAR-10
batch of 128 (10 classes), 2 MB an epoch; for 1000 classes about 5 GB per ImageNet epoch: use
it where the runs are many and the outputs small.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._fingerprint import model_fingerprint, update
from ..atomic import atomic_path


class TeacherCache:
    """Outputs of ``teacher`` keyed by their exact input batch, kept in ``folder``."""

    def __init__(self, folder, teacher: nn.Module, tag: str = ""):
        structure = hashlib.sha256(repr(teacher).encode()).hexdigest()
        self.fingerprint = (f"{model_fingerprint(teacher)}|{structure}|"
                            f"torch={torch.__version__}{tag}")
        digest = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        self.path = Path(folder) / f"teacher-{digest}.safetensors"
        self.entries: dict[str, torch.Tensor] = self._read()
        self.added = 0
        self.hits = self.misses = 0

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            return {}
        try:
            return load_file(str(self.path))
        except Exception:  # a damaged file (any reader error): computed again, written over
            return {}

    def key(self, x: torch.Tensor) -> str:
        """The entry of input batch ``x``: the teacher, how it runs now, and ``x``'s values."""
        how = [x.device.type, x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last),
               torch.get_num_threads()]
        if x.device.type == "cuda":
            how += [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
        h = hashlib.sha256(f"{self.fingerprint}|{how}".encode())
        update(h, x)
        return h.hexdigest()

    def outputs(self, x: torch.Tensor, compute) -> torch.Tensor:
        """The teacher's outputs on ``x``: kept ones, or ``compute(x)`` (then kept)."""
        key = self.key(x)
        kept = self.entries.get(key)
        if kept is not None:
            self.hits += 1
            return kept.to(x.device)
        self.misses += 1
        out = compute(x)
        self.entries[key] = out.detach().cpu().contiguous()
        self.added += 1
        return out

    def save(self) -> Path | None:
        """Write the outputs (with those another process wrote meanwhile); None when nothing
        was added."""
        if not self.added:
            return None
        merged = {**self._read(), **self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            save_file(merged, str(tmp))
        self.entries, self.added = merged, 0
        return self.path
