"""Merges on ΔW: against PEFT's own ΔW of each adapter (so every scaling rule is PEFT's, not ours), dense
references written here, and PEFT logits of the merged folder."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import byte_tokenizer, peft_logits, run_cli, snapshot, tiny_llama, tiny_llama_config, write_adapter
from transformers import LlamaForCausalLM

from vlora_core import SharedSubspace
from vlora_core.adapter import LoRAAdapter, LoRALayer
from vlora_core.behaviour import BehaviourConfig, measure_merge
from vlora_core.cli import task_weight
from vlora_core.errors import CompatibilityError, StoreError, VLoRAError
from vlora_core.io.peft_files import load_adapter, save_adapter
from vlora_core.io.prompts import Prompt
from vlora_core.merge import METHODS, MergeConfig, exact_merge, layer_generator, merge_adapters, ties

# name -> write_adapter arguments: plain, rslora, alpha and rank patterns, another rank with one more layer
ADAPTERS = {
    "plain": dict(seed=0, r=4, alpha=8),
    "rslora": dict(seed=1, r=4, alpha=8, use_rslora=True),
    "patterns": dict(seed=2, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}),
    "rank8": dict(seed=3, r=8, alpha=4, targets=("q_proj", "v_proj", "o_proj")),
}
WEIGHTS = {
    "ones": None,
    "negative": [0.5, -1.25, 2.0, 0.3],
    "one-off": [1.0, 0.0, -0.75, 1.5],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-adapters")
    return {name: write_adapter(root / name, **kwargs) for name, kwargs in ADAPTERS.items()}


@pytest.fixture(scope="module")
def adapters(folders):
    return [load_adapter(folder) for folder in folders.values()]


@pytest.fixture(scope="module")
def deltas(folders):
    """PEFT's own ΔW (get_delta_weight) of each adapter, float64: layer -> ΔW."""
    return [peft_deltas(folder) for folder in folders.values()]


def peft_deltas(folder) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(folder))
    return {
        name: module.get_delta_weight("default").double()
        for name, module in model.base_model.model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }


