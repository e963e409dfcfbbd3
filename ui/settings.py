"""The workbench's settings: one frozen dataclass, read from the environment by ``from_env``.

    VLORA_BASE_MODEL           base model for the A/B panel: "bundled" (default), a local folder, an "org/name" hub id
    VLORA_ALLOW_SERVER_PATHS   "1"/"0": let users type server paths (adapters, model folders); default on when
                               the server listens on localhost only; always off on a Hugging Face Space (SPACE_ID)
    VLORA_SESSION_ROOT         where per-session folders go (default: a fresh folder in the system temp dir)
    VLORA_MAX_FILE_SIZE        largest upload, as launch(max_file_size=) reads it (default "500mb")

Nothing here imports Gradio, so ``ui.workbench`` and its plain-Python tests run without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlora_core.io import archive

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # the repository's assets/, beside ui/
ON_SPACE = "SPACE_ID"  # Hugging Face sets this on every Space
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class AppSettings:
    model_source: str = "bundled"  # the A/B panel's default base model
    allow_server_paths: bool = True  # server path inputs (adapters, model folders); never on a Space
    session_root: Path | None = None  # parent of the per-session folders; None: a fresh temp folder
    max_file_size: str = "500mb"  # uploads above it are refused before any callback runs
    idle_s: float = 3600.0  # a session untouched this long is removed (API clients never "close a tab")
    max_files: int = archive.MAX_FILES  # entries one uploaded archive may hold
    max_total_bytes: int = archive.MAX_TOTAL_BYTES  # bytes one uploaded archive may expand to
    max_adapters: int = 64  # adapters one session may hold
    demo_adapters: Path | None = ASSETS / "demo_adapters"  # the "load the demo" button's folder of adapters
    demo_prompts: Path | None = ASSETS / "demo_prompts.json"  # example prompts (shared and per demo task)

    def __post_init__(self):
        if on_space() and self.allow_server_paths:
            object.__setattr__(self, "allow_server_paths", False)  # a public Space never reads server paths

    @classmethod
    def from_env(cls, **overrides) -> AppSettings:
        env = os.environ
        values = dict(
            model_source=env.get("VLORA_BASE_MODEL") or "bundled",
            allow_server_paths=env.get("VLORA_ALLOW_SERVER_PATHS", "1" if _local(env) else "0").lower() in _TRUE,
            session_root=Path(env["VLORA_SESSION_ROOT"]) if env.get("VLORA_SESSION_ROOT") else None,
            max_file_size=env.get("VLORA_MAX_FILE_SIZE") or "500mb",
        )
        return cls(**(values | overrides))


def _local(env) -> bool:
    """Whether the server listens on this machine only (GRADIO_SERVER_NAME unset or a loopback name)."""
    return env.get("GRADIO_SERVER_NAME", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")


def on_space() -> bool:
    return bool(os.environ.get(ON_SPACE))
