"""The shared subspace: lossless when k reaches the data's rank, gauge invariant, exact incremental add."""

import pytest
import torch
from conftest import delta_weights, relative_error, write_adapter

from vlora import CompatibilityError, LoRAAdapter, LoRALayer, SharedSubspace, TaskError, VLoRAError, load_adapter
from vlora_core import quality
from vlora_core.gauge import canonical_factors

METHODS = ["flat", "rank"]


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return [load_adapter(d) for d in adapter_dirs]


def _task_delta(subspace, task_id):
    return {name: F_B @ F_A.T for name, (F_A, F_B) in subspace.task_factors(task_id).items()}


def _worst_error(subspace, adapters):
    return max(
        relative_error(_task_delta(subspace, a.name)[n], dw) for a in adapters for n, dw in delta_weights(a).items()
    )


@pytest.mark.parametrize("method", METHODS)
def test_full_k_is_lossless(adapters, method):
    subspace = SharedSubspace.from_adapters(adapters, num_components=64, method=method)
    assert _worst_error(subspace, adapters) <= 1e-5
    assert all(e <= 1e-5 for e in quality.task_errors(subspace).values())


@pytest.mark.parametrize("method, k_max", [("flat", 3), ("rank", 16)])  # N - 1; N·r (d = 32 is larger)
def test_k_is_clipped_to_what_the_data_allows(adapters, method, k_max):
    subspace = SharedSubspace.from_adapters(adapters, num_components=100, method=method)
    assert {k for sides in subspace.layer_ks.values() for k in sides.values()} == {k_max}
    assert "k=100 is more than the data allows" in subspace.clipping_note()


@pytest.mark.parametrize("method", METHODS)
def test_a_fixed_k_equals_the_full_decomposition_cut_at_k(adapters, method):
    """from_adapters forms only k directions; they must be those of decompose().truncated(k)."""
    direct = SharedSubspace.from_adapters(adapters, num_components=2, method=method)
    full = SharedSubspace.decompose(adapters, method=method)
    cut = full.truncated(2)
    cut.measure_against(full)
    for name, sides in direct.bases.items():
        for side, basis in sides.items():
            other = cut.bases[name][side]
            assert torch.allclose(basis.spectrum, other.spectrum, rtol=1e-4, atol=1e-6)
            overlap = torch.linalg.svdvals(basis.components @ other.components.T)  # cosines of principal angles
            assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-4)
    for a in adapters:
        for n, dw in _task_delta(cut, a.name).items():
            assert relative_error(_task_delta(direct, a.name)[n], dw) < 1e-4
    assert quality.task_errors(direct) == pytest.approx(quality.task_errors(cut), rel=1e-3)


def test_measure_false_skips_the_errors_only(adapters):
    measured = SharedSubspace.from_adapters(adapters, num_components=2)
    bare = SharedSubspace.from_adapters(adapters, num_components=2, measure=False)
    assert all(not t.errors for t in bare.tasks.values()) and all(t.errors for t in measured.tasks.values())
    for a in adapters:
        for n, dw in _task_delta(measured, a.name).items():
            assert torch.equal(_task_delta(bare, a.name)[n], dw)


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_and_variance_rises_with_k(adapters, method):
    full = SharedSubspace.decompose(adapters, method=method)
    sweep = quality.sweep_ks(full)
    mean_errors = [sweep.task_errors(k).mean().item() for k in sweep.ks]
    assert all(a >= b - 1e-6 for a, b in zip(mean_errors, mean_errors[1:]))
    assert mean_errors[0] > 0.1 and mean_errors[-1] < 1e-5
    variance = [full.truncated(k).bases["model.layers.0.self_attn.q_proj"]["A"].variance_explained() for k in sweep.ks]
    assert variance[0] < 0.9 and variance[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-9 for a, b in zip(variance, variance[1:]))


@pytest.mark.parametrize("method", METHODS)
def test_sweep_matches_direct_measurement(adapters, method):
    full = SharedSubspace.decompose(adapters, method=method)
    sweep = quality.sweep_ks(full)
    view = full.truncated(2)
    direct = [
        max(relative_error(_task_delta(view, a.name)[n], dw) for n, dw in delta_weights(a).items()) for a in adapters
    ]
    swept = sweep.errors[sweep.ks.index(2)].max(dim=0).values
    assert torch.allclose(swept, torch.tensor(direct), atol=1e-4)


