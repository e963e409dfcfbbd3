"""Atomic writes: a reader sees the old file (or set of files) or the new one, never half of either.

Every write vlora makes goes through the ``os`` calls of this module (open, write, fsync, replace, mkdir), so
a test can make any one of them fail as a full disk or a read-only file system would.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("vlora")

# What the machine refused, in words a user can act on: OSError.errno -> what happened and the fix.
DISK_PROBLEMS = {
    errno.ENOSPC: "the disk is full — free some space",
    errno.EDQUOT: "the disk quota is used up — free some space",
    errno.EROFS: "the file system is read-only — write somewhere writable",
    errno.EACCES: "there is no permission to write there — choose a folder you can write",
    errno.EPERM: "there is no permission to write there — choose a folder you can write",
    errno.EFBIG: "the file is larger than this file system (or `ulimit -f`) allows — write somewhere else",
}
_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{12}\.(tmp|old)")  # temp and set-aside names this module makes


def disk_problem(error: OSError) -> str:
    """An OSError from a write, in words: what the machine refused and what to do."""
    return DISK_PROBLEMS.get(error.errno, error.strerror or str(error))


def is_leftover(name: str) -> bool:
    """A temp or set-aside file name this module makes (left behind only by a crash)."""
    return bool(_LEFTOVER.fullmatch(name))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create the file ``path`` (it must not exist yet), write ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync it, then rename over ``path``. Once renamed the file is
    written: a failure to sync the folder afterwards is a warning, never an error a caller would undo it for."""
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    sync_written(path.parent)


def write_json_atomic(path: Path, value: object) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def make_folders(path: Path) -> list[Path]:
    """Create the folder ``path`` and any missing parents; returns the folders made, outermost first."""
    missing, folder = [], Path(path)
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue
            made.append(folder)
    except BaseException:
        remove_empty_folders(made)
        raise
    return made


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the given folders, innermost first, where they are (still) empty."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return


@contextmanager
def atomic_folder(target: Path, last: str | None = None):
    """Yield an empty temp folder; on success its files replace ``target``'s set of files, whole.

    A new ``target`` is the temp folder renamed. An existing one (empty, or holding an older set of the same
    files) keeps its own folder, which may be the working directory: the old files are set aside first, ``last``
    (the file that marks the set complete, such as PEFT's config) before the others, and the new ones put in with
    ``last`` at the end, so a crash leaves the old set, the new set, or a set without ``last``, never a mix. If
    anything raises, what was set aside is put back, the temp folder and any parent folders made for it are
    removed, and ``target`` is as it was.
    """
    target = Path(os.path.abspath(target))  # "." has no name to make a temp name from
    existing = target.is_dir()
    made = [] if existing else make_folders(target.parent)
    tmp = _temp_name(target / target.name if existing else target, "tmp")
    try:
        os.mkdir(tmp)
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda name: name == last)  # ``last`` goes in last
        for name in names:
            fsync_path(tmp / name)
        if existing:
            _swap_in(tmp, target, names)
            os.rmdir(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(made)
        raise
    sync_written(target if existing else target.parent)


def _swap_in(tmp: Path, target: Path, names: list[str]) -> None:
    """Move ``names`` from ``tmp`` into ``target``, the old files set aside and put back if a step fails."""
    aside, placed = {}, []
    try:
        for name in reversed(names):
            if os.path.lexists(target / name):
                old = _temp_name(target / name, "old")
                os.replace(target / name, old)
                aside[name] = old
        for name in names:
            os.replace(tmp / name, target / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            if name not in aside:
                remove_quietly(target / name)
        for name, old in aside.items():
            _put_back(old, target / name)
        raise
    for old in aside.values():
        remove_quietly(old)


def _put_back(old: Path, path: Path) -> None:
    """Return a set-aside file to its name (over a new one placed there); say so if even that fails."""
    try:
        os.replace(old, path)
    except OSError as error:
        log.warning("%s: could not be put back from %s (%s); rename it back by hand", path, old.name, error.strerror)


def sync_written(folder: Path) -> None:
    """fsync a folder whose new entries are already in place: a failure is no reason to report the write failed."""
    try:
        fsync_path(folder)
    except OSError as error:
        log.warning("%s: written, but the folder could not be synced to disk (%s)", folder, disk_problem(error))


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{kind}")


def remove_quietly(path: Path) -> None:
    """Remove the file ``path`` if it can be (a clean-up must not hide the error that called for it)."""
    try:
        os.unlink(path)
    except OSError:
        pass
