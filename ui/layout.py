"""The workbench page: four tabs (adapters, k, A/B test, export), a status line, and the events wiring them.

Named API endpoints (for gradio_client): load_adapters, load_folder, load_path, load_demo, remove_adapters,
compress, load_model, ab_test, export, merge, merge_ab, check_behaviour, ab_behaviour (after ab_test), export_check
(after export). The page's own steps (``ui/page.py``: refreshing lists,
redrawing the k tab, a k change in place, claiming the session back after a reload, the status line after a
failure) are private.
"""

from __future__ import annotations

import gradio as gr
from gradio.utils import get_upload_folder

from vlora_core.base_model import DEFAULT_MAX_NEW_TOKENS, get_base_model
from vlora_core.behaviour import DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_EFFECT
from vlora_core.config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD
from vlora_core.merge import METHODS as MERGE_METHODS
from vlora_core.merge import MergeConfig
from vlora_core.methods import METHODS
from vlora_core.precision import PRECISIONS

from . import gpu
from .callbacks import PROMPT_COLUMNS, SUMMARY_CLASS, Callbacks
from .page import SHARED_EXAMPLE, PageSteps
from .session import Sessions
from .settings import AppSettings
from .workbench import AT_K_KIND, BASE_CHOICE, CHOICE_KINDS, demo_prompts

# Three lines of events, so that light work never waits behind heavy work (Gradio's default is one line per
# event, one at a time: a k change would wait for another session's SVDs). The heavy steps also hold the
# Sessions' gate inside the workbench, so an API call that turns heavy (a first compress) counts there too.
BASE_MODEL_QUEUE = "base_model"  # every event that runs the shared base model waits in this one line
HEAVY_QUEUE = "heavy"  # uploads, first SVDs of a basis, exports: AppSettings.heavy_jobs at a time
LIGHT_QUEUE = "light"  # k changes, tables, dropdowns: answered from what a session already holds
LIGHT_JOBS = 8
FALLBACK_PROMPTS = ["What is the tallest mountain in the world?", "How do I make a cup of tea?"]
INTRO = """# vlora workbench
Many PEFT LoRA adapters for one base model, stored as **one shared basis + tiny per-task loadings**.
Bring adapters → tune k (no SVD per change) → A/B test on the base model → download PEFT folders."""
SESSION_KEY = "vlora-session"  # the browser's storage entry that holds this page's session key (ui/session.py)
# BrowserState encrypts what it stores; with its default (a random secret per start) a page reloaded after a
# restart could not read its old key and would start afresh without a word. The key is a random capability in
# the user's own storage, so a fixed secret loses nothing, and the page can say that its session has ended.
SESSION_SECRET = "vlora-workbench-session"
# A k change in the page, shown at once: on the slider's input the page takes the entry for k from the table of
# every swept k (``PageSteps.k_table``, JSON text sent after each whole drawing and kept on window), moves only
# what a k changes in each figure (Plotly.update on the plots Gradio drew; its plot component puts Plotly on
# window) and rewrites the summary's text: no server round trip, no figure sent, not even Gradio's own dispatch
# (a listener of the page's own, installed on loading). The server still hears of the change (``set_k``) and
# answers for a k the table lacks, shown the same way. Tables and entries travel as text: a string costs
# Gradio's page nothing to copy, where a JSON value is deep-copied on every status change of every event.
PAGE_JS = """() => {
  const plots = {variance: "variance-plot", errors: "error-plot", storage: "storage-plot", bytes: "bytes-plot"};
  window.vloraShowK = (entry) => {
    if (!entry) return;
    for (const [name, u] of Object.entries(entry.update)) {
      const plot = document.querySelector(`#${plots[name]} .js-plotly-plot`);
      if (!plot || !window.Plotly || !plot._fullLayout) continue;
      // at its present size, which spares Plotly measuring the page four times; then sized by the window again
      const {width, height} = plot._fullLayout;
      window.Plotly.update(plot, u.data, {...u.layout, autosize: false, width, height}, u.traces);
      Object.assign(plot.layout, {autosize: true, width: undefined, height: undefined});
    }
    const summary = document.querySelector("#k-summary .SUMMARY_CLASS");
    if (summary) summary.innerHTML = entry.summary;
  };
  document.addEventListener("input", (event) => {  // before Gradio's own handling of the input, which waits a tick
    if (!event.target.closest || !event.target.closest("#k-slider") || !window.vloraKTable) return;
    window.vloraShowK(window.vloraKTable[String(Number(event.target.value))]);
  });
}""".replace("SUMMARY_CLASS", SUMMARY_CLASS)
KEEP_K_TABLE = "(table) => { window.vloraKTable = table ? JSON.parse(table) : null; }"
SHOW_K_ENTRY = "(entry) => { if (entry && window.vloraShowK) window.vloraShowK(JSON.parse(entry)); }"
# Shows the tab a step names (its id), by clicking its button: a gr.Tabs among an event's outputs would make the
# page deep-copy every component inside the tabs on every later event (hundreds of ms per k change).
SHOW_TAB = """(tab) => { if (tab) document.querySelector(`#stages button[data-tab-id="${tab}"]`)?.click(); }"""


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    """The Blocks of the workbench; nothing is loaded until someone uses it, except on ZeroGPU, where the base
    model is loaded (and placed) now, before any GPU call forks its worker: the documented pattern."""
    settings = settings or AppSettings.from_env()
    if gpu.on_zero_gpu():
        get_base_model(settings.model_source)
    # exported zips go straight into Gradio's cache (see ui/session.py): served as they are, gone with the session
    sessions = Sessions(settings, downloads=get_upload_folder())
    calls = Callbacks(sessions, settings)
    with gr.Blocks(title="vlora workbench", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"<small>{settings.limits_note()}</small>", elem_id="limits")
        status = gr.Markdown("Start by loading adapters.", label="status", elem_id="status")
        session_key = gr.BrowserState(None, storage_key=SESSION_KEY, secret=SESSION_SECRET)
        with gr.Tabs(elem_id="stages"):
            a = _adapters_tab(settings)
            k = _tune_tab()
            ab = _ab_tab(settings)
            ex = _export_tab()
        goto = gr.Textbox(visible=False)  # the tab a step asks to show (SHOW_TAB)
        _wire(calls, PageSteps(calls), settings, demo, session_key, status, goto, a, k, ab, ex)
        demo.unload(calls.end_session)
    demo.queue(max_size=64)
    return demo


