"""rankcut.compress under torchrun: the plan is made on rank 0 and sent to the others (their
own timings could plan differently), then fine-tuning runs distributed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankcut as rc

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
import torch
from torch import nn
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
import rankcut as rc
import rankcut.select.latency as latency
from rankcut.profile import Latency

rank = int(os.environ["RANK"])


def fake(module, x, **kw):  # rank 1 alone would find every factorization slower than dense
    ms = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    ms = ms * 1e-4 if rank == 0 else 9.0
    return Latency(ms, ms, ms, 1, 1, 1, "cpu")


latency.measure_latency = fake
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 3, 8, 8, generator=g)
y = (x[:, 0].mean((1, 2)) > 0).long()
result = rc.compress(model, x[:1], method="svd", target="macs=2x", train_data=(x, y), steps=3,
                     # timed (the guard on), but a tiny model's kernels are dispatch-bound and
                     # two ranks share the CPU: the margin keeps a plan that times slower
                     plan_options={{"min_params": 100, "latency_margin": 10.0}},
                     finetune_options={{"batch_size": 16, "progress": False}})
out = sys.argv[1]
open(f"{{out}}/plan{{rank}}.json", "w").write(result.plan.to_json())
torch.save(result.model.state_dict(), f"{{out}}/model{{rank}}.pt")
"""


@pytest.mark.slow  # (two processes planning and training, about 17 s; in make test-all)
def test_compress_under_torchrun_uses_rank_0s_plan_everywhere(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(repo=str(REPO / "src")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = [rc.Plan.from_json((tmp_path / f"plan{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1] and plans[0].active
    states = [torch.load(tmp_path / f"model{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


ERRORS = """
import os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from rankcut.compress import _broadcast, _on_first_process
from rankcut.select import TargetUnreachable

dist.init_process_group("gloo")
rank = dist.get_rank()
caught = []


def fails(err):
    def fn():
        if rank != 0:
            raise AssertionError("called on a rank other than 0")
        raise err
    return fn


for fn in (fails(TargetUnreachable("params=99x is out of reach")),
           fails(OSError("disk full\\nsecond line")), lambda: {{"rank": rank}}):
    try:
        caught.append(["value", _broadcast(fn)])
    except Exception as err:
        caught.append([type(err).__name__, str(err)])
try:
    _on_first_process(fails(KeyError("plan.json")))
except Exception as err:
    caught.append([type(err).__name__, str(err)])
open(f"{{sys.argv[1]}}/caught{{rank}}.txt", "w").write(repr(caught))
dist.destroy_process_group()
"""


def test_an_error_on_rank_0_is_raised_on_every_process(tmp_path):
    """Rank 0's error reaches the other processes (same kind where it is a planning error) instead
    of leaving them waiting for a value that never comes."""
    script = tmp_path / "job.py"
    script.write_text(ERRORS.format(repo=str(REPO / "src")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import ast

    rank0, rank1 = (ast.literal_eval((tmp_path / f"caught{r}.txt").read_text()) for r in (0, 1))
    assert rank0 == [["TargetUnreachable", "params=99x is out of reach"],
                     ["OSError", "disk full\nsecond line"], ["value", {"rank": 0}],
                     ["KeyError", "'plan.json'"]]
    assert rank1 == [["TargetUnreachable", "params=99x is out of reach"],
                     ["RuntimeError", "rank 0 failed: OSError: disk full\nsecond line"],
                     ["value", {"rank": 0}],
                     ["RuntimeError", "rank 0 failed: KeyError: 'plan.json'"]]
