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
from vlora_core.behaviour import effect_warnings
from vlora_core.config import CompressConfig
from vlora_core.io.prompts import PromptError, prompt_rows, prompts_from_rows, read_prompts
from vlora_core.merge import MergeConfig
from vlora_core.precision import get_precision

from . import gpu, plots
from .errors import Failures, markdown_text, user_errors
from .session import Sessions
from .settings import AppSettings
from .workbench import AdapterRow, Exported, KReport, Loaded, Workbench, parse_choice, parse_weights, store_folder

PROMPT_COLUMNS = ["task (blank: every task)", "prompt", "answer (blank: the original's own)"]
SUMMARY_CLASS = "k-summary"  # the element around the summary text (ui/layout.py's PAGE_JS rewrites its content)
TABLE_COLUMNS = ["task id", "rank", "alpha", "target modules", "layers", "size", "problem"]
MERGE_AB_COLUMNS = ["adapter", "output", "tokens/s"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class Callbacks:
    def __init__(self, sessions: Sessions, settings: AppSettings):
        self.sessions = sessions
        self.settings = settings
        self.failures = Failures()  # each session's last failure, for the status line (ui/errors.py)

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

    def _listing(self, bench: Workbench, loaded: Loaded, label: str):
        """The table and one status line for a load: what came in, and each folder refused or adapter that does
        not fit, by name (the problem column holds each one's reason and fix, once); one toast points there."""
        rows = bench.table()
        status = f"Loaded {len(loaded.added)} adapters from {label} ({len(bench.adapters)} in this session)."
        if loaded.renamed:
            renamed = ", ".join(f"{old} → {new}" for old, new in loaded.renamed.items())
            status += f" Renamed to keep task ids unique: {renamed}."
        notes = []
        if loaded.refused:
            notes.append(
                f"Refused {len(loaded.refused)}, not loaded: {', '.join(loaded.refused)} (fix those folders only)"
            )
        groups = bench.groups()
        if len(groups) > 1:
            misfits = [t for group in groups[1:] for t in group]
            notes.append(
                f"{_count(misfits, 'adapter')} do not fit with the other {len(groups[0])} ({', '.join(misfits)}): "
                "keep one group with 'Keep only this group' below the table"
            )
        if notes:
            said = "; ".join(notes) + ". The problem column says why."
            status += f" **{markdown_text(said)}**"
            gr.Warning(html.escape(said, quote=False))  # the one toast of this load; toasts render HTML
        return adapter_table(rows), status

    # ---- 2. tuning k ------------------------------------------------------------------------------
    @user_errors
    def compress(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        dtype: str = "fp32",
        request: gr.Request = None,
        progress=gr.Progress(track_tqdm=True),
    ):
        """The view at this setting, its store in ``dtype`` (fp32, bf16, fp16, int8). Returns (summary, variance
        plot, error plot, storage plot, bytes plot, numbers, status); SVDs run only the first time a basis is used."""
        config = CompressConfig(_whole(k), method, bool(adaptive_k), float(threshold))
        with self.sessions.open(request) as bench:
            report = bench.report(config, progress=True, dtype=dtype or "fp32")
        return (summary(report), *plots.figures(report).values(), numbers(report), compressed_line(report))

    # ---- 3. A/B test ------------------------------------------------------------------------------
    @user_errors
    def load_model(self, source: str, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
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
        _, tokenizer = get_base_model(source)  # loaded and placed here, outside the GPU call (ui/gpu.py)
        with self.sessions.open(request) as bench:
            job = gpu.ab_job(bench, tokenizer, source, prompt or "", [choice_a, choice_b], new_tokens)
            tested = [tested_setting(choice, bench.config) for choice in job.choices]
        progress(0.5, desc="generating")
        runs = gpu.generate(job)
        stats = [
            f"**{what}** · switch {r.switch_ms:.2f} ms · {r.new_tokens} tokens in {r.seconds:.2f} s · "
            f"{r.tokens_per_s:.1f} tokens/s"
            for r, what in zip(runs, tested)
        ]
        numbers_ = [
            {
                "choice": r.choice,
                "setting": what,
                "switch_ms": round(r.switch_ms, 3),
                "new_tokens": r.new_tokens,
                "seconds": round(r.seconds, 3),
                "tokens_per_s": round(r.tokens_per_s, 2),
            }
            for r, what in zip(runs, tested)
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
        """Export tasks (all when empty) at the current setting (k and storage precision). Returns (adapters zip,
        store zip, status); each zip's name carries the setting (``workbench.setting_slug``)."""
        alpha = _alpha(alpha)
        with self.sessions.open(request) as bench:
            exported = bench.export(task_ids or None, alpha=alpha, base_model=(base_model or "").strip() or None)
        zips = exported.zips
        sizes = [plots.human_bytes(path.stat().st_size) for path in zips]
        return (
            *map(str, zips),
            f"Exported {_count(exported.task_ids, 'task')} as PEFT folders "
            f"({plots.setting_label(exported.config, exported.dtype)}; {', '.join(exported.task_ids)}): "
            f"{zips[0].name} {sizes[0]} (full-size adapters), {zips[1].name} {sizes[1]} (the small store: "
            f"`unzip {zips[1].name} && vlora info {store_folder(zips[1])}`) — use the download buttons.",
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
        _, tokenizer = get_base_model(source)  # loaded and placed here, outside the GPU call (ui/gpu.py)
        with self.sessions.open(request) as bench:
            job = gpu.merge_job(bench, tokenizer, source, prompt or "", new_tokens)
        progress(0.5, desc="generating")
        runs = gpu.generate(job)
        rows = [[r.choice, r.text, round(r.tokens_per_s, 1)] for r in runs]
        return pd.DataFrame(rows, columns=MERGE_AB_COLUMNS), f"Merge A/B done on {source}: {len(runs)} outputs."

    # ---- behaviour: what each task still does (k tab, A/B tab, export) ----------------------------------
    @user_errors
    def read_prompt_file(self, path: str | None):
        """An uploaded prompt file (JSON lines) into the prompt table (not an API endpoint)."""
        if not path:
            return gr.skip()
        try:
            return prompt_frame(read_prompts(path))
        except PromptError as error:  # the file as the user named it, not its place in Gradio's cache
            raise PromptError(str(error).replace(f"{Path(path).parent}/", "")) from None

    @user_errors
    def check_behaviour(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        source: str,
        table,
        min_effect: float,
        min_agreement: float,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        """Each task's effect retained and top-1 agreement at each k of the basis, on the table's prompts (empty:
        the demo's for the demo adapters, else a generic set), on the A/B tab's base model.

        Returns (prompt table, summary, plot, numbers, status)."""
        source = self._model_source(source)
        with self.sessions.open(request) as bench:
            prompts = table_prompts(table) or bench.check_prompts()
        progress(0, desc=f"loading {source}")
        get_base_model(source)  # loaded and placed here, outside the GPU call (ui/gpu.py)
        current = None if adaptive_k else _whole(k)
        with self.sessions.open(request) as bench:
            plan = bench.behaviour_plan(method, prompts, current, source, progress=True)
            job = gpu.check_job(source, plan) if plan.ks else None
        progress(0, desc=f"checking {len(plan.ks)} k" if job else "measured before")
        report = gpu.run_check(job, progress) if job else None
        with self.sessions.open(request) as bench:
            bench.record_behaviour(plan, report)
            view = bench.behaviour_view(method, current, min_effect, min_agreement)
        status = f"Behaviour checked on {source}, {view.prompts} prompts: {view.recommendation.summary()}"
        return (
            prompt_frame(prompts),
            behaviour_summary(view),
            plots.behaviour_figure(view),
            behaviour_numbers(view),
            status,
        )

    @user_errors
    def behaviour_marks(
        self, method: str, k: float, adaptive_k: bool, min_effect: float, min_agreement: float, request: gr.Request
    ):
        """The latest check of this basis redrawn at the current k and thresholds (not an API endpoint)."""
        with self.sessions.open(request) as bench:
            view = bench.behaviour_view(method, None if adaptive_k else _whole(k), min_effect, min_agreement)
        if view is None:
            return gr.skip(), gr.skip(), gr.skip()
        return behaviour_summary(view), plots.behaviour_figure(view), behaviour_numbers(view)

    @user_errors
    def ab_behaviour(self, source: str, prompt: str, choice_a: str, choice_b: str, answer_a: str, request: gr.Request):
        """After an A/B run: B against A on the prompt, teacher-forced on A's answer. Returns a line of text."""
        if not (answer_a or "").strip():
            return "A gave no answer to compare B on."
        source = self._model_source(source)
        get_base_model(source)  # loaded and placed here, outside the GPU call (ui/gpu.py)
        with self.sessions.open(request) as bench:
            job = gpu.pair_job(bench, source, prompt or "", [choice_a, choice_b], answer_a)
        pair = gpu.check_pair(job)
        return (
            f"**B against A** on A's answer ({pair.positions} tokens, teacher-forced): KL(A ‖ B) "
            f"**{pair.kl:.4f}** nats per token · top-1 agreement **{pair.agreement:.1%}**"
        )

    @user_errors
    def export_check(
        self, verify: bool, source: str, table, min_effect: float, request: gr.Request, progress=gr.Progress()
    ):
        """After an export: each exported task, read back, against its original on the prompts; a warning for
        each that keeps less than ``min_effect`` of its effect (or nearly none). Returns the text (the status line
        keeps the export's own words)."""
        if not verify:
            return "Behaviour not checked (switched off)."
        source = self._model_source(source)
        with self.sessions.open(request) as bench:
            prompts = table_prompts(table) or bench.check_prompts()
        progress(0, desc=f"loading {source}")
        get_base_model(source)  # loaded and placed here, outside the GPU call (ui/gpu.py)
        with self.sessions.open(request) as bench:
            job = gpu.export_check_job(bench, source, prompts)
        progress(0.1, desc="checking the export")
        results = gpu.check_export(job)
        warnings = effect_warnings(results, min_effect)
        for warning in warnings:
            gr.Warning(html.escape(warning, quote=False))
        lines = [
            f"- {task}: "
            + ("no effect to keep" if b.no_effect else f"effect retained **{b.effect_retained:.3f}**")
            + f", top-1 agreement {b.agreement:.3f}, KL {b.kl:.4f}"
            for task, b in results.items()
        ]
        verdict = f"**{len(warnings)} of {len(results)} tasks below {min_effect:g}.**" if warnings else "All kept."
        text = f"Exported tasks against their originals on {source} ({len(prompts)} prompts): {verdict}\n" + "\n".join(
            lines
        )
        return text

    # ---- the session's end ------------------------------------------------------------------------
    def end_session(self, request: gr.Request) -> None:
        self.sessions.close(request)


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


def tested_setting(choice: str, config: CompressConfig | None) -> str:
    """What an A/B choice runs, in words: 'qa at flat basis, k = 4', 'qa, original (every direction)', ..."""
    kind, task_id = parse_choice(choice, [choice.partition(": ")[2]])
    config = config or CompressConfig()
    if kind == "base":
        return "base model"
    if kind == "original":
        return f"{task_id}, original (every direction)"
    if kind != "compressed":  # "compressed k=N"
        config = CompressConfig(int(kind.removeprefix("compressed k=")), config.method)
    return f"{task_id} at {plots.setting_label(config)}"


def download_buttons(exported: Exported, with_files: bool = True) -> list:
    """The two download buttons of an export, named by its zips and clickable (they are not before); holding the
    zips too unless ``with_files`` is False (the export's own event has put them there)."""
    labels = [f"Download {p.name} ({plots.human_bytes(p.stat().st_size)})" for p in exported.zips]
    if not with_files:
        return [gr.update(label=label, interactive=True) for label in labels]
    return [gr.DownloadButton(label, path, interactive=True) for label, path in zip(labels, exported.zips)]


def break_even_words(report: KReport) -> str:
    """Up to which uniform k this basis's store is smaller than the adapters, in this precision."""
    where = f"{report.config.method} basis in {get_precision(report.dtype).flag}"
    if report.break_even_k is None:
        return f"the {where} is not smaller than the adapters at any k"
    if report.break_even_k >= report.k_max:
        return f"the {where} is smaller than the adapters at every k (up to k = {report.k_max})"
    return f"the {where} is smaller than the adapters up to k = {report.break_even_k} (break-even)"


def bytes_words(report: KReport) -> str:
    """The store's parts and precision, as `vlora info` lists them."""
    precision = get_precision(report.dtype)
    return (
        f"{plots.human_bytes(report.stored_bytes)} stored in {precision.flag} (shared basis "
        f"{plots.human_bytes(report.basis_bytes)} + loadings {plots.human_bytes(report.stored_bytes - report.basis_bytes)})"
    )


def compressed_line(report: KReport) -> str:
    """The status line after a k view: the setting, the store's size against the adapters', the mean error."""
    return (
        f"Compressed ({plots.setting_label(report.config, report.dtype)}): the store is "
        f"{plots.size_words(report.stored_bytes, report.original_bytes)}, mean ΔW error {report.mean_error:.1%}; "
        f"{break_even_words(report)}."
    )


def summary(report: KReport) -> str:
    """The k tab's summary line, as HTML: ``summary_text`` in the element a k change in the page rewrites."""
    return f'<div class="{SUMMARY_CLASS}">{summary_text(report)}</div>'


def summary_text(report: KReport) -> str:
    """How much smaller, the mean and worst ΔW error, the setting, and where k was clipped (HTML, escaped)."""
    note = f"<br>Note: {html.escape(report.note)}" if report.note else ""
    rounding = (
        ""
        if report.dtype == "float32"
        else f" (of the cut; rounding to {get_precision(report.dtype).flag} adds a little, measured into the store "
        "on export)"
    )
    return (
        f"<b>{plots.size_words(report.stored_bytes, report.original_bytes)}</b>: {bytes_words(report)} for the "
        f"adapters' {plots.human_bytes(report.original_bytes)} · mean ΔW error <b>{report.mean_error:.2%}</b> "
        f"(worst {max(report.task_errors):.2%}){rounding} · {html.escape(plots.setting_label(report.config))}"
        f"<br>{html.escape(break_even_words(report))}{note}"
    )


def numbers(report: KReport) -> dict:
    """The report's numbers for the API and the "numbers" panel."""
    return {
        "method": report.config.method,
        "adaptive_k": report.config.adaptive_k,
        "k": None if report.config.adaptive_k else report.config.num_components,
        "variance_threshold": report.config.variance_threshold if report.config.adaptive_k else None,
        "dtype": report.dtype,
        "stored_bytes": report.stored_bytes,
        "basis_bytes": report.basis_bytes,
        "original_bytes": report.original_bytes,
        "ratio": round(report.ratio, 4),
        "break_even_k": report.break_even_k,
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


def table_prompts(table) -> tuple | None:
    """The prompt table's prompts (a DataFrame of task, prompt, answer); None when it is empty."""
    rows = [] if table is None else table.values.tolist() if hasattr(table, "values") else table
    if not any(str(cell or "").strip() for row in rows for cell in row):
        return None
    return prompts_from_rows(rows)


def prompt_frame(prompts) -> pd.DataFrame:
    return pd.DataFrame(prompt_rows(prompts), columns=PROMPT_COLUMNS)


def behaviour_summary(view) -> str:
    """The recommendation in the core's words, and the worst task at the current k."""
    text = view.recommendation.summary()
    if view.current_k in view.ks:
        at = view.ks.index(view.current_k)
        effect = min((e[at] for e in view.effect.values() if e[at] == e[at]), default=float("nan"))
        agreement = min(a[at] for a in view.agreement.values())
        text += f"  \nAt k = {view.current_k} (now): worst effect retained {effect:.3f}, worst top-1 agreement {agreement:.3f}."
    return text


def behaviour_numbers(view) -> dict:
    """The check's numbers for the API and the numbers panel (an effect with nothing to keep: null)."""
    return {
        "method": view.method,
        "ks": view.ks,
        "stored_bytes": view.stored_bytes,
        "current_k": view.current_k,
        "recommended_k": view.recommended_k,
        "min_effect": view.recommendation.min_effect,
        "min_agreement": view.recommendation.min_agreement,
        "prompts": view.prompts,
        "no_effect": list(view.recommendation.no_effect),
        "tasks": {
            t: {
                "effect_retained": [None if e != e else e for e in view.effect[t]],
                "agreement": view.agreement[t],
                "kl": view.kl[t],
            }
            for t in view.task_ids
        },
        "summary": view.recommendation.summary(),
    }
