"""Per-session workbenches: each browser tab (or gradio_client) gets its own Workbench and folder.

The folder is ``<root>/<sha256(session_hash)[:16]>``: the hash comes from the client, so it is never used
as a path itself. The server never serves that folder. Exported zips go to ``<downloads>/vlora-<random>/``
instead: ``downloads`` is Gradio's own cache (``build_app`` passes it), so Gradio hands those files out as
they are, without copies of its own, and a download link is a random name only its session is given (Gradio's
file route has no notion of sessions: a link is a capability). A session ends when its tab closes
(``demo.unload``), or after ``idle_s`` untouched (an API client never closes a tab): both folders go, and
its links stop working. The whole root goes when the process exits. The base model is not per-session: it
is shared and read-only (``vlora_core.base_model.get_base_model``).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from .settings import AppSettings
from .workbench import Workbench


@dataclass
class _Session:
    bench: Workbench
    lock: threading.Lock = field(default_factory=threading.Lock)  # one event at a time per session
    used: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, settings: AppSettings = AppSettings(), downloads: str | Path | None = None):
        self._root = Path(settings.session_root) if settings.session_root else None
        self._downloads = Path(downloads) if downloads else None  # None: inside each session's folder
        self._settings, self._idle_s = settings, settings.idle_s
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()  # guards the dict, not the workbenches
        self.gate = threading.BoundedSemaphore(settings.heavy_jobs)  # heavy steps of all sessions, see Workbench

    @property
    def root(self) -> Path:
        """Made on first use (not at import or build): a fresh temp folder unless a root was given."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="vlora-workbench-"))
                weakref.finalize(self, shutil.rmtree, self._root, True)
            self._root.mkdir(parents=True, exist_ok=True)
            return self._root

    @contextmanager
    def open(self, request: gr.Request):
        """The session's Workbench, held exclusively for the duration of the ``with`` block."""
        key = _key(request)
        self.close_idle()
        root = self.root
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = _Session(self._new_bench(root, key))
        with session.lock:
            session.used = time.monotonic()
            yield session.bench
            session.used = time.monotonic()

    def _new_bench(self, root: Path, key: str) -> Workbench:
        downloads = self._downloads / f"vlora-{secrets.token_hex(16)}" if self._downloads else None
        return Workbench(root / _folder(key), self._settings, downloads, gate=self.gate)

    def close(self, request: gr.Request) -> None:
        """End one session (``demo.unload``): its folder and everything it held go."""
        with self._lock:
            session = self._sessions.pop(_key(request), None)
        if session is not None:
            with session.lock:
                session.bench.close()

    def holds(self, path: str | Path) -> bool:
        """Whether ``path`` is inside the session folders or the downloads, or contains them: a server path
        there would read other sessions' files."""
        target = Path(path).expanduser().resolve()
        roots = [r.resolve() for r in (self.root, self._downloads) if r is not None]
        return any(target.is_relative_to(r) or r.is_relative_to(target) for r in roots)

    def close_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if now - s.used > self._idle_s and not s.lock.locked()]
            ended = [self._sessions.pop(k) for k in idle]
        for session in ended:
            session.bench.close()

    def __len__(self) -> int:
        return len(self._sessions)


def _key(request: gr.Request | None) -> str:
    session_hash = getattr(request, "session_hash", None)
    if not session_hash:
        raise gr.Error("this call has no session; call the app through its page or gradio_client.")
    return session_hash


def _folder(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
