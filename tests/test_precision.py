"""Storage precision: fp32 / bf16 / fp16 / int8 stores, their bytes on disk, round trips and exports."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli as vlora
from conftest import write_adapter
from safetensors import safe_open

from vlora import LoRAAdapter, LoRALayer, SharedSubspace, load_adapter
from vlora_core import quality
from vlora_core.errors import VLoRAError
from vlora_core.io import manifest as schema
from vlora_core.precision import PRECISIONS, get_precision
from vlora_core.training import SubspaceTrainer, orthogonal_init

LOW = ["bfloat16", "float16", "int8"]
BOUND = {"bfloat16": 2.0**-8, "float16": 2.0**-11}  # relative, per number (round to nearest: half of these)


def _adapters(n: int = 6, d: int = 128, r: int = 8, dtype=torch.float32) -> list[LoRAAdapter]:
    gen = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]
    shared = {n_: (torch.randn(r, d, generator=gen), torch.randn(d, r, generator=gen)) for n_ in names}
    out = []
    for t in range(n):
        layers = {}
        for name, (A0, B0) in shared.items():
            A = (A0 + 0.5 * torch.randn(r, d, generator=gen)) / d**0.5
            B = (B0 + 0.5 * torch.randn(d, r, generator=gen)) / r**0.5
            layers[name] = LoRALayer(A=A.to(dtype), B=B.to(dtype), scaling=2.0)
        out.append(LoRAAdapter(f"task{t}", {"r": r, "lora_alpha": 2 * r, "peft_type": "LORA"}, layers))
    return out


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_round_trip_is_within_the_precision_and_stable(name):
    rule = get_precision(name)
    x = torch.randn(40, 33, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 40)[:, None]
    y = rule.round_trip(x)
    if name == "int8":  # symmetric per-row scales: at most max|row| / 253 a number
        assert ((x - y).abs().amax(dim=-1) <= x.abs().amax(dim=-1) / 253).all()
    elif name == "float32":
        assert torch.equal(x, y)
    else:
        floor = torch.finfo(getattr(torch, name)).smallest_normal * 2.0**-10  # subnormals: absolute
        assert ((x - y).abs() <= torch.maximum(BOUND[name] * x.abs(), torch.tensor(floor))).all()
    assert torch.equal(rule.round_trip(y), y)  # a store written again is the same store


def test_int8_scales_handle_zero_rows_and_fp16_refuses_what_it_cannot_hold():
    x = torch.zeros(3, 5)
    x[1] = torch.tensor([0.0, 1e-30, -2.0, 0.5, 3.0])
    assert torch.equal(get_precision("int8").round_trip(x)[0], torch.zeros(5))
    with pytest.raises(VLoRAError, match="bf16"):
        get_precision("fp16").round_trip(torch.tensor([[1e6, 1.0]]))
    with pytest.raises(VLoRAError, match="choose one of: fp32, bf16, fp16, int8"):
        get_precision("int4")


@pytest.mark.parametrize("name", LOW)
@pytest.mark.parametrize("method", ["flat", "rank"])
def test_a_store_in_low_precision_saves_loads_and_measures_what_is_on_disk(tmp_path, method, name):
    adapters = _adapters()
    exact = SharedSubspace.from_adapters(adapters, num_components=100, method=method, dtype="fp32")  # lossless
    low = SharedSubspace.from_adapters(adapters, num_components=100, method=method, dtype=name)
    assert low.dtype == name
    low.save(tmp_path / "s")
    loaded = SharedSubspace.load(tmp_path / "s")
    assert loaded.dtype == name
    for layer, sides in low.bases.items():
        for side, basis in sides.items():
            assert torch.equal(loaded.bases[layer][side].components, basis.components)  # dequantised exactly
    for task_id, task in low.tasks.items():
        for layer, sides in task.loadings.items():
            for side, t in sides.items():
                assert torch.equal(loaded.tasks[task_id].loadings[layer][side], t)
    e_exact, e_low = quality.overall_error(exact), quality.overall_error(low)
    limit = {"bfloat16": 0.01, "float16": 0.002, "int8": 0.03}[name]
    assert e_exact < 1e-5 < e_low < limit  # the recorded error is the rounding's, and it is small


def _data_bytes(path) -> int:
    """Bytes of a safetensors file's tensors (the file less its header)."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def test_the_bytes_on_disk_shrink_with_the_precision(tmp_path):
    adapters = _adapters(d=256)
    sizes = {}
    for name in PRECISIONS:
        store = SharedSubspace.from_adapters(adapters, num_components=4, method="flat", dtype=name)
        folder = store.save(tmp_path / name)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["storage"] == name and manifest["format_version"] == 3
        files = [folder / manifest["basis_file"]] + [folder / t["file"] for t in manifest["tasks"]]
        sizes[name] = sum(_data_bytes(f) for f in files)
        spectra = sum(b.spectrum.numel() * 4 for sides in store.bases.values() for b in sides.values())
        assert sizes[name] == quality.stored_bytes(store) + spectra  # the file holds what stored_bytes counts
    assert sizes["bfloat16"] / sizes["float32"] < 0.52
    assert sizes["float16"] == sizes["bfloat16"]
    assert sizes["int8"] / sizes["float32"] < 0.27


