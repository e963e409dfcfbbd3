"""The store on disk: a JSON manifest plus content-addressed safetensors files.

    STORE/manifest.json                 format, version, generation, method, layers, tasks, checksums, its own checksum
                                        (and, for an activation-aware fit, its calibration: vlora_core.calibration)
    STORE/basis-<sha256[:16]>.safetensors      "<layer index>.<side>.components|spectrum|mean|energy"
    STORE/task-<sha256[:16]>.safetensors       "<layer index>.<side>" loadings, "extra.<key>" tensors

Components, means and loadings are written in the store's precision (the manifest's "storage": float32,
bfloat16, float16, or int8 with a bfloat16 "<key>.scale" per block of a row's numbers, ``vlora_core.precision``;
one per row in stores written before) and read back as float32; singular values (float32) and energies (float64)
are written as they are.
    STORE/.vlora.lock                   held by a writer (filelock) for the whole save

Task ids live only inside the manifest, never in file names. A save, under the lock, re-reads the manifest
(refusing if the store moved on since this subspace was loaded, so no other writer's task is ever lost),
writes the new data files, replaces manifest.json atomically with the next generation, then removes files
that neither the new nor the previous generation refers to: a reader that has just read the previous
manifest still finds its files, and a crash at any moment leaves the old store or the new one, whole. A
save that fails (disk full, read-only, no permission) removes what it wrote: the old store stays byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..basis import Basis
from ..constants import SIDES, STORE_FORMAT, STORE_FORMAT_VERSION, STORE_LOCK, STORE_MANIFEST, int8_scale_shapes
from ..errors import StoreError, short_list
from ..methods import get_method
from ..precision import SCALE, Precision, get_precision
from ..records import LayerShape, Task
from . import manifest as schema
from .atomic import (
    disk_problem,
    is_leftover,
    make_folders,
    remove_empty_folders,
    remove_quietly,
    sync_written,
    write_bytes_atomic,
)
from .manifest import damaged, disk_bytes, read_manifest, verify_files  # noqa: F401  (torch-free, re-exported)
from .outputs import check_path, enclosing_store

_DATA_PREFIXES = ("basis-", "task-")
# One key only: safetensors writes metadata in hash-map order, and a store file's name is its content hash.
_METADATA = {"producer": f"{STORE_FORMAT}/{STORE_FORMAT_VERSION}"}
LOCK_TIMEOUT_S = 60.0  # how long a writer waits for another one before saying the store is busy
READ_TRIES = 5  # a load whose files a writer removed meanwhile starts again from the new manifest

Bases = dict[str, dict[str, Basis]]  # layer -> side -> Basis
# method, shapes, bases, tasks, k_requested, dtype, calibration (None: a plain fit), generation
Store = tuple[str, dict[str, LayerShape], Bases, dict[str, Task], "int | None", str, "dict | None", int]


# ---- writing ------------------------------------------------------------------------------------------
def save_store(
    path: str | Path,
    method: str,
    shapes: dict[str, LayerShape],
    bases: Bases,
    tasks: dict[str, Task],
    k_requested: int | None,
    *,
    dtype: str = "float32",
    calibration: dict | None = None,
    loaded_generation: int | None = None,
    force: bool = False,
) -> int:
    """Write a store's pieces to the folder ``path``; returns the generation written.

    Over an existing store only if this is the store it was loaded from, still at ``loaded_generation``
    (or with ``force``): anything else would replace tasks the caller never saw.
    """
    folder = Path(path)
    _check_target(folder, loaded_generation, force)  # before the lock file is made: never in a foreign folder
    existed = (folder / STORE_MANIFEST).is_file()
    with _write_errors(folder, existed):
        made = make_folders(folder)
    try:
        pieces = (method, shapes, bases, tasks, k_requested, get_precision(dtype), calibration)
        return _save_locked(folder, pieces, loaded_generation, force, existed)
    except BaseException:
        if made:  # a new store that could not be written leaves no folder (nor lock file) behind
            remove_quietly(folder / STORE_LOCK)
            remove_empty_folders(made)
        raise


def _save_locked(folder: Path, pieces: tuple, loaded_generation: int | None, force: bool, existed: bool) -> int:
    """``save_store`` under the writer lock: check the target again, write, clean up."""
    with store_lock(folder, creating=True), _write_errors(folder, existed):
        previous = _check_target(folder, loaded_generation, force)
        folder.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in folder.iterdir()}
        try:
            manifest = _write_all(folder, *pieces, previous)
        except BaseException:
            for file in folder.iterdir():  # what this save wrote goes; the old store stays as it was
                if file.name not in before:
                    file.unlink(missing_ok=True)
            raise
        keep = set(manifest["checksums"]) | set((previous or {}).get("checksums", {}))
        _remove_unreferenced(folder, keep)
        if force and previous is not None and previous["generation"] != loaded_generation:  # another store replaced
            tasks = pieces[3]  # save_store's order: method, shapes, bases, tasks, ...
            dropped = [t["id"] for t in previous["tasks"] if t["id"] not in tasks]
            if dropped:
                logging.getLogger("vlora").warning(
                    "%s: replaced a store of %d tasks (--force); not in the new one: %s",
                    folder,
                    len(previous["tasks"]),
                    short_list([repr(i) for i in dropped], limit=10),
                )
        return manifest["generation"]


def _write_all(folder, method, shapes, bases, tasks, k_requested, precision: Precision, calibration, previous) -> dict:
    names = list(shapes)
    checksums = {}
    basis_file = _write_data(folder, "basis", _basis_tensors(bases, names, precision), checksums)
    entries = []
    for task in tasks.values():
        file = _write_data(folder, "task", _task_tensors(task, names, precision), checksums)
        entries.append(
            {
                "id": task.id,
                "file": file,
                "source": task.source,
                "dtype": task.dtype,
                "config": task.config,
                "extras": list(task.extras),
                "quality": {n: list(task.errors[n]) for n in names if _known(task.errors.get(n))},
            }
        )
        activation = {n: list(task.act_errors[n]) for n in names if _known(task.act_errors.get(n))}
        if activation:  # a calibrated fit's activation-weighted errors (absent from plain stores)
            entries[-1]["quality_activation"] = activation
    manifest = schema.seal(
        {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "generation": (previous or {}).get("generation", 0) + 1,
            "method": method,
            "k_requested": k_requested,
            "storage": precision.name,
            **({} if calibration is None else {"calibration": calibration}),
            "layers": [_layer_entry(n, s, bases[n]) for n, s in shapes.items()],
            "basis_file": basis_file,
            "tasks": entries,
            "checksums": checksums,
        }
    )
    data = (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    write_bytes_atomic(folder / STORE_MANIFEST, data)
    return manifest


def _layer_entry(name: str, shape: LayerShape, sides: dict[str, Basis]) -> dict:
    """A layer in the manifest: its shape, and each side's variance explained (so `vlora info` needs no torch)."""
    variance = [sides[side].variance_explained() for side in SIDES]
    return {"name": name, "d_in": shape.d_in, "d_out": shape.d_out, "rank": shape.rank, "variance_explained": variance}


