"""The workbench in a real browser (Debian chromium + playwright): upload, tune k, A/B test, download.

Each stage saves a screenshot. By default the adapters and base model are tiny and the screenshots go to a
temp folder (a test run never rewrites tracked files); the README's docs/screenshots/ come from

    VLORA_SCREENSHOTS_DEMO=1 pytest tests/test_browser.py     # the demo adapters on SmolLM2-135M, slower

Needs /usr/bin/chromium and the playwright package (.ci/run installs both); never runs `playwright install`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
README_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TIMEOUT_MS = 90_000

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]

import torch  # noqa: E402
from conftest import (  # noqa: E402
    launch,
    make_tiny_model,
    tiny_llama,  # noqa: E402
    write_adapter,
    zip_tree,
)

from ui.settings import AppSettings  # noqa: E402
from ui.workbench import Workbench  # noqa: E402
from vlora import SharedSubspace, VLoRAModel, load_adapter  # noqa: E402
from vlora_core.config import CompressConfig  # noqa: E402

# README screenshots: VLORA_SCREENSHOTS_DEMO=1 runs the same steps on the demo adapters and SmolLM2 (slower);
# VLORA_DEMO_ADAPTERS points at another folder of them.
USE_DEMO = os.environ.get("VLORA_SCREENSHOTS_DEMO") == "1"
K = 2 if USE_DEMO else 1  # the k the test moves to
DEMO = Path(
    os.environ.get("VLORA_DEMO_ADAPTERS") or Path(__file__).resolve().parent.parent / "assets" / "demo_adapters"
)


@pytest.fixture(scope="module")
def workload(tmp_path_factory, adapter_dirs):
    """(adapter folders, base model source, a fresh base model maker): tiny by default, or the demo."""
    if USE_DEMO:
        from vlora_core.base_model import load_base_model

        folders = sorted(p.parent for p in DEMO.glob("*/adapter_config.json"))
        if not folders:
            pytest.skip("no demo adapters (python assets/make_demo_adapters.py)")
        return folders, "bundled", lambda: load_base_model("bundled", dtype="fp32")[0]
    return sorted(adapter_dirs), str(make_tiny_model(tmp_path_factory.mktemp("browser_model"))), lambda: tiny_llama(0)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, workload):
    settings = AppSettings(model_source=workload[1], session_root=tmp_path_factory.mktemp("browser_sessions"))
    demo = launch(settings)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 860}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT_MS)
        playwright.expect.set_options(timeout=TIMEOUT_MS)
        page.goto(app_url, wait_until="domcontentloaded")
        page.wait_for_selector("#adapters-zip input[type=file]", state="attached")
        yield page
        browser.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = README_SCREENSHOTS if USE_DEMO else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / name), full_page=True)
    assert (folder / name).stat().st_size > 10_000  # a page, not a blank


def test_workbench_in_a_browser(page, workload, shots, input_ids, tmp_path):
    expect = playwright.expect
    folders, _, base_model = workload
    tasks = [f.name for f in folders]
    # 1. upload a zip of adapter folders
    upload = zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=tasks)
    page.set_input_files("#adapters-zip input[type=file]", str(upload))
    page.wait_for_selector("#adapters-zip a[href$='adapters.zip']")  # uploaded: the file links to the server copy
    page.click("#load-zip")
    plots = ["#variance-plot", "#error-plot", "#storage-plot", "#bytes-plot"]
    page.wait_for_selector(f"{plots[0]} .js-plotly-plot .main-svg")  # loading ends on the k tab, drawn
    _tab(page, "1 · Adapters")
    for name in tasks:
        expect(page.locator("#adapter-table")).to_contain_text(name)
    _shot(page, shots, "1-adapters.png")

    # 2. move k: the plots are redrawn for the new setting
    _tab(page, "2 · Tune k")
    number = page.locator("#k-slider input[type=number]")
    number.fill(str(K))
    number.press("Enter")
    expect(page.locator("#k-summary")).to_contain_text(f"k = {K}")
    for plot in plots:
        page.wait_for_selector(f"{plot} .js-plotly-plot .main-svg")
    expect(page.locator("#variance-plot")).to_contain_text(f"k = {K}")
    _shot(page, shots, "2-tune-k.png")

    # 3. A/B test on the (tiny) base model: compressed versus original of the first task
    _tab(page, "3 · A/B test")
    expect(page.locator("#choice-a input")).to_have_value(f"compressed: {tasks[0]}")
    expect(page.locator("#choice-b input")).to_have_value(f"original: {tasks[0]}")
    if USE_DEMO:  # a task whose effect shows, compressed against the original
        for box, value in (("#choice-a input", "compressed: shouting"), ("#choice-b input", "original: shouting")):
            page.fill(box, value)
            page.press(box, "Enter")
    tokens = page.locator("#max-new-tokens input[type=number]")
    tokens.fill("16")
    tokens.press("Enter")
    page.click("#run-ab")
    expect(page.locator("#stats-a")).to_contain_text("tokens/s")
    expect(page.locator("#stats-b")).to_contain_text("tokens/s")
    assert page.locator("#output-a textarea").input_value() and page.locator("#output-b textarea").input_value()
    _shot(page, shots, "3-ab-test.png")

    # 4. export every task and download the zip of PEFT folders
    _tab(page, "4 · Export")
    page.click("#run-export")
    expect(page.locator("#status")).to_contain_text(f"Exported {len(tasks)} tasks")
    with page.expect_download() as download:
        page.click("#download-adapters")
    downloaded = tmp_path / "downloaded.zip"
    download.value.save_as(downloaded)
    _shot(page, shots, "4-export.png")

    with zipfile.ZipFile(downloaded) as zf:
        zf.extractall(tmp_path / "exported")
    _check_peft_loads(tmp_path / "exported", folders, base_model, input_ids, _preferred(folders, tmp_path / "pick"))


def _check_peft_loads(folder: Path, originals: list[Path], base_model, input_ids, method: str) -> None:
    """Every downloaded folder loads in PEFT and gives the logits of the subspace (``method``, k = K) it came from."""
    from peft import PeftModel

    assert sorted(p.name for p in folder.iterdir()) == sorted(d.name for d in originals)
    view = SharedSubspace.decompose([load_adapter(d) for d in originals], method=method).truncated(K)
    served = VLoRAModel(base_model(), view)
    for task_id in view.task_ids:
        exported = PeftModel.from_pretrained(base_model(), str(folder / task_id)).eval()
        served.set_task(task_id)
        with torch.no_grad():  # float32 rounding through a real model's layers: ~1e-4 on logits of ~30
            torch.testing.assert_close(exported(input_ids).logits, served(input_ids).logits, rtol=1e-4, atol=1e-3)
    shutil.rmtree(folder)


def test_behaviour_check_in_a_browser(page, app_url, workload, tmp_path):
    """Tab 2's behaviour check (issue 13) in a session of its own: a prompt file uploaded into the table, the check
    drawn with the current k marked and moved by the slider; the A/B pair line; the check after an export."""
    expect = playwright.expect
    folders = workload[0]
    context = page.context.browser.new_context(viewport={"width": 1200, "height": 1400})  # its own session
    mine = context.new_page()
    mine.set_default_timeout(TIMEOUT_MS)
    mine.goto(app_url, wait_until="domcontentloaded")
    upload = zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=[f.name for f in folders])
    mine.set_input_files("#adapters-zip input[type=file]", str(upload))
    mine.wait_for_selector("#adapters-zip a[href$='adapters.zip']")
    mine.click("#load-zip")
    mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")  # on the k tab, drawn
    number = mine.locator("#k-slider input[type=number]")
    number.fill("2")
    number.press("Enter")
    expect(mine.locator("#k-summary")).to_contain_text("k = 2")

    prompts = tmp_path / "prompts.jsonl"
    task = folders[0].name
    prompts.write_text(
        '{"prompt": "the cat sat on", "answer": " the mat"}\n{"prompt": "one two three"}\n'
        f'{{"prompt": "a b c d e f", "task": "{task}"}}\n'
    )
    mine.set_input_files("#behaviour-prompt-file input[type=file]", str(prompts))
    expect(mine.locator("#behaviour-prompts")).to_contain_text("a b c d e f")  # the file, read into the table
    mine.click("#check-behaviour")
    mine.wait_for_selector("#behaviour-plot .js-plotly-plot .main-svg")
    expect(mine.locator("#behaviour-summary")).to_contain_text("At k = 2 (now)")
    expect(mine.locator("#behaviour-summary")).to_contain_text("basis:")
    expect(mine.locator("#behaviour-plot")).to_contain_text("k = 2 (now)")
    expect(mine.locator("#status")).to_contain_text("Behaviour checked")
    number.fill("1")  # the marks follow k without measuring again
    number.press("Enter")
    expect(mine.locator("#behaviour-summary")).to_contain_text("At k = 1 (now)")
    expect(mine.locator("#behaviour-plot")).to_contain_text("k = 1 (now)")

    mine.get_by_role("tab", name="3 · A/B test").click()
    tokens = mine.locator("#max-new-tokens input[type=number]")
    tokens.fill("8")
    tokens.press("Enter")
    mine.click("#run-ab")
    expect(mine.locator("#ab-pair")).to_contain_text("top-1 agreement")  # next to the two outputs
    expect(mine.locator("#ab-pair")).to_contain_text("KL(A ‖ B)")

    mine.get_by_role("tab", name="4 · Export").click()
    mine.click("#run-export")
    expect(mine.locator("#export-check")).to_contain_text("against their originals")
    expect(mine.locator("#export-check")).to_contain_text(f"{task}: effect retained")
    context.close()


# ---- issue 17: the workbench as a person meets it ------------------------------------------------------------
ERROR_MARKS = "[data-testid='status-tracker'] .error"  # Gradio's red "Error" pill over a failed event's outputs


@pytest.fixture(scope="module")
def point_shots(tmp_path_factory) -> Path:
    """Screenshots of the tests below: always a temp folder (the README's four come from the test above)."""
    return tmp_path_factory.mktemp("point_screenshots")


@contextmanager
def _own_page(browser_page, url: str, context=None):
    """A page of its own: a new browser context (its own storage, so its own session) unless ``context`` is given."""
    own = context or browser_page.context.browser.new_context(
        viewport={"width": 1200, "height": 1400}, accept_downloads=True
    )
    mine = own.new_page()
    mine.set_default_timeout(TIMEOUT_MS)
    mine.goto(url, wait_until="domcontentloaded")
    mine.wait_for_selector("#adapters-zip input[type=file]", state="attached")
    try:
        yield mine
    finally:
        if context is None:
            own.close()


def _upload(mine, zip_path: Path) -> None:
    mine.set_input_files("#adapters-zip input[type=file]", str(zip_path))
    mine.wait_for_selector(f"#adapters-zip a[href$='{zip_path.name}']")
    mine.click("#load-zip")


def _toasts_gone(mine) -> None:
    """Wait until the toasts have gone by themselves (10 s), as a person who looked away would find the page."""
    playwright.expect(mine.locator("[data-testid='toast-body']")).to_have_count(0, timeout=30_000)


def _type_k(mine, k: int) -> None:
    box = mine.locator("#k-slider input[type=number]")
    box.fill(str(k))
    box.press("Enter")
    playwright.expect(mine.locator("#k-summary")).to_contain_text(f"k = {k}")


def _choose(mine, box: str, value: str) -> None:
    mine.fill(f"{box} input", value)
    mine.press(f"{box} input", "Enter")


def _misfits(root: Path) -> list[Path]:
    """Two adapters that cannot share a subspace with the tiny ones: another rank, other target modules."""
    return [write_adapter(root / "wide", seed=9, r=8), write_adapter(root / "narrow", seed=10, targets=("q_proj",))]


def _with(folders: list[Path], extra: list[Path], root: Path) -> Path:
    """One folder holding ``folders`` and ``extra`` (copies), zipped."""
    for folder in [*folders, *extra]:
        if not (root / folder.name).exists():
            shutil.copytree(folder, root / folder.name)
    return zip_tree(root, root.parent / f"{root.name}.zip")


def _bench(folders: list[Path], tmp: Path) -> Workbench:
    """A workbench session of its own holding ``folders``: what the page should show, found in plain Python."""
    bench = Workbench(tmp, AppSettings())
    for folder in folders:
        bench.add_path(folder)
    return bench


def _k_max(folders: list[Path], tmp: Path, method: str = "flat") -> int:
    """The most directions ``method``'s basis has for these adapters, as the workbench finds it."""
    return _bench(folders, tmp).k_max(method)


def _preferred(folders: list[Path], tmp: Path) -> str:
    """The basis the workbench opens on for these adapters (point 9: the one that measures better)."""
    return _bench(folders, tmp).preferred_method()[0]


def test_a_failed_step_says_why_in_the_status_line_until_the_next(page, app_url, workload, point_shots, tmp_path):
    """Point 1: the status line keeps how the last step ended and why after its toast is gone, and no output is
    left with a bare red "Error" mark."""
    expect = playwright.expect
    folders = workload[0]
    with _own_page(page, app_url) as mine:
        status = mine.locator("#status")
        mine.click("#load-zip")  # no zip chosen
        expect(status).to_contain_text("✖ Loading failed: choose a .zip of adapter folders first.")
        _toasts_gone(mine)
        expect(status).to_contain_text("✖ Loading failed: choose a .zip of adapter folders first.")
        assert mine.locator(ERROR_MARKS).count() == 0

        _upload(mine, zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=[f.name for f in folders]))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        _tab(mine, "4 · Export")
        mine.fill("#export-alpha input, #export-alpha textarea", "abc")
        mine.click("#run-export")
        expect(status).to_contain_text("✖ Exporting failed: lora_alpha to write: 'abc' is not a number")
        _toasts_gone(mine)
        mine.wait_for_timeout(500)
        expect(status).to_contain_text("is not a number; type one such as 16")  # the fix, in the page's words
        assert mine.locator(ERROR_MARKS).count() == 0  # not on the status line, the downloads or anywhere
        _shot(mine, point_shots, "17-1-failed-export.png")

        mine.fill("#export-alpha input, #export-alpha textarea", "")
        mine.click("#run-export")  # the next step says how it ended instead
        expect(status).to_contain_text(f"Exported {len(folders)} tasks")
        expect(status).not_to_contain_text("failed")


