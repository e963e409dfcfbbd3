"""Two writers, and readers during a write (issue 12, class 2), with real processes.

Eight `vlora add` processes start at once on one store, five growing the basis (--incremental) and three
projecting; a reader process loads the store in a loop the whole time. Every add exits 0 and every task is in
the final store (the incremental ones exactly); the reader never gets an error and sees several generations.
In one process: a subspace loaded before another writer saved is refused ("changed since it was loaded"), and
a writer that finds the lock held waits for it, or says the store is busy after its timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import delta_weights, write_adapter
from conftest import run_cli as vlora

from vlora import SharedSubspace, StoreError, load_adapter
from vlora_core import quality
from vlora_core.io.store_files import read_manifest, store_lock, verify_files

HERE = Path(__file__).parent
FIRST = ["sentiment", "summarization", "translation"]
WRITERS = {f"late{i}": i < 5 for i in range(8)}  # task id -> incremental


@pytest.fixture
def store(adapter_dirs, tmp_path):
    out = tmp_path / "store"
    assert vlora("compress", *adapter_dirs[:3], "-o", out, "-k", "2").returncode == 0
    return out


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.mark.slow
def test_concurrent_adds_lose_no_task_and_readers_never_fail(store, tmp_path):
    adapters = {task_id: write_adapter(tmp_path / task_id, 100 + i) for i, task_id in enumerate(WRITERS)}
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    reader = subprocess.Popen(
        python(str(HERE / "store_reader.py"), str(store), str(stop), str(ready)),
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and reader.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the writers start once the reader reads: on an idle machine they could all be done first
    assert ready.exists(), "the reader did not start"
    writers = [
        subprocess.Popen(
            python("-m", "vlora_core.cli", "add", str(store), str(adapters[t]), *(["--incremental"] if inc else [])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for t, inc in WRITERS.items()
    ]
    done = [(w.wait(timeout=300), w.stderr.read()) for w in writers]
    stop.touch()
    seen = json.loads(reader.communicate(timeout=120)[0])

    assert [code for code, _ in done] == [0] * len(WRITERS), [err for _, err in done]
    final = SharedSubspace.load(store)
    assert final.task_ids[:3] == FIRST and sorted(final.task_ids[3:]) == sorted(WRITERS)
    assert verify_files(store, read_manifest(store)) == []
    assert read_manifest(store)["generation"] == 1 + len(WRITERS)
    recorded = quality.task_errors(final)
    for task_id, incremental in WRITERS.items():  # exact when the basis grew for it, else the error it recorded
        got, want = delta_weights(final.to_adapter(task_id)), delta_weights(load_adapter(adapters[task_id]))
        error = (sum((got[n] - want[n]).norm() ** 2 for n in want) / sum(w.norm() ** 2 for w in want.values())) ** 0.5
        assert error.item() == pytest.approx(recorded[task_id], abs=1e-4), task_id
        assert error < 1e-4 if incremental else error > 1e-3, (task_id, error)

    assert seen["errors"] == [] and seen["loads"] >= 5, seen
    assert len(seen["generations"]) >= 2 and min(seen["counts"]) >= 3, seen


def test_a_save_over_a_store_that_moved_on_is_refused(store, adapter_dirs, tmp_path):
    first, second = SharedSubspace.load(store), SharedSubspace.load(store)
    first.add(load_adapter(adapter_dirs[3]))
    first.save(store)
    second.add(load_adapter(write_adapter(tmp_path / "other", 5)))
    with pytest.raises(StoreError, match="the store changed since it was loaded.*load it again"):
        second.save(store)
    assert SharedSubspace.load(store).task_ids == FIRST + ["qa"]  # the first writer's task is kept
    again = SharedSubspace.load(store)
    again.add(load_adapter(tmp_path / "other"))
    again.save(store)
    assert SharedSubspace.load(store).task_ids == FIRST + ["qa", "other"]


@pytest.mark.slow
def test_a_writer_waits_for_the_lock_or_says_the_store_is_busy(store, adapter_dirs, tmp_path):
    hold = "import sys, time; from vlora_core.io.store_files import store_lock\n" + (
        "with store_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))"
    )
    holder = subprocess.Popen(python("-c", hold, str(store), "6"), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    held_at = time.monotonic()
    with pytest.raises(StoreError, match="the store is busy \\(another vlora is writing it\\).*try again"):
        with store_lock(store, timeout=0.5):
            pass
    waited = vlora("add", store, adapter_dirs[3], subprocess_=True)  # blocks until the holder lets go
    assert waited.returncode == 0, waited.stderr
    assert time.monotonic() - held_at >= 5.5 and holder.wait(timeout=30) == 0
    assert SharedSubspace.load(store).task_ids == FIRST + ["qa"]