def _rotated(adapter: LoRAAdapter, seed: int) -> LoRAAdapter:
    """Same ΔW, other factors: B·R and R⁻¹·A for a random invertible R per layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, layer in adapter.layers.items():
        R = torch.randn(layer.rank, layer.rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(layer.rank)
        B = (layer.B.double() @ R).float()
        A = (torch.linalg.inv(R) @ layer.A.double()).float()
        layers[name] = LoRALayer(A=A, B=B, scaling=layer.scaling)
    return LoRAAdapter(f"{adapter.name}-rot{seed}", adapter.config, layers)


def test_canonical_factors_do_not_depend_on_the_factorisation(adapters):
    layer = adapters[0].layers["model.layers.0.self_attn.q_proj"]
    rotated = _rotated(adapters[0], 1).layers["model.layers.0.self_attn.q_proj"]
    one = canonical_factors(layer.A[None], layer.B[None], torch.tensor([layer.scaling]))
    two = canonical_factors(rotated.A[None], rotated.B[None], torch.tensor([rotated.scaling]))
    for F, G in zip(one, two):
        assert torch.allclose(F, G, atol=1e-4)
    assert relative_error(one[1][0] @ one[0][0].T, layer.delta_weight()) < 1e-5


@pytest.mark.parametrize("method, k", [("flat", 1), ("rank", 4)])  # rank: k = r directions
def test_rotated_copies_compress_losslessly(adapters, method, k):
    copies = [_rotated(adapters[0], seed) for seed in range(8)]
    subspace = SharedSubspace.from_adapters(copies, num_components=k, method=method)
    for copy in copies:
        delta = _task_delta(subspace, copy.name)
        for name, dw in delta_weights(copy).items():
            assert relative_error(delta[name], dw) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_incremental_add_keeps_old_tasks_and_stores_the_new_one_exactly(adapters, tmp_path, method):
    subspace = SharedSubspace.from_adapters(adapters[:3], num_components=2, method=method)
    before = {t: _task_delta(subspace, t) for t in subspace.task_ids}
    subspace.add(adapters[3], "late", incremental=True)
    for task_id, deltas in before.items():
        after = _task_delta(subspace, task_id)
        assert all(torch.equal(after[n], d) for n, d in deltas.items())  # bit for bit
    late = _task_delta(subspace, "late")
    assert max(relative_error(late[n], d) for n, d in delta_weights(adapters[3]).items()) <= 1e-5
    assert quality.task_errors(subspace)["late"] <= 1e-5
    again = SharedSubspace.load(subspace.save(tmp_path / "store"))
    assert max(relative_error(_task_delta(again, "late")[n], d) for n, d in late.items()) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_project_keeps_the_basis_and_reports_the_error(adapters, method):
    subspace = SharedSubspace.from_adapters(adapters[:3], num_components=2, method=method)
    components = {n: {s: b.components.clone() for s, b in sides.items()} for n, sides in subspace.bases.items()}
    task = subspace.add(adapters[3], "projected")
    assert all(
        torch.equal(subspace.bases[n][s].components, c) for n, sides in components.items() for s, c in sides.items()
    )
    expected = {n: subspace.bases[n]["A"].k for n in subspace.shapes}
    assert {n: t["A"].shape[-1] for n, t in task.loadings.items()} == expected
    reported = quality.task_errors(subspace)["projected"]
    delta, original = _task_delta(subspace, "projected"), delta_weights(adapters[3])
    direct = (
        (sum((delta[n] - d).norm() ** 2 for n, d in original.items()) / sum(d.norm() ** 2 for d in original.values()))
        .sqrt()
        .item()
    )
    assert reported > 0.1 and reported == pytest.approx(direct, rel=1e-4)


def test_projecting_a_stored_task_returns_its_loadings(adapters):
    subspace = SharedSubspace.from_adapters(adapters, num_components=2, method="rank")
    again = subspace.project(adapters[1], "copy")
    stored = subspace.tasks[adapters[1].name]
    for name in subspace.shapes:
        for side in ("A", "B"):
            assert torch.allclose(again.loadings[name][side], stored.loadings[name][side], atol=1e-5)


def test_absorb_rebuilds_with_the_same_k(adapters):
    subspace = SharedSubspace.from_adapters(adapters[:3], num_components=2, method="rank")
    subspace.absorb(adapters[3], "absorbed")
    assert subspace.task_ids == [a.name for a in adapters[:3]] + ["absorbed"]
    assert {k for sides in subspace.layer_ks.values() for k in sides.values()} == {2}
    assert set(quality.task_errors(subspace)) == set(subspace.task_ids)


def test_adaptive_k_is_chosen_per_layer_side(tmp_path):
    dirs = [write_adapter(tmp_path / f"a{i}", i) for i in range(5)]
    adapters = [load_adapter(d) for d in dirs]
    # make layer 0 q_proj nearly identical across tasks: its variance is in one direction
    base = adapters[0].layers["model.layers.0.self_attn.q_proj"]
    for i, a in enumerate(adapters):
        a.layers["model.layers.0.self_attn.q_proj"] = LoRALayer(base.A * (1 + 0.1 * i), base.B, base.scaling)
    subspace = SharedSubspace.from_adapters(adapters, adaptive_k=True, variance_threshold=0.95, method="flat")
    ks = subspace.layer_ks
    assert ks["model.layers.0.self_attn.q_proj"]["A"] == 1
    assert ks["model.layers.1.self_attn.v_proj"]["A"] > 1
    for sides in subspace.bases.values():
        for b in sides.values():
            assert b.variance_explained() >= 0.95 - 1e-6


def test_task_ids_default_to_folder_names_and_must_be_unique(adapters):
    subspace = SharedSubspace.from_adapters(adapters, num_components=2)
    assert subspace.task_ids == ["sentiment", "summarization", "translation", "qa"]
    with pytest.raises(TaskError, match="used twice"):
        SharedSubspace.from_adapters(adapters, task_ids=["a", "b", "a", "c"])
    with pytest.raises(TaskError, match="already in this store"):
        subspace.add(adapters[0], "qa")
    assert subspace.task_ids == ["sentiment", "summarization", "translation", "qa"]


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(adapters, k):
    with pytest.raises(VLoRAError, match="at least 1"):
        SharedSubspace.from_adapters(adapters, num_components=k)


def test_single_adapter_is_refused(adapters):
    with pytest.raises(VLoRAError, match="at least 2 adapters"):
        SharedSubspace.from_adapters(adapters[:1])


def test_rank_mismatch_names_both_adapters(tmp_path, adapters):
    other = load_adapter(write_adapter(tmp_path / "rank8", 9, r=8))
    with pytest.raises(CompatibilityError) as info:
        SharedSubspace.from_adapters([adapters[0], other])
    message = str(info.value)
    assert "rank8" in message and "rank 8 differs from rank 4" in message and "sentiment" in message


def test_module_mismatch_lists_the_modules(tmp_path, adapters):
    other = load_adapter(write_adapter(tmp_path / "qk", 9, targets=("q_proj", "k_proj")))
    with pytest.raises(
        CompatibilityError, match=r"missing: model.layers.0.self_attn.v_proj.*extra: model.layers.0.self_attn.k_proj"
    ):
        SharedSubspace.from_adapters([adapters[0], other])


def test_unknown_method_lists_the_choices(adapters):
    with pytest.raises(VLoRAError, match="choose one of: flat, rank"):
        SharedSubspace.from_adapters(adapters, method="pca")


@pytest.mark.parametrize("method", METHODS)
def test_streaming_compress_is_close_to_one_pass(adapter_dirs, tmp_path, method):
    from vlora_core.subspace import stream_compress

    dirs = adapter_dirs + [write_adapter(tmp_path / f"more{i}", 50 + i) for i in range(3)]
    one_pass = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=3, method=method)
    streamed = stream_compress(dirs, num_components=3, method=method, chunk=2)
    assert streamed.task_ids == one_pass.task_ids and streamed.layer_ks == one_pass.layer_ks
    stream_err, pass_err = quality.task_errors(streamed), quality.task_errors(one_pass)
    mean = lambda e: sum(e.values()) / len(e)  # noqa: E731
    assert mean(pass_err) - 1e-6 <= mean(stream_err) <= mean(pass_err) * 1.15
    full = stream_compress(dirs, num_components=64, method=method, chunk=2)  # nothing dropped: exact
    assert max(quality.task_errors(full).values()) < 1e-4


def test_compress_on_a_named_device_gives_the_same_store(adapter_dirs):
    """Every device code path runs here with device="cpu" (a GPU machine runs the same with "cuda")."""
    adapters = [load_adapter(d) for d in adapter_dirs]
    default = SharedSubspace.from_adapters(adapters, num_components=2, method="rank")
    placed = SharedSubspace.from_adapters(adapters, num_components=2, method="rank", device="cpu")
    for name, sides in default.bases.items():
        for side, basis in sides.items():
            assert torch.equal(placed.bases[name][side].components, basis.components)
    assert {t.id: t.errors for t in placed.tasks.values()} == {t.id: t.errors for t in default.tasks.values()}


def test_from_adapters_takes_folders_as_well_as_adapters(adapter_dirs):
    loaded = SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs], num_components=2)
    given = SharedSubspace.from_adapters([str(adapter_dirs[0]), *adapter_dirs[1:]], num_components=2)
    assert given.task_ids == loaded.task_ids and quality.task_errors(given) == quality.task_errors(loaded)
    with pytest.raises(VLoRAError, match="expected a LoRAAdapter .* or an adapter folder, got int"):
        SharedSubspace.from_adapters([1, 2])
    with pytest.raises(VLoRAError, match="load_adapter takes an adapter folder's path, not NoneType"):
        load_adapter(None)
    with pytest.raises(VLoRAError, match="'bogus' is not a device name"):
        SharedSubspace.from_adapters(adapter_dirs, device="bogus")
    with pytest.raises(TaskError, match="task id 1 is not a string but int"):
        SharedSubspace.from_adapters(adapter_dirs, task_ids=[1, 2, 3, 4])
