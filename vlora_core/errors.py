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
