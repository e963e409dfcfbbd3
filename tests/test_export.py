"""Export: standard PEFT folders that peft loads, with the same logits as the original adapters."""

import json

import pytest
import torch
from conftest import peft_logits, write_adapter, write_gpt2_adapter

from vlora import SharedSubspace, TaskError, VLoRAError, export_all, export_task, load_adapter

CASES = {  # name -> write_adapter keyword arguments, shared by all adapters of the case
    "plain": {},
    "rslora": {"use_rslora": True, "alpha": 16},
    "patterns": {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    dirs = [write_adapter(root / f"task{i}", 10 * i + 1, **CASES[request.param]) for i in range(3)]
    return request.param, dirs


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_export_reproduces_peft_logits(case, method, tmp_path, input_ids):
    name, dirs = case
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=64, method=method)
    store = SharedSubspace.load(subspace.save(tmp_path / "store"))
    for folder in dirs:
        out = export_task(store, folder.name, tmp_path / "out" / folder.name)
        assert (peft_logits(out, input_ids) - peft_logits(folder, input_ids)).abs().max() <= 1e-4
        original, exported = (json.loads((f / "adapter_config.json").read_text()) for f in (folder, out))
        for key in (
            "r",
            "lora_alpha",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
            "target_modules",
            "task_type",
            "modules_to_save",
            "base_model_name_or_path",
        ):
            assert exported[key] == original[key], key


def test_alpha_and_base_model_overrides_keep_the_effect(adapter_dirs, tmp_path, input_ids):
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs], num_components=64, method="rank")
    out = export_task(
        subspace, "sentiment", tmp_path / "a32", alpha=32, base_model="org/base", target_modules=["q_proj", "v_proj"]
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 32 and config["base_model_name_or_path"] == "org/base"
    assert (peft_logits(out, input_ids) - peft_logits(adapter_dirs[0], input_ids)).abs().max() <= 1e-4


def test_conv1d_adapters_round_trip_through_peft(tmp_path):
    from conftest import tiny_gpt2
    from peft import PeftModel

    dirs = [write_gpt2_adapter(tmp_path / f"g{i}", i) for i in range(3)]
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=8, method="flat")
    ids = torch.randint(0, 128, (1, 10))
    for folder in dirs:
        out = export_task(subspace, folder.name, tmp_path / "out" / folder.name)
        with torch.no_grad():
            want = PeftModel.from_pretrained(tiny_gpt2(0), str(folder))(ids).logits
            got = PeftModel.from_pretrained(tiny_gpt2(0), str(out))(ids).logits
        assert (want - got).abs().max() <= 1e-4


def test_export_all_uses_safe_folder_names(adapter_dirs, tmp_path):
    adapters = [load_adapter(d) for d in adapter_dirs[:3]]
    subspace = SharedSubspace.from_adapters(adapters, task_ids=["plain", "../escape", "team/a"], num_components=2)
    paths = export_all(subspace, tmp_path / "all")
    assert {p.parent for p in paths.values()} == {tmp_path / "all"}
    assert paths["plain"].name == "plain" and len({p.name for p in paths.values()}) == 3
    assert all((p / "adapter_model.safetensors").is_file() for p in paths.values())


def test_export_errors(adapter_dirs, tmp_path):
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs], num_components=2)
    with pytest.raises(TaskError, match="unknown task 'nope'; this store holds: 'sentiment'"):
        export_task(subspace, "nope", tmp_path / "x")
    with pytest.raises(VLoRAError, match="does not cover stored layers"):
        export_task(subspace, "qa", tmp_path / "x", target_modules=["q_proj"])
    assert not (tmp_path / "x").exists()
