"""A store's numbers for ``vlora info``, torch-free: the manifest, the data files' checksums and their headers.

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON naming each tensor's
dtype and shape: the k of each basis side and the parameter counts come from there, the variance explained from
the manifest (recorded at save time), the ΔW errors from the manifest's "quality". A store written before the
manifest recorded its variance gives None: the caller loads it in full (with torch) instead.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import SIDES, int8_scale_shapes
from ..reports import describe
from .manifest import damaged, read_manifest, verify_files

READ_TRIES = 5  # as a full load: a writer that moved the store on meanwhile makes the read start again
# Per basis method: (g, D) of a layer side of size d and rank r (loading rows per task, one vector's length) and
# whether it keeps a mean; vlora_core.methods' to_vectors and centre, checked to agree by tests/test_cli_startup.py.
VECTORS = {"flat": (lambda d, r: (1, d * r), True), "rank": (lambda d, r: (r, d), False)}
STORED = {"float32": ("F32",), "bfloat16": ("BF16",), "float16": ("F16",), "int8": ("I8", "BF16")}  # values, scales


class _Unlike(Exception):
    """A data file's header is not what the manifest says: the full load names the problem."""


@dataclass(frozen=True)
class SideView:
    """One basis side as info reports it."""

    k: int
    variance: float

    def variance_explained(self) -> float:
        return self.variance


@dataclass(frozen=True)
class TaskView:
    id: str
    errors: dict[str, tuple[float, float]]  # layer -> (relative ΔW error, ‖ΔW‖), as recorded
    act_errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # activation-weighted, if calibrated


@dataclass(frozen=True)
class StoreView:
    """What ``reports`` and ``vlora info`` read of a ``SharedSubspace``, without its tensors."""

    method: str
    dtype: str
    bases: dict[str, dict[str, SideView]]  # layer -> side -> k and variance explained
    tasks: dict[str, TaskView]
    parameters: dict[str, int]  # {"basis": ..., "per_task": ...}
    calibration: dict | None = None  # what an activation-aware fit was calibrated on (None: the plain fit)

    def num_parameters(self) -> dict[str, int]:
        return dict(self.parameters)

    def __repr__(self) -> str:
        layer_ks = {name: {side: b.k for side, b in sides.items()} for name, sides in self.bases.items()}
        return describe(self.method, len(self.tasks), len(self.bases), layer_ks)


def read_view(path: str | Path) -> StoreView | None:
    """The store at ``path`` as info reports it; StoreError as a load gives for a damaged store; None for a store
    whose manifest does not record its variance explained (or whose files a writer replaced while this read)."""
    folder = Path(path)
    for attempt in range(READ_TRIES):
        manifest = read_manifest(folder)
        problems = verify_files(folder, manifest)
        if not problems:
            break
        if attempt + 1 < READ_TRIES and read_manifest(folder)["generation"] != manifest["generation"]:
            continue
        raise damaged(folder, problems)
    if not all("variance_explained" in layer for layer in manifest["layers"]):
        return None
    try:
        basis = header(folder / manifest["basis_file"])
        tasks = {entry["file"]: header(folder / entry["file"]) for entry in manifest["tasks"]}
        return _view(manifest, basis, tasks)
    except (OSError, ValueError, KeyError, TypeError, IndexError, _Unlike):
        return None  # moved on since the checksums, or files unlike the manifest: the full load says what happened


def _view(manifest: dict, basis: dict, tasks: dict[str, dict]) -> StoreView:
    """The view, once every tensor the full load would check has the shape and dtype the manifest implies."""
    vectors, centre = VECTORS[manifest["method"]]
    stored = STORED[manifest.get("storage", "float32")]
    bases, shared, per_task = {}, 0, 0
    for i, layer in enumerate(manifest["layers"]):
        bases[layer["name"]] = {}
        for side, variance in zip(SIDES, layer["variance_explained"]):
            g, D = vectors(layer["d_in"] if side == "A" else layer["d_out"], layer["rank"])
            k = _shape(basis, f"{i}.{side}.components", stored)[0]
            _expect(_shape(basis, f"{i}.{side}.components", stored) == [k, D] and k <= D)
            _expect(basis.get(f"{i}.{side}.spectrum", {}).get("dtype") == "F32")
            _expect((f"{i}.{side}.mean" in basis) == centre)
            mean = _shape(basis, f"{i}.{side}.mean", stored) if centre else None
            _expect(mean is None or mean == [D])
            for entry in manifest["tasks"]:
                _expect(_shape(tasks[entry["file"]], f"{i}.{side}", stored) == [g, k])
            shared += k * D + (D if centre else 0)
            per_task += g * k
            bases[layer["name"]][side] = SideView(k, variance)
    for entry in manifest["tasks"]:
        _expect(all(f"extra.{key}" in tasks[entry["file"]] for key in entry.get("extras", [])))
    tasks = {
        e["id"]: TaskView(
            e["id"],
            {n: tuple(v) for n, v in e.get("quality", {}).items()},
            {n: tuple(v) for n, v in e.get("quality_activation", {}).items()},
        )
        for e in manifest["tasks"]
    }
    storage = manifest.get("storage", "float32")
    parameters = {"basis": shared, "per_task": per_task}
    return StoreView(manifest["method"], storage, bases, tasks, parameters, manifest.get("calibration"))


def _shape(found: dict, key: str, stored: tuple[str, ...]) -> list[int]:
    """The shape of tensor ``key`` stored in the store's precision (int8: with its bf16 scales, one a block of a
    row, or one a row in stores written before the blocks: ``int8_scale_shapes``)."""
    tensor = found.get(key)
    _expect(isinstance(tensor, dict) and tensor.get("dtype") == stored[0])
    if len(stored) > 1:
        scale = found.get(key + ".scale")
        _expect(isinstance(scale, dict) and scale.get("dtype") == stored[1])
        _expect(tuple(scale["shape"]) in int8_scale_shapes(tensor["shape"]))
    return tensor["shape"]


def _expect(ok: bool) -> None:
    if not ok:
        raise _Unlike


def header(path: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> {"dtype", "shape", "data_offsets"} (no tensor is read)."""
    with open(path, "rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        if size > 100_000_000:
            raise ValueError(f"{path}: header of {size} bytes")
        found = json.loads(file.read(size))
    found.pop("__metadata__", None)
    if not isinstance(found, dict):
        raise ValueError(f"{path}: not a safetensors header")
    return found
