"""The store on disk: exact round trip, hostile task ids, checksums, atomic saves."""

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


def test_saving_twice_is_byte_identical_and_cleans_old_files(adapters, tmp_path):
    subspace = SharedSubspace.from_adapters(adapters, num_components=2)
    store = subspace.save(tmp_path / "s")
    first = _files(store)
    subspace.save(store)
    assert _files(store) == first
    SharedSubspace.from_adapters(adapters, num_components=3).save(store)
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(p.name for p in store.iterdir()) == {"manifest.json", *manifest["checksums"]}


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

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_files, "write_json_atomic", crash)  # dies after the data files, before the manifest
    with pytest.raises(OSError):
        bigger.save(store)
    monkeypatch.undo()
    assert {k: v for k, v in _files(store).items() if k in before} == before
    assert {n: s["A"] for n, s in SharedSubspace.load(store).layer_ks.items()} == {n: 2 for n in bigger.shapes}
