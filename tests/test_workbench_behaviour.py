"""Behaviour in the workbench (issue 13): the k tab's check (each basis and prompt set measured once, the current
and recommended k marked), the A/B pair line and the check after an export, in plain Python and through the API.

Adapters are real PEFT folders written by peft; the base model is a tiny Llama built from a config with a byte
tokenizer, saved to a folder the app loads like any local model.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import api_client, served  # noqa: E402

import ui.checks  # noqa: E402
from ui.callbacks import PROMPT_COLUMNS  # noqa: E402
from ui.settings import AppSettings  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from vlora_core import CompressConfig, SharedSubspace, load_adapter  # noqa: E402
from vlora_core.base_model import load_base_model  # noqa: E402
from vlora_core.behaviour import effect_warnings, evaluate, recommend  # noqa: E402
from vlora_core.io.prompts import GENERIC_PROMPTS, Prompt, prompt_rows, write_prompts  # noqa: E402

PROMPTS = (
    Prompt("hello there", answer=" general kenobi"),
    Prompt("the cat sat on"),
    Prompt("one two three"),
    Prompt("a b c d e f", task="qa"),
)
TASKS = ["qa", "sentiment", "summarization", "translation"]  # adapter_dirs, as loaded from their parent folder


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base_model(str(tiny_model_dir))


@pytest.fixture
def bench(tmp_path, adapter_dirs):
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_path(adapter_dirs[0].parent)
    return bench


def expected_report(tiny, adapter_dirs, method, ks, prompts=PROMPTS):
    """The core's own report for the same adapters, k and prompts."""
    model, tokenizer = tiny
    adapters = [load_adapter(d) for d in sorted(adapter_dirs)]
    full = SharedSubspace.decompose(adapters, [d.name for d in sorted(adapter_dirs)], method=method)
    return evaluate(model, tokenizer, full, ks, prompts)


