"""One decorator: the core's error family becomes a gr.Error toast carrying the core's own message."""

from __future__ import annotations

import functools
import html

import gradio as gr

from vlora_core.errors import AdapterError, CompatibilityError, ModelLoadError, StoreError, TaskError, VLoRAError

TITLES = {  # toast titles by error class; the message itself names the file and the fix
    AdapterError: "Adapter problem",
    CompatibilityError: "These adapters do not fit together",
    ModelLoadError: "Base model problem",
    StoreError: "Store problem",
    TaskError: "Task problem",
}


def user_errors(fn):
    """Run ``fn``; a VLoRAError stops it with a toast (in the page, and as AppError in gradio_client)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VLoRAError as error:
            title = next((t for cls, t in TITLES.items() if isinstance(error, cls)), "vlora")
            # the toast renders HTML and messages quote uploaded names: escape them
            raise gr.Error(html.escape(str(error), quote=False), title=title, print_exception=False) from None

    return wrapper