def test_changing_the_adapters_redraws_the_k_tab_at_a_valid_k(page, app_url, workload, point_shots, tmp_path):
    """Point 2: after removing adapters the k tab is drawn again at a k the new set has, the slider re-sized; with
    a misfit loaded it says why it cannot be drawn instead of breaking."""
    expect = playwright.expect
    folders = workload[0]
    upload = _with(folders, _misfits(tmp_path / "extra"), tmp_path / "mixed")
    slider = "#k-slider input[type=number]"
    with _own_page(page, app_url) as mine:
        _upload(mine, upload)
        expect(mine.locator("#status")).to_contain_text("do not fit")
        _tab(mine, "2 · Tune k")
        expect(mine.locator("#k-summary")).to_contain_text("cannot share one subspace")
        assert mine.locator(f"#variance-plot .js-plotly-plot, {ERROR_MARKS}").count() == 0

        _tab(mine, "1 · Adapters")
        for name in ("wide", "narrow"):
            _choose(mine, "#remove-tasks", name)
        mine.click("#remove")
        expect(mine.locator("#status")).to_contain_text(f"Removed 2 adapters; {len(folders)} left.")
        _tab(mine, "2 · Tune k")
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        k_all = _k_max(folders, tmp_path / "all")
        expect(mine.locator(slider)).to_have_attribute("max", str(max(k_all, 2)))
        _type_k(mine, k_all)

        kept = folders[:2]
        _tab(mine, "1 · Adapters")
        for folder in folders[2:]:
            _choose(mine, "#remove-tasks", folder.name)
        mine.click("#remove")
        k_kept = _k_max(kept, tmp_path / "kept")
        assert k_kept < k_all
        _tab(mine, "2 · Tune k")
        expect(mine.locator(slider)).to_have_attribute("max", str(max(k_kept, 2)))
        expect(mine.locator(slider)).to_have_value(str(k_kept))
        expect(mine.locator("#k-summary")).to_contain_text(f"k = {k_kept}")
        expect(mine.locator("#variance-plot")).to_contain_text(f"k = {k_kept}")
        assert mine.locator(ERROR_MARKS).count() == 0
        _shot(mine, point_shots, "17-2-after-removing.png")


