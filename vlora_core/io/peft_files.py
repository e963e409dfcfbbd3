"""Read and write PEFT adapter folders (adapter_model.safetensors + adapter_config.json)."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from ..adapter import AdapterSize, LoRAAdapter, adapter_from_state_dict, adapter_to_state_dict, size_from_shapes
from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY
from ..errors import AdapterError, StoreError
from .atomic import atomic_folder, disk_problem, write_new_file
from .outputs import EXPORT_METADATA, check_export_target


def load_adapter(path: str | Path, name: str | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA adapter folder (adapter_model.safetensors + adapter_config.json).

    Args:
        path: the folder.
        name: the task id it will have; default: the folder's name as given (``folder_task_id``).

    Returns:
        A ``LoRAAdapter``; anything vlora cannot store exactly is an ``AdapterError`` naming the file and the fix.

    Example:
        >>> load_adapter("adapters/sentiment").ranks
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterError(f"load_adapter takes an adapter folder's path, not {type(path).__name__} {path!r}.")
    folder = Path(path)
    source = str(path)
    if not folder.is_dir():
        raise AdapterError(f"{source}: no such folder; pass a PEFT adapter folder holding {ADAPTER_CONFIG}.")
    config = read_adapter_config(folder)
    state = _read_weights(folder)
    return adapter_from_state_dict(state, config, name or folder_task_id(path), source)


def folder_task_id(path: str | Path) -> str:
    """The task id an adapter folder gets by default: its name as the user wrote it. A symbolic link keeps
    its own name (not its target's); ``.`` and a trailing ``/`` name the folder itself."""
    return Path(os.path.abspath(path)).name


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{folder}: no {ADAPTER_CONFIG}; a PEFT adapter folder holds {ADAPTER_CONFIG} "
            f"and {ADAPTER_WEIGHTS} (save it with peft_model.save_pretrained)."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path}: not valid JSON ({error}); restore the file PEFT wrote.") from None
    except OSError as error:
        raise AdapterError(f"{path}: cannot be read ({error.strerror}); check its permissions.") from None
    except RecursionError:
        raise AdapterError(f"{path}: nested too deeply to be an adapter config; restore the file PEFT wrote.") from None


def read_adapter_size(path: str | Path) -> AdapterSize:
    """Layers, largest rank and numbers of an adapter folder's weights, from the file's header alone.

    No tensor data is read (safetensors keeps shapes in its header; a legacy .bin is memory-mapped), so
    a workbench can refuse an adapter over its limits before the work of loading it."""
    return size_from_shapes(weight_shapes(path) or {})


def weight_shapes(
    path: str | Path, names: tuple[str, ...] = (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY)
) -> dict[str, tuple[int, ...]] | None:
    """{tensor key: shape} of the first of ``names`` the folder holds, keys exactly as written (no adapter name
    taken out, nothing checked); None when it holds none of them. Only headers are read: a safetensors file's,
    or a torch file memory-mapped (an old non-zip one is read whole)."""
    folder = Path(path)
    for name in names:
        file = folder / name
        if not file.is_file():
            continue
        if name == ADAPTER_WEIGHTS:
            try:
                with safe_open(file, framework="pt") as f:
                    return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            except (SafetensorError, OSError, ValueError) as error:
                raise AdapterError(
                    f"{file}: not a readable safetensors file ({error}); it may be truncated — copy it again."
                ) from None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
            state = _read_torch_file(file)  # an old (non-zip) torch file cannot be mapped: read it
        if not isinstance(state, dict):
            raise AdapterError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors.")
        return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
    return None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights, legacy = folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS_LEGACY
    if weights.is_file():
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as error:
            raise AdapterError(
                f"{weights}: not a readable safetensors file ({error}); it may be truncated — copy it again."
            ) from None
    if legacy.is_file():
        state = _read_torch_file(legacy)
        if not isinstance(state, dict):
            raise AdapterError(f"{legacy}: holds a {type(state).__name__}, not a state dict of tensors.")
        return state
    for file in (weights, legacy):
        if file.is_symlink() or file.exists():  # a device, a pipe, a folder, or a link to nothing
            raise AdapterError(f"{file}: is not a regular file; put the adapter's weights file itself there.")
    raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (or legacy {ADAPTER_WEIGHTS_LEGACY}) in this folder.")


def _read_torch_file(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise AdapterError(
            f"{file}: cannot be read safely as tensors ({str(error).splitlines()[0]}); "
            "re-save the adapter with safetensors."
        ) from None


def canonical_bytes(data: bytes) -> bytes:
    """A safetensors file with its JSON header written one way: keys sorted, the metadata's too.

    safetensors keeps the metadata in a hash map whose order changes from one process to the next, so the
    same tensors could give different bytes; serving engines key their caches on file hashes. The tensors'
    bytes and offsets are untouched; the header is padded with spaces to a multiple of 8 bytes, as the format
    allows."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


def save_adapter(
    adapter: LoRAAdapter, path: str | Path, check: Callable[[Path], None] | None = None, *, force: bool = False
) -> Path:
    """Write a standard PEFT folder, atomically (the old folder stays until the new one is complete).

    ``path`` must be new, an empty folder, or (with ``force``) a folder vlora exported before
    (``outputs.check_export_target``); the weights carry vlora's mark in their metadata. ``check``, if given,
    is called with the written temp folder before it takes ``path``'s place; if it raises, nothing is
    published and ``path`` stays as it was. A write the machine refuses (disk full, read-only, no permission)
    is a ``StoreError`` saying so, with ``path`` as it was."""
    target = Path(path)
    check_export_target(target, force)
    try:
        config = json.dumps(adapter.config, indent=2, allow_nan=False)  # strict JSON: PEFT reads no NaN
    except ValueError:
        raise AdapterError(
            f"{adapter.describe()}: its adapter_config.json holds NaN or Infinity; fix the number in the config."
        ) from None
    weights = canonical_bytes(save_bytes(adapter_to_state_dict(adapter), metadata=EXPORT_METADATA))
    existed = target.is_dir()
    try:
        with atomic_folder(target, last=ADAPTER_CONFIG) as tmp:
            write_new_file(tmp / ADAPTER_WEIGHTS, weights)
            write_new_file(tmp / ADAPTER_CONFIG, (config + "\n").encode())
            if check is not None:
                check(tmp)
    except OSError as error:
        left = "the folder was left as it was" if existed else "nothing was written"
        raise StoreError(f"{target}: cannot write the adapter: {disk_problem(error)}; {left}.") from None
    return target
