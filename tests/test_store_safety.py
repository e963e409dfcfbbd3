"""Never lose a user's files (issue 12, classes 1, 4 and 8's task ids): generated case tables.

Output paths: every kind of thing an `export -o`, `export --all -o` or `compress -o` may point at, with and
without --force, through the CLI and through the Python API. A refusal is exit 1 (or a StoreError) with a
message naming the path and the fix, and every file, folder and link under the test's folder as it was; a
write is checked by reading it back. The store's own files: one changed digit anywhere in manifest.json, a
re-sealed manifest that breaks the schema, each data file damaged four ways. Task ids from paths: a symbolic
link keeps its own name, however the folder is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli as vlora
from conftest import write_adapter
from safetensors.torch import load_file, save_file

from vlora import SharedSubspace, StoreError, export_all, export_task, load_adapter
from vlora_core.io import manifest as schema

FOREIGN = "not empty and not written by vlora export"
EXPORTED = "already holds a vlora export; pass --force"
NOT_FOLDER = "exists and is not a folder"
IS_STORE = "is the store"
INSIDE = "is inside the store"
NOT_STORE = "not empty and not a vlora store"
UNDER_FILE = "is a file, not a folder"
A_STORE = "already holds a vlora store (3 tasks"


# ---- helpers ----------------------------------------------------------------------------------------
def tree(folder: Path) -> dict:
    """Everything under ``folder``, links not followed: file bytes, folders, links and FIFOs by kind."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(top) / name
            rel = path.relative_to(folder)
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "folder"
            elif path.is_file():
                out[rel] = path.read_bytes()
            else:
                out[rel] = "special"
    return out


def folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def exported(path: Path, store: Path, task: str = "sentiment") -> Path:
    export_task(SharedSubspace.load(store), task, path)
    return path


def unmarked_export(path: Path, store: Path) -> Path:
    exported(path, store)
    weights = path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # what PEFT would write: no vlora mark
    return path


def fifo_folder(path: Path) -> Path:
    folder(path)
    os.mkfifo(path / "adapter_model.safetensors")  # reading it would block: it must be refused unread
    return path