def test_misfits_are_told_once_in_full_and_one_group_can_be_kept(page, app_url, workload, point_shots, tmp_path):
    """Point 4: one toast for the load, naming each misfit; each one's full reason wrapped in the table; the
    advice followed in the page: keep only the group that fits."""
    expect = playwright.expect
    folders = workload[0]
    misfits = _misfits(tmp_path / "extra")
    upload = _with(folders, misfits, tmp_path / "mixed")
    reference = Workbench(tmp_path / "reference", AppSettings())
    reference.add_path(tmp_path / "mixed")
    reasons = {row.task_id: row.problem for row in reference.table() if row.problem}
    assert sorted(reasons) == ["narrow", "wide"]
    with _own_page(page, app_url) as mine:
        _upload(mine, upload)
        expect(mine.locator("#status")).to_contain_text("2 adapters do not fit with the other 4 (narrow, wide)")
        expect(mine.locator("#status")).to_contain_text("Keep only this group")
        mine.wait_for_timeout(1500)  # any second toast would be up by now
        toasts = mine.locator("[data-testid='toast-text']")
        assert toasts.count() == 1 and all(name in toasts.inner_text() for name in reasons)
        for name, reason in reasons.items():
            cell = mine.locator("#adapter-table [role=row]", has_text=name).locator("[role=gridcell]").last
            expect(cell).to_have_text(reason)  # the whole reason, with its fix
            clipped = cell.evaluate(
                """(cell) => [cell, ...cell.querySelectorAll("*")].some(
                     (e) => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)"""
            )
            assert not clipped, f"{name}'s reason is clipped"
            assert cell.bounding_box()["height"] > 60  # wrapped over lines, not cut at one
        expect(mine.locator("#groups")).to_be_visible()
        expect(mine.locator("#group input")).to_have_value(re.compile(r"^4 × rank 4 "))
        _shot(mine, point_shots, "17-4-misfits.png")

        mine.click("#keep-group")
        expect(mine.locator("#status")).to_contain_text("Kept the 4 adapters that fit together")
        expect(mine.locator("#status")).to_contain_text("removed 2 (narrow, wide)")
        for name in reasons:
            expect(mine.locator("#adapter-table")).not_to_contain_text(name)
        expect(mine.locator("#groups")).to_be_hidden()
        _tab(mine, "2 · Tune k")
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        assert mine.locator(ERROR_MARKS).count() == 0


