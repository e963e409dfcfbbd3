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
    """Every task, each in ``out/<index>-<safe name>`` (ids are not trusted as file names)."""
    out = Path(out)
    return {task_id: export_task(subspace, task_id, out / folder_name(i, task_id), **overrides)
            for i, task_id in enumerate(subspace.task_ids)}


def folder_name(index: int, task_id: str) -> str:
    """A folder name made from a task id: readable where the id is plain, never a path."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in task_id)[:60].strip("_")
    return safe if safe and safe == task_id else f"{index:03d}-{safe or 'task'}"
