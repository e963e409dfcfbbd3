"""VLoRAModel: PEFT's logits for every task, instant pointer-only switching, mixed batches, merge/unmerge."""

import json
import shutil

import pytest
import torch
from conftest import peft_logits, tiny_gpt2, tiny_llama, tiny_llama_config, write_adapter, write_gpt2_adapter
from transformers import LlamaForCausalLM

import vlora_core.layer
from vlora import CompatibilityError, SharedSubspace, TaskError, VLoRAError, VLoRAModel, load_adapter

CASES = {  # name -> write_adapter keyword arguments, shared by the adapters of one store
    "plain": {},
    "rslora": {"use_rslora": True, "alpha": 16},
    "patterns": {"rank_pattern": {"layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
}
METHODS = ["flat", "rank"]


def full_store(dirs, method):
    """k large enough to reach the data's rank: every task is reconstructed exactly."""
    return SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=64, method=method)


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


@pytest.fixture(scope="module", params=list(CASES))
def case_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return [write_adapter(root / f"task{i}", 10 * i + 3, **CASES[request.param]) for i in range(3)]


@pytest.fixture(scope="module", params=METHODS)
def llama(request, adapter_dirs):
    """A VLoRAModel on the tiny Llama over the four conftest adapters."""
    return VLoRAModel(tiny_llama(0), full_store(adapter_dirs, request.param))


# ---- equivalence with PEFT ------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_task_matches_peft(case_dirs, method, input_ids):
    model = VLoRAModel(tiny_llama(0), full_store(case_dirs, method))
    for task_id, folder in zip(model.available_tasks, case_dirs):
        model.set_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), peft_logits(folder, input_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d_matches_peft_and_merges(method, tmp_path, input_ids):
    from peft import PeftModel

    dirs = [write_gpt2_adapter(tmp_path / f"g{i}", i) for i in range(3)]
    model = VLoRAModel(tiny_gpt2(0), full_store(dirs, method))
    original = {n: p.clone() for n, p in model.base_model.named_parameters()}
    for task_id, folder in zip(model.available_tasks, dirs):
        expected = logits(PeftModel.from_pretrained(tiny_gpt2(0), str(folder)).eval(), input_ids)
        model.set_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-4, rtol=0)
        model.merge_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-4, rtol=0)
        model.unmerge()
    for name, param in model.base_model.named_parameters():
        torch.testing.assert_close(param, original[name], atol=1e-6, rtol=0)


def test_lora_alpha_overrides_every_tasks_scaling(case_dirs, tmp_path, input_ids):
    """lora_alpha=a gives what PEFT gives for the same factors with lora_alpha a (and no alpha_pattern)."""
    model = VLoRAModel(tiny_llama(0), full_store(case_dirs, "flat"), lora_alpha=32)
    expected = {}
    for task_id, folder in zip(model.available_tasks, case_dirs):
        edited = shutil.copytree(folder, tmp_path / task_id)
        config = json.loads((edited / "adapter_config.json").read_text())
        config.update(lora_alpha=32, alpha_pattern={})
        (edited / "adapter_config.json").write_text(json.dumps(config))
        expected[task_id] = peft_logits(edited, input_ids)
        model.set_task(task_id)
        torch.testing.assert_close(logits(model, input_ids), expected[task_id], atol=1e-4, rtol=0)
    rows = model.available_tasks[1:3]  # a mixed batch applies the override per row too
    mixed = logits(model, input_ids, task_ids=rows)
    for i, task_id in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[task_id][i], atol=1e-4, rtol=0)


# ---- switching ------------------------------------------------------------------------------------
def test_switching_back_gives_the_same_bits(llama, input_ids):
    a, b = llama.available_tasks[:2]
    llama.set_task(a)
    first = logits(llama, input_ids)
    llama.set_task(b)
    other = logits(llama, input_ids)
    llama.set_task(a)
    assert torch.equal(logits(llama, input_ids), first)
    assert not torch.allclose(other, first)
    assert llama.active_task == a


def test_clear_task_is_exactly_the_base_model(llama, input_ids):
    base = logits(tiny_llama(0), input_ids)
    llama.set_task(llama.available_tasks[0])
    assert not torch.allclose(logits(llama, input_ids), base)
    llama.clear_task()
    assert llama.active_task is None
    assert torch.equal(logits(llama, input_ids), base)


