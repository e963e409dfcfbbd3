"""Export stored tasks back to standard PEFT folders: the one path the CLI, the UI and Python share.

A task's canonical factors F_A (d_in, r), F_B (d_out, r) carry its scaling; PEFT wants A (r, d_in) and
B (d_out, r) with ΔW = scaling · B · A, so each side gets 1/√scaling under the config written (the task's
own, or with the user's overrides): ΔW is the same for any alpha.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapter import LoRAAdapter, LoRALayer, lora_scaling
from .errors import VLoRAError, short_list
from .io.peft_files import save_adapter

if TYPE_CHECKING:  # annotations only: the container imports this module
    from .subspace import SharedSubspace


def export_task(
    subspace: SharedSubspace,
    task_id: str,
    out: str | Path,
    *,
    alpha: float | None = None,
    base_model: str | None = None,
    target_modules: list[str] | None = None,
) -> Path:
    """Write ``task_id`` as a PEFT adapter folder at ``out`` (atomically). ΔW is kept for any alpha.

    Args:
        subspace: the store holding the task.
        task_id: which task (``subspace.task_ids``).
        out: the adapter folder to write.
        alpha: lora_alpha to write instead of the task's own (the factors are rescaled).
        base_model: base_model_name_or_path to write.
        target_modules: target_modules to write (must cover every stored layer).

    Returns:
        The folder written.

    Example:
        >>> export_task(SharedSubspace.load("store/"), "sentiment", "exported/sentiment", alpha=32)
    """
    adapter = task_adapter(subspace, task_id, alpha=alpha, base_model=base_model, target_modules=target_modules)
    return save_adapter(adapter, out)


def export_all(subspace: SharedSubspace, out: str | Path, **overrides) -> dict[str, Path]:
    """Every task in its own folder under ``out`` (ids are not trusted as file names)."""
    names = folder_names(subspace.task_ids)
    return {
        task_id: export_task(subspace, task_id, Path(out) / names[task_id], **overrides)
        for task_id in subspace.task_ids
    }


def task_adapter(
    subspace: SharedSubspace,
    task_id: str,
    *,
    alpha: float | None = None,
    base_model: str | None = None,
    target_modules: list[str] | None = None,
) -> LoRAAdapter:
    """The task as PEFT factors under its own config (or overrides), in its original dtype."""
    task = subspace.task(task_id)
    config = export_config(task.config, alpha, base_model, target_modules, list(subspace.shapes))
    dtype = getattr(torch, task.dtype)
    layers = {}
    for name, (F_A, F_B) in subspace.task_factors(task_id).items():
        scaling = lora_scaling(config, name, subspace.shapes[name].rank)
        root = math.sqrt(scaling)
        layers[name] = LoRALayer(A=(F_A.T / root).to(dtype), B=(F_B / root).to(dtype), scaling=scaling)
    return LoRAAdapter(task_id, config, layers, dict(task.extras), source=f"task {task_id!r}")


def export_config(
    config: dict, alpha: float | None, base_model: str | None, target_modules: list[str] | None, layers: list[str]
) -> dict:
    """The task's own adapter_config.json, with the overrides the user asked for."""
    config = dict(config)
    if alpha is not None:
        if alpha <= 0:
            raise VLoRAError(f"--alpha must be positive, got {alpha}.")
        config["lora_alpha"], config["alpha_pattern"] = alpha, {}
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    if target_modules is not None:
        unmatched = [n for n in layers if not any(n == t or n.endswith("." + t) for t in target_modules)]
        if unmatched:
            raise VLoRAError(
                f"--target-modules {' '.join(target_modules)} does not cover stored layers: {short_list(unmatched)}; "
                "list every module the adapter trains (for example q_proj v_proj)."
            )
        config["target_modules"] = list(target_modules)
    config["inference_mode"] = True
    return config


def folder_names(task_ids: list[str]) -> dict[str, str]:
    """A distinct folder name per task id: the id itself where it is plain, else a numbered safe form."""
    names, taken = {}, set()
    for index, task_id in enumerate(task_ids):
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in task_id)[:60].strip("_")
        name = safe if safe == task_id else f"{index:03d}-{safe or 'task'}"
        while name in taken:
            name = f"{index:03d}-{name}"
        names[task_id] = name
        taken.add(name)
    return names
