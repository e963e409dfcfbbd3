"""Untrusted zips: every unsafe entry is refused before anything is written, adapters are found by folder."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile

import pytest

from vlora import load_adapter
from vlora_core.io.archive import ArchiveError, adapter_folders, extract_zip, make_zip, stage_files


def _zip(path, entries):
    """entries: (name, data) or (ZipInfo, data); a ZipInfo's flag bits are written into the central directory."""
    flags = {e.filename: e.flag_bits for e, _ in entries if isinstance(e, zipfile.ZipInfo) and e.flag_bits}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    raw = bytearray(path.read_bytes())
    for name, bits in flags.items():  # zipfile clears flags on write; set them as an encrypting tool would
        raw[_central_entry(raw, name) + 8] |= bits
    path.write_bytes(bytes(raw))
    return path


def _central_entry(raw: bytearray, name: str) -> int:
    """Offset of ``name``'s central directory record (signature PK\\1\\2, file name at +46)."""
    at = raw.index(b"PK\x01\x02")
    while raw[at + 46 : at + 46 + len(name)] != name.encode():
        at = raw.index(b"PK\x01\x02", at + 1)
    return at


def _info(name, mode=0, flags=0):
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.flag_bits |= flags
    return info


UNSAFE = [
    ("../escaped.txt", "climbs out of the archive with '..'"),
    ("adapters/../../escaped.txt", "climbs out of the archive with '..'"),
    ("adapters\\..\\..\\escaped.txt", "climbs out of the archive with '..'"),
    ("/tmp/escaped.txt", "absolute path"),
    ("C:/escaped.txt", "absolute path"),
    ("\\\\server\\share\\escaped.txt", "absolute path"),
    (_info("adapters/link", stat.S_IFLNK | 0o777), "symbolic link"),
    (_info("adapters/device", stat.S_IFCHR | 0o600), "special file"),
    (_info("adapters/secret.txt", stat.S_IFREG | 0o600, flags=0x1), "encrypted"),
]


@pytest.mark.parametrize("entry, message", UNSAFE, ids=[str(getattr(e, "filename", e)) for e, _ in UNSAFE])
def test_unsafe_entries_are_refused_and_nothing_is_written(tmp_path, entry, message):
    archive = _zip(tmp_path / "up.zip", [("adapters/a/adapter_config.json", "{}"), (entry, "x")])
    with pytest.raises(ArchiveError, match=message):
        extract_zip(archive, tmp_path / "out" / "dest")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "escaped.txt").exists()


def test_duplicate_entries_are_refused_and_the_partial_folder_removed(tmp_path):
    archive = tmp_path / "dup.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):
        _zip(archive, [("a/adapter_config.json", "{}"), ("a/adapter_config.json", "{}")])
    with pytest.raises(ArchiveError, match="appears twice"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    "limits, message",
    [
        (dict(max_files=2), "holds 3 entries, more than the limit of 2"),
        (dict(max_total_bytes=10), "expands to 15 bytes, more than the limit of 10"),
    ],
)
def test_caps_on_count_and_size(tmp_path, limits, message):
    archive = _zip(tmp_path / "up.zip", [("a/1", "12345"), ("a/2", "12345"), ("a/3", "12345")])
    with pytest.raises(ArchiveError, match=message):
        extract_zip(archive, tmp_path / "dest", **limits)
    assert not (tmp_path / "dest").exists()


def test_not_a_zip(tmp_path):
    (tmp_path / "up.zip").write_text("hello")
    with pytest.raises(ArchiveError, match="not a readable zip archive"):
        extract_zip(tmp_path / "up.zip", tmp_path / "dest")


def test_adapters_are_grouped_by_folder(tmp_path, adapter_dirs):
    entries = [("__MACOSX/x/adapter_config.json", "{}"), ("notes/readme.txt", "hi"), ("./top/", "")]
    for d in adapter_dirs[:2]:
        entries += [(f"nested/{d.name}/{f.name}", f.read_bytes()) for f in d.iterdir()]
    entries += [(f"top/{f.name}", f.read_bytes()) for f in adapter_dirs[2].iterdir()]
    dest = extract_zip(_zip(tmp_path / "up.zip", entries), tmp_path / "dest")
    found = adapter_folders(dest)
    assert [f.relative_to(dest).as_posix() for f in found] == [
        f"nested/{adapter_dirs[0].name}",
        f"nested/{adapter_dirs[1].name}",
        "top",
    ]
    assert load_adapter(found[2]).ranks == load_adapter(adapter_dirs[2]).ranks
    assert not (dest / "__MACOSX").exists()


def test_stage_files_keeps_the_peft_files(tmp_path, adapter_dirs):
    files = sorted(adapter_dirs[0].iterdir()) + [tmp_path / "notes.txt"]  # peft also wrote a README.md
    (tmp_path / "notes.txt").write_text("hello")
    folder, ignored = stage_files(files, tmp_path / "staged")
    assert ignored == ["README.md", "notes.txt"]
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ArchiveError, match="two adapter_config.json"):
        stage_files(files + [adapter_dirs[1] / "adapter_config.json"], tmp_path / "again")
    with pytest.raises(ArchiveError, match="has no adapter_config.json"):
        stage_files([tmp_path / "notes.txt"], tmp_path / "none")


def test_make_zip_round_trip(tmp_path, adapter_dirs):
    source = shutil.copytree(adapter_dirs[0], tmp_path / "src")
    os.symlink("/etc/passwd", source / "link")
    out = make_zip(source, tmp_path / "out.zip", root_name="task")
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(f"task/{f.name}" for f in adapter_dirs[0].iterdir())  # no link
    dest = extract_zip(out, tmp_path / "back")
    assert load_adapter(dest / "task").ranks == load_adapter(adapter_dirs[0]).ranks
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.zip")] == []  # no temp file left
