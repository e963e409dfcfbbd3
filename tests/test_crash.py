"""Crash safety: `vlora add` and `vlora compress` killed with SIGKILL at every file operation of a save.

After every kill the store still loads, every checksum verifies, and it is either the previous store
or the complete new one — never a mix.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_adapter

from vlora import SharedSubspace
from vlora_core.io.store_files import read_manifest, verify_files

pytestmark = pytest.mark.slow  # a killed process at every file operation

DRIVER = Path(__file__).with_name("crash_driver.py")


@pytest.mark.parametrize("command", ["add", "compress"])
def test_sigkill_at_every_write_leaves_a_loadable_store(command, adapter_dirs, tmp_path):
    store = tmp_path / "store"
    assert run_cli("compress", *adapter_dirs[:3], "-o", store, "-k", "2").returncode == 0
    old_ids = SharedSubspace.load(store).task_ids
    new = write_adapter(tmp_path / "late", 77)
    args = {
        "add": ["add", str(store), str(new), "--incremental"],
        "compress": ["compress", *map(str, adapter_dirs), "-o", str(store), "-k", "3", "--force"],
    }[command]
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(store), str(out), "--", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    kills = int(done.stdout.split("kills=")[1])
    assert "completed at kill point" in done.stdout and kills >= 8  # data files, manifest, clean-up
    new_ids = old_ids + ["late"] if command == "add" else [d.name for d in adapter_dirs]
    seen = set()
    for n in range(1, kills + 1):
        snapshot = out / str(n)
        assert verify_files(snapshot, read_manifest(snapshot)) == [], f"kill point {n}"
        ids = SharedSubspace.load(snapshot).task_ids
        assert ids in (old_ids, new_ids), f"kill point {n}"
        seen.add(tuple(ids))
    assert seen == {tuple(old_ids), tuple(new_ids)}  # the kills span the switch from old to new


def test_info_names_the_damage(adapter_dirs, tmp_path):
    store = tmp_path / "store"
    assert run_cli("compress", *adapter_dirs[:3], "-o", store).returncode == 0
    victim = sorted(store.glob("basis-*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    result = run_cli("info", store)
    assert result.returncode == 1
    assert f"{victim.name} does not match its checksum" in result.stderr and "damaged" in result.stderr