def test_a_reload_brings_the_session_back(page, app_url, workload, point_shots, tmp_path):
    """Point 5: a reload finds the adapters, k and the latest export again (the session key lives in the
    browser's storage)."""
    expect = playwright.expect
    folders = workload[0]
    tasks = sorted(f.name for f in folders)
    method = _preferred(folders, tmp_path / "pick")
    with _own_page(page, app_url) as mine:
        _upload(mine, zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=tasks))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        _type_k(mine, 1)
        expect(mine.locator("#status")).to_contain_text("k = 1")  # the server has it
        _tab(mine, "4 · Export")
        mine.click("#run-export")
        expect(mine.locator("#status")).to_contain_text(f"Exported {len(tasks)} tasks")

        mine.reload(wait_until="domcontentloaded")
        status = mine.locator("#status")
        expect(status).to_contain_text("Restored your session")
        expect(status).to_contain_text(f"{method} basis, k = 1")
        # the restored export is checked by downloading it again below (the status line may already show the
        # redraw of tab 2 that the restore starts)
        for name in tasks:
            expect(mine.locator("#adapter-table")).to_contain_text(name)
        _tab(mine, "2 · Tune k")
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        expect(mine.locator("#k-slider input[type=number]")).to_have_value("1")
        expect(mine.locator("#k-summary")).to_contain_text("k = 1")
        _tab(mine, "4 · Export")
        with mine.expect_download() as download:
            mine.click("#download-adapters")
        download.value.save_as(tmp_path / "again.zip")
        with zipfile.ZipFile(tmp_path / "again.zip") as zf:
            assert sorted({Path(n).parts[0] for n in zf.namelist()}) == tasks
        _shot(mine, point_shots, "17-5-restored.png")


