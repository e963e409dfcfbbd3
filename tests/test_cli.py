"""The `vlora` command: the spec's commands verbatim, exit codes, and stores left untouched on failure."""

import json
import shutil

import pytest
import torch
from conftest import make_tiny_model, peft_logits, snapshot, write_adapter
from conftest import run_cli as vlora

from vlora import SharedSubspace


@pytest.fixture(scope="module")
def store(adapter_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    result = vlora("compress", *adapter_dirs, "-o", out, "-k", "2", "--method", "rank")
    assert result.returncode == 0, result.stderr
    return out


def test_compress_reports_what_it_stored(store, adapter_dirs):
    result = vlora("compress", *adapter_dirs, "-o", store.parent / "flat", "-k", "9")
    assert result.returncode == 0
    assert "stored 4 tasks" in result.stdout and "k=3" in result.stdout
    assert "k=9 is more than the data allows" in result.stderr


def test_streaming_compress_from_the_command_line(adapter_dirs, tmp_path):
    result = vlora("compress", *adapter_dirs, "-o", tmp_path / "streamed", "-k", "2", "--stream", "2")
    assert result.returncode == 0, result.stderr
    assert SharedSubspace.load(tmp_path / "streamed").task_ids == [d.name for d in adapter_dirs]


def test_info_table_and_json_agree(store):
    table = vlora("info", store)
    data = json.loads(vlora("info", store, "--json").stdout)
    assert table.returncode == 0
    assert data["summary"]["tasks"] == 4 and data["summary"]["method"] == "rank"
    assert len(data["layers"]) == 4 and all(row["k_a"] == 2 for row in data["layers"])
    first = data["layers"][0]
    assert f"{first['variance_a']:.2%}" in table.stdout
    for task_id, error in data["summary"]["task_errors"].items():
        assert f"{task_id}: ΔW relative error {error:.4f}" in table.stdout


def test_export_all_and_add(store, adapter_dirs, tmp_path, input_ids):
    result = vlora("export", store, "-o", tmp_path / "all", "--all")
    assert result.returncode == 0 and sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(
        d.name for d in adapter_dirs
    )
    copy = tmp_path / "store"
    copy.mkdir()
    for f in store.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    new = write_adapter(tmp_path / "new_task", 42)
    assert vlora("add", copy, new, "--task-id", "new_task", "--incremental").returncode == 0
    assert vlora("export", copy, "new_task", "-o", tmp_path / "new_out").returncode == 0
    assert (peft_logits(tmp_path / "new_out", input_ids) - peft_logits(new, input_ids)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/nowhere"], "no such folder"),
        (["info", "{tmp}"], "not a vlora store"),
        (["export", "{store}", "nope", "-o", "{tmp}/x"], "unknown task 'nope'"),
        (["export", "{store}", "-o", "{tmp}/x"], "give either a TASK or --all"),
        (["add", "{store}", "{adapter}", "--task-id", "qa"], "already in this store"),
        (["add", "{store}", "{adapter}", "--task-id", ""], "task id '' is empty"),  # not the folder's name instead
        (["add", "{store}", "{rank8}", "--task-id", "r8"], "rank 8 differs from rank 4"),
        (["add", "{store}", "{tmp}/empty"], "no adapter_config.json"),
        (["compress", "{adapter}", "-o", "{tmp}/single"], "at least 2 adapters"),
        (["compress", "{adapter}", "{adapter}", "-o", "{store}"], "used twice"),
        (["compress", "{adapter}", "{rank8}", "-o", "{store}"], "must share a rank"),
        (["compress", "{adapter}", "{other}", "-o", "{store}", "-k", "0"], "at least 1"),
    ],
)
def test_failures_exit_1_name_the_problem_and_keep_the_store(store, adapter_dirs, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    rank8 = write_adapter(tmp_path / "rank8", 9, r=8)
    values = dict(tmp=tmp_path, store=store, adapter=adapter_dirs[3], other=adapter_dirs[1], rank8=rank8)
    before = snapshot(store)
    result = vlora(*[a.format(**values) for a in args])
    assert result.returncode == 1, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "--device 'bogus' is not a device name; use cpu or cuda"),
        ("meta", "--device 'meta': vlora runs on cpu or cuda"),
        pytest.param(
            "cuda",
            "--device cuda was asked for but no CUDA GPU is present",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_compress_refuses_a_device_it_cannot_use(adapter_dirs, tmp_path, device, message):
    result = vlora("compress", *adapter_dirs[:2], "-o", tmp_path / "store", "--device", device)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.slow  # new processes
def test_the_installed_command_exits_with_the_documented_codes(store, tmp_path):
    ok = vlora("info", store, subprocess_=True)
    failed = vlora("info", tmp_path, subprocess_=True)
    usage = vlora("compress", subprocess_=True)
    assert (ok.returncode, failed.returncode, usage.returncode) == (0, 1, 2)
    assert "not a vlora store" in failed.stderr and "Traceback" not in failed.stderr


def test_usage_errors_exit_2(store):
    assert vlora("compress").returncode == 2
    assert vlora("export", store, "qa", "-o", "x", "--alpha", "lots").returncode == 2
    assert vlora("compress", "a", "b", "-o", "c", "--method", "pca").returncode == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1.5"])
@pytest.mark.parametrize(
    "args",
    [
        ["export", "{store}", "qa", "-o", "{out}", "--verify", "--min-effect"],
        ["eval", "{store}", "--min-effect"],
        ["eval", "{store}", "--min-agreement"],
    ],
)
def test_thresholds_must_be_shares(store, tmp_path, args, value):
    result = vlora(*[a.format(store=store, out=tmp_path / "out") for a in args], value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{args[-1]}: {value!r} is not a number from 0 to 1" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "info", "export", "add"])
def test_every_command_has_help(command):
    result = vlora(command, "--help")
    assert result.returncode == 0 and f"usage: vlora {command}" in result.stdout


# ---- vlora eval ---------------------------------------------------------------------------------------
def test_eval_measures_behaviour_per_k_and_recommends(adapter_dirs, tmp_path):
    model = make_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "the cat sat on", "answer": " the mat today"}, {"prompt": "one two three", "answer": " four"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [*adapter_dirs, "--base-model", model, "--prompts", prompts, "--method", "rank", "--k", "1,2,16,10000"]
    result = vlora("eval", *args, "--json")
    assert result.returncode == 0, result.stderr
    assert "--k above 16 (the most any layer holds) measured as k=16" in result.stderr  # not recommended as 10000
    data = json.loads(result.stdout)  # strict JSON: no NaN
    settings = {s["label"]: s for s in data["report"]["settings"]}
    assert set(settings) == {"k=1", "k=2", "k=16"}
    for task in settings["k=16"]["tasks"].values():  # every direction: the originals themselves
        assert task["effect_retained"] >= 0.999 and task["agreement"] == 1.0 and task["kl"] <= 1e-6
    assert data["recommendation"]["k"]["label"] in settings
    text = vlora("eval", *args)
    assert text.returncode == 0 and "rank basis: k=" in text.stdout and "keeps every task" in text.stdout
    bad = vlora("eval", *args[:-1], "0,x")
    assert bad.returncode == 1 and "--k '0,x': give whole numbers" in bad.stderr


# ---- vlora export --verify ------------------------------------------------------------------------------
def test_export_verify_warns_below_the_threshold_and_is_quiet_when_kept(adapter_dirs, tmp_path):
    from vlora_core.base_model import load_base_model
    from vlora_core.behaviour import compare_adapters
    from vlora_core.io.peft_files import load_adapter
    from vlora_core.io.prompts import read_prompts

    model = make_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "the cat sat on", "answer": " the mat today"}, {"prompt": "one two three"}]
    lines.append({"prompt": "the soup was cold", "answer": " negative", "task": "sentiment"})  # not asked of qa
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    measure_on = ["--model", model, "--prompts", prompts]
    assert vlora("compress", *adapter_dirs, "-o", tmp_path / "k1", "-k", "1").returncode == 0
    low = vlora(
        "export", tmp_path / "k1", "qa", "-o", tmp_path / "qa", "--verify", "--original", adapter_dirs[3], *measure_on
    )
    assert low.returncode == 0, low.stderr  # a warning, not a failure: the export stands
    base_model, tokenizer = load_base_model(model)
    original, written = load_adapter(adapter_dirs[3], "qa"), load_adapter(tmp_path / "qa", "qa")
    expected = compare_adapters(base_model, tokenizer, {"qa": original}, {"qa": written}, read_prompts(prompts))["qa"]
    assert expected.effect_retained < 0.95  # k = 1 of 3 directions loses part of qa's effect
    assert f"qa: effect retained {expected.effect_retained:.3f}" in low.stdout
    assert "against its original folder" in low.stdout
    assert f"vlora export: warning: 'qa': effect retained {expected.effect_retained:.3f}, below 0.95" in low.stderr

    assert vlora("compress", *adapter_dirs, "-o", tmp_path / "k3", "-k", "3").returncode == 0  # every direction
    kept = vlora(
        "export", tmp_path / "k3", "--all", "-o", tmp_path / "all", "--verify", "--original", *adapter_dirs, *measure_on
    )
    assert kept.returncode == 0 and "warning" not in kept.stderr  # quiet: every task keeps its whole effect
    assert kept.stdout.count("effect retained 1.000, top-1 agreement 1.000") == 4
    stored = vlora("export", tmp_path / "k1", "qa", "-o", tmp_path / "qa2", "--verify", *measure_on)
    assert stored.returncode == 0 and "effect retained 1.000" in stored.stdout and "the task as stored" in stored.stdout
    missing = vlora("export", tmp_path / "k3", "--all", "-o", tmp_path / "x", "--verify", "--original", adapter_dirs[0])
    assert missing.returncode == 1 and "--original: no folder named" in missing.stderr
    gguf = vlora("export", tmp_path / "k3", "qa", "-o", tmp_path / "q.gguf", "--format", "gguf", "--verify")
    assert gguf.returncode == 1 and "--verify reads the export back as a PEFT folder" in gguf.stderr


