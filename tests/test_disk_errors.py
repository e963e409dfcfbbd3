"""The machine refuses a write (issue 12, class 5): a full disk, a read-only file system, no permission.

Injected: atomic.py's os calls (create, write, fsync, rename, mkdir), through which every write of vlora goes,
fail with ENOSPC at each call in turn, and with EROFS or EACCES at the first, for `vlora add`, `vlora compress`
over a store and into a new folder, and `vlora export` into a new folder and over an earlier export. Real: a
size-limited tmpfs filled to every free size a save could need, the same tmpfs remounted read-only, and a folder
without write permission for an unprivileged user (user and mount namespaces, no root mounts; skipped where the
machine has none). Each failure is exit 1 with one line naming the path and the fix, no traceback, and every
file under the test's folder byte for byte as it was; a write that got past its last fallible step is whole.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli as vlora
from conftest import write_adapter
from test_store_safety import assert_same_delta_w, tree

import vlora_core.io.atomic as atomic
from vlora import SharedSubspace

WORDS = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only", errno.EACCES: "no permission"}
WRITES = ("open", "write", "fsync", "replace", "mkdir")  # the calls that can fail for lack of space or rights
DRIVER = Path(__file__).with_name("disk_driver.py")
TASKS = ["sentiment", "summarization", "translation"]


@contextmanager
def failing_at(call: int | None, code: int):
    """atomic.py's view of os with its ``call``-th write operation raising OSError(code); yields the count."""
    count = [0]

    def counted(name):
        real = getattr(os, name)

        def wrapper(*args, **kwargs):
            if name == "open" and not args[1] & os.O_CREAT:
                return real(*args, **kwargs)  # opening a folder to fsync it writes nothing
            count[0] += 1
            if count[0] == call:
                raise OSError(code, os.strerror(code), str(args[0]))
            return real(*args, **kwargs)

        return wrapper

    view = SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    for name in WRITES:
        setattr(view, name, counted(name))
    real_os, atomic.os = atomic.os, view
    try:
        yield count
    finally:
        atomic.os = real_os


def holds(store: str, ids: list[str]):
    """A check that the store at ``work / store`` loads with exactly ``ids``."""

    def check(work: Path) -> None:
        assert SharedSubspace.load(work / store).task_ids == ids

    return check


SCENARIOS = {  # name -> (CLI arguments under the work folder, check of the finished write)
    "add --incremental": (
        lambda w: ["add", w / "store", w / "late", "--incremental"],
        holds("store", TASKS + ["late"]),
    ),
    "add (projected)": (lambda w: ["add", w / "store", w / "late"], holds("store", TASKS + ["late"])),
    "compress --force over a store": (
        lambda w: ["compress", w / "a", w / "b", w / "late", "-o", w / "store", "-k", "2", "--force"],
        holds("store", ["a", "b", "late"]),
    ),
    "compress into a new folder": (
        lambda w: ["compress", w / "a", w / "b", "-o", w / "new" / "store", "-k", "1"],
        holds("new/store", ["a", "b"]),
    ),
    "export into a new folder": (
        lambda w: ["export", w / "store", "sentiment", "-o", w / "new" / "out"],
        lambda w: assert_same_delta_w(w / "new" / "out", w / "store", "sentiment"),
    ),
    "export --force over an export": (
        lambda w: ["export", w / "store", "sentiment", "-o", w / "old", "--force"],
        lambda w: assert_same_delta_w(w / "old", w / "store", "sentiment"),
    ),
}


@pytest.fixture(scope="module")
def pristine(adapter_dirs, tmp_path_factory):
    """A store of three tasks, two more adapters, a late one, and an earlier export of another task."""
    root = tmp_path_factory.mktemp("disk")
    assert vlora("compress", *adapter_dirs[:3], "-o", root / "store", "-k", "2").returncode == 0
    for name, seed in (("a", 31), ("b", 32), ("late", 77)):
        write_adapter(root / name, seed)
    assert vlora("export", root / "store", "translation", "-o", root / "old").returncode == 0
    return root


def fresh(pristine: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work, symlinks=True)
    return work


