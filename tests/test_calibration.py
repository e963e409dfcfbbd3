"""Activation-aware bases (issue 14, point 2): C streamed by hooks, the whitened fit, and calibrated stores.

Real parts: adapters written by peft on the tiny Llama, its calibration run on a saved tiny Llama with a byte-level
tokenizer loaded by path (as `--base-model DIR` does), the store saved, loaded, exported and served.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, peft_logits, run_cli, snapshot, tiny_llama

from vlora import SharedSubspace, VLoRAModel, load_adapter
from vlora_core.adapter import LoRAAdapter, LoRALayer
from vlora_core.base_model import load_base_model
from vlora_core.calibration import DEFAULT_DAMPING, Calibration, calibrate, collect_moments, unwhitened, whitening
from vlora_core.io.prompts import PromptError

PROMPTS = [
    {"prompt": "How do I make a cup of tea?"},
    {"prompt": "The soup was cold.", "answer": "negative", "task": "sentiment"},
    {"prompt": "Why is the sky blue?"},
]
FULL_K = {"flat": 3, "rank": 16}  # 4 adapters of rank 4: every direction the data has (d = 32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("calibration_model"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration_prompts") / "calibration.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def short_prompt_file(tmp_path_factory):
    """Fewer tokens than d_in = 32: each layer's C is singular, and only the damping makes it invertible."""
    path = tmp_path_factory.mktemp("short_prompts") / "short.jsonl"
    path.write_text(json.dumps({"prompt": "Hi there"}) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return [load_adapter(d) for d in adapter_dirs]


def delta(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight() for name, layer in adapter.layers.items()}


def whitened_error(calibration: Calibration, originals: dict, approx: dict) -> float:
    """sqrt(Σ ‖(ΔW − ΔŴ)·S‖² / Σ ‖ΔW·S‖²) over every task and layer (dense: tiny layers only)."""
    num = den = 0.0
    for task_id, layers in originals.items():
        for name, W in layers.items():
            S = calibration.whitening(name)[0]
            num += float(((W.double() - approx[task_id][name].double()) @ S).pow(2).sum())
            den += float((W.double() @ S).pow(2).sum())
    return (num / den) ** 0.5


# ---- collecting C ------------------------------------------------------------------------------------------
def test_streamed_moments_equal_the_inputs_gram(model_dir):
    """C summed by the pre-hooks, one prompt at a time, equals XᵀX of every input row collected whole."""
    model, tokenizer = load_base_model(model_dir, dtype="fp32", device="cpu")
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a cup of tea", "why is the sky blue?")]
    collected = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda m, args, out, n=n: collected[n].append(args[0].reshape(-1, m.in_features))
        )
        for n in layers
    ]
    sums, tokens = collect_moments(model, tokenizer, texts, layers)
    for handle in handles:
        handle.remove()
    assert tokens == sum(len(t) for t in texts) == sum(len(x) for x in collected[layers[0]]) // 1
    for name in layers:
        X = torch.cat(collected[name]).double()
        assert X.shape[0] == tokens
        torch.testing.assert_close(sums[name], X.T @ X, rtol=1e-10, atol=1e-10)
    assert sums[layers[2]].shape == (64, 64)  # down_proj's inputs are the MLP's
    # no hook is left on the model
    assert all(not modules[n]._forward_pre_hooks for n in layers)


def test_calibrate_records_what_it_ran(model_dir, prompt_file, adapters):
    calibration = calibrate(prompt_file, list(adapters[0].layers), str(model_dir))
    record = calibration.record
    assert record["prompts"] == "calibration.jsonl" and record["prompt_count"] == 3
    import hashlib

    assert record["prompts_sha256"] == hashlib.sha256(prompt_file.read_bytes()).hexdigest()
    assert record["base_model"] == str(model_dir) and record["damping"] == DEFAULT_DAMPING and record["tokens"] > 20
    for C in calibration.moments.values():  # per-token second moments: symmetric, PSD, trace = mean ‖x‖²
        torch.testing.assert_close(C, C.T)
        assert float(torch.linalg.eigvalsh(C).min()) > -1e-9


