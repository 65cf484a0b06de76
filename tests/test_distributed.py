"""finetune under torchrun: two CPU processes (gloo) on the global batch match one process,
and a run stopped and resumed under DDP ends where the uninterrupted one does.

The tiny model has no BatchNorm: under DDP each process normalises its own half-batch (and
rank 0's running statistics are broadcast), which is a real, documented difference from one
process normalising the whole batch, not a defect to test away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rankcut.train import finetune

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from tests.test_distributed import ddp_problem
from rankcut.train import finetune

model, data, kw = ddp_problem()
sizes = []
model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])) if m.training else None)
out = Path(sys.argv[1])
result = finetune(model, data, checkpoint_dir=out / "ckpt", log=out / "log.jsonl", **kw)
rank = int(os.environ["RANK"])
torch.save(model.state_dict(), out / f"model{{rank}}.pt")

# the same run again, stopped after step 3 (a checkpoint) and resumed in these processes
model, data, kw = ddp_problem()
finetune(model, data, checkpoint_dir=out / "ckpt2", callback=lambda i: i["step"] == 3, **kw)
model, data, kw = ddp_problem()
resumed = finetune(model, data, checkpoint_dir=out / "ckpt2", resume=True, **kw)
torch.save(model.state_dict(), out / f"resumed{{rank}}.pt")
# with BatchNorm: each process updates its running statistics from its own half-batch;
# validation and the returned model use rank 0's (as the checkpoint does) on every process
model, data, kw = ddp_problem()
model = torch.nn.Sequential(model[0], torch.nn.BatchNorm1d(16), *model[1:])
bn = finetune(model, data, checkpoint_dir=out / "ckpt3", **kw)
torch.save(model.state_dict(), out / f"bn{{rank}}.pt")
(out / f"rank{{rank}}.json").write_text(json.dumps({{
    "bn_history": bn.history,
    "sizes": sizes, "history": result.history, "resumed_history": resumed.history,
    "world": torch.distributed.get_world_size(),
    "backend": torch.distributed.get_backend()}}))
"""


def ddp_problem():
    """A small MLP without BatchNorm, 64 training samples in global batches of 16 (4 steps an
    epoch, 2 epochs), 31 validation samples (an uneven split over 2 processes)."""
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 6, generator=g)
    y = torch.arange(95) % 3
    x = centers[y] + torch.randn(95, 6, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    kw = dict(epochs=2, batch_size=16, lr=0.1, momentum=0.9, warmup_steps=2,
              label_smoothing=0.05, clip_grad_norm=5.0, val_data=(x[64:], y[64:]),
              log_every=2, seed=7, progress=False)
    return model, (x[:64], y[:64]), kw


def no_time(history):
    return [{k: v for k, v in e.items() if k != "time"} for e in history]


def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    states = [torch.load(tmp_path / f"model{r}.pt", weights_only=True) for r in (0, 1)]

    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    # each process trains on half of every global batch of 16
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == [8] * 8
    # the replicas stay identical, and every process reports the same (all-reduced) history
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert no_time(ranks[0]["history"]) == no_time(ranks[1]["history"])

    torch.set_num_threads(1)
    model, data, kw = ddp_problem()
    single = finetune(model, data, device="cpu", **kw)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)
    ddp_hist, one_hist = no_time(ranks[0]["history"]), no_time(single.history)
    assert [(e["split"], e["step"]) for e in ddp_hist] == [(e["split"], e["step"])
                                                          for e in one_hist]
    for a, b in zip(ddp_hist, one_hist, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["accuracy"] == pytest.approx(b["accuracy"])
        assert a.get("n") == b.get("n")  # validation: each of the 31 samples once in all
    # only rank 0 wrote the log and the checkpoint
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert no_time([json.loads(line) for line in lines]) == ddp_hist
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert saved["step"] == 8 and len(saved["per_rank"]) == 2
    # with BatchNorm: one model on every process, rank 0's, the one checkpointed and validated
    bn = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(bn[0][k], bn[1][k]) for k in bn[0])
    assert not torch.equal(bn[0]["1.running_mean"], torch.zeros(16))
    saved = torch.load(tmp_path / "ckpt3" / "last.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], bn[0][k]) for k in bn[0])
    assert no_time(ranks[0]["bn_history"]) == no_time(ranks[1]["bn_history"])
    # stopping and resuming under DDP ends exactly where the uninterrupted DDP run ended
    for r in (0, 1):
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        assert all(torch.equal(resumed[k], states[0][k]) for k in states[0])
        assert no_time(ranks[r]["resumed_history"]) == ddp_hist