def launch_options(settings: AppSettings | None = None) -> dict:
    """Arguments for ``demo.launch``: never a host or port (a Space and GRADIO_SERVER_* choose those), and no
    ``allowed_paths``: the session folders are never served, only the downloads in Gradio's cache."""
    settings = settings or AppSettings.from_env()
    return dict(max_file_size=settings.max_file_size, show_error=False)


# ---- the tabs -------------------------------------------------------------------------------------
def _adapters_tab(settings: AppSettings) -> dict:
    with gr.Tab("1 · Adapters", id="adapters"):
        with gr.Row(equal_height=False):
            with gr.Column():
                archive = gr.File(label="A zip of adapter folders", file_types=[".zip"], elem_id="adapters-zip")
                load_zip = gr.Button("Load zip", variant="primary", elem_id="load-zip")
            with gr.Column():
                folder = gr.File(label="One adapter folder", file_count="directory", elem_id="adapter-folder")
                folder_id = gr.Textbox(
                    label="Task id for this folder", placeholder="e.g. sentiment", elem_id="folder-task-id"
                )
                load_folder = gr.Button("Add folder", elem_id="load-folder")
            with gr.Column():
                path = gr.Textbox(
                    label="Server path (localhost only)",
                    placeholder="/data/adapters",
                    visible=settings.allow_server_paths,
                    elem_id="server-path",
                )
                load_path = gr.Button("Load path", visible=settings.allow_server_paths, elem_id="load-path")
                load_demo = gr.Button("Load demo adapters", elem_id="load-demo")
        table = gr.Dataframe(
            label="Adapters",
            interactive=False,
            wrap=True,
            column_widths=["12%", "6%", "6%", "12%", "6%", "8%", "50%"],  # the problem column's text, wrapped
            max_height=1000,
            elem_id="adapter-table",
        )
        with gr.Row(visible=False, elem_id="groups") as groups:  # shown when the adapters do not all fit together
            group = gr.Dropdown(
                label="These adapters cannot share one subspace: the groups that can", elem_id="group", scale=4
            )
            keep_group = gr.Button("Keep only this group", elem_id="keep-group", scale=1)
        with gr.Row():
            remove = gr.Dropdown(
                label="Tasks to remove (none chosen: all)",
                multiselect=True,
                allow_custom_value=True,
                elem_id="remove-tasks",
            )
            remove_button = gr.Button("Remove", elem_id="remove")
    return dict(
        archive=archive,
        load_zip=load_zip,
        folder=folder,
        folder_id=folder_id,
        load_folder=load_folder,
        path=path,
        load_path=load_path,
        load_demo=load_demo,
        table=table,
        groups=groups,
        group=group,
        keep_group=keep_group,
        remove=remove,
        remove_button=remove_button,
    )


