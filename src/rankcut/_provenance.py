"""Which code produced a result: the one place that asks git."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def source_commit() -> str:
    """The short hash of the commit of the rankcut checkout this process runs ("+dirty" with
    uncommitted changes to tracked files; "unknown" outside a git checkout, e.g. an installed
    wheel). Read once, at the first call, and kept: commits made while a long run goes on must
    not be credited with results of the code it loaded before them."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                       else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
