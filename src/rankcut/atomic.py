"""Writing files so that readers never see half of one: a temporary path beside the target,
moved onto it in one rename once the write succeeded (save, checkpoints, reports, exports)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto ``path`` (after an fsync) if the block
    succeeds and removed whatever happens: readers never see a half-written file, and a failure
    leaves the folder as it was. The name is unique rather than made by ``mkstemp`` so that the
    file gets the usual permissions (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