def _tune_tab() -> dict:
    with gr.Tab("2 · Tune k", id="tune"):
        with gr.Row():
            method = gr.Radio(
                list(METHODS),
                value=DEFAULT_METHOD,
                label="Basis",
                elem_id="method",
                info=" · ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
            )
            k = gr.Slider(
                1, 64, value=DEFAULT_NUM_COMPONENTS, step=1, label="k (directions per layer side)", elem_id="k-slider"
            )
        with gr.Row():
            adaptive = gr.Checkbox(label="Adaptive k per layer side", elem_id="adaptive-k")
            threshold = gr.Slider(
                0.5,
                1.0,
                value=DEFAULT_VARIANCE_THRESHOLD,
                step=0.01,
                label="Variance to explain (adaptive k)",
                elem_id="threshold",
            )
            dtype = gr.Radio(
                [p.flag for p in PRECISIONS.values()],
                value=PRECISIONS["float32"].flag,
                label="Storage precision of the store",
                info=" · ".join(f"{p.flag}: {p.summary}" for p in PRECISIONS.values()),
                elem_id="dtype",
            )
        summary = gr.HTML(label="summary", elem_id="k-summary")
        with gr.Row():
            variance = gr.Plot(label="Variance explained", elem_id="variance-plot")
            errors = gr.Plot(label="ΔW error per task", elem_id="error-plot")
        with gr.Row():
            storage = gr.Plot(label="Storage versus error", elem_id="storage-plot")
            size = gr.Plot(label="Bytes", elem_id="bytes-plot")
        with gr.Accordion("Numbers", open=False):
            numbers = gr.JSON(label="numbers", elem_id="k-numbers")
        k_table = gr.Textbox(visible=False)  # every swept k as the page shows it (PAGE_JS; JSON text)
        k_shown = gr.Textbox(visible=False)  # the server's answer to a k change the table lacks (SHOW_K_ENTRY)
        behaviour = _behaviour_section()
    return dict(
        **behaviour,
        k_table=k_table,
        k_shown=k_shown,
        method=method,
        k=k,
        adaptive=adaptive,
        threshold=threshold,
        dtype=dtype,
        summary=summary,
        variance=variance,
        errors=errors,
        storage=storage,
        size=size,
        numbers=numbers,
    )


