"""The page's own steps, none of them an API endpoint: what follows a public step in the browser.

After any change of the adapters the lists are refreshed and the k tab is redrawn at a valid k (or says why it
cannot be drawn); a k change is shown from the page's table of every k (``k_table``, ``plots.k_moves``); a
reload claims the session back from the key the browser kept; the A/B tab says which setting it tests; every
failure is written into the status line (``failed``). Each method reads component values, asks the session's
``Workbench``, and formats, like ``Callbacks``.
"""

from __future__ import annotations

import html

import gradio as gr

from vlora_core.config import CompressConfig
from vlora_core.precision import get_precision

from . import plots
from .callbacks import (
    Callbacks,
    adapter_table,
    break_even_words,
    compressed_line,
    download_buttons,
    numbers,
    summary_text,
)
from .errors import failed_line, markdown_text, user_errors
from .workbench import AT_K_KIND, BASE_CHOICE, Workbench, export_names, store_folder

SHARED_EXAMPLE = "any task"  # the "for" column of an example prompt shared by every task
RESET = (
    "Your earlier session here has ended (a page's session is kept {grace} after its page closes and an hour "
    "without use, and not across a restart of the server): start again by loading adapters."
)


class PageSteps:
    def __init__(self, calls: Callbacks):
        self.calls, self.sessions, self.failures = calls, calls.sessions, calls.failures
        self.settings = calls.settings

    # ---- failures -----------------------------------------------------------------------------------
    def failed(self, step: str, skipped: int):
        """A failure listener for ``step``: its ``skipped`` other outputs left as they are (which clears the red
        marks Gradio puts on them), and the status line saying what failed and why, until the next step."""

        def report(request: gr.Request):
            line = failed_line(step, self.failures.take(request))
            return (*[gr.skip()] * skipped, line) if skipped else line

        return report

    # ---- after the adapters change --------------------------------------------------------------------
    @user_errors
    def lists(self, request: gr.Request):
        """The task lists (remove, export, A and B), the group chooser shown only when the adapters do not all
        fit together, and the example prompts with the loaded tasks' own first."""
        with self.sessions.open(request) as bench:
            tasks, choices, groups = list(bench.adapters), bench.choices(), bench.groups()
            examples = bench.example_prompts()
            rows = {r.task_id: r for r in bench.table()}
        first = tasks[0] if tasks else None
        labels = [(_group_label(group, rows), str(i)) for i, group in enumerate(groups)]
        return (
            gr.Dropdown(choices=tasks, value=[]),
            gr.Dropdown(choices=tasks, value=[]),
            gr.Dropdown(choices=choices, value=f"compressed: {first}" if first else BASE_CHOICE),
            gr.Dropdown(choices=choices, value=f"original: {first}" if first else BASE_CHOICE),
            gr.Row(visible=len(groups) > 1),
            gr.Dropdown(choices=labels, value="0" if labels else None),
            gr.Dataset(samples=[[task or SHARED_EXAMPLE, text] for task, text in examples]),
        )

    # Each of these takes tab 2's setting as its first inputs: method, k, adaptive k, threshold, dtype (layout's
    # settings_in).
    @user_errors
    def overview(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        dtype: str,
        status: str,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """After loading: the k tab drawn on the basis that measures better for these adapters
        (``Workbench.preferred_method``: both bases decomposed, their mean ΔW error compared at equal bytes) in the
        precision the CLI would store them in (``Workbench.default_dtype``), the k slider sized, the status line
        told which basis and why, and the tab's id to show it; or, when the adapters cannot share a subspace yet,
        cleared with a word on why (the adapters tab stays in front).
        Returns (summary, four plots, numbers, k slider, k table, basis, precision, status, tab to show)."""
        with self.sessions.open(request) as bench:
            blocker = why_not_drawn(bench)
            method, why = (method, "") if blocker else bench.preferred_method()
            dtype = dtype if blocker else get_precision(bench.default_dtype()).flag
        drawn = self._draw(method, k, adaptive_k, threshold, dtype, request)
        if blocker:
            return (*drawn, gr.skip(), gr.skip(), gr.skip(), "")
        said = f"{(status or '').rstrip()} Tab 2 opened on the {why}."
        return (*drawn, method, dtype, said.strip(), "tune")

    @user_errors
    def redraw(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        dtype: str,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """After removing adapters (or a reload): the k tab drawn again on the basis shown, without changing tabs.
        Returns (summary, four plots, numbers, k slider, k table)."""
        return self._draw(method, k, adaptive_k, threshold, dtype, request)

    @user_errors
    def switch_basis(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        dtype: str,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """Another basis chosen: drawn at the k last set on it (``Workbench.last_k``; first time: the slider's),
        the slider sized to it. Returns (summary, four plots, numbers, status, k slider)."""
        with self.sessions.open(request) as bench:
            k = bench.last_k.get(method, k)
            k_max = bench.k_max(method)  # the first look at the basis: SVDs, once
        k = max(1, min(int(k), k_max))
        drawn = self.calls.compress(method, k, adaptive_k, threshold, dtype, request)
        return (*drawn, gr.Slider(maximum=max(k_max, 2), value=k))

    def _draw(self, method: str, k: float, adaptive_k: bool, threshold: float, dtype: str, request: gr.Request):
        with self.sessions.open(request) as bench:
            blocker = why_not_drawn(bench)
            k_max = None if blocker else bench.k_max(method)  # the first look at the basis: SVDs, once
        if blocker:
            return (blocker, None, None, None, None, None, gr.skip(), "")
        k = max(1, min(int(k), k_max))
        drawn = self.calls.compress(method, k, adaptive_k, threshold, dtype, request)
        table = self.k_table(method, adaptive_k, dtype, request)
        return (*drawn[:-1], gr.Slider(maximum=max(k_max, 2), value=k), table)

    @user_errors
    def keep_group(self, group: str | None, request: gr.Request):
        """Keep only one group of adapters that fit together (the advice "compress them in separate subspaces",
        followed for the group chosen); the others are removed. Returns (adapter table, status)."""
        with self.sessions.open(request) as bench:
            groups = bench.groups()
            if group is None or not str(group).isdigit() or int(group) >= len(groups):
                raise gr.Error("choose the group of adapters to keep first.")
            kept = groups[int(group)]
            others = [t for t in bench.adapters if t not in kept]
            bench.remove(others)
            table = adapter_table(bench.table())
        return table, (
            f"Kept the {len(kept)} adapters that fit together ({', '.join(kept)}); removed {len(others)} "
            f"({', '.join(others)}). To compress those, export these first, then load them on their own."
        )

    # ---- a k change --------------------------------------------------------------------------------
    # The page shows a k at once from the table of every swept k (``k_table``, sent after each whole drawing);
    # the server hears of it too (``set_k``), and sends what the table lacks.
    @user_errors
    def k_table(self, method: str, adaptive_k: bool, dtype: str, request: gr.Request):
        """Every uniform k the sweep holds, as the page shows it: {k: {"update": what moves in each figure
        (``plots.k_moves``), "summary": the summary's text}} as JSON text; "" while adaptive k decides or
        nothing can be drawn."""
        with self.sessions.open(request) as bench:
            if adaptive_k or why_not_drawn(bench):
                return ""
            reports = bench.sweep_reports(method, dtype or "fp32")
        return plots.as_json({k: _shown(report) for k, report in reports.items()})

    @user_errors
    def set_k(self, method: str, k: float, adaptive_k: bool, threshold: float, dtype: str, request: gr.Request):
        """A k change: it becomes the session's setting (for the A/B test and the export). Returns (numbers,
        status, what to show): what to show is "" when the page's table holds this k (the page has shown it
        already), else the table's entry for it as JSON text. Nothing while adaptive k decides."""
        if adaptive_k:
            return gr.skip(), gr.skip(), gr.skip()
        config = CompressConfig(int(k) if float(k).is_integer() else k, method, False, float(threshold))
        with self.sessions.open(request) as bench:
            report = bench.report(config, progress=True, dtype=dtype or "fp32")
            in_table = config.num_components in bench.sweep_reports(method, report.dtype)
        return numbers(report), compressed_line(report), "" if in_table else plots.as_json(_shown(report))

    # ---- the A/B tab ------------------------------------------------------------------------------------
    @user_errors
    def ab_view(self, choice_a: str, choice_b: str, request: gr.Request):
        """On opening the A/B tab: which setting *compressed* tests, and the choices for A and B (the ladder of
        k reaches the basis's most once it is decomposed). Returns (setting line, A, B)."""
        with self.sessions.open(request) as bench:
            config, choices = bench.config, bench.choices()
        setting = plots.setting_label(config or CompressConfig())
        line = (
            f"*compressed* tests **{setting}**, the setting of tab 2"
            + ("" if config else " (its default: nothing is tuned yet)")
            + f"; *{AT_K_KIND}* another k of the same basis, to compare two settings of one task side by side."
        )
        return line, gr.Dropdown(choices=choices, value=choice_a), gr.Dropdown(choices=choices, value=choice_b)

    # ---- the export tab -------------------------------------------------------------------------------
    @user_errors
    def export_view(self, request: gr.Request):
        """On opening the export tab: the setting an export writes, before it is written (basis, k or threshold,
        storage precision), what each download will be and how big, and how to read the store."""
        with self.sessions.open(request) as bench:
            if why_not_drawn(bench):
                return "Nothing to export yet: load two or more adapters that fit together, then tune k in tab 2."
            report = bench.current_report()
        adapters, store = export_names(report.config, report.dtype)
        return (
            f"Exports at **{plots.setting_label(report.config, report.dtype)}** (tab 2's setting): "
            f"`{adapters}` and `{store}`.  \n"
            f"- **PEFT folders** are ordinary, **full-size** LoRA adapters (each the rank and size of its original: "
            f"{plots.human_bytes(report.original_bytes)} for all of them, as loaded); they carry the compressed ΔW, "
            "not a smaller file.  \n"
            f"- **The vlora store** is the small part: {plots.human_bytes(report.stored_bytes)}, "
            f"{plots.size_words(report.stored_bytes, report.original_bytes)}; {break_even_words(report)}. "
            f"It unpacks into one folder: `unzip {store} && vlora info {store_folder(store)}`."
        )

    @user_errors
    def export_buttons(self, request: gr.Request):
        """After an export: its two download buttons named by its zips and made clickable (the export's own event,
        a public endpoint, gives the zips themselves)."""
        with self.sessions.open(request) as bench:
            exported = bench.exported
        return download_buttons(exported, with_files=False) if exported else [gr.skip()] * 2

    @user_errors
    def pick_example(self, index: int | None, request: gr.Request):
        """An example prompt clicked: its text into the prompt box."""
        with self.sessions.open(request) as bench:
            examples = bench.example_prompts()
        return examples[index][1] if isinstance(index, int) and 0 <= index < len(examples) else gr.skip()

    # ---- a reload --------------------------------------------------------------------------------------
    @user_errors
    def restore(self, stored: str | None, request: gr.Request):
        """On loading the page: claim the session the browser's key names (``Sessions.claim``) and show what it
        holds — the adapters, the setting, the latest export — or say that it has ended. Returns (key, status,
        table, method, k, adaptive, threshold, dtype, adapters zip, store zip)."""
        key, restored = self.sessions.claim(request, stored)
        skip = [gr.skip()] * 9
        if restored is None:
            return key, *skip
        if not restored:
            minutes = f"{self.settings.reload_grace_s / 60:g} minutes"
            return key, RESET.format(grace=minutes), *skip[1:]
        with self.sessions.open(request) as bench:
            table, config, exported, dtype = adapter_table(bench.table()), bench.config, bench.exported, bench.dtype
            k_max = bench.k_max(config.method) if config else None
            held = ", ".join(bench.adapters) or "no adapters"
        whole = exported is not None and all(path.is_file() for path in exported.zips)
        status = f"Restored your session: {held}"
        setting = [gr.skip()] * 5
        if config:
            status += f"; {plots.setting_label(config, dtype)}"
            slider = gr.Slider(maximum=max(k_max, 2), value=min(config.num_components, k_max))
            setting = [config.method, slider, config.adaptive_k, config.variance_threshold, get_precision(dtype).flag]
        if whole:
            status += (
                f"; the latest export ({plots.setting_label(exported.config, exported.dtype)}) can be downloaded again"
            )
        files = download_buttons(exported) if whole else [gr.skip()] * 2
        return (key, markdown_text(status) + ".", table, *setting, *files)


def _shown(report) -> dict:
    return {"update": plots.k_moves(report), "summary": summary_text(report)}


def why_not_drawn(bench: Workbench) -> str | None:
    """Why the k tab cannot be drawn for these adapters (too few, or they do not fit together), as HTML for the
    summary; None when it can."""
    tasks, groups = list(bench.adapters), bench.groups()
    if not tasks:
        return "No adapters loaded: bring some in tab 1 (a shared subspace needs two or more)."
    if len(tasks) == 1:
        return f"One adapter loaded ({html.escape(tasks[0])}): add at least one more; a shared subspace needs two."
    if len(groups) > 1:
        misfits = [t for group in groups[1:] for t in group]
        return (
            f"<b>These adapters cannot share one subspace:</b> {html.escape(', '.join(misfits))} do not fit with "
            f"{html.escape(', '.join(groups[0]))} (the problem column in tab 1 says why). Keep one group with "
            "<i>Keep only this group</i> in tab 1, or remove the misfits, to tune k."
        )
    return None


def _group_label(group: list[str], rows: dict) -> str:
    first = rows[group[0]]
    rank = str(first.rank_min) if first.rank_min == first.rank_max else f"{first.rank_min}–{first.rank_max}"
    return f"{len(group)} × rank {rank} on {first.target_modules or '?'} ({first.layers} layers): {', '.join(group)}"
