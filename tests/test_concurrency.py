"""Ten gradio_client sessions at once against one running app: own results, own files, nothing left after.

Each session uploads its own real PEFT adapters (seeds no other session uses, three or four of them), so its
task ids and numbers are its own; the test computes what vlora_core gives for each session's adapters and
checks that this session, and no other, got exactly that.

Gradio's file route has no notion of sessions: whoever holds a link gets the file. So what keeps sessions
apart is that the session folders are never served, the app refuses server paths into them, a session's
download links live in a folder with a random name only that session is given, and they stop working when the
session ends.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Barrier
from types import SimpleNamespace

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.slow  # ten concurrent sessions
import httpx  # noqa: E402
from conftest import (  # noqa: E402
    launch,
    write_adapter,  # noqa: E402
    zip_tree,
)
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from ui.settings import AppSettings  # noqa: E402
from vlora import CompressConfig, SharedSubspace, load_adapter  # noqa: E402
from vlora_core import quality  # noqa: E402

N_SESSIONS = 10
METHOD, K = "flat", 1  # one direction for three or four adapters: every session's errors are its own and > 0
DOWNLOAD_FOLDER = re.compile(r"vlora-[0-9a-f]{32}")  # a session's download folder: a random name


@dataclass(frozen=True)
class Workload:
    """One session's adapters, zipped, and what the core library computes for them at K."""

    archive: Path
    task_ids: list[str]
    task_errors: dict[str, float]
    stored_bytes: int
    original_bytes: int


def make_workload(folder: Path, session: int) -> Workload:
    task_ids = [f"s{session}-task{j}" for j in range(3 + session % 2)]
    dirs = [write_adapter(folder / t, seed=100 * (session + 1) + j) for j, t in enumerate(task_ids)]
    adapters = [load_adapter(d) for d in dirs]
    full = SharedSubspace.decompose(adapters, method=METHOD)
    view = full.truncated(CompressConfig(K, METHOD))
    view.measure_against(full)
    return Workload(
        zip_tree(folder, folder.with_suffix(".zip")),
        task_ids,
        quality.task_errors(view),
        quality.stored_bytes(view),
        sum(a.num_bytes for a in adapters),
    )


def run_session(url: str, work: Workload, start: Barrier) -> SimpleNamespace:
    """Load, compress and export in a session of its own; the files come back as links (not downloaded)."""
    client = Client(url, verbose=False, download_files=False)
    start.wait(timeout=60)  # every session starts its steps together
    table, _ = client.predict(handle_file(work.archive), api_name="/load_adapters")
    *_, numbers, _ = client.predict(METHOD, K, False, 0.9, api_name="/compress")
    adapters_zip, store_zip, status = client.predict([], None, "", api_name="/export")
    return SimpleNamespace(
        client=client,
        work=work,
        table=[row[0] for row in table["data"]],
        numbers=numbers,
        files=(adapters_zip, store_zip),
        status=status,
    )


@pytest.fixture(scope="module")
def gradio_dir(tmp_path_factory):
    """A Gradio cache of this module's own (uploads and downloads land there) and a fast heartbeat, so a
    closed client's session ends within a second."""
    with pytest.MonkeyPatch.context() as env:
        folder = tmp_path_factory.mktemp("gradio_cache")
        env.setenv("GRADIO_TEMP_DIR", str(folder))
        env.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")
        yield folder