def test_a_page_whose_session_ended_says_so(page, workload, tmp_path):
    """Point 5, the other way: once the session has ended (here: idle past a short limit), the reloaded page says
    it was reset instead of showing an empty workbench without a word."""
    expect = playwright.expect
    folders = workload[0]
    settings = AppSettings(model_source=workload[1], session_root=tmp_path / "sessions", idle_s=4)
    app = launch(settings)
    context = page.context.browser.new_context(viewport={"width": 1200, "height": 1000})
    try:
        with _own_page(page, app.local_url, context) as first:
            _upload(first, zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=[f.name for f in folders]))
            expect(first.locator("#status")).to_contain_text(f"Loaded {len(folders)} adapters")
        time.sleep(6)  # past idle_s: the next page's claim ends it first
        with _own_page(page, app.local_url, context) as second:
            expect(second.locator("#status")).to_contain_text("Your earlier session here has ended")
            expect(second.locator("#status")).to_contain_text("start again by loading adapters")
            assert second.locator("#adapter-table tbody tr", has_text=folders[0].name).count() == 0
    finally:
        context.close()
        app.close()


def test_the_ab_tab_names_its_setting_and_compares_two_k(page, app_url, workload, point_shots, tmp_path):
    """Point 3: the A/B tab says which setting *compressed* tests; A and B can be one task at two k; the example
    prompts start with the loaded tasks' own (the demo's prompt file has some for sentiment)."""
    expect = playwright.expect
    folders, source, _ = workload
    task = folders[0].name
    bench = _bench(folders, tmp_path / "check")
    method = bench.preferred_method()[0]
    examples = bench.example_prompts()
    with _own_page(page, app_url) as mine:
        _upload(mine, zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=[f.name for f in folders]))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        _type_k(mine, 2)
        _tab(mine, "3 · A/B test")
        expect(mine.locator("#ab-setting")).to_contain_text(f"compressed tests {method} basis, k = 2")
        first = mine.locator("#ab-examples tbody tr").first
        expect(first).to_contain_text(examples[0][0] or "any task")
        if examples[0][0]:  # a loaded task's own prompt comes first
            first.click()
            expect(mine.locator("#prompt textarea")).to_have_value(examples[0][1])
        prompt = mine.locator("#prompt textarea").input_value()
        _choose(mine, "#choice-a", f"compressed k=1: {task}")
        _choose(mine, "#choice-b", f"compressed k=2: {task}")
        tokens = mine.locator("#max-new-tokens input[type=number]")
        tokens.fill("8")
        tokens.press("Enter")
        mine.click("#run-ab")
        expect(mine.locator("#stats-a")).to_contain_text(f"{task} at {method} basis, k = 1")
        expect(mine.locator("#stats-b")).to_contain_text(f"{task} at {method} basis, k = 2")
        _shot(mine, point_shots, "17-3-ab-two-k.png")
        shown = [mine.locator(f"#output-{side} textarea").input_value() for side in "ab"]

    from vlora_core.base_model import load_base_model

    model, tokenizer = load_base_model(source)
    for k, text in zip((1, 2), shown):  # each side is what that k as the current setting gives
        bench.report(CompressConfig(k, method))
        assert bench.ab_test(model, tokenizer, prompt, [f"compressed: {task}"], 8)[0].text == text


