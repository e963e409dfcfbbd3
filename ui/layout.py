"""The workbench page: four tabs (adapters, k, A/B test, export), a status line, and the events wiring them.

Named API endpoints (for gradio_client): load_adapters, load_folder, load_path, load_demo, remove_adapters,
compress, load_model, ab_test, export, merge, merge_ab. Follow-up steps (refreshing dropdowns, the k slider's range) are private.
"""

from __future__ import annotations

import gradio as gr
from gradio.utils import get_upload_folder

from vlora_core.base_model import DEFAULT_MAX_NEW_TOKENS
from vlora_core.config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD
from vlora_core.merge import METHODS as MERGE_METHODS
from vlora_core.merge import MergeConfig
from vlora_core.methods import METHODS

from .callbacks import Callbacks
from .session import Sessions
from .settings import AppSettings
from .workbench import BASE_CHOICE, CHOICE_KINDS, demo_prompts

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


def build_app(settings: AppSettings | None = None) -> gr.Blocks:
    """The Blocks of the workbench; nothing is loaded until someone uses it."""
    settings = settings or AppSettings.from_env()
    # exported zips go straight into Gradio's cache (see ui/session.py): served as they are, gone with the session
    sessions = Sessions(settings, downloads=get_upload_folder())
    calls = Callbacks(sessions, settings)
    with gr.Blocks(title="vlora workbench", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"<small>{settings.limits_note()}</small>", elem_id="limits")
        status = gr.Markdown("Start by loading adapters.", label="status", elem_id="status")
        with gr.Tabs(elem_id="stages") as tabs:
            a = _adapters_tab(settings)
            k = _tune_tab()
            ab = _ab_tab(settings)
            ex = _export_tab()
        _wire(calls, settings, status, tabs, a, k, ab, ex)
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
        table = gr.Dataframe(label="Adapters", interactive=False, wrap=True, elem_id="adapter-table")
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
        summary = gr.Markdown(label="summary", elem_id="k-summary")
        with gr.Row():
            variance = gr.Plot(label="Variance explained", elem_id="variance-plot")
            errors = gr.Plot(label="ΔW error per task", elem_id="error-plot")
        with gr.Row():
            storage = gr.Plot(label="Storage versus error", elem_id="storage-plot")
            size = gr.Plot(label="Bytes", elem_id="bytes-plot")
        with gr.Accordion("Numbers", open=False):
            numbers = gr.JSON(label="numbers", elem_id="k-numbers")
    return dict(
        method=method,
        k=k,
        adaptive=adaptive,
        threshold=threshold,
        summary=summary,
        variance=variance,
        errors=errors,
        storage=storage,
        size=size,
        numbers=numbers,
    )


def _ab_tab(settings: AppSettings) -> dict:
    prompts = demo_prompts(settings.demo_prompts) or FALLBACK_PROMPTS
    with gr.Tab("3 · A/B test", id="ab"):
        with gr.Row():
            source = gr.Textbox(
                settings.model_source,
                label="Base model",
                elem_id="model-source",
                info="'bundled' (SmolLM2-135M, offline), a local folder (localhost only) or an org/name hub id",
            )
            load_model = gr.Button("Load model", elem_id="load-model")
        prompt = gr.Textbox(prompts[0], label="Prompt", lines=2, max_length=settings.max_prompt_chars, elem_id="prompt")
        gr.Examples([[p] for p in prompts], inputs=[prompt], label="Example prompts")
        gr.Markdown(
            "A and B: *base model*, or a task — "
            + "; ".join(f"*{kind}*: {what}" for kind, what in CHOICE_KINDS.items())
            + "."
        )
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
        with gr.Accordion("Numbers", open=False):
            numbers = gr.JSON(label="timings", elem_id="ab-numbers")
    return dict(
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
        numbers=numbers,
    )


