"""Running under ``torchrun``: detect the launch environment, start the process group, and the
few collective operations the training loop needs (all of them no-ops in a single process)."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    node. ``world_size == 1`` is the ordinary single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def resolve_device(device, local_rank: int = 0) -> torch.device:
    """``device`` as a torch.device; None means this process's GPU (``cuda:LOCAL_RANK``) when
    CUDA is available, else the CPU. A bare ``"cuda"`` under torchrun becomes
    ``cuda:LOCAL_RANK``."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _destroy() -> None:
    """The group started here, destroyed at exit once every process has reached it: one that
    tore its side down while another was still leaving aborted that one now and then ("terminate
    called without an active exception", about one exit in six on 2 gloo processes)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":  # (a process that died is not waited for long)
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()


def setup(device=None) -> tuple[DistEnv, torch.device]:
    """The process's distributed environment and training device.

    A process group someone else started is used as it is. Otherwise, when ``$WORLD_SIZE`` > 1
    (torchrun sets it, with ``$RANK``, ``$LOCAL_RANK``, ``$MASTER_ADDR`` and ``$MASTER_PORT``),
    the group is started here from those variables: NCCL for a CUDA device, gloo for the CPU;
    it is destroyed when the interpreter exits.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        n_gpus = torch.cuda.device_count()
        local = _env_int("LOCAL_RANK", rank % n_gpus if n_gpus else 0)
        env = DistEnv(rank, world, local)
        target = resolve_device(device, local)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        return env, target
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(), resolve_device(device)
    if not dist.is_available():
        raise RuntimeError("$WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    target = resolve_device(device, local)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    atexit.register(_destroy)
    return DistEnv(rank, world, local), target


def all_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """``tensor`` summed over all processes (in place; returned)."""
    if env.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_true(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (every process must call this)."""
    if not env.active:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj, env: DistEnv) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (objects are pickled by
    torch.distributed; used for the per-process RNG states in checkpoints)."""
    if not env.active:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every process, as DDP gives them
    at the start of each forward: after a step each process has updated its own from its own
    part of the batch, so validation and the returned model would differ by process."""
    if env.active:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()