def test_every_k_change_shows_in_the_summary_and_all_four_plots(page, app_url, point_shots, tmp_path):
    """Point 6 in a real browser, on the demo adapters (5 tasks, 60 layers of SmolLM2-135M): each k typed shows in
    the summary and in all four plots (``K_SHOWN``), every k twice. Its speed (≤ 150 ms from typing to the last plot)
    is measured by ``bench/workbench_k.py --browser``; here the times are printed and kept with the screenshots,
    held only to a 1 s guard: a 150 ms timer fails on a slower machine, not on slower code (this machine drew the
    same code in 132–140 ms one day and 206 ms another)."""
    from bench.workbench_k import browser_k_times, summary_ms

    if not DEMO.is_dir():
        pytest.skip("no demo adapters (python assets/make_demo_adapters.py)")
    with _own_page(page, app_url) as mine:
        mine.click("#load-demo")
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        top = int(mine.locator("#k-slider input[type=number]").get_attribute("max"))
        ks = [k for k in range(1, top + 1) if k != int(mine.locator("#k-slider input[type=number]").input_value())]
        mine.wait_for_timeout(2000)  # the table of every k arrives after the drawing
        browser_k_times(mine, ks)  # warm up: Plotly's and the page's first runs
        times = browser_k_times(mine, ks * 2)  # never the same k twice in a row; each must show (K_SHOWN)
        _shot(mine, point_shots, "17-6-k.png")
    measured = summary_ms(times)
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    print(f"k change in the browser: {measured} (target 150 ms at rest; load {load:.2f} per core)")
    (point_shots / "k_change_ms.json").write_text(json.dumps({**measured, "times_ms": times, "load_per_core": load}))
    assert len(times) == len(ks) * 2 and measured["median_ms"] < 1000