def _ab_tab(settings: AppSettings) -> dict:
    prompts = demo_prompts(settings.demo_prompts) or FALLBACK_PROMPTS
    with gr.Tab("3 · A/B test", id="ab") as tab:
        with gr.Row():
            source = gr.Textbox(
                settings.model_source,
                label="Base model",
                elem_id="model-source",
                info="'bundled' (SmolLM2-135M, offline), a local folder (localhost only) or an org/name hub id",
            )
            load_model = gr.Button("Load model", elem_id="load-model")
        prompt = gr.Textbox(prompts[0], label="Prompt", lines=2, max_length=settings.max_prompt_chars, elem_id="prompt")
        examples = gr.Dataset(  # the loaded tasks' own prompts first (ui/page.py)
            components=["textbox", "textbox"],
            headers=["for", "example prompt"],
            samples=[[SHARED_EXAMPLE, p] for p in prompts],
            type="index",
            layout="table",
            label="Example prompts",
            elem_id="ab-examples",
        )
        gr.Markdown(
            "A and B: *base model*, or a task — "
            + "; ".join(f"*{kind}*: {what}" for kind, what in CHOICE_KINDS.items())
            + f"; *{AT_K_KIND}*: the same basis at N directions per layer side (type any N)."
        )
        setting = gr.Markdown(elem_id="ab-setting")  # which setting *compressed* tests (filled when the tab opens)
        with gr.Row():
            choice_a = gr.Dropdown(
                [BASE_CHOICE], value=BASE_CHOICE, label="A", allow_custom_value=True, elem_id="choice-a"
            )
            choice_b = gr.Dropdown(
                [BASE_CHOICE], value=BASE_CHOICE, label="B", allow_custom_value=True, elem_id="choice-b"
            )
            max_new_tokens = gr.Slider(
                1,
                settings.max_new_tokens,
                value=min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens),
                step=1,
                label="New tokens",
                elem_id="max-new-tokens",
            )
        run = gr.Button("Generate A and B", variant="primary", elem_id="run-ab")
        with gr.Row():
            with gr.Column():
                text_a = gr.Textbox(label="output A", lines=6, elem_id="output-a")
                stats_a = gr.Markdown(label="stats A", elem_id="stats-a")
            with gr.Column():
                text_b = gr.Textbox(label="output B", lines=6, elem_id="output-b")
                stats_b = gr.Markdown(label="stats B", elem_id="stats-b")
        pair = gr.Markdown(elem_id="ab-pair")  # B against A on A's answer: KL and top-1 agreement
        with gr.Accordion("Numbers", open=False):
            numbers = gr.JSON(label="timings", elem_id="ab-numbers")
    return dict(
        tab=tab,
        examples=examples,
        setting=setting,
        source=source,
        load_model=load_model,
        prompt=prompt,
        choice_a=choice_a,
        choice_b=choice_b,
        max_new_tokens=max_new_tokens,
        run=run,
        text_a=text_a,
        stats_a=stats_a,
        text_b=text_b,
        stats_b=stats_b,
        pair=pair,
        numbers=numbers,
    )


def _export_tab() -> dict:
    with gr.Tab("4 · Export", id="export") as tab:
        setting = gr.Markdown(elem_id="export-setting")  # what an export writes, before it runs (ui/page.py)
        with gr.Row(equal_height=True):
            # the button beside the task list, not under it: a multiselect's open list would cover it
            tasks = gr.Dropdown(
                label="Tasks to export (none chosen: all)",
                multiselect=True,
                allow_custom_value=True,
                elem_id="export-tasks",
                scale=3,
            )
            run = gr.Button("Export at the current setting", variant="primary", elem_id="run-export", scale=1)
        with gr.Row():
            # A text box: an empty number box sends 0 from the browser, which is a value (refused), not "keep".
            alpha = gr.Textbox(
                label="lora_alpha to write (ΔW is unchanged; blank: each adapter's own)",
                placeholder="each adapter's own",
                elem_id="export-alpha",
            )
            base_model = gr.Textbox(label="base_model_name_or_path to write (blank: keep)", elem_id="export-base")
        verify = gr.Checkbox(
            True,
            label="Then check each task's behaviour (tab 2's prompts, A/B tab's base model)",
            elem_id="export-verify",
        )
        with gr.Row():  # clickable once an export exists (its zips' names on them)
            adapters_zip = gr.DownloadButton(
                "Download PEFT adapters (zip): export first", interactive=False, elem_id="download-adapters"
            )
            store_zip = gr.DownloadButton(
                "Download the vlora store (zip): export first", interactive=False, elem_id="download-store"
            )
        check = gr.Markdown(elem_id="export-check")
        merge = _merge_section()
    return dict(
        tab=tab,
        setting=setting,
        tasks=tasks,
        alpha=alpha,
        base_model=base_model,
        run=run,
        verify=verify,
        check=check,
        adapters_zip=adapters_zip,
        store_zip=store_zip,
        **merge,
    )


