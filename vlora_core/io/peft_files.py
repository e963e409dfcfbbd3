"""Read and write PEFT adapter folders (adapter_model.safetensors + adapter_config.json)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter import LoRAAdapter, adapter_from_state_dict, adapter_to_state_dict
from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY
from ..errors import AdapterError
from .atomic import atomic_folder


def load_adapter(path: str | Path, name: str | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA adapter folder (adapter_model.safetensors + adapter_config.json).

    Args:
        path: the folder.
        name: the task id it will have; default: the folder's name.

    Returns:
        A ``LoRAAdapter``; anything vlora cannot store exactly is an ``AdapterError`` naming the file and the fix.

    Example:
        >>> load_adapter("adapters/sentiment").ranks
    """
    folder = Path(path)
    source = str(path)
    if not folder.is_dir():
        raise AdapterError(f"{source}: no such folder; pass a PEFT adapter folder holding {ADAPTER_CONFIG}.")
    config = read_adapter_config(folder)
    state = _read_weights(folder)
    return adapter_from_state_dict(state, config, name or folder.resolve().name, source)


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
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise AdapterError(
                f"{legacy}: cannot be read safely as tensors ({str(error).splitlines()[0]}); "
                "re-save the adapter with safetensors."
            ) from None
        if not isinstance(state, dict):
            raise AdapterError(f"{legacy}: holds a {type(state).__name__}, not a state dict of tensors.")
        return state
    raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (or legacy {ADAPTER_WEIGHTS_LEGACY}) in this folder.")


def save_adapter(adapter: LoRAAdapter, path: str | Path) -> Path:
    """Write a standard PEFT folder, atomically (the old folder stays until the new one is complete)."""
    target = Path(path)
    with atomic_folder(target) as tmp:
        save_file(adapter_to_state_dict(adapter), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter.config, indent=2) + "\n", encoding="utf-8")
    return target
