"""A distillation teacher's outputs kept on disk, so that runs distilling from the same teacher on
the same batches compute them once.

Fine-tuning a compressed model by distillation runs the dense teacher forward on every batch;
on the development CPU that was 43% of a fine-tuning step of VGG-11-BN at 16x fewer parameters
(a py-spy profile). The runs of one experiment (several ratios or methods of one model, the
same seed) read the same batches in the same order with the same augmentation, so their
teachers compute the same outputs. ``finetune(..., teacher_cache=FOLDER)`` keeps them: each
batch's outputs are stored under the SHA-256 of the teacher (the weights and printed structure
of its fused inference copy), how it runs (the autocast in effect, process rank, device, memory
layout of the batch and of the teacher's weights, torch version and threads, TF32 flags on CUDA)
and the exact input tensor of the batch, so a hit
is the very computation, bit for bit, and a batch that differs in one pixel (another seed, other
augmentation) is a miss, computed as usual. A change of the teacher's code that neither its
weights nor its printed modules show is not seen: use another folder.

Outputs are written at every checkpoint (with ``checkpoint_dir``) and at the end of the run:
each save writes the outputs computed since the last one into a new shard (safetensors,
atomically), ``teacher-<teacher digest>-<unique>.safetensors``, so nothing is rewritten and
concurrent runs never lose each other's outputs; a run reads all of its teacher's shards at the
start and holds them in memory. On a GPU each batch is copied to the host to be hashed. A save
that fails (a full disk, a read-only folder) warns and leaves the outputs for the next save: the
cache never stops a run.

Size: one output row per example and epoch (float32, or the autocast dtype), 5 kB per CIFAR-10
batch of 128 (10 classes), 2 MB an epoch; for 1000 classes about 5 GB per ImageNet epoch: use
it where the runs are many and the outputs small.
"""

from __future__ import annotations

import hashlib
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
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
        self.teacher = teacher
        self.folder = Path(folder)
        self.prefix = f"teacher-{hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]}"
        self.entries: dict[str, torch.Tensor] = self._read()
        self.new: dict[str, torch.Tensor] = {}  # computed here, not saved yet
        self.hits = self.misses = 0

    def shards(self) -> list[Path]:
        """This teacher's files: one per save (each holds the outputs that save added)."""
        return sorted(self.folder.glob(f"{self.prefix}-*.safetensors"))

    def _read(self) -> dict[str, torch.Tensor]:
        entries = {}
        for shard in self.shards():
            try:
                entries.update(load_file(str(shard)))
            except Exception:  # a damaged shard (any reader error): its outputs are computed
                pass           # again and saved in a new one
        return entries
    def key(self, x: torch.Tensor) -> str:
        """The entry of input batch ``x``: the teacher, how it runs now, and ``x``'s values."""
        channels_last = torch.channels_last
        how = [x.device.type, x.ndim == 4 and x.is_contiguous(memory_format=channels_last),
               [p.is_contiguous(memory_format=channels_last) and not p.is_contiguous()
                for p in self.teacher.parameters() if p.ndim == 4],
               _autocast(x.device.type), torch.get_num_threads()]
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
        self.entries[key] = self.new[key] = out.detach().cpu().contiguous()
        return out

    def save(self) -> Path | None:
        """Write the outputs computed since the last save into a new shard (atomically; no
        other process's file is touched, so concurrent runs lose nothing); None when there are
        none."""
        if not self.new:
            return None
        path = self.folder / f"{self.prefix}-{uuid.uuid4().hex[:12]}.safetensors"
        try:
            with atomic_path(path) as tmp:  # makes the folder
                save_file(self.new, str(tmp))
        except (OSError, SafetensorError) as err:  # (safetensors' I/O error: not an OSError)
            warnings.warn(f"teacher_cache: could not save {len(self.new)} teacher outputs in "
                          f"{self.folder} ({err}); the run goes on without them", stacklevel=2)
            return None
        self.new = {}
        return path


def _autocast(device_type: str) -> tuple:
    """Whether autocast is on for ``device_type`` where the teacher runs, and its dtype (the
    caller's own autocast as well as finetune's ``amp``)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
