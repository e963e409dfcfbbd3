"""manifest.json of a store: its schema, and a checksum of its own.

Nothing in a manifest is trusted as written: ``check`` validates every field a load uses (types, ranges,
unique ids, known method and dtype, files that the checksums list) and ``seal``/``unseal`` keep a SHA-256 of
the manifest's own canonical JSON in it, so one changed digit is found before anything is read. Torch-free:
``vlora info`` reads a store through here (and the data files' checksums) without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

from ..constants import READABLE_STORE_VERSIONS, STORE_FORMAT, STORE_MANIFEST
from ..errors import StoreError, VLoRAError, check_task_id
from ..options import BASIS_METHODS
from ..options import STORAGE as PRECISIONS

SEAL = "manifest_sha256"  # the key holding the checksum of everything else in the manifest
DTYPES = {"float32", "float16", "bfloat16", "float64"}  # the original adapters' dtypes a store records
_DATA_FILE = re.compile(r"(basis|task)-[0-9a-f]{16}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def seal(manifest: dict) -> dict:
    """The manifest with its own checksum added."""
    body = {key: value for key, value in manifest.items() if key != SEAL}
    return body | {SEAL: _digest(body)}


def unseal(manifest: dict, path) -> dict:
    """Check the manifest's own checksum; raises StoreError naming ``path`` if it does not match."""
    if manifest.get(SEAL) != _digest({key: value for key, value in manifest.items() if key != SEAL}):
        raise StoreError(
            f"{path}: the manifest does not match its own checksum (edited or damaged); "
            "restore the store from a copy or rebuild it with `vlora compress`."
        )
    return manifest


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True, allow_nan=False).encode()).hexdigest()


