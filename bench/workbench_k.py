"""A k change in the workbench: 32 adapters of SmolLM2-135M's shape; the server's work (target ≤ 50 ms) and, with
--browser, the time until a real browser shows it (target ≤ 150 ms).

    python bench/workbench_k.py                    # 32 tasks, 30 blocks x q_proj + v_proj, r=8, both bases
    python bench/workbench_k.py --tasks 64 --rounds 5
    python bench/workbench_k.py --browser          # also in Debian's chromium (playwright), as a person sees it

"Server work" is what the compress callback does after the first look at a basis: the Workbench report
(truncating a task-less shell, look-ups in the k sweep) plus building the four plotly figures and
serialising them as gr.Plot does (``fig.to_json()``). The first look (SVDs + k sweep) is reported apart.
"Browser" is the time from typing k into the slider's box to the summary and all four plots showing it (the page
shows a k from the table of every swept k it holds, ui/layout.py's PAGE_JS; ``browser_k_times``, which the
browser test uses too). Results go to bench/results/workbench_k.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from ui.callbacks import Callbacks  # noqa: E402
from ui.page import PageSteps  # noqa: E402
from ui.session import Sessions  # noqa: E402
from ui.settings import AppSettings  # noqa: E402
from vlora import LoRAAdapter, LoRALayer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "workbench_k.json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"]
# Where the k tab shows a setting: the summary and each plot name it ("k = 4"); not "k = 40" for "k = 4".
K_SHOWN = """(k) => {
  const named = new RegExp(`k = ${k}(?![0-9])`);
  const shown = ["#k-summary", "#variance-plot", "#error-plot", "#storage-plot", "#bytes-plot"]
    .every((id) => named.test(document.querySelector(id)?.textContent || ""));
  return shown && performance.now() - window.vloraTypedAt;
}"""
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192)}  # SmolLM2-135M: (d_in, d_out)


def adapters(num_tasks: int, blocks: int, rank: int, prototypes: int = 4) -> dict[str, LoRAAdapter]:
    """Random adapters built from a few shared prototypes, as adapters trained from one base tend to be."""
    torch.manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(blocks) for m in SHAPES]
    protos = [
        {
            n: (
                torch.randn(rank, SHAPES[n.rsplit(".", 1)[1]][0]) * 0.1,
                torch.randn(SHAPES[n.rsplit(".", 1)[1]][1], rank) * 0.1,
            )
            for n in names
        }
        for _ in range(prototypes)
    ]
    out = {}
    for j in range(num_tasks):
        proto = protos[j % prototypes]
        layers = {
            n: LoRALayer(A + 0.05 * torch.randn_like(A), B + 0.05 * torch.randn_like(B), 2.0)
            for n, (A, B) in proto.items()
        }
        out[f"task{j:02d}"] = LoRAAdapter(
            f"task{j:02d}", {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(SHAPES)}, layers
        )
    return out


def browser_k_times(page, ks: list[int], rest_ms: int = 300) -> list[float]:
    """Milliseconds from typing each k into the slider's box (the k tab drawn, on ``page``) to the summary and all
    four plots showing it, measured in the page (the first frame that shows it); ``rest_ms`` between changes.
    Each k must differ from the one before (the same k again changes nothing)."""
    page.evaluate(
        """() => document.querySelector("#k-slider input[type=number]")
             .addEventListener("input", () => { window.vloraTypedAt = performance.now(); }, true)"""
    )
    box, times = page.locator("#k-slider input[type=number]"), []
    if any(a == b for a, b in zip([int(box.input_value()), *ks], ks)):
        raise ValueError(f"{ks}: the same k twice in a row (or the slider's own) would time nothing")
    for k in ks:
        box.fill(str(k))
        times.append(page.wait_for_function(K_SHOWN, arg=k, polling="raf").json_value())
        page.wait_for_timeout(rest_ms)
    return times


def summary_ms(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
        "changes": len(ordered),
    }


def browser_run(folder: Path, methods: list[str], ks: list[int]) -> dict:
    """The workbench on ``folder``'s adapters (loaded by server path) in chromium: each basis, every k in ``ks``."""
    from playwright.sync_api import sync_playwright

    from ui.layout import build_app, launch_options

    settings = AppSettings(session_root=Path(tempfile.mkdtemp(prefix="vlora-bench-")), allow_server_paths=True)
    demo, out = build_app(settings), {}
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_options(settings))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(600_000)
            page.goto(demo.local_url, wait_until="domcontentloaded")
            page.locator("#server-path textarea, #server-path input").fill(str(folder))
            page.click("#load-path")
            page.wait_for_selector("#variance-plot .js-plotly-plot .main-svg")
            for method in methods:
                page.locator("#method").get_by_label(method).check()
                page.wait_for_function(
                    "(m) => document.querySelector('#variance-plot')?.textContent.includes(`${m} basis`)", arg=method
                )
                page.wait_for_timeout(2000)  # the k table arrives after the drawing
                browser_k_times(page, ks[:8])  # warm up: Plotly's and the page's first runs
                out[method] = summary_ms(browser_k_times(page, ks[8:] + ks[:8]) + browser_k_times(page, ks[1:]))
            browser.close()
    finally:
        demo.close()
    return out


