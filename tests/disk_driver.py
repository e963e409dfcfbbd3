"""vlora against a real full, read-only or forbidden file system; run by test_disk_errors.py inside namespaces.

    python disk_driver.py full PRISTINE MOUNT        MOUNT: an empty 1 MiB tmpfs
    python disk_driver.py read-only PRISTINE MOUNT   MOUNT: an empty tmpfs, remounted read-only here
    python disk_driver.py no-permission WORK         WORK, WORK/store and WORK/old not writable by this user

PRISTINE (and WORK) hold a store of three tasks, adapters a, b and late, and an export in old/. Prints one JSON
line per attempt: what was run, its exit code, its stderr, whether the watched folder is byte for byte as it
was, and (for ``full``) the free bytes it had and the task ids the store loads with afterwards.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def tree(folder: Path) -> dict:
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top) / name
            out[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else "folder"
    return out


def vlora(*args) -> tuple[int, str]:
    from vlora_core.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def attempt(what: str, args: list, watched: Path, **extra) -> dict:
    before = tree(watched)
    code, err = vlora(*args)
    errors = [line for line in err.splitlines() if "error:" in line]
    return {
        "what": what,
        "code": code,
        "stderr": err[-600:],
        "lines": len(errors),
        "traceback": "Traceback" in err,
        "unchanged": tree(watched) == before,
        **extra,
    }


def task_ids(store: Path):
    from vlora import SharedSubspace, VLoRAError

    try:
        return SharedSubspace.load(store).task_ids
    except VLoRAError as error:
        return str(error)


def full(pristine: Path, mount: Path) -> None:
    """`vlora add --incremental` with 0, 4, 8, ... KiB free: refused whole below what it needs, done above."""
    store = mount / "store"
    shutil.copytree(pristine / "late", mount / "late")
    for free in range(0, 80 * 1024, 4096):  # tmpfs counts whole 4 KiB pages
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(pristine / "store", store)
        stat = os.statvfs(mount)
        with open(mount / "filler", "wb") as filler:
            filler.write(b"\0" * (stat.f_bavail * stat.f_frsize - free))
        run = attempt("add", ["add", store, mount / "late", "--incremental"], store, free=free)
        print(json.dumps(run | {"loads": task_ids(store)}), flush=True)
        (mount / "filler").unlink()


def everything(root: Path, watched: Path, old: Path) -> None:
    """Each command that writes, then a read, against ``root``'s store, adapters and earlier export."""
    store = root / "store"
    runs = [
        ("add", ["add", store, root / "late", "--incremental"]),
        ("compress --force", ["compress", root / "a", root / "b", root / "late", "-o", store, "-k", "2", "--force"]),
        ("compress new", ["compress", root / "a", root / "b", "-o", root / "new", "-k", "1"]),
        ("export new", ["export", store, "sentiment", "-o", root / "out"]),
        ("export --force", ["export", store, "sentiment", "-o", old, "--force"]),
        ("info", ["info", store]),
    ]
    for what, args in runs:
        print(json.dumps(attempt(what, args, watched)), flush=True)


def main() -> None:
    kind, *paths = sys.argv[1:]
    if kind == "full":
        full(Path(paths[0]), Path(paths[1]))
    elif kind == "read-only":
        pristine, mount = map(Path, paths)
        for name in os.listdir(pristine):
            copy = shutil.copytree if (pristine / name).is_dir() else shutil.copy2
            copy(pristine / name, mount / name)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        everything(mount, mount, mount / "old")
    elif kind == "no-permission":
        work = Path(paths[0])
        everything(work, work, work / "old")


if __name__ == "__main__":
    main()
