"""Carry an unfinished run of ``experiments/reproduce.py`` from one machine to the next through
git: a fine-tuning run longer than a working session here (the machine, and with it ``runs/``,
may be replaced between sessions) is saved into ``experiments/carried/`` (tracked) at the end of
a session and restored into ``runs/`` at the start of the next, where reproduce.py resumes it
exactly from its last checkpoint.

    .venv/bin/python experiments/carry.py save CONFIG RUN [--runs-dir runs]
    .venv/bin/python experiments/carry.py restore CONFIG RUN [--runs-dir runs]

What travels is what resuming needs and the run's record, nothing rebuilt cheaply: the
factorized model before fine-tuning (``checkpoints/start/``), the last checkpoint
(``checkpoints/last.pt``: weights, optimizer, schedule, random state, step), the training log
and the wall-time record (``wall.json``, so the reported time counts every session's share).
The teacher's cached outputs stay behind (they are rebuilt). A folder of more than 50 MB is
refused: carrying is for small compressed models, not dense ones.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CARRIED = HERE / "carried"
# What a run folder holds that resuming or its record needs (relative paths)
KEEP = ("checkpoints/start", "checkpoints/last.pt", "train.jsonl", "wall.json",
        "sensitivity_plan.json")
LIMIT = 50 * 2**20


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_run(source: Path, target: Path) -> list[str]:
    """Copy the ``KEEP`` entries of run folder ``source`` into ``target`` (replacing what is
    there); returns the entries copied."""
    present = [k for k in KEEP if (source / k).exists()]
    if "checkpoints/last.pt" not in present and "checkpoints/start" not in present:
        raise SystemExit(f"{source}: no checkpoint to carry (checkpoints/start or "
                         "checkpoints/last.pt)")
    size = sum(_size(source / k) for k in present)
    if size > LIMIT:
        raise SystemExit(f"{source}: {size / 2**20:.0f} MB to carry, over the "
                         f"{LIMIT / 2**20:.0f} MB limit")
    for k in present:
        dst = target / k
        if dst.is_dir():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (source / k).is_dir():
            shutil.copytree(source / k, dst)
        else:
            shutil.copy2(source / k, dst)
    return present


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("config", help="the reproduce.py config (its file name names the runs' "
                                       "folder)")
    parser.add_argument("run")
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args(argv)
    stem = Path(args.config).stem
    live = Path(args.runs_dir) / stem / args.run
    kept = CARRIED / stem / args.run
    if args.action == "save":
        if (live / "result.json").is_file():
            raise SystemExit(f"{live}: the run has finished; record its result instead")
        copied = copy_run(live, kept)
    else:
        if not kept.is_dir():
            raise SystemExit(f"{kept}: nothing carried for run {args.run!r}")
        if (live / "checkpoints").exists():
            raise SystemExit(f"{live}: holds checkpoints already; remove them to restore the "
                             "carried ones")
        copied = copy_run(kept, live)
    print(f"{args.action}: {', '.join(copied)} -> {kept if args.action == 'save' else live}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