def _known(pair) -> bool:
    return pair is not None and all(math.isfinite(v) for v in pair)


def _check_target(folder: Path, loaded_generation: int | None, force: bool) -> dict | None:
    """The store now at ``folder`` (None if there is none), once it is safe to write over it."""
    check_path(folder)
    outer = enclosing_store(folder.parent)
    if outer is not None:
        raise StoreError(
            f"{folder}: is inside the store {outer}; a store holds only its own files — write the new store outside it."
        )
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder}: exists and is not a folder; choose another output path.")
    if not folder.is_dir() or not any(p.name != STORE_LOCK for p in folder.iterdir()):
        return None
    if not (folder / STORE_MANIFEST).is_file():
        raise StoreError(
            f"{folder}: folder is not empty and not a vlora store; refusing to write into it — "
            "choose a new or empty folder."
        )
    try:
        current = read_manifest(folder)
    except StoreError:
        if force:
            return None
        raise
    if force or current["generation"] == loaded_generation:
        return current
    ids = ", ".join(repr(t["id"]) for t in current["tasks"][:5]) + (" ..." if len(current["tasks"]) > 5 else "")
    if loaded_generation is None:
        raise StoreError(
            f"{folder}: already holds a vlora store ({len(current['tasks'])} tasks: {ids}); refusing to replace it "
            "— choose another folder, or pass --force (force=True) to replace it."
        )
    raise StoreError(
        f"{folder}: the store changed since it was loaded (generation {loaded_generation} -> "
        f"{current['generation']}, another writer); load it again and redo the change, so that no task is lost."
    )