def _basis(mine, method: str) -> None:
    """Choose a basis on tab 2 as a person does: a click on its radio button."""
    mine.locator("#method").get_by_text(method, exact=True).click()


def test_sizes_are_honest_and_the_store_zip_is_a_folder_vlora_info_reads(page, app_url, point_shots, tmp_path):
    """Point 7: a store at least as big as its adapters is said to be larger (never "×0.9 smaller"), with the k up
    to which it is smaller; the export tab says that PEFT folders are full size and only the store is small; the
    store zip unpacks into one folder that `vlora info` reads as it is."""
    import subprocess
    import sys

    from ui.callbacks import break_even_words
    from ui.plots import size_words

    expect = playwright.expect
    folders = [write_adapter(tmp_path / "in" / name, seed) for seed, name in enumerate(("qa", "sum", "tr", "mood"))]
    bench = _bench(folders, tmp_path / "check")
    method = bench.preferred_method()[0]
    top = bench.k_max(method)
    with _own_page(page, app_url) as mine:
        _upload(mine, zip_tree(tmp_path / "in", tmp_path / "adapters.zip"))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        for k in (1, top):
            report = bench.report(CompressConfig(k, method))
            _type_k(mine, k)
            words = size_words(report.stored_bytes, report.original_bytes)
            expect(mine.locator("#k-summary")).to_contain_text(words)
            expect(mine.locator("#k-summary")).to_contain_text(break_even_words(report))
            expect(mine.locator("#bytes-plot")).to_contain_text(words.split(" than")[0])
        assert report.stored_bytes >= report.original_bytes  # the last k: a store bigger than its inputs
        expect(mine.locator("#k-summary")).to_contain_text("larger than the adapters")
        expect(mine.locator("#k-summary")).not_to_contain_text("smaller than the adapters at")
        expect(mine.locator("#status")).to_contain_text(f"smaller than the adapters up to k = {report.break_even_k}")
        _shot(mine, point_shots, "17-7-larger.png")

        _type_k(mine, 1)
        _tab(mine, "4 · Export")
        setting = mine.locator("#export-setting")
        expect(setting).to_contain_text("full-size")
        expect(setting).to_contain_text("The vlora store is the small part")
        mine.click("#run-export")
        expect(mine.locator("#status")).to_contain_text("(full-size adapters)")
        with mine.expect_download() as download:
            mine.click("#download-store")
        name = download.value.suggested_filename
        assert name == f"vlora-store-{method}-k1.zip"
        download.value.save_as(tmp_path / name)
    with zipfile.ZipFile(tmp_path / name) as zf:
        zf.extractall(tmp_path / "unzipped")
    (folder,) = (tmp_path / "unzipped").iterdir()  # one folder, named as the zip
    assert folder.name == name.removesuffix(".zip")
    info = subprocess.run(
        [sys.executable, "-m", "vlora_core.cli", "info", folder.name, "--json"],
        cwd=tmp_path / "unzipped",
        capture_output=True,
        text=True,
        check=True,
    )
    assert sorted(json.loads(info.stdout)["summary"]["task_errors"]) == sorted(f.name for f in folders)


