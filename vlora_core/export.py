"""Export stored tasks back to standard PEFT folders: the one path the CLI, the UI and Python share."""

from __future__ import annotations

from pathlib import Path

from .io.peft_files import save_adapter
from .subspace import SharedSubspace


def export_task(subspace: SharedSubspace, task_id: str, out: str | Path, *, alpha: float | None = None,
                base_model: str | None = None, target_modules: list[str] | None = None) -> Path:
    """Write ``task_id`` as a PEFT adapter folder at ``out`` (atomically). ΔW is kept for any alpha."""
    adapter = subspace.to_adapter(task_id, alpha=alpha, base_model=base_model, target_modules=target_modules)
    return save_adapter(adapter, out)


def export_all(subspace: SharedSubspace, out: str | Path, **overrides) -> dict[str, Path]:
    """Every task in its own folder under ``out`` (ids are not trusted as file names)."""
    names = folder_names(subspace.task_ids)
    return {task_id: export_task(subspace, task_id, Path(out) / names[task_id], **overrides)
            for task_id in subspace.task_ids}


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
