"""One exception family. Every message names the file (or task, or layer) and the fix."""


class VLoRAError(Exception):
    """Base class of every error vlora raises on purpose.

    The CLI prints it without a traceback and exits 1; the workbench turns it into a ``gr.Error`` toast.
    """


class AdapterError(VLoRAError):
    """An adapter folder cannot be read, or is not something vlora can store."""


class CompatibilityError(VLoRAError):
    """Adapters (or an adapter and a store, or a store and a model) do not fit together."""


class StoreError(VLoRAError):
    """A store folder is missing, damaged, or cannot be written."""


class TaskError(VLoRAError):
    """A task id is unknown, duplicated, or not usable as an id."""


class ModelLoadError(VLoRAError):
    """The base model (bundled, a local folder, or a hub id) cannot be found or loaded."""


def short_list(names: list[str], limit: int = 6, sep: str = ", ") -> str:
    """The first ``limit`` names for a message, and how many more there are ("none" if empty)."""
    if not names:
        return "none"
    return sep.join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


MAX_TASK_ID = 200  # characters


def check_task_id(task_id: object) -> str:
    """A usable task id: a non-blank string of at most MAX_TASK_ID printable characters."""
    if not isinstance(task_id, str):
        raise TaskError(
            f"task id {task_id!r} is not a string but {type(task_id).__name__}; use names like 'sentiment'."
        )
    if not task_id.strip():
        raise TaskError(f"task id {task_id!r} is empty; give each task a short name.")
    if len(task_id) > MAX_TASK_ID or any(ord(c) < 32 for c in task_id):
        raise TaskError(f"task id {task_id[:40]!r}... must be at most {MAX_TASK_ID} printable characters.")
    return task_id
