"""manifest.json of a store: its schema, and a checksum of its own.

Nothing in a manifest is trusted as written: ``check`` validates every field a load uses (types, ranges,
unique ids, known method and dtype, files that the checksums list) and ``seal``/``unseal`` keep a SHA-256 of
the manifest's own canonical JSON in it, so one changed digit is found before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from ..constants import READABLE_STORE_VERSIONS, STORE_FORMAT
from ..errors import StoreError, VLoRAError
from ..methods import get_method
from ..precision import PRECISIONS
from ..records import check_task_id

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
    try:
        get_method(manifest.get("method"))
    except VLoRAError:
        need(False, f"unknown method {manifest.get('method')!r}")
    need(_whole(manifest.get("generation"), 0), "generation must be a whole number >= 0")
    need(manifest.get("k_requested") is None or _whole(manifest["k_requested"], 1), "k_requested must be >= 1")
    storage = manifest.get("storage", "float32")
    need(storage in PRECISIONS, f"storage {storage!r} is not one of {sorted(PRECISIONS)}")
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
        quality = entry.get("quality", {})
        need(isinstance(quality, dict) and set(quality) <= names, f"{where}: quality names unknown layers")
        for value in quality.values():
            need(
                isinstance(value, list) and len(value) == 2 and all(_number(v) and v >= 0 for v in value),
                f"{where}: each quality entry must be [error, norm], two numbers >= 0",
            )
    need(len({entry["id"] for entry in tasks}) == len(tasks), "a task id appears twice")


def _whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
