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

from . import plots
from .callbacks import Callbacks, adapter_table, compressed_line, numbers, summary_text
from .errors import failed_line, markdown_text, user_errors
from .workbench import AT_K_KIND, BASE_CHOICE, Workbench

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
        """After loading: the k tab drawn at the current setting with the k slider sized, and its id to show it, or,
        when the adapters cannot share a subspace yet, cleared with a word on why (the adapters tab stays in front).
        Returns (summary, four plots, numbers, k slider, k table, tab to show)."""
        return self._draw(method, k, adaptive_k, threshold, request, show=True)

    @user_errors
    def redraw(
        self,
        method: str,
        k: float,
        adaptive_k: bool,
        threshold: float,
        request: gr.Request,
        progress=gr.Progress(track_tqdm=True),
    ):
        """After removing adapters (or a reload): as ``overview``, without changing tabs."""
        return self._draw(method, k, adaptive_k, threshold, request, show=False)

    def _draw(self, method: str, k: float, adaptive_k: bool, threshold: float, request: gr.Request, show: bool):
        with self.sessions.open(request) as bench:
            blocker = why_not_drawn(bench)
            k_max = None if blocker else bench.k_max(method)  # the first look at the basis: SVDs, once
        tab = ["" if blocker else "tune"] if show else []  # the tab to show: the k tab, once it is drawn
        if blocker:
            return (blocker, None, None, None, None, None, gr.skip(), "", *tab)
        k = max(1, min(int(k), k_max))
        drawn = self.calls.compress(method, k, adaptive_k, threshold, request)
        table = self.k_table(method, adaptive_k, request)
        return (*drawn[:-1], gr.Slider(maximum=max(k_max, 2), value=k), table, *tab)

    @user_errors
    def k_range(self, method: str, k: float, request: gr.Request):
        """The k slider's end: the most directions this basis has; k moves down to it."""
        with self.sessions.open(request) as bench:
            k_max = bench.k_max(method)
        return gr.Slider(maximum=max(k_max, 2), value=min(int(k), k_max))

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
    def k_table(self, method: str, adaptive_k: bool, request: gr.Request):
        """Every uniform k the sweep holds, as the page shows it: {k: {"update": what moves in each figure
        (``plots.k_moves``), "summary": the summary's text}} as JSON text; "" while adaptive k decides or
        nothing can be drawn."""
        with self.sessions.open(request) as bench:
            if adaptive_k or why_not_drawn(bench):
                return ""
            reports = bench.sweep_reports(method)
        return plots.as_json({k: _shown(report) for k, report in reports.items()})

    @user_errors
    def set_k(self, method: str, k: float, adaptive_k: bool, threshold: float, request: gr.Request):
        """A k change: it becomes the session's setting (for the A/B test and the export). Returns (numbers,
        status, what to show): what to show is "" when the page's table holds this k (the page has shown it
        already), else the table's entry for it as JSON text. Nothing while adaptive k decides."""
        if adaptive_k:
            return gr.skip(), gr.skip(), gr.skip()
        config = CompressConfig(int(k) if float(k).is_integer() else k, method, False, float(threshold))
        with self.sessions.open(request) as bench:
            report = bench.report(config, progress=True)
            in_table = config.num_components in bench.sweep_reports(method)
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
        table, method, k, adaptive, threshold, adapters zip, store zip)."""
        key, restored = self.sessions.claim(request, stored)
        skip = [gr.skip()] * 8
        if restored is None:
            return key, *skip
        if not restored:
            minutes = f"{self.settings.reload_grace_s / 60:g} minutes"
            return key, RESET.format(grace=minutes), *skip[1:]
        with self.sessions.open(request) as bench:
            table, config, exported = adapter_table(bench.table()), bench.config, bench.exported
            k_max = bench.k_max(config.method) if config else None
            held = ", ".join(bench.adapters) or "no adapters"
        files = [exported.adapters_zip, exported.store_zip] if exported else []
        files = [str(f) for f in files if f.is_file()]
        status = f"Restored your session: {held}"
        setting = [gr.skip()] * 4
        if config:
            status += f"; {plots.setting_label(config)}"
            slider = gr.Slider(maximum=max(k_max, 2), value=min(config.num_components, k_max))
            setting = [config.method, slider, config.adaptive_k, config.variance_threshold]
        if len(files) == 2:
            status += f"; the latest export ({plots.setting_label(exported.config)}) can be downloaded again"
        return (key, markdown_text(status) + ".", table, *setting, *(files if len(files) == 2 else [gr.skip()] * 2))


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
