"""Per-session workbenches: each browser tab (or gradio_client) gets its own Workbench and folder.

The folder is ``<root>/<sha256(session_hash)[:16]>``: the hash comes from the client, so it is never used
as a path itself. The server never serves that folder. Exported zips go to ``<downloads>/vlora-<random>/``
instead: ``downloads`` is Gradio's own cache (``build_app`` passes it), so Gradio hands those files out as
they are, without copies of its own, and a download link is a random name only its session is given (Gradio's
file route has no notion of sessions: a link is a capability). The base model is not per-session: it is shared
and read-only (``vlora_core.base_model.get_base_model``).

A page keeps its session across a reload: on loading, it hands ``claim`` the session key it holds in the
browser's storage (``gr.BrowserState``); a key this server gave out and still holds brings that session back
(every tab of one browser shares it), anything else gets a fresh session under a new random key. Keys are made
here and never taken from the client, so a page cannot choose another's session. A page's session ends
``reload_grace_s`` after its last page closed (``demo.unload``) unless a reload claims it; a session no page
holds (an API client, whose key is its session hash) ends when its client closes. Either ends after ``idle_s``
untouched. Ending removes both folders, and the links stop working; the whole root goes when the process exits.
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
    pages: set[str] | None = None  # session hashes of the open pages showing it; None: not a page's (an API client)
    left: float | None = None  # when its last page closed (a reload may still claim it until reload_grace_s)


class Sessions:
    def __init__(self, settings: AppSettings = AppSettings(), downloads: str | Path | None = None):
        self._root = Path(settings.session_root) if settings.session_root else None
        self._downloads = Path(downloads) if downloads else None  # None: inside each session's folder
        self._settings, self._idle_s = settings, settings.idle_s
        self._sessions: dict[str, _Session] = {}  # session key -> session
        self._pages: dict[str, str] = {}  # a page's session hash -> the key of the session it claimed
        self._grace_s = settings.reload_grace_s
        self._lock = threading.Lock()  # guards the dicts, not the workbenches
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

    def claim(self, request: gr.Request, stored: str | None) -> tuple[str, bool | None]:
        """A page's session on loading: the one under ``stored`` (the key the browser kept) if this server still
        holds it for pages, else a new one. Returns (the key for the browser to keep, True: restored / False: the
        stored key's session has ended / None: nothing was stored)."""
        page = _key(request)
        self.close_idle()
        root = self.root
        with self._lock:
            found = self._sessions.get(stored) if isinstance(stored, str) else None
            if found is None or found.pages is None:
                key, found = secrets.token_urlsafe(32), None
                self._sessions[key] = _Session(self._new_bench(root, key), pages=set())
            else:
                key = stored
            self._pages[page] = key
            session = self._sessions[key]
            session.pages.add(page)
            session.left, session.used = None, time.monotonic()
        return key, (found is not None) if stored else None

    @contextmanager
    def open(self, request: gr.Request):
        """The session's Workbench, held exclusively for the duration of the ``with`` block."""
        key = self._key(request)
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
        """A page or client went (``demo.unload``): a session no page holds ends now, its folder and everything
        it held go; a page's session waits ``reload_grace_s`` after its last page for a reload to claim it."""
        page = _key(request)
        with self._lock:
            key = self._pages.pop(page, page)
            session = self._sessions.get(key)
            if session is None:
                return
            if session.pages is not None:  # a page's session: it waits for a reload
                session.pages.discard(page)
                if not session.pages:
                    session.left = time.monotonic()
                return
            del self._sessions[key]
        with session.lock:
            session.bench.close()

    def holds(self, path: str | Path) -> bool:
        """Whether ``path`` is inside the session folders or the downloads, or contains them: a server path
        there would read other sessions' files."""
        target = Path(path).expanduser().resolve()
        roots = [r.resolve() for r in (self.root, self._downloads) if r is not None]
        return any(target.is_relative_to(r) or r.is_relative_to(target) for r in roots)

    def close_idle(self) -> None:
        """End the sessions untouched for ``idle_s``, and the pages' sessions left for ``reload_grace_s``."""
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if not s.lock.locked() and self._over(s, now)]
            ended = [self._sessions.pop(k) for k in idle]
            for page in [p for p, k in self._pages.items() if k in idle]:
                del self._pages[page]
        for session in ended:
            session.bench.close()

    def _over(self, session: _Session, now: float) -> bool:
        left = session.left is not None and now - session.left > self._grace_s
        return left or now - session.used > self._idle_s

    def _key(self, request: gr.Request | None) -> str:
        """The session key of a call: the session its page claimed, else the call's own session hash."""
        page = _key(request)
        return self._pages.get(page, page)

    def __len__(self) -> int:
        return len(self._sessions)


def _key(request: gr.Request | None) -> str:
    session_hash = getattr(request, "session_hash", None)
    if not session_hash:
        raise gr.Error("this call has no session; call the app through its page or gradio_client.")
    return session_hash


def _folder(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]