# ---- plain Python ------------------------------------------------------------------------------------------
def test_check_behaviour_is_the_cores_measure_once_per_basis_and_prompt_set(bench, tiny, adapter_dirs, monkeypatch):
    model, tokenizer = tiny
    report = bench.check_behaviour(model, tokenizer, "flat", PROMPTS, k=2)
    assert [s.config.num_components for s in report.settings] == [1, 2, 3]  # check_ks(3): k ≤ N − 1 = 3
    expected = expected_report(tiny, adapter_dirs, "flat", [1, 2, 3])
    for ours, core in zip(report.settings, expected.settings):
        for task in TASKS:
            assert ours.tasks[task].effect_retained == pytest.approx(core.tasks[task].effect_retained, abs=1e-5)
            assert ours.tasks[task].agreement == core.tasks[task].agreement
    lossless = report.settings[-1].tasks.values()
    assert all(t.effect_retained >= 0.999 and t.agreement == 1.0 and t.kl <= 1e-6 for t in lossless)

    view = bench.behaviour_view("flat", 2, 0.95, 0.95)
    assert view.current_k == 2 and view.ks == [1, 2, 3] and view.prompts == len(PROMPTS)
    assert view.recommended_k == recommend(expected).k.config.num_components
    assert view.effect["qa"] == [s.tasks["qa"].effect_retained for s in report.settings]
    assert bench.behaviour_view("flat", 99, 0.95, 0.95).current_k == 3  # k past the basis: its end
    assert bench.behaviour_view("rank", 2, 0.95, 0.95) is None  # that basis was never checked

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    real, calls = ui.checks.measure, []
    monkeypatch.setattr(ui.checks, "reference", refuse)
    monkeypatch.setattr(ui.checks, "measure", refuse)
    again = bench.check_behaviour(model, tokenizer, "flat", PROMPTS, k=3)  # the same basis and prompts: cached
    assert again.settings == report.settings
    monkeypatch.undo()
    monkeypatch.setattr(ui.checks, "measure", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    other = bench.check_behaviour(model, tokenizer, "flat", PROMPTS[:3], k=1)  # another prompt set: measured anew
    assert calls == [[1, 2, 3]] and other.settings[0].tasks["qa"].positions != report.settings[0].tasks["qa"].positions
    bench.remove(["translation"])  # the adapters changed: every check is gone
    assert bench.behaviour_view("flat", 2, 0.95, 0.95) is None


def test_check_prompts_are_the_demos_for_its_tasks_else_generic(tmp_path, adapter_dirs):
    demo = write_prompts(
        tmp_path / "demo.jsonl", [Prompt("shared one"), Prompt("mine", task="qa"), Prompt("gone", task="elsewhere")]
    )
    bench = Workbench(tmp_path / "session", AppSettings(demo_prompts=demo))
    assert bench.check_prompts() == GENERIC_PROMPTS  # nothing loaded
    bench.add_path(adapter_dirs[0].parent)
    assert [(p.text, p.task) for p in bench.check_prompts()] == [("shared one", None), ("mine", "qa")]
    bench.remove(["qa"])
    assert bench.check_prompts() == GENERIC_PROMPTS  # the file names no loaded task


def test_export_check_warns_below_the_threshold_and_is_quiet_when_lossless(bench, tiny):
    model, tokenizer = tiny
    bench.report(CompressConfig(1, "flat"))
    bench.export(["qa", "sentiment"])
    low = bench.check_export(model, tokenizer, PROMPTS)
    assert list(low) == ["qa", "sentiment"]
    assert any(b.effect_retained < 0.95 for b in low.values())
    warned = effect_warnings(low)
    assert warned and all("effect retained" in w for w in warned)
    bench.report(CompressConfig(3, "flat"))  # every direction: the export is the original
    bench.export()
    kept = bench.check_export(model, tokenizer, PROMPTS)
    assert sorted(kept) == TASKS and all(b.effect_retained >= 0.999 and b.agreement == 1.0 for b in kept.values())
    assert effect_warnings(kept) == []


def test_ab_behaviour_is_exact_for_one_task_twice_and_sees_compression(bench, tiny):
    model, tokenizer = tiny
    bench.report(CompressConfig(1, "flat"))
    same = bench.ab_behaviour(model, tokenizer, "the cat sat on", ["original: qa", "original: qa"], " the mat")
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.agreement == 1.0
    cut = bench.ab_behaviour(model, tokenizer, "the cat sat on", ["original: qa", "compressed: qa"], " the mat")
    base = bench.ab_behaviour(model, tokenizer, "the cat sat on", ["original: qa", "base model"], " the mat")
    assert 0 < cut.kl and 0 < base.kl and cut.positions == base.positions == len(" the mat")


# ---- through the API ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sessions")
    with served(AppSettings(model_source=str(tiny_model_dir), session_root=root, allow_server_paths=True)) as app:
        yield app


@pytest.mark.slow
def test_behaviour_through_the_api(app, adapter_dirs, tiny, tmp_path):
    client = api_client(app.url, tmp_path / "downloads")
    client.predict(str(adapter_dirs[0].parent), api_name="/load_path")
    client.predict("flat", 2, False, 0.9, api_name="/compress")
    table = {"headers": PROMPT_COLUMNS, "data": prompt_rows(PROMPTS), "metadata": None}
    shown, verdict, plot, numbers, status = client.predict(
        "flat", 2, False, "", table, 0.95, 0.95, api_name="/check_behaviour"
    )
    expected = expected_report(tiny, adapter_dirs, "flat", [1, 2, 3])
    recommended = recommend(expected).k
    assert numbers["ks"] == [1, 2, 3] and numbers["current_k"] == 2
    assert numbers["recommended_k"] == (recommended and recommended.config.num_components)
    for i, setting in enumerate(expected.settings):
        for task in TASKS:
            got = numbers["tasks"][task]
            assert got["effect_retained"][i] == pytest.approx(setting.tasks[task].effect_retained, abs=1e-5)
            assert got["agreement"][i] == setting.tasks[task].agreement
    assert shown["data"] == prompt_rows(PROMPTS) and "Behaviour checked" in status
    figure = json.loads(plot["plot"])
    assert [t["name"] for t in figure["data"][::2]] == TASKS  # effect and agreement per task
    marks = {shape["x0"] for shape in figure["layout"]["shapes"] if shape["type"] == "line" and "x0" in shape}
    assert 2 in marks  # the current k is marked
    assert recommend(expected).summary() in verdict

    # the A/B pair line: the same choice twice agrees everywhere; the export check warns at k = 1
    text_a, *_ = client.predict("", "the cat sat on", "original: qa", "compressed: qa", 8, api_name="/ab_test")
    line = client.predict("", "the cat sat on", "original: qa", "original: qa", text_a, api_name="/ab_behaviour")
    assert "KL(A ‖ B) **0.0000**" in line and "top-1 agreement **100.0%**" in line
    client.predict("flat", 1, False, 0.9, api_name="/compress")
    client.predict(["qa", "sentiment"], "", "", api_name="/export")
    text = client.predict(True, "", table, 0.95, api_name="/export_check")
    assert "- qa: effect retained" in text and "- sentiment: effect retained" in text
    assert ("below 0.95" in text) == any(
        s.tasks[t].effect_retained < 0.95 for s in expected.settings[:1] for t in ("qa", "sentiment")
    )
    off = client.predict(False, "", table, 0.95, api_name="/export_check")
    assert off == "Behaviour not checked (switched off)."
    client.close()