def weighted_sum(deltas, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢ·ΔWᵢ per layer (weights None: 1 each), a layer missing from a task counting as 0."""
    weights = weights or [1.0] * len(deltas)
    out: dict[str, torch.Tensor] = {}
    for delta, weight in zip(deltas, weights):
        for name, d in delta.items():
            out[name] = out.get(name, 0) + weight * d
    return out


def merged_deltas(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    return {name: layer.scaling * (layer.B.double() @ layer.A.double()) for name, layer in adapter.layers.items()}


def worst_gap(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_equal_the_dense_weighted_sum(adapters, deltas, method, weights):
    result = merge_adapters(adapters, weights, config=MergeConfig(method=method))
    assert worst_gap(merged_deltas(result.adapter), weighted_sum(deltas, weights)) < 1e-5
    assert result.error < 1e-6
    ranks = result.adapter.ranks
    if method == "cat":  # Σ rᵢ of the tasks holding the layer: q 4+4+4+8, v 4+4+2+8, o 8
        assert ranks["model.layers.0.self_attn.q_proj"] == 20
        assert ranks["model.layers.1.self_attn.v_proj"] == 18
        assert ranks["model.layers.0.self_attn.o_proj"] == 8
    else:  # min(Σ rᵢ, d_out, d_in): v_proj is 16 x 32
        assert ranks["model.layers.0.self_attn.q_proj"] == 20
        assert ranks["model.layers.1.self_attn.v_proj"] == 16


@pytest.mark.parametrize("method", ["linear", "cat", "ties", "dare"])
def test_merged_folder_gives_the_dense_references_logits(adapters, deltas, method, tmp_path, input_ids):
    weights = [0.7, -0.4, 1.1, 0.5]
    config = MergeConfig(method=method, density=0.6, rank=32)  # 32 >= every layer's min(d_out, d_in): exact
    result = merge_adapters(adapters, weights, config=config)
    folder = save_adapter(result.adapter, tmp_path / "merged")
    assert load_adapter(folder).ranks == result.adapter.ranks
    reference = merged_deltas(result.adapter) if method in ("ties", "dare") else weighted_sum(deltas, weights)
    if method in ("ties", "dare"):  # its own dense reference is tested below; here: the folder vs that ΔW
        assert worst_gap(reference, dense_reference(method, adapters, deltas, weights, config)) < 1e-5
    model = tiny_llama(0)
    with torch.no_grad():
        for name, delta in reference.items():
            model.get_submodule(name).weight += delta.float()
        want = model(input_ids).logits
    got = peft_logits(folder, input_ids)
    assert (got - want).abs().max().item() < 1e-4


def dense_reference(method, adapters, deltas, weights, config) -> dict[str, torch.Tensor]:
    """TIES (trim, elect by total mass, disjoint mean) or DARE (Bernoulli keep ρ, rescale 1/ρ, weighted sum) on
    the stacked dense task vectors, written out plainly."""
    out = {}
    for name in deltas[0] | deltas[3]:
        present = [i for i, d in enumerate(deltas) if name in d]
        taus = torch.stack([weights[i] * deltas[i][name] for i in present])  # (N, d_out, d_in)
        if method == "ties":
            keep = max(1, round(config.density * taus[0].numel()))
            trimmed = []
            for tau in taus:
                threshold = tau.abs().flatten().sort(descending=True).values[keep - 1]
                trimmed.append(tau * (tau.abs() >= threshold))
            trimmed = torch.stack(trimmed)
            sign = trimmed.sum(0).sign()
            agree = (trimmed.sign() == sign) & (trimmed != 0)
            out[name] = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            generator = layer_generator(config.seed, name)
            masks = [torch.rand(taus[0].shape, generator=generator) < config.density for _ in present]
            out[name] = sum(tau * mask / config.density for tau, mask in zip(taus, masks))
    return out


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_equal_a_plain_dense_implementation(adapters, deltas, method):
    weights = [1.0, 0.5, -0.8, 1.2]
    config = MergeConfig(method=method, density=0.3, rank=32, seed=5)
    result = merge_adapters(adapters, weights, config=config)
    assert worst_gap(merged_deltas(result.adapter), dense_reference(method, adapters, deltas, weights, config)) < 1e-5
    assert result.error < 1e-6


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_default_rank_reports_the_svd_tail(adapters, deltas, method):
    weights = [1.0, 0.5, -0.8, 1.2]
    config = MergeConfig(method=method, density=0.5, seed=1)
    result = merge_adapters(adapters, weights, config=config)
    dense = dense_reference(method, adapters, deltas, weights, config)
    for name, delta in dense.items():
        rank = result.adapter.ranks[name]  # Σ rᵢ of the tasks holding the layer (at most min(d_out, d_in))
        sigma = torch.linalg.svdvals(delta)
        assert result.layer_errors[name] == pytest.approx((sigma[rank:].norm() / sigma.norm()).item(), abs=1e-5)


def test_dare_is_seeded_and_deterministic(adapters):
    first, again, other = (merge_adapters(adapters, config=MergeConfig(method="dare", seed=s)) for s in (3, 3, 4))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first.adapter.layers[name].B, again.adapter.layers[name].B)
    assert not torch.allclose(first.adapter.layers[name].B, other.adapter.layers[name].B)


def test_ties_on_a_worked_example():
    """τ₁ = [[3, -1], [0.5, 2]], τ₂ = [[-2, -4], [1, 0.1]], ρ = 0.5: trimmed [[3, 0], [0, 2]] and [[-2, -4], [0, 0]];
    elected signs [[+, -], [0, +]]; disjoint means [[3, -4], [0, 2]]."""
    eye = torch.eye(2)
    parts = [(eye, torch.tensor([[3.0, -1.0], [0.5, 2.0]]), 1.0), (eye, torch.tensor([[-2.0, -4.0], [1.0, 0.1]]), 1.0)]
    assert torch.equal(ties(parts, 0.5), torch.tensor([[3.0, -4.0], [0.0, 2.0]]))


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_rank_cap_error_is_the_svd_tail_of_the_exact_merge(adapters, deltas, method, tmp_path):
    weights = [0.5, -1.25, 2.0, 0.3]
    result = merge_adapters(adapters, weights, config=MergeConfig(method=method, rank=3))
    exact = weighted_sum(deltas, weights)
    got = merged_deltas(result.adapter)
    tails, norms = [], []
    for name, delta in exact.items():
        assert result.adapter.ranks[name] == 3
        sigma = torch.linalg.svdvals(delta)
        tails.append(sigma[3:].norm().item())
        norms.append(sigma.norm().item())
        tail = (sigma[3:].norm() / sigma.norm()).item()
        assert result.layer_errors[name] == pytest.approx(tail, rel=1e-4)
        assert ((got[name] - delta).norm() / delta.norm()).item() == pytest.approx(tail, rel=1e-4)  # optimal
    assert result.error == pytest.approx(math.hypot(*tails) / math.hypot(*norms), rel=1e-4)
    assert load_adapter(save_adapter(result.adapter, tmp_path / "capped")).ranks == result.adapter.ranks


def test_merge_of_store_tasks_matches_the_merge_of_their_folders(adapter_dirs):
    originals = [load_adapter(d) for d in adapter_dirs]
    store = SharedSubspace.from_adapters(originals, num_components=64)
    stored = [store.to_adapter(task_id) for task_id in store.task_ids]
    weights = [1.0, -0.5, 0.25, 2.0]
    from_store = merge_adapters(stored, weights, config=MergeConfig(method="linear"))
    from_folders = merge_adapters(originals, weights, config=MergeConfig(method="linear"))
    assert worst_gap(merged_deltas(from_store.adapter), merged_deltas(from_folders.adapter)) < 1e-4


BAD_CONFIGS = {
    "method": (dict(method="svd"), "choose one of: linear, cat, ties, dare"),
    "density 0": (dict(density=0), "(0, 1]"),
    "density > 1": (dict(density=1.5), "(0, 1]"),
    "rank 0": (dict(rank=0), "positive whole number"),
    "rank float": (dict(rank=2.5), "positive whole number"),
    "seed": (dict(seed=-1), ">= 0"),
}


@pytest.mark.parametrize("kwargs, words", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_configs_are_refused_with_the_valid_choices(kwargs, words):
    with pytest.raises(VLoRAError) as error:
        MergeConfig(**kwargs)
    assert words in str(error.value)
    assert set(METHODS) == {"linear", "cat", "ties", "dare"}


def test_mismatched_shapes_and_weights_are_refused(adapters):
    layer = adapters[0].layers["model.layers.0.self_attn.q_proj"]
    other = LoRAAdapter(
        "other", dict(adapters[0].config), {"model.layers.0.self_attn.q_proj": LoRALayer(layer.A[:, :8], layer.B, 1.0)}
    )
    with pytest.raises(CompatibilityError, match="same base model"):
        merge_adapters([adapters[0], other])
    with pytest.raises(VLoRAError, match="one weight per task"):
        merge_adapters(adapters, [1.0])
    with pytest.raises(VLoRAError, match="not a finite number"):
        merge_adapters(adapters[:2], [1.0, float("nan")])


def test_dare_masks_differ_per_seed_and_per_layer():
    draws = {(s, n): torch.rand(8, generator=layer_generator(s, n)) for s in (0, 1) for n in ("q", "v")}
    assert len({tuple(t.tolist()) for t in draws.values()}) == 4
    assert torch.equal(torch.rand(8, generator=layer_generator(1, "q")), draws[1, "q"])


@pytest.mark.parametrize("method", ["linear", "ties", "dare"])
def test_exact_merge_is_the_uncut_merge(adapters, deltas, method):
    weights = [1.0, 0.5, -0.8, 1.2]
    config = MergeConfig(method=method, density=0.4, rank=2, seed=3)
    exact = exact_merge(adapters, weights, config=config)
    assert exact.error < 1e-6
    want = (
        weighted_sum(deltas, weights)
        if method == "linear"
        else dense_reference(method, adapters, deltas, weights, config)
    )
    assert worst_gap(merged_deltas(exact.adapter), want) < 1e-5


TASK_WEIGHTS = {
    "pirate": ("pirate", 1.0),
    "pirate:0.5": ("pirate", 0.5),
    "pirate:-1.25": ("pirate", -1.25),
    "pirate:1e-1": ("pirate", 0.1),
    "a:b": ("a:b", 1.0),  # not a number after the last ':': part of the id
    "a:b:2": ("a:b", 2.0),
}


@pytest.mark.parametrize("text, expected", TASK_WEIGHTS.items(), ids=TASK_WEIGHTS.keys())
def test_task_weight_parsing(text, expected):
    assert task_weight(text) == expected


# ---- the store: merge a store's tasks, write a folder, add the merge as a task ---------------------------------
@pytest.fixture
def store(adapter_dirs, tmp_path):
    path = tmp_path / "store"
    assert run_cli("compress", *adapter_dirs, "-o", path, "-k", "3").returncode == 0  # flat, N - 1: exact
    return path


def test_cli_merge_writes_the_exact_weighted_sum(store, adapter_dirs, tmp_path, input_ids):
    out = tmp_path / "merged"
    done = run_cli("merge", store, "sentiment:0.5", "qa:-1.5", "translation", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "ΔW relative error 0.0000" in done.stdout
    deltas = [peft_deltas(d) for d in adapter_dirs]  # sentiment, summarization, translation, qa
    want = weighted_sum([deltas[0], deltas[3], deltas[2]], [0.5, -1.5, 1.0])
    assert worst_gap(merged_deltas(load_adapter(out)), want) < 1e-5
    model = tiny_llama(0)
    with torch.no_grad():
        for name, delta in want.items():
            model.get_submodule(name).weight += delta.float()
        assert (peft_logits(out, input_ids) - model(input_ids).logits).abs().max().item() < 1e-4


def test_cli_merge_adds_the_task_exactly_and_keeps_the_others(store, tmp_path):
    before = SharedSubspace.load(store)
    olds = {t: merged_deltas(before.to_adapter(t)) for t in before.task_ids}
    done = run_cli("merge", store, "sentiment", "qa:2", "--method", "linear", "--task-id", "sq")
    assert done.returncode == 0, done.stderr
    after = SharedSubspace.load(store)
    assert after.task_ids == before.task_ids + ["sq"]
    for task_id, delta in olds.items():  # the incremental path: every stored task exactly as it was
        assert worst_gap(merged_deltas(after.to_adapter(task_id)), delta) < 1e-5
    fitted = before.merge(["sentiment", "qa"], [1.0, 2.0], fit_store=True, name="sq")
    assert worst_gap(merged_deltas(after.to_adapter("sq")), merged_deltas(fitted.adapter)) < 1e-5
    exact = weighted_sum([olds["sentiment"], olds["qa"]], [1.0, 2.0])
    tails, norms = [], []
    for delta in exact.values():  # the store's rank 4 < 8 = Σ rᵢ: the SVD tail, stated exactly
        sigma = torch.linalg.svdvals(delta)
        tails.append(sigma[4:].norm().item())
        norms.append(sigma.norm().item())
    assert f"ΔW relative error {math.hypot(*tails) / math.hypot(*norms):.4f}" in done.stdout
    again = run_cli("merge", store, "sentiment", "qa", "--task-id", "sq")
    assert again.returncode == 1 and "already in this store" in again.stderr


def test_cli_merge_outputs_obey_the_export_rules(store, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    kept = snapshot(foreign)
    for force in ([], ["--force"]):
        done = run_cli("merge", store, "sentiment", "qa", "-o", foreign, *force)
        assert done.returncode == 1 and "not written by vlora export" in done.stderr
    assert snapshot(foreign) == kept
    out = tmp_path / "merged"
    assert run_cli("merge", store, "sentiment", "qa", "-o", out).returncode == 0
    again = run_cli("merge", store, "sentiment", "qa:2", "-o", out)
    assert again.returncode == 1 and "pass --force" in again.stderr
    assert run_cli("merge", store, "sentiment", "qa:2", "-o", out, "--force").returncode == 0
    inside = run_cli("merge", store, "sentiment", "qa", "-o", store / "merged")
    assert inside.returncode == 1 and "inside the store" in inside.stderr
    nowhere = run_cli("merge", store, "sentiment", "qa")
    assert nowhere.returncode == 1 and "-o OUT" in nowhere.stderr
    with pytest.raises(StoreError):
        save_adapter(load_adapter(out), foreign, force=True)


def test_cli_merge_refuses_unknown_tasks_and_bad_numbers(store, tmp_path):
    cases = [
        (["nope"], "unknown task 'nope'"),
        (["sentiment:nan"], "not a finite number"),
        (["sentiment:abc"], "'sentiment:abc': the weight 'abc' of task 'sentiment' is not a number"),
        (["qa", "sentiment:0,5"], "the weight '0,5' of task 'sentiment' is not a number; write TASK:WEIGHT"),
        (["sentiment", "--density", "0"], "(0, 1]"),
        (["sentiment", "--rank", "0"], "positive whole number"),
    ]
    for args, words in cases:
        done = run_cli("merge", store, *args, "-o", tmp_path / "out")
        assert done.returncode == 1 and words in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", ["1000", "1000000000"])
def test_cli_merge_cuts_a_rank_above_what_a_layer_holds_to_that_layer(store, tmp_path, rank):
    out = tmp_path / "merged"
    done = run_cli("merge", store, "sentiment", "qa", "--rank", rank, "-o", out)
    assert done.returncode == 0, done.stderr
    assert f"note: --rank {rank} is more than some layers can hold" in done.stderr
    assert "ΔW relative error 0.0000" in done.stdout  # nothing cut: every layer at its full rank
    merged = load_adapter(out)
    for layer in merged.layers.values():
        assert layer.rank == min(layer.A.shape[1], layer.B.shape[0])


# ---- behaviour: a merge against the exact merge and against its parts ------------------------------------------
PROMPTS = (Prompt("hello there", answer=" general kenobi"), Prompt("the cat sat on"), Prompt("one two three"))


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = byte_tokenizer()
    config = tiny_llama_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_measure_merge_sees_an_exact_merge_a_cut_and_each_part(tiny_model, adapters):
    model, tokenizer = tiny_model
    config = BehaviourConfig(answer_tokens=6)
    parts = {"plain": adapters[0], "rank8": adapters[3]}  # different ranks and layers: aligned with zeros
    alone = merge_adapters([adapters[0]], [1.0], name="alone")  # the part itself, rewritten
    found = measure_merge(model, tokenizer, {"plain": adapters[0]}, alone.adapter, None, PROMPTS, config)
    assert found.exact is None and found.parts["plain"].effect_retained > 0.999
    both = merge_adapters(list(parts.values()), [1.0, 1.0], config=MergeConfig(rank=1), name="both")
    exact = exact_merge(list(parts.values()), [1.0, 1.0]).adapter
    found = measure_merge(model, tokenizer, parts, both.adapter, exact, PROMPTS, config)
    assert both.error > 0.3 and found.exact.effect_retained < 0.99
    assert set(found.parts) == {"plain", "rank8"}
    assert all(b.effect_retained < 0.99 for b in found.parts.values())
    whole = measure_merge(model, tokenizer, parts, exact, exact, PROMPTS, config)
    assert whole.exact.effect_retained > 0.999 and whole.exact.agreement == 1.0