@contextmanager
def store_lock(folder: Path, timeout: float = LOCK_TIMEOUT_S, *, creating: bool = False):
    """Hold the store's writer lock for the block (re-entrant within one process). The folder must hold a store
    (its lock file is never made anywhere else) unless ``creating`` one in it (``save_store`` checked it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"{folder}: no such folder; pass a store made by `vlora compress`.")
    if not creating and not (folder / STORE_MANIFEST).is_file():
        raise StoreError(f"{folder}: not a vlora store (no {STORE_MANIFEST}); make one with `vlora compress`.")
    lock = FileLock(folder.resolve() / STORE_LOCK, timeout=timeout, is_singleton=True)  # one per file: re-entrant
    try:
        lock.acquire()
    except Timeout:
        raise StoreError(
            f"{folder}: the store is busy (another vlora is writing it) and stayed busy for {timeout:.0f} s; "
            "try again when it has finished."
        ) from None
    except OSError as error:  # the lock file cannot be made: a read-only store, no permission, a full disk
        raise StoreError(
            f"{folder}: cannot take the store's writer lock: {disk_problem(error)}; the store was left as it was."
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _write_errors(folder: Path, existed: bool = True):
    """An OSError while writing becomes a StoreError that says what the machine refused and what to do."""
    try:
        yield
    except OSError as error:
        left = "the store was left as it was" if existed else "no store was written"
        raise StoreError(f"{folder}: cannot write the store: {disk_problem(error)}; {left}.") from None


# ---- reading ------------------------------------------------------------------------------------------
def load_store(path: str | Path) -> Store:
    """The pieces of the store at ``path``: method, shapes, bases, tasks, k_requested, dtype, calibration, generation.

    A writer may replace the manifest while this reads: if files of the manifest read have gone since,
    the load starts again from the new manifest, so a reader always gets one whole generation.
    """
    folder = Path(path)
    for attempt in range(READ_TRIES):
        manifest = read_manifest(folder)
        problems = verify_files(folder, manifest)
        if not problems:
            try:
                return _build(folder, manifest)
            except _Vanished:
                problems = ["a data file vanished while reading"]
        if attempt + 1 < READ_TRIES and _moved_on(folder, manifest):
            continue
        raise damaged(folder, problems)
    raise AssertionError("unreachable")


def _moved_on(folder: Path, manifest: dict) -> bool:
    try:
        return read_manifest(folder)["generation"] != manifest["generation"]
    except StoreError:
        return False


class _Vanished(Exception):
    """A data file that verified a moment ago is gone: a writer has moved the store on."""


def _write_data(folder: Path, kind: str, tensors: dict[str, torch.Tensor], checksums: dict) -> str:
    data = save_bytes(tensors, metadata=_METADATA)
    digest = hashlib.sha256(data).hexdigest()
    name = f"{kind}-{digest[:16]}.safetensors"
    if not (folder / name).is_file() or hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
        write_bytes_atomic(folder / name, data)
    checksums[name] = digest
    return name


def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Once the new manifest is in place: remove the data files no kept generation names, and temp files a crash
    left. A failure here only leaves unused files for the next save to remove; it does not make the save fail."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return
    for name in names:
        if (name.startswith(_DATA_PREFIXES) and name not in keep) or is_leftover(name):
            remove_quietly(folder / name)
    sync_written(folder)


def _encoded(key: str, t: torch.Tensor, precision: Precision) -> dict[str, torch.Tensor]:
    """``t`` as ``precision`` writes it: key -> values (and key.scale -> int8 scales)."""
    return {key + suffix: part for suffix, part in precision.encode(t.detach()).items()}


def _basis_tensors(bases: Bases, names: list[str], precision: Precision) -> dict[str, torch.Tensor]:
    out = {}
    for i, name in enumerate(names):
        for side in SIDES:
            basis = bases[name][side]
            out.update(_encoded(f"{i}.{side}.components", basis.components, precision))
            out[f"{i}.{side}.spectrum"] = basis.spectrum.contiguous()
            if basis.mean is not None:
                out.update(_encoded(f"{i}.{side}.mean", basis.mean, precision))
            if basis.energy is not None:  # the spectrum lists only the leading values
                out[f"{i}.{side}.energy"] = torch.tensor([basis.energy], dtype=torch.float64)
    return out


def _task_tensors(task: Task, names: list[str], precision: Precision) -> dict[str, torch.Tensor]:
    out = {}
    for i, name in enumerate(names):
        for side in SIDES:
            out.update(_encoded(f"{i}.{side}", task.loadings[name][side], precision))
    out.update({f"extra.{key}": t.contiguous() for key, t in task.extras.items()})
    return out


def _read_data(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_bytes((folder / name).read_bytes())
    except FileNotFoundError:
        raise _Vanished(name) from None
    except (SafetensorError, OSError) as error:
        raise StoreError(
            f"{folder / name}: unreadable ({error}); restore the store from a copy or rebuild it."
        ) from None


def _build(folder: Path, manifest: dict) -> Store:
    """The pieces, every tensor checked against the manifest's shapes (and finite) before it is used."""
    method = get_method(manifest["method"])
    precision = get_precision(manifest.get("storage", "float32"))
    shapes = {l["name"]: LayerShape(l["d_in"], l["d_out"], l["rank"]) for l in manifest["layers"]}
    raw = _decoded(_read_data(folder, manifest["basis_file"]), precision, manifest["basis_file"])
    bases, ks = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        bases[name] = {}
        for side in SIDES:
            d, r = shape.dim(side), shape.rank
            D = method.to_vectors(torch.empty(1, d, r, device="meta")).shape[2]  # one vector's length (no memory)
            where = f"{manifest['basis_file']} layer {name} side {side}"
            components = _tensor(
                raw, f"{i}.{side}.components", where, lambda t, D=D: t.dim() == 2 and t.shape[0] <= D == t.shape[1]
            )
            spectrum = _tensor(raw, f"{i}.{side}.spectrum", where, lambda t: t.dim() == 1 and bool((t >= 0).all()))
            mean = _tensor(raw, f"{i}.{side}.mean", where, lambda t, D=D: t.shape == (D,)) if method.centre else None
            bases[name][side] = Basis(components, spectrum, mean, _energy(raw, f"{i}.{side}.energy", where, spectrum))
            ks[name, side] = (method.vectors_per_factor(d, r), components.shape[0])
    tasks = {}
    for entry in manifest["tasks"]:
        data = _decoded(_read_data(folder, entry["file"]), precision, entry["file"])
        loadings = {
            name: {
                side: _tensor(
                    data,
                    f"{i}.{side}",
                    f"{entry['file']} ({entry['id']!r}) layer {name}",
                    lambda t, gk=ks[name, side]: tuple(t.shape) == gk,
                )
                for side in SIDES
            }
            for i, name in enumerate(shapes)
        }
        extras = {key: _tensor(data, f"extra.{key}", entry["file"], None) for key in entry.get("extras", [])}
        errors = {n: tuple(v) for n, v in entry.get("quality", {}).items()}
        activation = {n: tuple(v) for n, v in entry.get("quality_activation", {}).items()}
        tasks[entry["id"]] = Task(
            entry["id"], loadings, entry["config"], extras, entry.get("source", ""), entry["dtype"], errors, activation
        )
    k_requested, generation = manifest.get("k_requested"), manifest["generation"]
    calibration = manifest.get("calibration")
    return manifest["method"], shapes, bases, tasks, k_requested, precision.name, calibration, generation