def _behaviour_section() -> dict:
    """Tab 2's behaviour check: prompts (a file, or typed per task), the thresholds, the check, its plot."""
    with gr.Accordion("Check behaviour: what each task still does at each k", open=True, elem_id="behaviour"):
        gr.Markdown(
            "Each task at each k against its original adapter and the base model (the A/B tab's), teacher-forced "
            "on the answers: **effect retained** (1: the adapter's whole effect, 0: as the base model) and **top-1 "
            "agreement**. Prompts: upload a JSON-lines file or type them below, one per row (task blank: every "
            "task's; answer blank: the original's own); none: the demo's prompts for the demo adapters, else a "
            "generic set. Each basis and prompt set is measured once; moving k only moves the marks."
        )
        with gr.Row():
            prompt_file = gr.File(label="Prompt file (JSON lines)", elem_id="behaviour-prompt-file", scale=1)
            with gr.Column(scale=1):
                min_effect = gr.Slider(
                    0.5, 1.0, value=DEFAULT_MIN_EFFECT, step=0.01, label="Effect retained to keep", elem_id="min-effect"
                )
                min_agreement = gr.Slider(
                    0.5,
                    1.0,
                    value=DEFAULT_MIN_AGREEMENT,
                    step=0.01,
                    label="Top-1 agreement to keep",
                    elem_id="min-agreement",
                )
        prompts = gr.Dataframe(
            headers=PROMPT_COLUMNS,
            column_count=3,
            interactive=True,
            wrap=True,
            label="Prompts (blank: the defaults)",
            elem_id="behaviour-prompts",
        )
        check = gr.Button("Check behaviour", variant="primary", elem_id="check-behaviour")
        verdict = gr.Markdown(elem_id="behaviour-summary")
        plot = gr.Plot(label="Behaviour over k", elem_id="behaviour-plot")
        with gr.Accordion("Behaviour numbers", open=False):
            numbers = gr.JSON(label="behaviour", elem_id="behaviour-numbers")
    return dict(
        prompt_file=prompt_file,
        min_effect=min_effect,
        min_agreement=min_agreement,
        prompts=prompts,
        check=check,
        verdict=verdict,
        behaviour_plot=plot,
        behaviour_numbers=numbers,
    )


