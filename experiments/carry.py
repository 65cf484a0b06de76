"""Carry an unfinished run of ``experiments/reproduce.py`` from one machine to the next through
git: a fine-tuning run longer than a working session here (the machine, and with it ``runs/``,
may be replaced between sessions) is saved into ``experiments/carried/`` (tracked) at the end of
a session and restored into ``runs/`` at the start of the next, where reproduce.py resumes it
exactly from its last checkpoint.

    .venv/bin/python experiments/carry.py save CONFIG RUN [--runs-dir runs]
    .venv/bin/python experiments/carry.py restore CONFIG RUN [--runs-dir runs]

What travels is what resuming needs and the run's record, nothing rebuilt cheaply: the whole
``checkpoints/`` folder (the factorized model before fine-tuning, ``last.pt`` with the weights,
optimizer, schedule, random state and step, and the stages of a ``layerwise`` or ``multistage``
run), the training log, the wall-time record (``wall.json``, so the reported time counts every
session's share) and a seed-000 sensitivity plan. The teacher's cached outputs stay behind (they
are rebuilt). Each copy replaces its destination whole (built beside it, then renamed), so an
interrupted save or restore leaves the previous copy, never a mix of two; the hidden leftovers of
a write a killed run left half done stay behind. A folder of more than 50 MB is refused: carrying
is for small compressed models, not dense ones. ``save`` refuses to replace a carried copy
that is further along than the live run (more steps in its training checkpoints: the run was
started afresh without ``restore``) unless ``--force``; reproduce.py refuses to start afresh a
run that has a carried copy.

    .venv/bin/python experiments/carry.py save CONFIG RUN --force
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rankcut.atomic import atomic_folder
from rankcut.train import checkpoint

HERE = Path(__file__).resolve().parent
CARRIED = HERE / "carried"

# What a run folder holds that resuming or its record needs
KEEP = ("checkpoints", "train.jsonl", "wall.json", "sensitivity_plan.json",
        "settings.json")
LIMIT = 50 * 2**20


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def progress(folder: Path) -> int:
    """How far run folder ``folder`` got: the steps of its training checkpoints, summed over
    the stages of a staged run (each stage keeps its own ``last.pt``)."""
    return sum(checkpoint.read(p.parent)["step"]
               for p in (folder / "checkpoints").rglob(checkpoint.FILENAME))


# what a write killed half way leaves (rankcut.atomic's hidden siblings): not carried
LEFTOVERS = shutil.ignore_patterns(".*.tmp", ".*.old")


def copy_run(source: Path, target: Path) -> list[str]:
    """Make ``target`` a folder holding the ``KEEP`` entries of run folder ``source`` and
    nothing else (replacing whatever was there, whole); returns the entries copied."""
    # (layerwise and multistage runs log each stage beside train.jsonl: train-layer-1.jsonl, ...)
    present = [k for k in KEEP if (source / k).exists()] + sorted(
        p.name for p in source.glob("train-*.jsonl"))
    if "checkpoints" not in present or not any((source / "checkpoints").iterdir()):
        raise SystemExit(f"{source}: no checkpoint to carry (checkpoints/ is missing or empty)")
    size = sum(_size(source / k) for k in present)
    if size > LIMIT:
        raise SystemExit(f"{source}: {size / 2**20:.0f} MB to carry, over the "
                         f"{LIMIT / 2**20:.0f} MB limit")
    with atomic_folder(target) as tmp:
        for k in present:
            if (source / k).is_dir():
                shutil.copytree(source / k, tmp / k, ignore=LEFTOVERS)
            else:
                shutil.copy2(source / k, tmp / k)
    return present


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("config", help="the reproduce.py config (its file name names the runs' "
                                       "folder)")
    parser.add_argument("run")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--force", action="store_true",
                        help="save: replace a carried copy even where it is further along")
    args = parser.parse_args(argv)
    stem = Path(args.config).stem
    live = Path(args.runs_dir) / stem / args.run
    kept = CARRIED / stem / args.run
    if args.action == "save":
        if (live / "result.json").is_file():
            raise SystemExit(f"{live}: the run has finished; record its result instead")
        if kept.is_dir() and not args.force and progress(kept) > progress(live):
            raise SystemExit(f"{kept}: the carried copy is further along than {live} "
                             f"({progress(kept)} steps against {progress(live)}: was "
                             "the run started afresh instead of restored?); --force replaces "
                             "it")
        copied = copy_run(live, kept)
    else:
        if not kept.is_dir():
            raise SystemExit(f"{kept}: nothing carried for run {args.run!r}")
        if (live / "checkpoints").exists() or (live / "result.json").exists():
            raise SystemExit(f"{live}: holds checkpoints or a result already; remove the "
                             "run's folder to restore the carried one")
        copied = copy_run(kept, live)
    print(f"{args.action}: {', '.join(copied)} -> {kept if args.action == 'save' else live}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