def _decoded(data: dict[str, torch.Tensor], precision: Precision, file: str) -> dict[str, torch.Tensor]:
    """A data file's tensors with every stored component, mean and loading back in float32 (extras, singular
    values and energies as written); a tensor not in the store's precision is a StoreError naming it."""
    out = {}
    for key, t in data.items():
        if key.endswith(SCALE) or key.startswith("extra.") or key.endswith((".spectrum", ".energy")):
            out[key] = t
            continue
        parts = {"": t, SCALE: data.get(key + SCALE)} if precision.name == "int8" else {"": t}
        dtypes = tuple(None if p is None else p.dtype for p in parts.values())
        if dtypes != precision.stored_dtypes or (
            SCALE in parts and parts[SCALE].shape not in int8_scale_shapes(t.shape)
        ):
            raise StoreError(
                f"{file}: tensor {key!r} is not stored as {precision.name} (the manifest's storage); rebuild the store."
            )
        out[key] = precision.decode(parts)
    return out


def _energy(data: dict, key: str, where: str, spectrum: torch.Tensor) -> float | None:
    """The whole spectrum's energy where the store lists only leading singular values (None: it lists all)."""
    t = data.get(key)
    if t is None:
        return None
    listed = float(spectrum.double().pow(2).sum())
    ok = t.dtype == torch.float64 and t.shape == (1,) and bool(torch.isfinite(t).all())
    if not ok or not t.item() >= listed * (1 - 1e-6):
        raise StoreError(
            f"{where}: tensor {key!r} is not the spectrum's energy (one float64 >= Σ s²); rebuild the store."
        )
    return t.item()


def _tensor(data: dict, key: str, where: str, fits) -> torch.Tensor:
    """``data[key]``, a finite float32 tensor that ``fits`` (any finite tensor if ``fits`` is None);
    else a StoreError naming it."""
    t = data.get(key)
    ok = isinstance(t, torch.Tensor) and (fits is None or (t.dtype == torch.float32 and fits(t)))
    if not ok or not torch.isfinite(t).all():
        problem = "is missing" if t is None else f"has shape {tuple(t.shape)} / {t.dtype} or non-finite values"
        raise StoreError(f"{where}: tensor {key!r} {problem}, not what the manifest says; rebuild the store.")
    return t