def _merge_section() -> dict:
    """Merging the tasks chosen above into one adapter, on ΔW (``vlora merge``), and its A/B against its parts."""
    gr.Markdown(
        "### Merge tasks into one adapter\nThe tasks chosen above (none: all), merged on what they do, "
        "ΔW = scaling·B·A, from the adapters as loaded: *linear* Σ wᵢ·ΔWᵢ and *cat* (exact), *ties* and *dare* "
        "(their papers, on ΔW). A rank cuts each layer by its SVD; the error shown is exact."
    )
    with gr.Row():
        weights = gr.Textbox(
            label="Weights, one per task in order (blank: 1 each)", placeholder="1, -0.5", elem_id="merge-weights"
        )
        method = gr.Radio(list(MERGE_METHODS), value=MergeConfig.method, label="Method", elem_id="merge-method")
        density = gr.Slider(
            0.05, 1.0, value=MergeConfig.density, step=0.05, label="Density (ties, dare)", elem_id="merge-density"
        )
        rank = gr.Number(0, label="Rank (0: the method's own)", precision=0, minimum=0, elem_id="merge-rank")
        name = gr.Textbox("merged", label="Name of the merge", elem_id="merge-name")
    with gr.Row():
        merge = gr.Button("Merge", variant="primary", elem_id="run-merge")
        merge_zip = gr.DownloadButton("Download the merged adapter (zip)", elem_id="download-merge")
    with gr.Accordion("Merge numbers", open=False):
        merge_numbers = gr.JSON(label="merge", elem_id="merge-numbers")
    merge_prompt = gr.Textbox(FALLBACK_PROMPTS[0], label="Prompt", elem_id="merge-prompt")
    merge_ab = gr.Button("A/B the merge against its parts (A/B tab's base model)", elem_id="run-merge-ab")
    merge_outputs = gr.Dataframe(label="Merge and parts", interactive=False, wrap=True, elem_id="merge-outputs")
    return dict(
        merge_weights=weights,
        merge_method=method,
        merge_density=density,
        merge_rank=rank,
        merge_name=name,
        merge=merge,
        merge_zip=merge_zip,
        merge_numbers=merge_numbers,
        merge_prompt=merge_prompt,
        merge_ab=merge_ab,
        merge_outputs=merge_outputs,
    )


