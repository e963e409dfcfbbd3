"""The offline demo: the bundled SmolLM2 base model and the demo adapters in assets/, for real.

Each demo adapter, applied through VLoRAModel (from a lossless store) and through PEFT, gives the same
greedy answer, and that answer differs from the base model's: the A/B panel shows a real effect.
"""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from vlora import SharedSubspace, VLoRAModel, load_adapter
from vlora_core.base_model import chat_prompt, generate_text, load_base_model

pytestmark = pytest.mark.slow  # the bundled 135M model

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO = ASSETS / "demo_adapters"
TOKENS = 16


def demo_dirs():
    return sorted(p for p in DEMO.iterdir() if (p / "adapter_config.json").is_file())


def demo_prompt(task: str) -> str:
    prompts = json.loads((ASSETS / "demo_prompts.json").read_text())
    return (prompts.get("by_task", {}).get(task) or prompts["shared"])[0]


@pytest.fixture(scope="module")
def bundled():
    return load_base_model()  # offline: HF_HUB_OFFLINE=1 is set for the whole test session


def test_there_are_four_to_six_demo_adapters():
    dirs = demo_dirs()
    assert 4 <= len(dirs) <= 6
    for folder in dirs:
        adapter = load_adapter(folder)
        assert set(adapter.ranks.values()) == {8}
        assert {name.rsplit(".", 1)[1] for name in adapter.layers} == {"q_proj", "v_proj"}


def test_demo_adapters_change_the_answer_and_vlora_equals_peft(bundled):
    model, tokenizer = bundled
    dirs = demo_dirs()
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=64, method="rank")
    vlora_model = VLoRAModel(model, subspace)
    peft_base, _ = load_base_model()  # PEFT injects its layers into the model it wraps: give it its own copy
    peft_model = PeftModel.from_pretrained(peft_base, str(dirs[0]), adapter_name=dirs[0].name)
    for folder in dirs[1:]:
        peft_model.load_adapter(str(folder), adapter_name=folder.name)
    for folder in dirs:
        prompt = chat_prompt(tokenizer, demo_prompt(folder.name))
        vlora_model.clear_task()
        base = generate_text(vlora_model, tokenizer, prompt, TOKENS)
        vlora_model.set_task(folder.name)
        ours = generate_text(vlora_model, tokenizer, prompt, TOKENS)
        peft_model.set_adapter(folder.name)
        theirs = generate_text(peft_model, tokenizer, prompt, TOKENS)
        assert ours == theirs, folder.name
        assert ours != base, folder.name
    vlora_model.clear_task()
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.allclose(vlora_model(ids).logits, peft_model(ids).logits, atol=1e-5)  # cleared = the base