def test_default_is_bf16_for_bf16_or_fp16_inputs_and_fp32_otherwise():
    assert SharedSubspace.from_adapters(_adapters(dtype=torch.bfloat16), num_components=2).dtype == "bfloat16"
    assert SharedSubspace.from_adapters(_adapters(dtype=torch.float16), num_components=2).dtype == "bfloat16"
    assert SharedSubspace.from_adapters(_adapters(), num_components=2).dtype == "float32"


def test_a_format_2_store_still_reads(tmp_path):
    store = SharedSubspace.from_adapters(_adapters(), num_components=2, method="flat")
    folder = store.save(tmp_path / "s")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["storage"]
    manifest["format_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(schema.seal(manifest)))
    loaded = SharedSubspace.load(folder)
    assert loaded.dtype == "float32" and set(loaded.task_ids) == set(store.task_ids)


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_incremental_add_and_training_keep_working_in_low_precision(tmp_path, name):
    adapters = _adapters(n=7)
    store = SharedSubspace.from_adapters(adapters[:6], num_components=3, method="rank", dtype=name)
    before = {t: store.task_factors(t) for t in store.task_ids}
    task = store.add(adapters[6], incremental=True)
    assert quality.task_errors(store)[task.id] < 0.03  # stored within the precision, not projected
    for task_id, factors in before.items():  # stored tasks moved by the precision only
        for layer, (F_A, F_B) in store.task_factors(task_id).items():
            assert (F_B @ F_A.T - factors[layer][1] @ factors[layer][0].T).norm() <= 0.03 * (F_B @ F_A.T).norm()
    orthogonal_init(store, "new")
    trainer = SubspaceTrainer(store, "new", lr=1e-2)
    loss = sum(t.pow(2).sum() for sides in store.tasks["new"].loadings.values() for t in sides.values())
    trainer.step(-loss)
    trainer.write_back()
    assert 0 < trainer.rounding < 0.02  # what the precision cost the trained loadings
    store.save(tmp_path / "s")
    loaded = SharedSubspace.load(tmp_path / "s")
    for layer, sides in store.tasks["new"].loadings.items():
        for side, t in sides.items():
            assert torch.equal(loaded.tasks["new"].loadings[layer][side], t)


def _sha(folder) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_exports_are_byte_identical_and_keep_each_task_s_dtype(adapter_dirs, tmp_path):
    half = write_adapter(tmp_path / "half", 9)
    adapter = load_adapter(half)
    for layer in adapter.layers.values():
        layer.A, layer.B = layer.A.to(torch.bfloat16), layer.B.to(torch.bfloat16)
    store = SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs] + [adapter], num_components=4)
    store.save(tmp_path / "s")
    outs = []
    for i in range(2):  # two processes: safetensors' metadata order changes from one to the next
        out = tmp_path / f"e{i}"
        code = "import sys; from vlora_core.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, "export", str(tmp_path / "s"), "--all", "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        outs.append(out)
    for task_id in store.task_ids:
        assert _sha(outs[0] / task_id) == _sha(outs[1] / task_id)
        data = (outs[0] / task_id / "adapter_model.safetensors").read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")], object_pairs_hook=list)
        keys = [k for k, _ in header] + [k for k, _ in dict(header)["__metadata__"]]
        assert keys == sorted(k for k, _ in header) + sorted(k for k, _ in dict(header)["__metadata__"])
    with safe_open(outs[0] / "half" / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the original adapter's dtype
    assert vlora("export", tmp_path / "s", "half", "-o", tmp_path / "f32", "--dtype", "fp32").returncode == 0
    with safe_open(tmp_path / "f32" / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_cli_compress_add_and_info_with_dtypes(adapter_dirs, tmp_path):
    done = vlora("compress", *adapter_dirs[:3], "-o", tmp_path / "s", "-k", "2", "--dtype", "int8")
    assert done.returncode == 0 and "stored in int8" in done.stdout
    info = vlora("info", tmp_path / "s", "--json")
    storage = json.loads(info.stdout)["storage"]
    files = list((tmp_path / "s").glob("*-*.safetensors"))
    assert storage["dtype"] == "int8"
    assert storage["bytes_on_disk"]["basis"] + storage["bytes_on_disk"]["tasks"] == sum(f.stat().st_size for f in files)
    assert "basis" in vlora("info", tmp_path / "s").stdout
    assert vlora("add", tmp_path / "s", adapter_dirs[3], "--incremental", "--dtype", "bf16").returncode == 0
    assert SharedSubspace.load(tmp_path / "s").dtype == "bfloat16"
    bad = vlora("compress", *adapter_dirs[:2], "-o", tmp_path / "t", "--dtype", "int4")
    assert bad.returncode == 2 and "int4" in bad.stderr