# ---- the events -----------------------------------------------------------------------------------
def _wire(calls: Callbacks, steps: PageSteps, settings: AppSettings, demo, session_key, status, goto, a, k, ab, ex):
    heavy = dict(concurrency_id=HEAVY_QUEUE, concurrency_limit=settings.heavy_jobs)
    light = dict(concurrency_id=LIGHT_QUEUE, concurrency_limit=LIGHT_JOBS)
    private = dict(api_visibility="private")
    listing = [a["table"], status]
    settings_in = [k["method"], k["k"], k["adaptive"], k["threshold"], k["dtype"]]  # tab 2's setting (ui/page.py)
    view = [k["summary"], k["variance"], k["errors"], k["storage"], k["size"], k["numbers"]]
    lists_out = [
        a["remove"], ex["tasks"], ab["choice_a"], ab["choice_b"], a["groups"], a["group"], ab["examples"]
    ]  # fmt: skip

    def told(event, step: str, outputs: list):
        """``event``, and on its failure the status line saying what failed and why (its other outputs' red
        marks cleared), until the next step."""
        kept = [o for o in outputs if o is not status]
        event.failure(steps.failed(step, len(kept)), None, [*kept, status], show_progress="hidden", **private, **light)
        return event

    # the public endpoints first: private events that reuse a function would take the plain api_name
    table_in = [k["method"], k["adaptive"], k["dtype"]]
    table = dict(fn=steps.k_table, inputs=table_in, outputs=[k["k_table"]], **private, **light)

    def kept(event):
        """``event`` (which sends the k table), then the table kept on the page for PAGE_JS's listener."""
        event.success(None, [k["k_table"]], None, js=KEEP_K_TABLE, **private)
        return event

    compressing = told(
        gr.on(
            [k["adaptive"].change, k["threshold"].change, k["dtype"].input],  # a step that sets dtype draws itself
            calls.compress,
            settings_in,
            [*view, status],
            api_name="compress",
            trigger_mode="always_last",
            show_progress="minimal",
            **light,  # a look-up once the basis is decomposed (a first compress holds the heavy gate)
        ),
        "Compressing",
        [*view, status],
    )
    kept(told(compressing.success(**table), "Listing every k", [k["k_table"]]))
    # a k change is shown at once from the table (PAGE_JS); the server makes it the session's setting (and answers
    # with what to show for a k the table lacks). On the user's input only: a step that sets the slider draws the
    # tab itself, and Gradio's slider can fire change after change on its own when one update moves its maximum and
    # value (seen switching between a basis of 2 and one of 12 directions): each set_k then rewrote the status line.
    demo.load(None, None, None, js=PAGE_JS, **private)
    told(
        k["k"].input(
            steps.set_k,
            settings_in,
            [k["numbers"], status, k["k_shown"]],
            trigger_mode="always_last",
            show_progress="hidden",
            **private,
            **light,
        ),
        "The k change",
        [k["numbers"], status],
    ).success(None, [k["k_shown"]], None, js=SHOW_K_ENTRY, **private)
    # another basis chosen by the user (a step that sets the basis draws the tab itself): shown at its last k
    switched = [*view, status, k["k"]]
    method = told(
        k["method"].input(steps.switch_basis, settings_in, switched, **private, **heavy), "Switching basis", switched
    )
    kept(told(method.success(**table), "Listing every k", [k["k_table"]]))

    def redrawn(event, show: bool):
        """After the adapters change: the lists, then the k tab drawn at a valid k with the slider sized (and shown,
        after loading) — or cleared with a word on why it cannot be drawn."""
        lists = told(event.success(steps.lists, None, lists_out, **private, **light), "Listing the tasks", lists_out)
        drawn = [*view, k["k"], k["k_table"], *([k["method"], k["dtype"], status, goto] if show else [])]
        draw, inputs = (steps.overview, [*settings_in, status]) if show else (steps.redraw, settings_in)
        drawing = kept(told(lists.success(draw, inputs, drawn, **private, **heavy), "Drawing the k tab", drawn))
        if show:
            drawing.success(None, [goto], None, js=SHOW_TAB, **private)

    loads = [
        (a["load_zip"], calls.load_adapters, [a["archive"]], "load_adapters"),
        (a["load_folder"], calls.load_folder, [a["folder"], a["folder_id"]], "load_folder"),
        (a["load_path"], calls.load_path, [a["path"]], "load_path"),
        (a["load_demo"], calls.load_demo, None, "load_demo"),
    ]
    for button, fn, inputs, name in loads:
        redrawn(told(button.click(fn, inputs, listing, api_name=name, **heavy), "Loading", listing), show=True)
    removing = a["remove_button"].click(
        calls.remove_adapters, [a["remove"]], listing, api_name="remove_adapters", **light
    )
    redrawn(told(removing, "Removing", listing), show=False)
    keeping = a["keep_group"].click(steps.keep_group, [a["group"]], listing, **private, **light)
    redrawn(told(keeping, "Keeping one group", listing), show=False)
    # a reload: the session the browser's key names comes back (adapters, setting, latest export), or is said gone
    restored = [
        session_key, status, a["table"], k["method"], k["k"], k["adaptive"], k["threshold"], k["dtype"],
        ex["adapters_zip"], ex["store_zip"],
    ]  # fmt: skip
    claim = demo.load(steps.restore, [session_key], restored, **private, **light)
    redrawn(told(claim, "Restoring the session", restored), show=False)

    told(
        ab["tab"].select(
            steps.ab_view,
            [ab["choice_a"], ab["choice_b"]],
            [ab["setting"], ab["choice_a"], ab["choice_b"]],
            **private,
            **light,
        ),
        "Opening the A/B tab",
        [ab["setting"], ab["choice_a"], ab["choice_b"]],
    )
    told(
        ab["examples"].click(steps.pick_example, [ab["examples"]], [ab["prompt"]], **private, **light),
        "Picking an example",
        [ab["prompt"]],
    )
    told(
        ab["load_model"].click(
            calls.load_model, [ab["source"]], [status], api_name="load_model", concurrency_id=BASE_MODEL_QUEUE
        ),
        "Loading the base model",
        [status],
    )
    ab_out = [ab["text_a"], ab["stats_a"], ab["text_b"], ab["stats_b"], ab["numbers"], status]
    ab_run = told(
        ab["run"].click(
            calls.ab_test,
            [ab["source"], ab["prompt"], ab["choice_a"], ab["choice_b"], ab["max_new_tokens"]],
            ab_out,
            api_name="ab_test",
            concurrency_id=BASE_MODEL_QUEUE,
        ),
        "The A/B test",
        ab_out,
    )

    told(
        ex["tab"].select(steps.export_view, None, [ex["setting"]], **private, **light),
        "Opening the export tab",
        [ex["setting"]],
    )
    export_out = [ex["adapters_zip"], ex["store_zip"], status]
    exporting = told(
        ex["run"].click(
            calls.export, [ex["tasks"], ex["alpha"], ex["base_model"]], export_out, api_name="export", **heavy
        ),
        "Exporting",
        export_out,
    )
    buttons = [ex["adapters_zip"], ex["store_zip"]]
    told(exporting.success(steps.export_buttons, None, buttons, **private, **light), "Naming the downloads", buttons)
    _wire_behaviour(calls, told, light, status, k, ab, ex, ab_run, exporting)
    merge_out = [ex["merge_zip"], ex["merge_numbers"], status]
    told(
        ex["merge"].click(
            calls.merge,
            [
                ex["tasks"],
                ex["merge_weights"],
                ex["merge_method"],
                ex["merge_density"],
                ex["merge_rank"],
                ex["merge_name"],
            ],
            merge_out,
            api_name="merge",
            **heavy,
        ),
        "Merging",
        merge_out,
    )
    told(
        ex["merge_ab"].click(
            calls.merge_ab,
            [ab["source"], ex["merge_prompt"], ab["max_new_tokens"]],
            [ex["merge_outputs"], status],
            api_name="merge_ab",
            concurrency_id=BASE_MODEL_QUEUE,
        ),
        "The merge A/B",
        [ex["merge_outputs"], status],
    )


