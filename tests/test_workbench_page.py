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
        calls.compress("flat", 2, False, 0.9, page("q"))
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
    table = json.loads(steps.k_table("flat", False, page("p")))
    assert set(table) == {str(k) for k in bench.sweep_reports("flat")}
    assert "k = 1" in table["1"]["summary"] and "k = 1" in table["1"]["update"]["variance"]["layout"]["title.text"]
    numbers, status, shown = steps.set_k("flat", 1, False, 0.9, page("p"))
    assert shown == "" and numbers["k"] == 1 and "k = 1" in status  # the page shows it from its table
    with calls.sessions.open(page("p")) as mine:
        assert mine.config == CompressConfig(1, "flat")  # the session's setting, for the A/B test and export
    assert steps.k_table("flat", True, page("p")) == ""  # adaptive k: no table


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
