"""Hostile numbers in adapter configs and in options: each is refused on input with a one-line message naming the
file or option, or handled exactly; nothing is ever written with non-finite or zero factors.

The case tables are generated here: every value class (non-finite, out of the scaling range, wrong type, zero,
negative) is tried in every place a number enters (lora_alpha, r, alpha_pattern and rank_pattern values and
keys, use_rslora, any other config entry; --alpha on export and in the workbench; VLoRAModel's lora_alpha;
compress --stream and --task-ids). Adapters are real PEFT folders written by peft itself.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import delta_weights, relative_error, tiny_llama, write_adapter
from conftest import run_cli as vlora
from safetensors.torch import load_file, save_file

from vlora import AdapterError, SharedSubspace, VLoRAError, VLoRAModel, export_task, load_adapter, stream_compress
from vlora_core import adapter as adapter_rules
from vlora_core import export as export_module
from vlora_core.adapter import MAX_SCALING, MIN_SCALING
from vlora_core.export import export_tolerance
from vlora_core.layer import SubspaceLayer

R = 4  # every adapter here has rank 4 on q_proj and v_proj of the tiny Llama
INF, NAN = float("inf"), float("nan")


class Raw(str):
    """A value written into adapter_config.json as raw JSON text (e.g. 1e400, which Python's json reads as inf)."""


def _write_config(folder, config: dict) -> None:
    raws = {}

    def encode(value):
        if isinstance(value, Raw):
            raws[f"__raw{len(raws)}__"] = str(value)
            return f"__raw{len(raws) - 1}__"
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        return value

    text = json.dumps(encode(config))  # Python's json writes NaN / Infinity, as a hostile file may hold
    for marker, raw in raws.items():
        text = text.replace(f'"{marker}"', raw)
    (folder / "adapter_config.json").write_text(text)


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# ---- the case tables ------------------------------------------------------------------------------
# Values of a lora_alpha (the config's, an alpha_pattern entry's): the words the refusal must contain.
BAD_ALPHAS = {
    "NaN": (NAN, "holds nan"),
    "Infinity": (INF, "holds inf"),
    "-Infinity": (-INF, "holds -inf"),
    "1e400 (JSON text)": (Raw("1e400"), "holds inf"),
    "1e308": (1e308, "outside the range vlora stores exactly"),
    "1e-300": (1e-300, "outside the range vlora stores exactly"),
    "5e-320 (subnormal)": (5e-320, "outside the range vlora stores exactly"),
    "just below the range": (R * MIN_SCALING / 2, "outside the range vlora stores exactly"),
    "just above the range": (R * MAX_SCALING * 2, "outside the range vlora stores exactly"),
    "10**400 (integer)": (10**400, "must be a positive number"),
    "0": (0, "must be a positive number"),
    "0.0": (0.0, "must be a positive number"),
    "negative": (-8, "must be a positive number"),
    "a string": ("8", "must be a positive number"),
    "null": (None, "must be a positive number"),
    "true": (True, "must be a positive number"),
    "a list": ([8], "must be a positive number"),
    "an object": ({"v": 8}, "must be a positive number"),
}
# Values of a rank (the config's r, a rank_pattern entry's).
BAD_RANKS = {
    "NaN": (NAN, "holds nan"),
    "Infinity": (INF, "holds inf"),
    "1e400 (JSON text)": (Raw("1e400"), "holds inf"),
    "4.5": (4.5, "a whole one"),
    "4.0": (4.0, "a whole one"),
    "0": (0, "a whole one"),
    "negative": (-4, "a whole one"),
    "a string": ("4", "a whole one"),
    "null": (None, "a whole one"),
    "true": (True, "a whole one"),
    "a list": ([4], "a whole one"),
    "10**400 (integer)": (10**400, "in the weights but"),
}
# rank_pattern / alpha_pattern keys that are not usable patterns.
BAD_KEYS = {
    "unbalanced (": ("(", "not a valid pattern"),
    "unbalanced )": ("q_proj)", "not a valid pattern"),
    "open [": ("[q", "not a valid pattern"),
    "nothing to repeat": ("*", "not a valid pattern"),
    "bad group name": ("(?P<1>x)", "not a valid pattern"),
    "trailing backslash": ("q_proj\\", "not a valid pattern"),
    "reversed range": ("a{2,1}", "not a valid pattern"),
    "2,000 characters": ("q" * 2000, "characters long"),
    "catastrophic backtracking": ("(.|.)*y", "catastrophic backtracking"),
}


def _config_cases() -> dict:
    """name -> (config changes, words in the refusal)."""
    cases = {}
    for name, (value, words) in BAD_ALPHAS.items():
        cases[f"lora_alpha {name}"] = ({"lora_alpha": value}, words)
        cases[f"alpha_pattern value {name}"] = ({"alpha_pattern": {"q_proj": value}}, words)
    for name, (value, words) in BAD_RANKS.items():
        cases[f"r {name}"] = ({"r": value}, words)
        if "in the weights" not in words:
            cases[f"rank_pattern value {name}"] = ({"rank_pattern": {"q_proj": value}}, words)
    for name, (key, words) in BAD_KEYS.items():
        value_ok = {"alpha_pattern": 8, "rank_pattern": R}
        for where, value in value_ok.items():
            cases[f"{where} key {name}"] = ({where: {key: value}}, words)
    cases |= {
        "use_rslora a string": ({"use_rslora": "false"}, "'use_rslora'"),
        "use_rslora 2": ({"use_rslora": 2}, "'use_rslora'"),
        "lora_dropout NaN": ({"lora_dropout": NAN}, "holds nan at lora_dropout"),
        "nested Infinity": ({"loftq_config": {"bits": INF}}, "holds inf at loftq_config.bits"),
        "rslora scaling above the range": ({"use_rslora": True, "lora_alpha": 4e6}, "sqrt(r) = sqrt(4)"),
        "alpha_pattern scaling below the range": ({"alpha_pattern": {"v_proj": 1e-9}}, "at model.layers.0"),
    }
    return cases


CONFIG_CASES = _config_cases()

# Configs at the edges of what is accepted: each must round-trip exactly. name -> (changes, scaling of q_proj, v_proj)
EDGE_CASES = {
    "scaling at the lower end": ({"lora_alpha": R * MIN_SCALING}, (MIN_SCALING, MIN_SCALING)),
    "scaling at the upper end": ({"lora_alpha": R * MAX_SCALING}, (MAX_SCALING, MAX_SCALING)),
    "an integer alpha": ({"lora_alpha": 1000}, (250.0, 250.0)),
    "a small float alpha": ({"lora_alpha": 0.01}, (0.0025, 0.0025)),
    "rslora": ({"use_rslora": True, "lora_alpha": 6}, (3.0, 3.0)),
    "alpha_pattern with a regex key": ({"alpha_pattern": {"layers\\.\\d+\\.self_attn\\.q_proj": 2}}, (0.5, 2.0)),
    "alpha_pattern with an alternation": ({"alpha_pattern": {"q_proj|v_proj": 12}}, (3.0, 3.0)),
    "rank_pattern agreeing with the weights": ({"rank_pattern": {"v_proj": R}}, (2.0, 2.0)),
    "use_rslora false": ({"use_rslora": False}, (2.0, 2.0)),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A template adapter (alpha 8, r 4) and two good ones to compress it with."""
    root = tmp_path_factory.mktemp("numbers")
    return [write_adapter(root / name, seed) for seed, name in enumerate(["template", "good1", "good2"])]


def _case_folder(adapters, tmp_path, changes: dict):
    folder = tmp_path / "case adapter"
    shutil.copytree(adapters[0], folder)
    _write_config(folder, _config(folder) | changes)
    return folder


# ---- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_hostile_config_numbers_are_refused_on_input(name, adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_rules, "PATTERN_BUDGET_S", 0.3)  # the catastrophic key: refused in 0.3 s, not 2
    changes, words = CONFIG_CASES[name]
    folder = _case_folder(adapters, tmp_path, changes)
    with pytest.raises(AdapterError) as refused:
        load_adapter(folder)
    message = str(refused.value)
    assert words in message and "case adapter" in message and "\n" not in message, message
    result = vlora("compress", adapters[1], adapters[2], folder, "-o", tmp_path / "store")
    assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case adapter"]  # no store written


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_configs_round_trip_exactly(name, adapters, tmp_path):
    changes, (q_scaling, v_scaling) = EDGE_CASES[name]
    folder = _case_folder(adapters, tmp_path, changes)
    adapter = load_adapter(folder)
    scalings = {n.rsplit(".", 1)[-1]: layer.scaling for n, layer in adapter.layers.items()}
    assert scalings == {"q_proj": pytest.approx(q_scaling, rel=1e-12), "v_proj": pytest.approx(v_scaling, rel=1e-12)}
    others = []  # companions of the same scale: a float32 basis holds each task to its own relative precision
    for d in adapters[1:]:
        shutil.copytree(d, tmp_path / d.name)
        _write_config(tmp_path / d.name, _config(d) | changes)
        others.append(load_adapter(tmp_path / d.name))
    subspace = SharedSubspace.from_adapters([adapter, *others], num_components=2)
    out = export_task(subspace, "case adapter", tmp_path / "exported")
    exported = load_adapter(out)
    for layer in exported.layers.values():
        assert layer.A.isfinite().all() and layer.B.isfinite().all()
        assert layer.A.abs().amax() > 0 and layer.B.abs().amax() > 0
    original, written = delta_weights(adapter), delta_weights(exported)
    assert max(relative_error(written[n], original[n]) for n in original) < 1e-5
    assert _config(out)["lora_alpha"] == _config(folder)["lora_alpha"]


# ---- --alpha on export, in the CLI, the Python API and the workbench ------------------------------
BAD_EXPORT_ALPHAS = {  # the text typed after --alpha: the words of the refusal
    "nan": "must be a positive number",
    "inf": "must be a positive number",
    "-inf": "must be a positive number",
    "0": "must be a positive number",
    "-1": "must be a positive number",
    "1e-320": "outside the range vlora stores exactly",
    "1e-300": "outside the range vlora stores exactly",
    "1e308": "outside the range vlora stores exactly",
    "1e-7": "outside the range vlora stores exactly",
    "1e7": "outside the range vlora stores exactly",
}
GOOD_EXPORT_ALPHAS = ["4e-6", "4000000", "0.5", "32"]  # scalings 1e-6, 1e6, 0.125, 8: all inside the range


@pytest.fixture(scope="module")
def store(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("numbers-store") / "store"
    assert vlora("compress", *adapters, "-o", out, "-k", "2").returncode == 0
    return out


@pytest.mark.parametrize("alpha", list(BAD_EXPORT_ALPHAS))
def test_bad_export_alpha_is_refused_and_nothing_is_written(alpha, store, tmp_path):
    result = vlora("export", store, "good1", "-o", tmp_path / "out", f"--alpha={alpha}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--alpha" in result.stderr and BAD_EXPORT_ALPHAS[alpha] in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(VLoRAError, match="--alpha"):
        export_task(SharedSubspace.load(store), "good1", tmp_path / "api", alpha=float(alpha))
    assert not (tmp_path / "api").exists()


@pytest.mark.parametrize("alpha", GOOD_EXPORT_ALPHAS)
def test_export_alpha_in_the_range_keeps_the_stored_delta_w(alpha, store, tmp_path):
    result = vlora("export", store, "good1", "-o", tmp_path / "out", f"--alpha={alpha}")
    assert result.returncode == 0 and "exported 'good1'" in result.stdout, result.stderr
    exported = load_adapter(tmp_path / "out")
    assert _config(tmp_path / "out")["lora_alpha"] == float(alpha)
    stored = SharedSubspace.load(store).task_factors("good1")
    for name, layer in exported.layers.items():
        assert layer.A.isfinite().all() and layer.B.isfinite().all() and layer.B.abs().amax() > 0
        F_A, F_B = stored[name]
        assert relative_error(layer.delta_weight(), F_B @ F_A.T) < 2e-6


@pytest.mark.parametrize("alpha", [NAN, INF, -INF, 0.0, -1.0, 1e-320, 1e308])
def test_workbench_export_refuses_bad_alpha(alpha, adapters, tmp_path):
    from ui.settings import AppSettings
    from ui.workbench import Workbench

    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_path(adapters[0].parent)
    with pytest.raises(VLoRAError, match="--alpha") as refused:
        bench.export(alpha=alpha)
    assert "\n" not in str(refused.value)
    assert not any(p.is_file() for p in (tmp_path / "session").rglob("*"))  # no zip, no folder left behind
    assert bench.export(alpha=16.0).task_ids == ["good1", "good2", "template"]


# ---- dtypes: what the export writes is read back and checked ---------------------------------------
def _as_dtype(folder, dtype, scale: float = 1.0):
    state = load_file(folder / "adapter_model.safetensors")
    save_file({k: (v * scale).to(dtype) for k, v in state.items()}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exports_in_each_dtype_are_within_its_precision(dtype, adapters, tmp_path):
    dirs = []
    for d in adapters:
        shutil.copytree(d, tmp_path / d.name)
        dirs.append(_as_dtype(tmp_path / d.name, dtype))
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=2)
    for alpha in (None, 1.0, 100.0):
        out = export_task(subspace, "template", tmp_path / f"out-{alpha}", alpha=alpha)
        exported = load_adapter(out)
        for name, (F_A, F_B) in subspace.task_factors("template").items():
            layer = exported.layers[name]
            assert layer.A.dtype == dtype
            assert relative_error(layer.delta_weight(), F_B @ F_A.T) <= export_tolerance(dtype)


def test_float16_overflow_is_refused_before_writing(adapters, tmp_path):
    dirs = []
    for d in adapters:
        shutil.copytree(d, tmp_path / d.name)
        dirs.append(_as_dtype(tmp_path / d.name, torch.float16, scale=100.0))  # canonical factors ~200
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=2)
    with pytest.raises(VLoRAError, match="overflow float16") as refused:
        export_task(subspace, "template", tmp_path / "out", alpha=R * MIN_SCALING)  # factors x 1024
    assert "nearer the task's own (8)" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_float16_export_overflow_names_float16_and_the_dtypes_that_fit(adapters, tmp_path):
    dirs = []
    for d in adapters:
        shutil.copytree(d, tmp_path / d.name)
        dirs.append(_as_dtype(tmp_path / d.name, torch.float32, scale=1e6))  # canonical factors ~1e6: past fp16
    assert vlora("compress", *dirs, "-o", tmp_path / "store", "-k", "2").returncode == 0
    refused = vlora("export", tmp_path / "store", "template", "-o", tmp_path / "out", "--dtype", "fp16")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "overflow float16; export with --dtype fp32 or bf16 (float32's range)." in refused.stderr, refused.stderr
    assert "lora_alpha" not in refused.stderr  # no --alpha was given: the dtype is the fix
    assert not (tmp_path / "out").exists()


CORRUPTIONS = {  # what a faulty export path could write: each must be caught by the read-back check
    "a factor off by 0.1%": lambda layer: layer.B.mul_(1.001),
    "a zero factor": lambda layer: layer.A.zero_(),
    "swapped sign": lambda layer: layer.B.neg_(),
    "scaling lost": lambda layer: layer.A.mul_(layer.scaling),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_wrong_export_is_caught_by_the_read_back(corruption, store, tmp_path, monkeypatch):
    honest = export_module.task_adapter

    def faulty(*args, **kwargs):
        adapter = honest(*args, **kwargs)
        CORRUPTIONS[corruption](next(iter(adapter.layers.values())))
        return adapter

    monkeypatch.setattr(export_module, "task_adapter", faulty)
    with pytest.raises(VLoRAError, match="differs from task 'good1'") as refused:
        export_task(SharedSubspace.load(store), "good1", tmp_path / "out")
    assert str(refused.value).startswith(f"{tmp_path / 'out'}: the exported ΔW of model.layers.0.self_attn.q_proj")
    assert list(tmp_path.iterdir()) == []  # nothing published, no temp folder left


# ---- VLoRAModel's lora_alpha ----------------------------------------------------------------------
BAD_MODEL_ALPHAS = {
    "inf": (INF, "must be a positive number"),
    "nan": (NAN, "must be a positive number"),
    "-inf": (-INF, "must be a positive number"),
    "0": (0, "must be a positive number"),
    "negative": (-2.0, "must be a positive number"),
    "True": (True, "must be a positive number"),
    "a string": ("8", "must be a positive number"),
    "a tensor": (torch.tensor(8.0), "must be a positive number"),
    "10**400": (10**400, "must be a positive number"),
    "1e-300": (1e-300, "outside the range vlora stores exactly"),
    "1e308": (1e308, "outside the range vlora stores exactly"),
}


@pytest.mark.parametrize("name", list(BAD_MODEL_ALPHAS))
def test_vlora_model_refuses_bad_lora_alpha_and_leaves_the_model_alone(name, store):
    value, words = BAD_MODEL_ALPHAS[name]
    base = tiny_llama(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(VLoRAError, match="VLoRAModel") as refused:
        VLoRAModel(base, SharedSubspace.load(store), lora_alpha=value)
    assert words in str(refused.value)
    assert not any(isinstance(m, SubspaceLayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("alpha", [R * MIN_SCALING, R * MAX_SCALING, 8, 8.0])
def test_vlora_model_accepts_alphas_in_the_range(alpha, store, input_ids):
    subspace = SharedSubspace.load(store)
    model = VLoRAModel(tiny_llama(0), subspace, lora_alpha=alpha)
    model.set_task("good1")
    gains = [layer.gain for layer in model.targets.values()]
    assert gains == [pytest.approx((alpha / R) / 2.0, rel=1e-12)] * 4  # the tasks' own scaling is 8 / 4
    with torch.no_grad():
        assert model(input_ids).logits.isfinite().all()


# ---- compress --stream and --task-ids -------------------------------------------------------------
STREAM_CASES = {  # extra arguments: words of the refusal
    "--stream -1": (["--stream", "-1"], "--stream CHUNK must be a whole number of at least 2"),
    "--stream 0": (["--stream", "0"], "--stream CHUNK must be a whole number of at least 2"),
    "--stream 1": (["--stream", "1"], "--stream CHUNK must be a whole number of at least 2"),
    "--stream, fewer ids": (["--stream", "2", "--task-ids", "a", "b"], "2 task ids for 3 adapter folders"),
    "--stream, more ids": (["--stream", "2", "--task-ids", "a", "b", "c", "d"], "4 task ids for 3 adapter folders"),
    "--stream, a repeated id": (["--stream", "2", "--task-ids", "a", "b", "a"], "task id 'a' is used twice"),
    "--stream, an empty id": (["--stream", "2", "--task-ids", "a", "", "c"], "is empty"),
    "fewer ids": (["--task-ids", "a"], "1 task ids for 3 adapters"),
    "-k 0": (["-k", "0"], "at least 1"),
    "-k -3": (["-k", "-3"], "at least 1"),
    "--threshold nan": (["--adaptive-k", "--threshold", "nan"], "variance threshold must be in (0, 1]"),
    "--threshold inf": (["--adaptive-k", "--threshold", "inf"], "variance threshold must be in (0, 1]"),
    "--threshold 0": (["--adaptive-k", "--threshold", "0"], "variance threshold must be in (0, 1]"),
}


@pytest.mark.parametrize("name", list(STREAM_CASES))
def test_compress_options_are_refused_before_any_work(name, adapters, tmp_path):
    extra, words = STREAM_CASES[name]
    result = vlora("compress", *adapters, "-o", tmp_path / "store", *extra)
    assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("chunk", [2.5, True, "2", None, -(2**70)])
def test_stream_compress_api_refuses_odd_chunks(chunk, adapters):
    with pytest.raises(VLoRAError, match="at least 2"):
        stream_compress(adapters, chunk=chunk)


@pytest.mark.parametrize("chunk", [2, 3, 100])
def test_stream_chunks_from_two_up_store_every_task(chunk, adapters):
    streamed = stream_compress(adapters, num_components=64, chunk=chunk)
    assert streamed.task_ids == [d.name for d in adapters]
    originals = {d.name: delta_weights(load_adapter(d)) for d in adapters}
    for task_id, factors in ((t, streamed.task_factors(t)) for t in streamed.task_ids):
        worst = max(relative_error(F_B @ F_A.T, originals[task_id][n]) for n, (F_A, F_B) in factors.items())
        assert worst < 1e-5 and math.isfinite(worst)
