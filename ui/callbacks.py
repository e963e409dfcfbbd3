"""Event handlers: read the components' values, call one core function, format the result.

Every handler that does work takes the session's ``Workbench`` from ``Sessions`` (keyed by the request),
reports long steps through ``gr.Progress(track_tqdm=True)`` (the core's tqdm bars), lets ``user_errors``
turn the core's errors into toasts, and ends with a line for the status bar.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import gradio as gr
import pandas as pd

from vlora_core.base_model import BUNDLED, get_base_model
from vlora_core.config import CompressConfig
from vlora_core.merge import MergeConfig

from . import plots
from .errors import user_errors
from .session import Sessions
from .settings import AppSettings
from .workbench import BASE_CHOICE, AdapterRow, KReport, Loaded, Workbench, parse_weights

try:  # ZeroGPU on a Space; elsewhere the decorator changes nothing
    from spaces import GPU
except ImportError:

    def GPU(fn=None, **_):
        return fn if fn is not None else (lambda f: f)


TABLE_COLUMNS = ["task id", "rank", "alpha", "target modules", "layers", "size", "problem"]
MERGE_AB_COLUMNS = ["adapter", "output", "tokens/s"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class Callbacks:
    def __init__(self, sessions: Sessions, settings: AppSettings):
        self.sessions = sessions
        self.settings = settings

    # ---- 1. bringing adapters ---------------------------------------------------------------------
    @user_errors
    def load_adapters(self, archive: str | None, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """Add every adapter folder in an uploaded zip. Returns (adapter table, status)."""
        if not archive:
            raise gr.Error("choose a .zip of adapter folders first.")
        with self.sessions.open(request) as bench:
            return self._listing(bench, bench.add_archive(archive), Path(archive).name)

    @user_errors
    def load_folder(
        self, files: list[str] | None, task_id: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)
    ):
        """Add one adapter from a folder upload, named ``task_id``. Returns (adapter table, status)."""
        if not files:
            raise gr.Error("choose an adapter folder first.")
        with self.sessions.open(request) as bench:
            loaded = bench.add_files(files, task_id or "")
            if loaded.ignored:
                gr.Info(
                    f"ignored {len(loaded.ignored)} files that are not part of a PEFT adapter: "
                    f"{', '.join(loaded.ignored[:5])}{' ...' if len(loaded.ignored) > 5 else ''}"
                )
            return self._listing(bench, loaded, "the folder")

    @user_errors
    def load_path(self, path: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """Add the adapters in a server folder (localhost only). Returns (adapter table, status)."""
        if not self.settings.allow_server_paths:
            raise gr.Error("server paths are switched off here; upload a zip of adapter folders instead.")
        if not (path or "").strip():
            raise gr.Error("type the path of an adapter folder, or of a folder of them.")
        if self.sessions.holds(path.strip()):
            raise gr.Error(
                html.escape(
                    f"{path.strip()}: holds the workbench's own session files (other people's "
                    "uploads and exports); give a folder of your own adapters.",
                    quote=False,
                )
            )
        with self.sessions.open(request) as bench:
            return self._listing(bench, bench.add_path(path.strip()), path.strip())

    @user_errors
    def load_demo(self, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """Add the demo adapters shipped in assets/. Returns (adapter table, status)."""
        with self.sessions.open(request) as bench:
            return self._listing(bench, bench.add_demo(), "the demo adapters")

    @user_errors
    def remove_adapters(self, task_ids: list[str] | None, request: gr.Request):
        """Drop the given tasks (all when empty). Returns (adapter table, status)."""
        with self.sessions.open(request) as bench:
            removed = bench.remove(task_ids or None)  # none chosen: all, refused entries too
            return adapter_table(bench.table()), f"Removed {len(removed)} adapters; {len(bench.adapters)} left."

    @user_errors
    def adapter_lists(self, request: gr.Request):
        """Task lists for the remove, export and A/B dropdowns (not an API endpoint)."""
        with self.sessions.open(request) as bench:
            tasks, choices = list(bench.adapters), bench.choices()
        first = tasks[0] if tasks else None
        a = f"compressed: {first}" if first else BASE_CHOICE
        b = f"original: {first}" if first else BASE_CHOICE
        return (
            gr.Dropdown(choices=tasks, value=[]),
            gr.Dropdown(choices=tasks, value=[]),
            gr.Dropdown(choices=choices, value=a),
            gr.Dropdown(choices=choices, value=b),
        )

    def _listing(self, bench: Workbench, loaded: Loaded, label: str):
        rows = bench.table()
        problems = [r for r in rows if r.problem and not r.refused]
        status = f"Loaded {len(loaded.added)} adapters from {label} ({len(bench.adapters)} in this session)."
        if loaded.renamed:
            renamed = ", ".join(f"{old} → {new}" for old, new in loaded.renamed.items())
            status += f" Renamed to keep task ids unique: {renamed}."
        if loaded.refused:
            names = ", ".join(loaded.refused)
            status += f" **Refused {len(loaded.refused)} ({names}): see the problem column; fix those folders only.**"
            gr.Warning(html.escape(next(iter(loaded.refused.values())), quote=False))  # toasts render HTML
        if problems:
            status += f" **{len(problems)} do not fit with {rows[0].task_id}: see the problem column.**"
            gr.Warning(html.escape(problems[0].problem, quote=False))
        return adapter_table(rows), status

    # ---- 2. tuning k ------------------------------------------------------------------------------
    @user_errors
    def compress(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """The view at this setting. Returns (summary, variance plot, error plot, storage plot, bytes plot,
        numbers, status); SVDs run only the first time a basis is used."""
        config = CompressConfig(_whole(k), method, bool(adaptive_k), float(threshold))
        with self.sessions.open(request) as bench:
            report = bench.report(config, progress=True)
        status = (
            f"Compressed ({plots.setting_label(report.config)}): ×{report.ratio:.1f} smaller, "
            f"mean ΔW error {report.mean_error:.1%}."
        )
        return (
            summary(report),
            plots.variance_figure(report),
            plots.task_error_figure(report),
            plots.storage_figure(report),
            plots.bytes_figure(report),
            numbers(report),
            status,
        )

    @user_errors
    def overview(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """After adapters are loaded (not an API endpoint): the k tab drawn at the current setting, the k
        slider sized, the tab shown — or, with fewer than two adapters, a word on what is missing."""
        with self.sessions.open(request) as bench:
            ready = len(bench.adapters) >= 2
        if not ready:
            return (
                *[gr.skip()] * 6,
                "Add at least one more adapter: a shared subspace needs two or more.",
                gr.skip(),
                gr.skip(),
            )
        drawn = self.compress(method, k, adaptive_k, threshold, request)
        return (*drawn, self.k_range(method, k, request), gr.Tabs(selected="tune"))

    @user_errors
    def k_range(self, method: str, k: float, request: gr.Request):
        """The k slider's end: the most directions this basis has; k moves down to it (not an API endpoint)."""
        with self.sessions.open(request) as bench:
            k_max = bench.k_max(method)
        return gr.Slider(maximum=max(k_max, 2), value=min(int(k), k_max))

    # ---- 3. A/B test ------------------------------------------------------------------------------
    @user_errors
    def load_model(self, source: str, progress=gr.Progress(track_tqdm=True)):
        """Load (once per process) the shared base model. Returns the status."""
        source = self._model_source(source)
        progress(0, desc=f"loading {source}")
        model, _ = get_base_model(source)
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        weight = next(model.parameters())
        return (
            f"Base model {source} ready ({millions:.0f}M parameters on {weight.device}, "
            f"{str(weight.dtype).removeprefix('torch.')}; shared by every session)."
        )

    @user_errors
    def ab_test(
        self,
        source: str,
        prompt: str,
        choice_a: str,
        choice_b: str,
        max_new_tokens: float,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """Generate for A and B on the shared base model.

        Returns (text A, stats A, text B, stats B, timings, status)."""
        source = self._model_source(source)
        with self.sessions.open(request) as bench:
            new_tokens = bench.check_request(prompt or "", max_new_tokens)  # the caps, before any model work
        progress(0, desc=f"loading {source}")
        model, tokenizer = get_base_model(source)
        progress(0.5, desc="generating")
        with self.sessions.open(request) as bench:
            runs = _generate(bench, model, tokenizer, prompt or "", [choice_a, choice_b], new_tokens)
        stats = [
            f"switch {r.switch_ms:.2f} ms · {r.new_tokens} tokens in {r.seconds:.2f} s · {r.tokens_per_s:.1f} tokens/s"
            for r in runs
        ]
        numbers_ = [
            {
                "choice": r.choice,
                "switch_ms": round(r.switch_ms, 3),
                "new_tokens": r.new_tokens,
                "seconds": round(r.seconds, 3),
                "tokens_per_s": round(r.tokens_per_s, 2),
            }
            for r in runs
        ]
        return (
            runs[0].text,
            stats[0],
            runs[1].text,
            stats[1],
            numbers_,
            f"A/B test done on {source}: A {runs[0].choice}, B {runs[1].choice}.",
        )

    def _model_source(self, text: str | None) -> str:
        """The source to load; on a Space, only the default, the bundled model or a hub id."""
        source = (text or "").strip() or self.settings.model_source
        if self.settings.allow_server_paths or source in (BUNDLED, self.settings.model_source):
            return source
        if Path(source).expanduser().exists() or not _HUB_ID.fullmatch(source):
            raise gr.Error(
                f"{source!r}: model folders on the server are switched off here; "
                f"use {BUNDLED!r} or an 'org/name' hub id."
            )
        return source

    # ---- 4. export --------------------------------------------------------------------------------
    @user_errors
    def export(
        self,
        task_ids: list[str] | None,
        alpha: str | float | None,
        base_model: str,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """Export tasks (all when empty) at the current k. Returns (adapters zip, store zip, status)."""
        alpha = _alpha(alpha)
        with self.sessions.open(request) as bench:
            exported = bench.export(task_ids or None, alpha=alpha, base_model=(base_model or "").strip() or None)
        sizes = [plots.human_bytes(path.stat().st_size) for path in (exported.adapters_zip, exported.store_zip)]
        return (
            str(exported.adapters_zip),
            str(exported.store_zip),
            f"Exported {_count(exported.task_ids, 'task')} as PEFT folders ({plots.setting_label(exported.config)}; "
            f"{', '.join(exported.task_ids)}): adapters zip {sizes[0]}, store zip {sizes[1]} — "
            "use the download buttons.",
        )

    @user_errors
    def merge(
        self,
        task_ids: list[str] | None,
        weights: str,
        method: str,
        density: float,
        rank: float | None,
        name: str,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """Merge the chosen tasks (all when none) on ΔW, as ``vlora merge`` does. Returns (merged adapter zip,
        numbers, status)."""
        with self.sessions.open(request) as bench:
            ids = list(dict.fromkeys(task_ids or bench.adapters))
            config = MergeConfig(method, float(density), _whole(rank) or None)
            merged = bench.merge(ids, parse_weights(weights, len(ids)), config, name)
        result = merged.result
        numbers_ = {
            "name": merged.name,
            "method": result.method,
            "tasks": dict(zip(merged.task_ids, merged.weights)),
            "ranks": sorted(set(result.adapter.ranks.values())),
            "error": result.error,  # exact: the merged ΔW's relative distance from the uncut merge
            "layer_errors": result.layer_errors,
        }
        parts = ", ".join(f"{t} × {w:g}" for t, w in zip(merged.task_ids, merged.weights))
        return (
            str(merged.zip_path),
            numbers_,
            f"Merged ({result.method}) {parts} into {merged.name!r}: ΔW relative error {result.error:.2%} against "
            "the exact merge — use the download button, or A/B it against its parts.",
        )

    @user_errors
    def merge_ab(
        self,
        source: str,
        prompt: str,
        max_new_tokens: float,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """The latest merge and each of its parts on one prompt. Returns (outputs table, status)."""
        source = self._model_source(source)
        with self.sessions.open(request) as bench:
            new_tokens = bench.check_request(prompt or "", max_new_tokens)
        progress(0, desc=f"loading {source}")
        model, tokenizer = get_base_model(source)
        progress(0.5, desc="generating")
        with self.sessions.open(request) as bench:
            runs = _merge_generate(bench, model, tokenizer, prompt or "", new_tokens)
        rows = [[r.choice, r.text, round(r.tokens_per_s, 1)] for r in runs]
        return pd.DataFrame(rows, columns=MERGE_AB_COLUMNS), f"Merge A/B done on {source}: {len(runs)} outputs."

    # ---- the session's end ------------------------------------------------------------------------
    def end_session(self, request: gr.Request) -> None:
        self.sessions.close(request)


@GPU(duration=120)
def _generate(bench: Workbench, model, tokenizer, prompt: str, choices: list[str], max_new_tokens: int):
    return bench.ab_test(model, tokenizer, prompt, choices, max_new_tokens)


@GPU(duration=120)
def _merge_generate(bench: Workbench, model, tokenizer, prompt: str, max_new_tokens: int):
    return bench.merge_ab(model, tokenizer, prompt, max_new_tokens)


def adapter_table(rows: list[AdapterRow]) -> pd.DataFrame:
    """Loaded adapters, then the refused folders (their problem column says why they were not loaded)."""
    return pd.DataFrame([_cells(r) for r in rows], columns=TABLE_COLUMNS)


def _cells(r: AdapterRow) -> list:
    if r.refused:
        return [r.task_id, "—", "—", "—", "—", "—", f"not loaded: {r.problem}"]
    return [
        r.task_id,
        str(r.rank_min) if r.rank_min == r.rank_max else f"{r.rank_min}–{r.rank_max}",
        f"{r.alpha:g}",
        r.target_modules,
        r.layers,
        plots.human_bytes(r.num_bytes),
        r.problem or "—",
    ]


def _alpha(value: str | float | None) -> float | None:
    """The export's lora_alpha box: blank keeps each adapter's own; the core checks the number's range."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise gr.Error(
            f"lora_alpha to write: {text[:40]!r} is not a number; type one such as 16, or leave it blank to keep "
            "each adapter's own."
        ) from None


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _whole(value: float) -> object:
    """A slider's float as an int when it is whole; anything else as it is, for the config to refuse by name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def summary(report: KReport) -> str:
    return (
        f"**×{report.ratio:.1f} smaller**: {plots.human_bytes(report.stored_bytes)} stored (shared basis "
        f"{plots.human_bytes(report.basis_bytes)} + loadings) for {plots.human_bytes(report.original_bytes)} of "
        f"adapters · mean ΔW error **{report.mean_error:.2%}** (worst {max(report.task_errors):.2%}) · "
        f"{plots.setting_label(report.config)}" + (f"  \nNote: {report.note}" if report.note else "")
    )


def numbers(report: KReport) -> dict:
    """The report's numbers for the API and the "numbers" panel."""
    return {
        "method": report.config.method,
        "adaptive_k": report.config.adaptive_k,
        "k": None if report.config.adaptive_k else report.config.num_components,
        "variance_threshold": report.config.variance_threshold if report.config.adaptive_k else None,
        "stored_bytes": report.stored_bytes,
        "basis_bytes": report.basis_bytes,
        "original_bytes": report.original_bytes,
        "ratio": round(report.ratio, 4),
        "k_max": report.k_max,
        "task_errors": dict(zip(report.task_ids, report.task_errors)),
        "layers": [
            {"layer": n, "k_a": ka, "k_b": kb, "variance_a": va, "variance_b": vb, "error": e}
            for n, ka, kb, va, vb, e in zip(
                report.layers, report.k_a, report.k_b, report.variance_a, report.variance_b, report.layer_errors
            )
        ],
        "note": report.note,
    }