def _wire_behaviour(calls: Callbacks, told, light: dict, status, k: dict, ab: dict, ex: dict, ab_run, exporting):
    """The behaviour check of tab 2, the pair line under the A/B outputs, the check after an export."""
    private = dict(api_visibility="private")
    model_line = dict(concurrency_id=BASE_MODEL_QUEUE)  # each of these runs the shared base model
    shown = [k["verdict"], k["behaviour_plot"], k["behaviour_numbers"]]
    told(
        k["prompt_file"].upload(calls.read_prompt_file, [k["prompt_file"]], [k["prompts"]], **private, **light),
        "Reading the prompt file",
        [k["prompts"]],
    )
    checked = [k["prompts"], *shown, status]
    told(
        k["check"].click(
            calls.check_behaviour,
            [k["method"], k["k"], k["adaptive"], ab["source"], k["prompts"], k["min_effect"], k["min_agreement"]],
            checked,
            api_name="check_behaviour",
            **model_line,
        ),
        "The behaviour check",
        checked,
    )
    marks = [k["k"].input, k["method"].change, k["adaptive"].change, k["min_effect"].change, k["min_agreement"].change]
    marks_in = [k["method"], k["k"], k["adaptive"], k["min_effect"], k["min_agreement"]]
    told(
        gr.on(marks, calls.behaviour_marks, marks_in, shown, show_progress="hidden", **private, **light),
        "Marking the behaviour check",
        shown,
    )
    told(
        ab_run.success(
            calls.ab_behaviour,
            [ab["source"], ab["prompt"], ab["choice_a"], ab["choice_b"], ab["text_a"]],
            [ab["pair"]],
            api_name="ab_behaviour",
            **model_line,
        ),
        "Comparing A and B",
        [ab["pair"]],
    )
    told(
        exporting.success(
            calls.export_check,
            [ex["verify"], ab["source"], k["prompts"], k["min_effect"]],
            [ex["check"]],
            api_name="export_check",
            **model_line,
        ),
        "Checking the export",
        [ex["check"]],
    )