def test_the_export_tab_says_its_setting_names_its_files_and_keeps_alpha(page, app_url, point_shots, tmp_path):
    """Point 8: downloads are disabled until an export exists; the setting is shown before exporting and names the
    downloads (with the storage precision); blank lora_alpha keeps each adapter's own; the task list, open, does
    not cover the export button; a basis switched away from and back to comes back at its last k."""
    expect = playwright.expect
    alphas = {"qa": 8, "sum": 16, "tr": 4}
    folders = [write_adapter(tmp_path / "in" / name, seed, alpha=a) for seed, (name, a) in enumerate(alphas.items())]
    method = _preferred(folders, tmp_path / "pick")
    other = "flat" if method == "rank" else "rank"
    with _own_page(page, app_url) as mine:
        _upload(mine, zip_tree(tmp_path / "in", tmp_path / "adapters.zip"))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        _type_k(mine, 2)
        _basis(mine, other)
        expect(mine.locator("#k-summary")).to_contain_text(f"{other} basis")
        _type_k(mine, 1)
        _basis(mine, method)  # back: at its last k, 2
        expect(mine.locator("#k-summary")).to_contain_text(f"{method} basis, k = 2")
        expect(mine.locator("#k-slider input[type=number]")).to_have_value("2")
        _basis(mine, other)
        expect(mine.locator("#k-summary")).to_contain_text(f"{other} basis, k = 1")
        _basis(mine, method)
        expect(mine.locator("#k-summary")).to_contain_text(f"{method} basis, k = 2")
        mine.locator("#dtype").get_by_text("int8", exact=True).click()
        expect(mine.locator("#k-summary")).to_contain_text("stored in int8")
        expect(mine.locator("#status")).to_contain_text(f"{method} basis, k = 2, stored in int8")

        _tab(mine, "4 · Export")
        for button in ("#download-adapters", "#download-store"):
            expect(mine.locator(button)).to_be_disabled()  # nothing to download yet
        expect(mine.locator("#export-setting")).to_contain_text(f"{method} basis, k = 2, stored in int8")
        slug = f"{method}-k2-int8"
        expect(mine.locator("#export-setting")).to_contain_text(f"vlora-adapters-{slug}.zip")
        mine.click("#export-tasks input")  # the task list open: the button beside it stays in reach
        options = mine.get_by_role("listbox")
        expect(options).to_be_visible()
        box, button = options.bounding_box(), mine.locator("#run-export").bounding_box()
        assert box["x"] + box["width"] <= button["x"] or button["y"] + button["height"] <= box["y"]
        _shot(mine, point_shots, "17-8-export-setting.png")
        mine.click("#run-export")  # lora_alpha left blank
        expect(mine.locator("#status")).to_contain_text("Exported 3 tasks")
        expect(mine.locator("#download-adapters")).to_be_enabled()
        expect(mine.locator("#download-adapters")).to_contain_text(f"vlora-adapters-{slug}.zip")
        with mine.expect_download() as download:
            mine.click("#download-adapters")
        assert download.value.suggested_filename == f"vlora-adapters-{slug}.zip"
        download.value.save_as(tmp_path / "adapters-out.zip")
    with zipfile.ZipFile(tmp_path / "adapters-out.zip") as zf:
        zf.extractall(tmp_path / "out")
    for name, alpha in alphas.items():  # each adapter's own lora_alpha, not 0 and not one for all
        assert json.loads((tmp_path / "out" / name / "adapter_config.json").read_text())["lora_alpha"] == alpha


def test_the_workbench_opens_on_the_basis_that_measures_better(page, app_url, workload, point_shots, tmp_path):
    """Point 9: after loading, tab 2 shows the basis whose mean ΔW error is lower at equal stored bytes for these
    adapters (as Workbench.preferred_method finds it), says so, and draws the other basis's curve beside it."""
    expect = playwright.expect
    folders = workload[0]
    method, why = _bench(folders, tmp_path / "pick").preferred_method()
    other = "flat" if method == "rank" else "rank"
    with _own_page(page, app_url) as mine:
        _upload(mine, zip_tree(folders[0].parent, tmp_path / "adapters.zip", folders=[f.name for f in folders]))
        mine.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
        expect(mine.locator("#status")).to_contain_text(f"Tab 2 opened on the {why}")
        expect(mine.locator("#method input:checked")).to_have_value(method)
        expect(mine.locator("#k-summary")).to_contain_text(f"{method} basis")
        expect(mine.locator("#storage-plot")).to_contain_text(f"mean task error, {other} basis")
        _shot(mine, point_shots, "17-9-basis.png")
