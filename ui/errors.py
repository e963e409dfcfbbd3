"""One decorator: the core's error family becomes a gr.Error toast carrying the core's own message.

A toast goes after a few seconds; what stays is the status line. So the decorator also notes each failure's
words in ``Failures`` (per session), and a failure listener chained to every event (``ui/layout.py``) writes them
into the status line and clears the red "Error" marks Gradio leaves on the failed event's outputs.
"""

from __future__ import annotations

import functools
import html
import inspect
import re
import threading
from collections import OrderedDict

import gradio as gr

from vlora_core.errors import AdapterError, CompatibilityError, ModelLoadError, StoreError, TaskError, VLoRAError

TITLES = {  # toast titles by error class; the message itself names the file and the fix
    AdapterError: "Adapter problem",
    CompatibilityError: "These adapters do not fit together",
    ModelLoadError: "Base model problem",
    StoreError: "Store problem",
    TaskError: "Task problem",
}
UNFORESEEN = (
    "an unexpected error stopped it (the server's log has the details); try again, or reload the page "
    "if it keeps failing."
)
UNHEARD = "the page refused what was asked before the workbench saw it (the message that popped up says why)."
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")  # what can start emphasis, code, links, HTML or tables mid-line


class Failures:
    """The words of each session's last failure, until its failure listener takes them (at most ``size`` held;
    a later failure's words replace them)."""

    def __init__(self, size: int = 1024):
        self._last: OrderedDict[str, str] = OrderedDict()
        self._lock, self._size = threading.Lock(), size

    def note(self, request: gr.Request | None, message: str | None) -> None:
        key = getattr(request, "session_hash", None)
        if not key:
            return
        with self._lock:
            self._last.pop(key, None)
            if message is not None:
                self._last[key] = message
                while len(self._last) > self._size:
                    self._last.popitem(last=False)

    def take(self, request: gr.Request | None) -> str | None:
        with self._lock:
            return self._last.pop(getattr(request, "session_hash", None) or "", None)


def user_errors(fn):
    """Run ``fn``; a VLoRAError stops it with a toast (in the page, and as AppError in gradio_client). On a
    method of an object with ``failures`` (``Callbacks``), every failure's words are noted for the status line."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        failures = getattr(args[0], "failures", None) if args else None
        request = signature.bind_partial(*args, **kwargs).arguments.get("request")
        note = failures.note if isinstance(failures, Failures) else (lambda *_: None)
        try:
            return fn(*args, **kwargs)
        except VLoRAError as error:
            note(request, str(error))
            title = next((t for cls, t in TITLES.items() if isinstance(error, cls)), "vlora")
            # the toast renders HTML and messages quote uploaded names: escape them
            raise gr.Error(html.escape(str(error), quote=False), title=title, print_exception=False) from None
        except gr.Error as error:
            note(request, html.unescape(str(error.message)))
            raise
        except Exception:
            note(request, UNFORESEEN)
            raise

    return wrapper


def failed_line(step: str, message: str | None) -> str:
    """The status line after a failed step: what failed and why, in the core's words (or, when the step never
    reached the workbench, e.g. a value Gradio refused, where the reason is)."""
    return f"**✖ {step} failed:** {markdown_text(message or UNHEARD)}"


def markdown_text(text: str) -> str:
    """``text`` shown as it is in a Markdown component (no emphasis, links or HTML from its characters)."""
    return _MARKDOWN.sub(r"\\\1", text)