# ---- the math -------------------------------------------------------------------------------------------
def test_whitening_and_unwhitening_invert():
    torch.manual_seed(0)
    X = torch.randn(10, 8).double()  # 10 rows in 8 dims, one dimension nearly unused
    X[:, 3] *= 1e-6
    S, S_inv = whitening(X.T @ X, 0.01)
    torch.testing.assert_close(S @ S, X.T @ X + 0.01 * float((X.T @ X).diagonal().mean()) * torch.eye(8))
    torch.testing.assert_close(S @ S_inv, torch.eye(8, dtype=torch.float64))
    # a flat basis (blocks of 8 rows x 3 columns) whitened, taken back: orthonormal, and the same reconstruction
    comps, mean, loadings = torch.randn(4, 24), torch.randn(24), torch.randn(5, 1, 4)
    Q, m, L = unwhitened(comps, mean, loadings, S_inv, 8)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4), atol=1e-6, rtol=0)
    want = (S_inv.float() @ (mean + loadings @ comps).reshape(5, 8, 3)).reshape(5, 1, 24)
    torch.testing.assert_close(m + L @ Q, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_full_k_is_lossless(method, adapters, model_dir, short_prompt_file, tmp_path):
    """Singular C (fewer tokens than d_in): damped, the fit still gives every ΔW back, through save/load/export."""
    calibration = calibrate(short_prompt_file, list(adapters[0].layers), str(model_dir))
    assert calibration.record["tokens"] < 32
    C = next(iter(calibration.moments.values()))
    assert int(torch.linalg.matrix_rank(C)) < 32  # singular without the damping
    store = SharedSubspace.from_adapters(
        adapters, num_components=FULL_K[method], method=method, calibration=calibration
    )
    store.save(tmp_path / "store")
    loaded = SharedSubspace.load(tmp_path / "store")
    for adapter in adapters:
        back = delta(loaded.to_adapter(adapter.name))
        for name, W in delta(adapter).items():
            assert float((back[name] - W).norm() / W.norm()) < 2e-5
    errors = [e for t in loaded.tasks.values() for e, _ in t.errors.values()]
    act = [e for t in loaded.tasks.values() for e, _ in t.act_errors.values()]
    assert len(act) == len(errors) == 4 * 4 and max(errors) < 2e-5 and max(act) < 2e-5


def _row_adapters(seed: int, calibration_C: torch.Tensor, n: int = 6, d_in: int = 16) -> list[LoRAAdapter]:
    """Rank-1 adapters of a d_out = 1 layer, each with ‖ΔW·S‖ = 1 (S of ``calibration_C``, damped)."""
    generator = torch.Generator().manual_seed(seed)
    S = Calibration({"m.q": calibration_C}).whitening("m.q")[0].float()
    out = []
    for i in range(n):
        A, B = torch.randn(1, d_in, generator=generator), torch.ones(1, 1)
        B /= float((B @ A @ S).norm())
        out.append(LoRAAdapter(f"t{i}", {"r": 1, "lora_alpha": 1}, {"m.q": LoRALayer(A, B, 1.0)}))
    return out


def test_never_worse_than_plain_in_the_whitened_metric():
    """A case where the whitened fit is provably optimal: rank basis, r = 1, d_out = 1 (the B side is exact) and
    every ‖ΔW·S‖ = 1, so the summed squared whitened error is exactly what its SVD minimises (Eckart–Young) and
    no other k-dimensional A-side subspace — the plain fit's — can do better. It must be strictly better where
    the metrics disagree, and both lossless at full k."""
    torch.manual_seed(3)
    X = torch.randn(400, 16) * torch.logspace(0, -1.5, 16)  # anisotropic inputs
    C = (X.T @ X / 400).double()
    calibration = Calibration({"m.q": C})
    adapters = _row_adapters(1, C)
    originals = {a.name: delta(a) for a in adapters}
    gaps = []
    for k in range(1, 7):
        plain = SharedSubspace.from_adapters(adapters, num_components=k, method="rank")
        aware = SharedSubspace.from_adapters(adapters, num_components=k, method="rank", calibration=calibration)
        e_plain = whitened_error(calibration, originals, {t: delta(plain.to_adapter(t)) for t in originals})
        e_aware = whitened_error(calibration, originals, {t: delta(aware.to_adapter(t)) for t in originals})
        recorded = [aware.tasks[t].act_errors["m.q"][0] for t in originals]
        assert (sum(e * e for e in recorded) / len(recorded)) ** 0.5 == pytest.approx(e_aware, rel=1e-4, abs=1e-6)
        assert e_aware <= e_plain + 1e-6, (k, e_aware, e_plain)
        gaps.append(e_plain - e_aware)
    assert max(gaps[:5]) > 0.02  # strictly better where k < N: a real gain, not rounding
    assert abs(gaps[5]) < 1e-5  # k = N: both exact


# ---- calibrated stores --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["flat", "rank"])
def calibrated(request, adapter_dirs, model_dir, prompt_file, tmp_path_factory):
    """`vlora compress --calibration` of three of the four adapters at k = 2, through the CLI."""
    out = tmp_path_factory.mktemp(f"calibrated_{request.param}") / "store"
    found = run_cli(
        "compress", *adapter_dirs[:3], "-o", out, "-k", 2, "--method", request.param,
        "--calibration", prompt_file, "--base-model", model_dir,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    return request.param, out, found


def test_cli_reports_both_errors_and_records_the_calibration(calibrated, prompt_file, model_dir, adapter_dirs):
    method, store, found = calibrated
    assert "activation-aware: calibrated on calibration.jsonl" in found.stdout
    assert found.stdout.count("activation-weighted") == 3
    manifest = json.loads((store / "manifest.json").read_text())
    import hashlib

    assert manifest["calibration"]["prompts_sha256"] == hashlib.sha256(prompt_file.read_bytes()).hexdigest()
    assert (
        manifest["calibration"]["base_model"] == str(model_dir)
        and manifest["calibration"]["damping"] == DEFAULT_DAMPING
    )
    assert all(set(t["quality_activation"]) == set(t["quality"]) for t in manifest["tasks"])
    info = run_cli("info", store)
    assert info.returncode == 0 and "act err" in info.stdout and info.stdout.count("activation-weighted") == 3
    as_json = json.loads(run_cli("info", store, "--json").stdout)
    summary = as_json["summary"]
    assert set(summary["task_activation_errors"]) == set(summary["task_errors"])
    loaded = SharedSubspace.load(store)  # the numbers info prints are the recorded ones
    for task_id, value in summary["task_activation_errors"].items():
        pairs = list(loaded.tasks[task_id].act_errors.values())
        pooled = (sum((e * n) ** 2 for e, n in pairs) / sum(n * n for _, n in pairs)) ** 0.5
        assert value == pytest.approx(pooled) and 0 < value < 1


def test_calibrated_store_exports_and_serves(calibrated, tmp_path, input_ids):
    """Export writes what the store holds; VLoRAModel runs it like PEFT runs the export."""
    method, store, _ = calibrated
    subspace = SharedSubspace.load(store)
    assert subspace.calibration["prompts"] == "calibration.jsonl"
    found = run_cli("export", store, "--all", "-o", tmp_path / "out")
    assert found.returncode == 0, found.stderr
    model = VLoRAModel(tiny_llama(0), subspace)
    for task_id in subspace.task_ids:
        exported = load_adapter(tmp_path / "out" / task_id)
        held = delta(subspace.to_adapter(task_id))
        for name, W in delta(exported).items():
            torch.testing.assert_close(W, held[name], atol=1e-5, rtol=1e-4)
        model.set_task(task_id)
        with torch.no_grad():
            ours = model(input_ids).logits
        torch.testing.assert_close(ours, peft_logits(tmp_path / "out" / task_id, input_ids), atol=1e-4, rtol=0)


def test_add_to_a_calibrated_store(calibrated, adapter_dirs, tmp_path):
    """add --incremental stores the new adapter exactly and leaves every stored task (and its activation-weighted
    error) as it was; a plain add projects it; the calibration stays recorded."""
    method, store, _ = calibrated
    work = tmp_path / "store"
    work.mkdir()
    for file in store.iterdir():
        (work / file.name).write_bytes(file.read_bytes())
    before = SharedSubspace.load(work)
    found = run_cli("add", work, adapter_dirs[3], "--incremental")
    assert found.returncode == 0, found.stderr
    after = SharedSubspace.load(work)
    assert after.calibration == before.calibration
    new = delta(after.to_adapter("qa"))
    for name, W in delta(load_adapter(adapter_dirs[3])).items():
        assert float((new[name] - W).norm() / W.norm()) < 1e-5
    for task_id in before.task_ids:
        old, now = delta(before.to_adapter(task_id)), delta(after.to_adapter(task_id))
        for name in old:
            torch.testing.assert_close(now[name], old[name], atol=1e-5, rtol=1e-4)
        assert after.tasks[task_id].act_errors == before.tasks[task_id].act_errors
    info = run_cli("info", work)
    assert "qa: ΔW relative error 0.0000, activation-weighted not measured (added later)" in info.stdout
    # a plain add: the projection on the fixed basis in the plain metric, its ΔW error recorded as for any store
    projected = before.add(load_adapter(adapter_dirs[3]))
    assert set(projected.errors) == set(before.shapes) and not projected.act_errors
    if method == "rank":  # Π_B·ΔW·Π_A with the stored (plain-orthonormal, activation-chosen) bases: any gauge
        got = delta(before.to_adapter(projected.id))
        for name, W in delta(load_adapter(adapter_dirs[3])).items():
            P_A, P_B = (before.bases[name][side].components for side in ("A", "B"))
            torch.testing.assert_close(got[name], P_B.T @ P_B @ W @ P_A.T @ P_A, atol=1e-5, rtol=1e-4)


def test_plain_fit_writes_no_calibration(adapters, tmp_path):
    """Without calibration the store is the plain one: no new manifest keys (byte-identical to before this change,
    checked once against the previous commit's vlora), and the same numbers as the fit called without the argument."""
    store = SharedSubspace.from_adapters(adapters, num_components=2, method="rank")
    assert store.calibration is None
    store.save(tmp_path / "plain")
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert set(manifest) == {
        "format", "format_version", "generation", "method", "k_requested", "storage", "layers", "basis_file",
        "tasks", "checksums", "manifest_sha256",
    }  # fmt: skip
    assert all("quality_activation" not in t for t in manifest["tasks"])
    again = SharedSubspace.from_adapters(adapters, num_components=2, method="rank", calibration=None)
    again.save(tmp_path / "again")
    assert snapshot(tmp_path / "plain") == snapshot(tmp_path / "again")


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_prompt_file_names_the_file(adapter_dirs, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"promt": "typo"}\n', encoding="utf-8")
    out = tmp_path / "store"
    found = run_cli("compress", *adapter_dirs[:2], "-o", out, "--calibration", bad, "--base-model", model_dir)
    assert found.returncode == 1 and f"{bad}, line 2" in found.stderr and "promt" in found.stderr
    assert not out.exists()
    missing = run_cli("compress", *adapter_dirs[:2], "-o", out, "--calibration", tmp_path / "nope.jsonl")
    assert missing.returncode == 1 and "nope.jsonl: no such prompt file" in missing.stderr
    stray = run_cli("compress", *adapter_dirs[:2], "-o", out, "--damping", "0.1")
    assert stray.returncode == 1 and "--calibration" in stray.stderr
    streamed = run_cli("compress", *adapter_dirs[:2], "-o", out, "--stream", "2", "--calibration", bad)
    assert streamed.returncode == 1 and "--stream" in streamed.stderr
    with pytest.raises(PromptError, match="bad.jsonl, line 2"):
        calibrate(bad, ["model.layers.0.self_attn.q_proj"], str(model_dir))
    assert not out.exists()


def test_calibration_that_does_not_fit_is_refused(adapters, model_dir):
    """A model without the targeted layers, or moments of other layers, are refused naming the layer; λ > 0."""
    from vlora_core.errors import CompatibilityError, VLoRAError

    model, tokenizer = load_base_model(model_dir, dtype="fp32", device="cpu")
    with pytest.raises(CompatibilityError, match="model.layers.7.self_attn.q_proj"):
        collect_moments(model, tokenizer, [[1, 2, 3]], ["model.layers.7.self_attn.q_proj"])
    partial = Calibration({"model.layers.0.self_attn.q_proj": torch.eye(32, dtype=torch.float64)})
    with pytest.raises(CompatibilityError, match="v_proj"):
        SharedSubspace.from_adapters(adapters, num_components=2, calibration=partial)
    for damping in (0, -1, float("nan"), float("inf"), 1e300, 10**400, True, "1"):
        with pytest.raises(VLoRAError, match=r"damping \(--damping\) must be a number from 1e-06 to 1000"):
            Calibration({}, damping=damping)


@pytest.mark.parametrize("damping", ["inf", "nan", "1e300", "1e-300", "0", "-1"])
def test_cli_refuses_damping_out_of_range_before_running_the_prompts(
    damping, adapter_dirs, model_dir, prompt_file, tmp_path
):
    out = tmp_path / "store"
    args = ("--calibration", prompt_file, "--base-model", model_dir, "--damping", damping)
    found = run_cli("compress", *adapter_dirs[:2], "-o", out, *args)
    assert found.returncode == 1 and "Traceback" not in found.stderr, found.stderr
    assert "--damping) must be a number from 1e-06 to 1000, got " in found.stderr
    assert not out.exists()