def run_failing(scenario: str, work: Path, call: int | None, code: int):
    args, _ = SCENARIOS[scenario]
    with failing_at(call, code) as count:
        result = vlora(*args(work))
    return result, count[0]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_disk_full_at_every_write_leaves_everything_as_it_was(scenario, pristine, tmp_path):
    result, calls = run_failing(scenario, fresh(pristine, tmp_path), None, errno.ENOSPC)
    assert result.returncode == 0, result.stderr
    assert calls >= 4
    refused = []
    for call in range(1, calls + 1):
        work = fresh(pristine, tmp_path)
        before = tree(work)
        result, _ = run_failing(scenario, work, call, errno.ENOSPC)
        assert "Traceback" not in result.stderr
        if result.returncode == 1:
            assert WORDS[errno.ENOSPC] in result.stderr and str(work) in result.stderr, result.stderr
            assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
            assert tree(work) == before, f"write {call} of {calls}"
            refused.append(call)
        else:  # a folder sync after a rename: the write stands (a later sync covers it), with a warning
            assert result.returncode == 0 and "could not be synced" in result.stderr, result.stderr
            SCENARIOS[scenario][1](work)
    assert refused[0] == 1 and len(refused) >= 2 * calls // 3  # all but the folder syncs after a rename


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "no permission"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_read_only_or_forbidden_folder_is_one_message(scenario, code, pristine, tmp_path):
    work = fresh(pristine, tmp_path)
    before = tree(work)
    result, _ = run_failing(scenario, work, 1, code)
    assert result.returncode == 1 and WORDS[code] in result.stderr and "Traceback" not in result.stderr
    assert tree(work) == before


# ---- real file systems ----------------------------------------------------------------------------------
def _namespaces_work() -> bool:
    try:
        probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || exit 1"]
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces_work(), reason="no user/mount namespaces (unshare) here")


def in_namespace(prefix: list[str], script: str, *args) -> list[dict]:
    """Run disk_driver.py under ``prefix`` (unshare ...); its JSON lines."""
    command = [*prefix, sys.executable, str(DRIVER), script, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@needs_namespaces
def test_a_real_full_disk_at_every_size_leaves_the_store(pristine, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    shell = f'mount -t tmpfs -o size=1m tmpfs {mount} && exec "$@"'
    runs = in_namespace(["unshare", "-rm", "sh", "-c", shell, "sh"], "full", pristine, mount)
    refused = [r for r in runs if r["code"] == 1]
    added = [r for r in runs if r["code"] == 0]
    assert len(runs) >= 8 and refused and added  # the sizes span "no room at all" to "room enough"
    for run in refused:
        assert run["unchanged"] and run["loads"] == TASKS and "the disk is full" in run["stderr"], run
        assert run["lines"] == 1 and not run["traceback"]
    for run in added:
        assert run["loads"] == TASKS + ["late"], run
    assert max(r["free"] for r in refused) < min(r["free"] for r in added)  # refused below a size, whole above


@pytest.mark.slow
@needs_namespaces
def test_a_real_read_only_file_system(pristine, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    shell = f'mount -t tmpfs -o size=4m tmpfs {mount} && exec "$@"'
    runs = in_namespace(["unshare", "-rm", "sh", "-c", shell, "sh"], "read-only", pristine, mount)
    assert [r["what"] for r in runs] == [
        "add",
        "compress --force",
        "compress new",
        "export new",
        "export --force",
        "info",
    ]
    for run in runs[:-1]:
        assert run["code"] == 1 and "read-only" in run["stderr"] and run["unchanged"] and not run["traceback"], run
    assert runs[-1]["code"] == 0 and runs[-1]["unchanged"]  # reading a read-only store needs no write


@pytest.mark.slow
@needs_namespaces
def test_no_write_permission_for_an_unprivileged_user(pristine, tmp_path):
    work = fresh(pristine, tmp_path)
    for folder in (work / "store", work / "old", work):
        folder.chmod(0o555)
    try:
        runs = in_namespace(["unshare", "--user", "--map-user=1000", "--map-group=1000"], "no-permission", work)
    finally:
        for folder in (work, work / "store", work / "old"):
            folder.chmod(0o755)
    assert [r["what"] for r in runs] == [
        "add",
        "compress --force",
        "compress new",
        "export new",
        "export --force",
        "info",
    ]
    for run in runs[:-1]:
        assert run["code"] == 1 and "no permission" in run["stderr"] and run["unchanged"] and not run["traceback"], run
    assert runs[-1]["code"] == 0