def test_set_task_only_moves_pointers(llama, input_ids, monkeypatch):
    """No module is rebuilt, no buffer reallocated, no dense ΔW built: layers point at the store's loadings."""
    monkeypatch.setattr(vlora_core.layer, "dense_delta", lambda *a: pytest.fail("dense ΔW built"))
    layers = dict(llama.targets)
    buffers = {name: layer.P_A.data_ptr() for name, layer in layers.items()}
    for task_id in llama.available_tasks:
        llama.set_task(task_id)
        logits(llama, input_ids)
        task = llama.subspace.tasks[task_id]
        for name, layer in llama.targets.items():
            assert layer is layers[name] and layer.P_A.data_ptr() == buffers[name]
            assert layer.loadings[0] is task.loadings[name]["A"] and layer.loadings[1] is task.loadings[name]["B"]
    assert sorted(type(m).__name__ for m in llama.base_model.modules()).count("SubspaceLayer") == len(layers)


def test_memory_grows_by_loadings_only(adapter_dirs, tmp_path, input_ids):
    """A task added on the fixed basis costs its loadings; the model's own tensors do not grow."""
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs[:3]], num_components=2)
    model = VLoRAModel(tiny_llama(0), subspace)

    def model_bytes():
        return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])

    before = model_bytes()
    task = subspace.add(load_adapter(adapter_dirs[3]), "late")
    model.set_task("late")
    logits(model, input_ids)
    assert model_bytes() == before
    entries = sum(t.numel() for sides in task.loadings.values() for t in sides.values())
    assert entries == sum(k for sides in subspace.layer_ks.values() for k in sides.values())  # flat: g = 1


@pytest.mark.parametrize("rows", [None, ["qa", None, "sentiment"]])
def test_both_multiplication_orders_agree(llama, rows, monkeypatch):
    """basis first (decoding) and factors first (prefill) are one chain multiplied in two orders."""
    torch.manual_seed(2)
    input_ids = torch.randint(0, 128, (3, 8))
    llama.set_task("translation")
    results = []
    for basis_first in (True, False):
        monkeypatch.setattr(vlora_core.layer, "basis_first_is_cheaper", lambda *a, first=basis_first: first)
        results.append(logits(llama, input_ids, task_ids=rows))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)
    assert not torch.allclose(results[0], logits(tiny_llama(0), input_ids))


# ---- mixed-task batches ---------------------------------------------------------------------------
def test_mixed_batch_equals_each_row_alone(llama):
    torch.manual_seed(3)
    input_ids = torch.randint(0, 128, (4, 10))
    a, b = llama.available_tasks[:2]
    rows = [a, None, b, a]
    llama.set_task(b)
    mixed = logits(llama, input_ids, task_ids=rows)
    assert llama.active_task == b and all(layer.rows is None for layer in llama.targets.values())
    for i, task_id in enumerate(rows):
        llama.clear_task() if task_id is None else llama.set_task(task_id)
        torch.testing.assert_close(mixed[i], logits(llama, input_ids[i : i + 1])[0], atol=1e-5, rtol=0)


