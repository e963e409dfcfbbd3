"""The store on disk: exact round trip, hostile task ids, checksums, atomic saves."""

import errno
import json

import pytest
import torch

from vlora import SharedSubspace, StoreError, load_adapter

HOSTILE_IDS = ["../x", "team/a", "Ünïcødé ✓", "a" * 200, "/etc/passwd", "con", "."]


@pytest.fixture(scope="module")
def adapters(adapter_dirs):
    return [load_adapter(d) for d in adapter_dirs]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_save_load_is_identity(adapters, tmp_path, method):
    subspace = SharedSubspace.from_adapters(adapters, num_components=2, method=method)
    again = SharedSubspace.load(subspace.save(tmp_path / "s"))
    assert again.method == method and again.task_ids == subspace.task_ids
    for name, sides in subspace.bases.items():
        for side, basis in sides.items():
            other = again.bases[name][side]
            assert torch.equal(basis.components, other.components) and torch.equal(basis.spectrum, other.spectrum)
    for task in subspace.tasks.values():
        copy = again.tasks[task.id]
        assert copy.config == task.config and copy.errors == task.errors
        assert all(torch.equal(copy.loadings[n][s], t) for n, sides in task.loadings.items() for s, t in sides.items())


def test_hostile_task_ids_round_trip_and_write_nothing_outside(adapters, tmp_path):
    ids = HOSTILE_IDS[:4]
    subspace = SharedSubspace.from_adapters(adapters, task_ids=ids, num_components=2)
    store = tmp_path / "inside" / "store"
    again = SharedSubspace.load(subspace.save(store))
    assert again.task_ids == ids
    assert [p.name for p in (tmp_path / "inside").iterdir()] == ["store"]
    assert all(p.parent == store for p in store.rglob("*"))


def test_saves_keep_the_files_of_two_generations_and_no_more(adapters, tmp_path):
    def data_files(store):
        return {p.name for p in store.iterdir() if p.name.startswith(("basis-", "task-"))}

    def manifest(store):
        return json.loads((store / "manifest.json").read_text())

    subspace = SharedSubspace.from_adapters(adapters, num_components=2)
    store = subspace.save(tmp_path / "s")
    first = data_files(store)
    subspace.save(store)  # the same content: the same files, the next generation
    assert data_files(store) == first and manifest(store)["generation"] == 2
    other = SharedSubspace.from_adapters(adapters, num_components=3)
    with pytest.raises(StoreError, match="already holds a vlora store"):
        other.save(store)  # a store it was not loaded from is not replaced unasked
    assert data_files(store) == first and manifest(store)["generation"] == 2
    other.save(store, force=True)
    third = set(manifest(store)["checksums"])
    assert data_files(store) == first | third  # a reader still on generation 2 finds its files
    SharedSubspace.from_adapters(adapters, num_components=1).save(store, force=True)
    assert data_files(store) == third | set(manifest(store)["checksums"])  # generation 2's files are gone
    assert {p.name for p in store.iterdir()} - data_files(store) <= {"manifest.json", ".vlora.lock"}


def test_refuses_to_write_into_a_foreign_folder(adapters, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    subspace = SharedSubspace.from_adapters(adapters, num_components=2)
    with pytest.raises(StoreError, match="not empty and not a vlora store"):
        subspace.save(tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_damage_is_detected_and_named(adapters, tmp_path):
    store = SharedSubspace.from_adapters(adapters, num_components=2).save(tmp_path / "s")
    task_file = sorted(store.glob("task-*"))[0]
    data = bytearray(task_file.read_bytes())
    data[-1] ^= 0xFF
    task_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{task_file.name} does not match its checksum"):
        SharedSubspace.load(store)
    task_file.unlink()
    with pytest.raises(StoreError, match=f"{task_file.name} is missing"):
        SharedSubspace.load(store)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.mkdir(), "not a vlora store"),
        (lambda p: None, "no such folder"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{")), "damaged manifest"),
        (lambda p: (p.mkdir(), (p / "manifest.json").write_text('{"format": "other"}')), "not a vlora store manifest"),
        (
            lambda p: (
                p.mkdir(),
                (p / "manifest.json").write_text('{"format": "vlora-subspace", "format_version": 99}'),
            ),
            "format version 99",
        ),
    ],
)
def test_not_a_store(tmp_path, setup, message):
    setup(tmp_path / "x")
    with pytest.raises(StoreError, match=message):
        SharedSubspace.load(tmp_path / "x")


def test_a_failed_save_leaves_the_old_store(adapters, tmp_path, monkeypatch):
    store = SharedSubspace.from_adapters(adapters, num_components=2).save(tmp_path / "s")
    before = _files(store)
    bigger = SharedSubspace.from_adapters(adapters, num_components=3)
    import vlora_core.io.store_files as store_files

    write = store_files.write_bytes_atomic

    def full_at_the_manifest(path, data):  # the data files are written, then the disk fills up
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(store_files, "write_bytes_atomic", full_at_the_manifest)
    with pytest.raises(StoreError, match="the disk is full — free some space; the store was left as it was"):
        bigger.save(store, force=True)
    monkeypatch.undo()
    assert _files(store) == before  # byte for byte: what the failed save wrote is gone
    assert {n: s["A"] for n, s in SharedSubspace.load(store).layer_ks.items()} == {n: 2 for n in bigger.shapes}