def _export_tab() -> dict:
    with gr.Tab("4 · Export", id="export"):
        tasks = gr.Dropdown(
            label="Tasks to export (none chosen: all)",
            multiselect=True,
            allow_custom_value=True,
            elem_id="export-tasks",
        )
        with gr.Row():
            # A text box: an empty number box sends 0 from the browser, which is a value (refused), not "keep".
            alpha = gr.Textbox(
                label="lora_alpha to write (ΔW is unchanged; blank: each adapter's own)",
                placeholder="each adapter's own",
                elem_id="export-alpha",
            )
            base_model = gr.Textbox(label="base_model_name_or_path to write (blank: keep)", elem_id="export-base")
        run = gr.Button("Export at the current k", variant="primary", elem_id="run-export")
        with gr.Row():
            adapters_zip = gr.DownloadButton("Download PEFT adapters (zip)", elem_id="download-adapters")
            store_zip = gr.DownloadButton("Download the vlora store (zip)", elem_id="download-store")
        merge = _merge_section()
    return dict(
        tasks=tasks,
        alpha=alpha,
        base_model=base_model,
        run=run,
        adapters_zip=adapters_zip,
        store_zip=store_zip,
        **merge,
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
def _wire(calls: Callbacks, settings: AppSettings, status, tabs, a: dict, k: dict, ab: dict, ex: dict) -> None:
    heavy = dict(concurrency_id=HEAVY_QUEUE, concurrency_limit=settings.heavy_jobs)
    light = dict(concurrency_id=LIGHT_QUEUE, concurrency_limit=LIGHT_JOBS)
    listing = [a["table"], status]
    settings_in = [k["method"], k["k"], k["adaptive"], k["threshold"]]
    plots_out = [k["summary"], k["variance"], k["errors"], k["storage"], k["size"], k["numbers"], status]
    lists_out = [a["remove"], ex["tasks"], ab["choice_a"], ab["choice_b"]]

    # the public endpoints first: private events that reuse a function would take the plain api_name
    gr.on(
        [k["k"].change, k["adaptive"].change, k["threshold"].change],
        calls.compress,
        settings_in,
        plots_out,
        api_name="compress",
        trigger_mode="always_last",
        show_progress="minimal",
        **light,  # a look-up once the basis is decomposed (a first compress holds the heavy gate)
    )
    k["method"].change(calls.compress, settings_in, plots_out, api_visibility="private", **heavy).success(
        calls.k_range, [k["method"], k["k"]], [k["k"]], api_visibility="private", **light
    )

    def after_loading(event):
        """Refresh the task lists; then draw the k tab at the current setting, size the slider, show the tab."""
        event.success(calls.adapter_lists, None, lists_out, api_visibility="private", **light).success(
            calls.overview, settings_in, plots_out + [k["k"], tabs], api_visibility="private", **heavy
        )

    loads = [
        (a["load_zip"], calls.load_adapters, [a["archive"]], "load_adapters"),
        (a["load_folder"], calls.load_folder, [a["folder"], a["folder_id"]], "load_folder"),
        (a["load_path"], calls.load_path, [a["path"]], "load_path"),
        (a["load_demo"], calls.load_demo, None, "load_demo"),
    ]
    for button, fn, inputs, name in loads:
        after_loading(button.click(fn, inputs, listing, api_name=name, **heavy))
    a["remove_button"].click(
        calls.remove_adapters, [a["remove"]], listing, api_name="remove_adapters", **light
    ).success(calls.adapter_lists, None, lists_out, api_visibility="private", **light)

    ab["load_model"].click(
        calls.load_model, [ab["source"]], [status], api_name="load_model", concurrency_id=BASE_MODEL_QUEUE
    )
    ab["run"].click(
        calls.ab_test,
        [ab["source"], ab["prompt"], ab["choice_a"], ab["choice_b"], ab["max_new_tokens"]],
        [ab["text_a"], ab["stats_a"], ab["text_b"], ab["stats_b"], ab["numbers"], status],
        api_name="ab_test",
        concurrency_id=BASE_MODEL_QUEUE,
    )

    ex["run"].click(
        calls.export,
        [ex["tasks"], ex["alpha"], ex["base_model"]],
        [ex["adapters_zip"], ex["store_zip"], status],
        api_name="export",
        **heavy,
    )
    ex["merge"].click(
        calls.merge,
        [ex["tasks"], ex["merge_weights"], ex["merge_method"], ex["merge_density"], ex["merge_rank"], ex["merge_name"]],
        [ex["merge_zip"], ex["merge_numbers"], status],
        api_name="merge",
        **heavy,
    )
    ex["merge_ab"].click(
        calls.merge_ab,
        [ab["source"], ex["merge_prompt"], ab["max_new_tokens"]],
        [ex["merge_outputs"], status],
        api_name="merge_ab",
        concurrency_id=BASE_MODEL_QUEUE,
    )
