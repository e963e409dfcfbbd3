"""A corpus of bad adapter folders, made here: each gets a clear error, a non-zero exit, and no damage.

Every case runs through the CLI (`vlora add` into an existing store and `vlora compress` over that store):
exit code 1, a message naming the problem, no traceback, and the store byte for byte as it was.
"""

import json
import os
import struct

import pytest
import torch
from conftest import run_cli as vlora
from conftest import snapshot, write_adapter
from safetensors.torch import load_file, save_file

from vlora import SharedSubspace
from vlora_core import quality

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _weights(f):
    return f / "adapter_model.safetensors"


def _relink(file, target):
    file.unlink()
    file.symlink_to(target)


def _config(f):
    return json.loads((f / "adapter_config.json").read_text())


def _set_config(f, **changes):
    (f / "adapter_config.json").write_text(json.dumps(_config(f) | changes))


def _set_tensor(f, key, value):
    state = load_file(_weights(f))
    state[key] = value
    save_file(state, _weights(f))


def _header_claiming(f, n_bytes):
    header = json.dumps({KEY_A: {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}}).encode()
    _weights(f).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def _drop_config_key(f, key):
    config = _config(f)
    del config[key]
    (f / "adapter_config.json").write_text(json.dumps(config))


CORPUS = {  # name -> (damage the folder, words the message must contain)
    "truncated safetensors": (
        lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[:-7]),
        "not a readable safetensors",
    ),
    "garbled safetensors": (
        lambda f: _weights(f).write_bytes(bytes(reversed(_weights(f).read_bytes()))),
        "not a readable safetensors",
    ),
    "empty safetensors": (lambda f: _weights(f).write_bytes(b""), "not a readable safetensors"),
    "header claims gigabytes": (lambda f: _header_claiming(f, 8 * 2**30), "not a readable safetensors"),
    "header length absurd": (
        lambda f: _weights(f).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        "not a readable safetensors",
    ),
    "integer tensor": (lambda f: _set_tensor(f, KEY_A, torch.ones(4, 32, dtype=torch.int32)), "must be floating point"),
    "float8 tensor": (
        lambda f: _set_tensor(f, KEY_A, torch.ones(4, 32).to(torch.float8_e4m3fn)),
        "has dtype float8_e4m3fn; adapter weights must be floating point: float32, float16, bfloat16 or float64",
    ),
    "weights whose products overflow float32": (
        lambda f: _set_tensor(f, KEY_A, torch.full((4, 32), 1e19)),
        "has a weight of magnitude 1e+19 (largest |value| of lora_A, lora_B), too large for float32 arithmetic",
    ),
    "NaN": (lambda f: _set_tensor(f, KEY_A, torch.full((4, 32), float("nan"))), "lora_A.weight' contains NaN"),
    "Inf": (lambda f: _set_tensor(f, KEY_B, torch.full((32, 4), float("inf"))), "lora_B.weight' contains NaN or Inf"),
    "ranks disagree inside the adapter": (
        lambda f: _set_tensor(f, KEY_B, torch.ones(32, 3)),
        "rank dimensions must agree",
    ),
    "3-D factor": (lambda f: _set_tensor(f, KEY_A, torch.ones(4, 32, 1)), "only 2-D"),
    "lora_B missing": (
        lambda f: save_file({k: v for k, v in load_file(_weights(f)).items() if k != KEY_B}, _weights(f)),
        "has no lora_B weight",
    ),
    "no LoRA tensors": (lambda f: save_file({"x.weight": torch.ones(2)}, _weights(f)), "no lora_A/lora_B tensors"),
    "config missing": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
    "config is a list": (lambda f: (f / "adapter_config.json").write_text("[]"), "must hold a JSON object"),
    "config without r": (lambda f: _drop_config_key(f, "r"), "has no 'r'"),
    "config without lora_alpha": (lambda f: _drop_config_key(f, "lora_alpha"), "has no 'lora_alpha'"),
    "r is a string": (lambda f: _set_config(f, r="4"), "'r' in adapter_config.json must be a positive number"),
    "alpha negative": (lambda f: _set_config(f, lora_alpha=-1), "must be a positive number"),
    "alpha is true": (lambda f: _set_config(f, lora_alpha=True), "must be a positive number"),
    "rank_pattern is a list": (lambda f: _set_config(f, rank_pattern=[1]), "'rank_pattern'"),
    "config r disagrees": (lambda f: _set_config(f, r=16), "rank 4 in the weights but 16"),
    "not LoRA": (lambda f: _set_config(f, peft_type="IA3"), "peft_type is 'IA3'"),
    "DoRA": (lambda f: _set_config(f, use_dora=True), "DoRA"),
    "DoRA magnitude tensor": (
        lambda f: _set_tensor(f, KEY_A.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(32)),
        "lora_magnitude_vector",
    ),
    "weights missing": (lambda f: _weights(f).unlink(), "no adapter_model.safetensors"),
    "weights a link to a device": (lambda f: _relink(_weights(f), "/dev/zero"), "is not a regular file"),
    "weights a pipe": (lambda f: (_weights(f).unlink(), os.mkfifo(_weights(f))), "is not a regular file"),
    "weights a link to nothing": (lambda f: _relink(_weights(f), f / "gone"), "is not a regular file"),
    "rank mismatch with the store": (lambda f: None, "rank 8 differs from rank 4"),
    "module mismatch with the store": (lambda f: None, "targets different modules"),
}


