"""Archives in and out: safe extraction of an untrusted zip, grouping files into adapter folders, zipping a folder.

An upload is untrusted. ``extract_zip`` refuses absolute paths, ``..``, links and device files, and stops at
``max_files`` entries or ``max_total_bytes`` uncompressed — counted while writing, never trusted from the
zip's header. On any refusal the destination is removed: a bad archive leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY
from ..errors import AdapterError

MAX_FILES = 256  # entries (files and folders) one archive may hold
MAX_TOTAL_BYTES = 2 * 1024**3  # uncompressed bytes one archive may expand to
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY)  # what a PEFT folder needs
SKIPPED_FOLDERS = ("__MACOSX",)  # resource forks macOS adds to zips
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(AdapterError):
    """An uploaded archive (or set of files) is unsafe, too big, or holds no adapter."""


def extract_zip(
    archive: str | Path, dest: str | Path, *, max_files: int = MAX_FILES, max_total_bytes: int = MAX_TOTAL_BYTES
) -> Path:
    """Extract ``archive`` into the new folder ``dest``; every entry is checked before anything is written."""
    archive, dest = Path(archive), Path(dest)
    label = archive.name
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = [(info, member_path(info, label)) for info in zf.infolist()]
            entries = [(info, rel) for info, rel in entries if rel is not None]
            _check_sizes([info for info, _ in entries], label, max_files, max_total_bytes)
            dest.mkdir(parents=True)
            try:
                _write_entries(zf, entries, dest, label, max_total_bytes)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ArchiveError(
            f"{label}: not a readable zip archive ({error}); upload a .zip of adapter folders."
        ) from None
    except FileExistsError:
        raise ArchiveError(f"{label}: cannot extract into {dest}: it already exists.") from None
    return dest


def member_path(info: zipfile.ZipInfo, label: str) -> PurePosixPath | None:
    """The entry's safe relative path, None for entries to skip; raises on anything that could escape."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveError(f"{label}: entry {info.filename!r} has an absolute path; archives must hold relative paths.")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{label}: entry {info.filename!r} climbs out of the archive with '..'; refusing it.")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise ArchiveError(
            f"{label}: entry {info.filename!r} is a symbolic link; archives of adapters hold plain files."
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(
            f"{label}: entry {info.filename!r} is a special file; archives of adapters hold plain files."
        )
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{label}: entry {info.filename!r} is encrypted; upload an archive without a password.")
    if not parts or parts[0] in SKIPPED_FOLDERS:
        return None
    return PurePosixPath(*parts)


def _check_sizes(infos: list[zipfile.ZipInfo], label: str, max_files: int, max_total_bytes: int) -> None:
    if len(infos) > max_files:
        raise ArchiveError(
            f"{label}: holds {len(infos)} entries, more than the limit of {max_files}; "
            "zip only the adapter folders (adapter_config.json and the weights)."
        )
    declared = sum(info.file_size for info in infos)
    if declared > max_total_bytes:
        raise ArchiveError(f"{label}: expands to {declared:,} bytes, more than the limit of {max_total_bytes:,}.")


def _write_entries(zf: zipfile.ZipFile, entries, dest: Path, label: str, max_total_bytes: int) -> None:
    written = 0
    for info, rel in entries:
        target = dest.joinpath(*rel.parts)
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(target, "xb")  # never follows or replaces anything already there
        except FileExistsError:
            raise ArchiveError(
                f"{label}: entry {info.filename!r} appears twice; refusing an ambiguous archive."
            ) from None
        except OSError as error:
            raise ArchiveError(f"{label}: entry {info.filename!r} cannot be extracted ({error.strerror}).") from None
        with out, zf.open(info) as source:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > max_total_bytes:
                    raise ArchiveError(f"{label}: expands to more than the limit of {max_total_bytes:,} bytes.")
                out.write(chunk)


def adapter_folders(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (itself included) holding a PEFT file (adapter_config.json or the weights),
    sorted; links not followed. A folder with weights but no config is listed, so that reading it says what is
    missing instead of skipping it unseen."""
    root = Path(root)
    found = [Path(folder) for folder, _, files in os.walk(root) if any(name in files for name in ADAPTER_FILES)]
    return sorted(f for f in found if not any(part in SKIPPED_FOLDERS for part in f.relative_to(root).parts))


def stage_files(files: list[str | Path], dest: str | Path) -> tuple[Path, list[str]]:
    """Copy the PEFT files among ``files`` (a folder upload, flattened) into the new folder ``dest``.

    Returns the folder and the names of the files that were ignored (a README, a training log, ...).
    """
    dest, kept, ignored = Path(dest), {}, []
    for file in map(Path, files):
        if file.name not in ADAPTER_FILES:
            ignored.append(file.name)
        elif file.name in kept:
            raise ArchiveError(
                f"this upload holds two {file.name} files; upload one adapter folder per input, "
                "or a zip of several adapter folders."
            )
        else:
            kept[file.name] = file
    if ADAPTER_CONFIG not in kept:
        raise ArchiveError(
            f"this upload has no {ADAPTER_CONFIG}; choose a PEFT adapter folder "
            "(the one peft_model.save_pretrained wrote)."
        )
    dest.mkdir(parents=True)
    for name, file in kept.items():
        shutil.copyfile(file, dest / name)
    return dest, sorted(ignored)


def make_zip(folder: str | Path, out: str | Path, *, root_name: str | None = None) -> Path:
    """Zip every file under ``folder`` (links skipped) into ``out``, under ``root_name/`` when given. Atomic."""
    folder, out = Path(folder), Path(out)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for file in files:
                rel = file.relative_to(folder).as_posix()
                zf.write(file, f"{root_name}/{rel}" if root_name else rel)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