def test_adapters_naming_different_base_models_are_stored_with_a_warning(adapter_dirs, tmp_path):
    """Shapes agree, so they can share a basis; but one may be for another model of the same shape: said on compress
    and add, naming each model and its adapters."""
    other = tmp_path / "other"
    shutil.copytree(adapter_dirs[3], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/another-model"}))
    result = vlora("compress", *adapter_dirs[:2], other, "-o", tmp_path / "s", "-k", "1")
    assert result.returncode == 0 and "name 2 base models" in result.stderr and "org/another-model" in result.stderr
    result = vlora("compress", *adapter_dirs[:2], "-o", tmp_path / "t", "-k", "1")
    assert result.returncode == 0 and "base models" not in result.stderr
    result = vlora("add", tmp_path / "t", other, "--incremental")
    assert result.returncode == 0 and "org/another-model (" in result.stderr and "task " in result.stderr


def test_compress_force_names_the_tasks_it_replaces(adapter_dirs, tmp_path):
    store = tmp_path / "s"
    assert vlora("compress", *adapter_dirs[:3], "-o", store, "-k", "1").returncode == 0
    result = vlora("compress", *adapter_dirs[2:], "-o", store, "-k", "1", "--force")
    assert result.returncode == 0, result.stderr
    gone = [d.name for d in adapter_dirs[:2]]
    assert f"replaced a store of 3 tasks (--force); not in the new one: {gone[0]!r}, {gone[1]!r}" in result.stderr
    assert SharedSubspace.load(store).task_ids == [d.name for d in adapter_dirs[2:]]
    again = vlora("compress", *adapter_dirs[2:], "-o", store, "-k", "1", "--force")  # the same tasks: nothing to say
    assert again.returncode == 0 and "replaced a store" not in again.stderr
