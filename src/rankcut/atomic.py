"""Writing files so that readers never see half of one: a temporary path beside the target,
moved onto it in one rename once the write succeeded (save, checkpoints, reports, exports); and
whole output folders written the same way (:func:`atomic_folder`), so that a folder never holds
files of two runs. :func:`file_target_problem` and :func:`folder_target_problem` check an output
path before any work is done."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file or folder; a failure to clean up (a read-only file system, say)
    must not hide the error that made the clean-up necessary."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto ``path`` (after an fsync) if the block
    succeeds and removed whatever happens: readers never see a half-written file, and a failure
    leaves the folder as it was. The name is unique rather than made by ``mkstemp`` so that the
    file gets the usual permissions (mkstemp's are owner-only). An error of the block (or of the
    write) is raised as it was: a clean-up that fails too does not replace it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)  # fsync needs no write access
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    with contextlib.suppress(OSError):  # not every platform can open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary folder beside ``path``; if the block succeeds it replaces
    ``path`` whole (an existing folder there is moved aside, then removed), and whatever happens
    the temporary folder is gone afterwards. So ``path`` holds either everything of the previous
    run or everything of this one, never a mix; a run killed or failing midway leaves it as it
    was (and at worst a hidden ``.NAME.*.tmp`` sibling). Between the two renames of a
    replacement, ``path`` is briefly absent.

    Whether ``path`` may be replaced is the caller's decision (see :func:`folder_target_problem`);
    an existing regular file at ``path`` is never replaced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: a file, not a folder; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    old = path.with_name(f".{path.name}.{tag}.old")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_symlink() or path.exists():
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove_quietly(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove_quietly(tmp)


def _file_above(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder (so nothing can be created
    under it), or None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return Path(".")


def _not_writable(folder: Path) -> str | None:
    """Why nothing can be created in the existing ``folder`` (a probe folder is made and removed
    at once), or None."""
    probe = folder / f".rankcut-probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.mkdir()
    except OSError as err:
        return err.strerror or type(err).__name__
    _remove_quietly(probe)
    return None


def written_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (a folder written into, not replaced: a
    checkpoint folder, a save folder): an existing one is probed itself, a new one as
    :func:`folder_target_problem` would be made; or None."""
    if not Path(folder).is_dir():
        return folder_target_problem(folder)
    problem = _not_writable(Path(folder))
    return None if problem is None else f"cannot write in {folder}: {problem}"


def file_target_problem(path: str | os.PathLike, probe: bool = True) -> str | None:
    """Why a file cannot be written at ``path`` (a folder is there, a regular file sits where a
    parent folder should be, or, with ``probe``, the folder it goes into is not writable), or
    None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; expected the path of a file to write"
    above = _file_above(path)
    if above is not None:
        return f"{path} lies under {above}, which is a file, not a folder"
    problem = _not_writable(_nearest_existing(path)) if probe else None
    if problem is not None:
        return f"cannot write in {_nearest_existing(path)}: {problem}"
    return None


def output_folder_problem(path: str | os.PathLike, marker: str | None,
                          overwrite: bool) -> str | None:
    """Why ``path`` may not be replaced by a command's output folder (see
    :func:`folder_target_problem`), or, unless ``overwrite``, why an existing non-empty folder
    there is not the command's to replace (it lacks ``marker``, the file every earlier output
    of the command holds); None when it may."""
    problem = folder_target_problem(path)
    if problem is not None:
        return problem
    path = Path(path)
    if (path.is_dir() and not overwrite and any(path.iterdir())
            and (marker is None or not (path / marker).is_file())):
        earlier = f" (no {marker}: not an earlier output of this command)" if marker else ""
        return (f"{path} is a folder that is not empty{earlier}; give a new or empty folder, or "
                "--overwrite to replace it and everything in it")
    return None


def folder_target_problem(path: str | os.PathLike) -> str | None:
    """Why an output folder cannot be created or replaced at ``path`` (a regular file is there
    or where a parent folder should be, or its parent is not writable), or None. Whether an
    existing folder's contents may be replaced is for the caller to decide."""
    path = Path(path)
    if not Path(os.path.abspath(path)).name:
        return f"{path} is the root of the file system; give a folder to write into"
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    above = _file_above(path)
    if above is not None:
        return f"{path} lies under {above}, which is a file, not a folder"
    parent = _nearest_existing(path)
    problem = _not_writable(parent)
    if problem is not None:
        return f"cannot write in {parent}: {problem}"
    return None