def test_generate_follows_the_task_and_each_rows_task(llama, adapter_dirs):
    from peft import PeftModel

    torch.manual_seed(5)
    prompts = torch.randint(0, 128, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    a, b = llama.available_tasks[:2]
    llama.set_task(a)
    with torch.no_grad():
        ours = llama.generate(prompts, **kwargs)
        peft_model = PeftModel.from_pretrained(tiny_llama(0), str(adapter_dirs[0])).eval()
        peft = peft_model.generate(input_ids=prompts, **kwargs)
        mixed = llama.generate(prompts, task_ids=[b, None], **kwargs)
        llama.set_task(b)
        row_b = llama.generate(prompts[:1], **kwargs)
        llama.clear_task()
        row_base = llama.generate(prompts[1:], **kwargs)
    assert torch.equal(ours, peft)
    assert torch.equal(mixed, torch.cat([row_b, row_base]))
    with torch.no_grad():  # beam search repeats each row: every copy keeps its row's task
        beams = llama.generate(prompts, task_ids=[b, None], num_beams=2, **kwargs)
        llama.clear_task()
        assert torch.equal(beams[1:], llama.generate(prompts[1:], num_beams=2, **kwargs))


# ---- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merge_serves_the_task_and_unmerge_restores_the_weights(adapter_dirs, method, input_ids):
    llama = VLoRAModel(tiny_llama(0), full_store(adapter_dirs, method))
    task_id = llama.available_tasks[2]
    original = {n: p.clone() for n, p in llama.base_model.named_parameters()}
    llama.set_task(task_id)
    expected = logits(llama, input_ids)
    llama.merge_task(task_id)
    assert llama.merged_task == task_id
    torch.testing.assert_close(logits(llama, input_ids), expected, atol=1e-5, rtol=0)
    with pytest.raises(VLoRAError, match="unmerge"):
        llama.set_task(llama.available_tasks[0])
    llama.unmerge()
    for name, param in llama.base_model.named_parameters():
        torch.testing.assert_close(param, original[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(llama, input_ids), expected, atol=1e-6, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------
def test_unknown_task_lists_the_known_ones(llama, input_ids):
    with pytest.raises(TaskError, match="'sentiment'.*'qa'"):
        llama.set_task("poetry")
    with pytest.raises(TaskError, match="poetry"):
        llama(input_ids, task_ids=["sentiment", "poetry"])
    with pytest.raises(VLoRAError, match="3 task ids for a batch of 2"):
        llama(input_ids, task_ids=["sentiment", None, "qa"])


def test_missing_layers_are_named_with_the_nearest(adapter_dirs):
    config = tiny_llama_config()
    config.num_hidden_layers = 1
    with pytest.raises(
        CompatibilityError,
        match=r"model\.layers\.1\.self_attn\.q_proj.*nearest.*"
        r"model\.layers\.0\.self_attn\.q_proj",
    ):
        VLoRAModel(LlamaForCausalLM(config), full_store(adapter_dirs, "flat"))


def test_other_hidden_size_names_the_shapes(adapter_dirs):
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size = 64, 128
    shapes = r"q_proj is 32x64 \(d_out x d_in\) in this model but 32x32 in the store"
    with pytest.raises(CompatibilityError, match=shapes):
        VLoRAModel(LlamaForCausalLM(config), full_store(adapter_dirs, "flat"))


# ---- unload: the base model back, bit for bit -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unload_gives_the_base_model_back_bit_for_bit(adapter_dirs, input_ids, dtype):
    base = tiny_llama(0).to(dtype)
    base.lm_head.weight.requires_grad_(False)  # a caller's own choice of frozen parameters is kept
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    modules = [(n, type(m)) for n, m in base.named_modules()]
    model = VLoRAModel(base, full_store(adapter_dirs, "flat"))
    tasks = model.available_tasks
    model.set_task(tasks[0])
    logits(model, input_ids)
    for _ in range(20):  # merged and unmerged again and again: never any drift, in any dtype
        model.merge_task(tasks[1])
        model.unmerge()
    model.merge_task(tasks[2])  # unload unmerges first

    assert model.unload() is base
    assert [(n, type(m)) for n, m in base.named_modules()] == modules
    for name, p in base.named_parameters():
        value, requires_grad = before[name]
        assert torch.equal(p, value) and p.dtype == dtype, name
        assert p.requires_grad == requires_grad, name
    assert model.targets == {} and model.active_task is None


# ---- device and dtype -------------------------------------------------------------------------------
def test_loadings_are_placed_once_and_follow_the_model(adapter_dirs, input_ids):
    subspace = full_store(adapter_dirs, "rank")
    model = VLoRAModel(tiny_llama(0), subspace)
    task = model.available_tasks[1]
    model.set_task(task)
    layer = next(iter(model.targets.values()))
    assert layer.loadings[0] is subspace.tasks[task].loadings[layer_name(model, layer)]["A"]  # same dtype: a pointer
    fp32 = logits(model, input_ids)

    model.to(torch.bfloat16)  # the basis and the active task's loadings follow, once
    assert layer.P_A.dtype == torch.bfloat16 and layer.loadings[0].dtype == torch.bfloat16
    placed = layer.loadings[0]
    logits(model, input_ids)
    assert layer.loadings[0] is placed  # not converted again by a forward
    assert subspace.tasks[task].loadings[layer_name(model, layer)]["A"].dtype == torch.float32  # the store is not
    torch.testing.assert_close(logits(model, input_ids).float(), fp32, atol=0.15, rtol=0.05)


def layer_name(model, layer) -> str:
    return next(name for name, other in model.targets.items() if other is layer)


# ---- the kept factors and the output layer's input --------------------------------------------------
def test_kept_factors_follow_loadings_changed_in_place(adapter_dirs, input_ids):
    """A task's factors are made on its first forward and kept; an in-place change of its loadings (training,
    editing) makes them again, so the model never serves stale factors."""
    subspace = full_store(adapter_dirs, "rank")
    model = VLoRAModel(tiny_llama(0), subspace)
    task = model.available_tasks[2]
    model.set_task(task)
    before = logits(model, input_ids)
    layer = next(iter(model.targets.values()))
    kept = layer.kept
    assert kept is not None and logits(model, input_ids) is not None and layer.kept is kept  # reused, not remade
    with torch.no_grad():
        for sides in subspace.tasks[task].loadings.values():
            sides["B"].mul_(3.0)
    changed = logits(model, input_ids)
    assert layer.kept is not kept and not torch.allclose(changed, before)
    fresh = VLoRAModel(tiny_llama(0), subspace)
    fresh.set_task(task)
    assert torch.equal(changed, logits(fresh, input_ids))


def test_a_half_precision_layer_keeps_float32_factors(adapter_dirs, input_ids):
    """bf16 layers run the task's rank-r products in float32 (faster on CPUs than bf16 ones, and closer)."""
    subspace = full_store(adapter_dirs, "flat")
    model = VLoRAModel(tiny_llama(0).to(torch.bfloat16), subspace)
    task = model.available_tasks[0]
    model.set_task(task)
    out = logits(model, input_ids)
    layer = next(iter(model.targets.values()))
    assert out.dtype == torch.bfloat16 and layer.kept.FA_T.dtype == torch.float32
    reference = VLoRAModel(tiny_llama(0), subspace)
    reference.set_task(task)
    per_call = layer.update(torch.ones(1, 1, layer.shape.d_in, dtype=torch.bfloat16), *layer.loadings, layer.gain)
    assert per_call.dtype == torch.bfloat16  # the per-call path (training, mixed rows) stays in the layer's dtype
    torch.testing.assert_close(out.float(), logits(reference, input_ids), atol=0.15, rtol=0.05)


def test_the_output_layer_gets_its_input_with_standard_strides(llama):
    """With the base model frozen, matmul would copy the whole output weight to multiply the last position's
    slice; VLoRAModel hands that slice on as a plain view, and gives the hook back with the model."""
    seen = []
    head = llama.base_model.get_output_embeddings()
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].stride()))
    llama.set_task(llama.available_tasks[0])
    prompt = torch.randint(0, 128, (1, 9))
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        llama.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    spy.remove()
    d = head.in_features
    assert seen and all(s == (d, d, 1) for s in seen)  # (1, 1, d) views with standard strides, prefill included
    copies = [e for e in prof.events() if e.name == "aten::bmm" and e.input_shapes[1][-2:] == [d, head.out_features]]
    assert not copies  # no batched product over the output weight (matmul's copy of it)
    base = tiny_llama(0)
    model = VLoRAModel(base, llama.subspace)
    assert len(base.get_output_embeddings()._forward_pre_hooks) == 1
    model.unload()
    assert not base.get_output_embeddings()._forward_pre_hooks


def test_the_shared_base_model_hands_its_output_layer_standard_strides(tiny_model_dir):
    """get_base_model's model is frozen too (the A/B tab's base model choice and the behaviour checks run it bare):
    its output layer gets the same plain view, so generate never copies the output weight."""
    from vlora_core.base_model import get_base_model

    model, _ = get_base_model(tiny_model_dir)
    head = model.get_output_embeddings()
    seen = []
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].stride()))
    with torch.no_grad():
        model.generate(torch.randint(0, 128, (1, 9)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    spy.remove()
    d = head.in_features
    assert not any(p.requires_grad for p in model.parameters()) and seen and all(s == (d, d, 1) for s in seen)
