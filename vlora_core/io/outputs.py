"""Where an export may write: never over anything vlora did not write.

An exported adapter folder is recognised by the mark ``save_adapter`` puts in its weights' safetensors
metadata ("producer": "vlora-export/1") and by holding nothing but the two PEFT files (and leftovers of an
interrupted write); a one-file export (a llama.cpp .gguf adapter) by the same mark in its own metadata. A
target is refused when it is a file, a store or a folder inside one, or a non-empty folder that is not such an
export; an export is replaced only when asked (``force``, CLI ``--force``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_PRODUCER, STORE_FORMAT, STORE_MANIFEST
from ..errors import StoreError, short_list
from .atomic import is_leftover

EXPORT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
EXPORT_METADATA = {"format": "pt", "producer": f"{EXPORT_PRODUCER}/1"}  # PEFT's own key, and vlora's mark
_MANIFEST_HEAD = 4096  # bytes of a manifest.json read to tell a vlora store from any other


def check_export_target(path: str | Path, force: bool = False) -> None:
    """Raise a StoreError unless an adapter folder may be written at ``path``: new, empty, or (with
    ``force``) a vlora export."""
    target = Path(path)
    _check_outside_stores(target)
    if not target.is_dir():
        if target.exists() or target.is_symlink():
            raise StoreError(f"{target}: exists and is not a folder; choose a new folder to export into.")
        return
    entries = _entries(target)
    if not entries:
        return
    foreign = [name for name in entries if name not in EXPORT_FILES and not is_leftover(name)]
    if foreign or not is_export(target):
        raise StoreError(
            f"{target}: not empty and not written by vlora export (holds {short_list(sorted(foreign or entries))}); "
            "refusing to replace it — choose a new or empty folder (or remove it yourself)."
        )
    if not force:
        raise StoreError(
            f"{target}: already holds a vlora export; pass --force (force=True) to replace it, "
            "or choose another folder."
        )


def check_export_file(path: str | Path, force: bool, is_ours) -> None:
    """Raise a StoreError unless a one-file export (a .gguf adapter) may be written at ``path``: new, or (with
    ``force``) a file ``is_ours(path)`` recognises as vlora's; never a folder, a link, or a path inside a store."""
    target = Path(path)
    _check_outside_stores(target)
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_file():
        raise StoreError(f"{target}: exists and is not a plain file; choose a new file name to export into.")
    if not is_ours(target):
        raise StoreError(
            f"{target}: exists and was not written by vlora export; refusing to replace it — choose a new file "
            "name (or remove it yourself)."
        )
    if not force:
        raise StoreError(f"{target}: already holds a vlora export; pass --force (force=True) to replace it.")


def check_export_root(path: str | Path) -> None:
    """``path`` may hold one exported folder per task (``export_all``): a folder or a new path, outside stores."""
    root = Path(path)
    _check_outside_stores(root)
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        raise StoreError(f"{root}: exists and is not a folder; choose a folder to export the tasks into.")


def is_export(folder: Path) -> bool:
    """Whether ``folder``'s weights carry the mark of a vlora export."""
    if not (folder / ADAPTER_WEIGHTS).is_file():  # a FIFO of that name would block the read
        return False
    try:
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as weights:
            producer = (weights.metadata() or {}).get("producer", "")
    except (SafetensorError, OSError, ValueError):
        return False
    return producer.startswith(f"{EXPORT_PRODUCER}/")


def enclosing_store(path: str | Path) -> Path | None:
    """The vlora store ``path`` is, or lies inside (following links), if any."""
    real = Path(path).resolve()
    for folder in (real, *real.parents):
        if _is_store(folder):
            return folder
    return None


def check_path(target: Path) -> None:
    """A path vlora can make: no NUL character, and no file where one of its folders should be."""
    if "\0" in str(target):
        raise StoreError(f"{str(target)!r}: a path cannot hold a NUL character; choose another path.")
    for parent in Path(os.path.abspath(target)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"{target}: {parent} is a file, not a folder; choose another path.")
            return


def _check_outside_stores(target: Path) -> None:
    check_path(target)
    store = enclosing_store(target)
    if store is not None:
        where = "is the store" if store == target.resolve() else f"is inside the store {store}"
        raise StoreError(f"{target}: {where}; a store holds only its own files — export to a folder outside it.")


def _is_store(folder: Path) -> bool:
    """A folder holding a vlora manifest (read no further than its head: any manifest.json may be large)."""
    if not (folder / STORE_MANIFEST).is_file():
        return False
    try:
        with open(folder / STORE_MANIFEST, "rb") as file:
            head = file.read(_MANIFEST_HEAD).decode("utf-8", errors="replace")
    except OSError:
        return False
    return json.dumps(STORE_FORMAT) in head


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError as error:
        raise StoreError(f"{folder}: cannot be listed ({error.strerror}); choose a folder you can read.") from None
