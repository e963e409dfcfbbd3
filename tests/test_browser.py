"""The workbench in a real browser (Debian chromium + playwright): upload, tune k, A/B test, download.

Each stage saves a screenshot. By default the adapters and base model are tiny and the screenshots go to a
temp folder (a test run never rewrites tracked files); the README's docs/screenshots/ come from

    VLORA_SCREENSHOTS_DEMO=1 pytest tests/test_browser.py     # the demo adapters on SmolLM2-135M, slower

Needs /usr/bin/chromium and the playwright package (.ci/run installs both); never runs `playwright install`.
"""

from __future__ import annotations

import os
import shutil
import zipfile
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
    zip_tree,
)

from ui.settings import AppSettings  # noqa: E402
from vlora import SharedSubspace, VLoRAModel, load_adapter  # noqa: E402

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
        return folders, "bundled", lambda: load_base_model("bundled")[0]
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
    _check_peft_loads(tmp_path / "exported", folders, base_model, input_ids)


def _check_peft_loads(folder: Path, originals: list[Path], base_model, input_ids) -> None:
    """Every downloaded folder loads in PEFT and gives the logits of the subspace (at k = K) it came from."""
    from peft import PeftModel

    assert sorted(p.name for p in folder.iterdir()) == sorted(d.name for d in originals)
    view = SharedSubspace.decompose([load_adapter(d) for d in originals]).truncated(K)
    served = VLoRAModel(base_model(), view)
    for task_id in view.task_ids:
        exported = PeftModel.from_pretrained(base_model(), str(folder / task_id)).eval()
        served.set_task(task_id)
        with torch.no_grad():
            assert torch.allclose(exported(input_ids).logits, served(input_ids).logits, atol=1e-4)
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