def check(manifest: dict, path) -> None:
    """Every field a load relies on, with the right type and range; raises StoreError naming the field."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise StoreError(f"{path}: {what}; restore the store from a copy or rebuild it with `vlora compress`.")

    need(manifest.get("format") == STORE_FORMAT, "not a vlora store manifest")
    need(
        manifest.get("format_version") in READABLE_STORE_VERSIONS,
        f"format_version is not one of {', '.join(map(str, READABLE_STORE_VERSIONS))}",
    )
    need(manifest.get("method") in _known_methods(), f"unknown method {manifest.get('method')!r}")
    need(_whole(manifest.get("generation"), 0), "generation must be a whole number >= 0")
    need(manifest.get("k_requested") is None or _whole(manifest["k_requested"], 1), "k_requested must be >= 1")
    storage = manifest.get("storage", "float32")
    need(storage in PRECISIONS, f"storage {storage!r} is not one of {sorted(PRECISIONS)}")
    calibration = manifest.get("calibration")
    if calibration is not None:
        _check_calibration(calibration, need)
    checksums = manifest.get("checksums")
    need(isinstance(checksums, dict) and bool(checksums), "checksums must list the data files")
    for name, digest in checksums.items():
        need(isinstance(name, str) and bool(_DATA_FILE.fullmatch(name)), f"data file name {name!r} is not vlora's")
        need(isinstance(digest, str) and bool(_SHA256.fullmatch(digest)), f"checksum of {name} is not a SHA-256")
    layers = manifest.get("layers")
    need(isinstance(layers, list) and bool(layers), "layers must be a non-empty list")
    for layer in layers:
        need(
            isinstance(layer, dict) and isinstance(layer.get("name"), str) and bool(layer["name"]),
            "a layer has no name",
        )
        for key in ("d_in", "d_out", "rank"):
            need(_whole(layer.get(key), 1), f"layer {layer['name']!r}: {key} must be a whole number >= 1")
        need(layer["rank"] <= min(layer["d_in"], layer["d_out"]), f"layer {layer['name']!r}: rank exceeds its dims")
        variance = layer.get("variance_explained", [0.0, 0.0])  # format 3 stores written before it have none
        need(
            isinstance(variance, list) and len(variance) == 2 and all(_number(v) and 0 <= v <= 1 for v in variance),
            f"layer {layer['name']!r}: variance_explained must be [A, B], two numbers in [0, 1]",
        )
    need(len({layer["name"] for layer in layers}) == len(layers), "a layer name appears twice")
    need(manifest.get("basis_file") in checksums, "basis_file is not among the checksummed files")
    tasks = manifest.get("tasks")
    need(isinstance(tasks, list) and bool(tasks), "tasks must be a non-empty list")
    names = {layer["name"] for layer in layers}
    for entry in tasks:
        need(isinstance(entry, dict), "a task entry is not an object")
        try:
            check_task_id(entry.get("id"))
        except VLoRAError as error:
            need(False, str(error).rstrip("."))
        where = f"task {entry['id']!r}"
        need(entry.get("file") in checksums and entry["file"].startswith("task-"), f"{where}: file is not checksummed")
        need(entry.get("dtype") in DTYPES, f"{where}: dtype {entry.get('dtype')!r} is not one of {sorted(DTYPES)}")
        need(isinstance(entry.get("config"), dict), f"{where}: config must be an object")
        need(isinstance(entry.get("source", ""), str), f"{where}: source must be text")
        extras = entry.get("extras", [])
        need(isinstance(extras, list) and all(isinstance(k, str) for k in extras), f"{where}: extras must be names")
        for key in ("quality", "quality_activation"):  # ΔW errors; a calibrated fit's activation-weighted ones
            quality = entry.get(key, {})
            need(isinstance(quality, dict) and set(quality) <= names, f"{where}: {key} names unknown layers")
            for value in quality.values():
                need(
                    isinstance(value, list) and len(value) == 2 and all(_number(v) and v >= 0 for v in value),
                    f"{where}: each {key} entry must be [error, norm], two numbers >= 0",
                )
    need(len({entry["id"] for entry in tasks}) == len(tasks), "a task id appears twice")


def _check_calibration(calibration, need) -> None:
    """What an activation-aware fit records (vlora_core.calibration): prompt file, its SHA-256, counts, model, λ."""
    need(isinstance(calibration, dict), "calibration must be an object")
    need(isinstance(calibration.get("prompts"), str), "calibration: prompts must name the prompt file")
    need(
        isinstance(calibration.get("prompts_sha256"), str) and bool(_SHA256.fullmatch(calibration["prompts_sha256"])),
        "calibration: prompts_sha256 is not a SHA-256",
    )
    for key in ("prompt_count", "tokens"):
        need(_whole(calibration.get(key), 1), f"calibration: {key} must be a whole number >= 1")
    need(isinstance(calibration.get("base_model"), str), "calibration: base_model must be text")
    damping = calibration.get("damping")
    need(_number(damping) and damping > 0, "calibration: damping must be a number > 0")


def _known_methods():
    """The basis methods: vlora_core.methods' table once it is imported (a caller may have registered more), else
    the torch-free names it starts with (all a fresh `vlora info` process can know)."""
    methods = sys.modules.get("vlora_core.methods")
    return BASIS_METHODS if methods is None else methods.METHODS


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- reading (torch-free) -----------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    """The manifest of the store at ``folder``, checked against its own checksum and its schema."""
    path = folder / STORE_MANIFEST
    if not folder.is_dir():
        raise StoreError(f"{folder}: no such folder; pass a store made by `vlora compress`.")
    if not path.is_file():
        raise StoreError(f"{folder}: not a vlora store (no {STORE_MANIFEST}); make one with `vlora compress`.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise StoreError(f"{path}: damaged manifest ({error}); restore the store from a copy or rebuild it.") from None
    except OSError as error:
        raise StoreError(f"{path}: cannot be read ({error.strerror}); check its permissions and the disk.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a vlora store manifest; make one with `vlora compress`.")
    if manifest.get("format_version") not in READABLE_STORE_VERSIONS:
        raise StoreError(
            f"{path}: store format version {manifest.get('format_version')!r}, this vlora reads "
            f"versions {', '.join(map(str, READABLE_STORE_VERSIONS))}; upgrade vlora or rebuild the store."
        )
    check(unseal(manifest, path), path)
    return manifest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a store may hold")


def disk_bytes(path: str | Path) -> dict[str, int]:
    """Bytes on disk of the store at ``path``, by part: its manifest, the basis file, the task files (loadings
    and extras) — the current generation's files only."""
    folder = Path(path)
    manifest = read_manifest(folder)
    size = lambda name: (folder / name).stat().st_size  # noqa: E731
    tasks = sum(size(entry["file"]) for entry in manifest["tasks"])
    return {"manifest": size(STORE_MANIFEST), "basis": size(manifest["basis_file"]), "tasks": tasks}


def verify_files(folder: Path, manifest: dict) -> list[str]:
    """Every problem with the data files: missing, or not matching their recorded checksum."""
    problems = []
    for name, digest in manifest.get("checksums", {}).items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            if hashlib.sha256(file.read_bytes()).hexdigest() != digest:
                problems.append(f"{name} does not match its checksum")
        except OSError as error:
            problems.append(f"{name} cannot be read ({error.strerror})")
    return problems


def damaged(folder: Path, problems: list[str]) -> StoreError:
    """The error for a store whose data files are missing or do not match their checksums."""
    return StoreError(f"{folder}: the store is damaged: {'; '.join(problems)}. Restore it from a copy or rebuild it.")
