"""Export stored tasks back to standard PEFT folders: the one path the CLI, the UI and Python share.

A task's canonical factors F_A (d_in, r), F_B (d_out, r) carry its scaling; PEFT wants A (r, d_in) and
B (d_out, r) with ΔW = scaling · B · A, so each side gets 1/√scaling under the config written (the task's
own, or with the user's overrides): ΔW is the same for any alpha (within the scalings ``adapter.lora_scaling``
accepts). Every folder is read back before it is published: its ΔW must equal the stored task's within the
precision of the dtype it is written in (``check_written``), or nothing is written and the error names the folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapter import LoRAAdapter, LoRALayer, check_alpha, lora_scaling
from .errors import VLoRAError, short_list
from .io.outputs import check_export_root, check_export_target
from .io.peft_files import load_adapter, save_adapter
from .quality import delta_w_gap

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
    force: bool = False,
) -> Path:
    """Write ``task_id`` as a PEFT adapter folder at ``out`` (atomically). ΔW is kept for any alpha.

    Args:
        subspace: the store holding the task.
        task_id: which task (``subspace.task_ids``).
        out: the adapter folder to write.
        alpha: lora_alpha to write instead of the task's own (the factors are rescaled).
        base_model: base_model_name_or_path to write.
        target_modules: target_modules to write (must cover every stored layer).
        force: replace ``out`` if it holds an earlier vlora export. Anything else already there (a file,
            a non-empty folder vlora did not write, a store or a folder inside one) is never replaced.

    Returns:
        The folder written.

    Example:
        >>> export_task(SharedSubspace.load("store/"), "sentiment", "exported/sentiment", alpha=32)
    """
    adapter = task_adapter(subspace, task_id, alpha=alpha, base_model=base_model, target_modules=target_modules)
    return save_adapter(adapter, out, check=lambda written: check_written(subspace, task_id, written, out), force=force)


def export_all(subspace: SharedSubspace, out: str | Path, *, force: bool = False, **overrides) -> dict[str, Path]:
    """Every task in its own folder under ``out`` (ids are not trusted as file names). Every folder is checked
    before the first is written: ``out`` may hold other things, but no sub-folder vlora did not write is replaced."""
    names = folder_names(subspace.task_ids)
    targets = {task_id: Path(out) / names[task_id] for task_id in subspace.task_ids}
    check_export_root(out)
    for target in targets.values():
        check_export_target(target, force)
    return {
        task_id: export_task(subspace, task_id, target, force=force, **overrides) for task_id, target in targets.items()
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
    source = f"--alpha {config['lora_alpha']:g}" if alpha is not None else f"task {task_id!r}"
    dtype = getattr(torch, task.dtype)
    layers = {}
    for name, (F_A, F_B) in subspace.task_factors(task_id).items():
        scaling = lora_scaling(config, name, subspace.shapes[name].rank, source)
        root = math.sqrt(scaling)
        A, B = (F_A.T / root).to(dtype), (F_B / root).to(dtype)  # (r, d_in), (d_out, r)
        if not (A.isfinite().all() and B.isfinite().all()):
            raise VLoRAError(
                f"task {task_id!r}: at {source} the factors of {name} overflow {task.dtype}; "
                f"export with a lora_alpha nearer the task's own ({task.config.get('lora_alpha')})."
            )
        layers[name] = LoRALayer(A=A, B=B, scaling=scaling)
    return LoRAAdapter(task_id, config, layers, dict(task.extras), source=f"task {task_id!r}")


def export_tolerance(dtype: torch.dtype) -> float:
    """How far (relative, per layer) a written folder's ΔW may be from the stored task's: two epsilons of the
    written dtype for rounding the factors to it (measured: under 0.4), plus eight of float32 for the float32
    arithmetic before (measured: about 2). float32 1.2e-6, bfloat16 1.6e-2, float16 2.0e-3."""
    return 2 * torch.finfo(dtype).eps + 8 * torch.finfo(torch.float32).eps


def check_written(subspace: SharedSubspace, task_id: str, folder: Path, out: str | Path) -> None:
    """Read the adapter written to ``folder`` (to be published as ``out``) back with the reader every user has,
    and check each layer's ΔW against the stored task's: relative error within ``export_tolerance`` of the
    written dtype, from 2r x 2r Grams in float64 (``quality.delta_w_gap``)."""
    try:
        written = load_adapter(folder, task_id)
    except VLoRAError as error:
        message = f"{out}: the exported adapter does not read back: {error}".replace(str(folder), str(out))
        raise VLoRAError(message) from None
    stored = subspace.task_factors(task_id)
    if set(written.layers) != set(stored):
        raise VLoRAError(f"{out}: the exported adapter holds other layers than task {task_id!r}; nothing was written.")
    worst, where, dtype = 0.0, "", torch.float32
    for name, (F_A, F_B) in stored.items():
        layer = written.layers[name]
        dtype = layer.A.dtype
        G_A, G_B = layer.A.double().T * layer.scaling, layer.B.double()  # ΔW = G_B · G_Aᵀ
        error = delta_w_gap((F_A[None], F_B[None]), (G_A[None], G_B[None]))
        if not error.item() <= worst:  # NaN counts as the worst
            worst, where = error.item(), name
    tolerance = export_tolerance(dtype)
    if not worst <= tolerance:
        raise VLoRAError(
            f"{out}: the exported ΔW of {where} differs from task {task_id!r}'s stored ΔW by {worst:.3g} (relative; "
            f"{str(dtype).removeprefix('torch.')} allows {tolerance:.2g}); nothing was written — export with the "
            "task's own lora_alpha, or report this as a bug."
        )


def export_config(
    config: dict, alpha: float | None, base_model: str | None, target_modules: list[str] | None, layers: list[str]
) -> dict:
    """The task's own adapter_config.json, with the overrides the user asked for."""
    config = dict(config)
    if alpha is not None:
        config["lora_alpha"], config["alpha_pattern"] = check_alpha(alpha, "--alpha (the lora_alpha to write)"), {}
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
