"""`vlora --help`, an argument error and `vlora info` answer without torch (issue 15): the parser's tables are
torch-free and agree with the modules that implement them, and info's torch-free read prints byte for byte what
the full load prints."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

from vlora_core import SharedSubspace, load_adapter, options
from vlora_core.info import report
from vlora_core.io import manifest as schema
from vlora_core.io.store_view import read_view

NO_TORCH = """
import sys
from vlora_core.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code)
"""


def no_torch_run(*args):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def stores(adapter_dirs, tmp_path_factory):
    """Stores of every kind info reads: flat fp32, rank bf16, flat int8 with adaptive k."""
    root = tmp_path_factory.mktemp("stores")
    adapters = [load_adapter(d) for d in adapter_dirs[:3]]
    settings = {
        "flat-fp32": dict(num_components=2, dtype="fp32"),
        "rank-bf16": dict(method="rank", num_components=3, dtype="bf16"),
        "flat-int8-adaptive": dict(adaptive_k=True, variance_threshold=0.8, dtype="int8"),
    }
    for name, kwargs in settings.items():
        SharedSubspace.from_adapters(adapters, **kwargs).save(root / name)
    return {name: root / name for name in settings}


def printed(subspace, store, as_json):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report(subspace, store, as_json)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["flat-fp32", "rank-bf16", "flat-int8-adaptive"])
@pytest.mark.parametrize("as_json", [False, True])
def test_info_without_torch_prints_what_the_full_load_prints(stores, kind, as_json):
    store = stores[kind]
    view = read_view(store)
    assert view is not None
    assert printed(view, store, as_json) == printed(SharedSubspace.load(store), store, as_json)


def test_a_store_without_recorded_variance_is_loaded_in_full_with_the_same_output(stores, tmp_path):
    store = tmp_path / "old"
    store.mkdir()
    for file in stores["rank-bf16"].iterdir():
        (store / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((store / "manifest.json").read_text())
    for layer in manifest["layers"]:
        del layer["variance_explained"]  # as a format 3 store written before it was recorded
    (store / "manifest.json").write_text(json.dumps(schema.seal(manifest), indent=2))
    assert read_view(store) is None
    code, out, err = no_torch_run("info", store)
    assert code == 0 and "torch imported" in err
    assert out == printed(SharedSubspace.load(store), store, False)


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--help"], 0, "Many LoRA adapters"),
        (["compress", "--help"], 0, "--dtype"),
        (["compress", "a", "-o", "b", "--method", "nope"], 2, "invalid choice"),
        (["merge", "s", "t", "--method", "nope"], 2, "invalid choice"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_help_and_argument_errors_import_no_torch(args, code, words):
    got, out, err = no_torch_run(*args)
    assert got == code and words in out + err
    assert err.rstrip().endswith("no torch")


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_info_imports_no_torch_and_says_what_the_loaded_store_says(stores, as_json):
    store = stores["flat-int8-adaptive"]
    code, out, err = no_torch_run("info", store, *as_json)
    assert code == 0 and err.rstrip().endswith("no torch")
    assert out == printed(SharedSubspace.load(store), store, bool(as_json))


def test_info_names_a_damaged_data_file_without_torch(stores, tmp_path):
    store = tmp_path / "hurt"
    store.mkdir()
    for file in stores["flat-fp32"].iterdir():
        (store / file.name).write_bytes(file.read_bytes())
    victim = sorted(store.glob("task-*"))[0]
    victim.write_bytes(victim.read_bytes()[:-3])
    code, out, err = no_torch_run("info", store)
    assert code == 1 and f"{victim.name} does not match its checksum" in err and err.rstrip().endswith("no torch")


def test_the_torch_free_tables_agree_with_the_implementations():
    from vlora_core import export, merge, methods, precision, serving, subspace

    assert list(options.BASIS_METHODS) == list(methods.METHODS)
    assert {name: m.summary for name, m in methods.METHODS.items()} == options.BASIS_METHODS
    assert {name: (p.flag, p.summary) for name, p in precision.PRECISIONS.items()} == options.STORAGE
    assert options.STORAGE_FLAGS == precision.FLAGS
    assert list(options.MERGE_METHODS) == list(merge.METHODS)
    defaults = merge.MergeConfig()
    assert options.MERGE_DEFAULTS == {"method": defaults.method, "density": defaults.density, "seed": defaults.seed}
    assert export.EXPORT_FORMATS == options.EXPORT_FORMATS and subspace.DEFAULT_CHUNK == options.DEFAULT_CHUNK
    assert serving.VLLM_DEFAULT_MAX_LORA_RANK == options.VLLM_DEFAULT_MAX_LORA_RANK
    with pytest.raises(AssertionError, match="basis methods"):
        options.agree(["flat"], methods.METHODS, "basis methods")


def test_the_headers_info_reads_are_what_the_store_writes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from vlora_core import methods, precision
    from vlora_core.io.store_view import STORED, VECTORS, header

    for name, method in methods.METHODS.items():
        g, D = VECTORS[name][0](5, 3)
        assert (g, D) == tuple(method.to_vectors(torch.empty(1, 5, 3)).shape[1:]) and VECTORS[name][1] == method.centre
    for name, rule in precision.PRECISIONS.items():
        save_file({"x" + suffix: t for suffix, t in rule.encode(torch.ones(2, 3)).items()}, tmp_path / "t.safetensors")
        found = header(tmp_path / "t.safetensors")
        assert tuple(found[key]["dtype"] for key in sorted(found)) == STORED[name]