def link(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


def attempt(interface: str, run_cli, run_api) -> tuple[bool, str]:
    """(succeeded, message) of one action through the CLI or the Python API."""
    if interface == "cli":
        result = run_cli()
        assert "Traceback" not in result.stderr
        assert result.returncode in (0, 1), result.stderr
        return result.returncode == 0, result.stderr
    try:
        run_api()
    except StoreError as error:
        return False, str(error)
    return True, ""


def delta_ws(adapter) -> dict:
    return {name: layer.delta_weight() for name, layer in adapter.layers.items()}


def stored_delta_w(store: Path, task: str) -> dict:
    return {name: F_B @ F_A.T for name, (F_A, F_B) in SharedSubspace.load(store).task_factors(task).items()}


def assert_same_delta_w(written: Path, store: Path, task: str) -> None:
    got, want = delta_ws(load_adapter(written)), stored_delta_w(store, task)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


@pytest.fixture(scope="module")
def pristine_store(adapter_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "store"
    result = vlora("compress", *adapter_dirs[:3], "-o", out, "-k", "2")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def work(pristine_store, tmp_path):
    """A fresh folder holding its own copy of the store (a refusal that failed would damage only this copy)."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(pristine_store, root / "store")
    return root


# ---- class 1: export -o ---------------------------------------------------------------------------------
EXPORT_TARGETS = {  # name -> (make the target under root, words refusing it without --force, with --force)
    "a new folder": (lambda r, s: r / "out", None, None),
    "a new nested folder": (lambda r, s: r / "x" / "y" / "out", None, None),
    "an empty folder": (lambda r, s: folder(r / "out"), None, None),
    "a link to an empty folder": (lambda r, s: link(r / "out", folder(r / "real")), None, None),
    "a folder holding a file": (lambda r, s: folder(r / "out", notes="mine"), FOREIGN, FOREIGN),
    "a folder holding a hidden file": (lambda r, s: folder(r / "out", **{".keep": ""}), FOREIGN, FOREIGN),
    "a folder holding a folder": (lambda r, s: folder(r / "out" / "sub").parent, FOREIGN, FOREIGN),
    "an earlier vlora export": (lambda r, s: exported(r / "out", s, "translation"), EXPORTED, None),
    "an export with a file added": (
        lambda r, s: (exported(r / "out", s) / "README.md").write_text("notes") and r / "out",
        FOREIGN,
        FOREIGN,
    ),
    "an export without vlora's mark": (lambda r, s: unmarked_export(r / "out", s), FOREIGN, FOREIGN),
    "a PEFT adapter vlora did not write": (lambda r, s: write_adapter(r / "out", 9), FOREIGN, FOREIGN),
    "a FIFO named like the weights": (lambda r, s: fifo_folder(r / "out"), FOREIGN, FOREIGN),
    "a file": (lambda r, s: (r / "out").write_text("mine") and r / "out", NOT_FOLDER, NOT_FOLDER),
    "a link to a file": (
        lambda r, s: link(r / "out", (r / "f").write_text("mine") and r / "f"),
        NOT_FOLDER,
        NOT_FOLDER,
    ),
    "a dangling link": (lambda r, s: link(r / "out", r / "nowhere"), NOT_FOLDER, NOT_FOLDER),
    "a folder under a file": (lambda r, s: (r / "f").write_text("mine") and r / "f" / "out", UNDER_FILE, UNDER_FILE),
    "the store": (lambda r, s: s, IS_STORE, IS_STORE),
    "a new folder inside the store": (lambda r, s: s / "out", INSIDE, INSIDE),
    "a nested new folder inside the store": (lambda r, s: s / "a" / "b", INSIDE, INSIDE),
    "a link to the store": (lambda r, s: link(r / "out", s), IS_STORE, IS_STORE),
    "a folder under a link into the store": (lambda r, s: link(r / "out", s) / "x", INSIDE, INSIDE),
    "another store": (lambda r, s: Path(shutil.copytree(s, r / "out")), IS_STORE, IS_STORE),
}


@pytest.mark.parametrize("interface", ["cli", "python"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", list(EXPORT_TARGETS))
def test_export_never_replaces_what_vlora_did_not_write(case, force, interface, work):
    make, refused, refused_forced = EXPORT_TARGETS[case]
    store = work / "store"
    target = make(work, store)
    words = refused_forced if force else refused
    before = tree(work)
    ok, message = attempt(
        interface,
        lambda: vlora("export", store, "sentiment", "-o", target, *(["--force"] if force else [])),
        lambda: export_task(SharedSubspace.load(store), "sentiment", target, force=force),
    )
    if words is not None:
        assert not ok and words in message and str(target) in message, message
        assert tree(work) == before
        return
    assert ok, message
    assert_same_delta_w(target, store, "sentiment")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    after = tree(work)
    assert {k: v for k, v in after.items() if k.parts[0] == "store"} == {
        k: v for k, v in before.items() if k.parts[0] == "store"
    }
    if "link" in case:
        assert (work / "out").is_symlink()  # written through the link, which stays


@pytest.mark.parametrize("content", ["empty", "a file", "an export"])
def test_export_to_dot_writes_into_the_working_folder(content, work, monkeypatch):
    here = folder(work / "here")
    if content == "a file":
        (here / "notes").write_text("mine")
    if content == "an export":
        exported(here, work / "store", "translation")
    monkeypatch.chdir(here)
    before, inode = tree(work), os.stat(".").st_ino
    plain = vlora("export", work / "store", "sentiment", "-o", ".")
    forced = vlora("export", work / "store", "sentiment", "-o", ".", "--force")
    if content == "a file":
        assert plain.returncode == forced.returncode == 1 and FOREIGN in plain.stderr and FOREIGN in forced.stderr
        assert tree(work) == before
        return
    assert (plain.returncode, EXPORTED in plain.stderr) == ((1, True) if content == "an export" else (0, False))
    assert forced.returncode == 0 and os.stat(".").st_ino == inode  # the working folder itself stays
    assert_same_delta_w(Path("."), work / "store", "sentiment")


ALL_ROOTS = {  # name -> (make P under root, words refusing `--all -o P` without --force, with --force)
    "a new folder": (lambda r, s: r / "all", None, None),
    "a folder of other things": (lambda r, s: folder(r / "all", notes="mine", **{"photo.jpg": "cat"}), None, None),
    "a folder holding a user's folder named like a task": (
        lambda r, s: folder(r / "all" / "translation", notes="mine").parent,
        FOREIGN,
        FOREIGN,
    ),
    "a folder holding a file named like a task": (
        lambda r, s: folder(r / "all", summarization="mine"),
        NOT_FOLDER,
        NOT_FOLDER,
    ),
    "a folder of earlier exports": (
        lambda r, s: export_all(SharedSubspace.load(s), r / "all") and r / "all",
        EXPORTED,
        None,
    ),
    "a file": (lambda r, s: (r / "all").write_text("mine") and r / "all", NOT_FOLDER, NOT_FOLDER),
    "a folder under a file": (lambda r, s: (r / "f").write_text("mine") and r / "f" / "all", UNDER_FILE, UNDER_FILE),
    "the store": (lambda r, s: s, IS_STORE, IS_STORE),
    "inside the store": (lambda r, s: s / "all", INSIDE, INSIDE),
}


@pytest.mark.parametrize("interface", ["cli", "python"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", list(ALL_ROOTS))
def test_export_all_checks_every_folder_before_writing_any(case, force, interface, work):
    make, refused, refused_forced = ALL_ROOTS[case]
    store = work / "store"
    root = make(work, store)
    words = refused_forced if force else refused
    before = tree(work)
    ok, message = attempt(
        interface,
        lambda: vlora("export", store, "--all", "-o", root, *(["--force"] if force else [])),
        lambda: export_all(SharedSubspace.load(store), root, force=force),
    )
    if words is not None:
        assert not ok and words in message, message
        assert tree(work) == before  # not even the tasks whose folders were free
        return
    assert ok, message
    for task in ("sentiment", "summarization", "translation"):
        assert_same_delta_w(root / task, store, task)
    after = tree(work)
    tasks = set(SharedSubspace.load(store).tasks)
    others = {k: v for k, v in before.items() if not (k.parts[0] == "all" and k.parts[1:2] and k.parts[1] in tasks)}
    assert {k: after[k] for k in others} == others  # only the tasks' own folders were written


# ---- class 1: compress -o ---------------------------------------------------------------------------
COMPRESS_TARGETS = {  # name -> (make the target under root, words refusing it without --force, with --force)
    "a new folder": (lambda r, s: r / "new", None, None),
    "a new nested folder": (lambda r, s: r / "a" / "b" / "new", None, None),
    "an empty folder": (lambda r, s: folder(r / "new"), None, None),
    "a store": (lambda r, s: s, A_STORE, None),
    "a store whose manifest was edited": (
        lambda r, s: (
            (s / "manifest.json").write_text(
                (s / "manifest.json").read_text().replace('"k_requested": 2', '"k_requested": 3')
            )
            and s
        ),
        "does not match its own checksum",
        None,
    ),
    "a folder holding a file": (lambda r, s: folder(r / "new", notes="mine"), NOT_STORE, NOT_STORE),
    "an exported adapter": (lambda r, s: exported(r / "new", s), NOT_STORE, NOT_STORE),
    "a PEFT adapter": (lambda r, s: write_adapter(r / "new", 8), NOT_STORE, NOT_STORE),
    "a file": (lambda r, s: (r / "new").write_text("mine") and r / "new", NOT_FOLDER, NOT_FOLDER),
    "a folder under a file": (lambda r, s: (r / "f").write_text("mine") and r / "f" / "new", UNDER_FILE, UNDER_FILE),
    "a new folder inside a store": (lambda r, s: s / "inner", INSIDE, INSIDE),
}


@pytest.fixture(scope="module")
def fresh_subspace(adapter_dirs):
    return SharedSubspace.from_adapters([load_adapter(d) for d in adapter_dirs], num_components=2)


@pytest.mark.parametrize("interface", ["cli", "python"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("case", list(COMPRESS_TARGETS))
def test_compress_never_writes_over_what_is_not_its_store(case, force, interface, work, adapter_dirs, fresh_subspace):
    make, refused, refused_forced = COMPRESS_TARGETS[case]
    target = make(work, work / "store")
    words = refused_forced if force else refused
    before = tree(work)
    ok, message = attempt(
        interface,
        lambda: vlora("compress", *adapter_dirs, "-o", target, "-k", "2", *(["--force"] if force else [])),
        lambda: fresh_subspace.save(target, force=force),
    )
    if words is not None:
        assert not ok and words in message and str(target) in message, message
        assert tree(work) == before
        return
    assert ok, message
    assert SharedSubspace.load(target).task_ids == [d.name for d in adapter_dirs]


# ---- class 4: the store's own files -------------------------------------------------------------------
def one_digit_changes(text: str, every: int):
    """manifest.json's text with one digit changed, at every ``every``-th digit of the file (numbers, checksums,
    file names, paths alike)."""
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    for i in digits[::every]:
        yield text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :]


def test_one_changed_digit_anywhere_in_the_manifest_is_refused(work):
    store = work / "store"
    original = (store / "manifest.json").read_text()
    cases = list(one_digit_changes(original, every=7))
    assert len(cases) >= 100
    same_value = 0
    for n, text in enumerate(cases):
        (store / "manifest.json").write_text(text)
        if json.loads(text) == json.loads(original):  # a 17th significant digit: the same float, not a change
            same_value += 1
            assert SharedSubspace.load(store).task_ids == ["sentiment", "summarization", "translation"]
            continue
        with pytest.raises(StoreError, match="manifest.json: .*(restore|rebuild)"):  # its checksum, JSON, version
            SharedSubspace.load(store)
        if n % 10 == 0:
            result = vlora("export", store, "sentiment", "-o", work / "out")
            assert result.returncode == 1 and "manifest.json" in result.stderr and "Traceback" not in result.stderr
    assert same_value < len(cases) // 10
    assert not (work / "out").exists()


def _layer(m, **changes):
    m["layers"][0].update(changes)


def _task(m, **changes):
    m["tasks"][0].update(changes)


RESEALED = {  # a manifest rewritten by hand and sealed again: the schema and the data files still refuse it
    "layer d_in 10^12": (lambda m: _layer(m, d_in=10**12), "has shape"),
    "layer rank above its sizes": (lambda m: _layer(m, rank=64), "rank exceeds its dims"),
    "layer d_in a float": (lambda m: _layer(m, d_in=32.0), "d_in must be a whole number"),
    "layer d_in true": (lambda m: _layer(m, d_in=True), "d_in must be a whole number"),
    "layer without d_out": (lambda m: m["layers"][0].pop("d_out"), "d_out must be a whole number"),
    "layer without a name": (lambda m: _layer(m, name=""), "a layer has no name"),
    "layers swapped": (lambda m: m["layers"].reverse(), "has shape"),
    "layers empty": (lambda m: m.update(layers=[]), "layers must be a non-empty list"),
    "layer twice": (lambda m: m["layers"].append(dict(m["layers"][0])), "a layer name appears twice"),
    "method of the other kind": (lambda m: m.update(method="rank"), "has shape"),
    "method unknown": (lambda m: m.update(method="pca"), "unknown method 'pca'"),
    "dtype int8": (lambda m: _task(m, dtype="int8"), "dtype 'int8' is not one of"),
    "task id twice": (lambda m: m["tasks"][1].update(id=m["tasks"][0]["id"]), "a task id appears twice"),
    "task id empty": (lambda m: _task(m, id=""), "is empty"),
    "task id a list": (lambda m: _task(m, id=["x"]), "task id"),
    "task file outside the store": (lambda m: _task(m, file="../../etc/passwd"), "file is not checksummed"),
    "basis file a task file": (lambda m: m.update(basis_file=m["tasks"][0]["file"]), "is missing"),
    "config a list": (lambda m: _task(m, config=[]), "config must be an object"),
    "extras naming a missing tensor": (lambda m: _task(m, extras=["nope"]), "'extra.nope' is missing"),
    "quality negative": (lambda m: _task(m, quality={m["layers"][0]["name"]: [-1, 1]}), "two numbers >= 0"),
    "quality of an unknown layer": (lambda m: _task(m, quality={"nowhere": [0.1, 1]}), "unknown layers"),
    "k_requested zero": (lambda m: m.update(k_requested=0), "k_requested must be >= 1"),
    "generation negative": (lambda m: m.update(generation=-1), "generation must be a whole number"),
    "no tasks": (lambda m: m.update(tasks=[]), "tasks must be a non-empty list"),
    "checksum not hex": (lambda m: m["checksums"].update({m["basis_file"]: "x" * 64}), "is not a SHA-256"),
    "a data file name of another kind": (lambda m: m["checksums"].update({"notes.txt": "0" * 64}), "is not vlora's"),
    "source a number": (lambda m: _task(m, source=5), "source must be text"),
    "format version 1": (lambda m: m.update(format_version=1), "format version 1"),
}


@pytest.mark.parametrize("case", list(RESEALED))
def test_a_resealed_manifest_that_breaks_the_schema_is_refused(case, work):
    store = work / "store"
    manifest = json.loads((store / "manifest.json").read_text())
    change, words = RESEALED[case]
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(schema.seal(manifest), indent=2))
    with pytest.raises(StoreError, match="rebuild|restore|upgrade") as refused:
        SharedSubspace.load(store)
    assert words in str(refused.value)
    for args in (["info", store], ["info", store, "--json"], ["export", store, "sentiment", "-o", work / "out"]):
        result = vlora(*args)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr
    assert not (work / "out").exists()


DATA_DAMAGE = {  # name -> (damage a data file, words)
    "one byte flipped": (lambda f, other: f.write_bytes(_flip(f.read_bytes())), "does not match its checksum"),
    "truncated": (lambda f, other: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "does not match"),
    "removed": (lambda f, other: f.unlink(), "is missing"),
    "another data file's bytes": (lambda f, other: f.write_bytes(other.read_bytes()), "does not match its checksum"),
}


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_every_damaged_data_file_is_named(damage, work):
    store = work / "store"
    files = sorted(p for p in store.iterdir() if p.name.startswith(("basis-", "task-")))
    assert len(files) == 4  # the basis and three tasks
    pristine = tree(store)
    for i, victim in enumerate(files):
        hurt, words = DATA_DAMAGE[damage]
        hurt(victim, files[i - 1])
        with pytest.raises(StoreError, match=f"{victim.name} {words}"):
            SharedSubspace.load(store)
        result = vlora("info", store)
        assert result.returncode == 1 and victim.name in result.stderr and "Traceback" not in result.stderr
        victim.write_bytes(pristine[Path(victim.name)])
    assert SharedSubspace.load(store).task_ids == ["sentiment", "summarization", "translation"]


def test_info_json_is_strict_json_with_unknown_errors_as_null(adapter_dirs, tmp_path):
    subspace = SharedSubspace.from_adapters(
        [load_adapter(d) for d in adapter_dirs[:3]], num_components=2, measure=False
    )
    subspace.save(tmp_path / "store")
    result = vlora("info", tmp_path / "store", "--json")

    def no_constants(name):
        raise AssertionError(f"{name} in --json output")

    report = json.loads(result.stdout, parse_constant=no_constants)
    assert result.returncode == 0
    assert report["summary"]["task_errors"] == {d.name: None for d in adapter_dirs[:3]}
    assert [row["error"] for row in report["layers"]] == [None] * 4
    assert all(0 < row["variance_a"] <= 1 for row in report["layers"])


# ---- class 8: task ids from paths ---------------------------------------------------------------------
ID_SPELLINGS = {  # how the folder is written (relative to a working folder holding it) -> the id it gets
    "a plain name": ("sentiment", "sentiment"),
    "a trailing slash": ("sentiment/", "sentiment"),
    "a symbolic link": ("linked", "linked"),
    "a link with a trailing slash": ("linked/", "linked"),
    "a link inside a linked folder": ("shelf-link/sentiment-link", "sentiment-link"),
    "a path through ..": ("shelf/../sentiment", "sentiment"),
    "dot, inside the folder": (".", "sentiment"),
}


@pytest.fixture
def spellings(tmp_path, adapter_dirs, monkeypatch):
    """A working folder with the adapter, a link to it, and a linked shelf holding another link."""
    shutil.copytree(adapter_dirs[0], tmp_path / "sentiment")
    (tmp_path / "linked").symlink_to(tmp_path / "sentiment")
    (tmp_path / "shelf").mkdir()
    (tmp_path / "shelf" / "sentiment-link").symlink_to(tmp_path / "sentiment")
    (tmp_path / "shelf-link").symlink_to(tmp_path / "shelf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", list(ID_SPELLINGS))
def test_a_folder_keeps_the_name_it_was_given_as_its_task_id(case, spellings, adapter_dirs, monkeypatch):
    spelled, task_id = ID_SPELLINGS[case]
    if spelled == ".":
        monkeypatch.chdir(spellings / "sentiment")
    assert load_adapter(spelled).name == task_id
    for extra in ([], ["--stream", "2"]):
        out = spellings / f"store{len(extra)}"
        result = vlora("compress", spelled, spellings / "linked" / ".." / "sentiment", "-o", out, "-k", "1", *extra)
        if task_id == "sentiment":  # the same id twice: refused, naming it
            assert result.returncode == 1 and "'sentiment' is used twice" in result.stderr
        else:
            assert result.returncode == 0, result.stderr
            assert SharedSubspace.load(out).task_ids == [task_id, "sentiment"]
    store = spellings / "added"
    assert vlora("compress", *adapter_dirs[1:3], "-o", store, "-k", "1").returncode == 0
    assert vlora("add", store, spelled).returncode == 0
    assert SharedSubspace.load(store).task_ids[-1] == task_id


ADD_TARGETS = {  # `vlora add TARGET adapter` where TARGET is not a store: refused, nothing written there
    "an empty folder": (lambda r: folder(r / "t"), "not a vlora store"),
    "a folder of other files": (lambda r: folder(r / "t", notes="mine"), "not a vlora store"),
    "an exported adapter": (lambda r: exported(r / "t", r / "store"), "not a vlora store"),
    "a PEFT adapter": (lambda r: write_adapter(r / "t", 4), "not a vlora store"),
    "a file": (lambda r: (r / "t").write_text("mine") and r / "t", "no such folder"),
    "a missing path": (lambda r: r / "t", "no such folder"),
}


@pytest.mark.parametrize("case", list(ADD_TARGETS))
def test_add_writes_nothing_into_what_is_not_a_store(case, work, adapter_dirs):
    make, words = ADD_TARGETS[case]
    target = make(work)
    before = tree(work)
    result = vlora("add", target, adapter_dirs[3])
    assert result.returncode == 1 and words in result.stderr and str(target) in result.stderr
    assert "Traceback" not in result.stderr and tree(work) == before


MANIFEST_REPLACED_BY = {  # manifest.json's bytes replaced: refused on load, by info and by export
    "nothing": b"",
    "binary garbage": bytes(range(256)) * 4,
    "half of itself": None,
    "a JSON list": b"[]",
    "an empty object": b"{}",
    "200,000 nested lists": b"[" * 200_000,
    "NaN for a number": None,
    "a 5,000-digit number": None,
}


@pytest.mark.parametrize("case", list(MANIFEST_REPLACED_BY))
def test_a_replaced_manifest_is_refused(case, work):
    path = work / "store" / "manifest.json"
    text = path.read_text()
    data = MANIFEST_REPLACED_BY[case]
    if case == "half of itself":
        data = text[: len(text) // 2].encode()
    if case == "NaN for a number":
        data = text.replace('"generation": 1', '"generation": NaN').encode()
    if case == "a 5,000-digit number":
        data = text.replace('"generation": 1', '"generation": 1' + "0" * 5000).encode()
    path.write_bytes(data)
    with pytest.raises(StoreError, match="manifest.json: .*(restore|rebuild|make one)"):
        SharedSubspace.load(work / "store")
    for args in (["info", work / "store", "--json"], ["export", work / "store", "--all", "-o", work / "out"]):
        result = vlora(*args)
        assert result.returncode == 1 and "manifest.json" in result.stderr and "Traceback" not in result.stderr
    assert not (work / "out").exists()
