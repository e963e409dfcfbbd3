"""Property tests (hypothesis) of the core's invariants on random adapters of random shapes."""

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlora import LoRAAdapter, LoRALayer, SharedSubspace, load_adapter, save_adapter

CONFIG = {"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q", "v"], "task_type": "CAUSAL_LM"}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def adapter_sets(draw, min_n=2, max_n=5):
    n = draw(st.integers(min_n, max_n))
    rank = draw(st.integers(1, 4))
    dims = draw(st.lists(st.tuples(st.integers(rank, 12), st.integers(rank, 12)), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    config = CONFIG | {"r": rank, "lora_alpha": draw(st.sampled_from([1, 8, 16])), "use_rslora": draw(st.booleans())}
    adapters = []
    for i in range(n):
        layers = {}
        for j, (d_in, d_out) in enumerate(dims):
            A, B = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
            layers[f"layers.{j}.q"] = LoRALayer(
                A, B, config["lora_alpha"] / (rank**0.5 if config["use_rslora"] else rank)
            )
        adapters.append(LoRAAdapter(f"task{i}", config, layers))
    return adapters, draw(st.sampled_from(["flat", "rank"]))


def _delta(subspace, task_id):
    return {n: F_B @ F_A.T for n, (F_A, F_B) in subspace.task_factors(task_id).items()}


def _close(a, b, tol):
    return all(((a[n] - b[n]).norm() <= tol * max(b[n].norm(), 1e-6)).item() for n in b)


@SETTINGS
@given(adapter_sets(), st.integers(1, 6))
def test_save_then_load_is_the_identity(case, k):
    adapters, method = case
    subspace = SharedSubspace.from_adapters(adapters, num_components=k, method=method)
    with tempfile.TemporaryDirectory() as tmp:
        again = SharedSubspace.load(subspace.save(Path(tmp) / "s"))
    for task_id in subspace.task_ids:
        assert _close(_delta(again, task_id), _delta(subspace, task_id), 0)
    assert again.layer_ks == subspace.layer_ks


@SETTINGS
@given(adapter_sets())
def test_reconstruction_is_exact_when_k_reaches_the_rank(case):
    adapters, method = case
    subspace = SharedSubspace.from_adapters(adapters, num_components=1000, method=method)
    for adapter in adapters:
        truth = {n: layer.delta_weight() for n, layer in adapter.layers.items()}
        assert _close(_delta(subspace, adapter.name), truth, 1e-4)


@SETTINGS
@given(adapter_sets(), st.integers(1, 6))
def test_projecting_a_stored_task_returns_its_loadings(case, k):
    adapters, method = case
    subspace = SharedSubspace.from_adapters(adapters, num_components=k, method=method)
    for adapter in adapters:
        again = subspace.project(adapter, "again")
        stored = subspace.tasks[adapter.name]
        for name, sides in stored.loadings.items():
            for side, loadings in sides.items():
                scale = max(loadings.abs().max().item(), 1.0)
                assert torch.allclose(again.loadings[name][side], loadings, atol=1e-3 * scale)


@SETTINGS
@given(adapter_sets(min_n=3), st.integers(1, 4))
def test_incremental_add_keeps_every_stored_task(case, k):
    adapters, method = case
    subspace = SharedSubspace.from_adapters(adapters[:-1], num_components=k, method=method)
    before = {t: _delta(subspace, t) for t in subspace.task_ids}
    subspace.add(adapters[-1], "late", incremental=True)
    for task_id, delta in before.items():  # bit for bit: the basis grew by appending directions
        assert all(torch.equal(d, delta[n]) for n, d in _delta(subspace, task_id).items())
    truth = {n: layer.delta_weight() for n, layer in adapters[-1].layers.items()}
    assert _close(_delta(subspace, "late"), truth, 1e-4)


@SETTINGS
@given(adapter_sets(), st.integers(1, 6))
def test_export_load_export_is_stable(case, k):
    adapters, method = case
    subspace = SharedSubspace.from_adapters(adapters, num_components=k, method=method)
    with tempfile.TemporaryDirectory() as tmp:
        exported = [load_adapter(save_adapter(subspace.to_adapter(t), Path(tmp) / t)) for t in subspace.task_ids]
    again = SharedSubspace.from_adapters(exported, num_components=1000, method=method)
    for task_id in subspace.task_ids:  # a lossless second pass gives back the first export
        assert _close(_delta(again, task_id), _delta(subspace, task_id), 1e-4)
    if method == "rank":  # rank: the exports span exactly the k kept directions, so k suffices again
        same_k = SharedSubspace.from_adapters(exported, num_components=k, method=method)
        for task_id in subspace.task_ids:
            assert _close(_delta(same_k, task_id), _delta(subspace, task_id), 1e-3)
