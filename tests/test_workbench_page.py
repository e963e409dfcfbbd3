"""The workbench page's own steps (issue 17) in plain Python: a session claimed back after a reload, the words of a
failure kept for the status line, a k change's moves, the groups that fit together, two k of one task in the A/B
test, the example prompts. The browser tests (tests/test_browser.py) show the same things in a page.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from conftest import write_adapter  # noqa: E402

from ui import plots  # noqa: E402
from ui.callbacks import Callbacks  # noqa: E402
from ui.errors import failed_line  # noqa: E402
from ui.page import PageSteps  # noqa: E402
from ui.session import Sessions  # noqa: E402
from ui.settings import AppSettings  # noqa: E402
from ui.workbench import Workbench, parse_choice, prompt_file  # noqa: E402
from vlora_core import CompressConfig, VLoRAModel  # noqa: E402
from vlora_core.errors import VLoRAError  # noqa: E402


def page(name: str) -> SimpleNamespace:
    """A request as Gradio hands it to a callback: only its session hash matters here."""
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def bench(tmp_path, adapter_dirs):
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_path(adapter_dirs[0].parent)
    return bench


# ---- a reload finds its session ---------------------------------------------------------------------------
def test_a_page_claims_its_session_back_until_it_has_ended(tmp_path):
    sessions = Sessions(AppSettings(session_root=tmp_path, reload_grace_s=3600))
    key, restored = sessions.claim(page("first"), None)  # a first visit: nothing stored
    assert restored is None and len(key) >= 40
    with sessions.open(page("first")) as bench:
        bench.adapters["x"] = "held"
    again, restored = sessions.claim(page("reloaded"), key)  # the same browser after a reload
    assert (again, restored) == (key, True)
    with sessions.open(page("reloaded")) as bench:
        assert bench.adapters == {"x": "held"}
    sessions.close(page("first"))  # the old page's unload: the reloaded page still holds it
    sessions.close(page("reloaded"))  # the last page went: kept for a reload until reload_grace_s
    assert len(sessions) == 1
    sessions._grace_s = -1
    fresh, restored = sessions.claim(page("later"), key)  # claiming ends the sessions past their time first
    assert restored is False and fresh != key
    with sessions.open(page("later")) as bench:
        assert bench.adapters == {}


def test_a_page_cannot_claim_a_key_the_server_did_not_give_it(tmp_path):
    sessions = Sessions(AppSettings(session_root=tmp_path))
    with sessions.open(page("api-client")) as bench:  # an API client: its key is its session hash
        bench.adapters["theirs"] = "held"
    for stored in ("api-client", "made-up", 42, ["x"]):
        key, restored = sessions.claim(page(f"page-{stored}"), stored)
        assert restored is False and key not in ("api-client", "made-up")
        with sessions.open(page(f"page-{stored}")) as bench:
            assert bench.adapters == {}
    sessions.close(page("api-client"))  # a session no page holds ends when its client goes
    assert "api-client" not in sessions._sessions


# ---- a failure's words stay -------------------------------------------------------------------------------
def test_a_failures_words_wait_for_the_status_line(tmp_path):
    calls = Callbacks(Sessions(AppSettings(session_root=tmp_path)), AppSettings())
    steps = PageSteps(calls)
    with pytest.raises(gr.Error):
        calls.load_adapters(None, page("p"))
    with pytest.raises(gr.Error, match="no adapters loaded yet"):  # the core's error, as a toast
        calls.compress("flat", 2, False, 0.9, "fp32", page("q"))
    report = steps.failed("Loading", 1)
    assert report(page("p")) == (gr.skip(), "**✖ Loading failed:** choose a .zip of adapter folders first.")
    assert report(page("p"))[1].startswith("**✖ Loading failed:** the page refused")  # taken once
    assert "no adapters loaded yet; upload a zip" in steps.failed("Compressing", 0)(page("q"))
    assert failed_line("Exporting", "a_b*c <d>") == r"**✖ Exporting failed:** a\_b\*c \<d\>"


# ---- a k change moves only what changes --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flat", "rank"])
def test_k_moves_hold_everything_a_k_changes(bench, method):
    """Between any two k of the sweep, the figures differ only where K_MOVES says; moving the first by the second's
    moves gives the second."""
    reports = bench.sweep_reports(method)
    assert sorted(reports) == bench._decompositions[method].sweep.ks
    ks = sorted(reports)
    for k1, k2 in zip(ks, ks[1:]):
        for name, draw in plots._DRAWN.items():
            before, after = (json.loads(plots.as_json(draw(reports[k]))) for k in (k1, k2))
            moves = json.loads(plots.as_json(plots.k_moves(reports[k2])))[name]
            for key, values in moves["data"].items():
                for i, value in zip(moves["traces"], values):
                    before["data"][i][key] = value
            for path, value in moves["layout"].items():
                *parents, last = path.split(".")
                node = before["layout"]
                for part in parents:
                    node = node[part]
                node[last] = value
            assert before == after, (name, k1, k2)
    assert reports[ks[0]].task_errors != reports[ks[-1]].task_errors  # the sweep's k do differ


def test_a_k_the_page_holds_is_not_sent_again(bench, tmp_path):
    calls = Callbacks(Sessions(AppSettings(session_root=tmp_path)), AppSettings())
    steps = PageSteps(calls)
    with calls.sessions.open(page("p")) as mine:
        mine.adapters = dict(bench.adapters)
    table = json.loads(steps.k_table("flat", False, "fp32", page("p")))
    assert set(table) == {str(k) for k in bench.sweep_reports("flat")}
    assert "k = 1" in table["1"]["summary"] and "k = 1" in table["1"]["update"]["variance"]["layout"]["title.text"]
    numbers, status, shown = steps.set_k("flat", 1, False, 0.9, "fp32", page("p"))
    assert shown == "" and numbers["k"] == 1 and "k = 1" in status  # the page shows it from its table
    with calls.sessions.open(page("p")) as mine:
        assert mine.config == CompressConfig(1, "flat")  # the session's setting, for the A/B test and export
    assert steps.k_table("flat", True, "fp32", page("p")) == ""  # adaptive k: no table


# ---- misfits: the groups that fit together --------------------------------------------------------------------
def test_misfits_are_told_against_the_largest_group(tmp_path, adapter_dirs):
    root = tmp_path / "mixed"
    write_adapter(root / "a-wide", seed=9, r=8)  # first in the folder, but a group of its own
    write_adapter(root / "b-narrow", seed=10, targets=("q_proj",))
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_path(root)
    bench.add_path(adapter_dirs[0].parent)
    groups = bench.groups()
    assert groups[0] == sorted(d.name for d in adapter_dirs) and sorted(map(len, groups[1:])) == [1, 1]
    problems = {row.task_id: row.problem for row in bench.table()}
    assert {t for t, p in problems.items() if p} == {"a-wide", "b-narrow"}
    assert "rank 8 differs from rank 4 (qa)" in problems["a-wide"]
    calls = Callbacks(Sessions(AppSettings(session_root=tmp_path / "app")), AppSettings())
    with calls.sessions.open(page("p")) as mine:
        mine.adapters = dict(bench.adapters)
    table, status = PageSteps(calls).keep_group("0", page("p"))
    assert list(table["task id"]) == groups[0] and "removed 2 (a-wide, b-narrow)" in status


# ---- the A/B test: two k of one task --------------------------------------------------------------------------
def test_a_task_at_another_k_is_that_k_of_the_same_basis(bench, input_ids):
    from conftest import tiny_llama

    bench.report(CompressConfig(3, "flat"))
    both = bench.ab_subspace(["compressed k=1: qa", "compressed k=2: qa"])
    served = VLoRAModel(tiny_llama(0), both)
    for k in (1, 2):
        bench.report(CompressConfig(k, "flat"))
        alone = VLoRAModel(tiny_llama(0), bench.ab_subspace())
        alone.set_task("compressed: qa")
        served.set_task(f"compressed k={k}: qa")
        with torch.no_grad():
            assert torch.allclose(served(input_ids).logits, alone(input_ids).logits, atol=1e-5)
    assert parse_choice("compressed k=16: qa", ["qa"]) == ("compressed k=16", "qa")
    for bad in ("compressed k=0: qa", "compressed k=x: qa", "compressed k=N: qa"):
        with pytest.raises(VLoRAError, match="compressed k=N: <task>"):
            parse_choice(bad, ["qa"])


def test_example_prompts_put_the_loaded_tasks_own_first(tmp_path, adapter_dirs):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "shared one"}\n{"prompt": "for qa", "task": "qa"}\n{"prompt": "for nobody", "task": "absent"}\n'
    )
    bench = Workbench(tmp_path / "session", AppSettings(demo_prompts=prompts))
    assert bench.example_prompts() == [(None, "shared one")]  # before any adapter: the shared ones
    bench.add_path(adapter_dirs[0].parent)
    assert bench.example_prompts() == [("qa", "for qa"), (None, "shared one")]
    old = tmp_path / "prompts.json"
    old.write_text(json.dumps({"shared": ["s"], "by_task": {"qa": ["q"]}}))
    assert [(p.task, p.text) for p in prompt_file(old)] == [(None, "s"), ("qa", "q")]
    prompts.write_text("not json\n")
    assert prompt_file(prompts) == []  # examples are a convenience: a damaged file gives none


# ---- honest sizes, the store's precision, the export's names, the basis to start on (points 7-9) ---------------
def test_sizes_are_said_as_they_are():
    assert plots.size_words(100, 300) == "×3.0 smaller than the adapters"
    assert plots.size_words(600, 300) == "×2.0 larger than the adapters"
    for stored in (300, 301, 310, 314, 900):  # at least as big: never "smaller"
        assert "smaller" not in plots.size_words(stored, 300) and "larger" in plots.size_words(stored, 300)
    assert plots.size_words(290, 300) == "about the same size as the adapters (3.3% smaller)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_bytes_and_break_even_are_the_stores_own(bench, tmp_path, dtype):
    """The bytes a k view counts are those its store takes on disk in that precision, and the break-even k is
    the last k whose store is smaller than the adapters."""
    from vlora_core import quality

    full = bench._decomposition("rank", progress=False).full
    original = bench._decompositions["rank"].original_bytes
    k_max = bench.k_max("rank")
    for k in (1, 2, k_max):
        view = full.truncated(k)
        view.set_dtype(dtype)
        folder = view.save(tmp_path / f"store-{dtype}-{k}")
        on_disk = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        counted = sum(quality.cut_bytes(full, k, dtype))
        assert counted == quality.stored_bytes(view) and counted <= on_disk <= counted + 64 * 1024  # + headers
    even = quality.break_even_k(full, original, dtype)
    sizes = {k: sum(quality.cut_bytes(full, k, dtype)) for k in range(1, k_max + 1)}
    assert even == max((k for k, size in sizes.items() if size < original), default=None)
    report = bench.report(CompressConfig(2, "rank"), dtype=dtype)
    assert (report.dtype, report.break_even_k, report.stored_bytes) == (dtype, even, sizes[2])


def test_a_store_in_int8_is_a_quarter_and_its_export_says_its_setting(bench, tmp_path):
    import zipfile

    from vlora_core import SharedSubspace

    fp32 = bench.report(CompressConfig(2, "flat"), dtype="fp32")
    int8 = bench.report(CompressConfig(2, "flat"), dtype="int8")
    assert int8.stored_bytes < 0.3 * fp32.stored_bytes and "stored in int8" in plots.setting_label(int8.config, "int8")
    exported = bench.export()
    assert (exported.adapters_zip.name, exported.store_zip.name) == (
        "vlora-adapters-flat-k2-int8.zip",
        "vlora-store-flat-k2-int8.zip",
    )
    with zipfile.ZipFile(exported.store_zip) as zf:
        assert {name.split("/")[0] for name in zf.namelist()} == {"vlora-store-flat-k2-int8"}  # one folder
        zf.extractall(tmp_path / "unzipped")
    store = SharedSubspace.load(tmp_path / "unzipped" / "vlora-store-flat-k2-int8")
    assert store.dtype == "int8" and store.task_ids == sorted(bench.adapters)
    for task_id, written in exported.written.items():  # PEFT folders in the originals' own dtype, full size
        original = bench.adapters[task_id]
        assert written.num_bytes == original.num_bytes and written.ranks == original.ranks


def test_setting_slugs_and_store_folders():
    from pathlib import Path

    from ui.workbench import setting_slug, store_folder

    assert setting_slug(CompressConfig(16, "rank")) == "rank-k16"
    assert setting_slug(CompressConfig(4, "flat", True, 0.9), "bf16") == "flat-adaptive0.9-bf16"
    assert store_folder(Path("/x/vlora-store-rank-k16.zip")) == "vlora-store-rank-k16"


def test_the_basis_that_keeps_more_at_equal_bytes_is_chosen(bench):
    from ui.workbench import compare_curves

    rank_better = {"flat": ([10, 20, 30], [0.5, 0.3, 0.0]), "rank": ([5, 10, 15], [0.4, 0.2, 0.1])}
    assert compare_curves(rank_better, 40)[0] == "rank"
    flat_better = {"flat": ([5, 10, 15], [0.1, 0.05, 0.0]), "rank": ([5, 10, 15], [0.4, 0.2, 0.1])}
    assert compare_curves(flat_better, 40)[0] == "flat"
    same = {"rank": ([5, 10], [0.2, 0.1]), "flat": ([5, 10], [0.2, 0.1])}
    assert compare_curves(same, 40) == ("flat", "flat basis (the default): the bases measure the same here "
                                        "(mean ΔW error 15.0%)")  # fmt: skip
    never_smaller = {"flat": ([50, 60], [0.1, 0.0]), "rank": ([45, 55], [0.3, 0.0])}  # no store below 40 bytes
    assert compare_curves(never_smaller, 40)[0] == "flat"
    method, why = bench.preferred_method()  # the workbench compares its own sweeps the same way
    found = {m: bench._decompositions[m] for m in ("flat", "rank")}
    curves = {m: (d.sized("float32")[0], d.curve_mean) for m, d in found.items()}
    assert (method, why) == compare_curves(curves, found["flat"].original_bytes)
    assert CompressConfig().method == "flat"  # the CLI and library keep the spec's default


def test_switching_basis_and_back_restores_its_k_and_the_export_tab_says_the_setting(bench, tmp_path):
    calls = Callbacks(Sessions(AppSettings(session_root=tmp_path)), AppSettings())
    steps = PageSteps(calls)
    with calls.sessions.open(page("p")) as mine:
        mine.adapters = dict(bench.adapters)
    assert steps.export_view(page("p")).startswith("Exports at **flat basis")  # before a setting: the default one
    calls.compress("flat", 3, False, 0.9, "fp32", page("p"))
    *_, slider = steps.switch_basis("rank", 5, False, 0.9, "fp32", page("p"))  # first time: the slider's k
    assert slider.value == 5
    calls.compress("rank", 2, False, 0.9, "bf16", page("p"))
    *_, slider = steps.switch_basis("flat", 2, False, 0.9, "bf16", page("p"))
    assert slider.value == 3  # flat's last k
    *_, slider = steps.switch_basis("rank", 3, False, 0.9, "bf16", page("p"))
    assert slider.value == 2
    said = steps.export_view(page("p"))
    assert "rank basis, k = 2, stored in bf16" in said and "full-size" in said
    assert "vlora-adapters-rank-k2-bf16.zip" in said and "vlora info vlora-store-rank-k2-bf16" in said


def test_loading_opens_tab_2_on_the_better_basis_in_the_clis_precision(tmp_path, adapter_dirs):
    from safetensors.torch import load_file, save_file

    calls = Callbacks(Sessions(AppSettings(session_root=tmp_path / "app")), AppSettings())
    steps = PageSteps(calls)
    low = tmp_path / "bf16"
    for folder in adapter_dirs:  # the same adapters saved in bf16, as many are published
        (low / folder.name).mkdir(parents=True)
        (low / folder.name / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: v.bfloat16() for k, v in weights.items()}, low / folder.name / "adapter_model.safetensors")
    for root, flag in ((adapter_dirs[0].parent, "fp32"), (low, "bf16")):
        with calls.sessions.open(page(flag)) as mine:
            mine.add_path(root)
            method = mine.preferred_method()[0]
        *drawn, shown_method, dtype, status, tab = steps.overview("flat", 2, False, 0.9, "fp32", "Loaded.", page(flag))
        assert (shown_method, dtype, tab) == (method, flag, "tune") and f"opened on the {method} basis" in status
        assert f"stored in {flag}" in drawn[0]  # the summary counts bytes in that precision


def test_on_zero_gpu_the_base_model_is_loaded_before_launch(monkeypatch, tmp_path):
    """ZeroGPU's documented pattern: the model is loaded and placed at start-up, outside any GPU call; elsewhere
    nothing is loaded until someone uses it."""
    import ui.layout

    loaded = []
    monkeypatch.setattr(ui.layout, "get_base_model", lambda source: loaded.append(source))
    settings = AppSettings(session_root=tmp_path, model_source="some/model")
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    ui.layout.build_app(settings)
    assert loaded == []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    ui.layout.build_app(settings)
    assert loaded == ["some/model"]
