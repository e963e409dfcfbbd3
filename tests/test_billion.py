"""A base model of about a billion parameters (random weights, a Llama config, never downloaded): loading it in
bf16 costs about its bf16 size, VLoRAModel with 32 tasks adds only the shared basis, and generation works.

The model is built once in bf16 and saved to a temp folder; the load is measured in a fresh process, whose
peak resident memory (VmHWM, reset after imports) is the load's own.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import byte_tokenizer
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.slow  # ~1 min: builds, saves and loads a 1.1B-parameter model

CONFIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TASKS = 32


@pytest.fixture(scope="module")
def billion(tmp_path_factory):
    """(model folder, adapter folders, bf16 bytes of the model)."""
    root = tmp_path_factory.mktemp("billion")
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**CONFIG), dtype=torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    adapters = []
    for task in range(TASKS):  # peft writes every adapter; each gets its own random factors
        torch.manual_seed(task)
        with torch.no_grad():
            for p in lora:
                p.normal_(0, 0.02)
        peft_model.save_pretrained(root / f"task{task:02d}")
        adapters.append(root / f"task{task:02d}")
    del model, peft_model
    return root / "model", adapters, size


PROBE = textwrap.dedent("""
    import json, sys, torch
    from vlora import SharedSubspace, VLoRAModel, load_adapter
    from vlora_core.base_model import load_base_model

    def peak():  # kB of resident memory at its highest since the last reset
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    folder, adapters = sys.argv[1], sys.argv[2:]
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the imports are not the load
    before = rss()
    model, _ = load_base_model(folder, dtype="bf16", device="cpu")
    load_peak = peak() - before
    subspace = SharedSubspace.from_adapters([load_adapter(a) for a in adapters], num_components=8, method="rank")
    params = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    bare = params(model)
    wrapped = VLoRAModel(model, subspace)
    added = params(wrapped) - bare
    basis = sum(b.components.numel() + (0 if b.mean is None else b.mean.numel())
                for sides in subspace.bases.values() for b in sides.values()) * 2  # bf16 bytes
    loadings = sum(t.numel() for task in subspace.tasks.values()
                   for sides in task.loadings.values() for t in sides.values()) * 4  # fp32, owned by the subspace
    wrapped.set_task(subspace.task_ids[3])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = wrapped.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        mixed = wrapped(ids.repeat(2, 1), task_ids=[subspace.task_ids[0], None]).logits
    print(json.dumps(dict(load_peak=load_peak, added=added, basis=basis, loadings=loadings,
                          new_tokens=out.shape[1] - 4, finite=bool(torch.isfinite(mixed).all()),
                          dtype=str(next(model.parameters()).dtype))))
""")


def test_a_billion_parameter_model_in_bf16(billion):
    folder, adapters, size = billion
    assert 0.9e9 < size / 2 < 1.3e9  # about a billion bf16 parameters
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), *map(str, adapters)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["dtype"] == "torch.bfloat16"
    assert facts["load_peak"] < 2 * size, facts  # peak RSS of the load below twice the bf16 size
    assert 0 < facts["added"] <= facts["basis"], facts  # the wrapped model holds the shared basis, nothing per task
    modules = 2 * CONFIG["num_hidden_layers"]  # q_proj and v_proj
    assert facts["loadings"] == TASKS * modules * 2 * 8 * 8 * 4  # each task: r x k fp32 numbers per layer side
    assert facts["new_tokens"] == 2 and facts["finite"]