@pytest.fixture(scope="module")
def app(gradio_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    demo = launch(AppSettings(model_source="unused", session_root=root, allow_server_paths=True))
    yield SimpleNamespace(url=demo.local_url, root=root)
    demo.close()


@pytest.fixture(scope="module")
def sessions(app, tmp_path_factory):
    root = tmp_path_factory.mktemp("workloads")
    workloads = [make_workload(root / f"session{i}", i) for i in range(N_SESSIONS)]
    start = Barrier(N_SESSIONS)
    with ThreadPoolExecutor(N_SESSIONS) as pool:
        runs = [pool.submit(run_session, app.url, work, start) for work in workloads]
        done = [run.result(timeout=120) for run in runs]
    yield done
    for session in done:
        session.client.close()


def session_folder(app, session) -> Path:
    return app.root / hashlib.sha256(session.client.session_hash.encode()).hexdigest()[:16]


def download_folder(session) -> Path:
    """The one folder both of a session's links point into (``<gradio cache>/vlora-<random>/<export>``)."""
    folders = {Path(f["path"]).parent for f in session.files}
    assert len(folders) == 1
    return folders.pop().parent


def fetch(url: str) -> httpx.Response:
    return httpx.get(url, timeout=30)  # no session: the file route never asks for one


def test_each_session_gets_exactly_its_own_results(sessions):
    for s in sessions:
        ids = s.work.task_ids
        assert s.table == ids
        assert list(s.numbers["task_errors"]) == ids
        assert s.numbers["task_errors"] == pytest.approx(s.work.task_errors, abs=1e-5)
        assert min(s.numbers["task_errors"].values()) > 0.01  # k = 1 < N - 1: the numbers are the session's own
        assert (s.numbers["stored_bytes"], s.numbers["original_bytes"]) == (s.work.stored_bytes, s.work.original_bytes)
        assert f"Exported {len(ids)} tasks" in s.status and ", ".join(ids) in s.status

        adapters_zip, store_zip = (fetch(f["url"]) for f in s.files)
        assert adapters_zip.status_code == store_zip.status_code == 200
        with zipfile.ZipFile(io.BytesIO(adapters_zip.content)) as zf:
            assert sorted({name.split("/")[0] for name in zf.namelist()}) == ids
        with zipfile.ZipFile(io.BytesIO(store_zip.content)) as zf:
            (folder,) = {name.split("/")[0] for name in zf.namelist()}  # one folder, named by the setting
            manifest = json.loads(zf.read(f"{folder}/manifest.json"))
        assert folder.startswith("vlora-store-") and folder.endswith("-k1")
        assert [t["id"] for t in manifest["tasks"]] == ids
    all_errors = [e for s in sessions for e in s.numbers["task_errors"].values()]
    assert len(set(all_errors)) == len(all_errors)  # no two sessions' numbers coincide


def test_no_session_reaches_another_sessions_files(app, sessions):
    folders = [download_folder(s) for s in sessions]
    assert all(DOWNLOAD_FOLDER.fullmatch(f.name) for f in folders)
    assert len(set(folders)) == N_SESSIONS  # a random folder per session, not derived from anything shared

    for s in sessions:  # the session folders themselves are never served, whoever asks
        probe = session_folder(app, s) / "probe.txt"
        probe.write_text("private")
        assert fetch(f"{app.url}gradio_api/file={probe}").status_code == 403

    me, other = sessions[0], sessions[1]
    for path in (session_folder(app, other), download_folder(other), app.root.parent):
        with pytest.raises(AppError, match="holds the workbench's own session files") as refused:
            me.client.predict(str(path), api_name="/load_path")
        assert "Traceback" not in str(refused.value)
    table, _ = me.client.predict(["no such task"], api_name="/remove_adapters")
    assert [row[0] for row in table["data"]] == me.work.task_ids  # nothing of the other session came in


def test_ending_the_sessions_removes_their_files(app, sessions):
    """Last: closes every client. Gradio's unload event ends each session and its folders go."""
    gone = [session_folder(app, s) for s in sessions] + [download_folder(s) for s in sessions]
    assert all(folder.is_dir() for folder in gone)
    for s in sessions:
        s.client.close()
    deadline = time.monotonic() + 30
    while any(folder.exists() for folder in gone) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [folder for folder in gone if folder.exists()]
    assert not any(app.root.iterdir())
    for s in sessions:
        assert all(fetch(f["url"]).status_code in (403, 404) for f in s.files)
