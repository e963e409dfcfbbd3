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
    reload_grace_s: float = 600.0  # a page's session is kept this long after its tab closes, for a reload
    max_files: int = archive.MAX_FILES  # entries one uploaded archive may hold
    max_total_bytes: int = archive.MAX_TOTAL_BYTES  # bytes one uploaded archive may expand to
    max_adapters: int = 64  # adapters one session may hold
    # What one request may cost, checked before the work (an adapter from its file's header, before its tensors
    # are read; a prompt before the model runs). Shown on the page (``limits_note``).
    max_rank: int = 256  # LoRA rank of any layer of an adapter (the gauge's r x r work grows as r³)
    max_layers: int = 1024  # targeted layers in one adapter
    max_adapter_parameters: int = 64_000_000  # numbers in one adapter's weights file (256 MB in float32)
    max_session_parameters: int = 256_000_000  # numbers in all of one session's adapters together
    max_prompt_chars: int = 4000  # an A/B prompt, in characters ...
    max_prompt_tokens: int = 1024  # ... and in tokens after the chat template
    max_new_tokens: int = 256  # tokens one A/B generation may add
    heavy_jobs: int = 1  # uploads, first compressions (SVDs) and exports running at once over all sessions
    demo_adapters: Path | None = ASSETS / "demo_adapters"  # the "load the demo" button's folder of adapters
    # the demo's prompts (JSON lines, shared and per demo task): A/B examples and the behaviour check's default
    demo_prompts: Path | None = ASSETS / "demo_prompts.jsonl"

    def __post_init__(self):
        if on_space() and self.allow_server_paths:
            object.__setattr__(self, "allow_server_paths", False)  # a public Space never reads server paths
        for name in LIMITS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AppSettings.{name} must be a whole number of at least 1, got {value!r}.")

    def limits_note(self) -> str:
        """The caps in one line, for the page."""
        return (
            f"Limits here: adapters of rank ≤ {self.max_rank:,} and ≤ {self.max_layers:,} layers, "
            f"≤ {self.max_adapter_parameters:,} numbers each and {self.max_session_parameters:,} per session "
            f"(≤ {self.max_adapters} adapters); prompts ≤ {self.max_prompt_chars:,} characters and "
            f"{self.max_prompt_tokens:,} tokens; ≤ {self.max_new_tokens} new tokens."
        )

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


LIMITS = (  # the caps above, each a whole number of at least 1
    "max_files",
    "max_total_bytes",
    "max_adapters",
    "max_rank",
    "max_layers",
    "max_adapter_parameters",
    "max_session_parameters",
    "max_prompt_chars",
    "max_prompt_tokens",
    "max_new_tokens",
    "heavy_jobs",
)


def _local(env) -> bool:
    """Whether the server listens on this machine only (GRADIO_SERVER_NAME unset or a loopback name)."""
    return env.get("GRADIO_SERVER_NAME", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")


def on_space() -> bool:
    return bool(os.environ.get(ON_SPACE))
