"""Reading PEFT adapter folders: every key variant, config features, and refusals that name the key."""

import json

import pytest
import torch
from conftest import write_adapter, write_gpt2_adapter
from safetensors.torch import load_file, save_file

from vlora import AdapterError, load_adapter, save_adapter
from vlora_core.adapter import lora_scaling


def _rewrite_keys(folder, rename):
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    save_file({rename(k): v for k, v in state.items()}, path)


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k,  # as PeftModel.save_pretrained writes it
        lambda k: k.removeprefix("base_model.model."),  # no prefix
        lambda k: k.replace(".weight", ".default.weight") if ".lora_" in k else k,  # in-memory adapter name
    ],
)
def test_key_variants_give_the_same_layers(tmp_path, rename):
    reference = load_adapter(write_adapter(tmp_path / "ref", 0))
    variant_dir = write_adapter(tmp_path / "variant", 0)
    _rewrite_keys(variant_dir, rename)
    variant = load_adapter(variant_dir)
    assert (
        list(variant.layers)
        == list(reference.layers)
        == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ]
    )
    for name, layer in reference.layers.items():
        assert torch.equal(variant.layers[name].A, layer.A) and torch.equal(variant.layers[name].B, layer.B)


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    folder = write_adapter(tmp_path / "legacy", 1)
    state = load_file(folder / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    adapter = load_adapter(folder)
    assert torch.equal(
        adapter.layers["model.layers.0.self_attn.q_proj"].A,
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )


def test_legacy_bin_with_code_is_refused(tmp_path):
    folder = write_adapter(tmp_path / "evil", 1)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "f": print}, folder / "adapter_model.bin")  # a pickle with a callable
    with pytest.raises(AdapterError, match="adapter_model.bin: cannot be read safely"):
        load_adapter(folder)


def test_scaling_follows_rslora_and_patterns(tmp_path):
    folder = write_adapter(
        tmp_path / "patterns",
        2,
        r=4,
        alpha=8,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    adapter = load_adapter(folder)
    assert adapter.ranks["model.layers.1.self_attn.q_proj"] == 2
    assert adapter.layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    assert adapter.layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3 / 4)
    assert adapter.layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 4)
    rs = load_adapter(write_adapter(tmp_path / "rs", 2, r=4, alpha=8, use_rslora=True))
    assert rs.layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)  # alpha / sqrt(r)
    assert lora_scaling({"lora_alpha": 16, "use_rslora": True}, "x", 16) == pytest.approx(4.0)


def test_modules_to_save_are_kept(tmp_path):
    adapter = load_adapter(write_adapter(tmp_path / "mts", 3, modules_to_save=["lm_head"]))
    assert list(adapter.extras) == ["base_model.model.lm_head.weight"]
    assert adapter.extras["base_model.model.lm_head.weight"].shape == (128, 32)


def test_conv1d_fan_in_fan_out_adapter(tmp_path):
    adapter = load_adapter(write_gpt2_adapter(tmp_path / "gpt2", 0))
    layer = adapter.layers["transformer.h.0.attn.c_attn"]
    assert adapter.config["fan_in_fan_out"] is True
    assert layer.A.shape == (4, 32) and layer.B.shape == (96, 4)  # PEFT keeps (r, d_in), (d_out, r)


def test_save_then_load_is_identity(tmp_path):
    adapter = load_adapter(write_adapter(tmp_path / "a", 4, modules_to_save=["lm_head"], use_rslora=True))
    again = load_adapter(save_adapter(adapter, tmp_path / "copy"))
    assert again.config == adapter.config
    assert all(
        torch.equal(again.layers[n].A, l.A) and torch.equal(again.layers[n].B, l.B) for n, l in adapter.layers.items()
    )
    assert torch.equal(
        again.extras["base_model.model.lm_head.weight"], adapter.extras["base_model.model.lm_head.weight"]
    )


# ---- refusals: each names the problem and the file ---------------------------------------------------
def _with_extra_tensor(folder, key, tensor):
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    state[key] = tensor
    save_file(state, path)
    return folder


@pytest.mark.parametrize(
    "key, shape, message",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (32,), "lora_magnitude_vector"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 128), "lora_embedding_A"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (32,), "lora_B.bias"),
    ],
)
def test_unsupported_lora_kinds_name_the_key(tmp_path, key, shape, message):
    folder = _with_extra_tensor(write_adapter(tmp_path / "x", 0), key, torch.ones(shape))
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder)


def test_dora_config_is_refused(tmp_path):
    folder = write_adapter(tmp_path / "dora", 0)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda f: (f / "adapter_config.json").write_text('{"r": 4}'), "no 'lora_alpha'"),
        (
            lambda f: (f / "adapter_config.json").write_text('{"r": "four", "lora_alpha": 8}'),
            "'r' in adapter_config.json",
        ),
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(
                (f / "adapter_model.safetensors").read_bytes()[:100]
            ),
            "not a readable safetensors file",
        ),
        (
            lambda f: (f / "adapter_model.safetensors").write_text("hello, not tensors"),
            "not a readable safetensors file",
        ),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    ],
)
def test_damaged_folders_get_clear_errors(tmp_path, damage, message):
    folder = write_adapter(tmp_path / "broken", 0)
    damage(folder)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(folder)
    assert "broken" in str(info.value)  # the message names the folder or file


def test_nan_is_named(tmp_path):
    folder = write_adapter(tmp_path / "nan", 0)
    state = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key][0, 0] = float("nan")
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="v_proj.lora_B.weight' contains NaN or Inf"):
        load_adapter(folder)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")
    with pytest.raises(AdapterError, match="no such folder"):
        load_adapter(tmp_path / "nowhere")


def test_config_rank_must_match_weights(tmp_path):
    folder = write_adapter(tmp_path / "liar", 0)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(AdapterError, match="rank 4 in the weights but 8 in adapter_config.json"):
        load_adapter(folder)