@pytest.fixture(scope="module")
def store(adapter_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "store"
    assert vlora("compress", *adapter_dirs[:3], "-o", out, "-k", "2").returncode == 0
    return out


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_adapter_is_refused_and_the_store_is_unchanged(name, store, adapter_dirs, tmp_path):
    damage, words = CORPUS[name]
    r = 8 if "rank mismatch" in name else 4
    targets = ("q_proj", "k_proj") if "module mismatch" in name else ("q_proj", "v_proj")
    folder = write_adapter(tmp_path / "bad adapter", 5, r=r, targets=targets)
    damage(folder)
    before = snapshot(store)
    for args in (["add", store, folder, "--task-id", "bad"], ["compress", *adapter_dirs[:2], folder, "-o", store]):
        result = vlora(*args)
        assert result.returncode == 1, (name, args[0], result.stdout)
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "bad adapter" in result.stderr  # the message names the folder
        assert snapshot(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad adapter"]  # nothing written beside it


def _scaled(folder, factor):
    state = load_file(_weights(folder))
    save_file({key: value * factor for key, value in state.items()}, _weights(folder))
    return folder


def test_large_but_sane_weights_are_stored(tmp_path):
    loud = [_scaled(write_adapter(tmp_path / f"loud{i}", i), 1e6) for i in range(3)]  # |value| about 1e5
    result = vlora("compress", *loud, "-o", tmp_path / "store", "-k", "2")
    assert result.returncode == 0, result.stderr
    assert "stored 3 tasks" in result.stdout
    assert max(quality.task_errors(SharedSubspace.load(tmp_path / "store")).values()) < 1e-5  # lossless k


@pytest.mark.parametrize("factor, refused", [(1e3, False), (1e5, True)])
def test_one_adapter_far_larger_than_the_others_is_refused_not_rounding_them_away(
    adapter_dirs, tmp_path, factor, refused
):
    """Factors 10^5 x the others' (ΔW 10^10 x) would leave the other tasks with ΔW errors of 3e-3 at a lossless k,
    10^6 x with 0.31 (rc 0, nothing said): such a set is refused by name, and nothing is written; 10^3 x (ΔW 10^6 x)
    is stored with the others intact."""
    loud = _scaled(write_adapter(tmp_path / "loud", 5), factor)
    result = vlora("compress", *adapter_dirs[:2], loud, "-o", tmp_path / "store", "-k", "2")
    if refused:
        streamed = vlora("compress", *adapter_dirs[:2], loud, "-o", tmp_path / "store", "-k", "1", "--stream", "2")
        for run in (result, streamed):  # streamed: the loud one comes in the second chunk
            assert run.returncode == 1 and "loud" in run.stderr and "times that of" in run.stderr
            assert "store of its own" in run.stderr and not (tmp_path / "store").exists()
        return
    assert result.returncode == 0, result.stderr
    errors = quality.task_errors(SharedSubspace.load(tmp_path / "store"))
    assert max(errors.values()) < 1e-4, errors