def write_adapters(folder: Path, adapters_: dict[str, LoRAAdapter]) -> Path:
    from vlora_core.io.peft_files import save_adapter

    for task_id, adapter in adapters_.items():
        save_adapter(adapter, folder / task_id)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--browser", action="store_true", help="also time k changes in chromium (playwright)")
    args = parser.parse_args()
    sessions = Sessions(AppSettings(session_root=Path(tempfile.mkdtemp(prefix="vlora-bench-"))))
    calls, request = Callbacks(sessions, AppSettings()), SimpleNamespace(session_hash="bench")
    steps = PageSteps(calls)
    bench_adapters = adapters(args.tasks, args.blocks, args.rank)
    with sessions.open(request) as bench:
        bench.adapters = dict(bench_adapters)
    results = {"tasks": args.tasks, "blocks": args.blocks, "rank": args.rank, "methods": {}}
    for method in ("flat", "rank"):
        start = time.perf_counter()
        calls.compress(method, 4, False, 0.9, request)
        first = time.perf_counter() - start
        ks = list(range(1, min(args.tasks - 1, 32) + 1))
        times = []
        for _ in range(args.rounds):
            for k in ks:
                start = time.perf_counter()
                outputs = calls.compress(method, k, False, 0.9, request)
                [figure.to_json() for figure in outputs[1:5]]  # what gr.Plot does with each figure
                times.append(time.perf_counter() - start)
        start = time.perf_counter()
        table = steps.k_table(method, False, request)  # after a whole drawing, the page gets every k once
        table_s = time.perf_counter() - start
        page_times = []  # what the page's server does per k change: the setting, the numbers, the status line
        for _ in range(args.rounds):
            for k in ks:
                start = time.perf_counter()
                steps.set_k(method, k, False, 0.9, request)
                page_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        calls.compress(method, 4, True, 0.9, request)
        adaptive = time.perf_counter() - start
        row = {
            "first_look_s": round(first, 2),
            "k_change_median_ms": round(1000 * statistics.median(times), 1),
            "k_change_p90_ms": round(1000 * sorted(times)[int(0.9 * len(times))], 1),
            "page_k_change_median_ms": round(1000 * statistics.median(page_times), 1),
            "k_table_s": round(table_s, 2),
            "k_table_kb": round(len(table) / 1024),
            "adaptive_change_s": round(adaptive, 2),
            "ks": [ks[0], ks[-1]],
        }
        results["methods"][method] = row
        print(
            f"{method}: first look {row['first_look_s']} s; k change median {row['k_change_median_ms']} ms, "
            f"p90 {row['k_change_p90_ms']} ms (target 50 ms); in the page's server {row['page_k_change_median_ms']} "
            f"ms; every k for the page {row['k_table_s']} s, {row['k_table_kb']} kB; adaptive-k change "
            f"{row['adaptive_change_s']} s"
        )
    if args.browser:
        ks = list(range(1, min(args.tasks - 1, 32) + 1))
        shuffled = ks[::2] + ks[1::2][::-1]  # every k once: 1, 3, 5, ..., then down the even ones
        folder = write_adapters(Path(tempfile.mkdtemp(prefix="vlora-bench-adapters-")), bench_adapters)
        for method, row in browser_run(folder, ["flat", "rank"], shuffled).items():
            results["methods"][method]["browser"] = row
            print(
                f"{method}: in the browser, k change median {row['median_ms']} ms, p90 {row['p90_ms']} ms (target 150)"
            )
        results["browser"] = "chromium (Debian, headless), viewport 1200x860, typed into the k box"
    results["load_average"] = round(os.getloadavg()[0], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
