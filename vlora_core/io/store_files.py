"""The store on disk: a JSON manifest plus content-addressed safetensors files.

    STORE/manifest.json                 format, version, method, layers, tasks (ids, configs), checksums
    STORE/basis-<sha256[:16]>.safetensors      "<layer index>.<side>.components|spectrum|mean"
    STORE/task-<sha256[:16]>.safetensors       "<layer index>.<side>" loadings, "extra.<key>" tensors

Task ids live only inside the manifest, never in file names. A save writes the new data files first,
then replaces manifest.json atomically, then removes files no manifest refers to: a reader (or a crash
at any moment) sees the old store or the new one, whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..basis import Basis
from ..constants import SIDES, STORE_FORMAT, STORE_FORMAT_VERSION, STORE_MANIFEST
from ..errors import StoreError
from ..records import LayerShape, Task
from .atomic import fsync_path, write_bytes_atomic, write_json_atomic

_DATA_PREFIXES = ("basis-", "task-")
# One key only: safetensors writes metadata in hash-map order, and a store file's name is its content hash.
_METADATA = {"producer": f"{STORE_FORMAT}/{STORE_FORMAT_VERSION}"}


Bases = dict[str, dict[str, Basis]]  # layer -> side -> Basis
Store = tuple[str, dict[str, LayerShape], Bases, dict[str, Task], "int | None"]  # method, shapes, bases, tasks, k


def save_store(
    path: str | Path,
    method: str,
    shapes: dict[str, LayerShape],
    bases: Bases,
    tasks: dict[str, Task],
    k_requested: int | None,
) -> Path:
    """Write a store's pieces to the folder ``path``; see the module's docstring for the order of writes."""
    folder = Path(path)
    _check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    checksums = {}
    basis_file = _write_data(folder, "basis", _basis_tensors(bases, names), checksums)
    entries = []
    for task in tasks.values():
        file = _write_data(folder, "task", _task_tensors(task, names), checksums)
        entries.append(
            {
                "id": task.id,
                "file": file,
                "source": task.source,
                "dtype": task.dtype,
                "config": task.config,
                "extras": list(task.extras),
                "quality": {n: list(task.errors[n]) for n in names if n in task.errors},
            }
        )
    manifest = {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "method": method,
        "k_requested": k_requested,
        "layers": [{"name": n, "d_in": s.d_in, "d_out": s.d_out, "rank": s.rank} for n, s in shapes.items()],
        "basis_file": basis_file,
        "tasks": entries,
        "checksums": checksums,
    }
    write_json_atomic(folder / STORE_MANIFEST, manifest)
    _remove_unreferenced(folder, set(checksums))
    return folder


def load_store(path: str | Path) -> Store:
    """The pieces of the store at ``path``: method, shapes, bases, tasks, k_requested."""
    folder = Path(path)
    manifest = read_manifest(folder)
    problems = verify_files(folder, manifest)
    if problems:
        raise StoreError(
            f"{folder}: the store is damaged: {'; '.join(problems)}. Restore it from a copy or rebuild it."
        )
    try:
        return _build(folder, manifest)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise StoreError(
            f"{folder}: the store's files do not match its manifest ({error}); rebuild the store."
        ) from None


def read_manifest(folder: Path) -> dict:
    path = folder / STORE_MANIFEST
    if not folder.is_dir():
        raise StoreError(f"{folder}: no such folder; pass a store made by `vlora compress`.")
    if not path.is_file():
        raise StoreError(f"{folder}: not a vlora store (no {STORE_MANIFEST}); make one with `vlora compress`.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{path}: damaged manifest ({error}); restore the store from a copy or rebuild it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a vlora store manifest; make one with `vlora compress`.")
    if manifest.get("format_version") != STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {manifest.get('format_version')!r}, this vlora reads "
            f"version {STORE_FORMAT_VERSION}; upgrade vlora or rebuild the store."
        )
    return manifest


def verify_files(folder: Path, manifest: dict) -> list[str]:
    """Every problem with the data files: missing, or not matching their recorded checksum."""
    problems = []
    for name, digest in manifest.get("checksums", {}).items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def _check_writable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder}: exists and is not a folder; choose another output path.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / STORE_MANIFEST).is_file():
        raise StoreError(
            f"{folder}: folder is not empty and not a vlora store; refusing to write into it — "
            "choose a new or empty folder."
        )


def _write_data(folder: Path, kind: str, tensors: dict[str, torch.Tensor], checksums: dict) -> str:
    data = save_bytes(tensors, metadata=_METADATA)
    digest = hashlib.sha256(data).hexdigest()
    name = f"{kind}-{digest[:16]}.safetensors"
    if not (folder / name).is_file() or hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
        write_bytes_atomic(folder / name, data)
    checksums[name] = digest
    return name


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    for file in folder.iterdir():
        if file.name.startswith(_DATA_PREFIXES) and file.name not in keep:
            file.unlink(missing_ok=True)
    fsync_path(folder)


def _basis_tensors(bases: Bases, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for i, name in enumerate(names):
        for side in SIDES:
            basis = bases[name][side]
            out[f"{i}.{side}.components"] = basis.components.contiguous()
            out[f"{i}.{side}.spectrum"] = basis.spectrum.contiguous()
            if basis.mean is not None:
                out[f"{i}.{side}.mean"] = basis.mean.contiguous()
    return out


def _task_tensors(task: Task, names: list[str]) -> dict[str, torch.Tensor]:
    out = {f"{i}.{side}": task.loadings[name][side].contiguous() for i, name in enumerate(names) for side in SIDES}
    out.update({f"extra.{key}": t.contiguous() for key, t in task.extras.items()})
    return out


def _read_data(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_bytes((folder / name).read_bytes())
    except (SafetensorError, OSError) as error:
        raise StoreError(
            f"{folder / name}: unreadable ({error}); restore the store from a copy or rebuild it."
        ) from None


def _build(folder: Path, manifest: dict) -> Store:
    layers = manifest["layers"]
    shapes = {l["name"]: LayerShape(int(l["d_in"]), int(l["d_out"]), int(l["rank"])) for l in layers}
    names = list(shapes)
    raw = _read_data(folder, manifest["basis_file"])
    bases = {
        name: {
            side: Basis(raw[f"{i}.{side}.components"], raw[f"{i}.{side}.spectrum"], raw.get(f"{i}.{side}.mean"))
            for side in SIDES
        }
        for i, name in enumerate(names)
    }
    tasks = {}
    for entry in manifest["tasks"]:
        data = _read_data(folder, entry["file"])
        loadings = {name: {side: data[f"{i}.{side}"] for side in SIDES} for i, name in enumerate(names)}
        extras = {key: data[f"extra.{key}"] for key in entry.get("extras", [])}
        errors = {n: tuple(v) for n, v in entry.get("quality", {}).items()}
        tasks[entry["id"]] = Task(
            entry["id"],
            loadings,
            entry["config"],
            extras,
            entry.get("source", ""),
            entry.get("dtype", "float32"),
            errors,
        )
    return manifest["method"], shapes, bases, tasks, manifest.get("k_requested")
