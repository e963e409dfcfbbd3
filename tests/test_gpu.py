"""ui/gpu.py: the A/B tab's GPU call and the behaviour checks' in ZeroGPU's shape. Each argument is small, picklable
and holds no model and no tensor but the needed tasks' loadings; run in a fresh process (tests/zerogpu/spaces.py
stands in for ZeroGPU's ``spaces``) each gives what it gives in-process; each returns plain Python values (the
checks: the core's reports, dataclasses of str, int, float and bool)."""

import dataclasses
import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer

import ui.checks
from ui import gpu
from ui.settings import AppSettings
from ui.workbench import BASE_CHOICE, Workbench
from vlora_core.base_model import get_base_model
from vlora_core.behaviour import BehaviourReport, PairBehaviour, SettingBehaviour, TaskBehaviour, check_ks
from vlora_core.config import CompressConfig
from vlora_core.errors import VLoRAError
from vlora_core.io.prompts import Prompt
from vlora_core.subspace import SharedSubspace

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "zerogpu"  # holds the stand-in spaces.py
MB = 1_000_000
PLACED = {"VLORA_DEVICE": "cpu", "VLORA_DTYPE": "fp32"}  # the app and every worker place the model alike
PROMPTS = (Prompt("hello there", answer=" general kenobi"), Prompt("the cat sat on"), Prompt("a b c", task="qa"))
SECONDS = {"check": gpu.check_seconds, "check_pair": gpu.pair_seconds, "check_export": gpu.export_check_seconds}
REPORTS = (BehaviourReport, SettingBehaviour, TaskBehaviour, PairBehaviour, CompressConfig)  # what checks return


@pytest.fixture
def bases(tmp_path, monkeypatch):
    """This test's own registry of bases (ZeroGPU's stores written under tmp_path)."""
    registry = gpu.Bases(spill_root=tmp_path / "bases")
    monkeypatch.setattr(gpu, "BASES", registry)
    return registry


@pytest.fixture
def tiny_bench(tmp_path, adapter_dirs, tiny_model_dir, monkeypatch):
    """A workbench with the four conftest adapters on the saved tiny Llama, at k = 2 of the rank basis."""
    for name, value in PLACED.items():
        monkeypatch.setenv(name, value)
    bench = Workbench(tmp_path / "session", AppSettings(model_source=str(tiny_model_dir)))
    bench.add_path(adapter_dirs[0].parent)
    bench.report(CompressConfig(2, "rank"))
    yield bench
    bench.close()


def seen_while_pickling(obj) -> tuple[int, list]:
    """(pickled bytes, every object pickle met that is not a plain container or scalar)."""
    met = []

    class Watching(pickle.Pickler):
        def reducer_override(self, o):
            met.append(o)
            return NotImplemented

    buffer = io.BytesIO()
    Watching(buffer).dump(obj)
    return buffer.getbuffer().nbytes, met


def plain(value) -> bool:
    """Only str, int, float, bool, None, and lists and dicts of them."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


# ---- (a) the call's argument: small, no model, no tensor but the chosen loadings ----------------------
@pytest.mark.parametrize("method", ["flat", "rank"])
def test_the_demo_ab_call_pickles_small_with_only_the_chosen_loadings(method, tmp_path, bases):
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_demo()
    bench.report(CompressConfig(2, method))
    task = next(iter(bench.adapters))
    choices = [f"compressed k=1: {task}", f"original: {task}"]
    job = gpu.ab_job(bench, byte_tokenizer(), "bundled", "What is the tallest mountain in the world?", choices, 64)

    size, met = seen_while_pickling(((job,), {}))  # what spaces.GPU pickles: (args, kwargs)
    assert size <= 1 * MB, size
    assert not [o for o in met if isinstance(o, (torch.nn.Module, Workbench))]
    tensors = [o for o in met if isinstance(o, torch.Tensor)]
    loadings = [t for c in choices for sides in job.tasks[c].loadings.values() for t in sides.values()]
    assert {id(t) for t in tensors} == {id(t) for t in loadings}  # nothing else: no basis, no model weights
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)  # no view of more
    full = bench.ab_subspace(choices)
    assert set(job.tasks) == set(choices) and len(full.tasks) > len(choices)  # the chosen tasks only
    assert size < sum(b.components.nbytes for sides in full.bases.values() for b in sides.values())
    bench.close()


def test_the_demo_merge_call_pickles_small(tmp_path, bases):
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_demo()
    bench.merge(None)
    job = gpu.merge_job(bench, byte_tokenizer(), "bundled", "Tell me about the sea.", 64)
    size, met = seen_while_pickling(((job,), {}))
    assert size <= 1 * MB and not [o for o in met if isinstance(o, torch.nn.Module)]
    assert job.choices == ("merge: merged", *bench.adapters) and set(job.tasks) == set(job.choices)
    bench.close()


# ---- (b) and (c): a fresh process gives the in-process answer, as plain values -------------------------
@pytest.mark.slow  # a fresh spawned process per call, as ZeroGPU runs it: seconds each
def test_the_gpu_call_in_a_fresh_process_answers_as_in_process(
    tiny_bench, tiny_model_dir, bases, tmp_path, monkeypatch
):
    monkeypatch.setenv(gpu.ZERO_GPU_ENV, "true")  # as on ZeroGPU: the basis is written out for the worker
    _, tokenizer = get_base_model(str(tiny_model_dir))
    choices = ["compressed: qa", BASE_CHOICE, "original: sentiment", "compressed k=1: qa"]
    job = gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "hello there", choices, 12)
    assert job.basis.folder and Path(job.basis.folder).is_dir()

    assert not hasattr(gpu.run, "__wrapped__")  # no spaces package here: the decorator changed nothing
    here = gpu.run(job)
    assert plain(here)  # (c)

    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    env = {**os.environ, **PLACED, "PYTHONPATH": os.pathsep.join([str(STANDIN), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", APP, str(tmp_path / "job.pkl")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])

    assert there["standin"] and there["plain"]  # decorated by the stand-in; plain values came back (c)
    [call] = there["calls"]
    assert call["pid"] not in (os.getpid(), there["app_pid"])  # a process of its own
    assert call["duration"] == gpu.gpu_seconds(job)
    keep = ("choice", "text", "new_tokens")
    assert [{k: r[k] for k in keep} for r in there["result"]] == [{k: r[k] for k in keep} for r in here]
    assert [r["choice"] for r in here] == choices and all(r["new_tokens"] > 0 for r in here)
    assert len({r["text"] for r in here}) > 1  # the choices differ, so the comparison means something


APP = """
import json, os, pickle, sys
import spaces
from ui import gpu
job = pickle.loads(open(sys.argv[1], "rb").read())
result = gpu.run(job)
print(json.dumps({"standin": gpu.GPU is spaces.GPU, "plain": all(type(v) in (str, int, float) for r in result
                  for v in r.values()), "calls": spaces.CALLS, "app_pid": os.getpid(), "result": result}))
"""


def test_the_base_model_alone_needs_no_basis(tiny_bench, tiny_model_dir, bases):
    _, tokenizer = get_base_model(str(tiny_model_dir))
    job = gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "hi", [BASE_CHOICE, BASE_CHOICE], 4)
    assert job.basis is None and job.tasks == {}
    first, second = gpu.run(job)
    assert plain([first, second]) and first["text"] == second["text"]


def test_the_gpu_call_answers_as_the_workbench(tiny_bench, tiny_model_dir, bases):
    """The same generation as ``Workbench.ab_test`` on the same model: one code path."""
    model, tokenizer = get_base_model(str(tiny_model_dir))
    choices = ["compressed: translation", "original: translation"]
    job = gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "once upon", choices, 10)
    direct = tiny_bench.ab_test(model, tokenizer, "once upon", choices, 10)
    assert [(g.choice, g.text, g.new_tokens) for g in gpu.generate(job)] == [
        (g.choice, g.text, g.new_tokens) for g in direct
    ]


def test_requests_are_checked_before_any_gpu_time(tiny_bench, tiny_model_dir, bases):
    _, tokenizer = get_base_model(str(tiny_model_dir))
    with pytest.raises(VLoRAError, match="the prompt is empty"):
        gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "  ", [BASE_CHOICE], 4)
    with pytest.raises(VLoRAError, match="unknown task 'nope'"):
        gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "hi", ["original: nope"], 4)
    with pytest.raises(VLoRAError, match="over this workbench's limit of 1,024 \\(max_prompt_tokens\\)"):
        gpu.ab_job(tiny_bench, tokenizer, str(tiny_model_dir), "x" * 1100, [BASE_CHOICE], 4)
    with pytest.raises(VLoRAError, match="nothing merged yet"):
        gpu.merge_job(tiny_bench, tokenizer, str(tiny_model_dir), "hi", 4)
    assert len(bases._held) == 0  # nothing registered for a refused request


# ---- the registry of bases ---------------------------------------------------------------------------------
def test_a_basis_is_registered_once_and_written_once(tiny_bench, bases):
    first = bases.register(tiny_bench.ab_subspace(), spill=True)
    again = bases.register(tiny_bench.ab_subspace(), spill=True)  # new subspace object, same basis objects
    assert again == first and len(list(bases.spill_root.iterdir())) == 1
    fresh = gpu.Bases(spill_root=bases.spill_root)  # another process: reads the written store once
    read = fresh.get(first)
    held = bases.get(first)
    assert read.method == held.method and read.tasks == {} and read.shapes == held.shapes
    for name, sides in held.bases.items():
        for side, basis in sides.items():
            assert torch.equal(read.bases[name][side].components, basis.components)
    assert fresh.get(first) is read and fresh._held[first.key][1] is None  # a reader never removes the store


def test_the_oldest_basis_goes_with_its_store(tiny_bench, tmp_path):
    registry = gpu.Bases(keep=2, spill_root=tmp_path / "bases")
    keys = []
    for method in ("rank", "flat"):
        tiny_bench.report(CompressConfig(1, method))
        keys.append(registry.register(tiny_bench.ab_subspace(), spill=True))
    tiny_bench.remove(["qa"])  # a new adapter set: a new basis
    tiny_bench.report(CompressConfig(1, "rank"))
    keys.append(registry.register(tiny_bench.ab_subspace(), spill=True))
    assert list(registry._held) == [k.key for k in keys[1:]]
    assert not Path(keys[0].folder).exists() and all(Path(k.folder).is_dir() for k in keys[1:])
    with pytest.raises(VLoRAError, match="not held by this process .* register it with spill=True"):
        registry.get(gpu.BasisKey(keys[0].key))


def test_the_duration_asked_grows_with_the_work_and_is_capped():
    job = gpu.Job("bundled", None, "hi", (BASE_CHOICE, BASE_CHOICE), {}, 16)
    longer = gpu.Job("bundled", None, "hi", (BASE_CHOICE, BASE_CHOICE), {}, 256)
    assert gpu.SECONDS_FIXED < gpu.gpu_seconds(job) < gpu.gpu_seconds(longer) <= gpu.SECONDS_MOST
    assert gpu.gpu_seconds(gpu.Job("bundled", None, "hi", (BASE_CHOICE,) * 9, {}, 256)) == gpu.SECONDS_MOST


# ---- the behaviour checks: the same shape --------------------------------------------------------------------
def check_jobs(bench: Workbench, source: str, prompts, method: str) -> dict:
    """GPU function name -> its job, for the k tab's check, the A/B pair line and the export check."""
    task = next(iter(bench.adapters))
    choices = [f"original: {task}", f"compressed: {task}"]
    return {
        "check": gpu.check_job(source, bench.behaviour_plan(method, prompts, 2, source)),
        "check_pair": gpu.pair_job(bench, source, "the cat sat on", choices, " the mat"),
        "check_export": gpu.export_check_job(bench, source, prompts),
    }


def loadings_of(job) -> list:
    return [t for task in job.tasks.values() for sides in task.loadings.values() for t in sides.values()]


def leaves(value) -> list:
    """Every number and string of a report, in order (nan as the string 'nan', to compare)."""
    if dataclasses.is_dataclass(value):
        return leaves(dataclasses.asdict(value))
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in [k, *leaves(v)]]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in leaves(v)]
    return ["nan" if isinstance(value, float) and math.isnan(value) else value]


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_the_demo_check_calls_pickle_small_with_only_the_loadings(method, tmp_path, bases):
    bench = Workbench(tmp_path / "session", AppSettings())
    bench.add_demo()
    bench.report(CompressConfig(2, method))
    bench.export()
    jobs = check_jobs(bench, "bundled", bench.check_prompts(), method)
    full = bench._decompositions[method].full
    for name, job in jobs.items():
        size, met = seen_while_pickling(((job,), {}))  # what spaces.GPU pickles: (args, kwargs)
        assert size <= 1 * MB, (name, size)
        assert not [o for o in met if isinstance(o, (torch.nn.Module, Workbench, SharedSubspace))], name
        tensors = [o for o in met if isinstance(o, torch.Tensor)]
        assert {id(t) for t in tensors} == {id(t) for t in loadings_of(job)}, name  # no basis, no factors, no model
        assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)  # no view of more
        for task in job.tasks.values():  # every direction of the full basis
            assert all(
                L.shape[-1] == full.bases[n][s].k for n, sides in task.loadings.items() for s, L in sides.items()
            )
    assert set(jobs["check"].tasks) == set(bench.adapters)  # the originals of every task
    assert len(jobs["check_pair"].tasks) == 2 and set(jobs["check_export"].tasks) == set(bench.exported.task_ids)
    assert Path(jobs["check_export"].adapters_zip) == bench.exported.adapters_zip
    bench.close()


@pytest.mark.slow  # a fresh spawned process per call, as ZeroGPU runs it: seconds each
def test_the_check_calls_in_a_fresh_process_answer_as_in_process(
    tiny_bench, tiny_model_dir, bases, tmp_path, monkeypatch
):
    monkeypatch.setenv(gpu.ZERO_GPU_ENV, "true")  # as on ZeroGPU: the basis is written out for the worker
    source = str(tiny_model_dir)
    tiny_bench.report(CompressConfig(1, "rank"))  # an export that loses something
    tiny_bench.export(["qa", "sentiment"])
    jobs = check_jobs(tiny_bench, source, PROMPTS, "rank")
    here = {name: getattr(gpu, name)(job) for name, job in jobs.items()}
    for name, result in here.items():  # the core's report dataclasses, no tensor
        _, met = seen_while_pickling(result)
        assert met and all(isinstance(o, REPORTS) or o in REPORTS for o in met), name  # instances or their classes
        assert plain(leaves(result)), name

    # the same numbers as the workbench's own checks in this process: one code path
    model, tokenizer = get_base_model(source)
    direct = tiny_bench.check_behaviour(model, tokenizer, "rank", PROMPTS, 2)
    assert leaves(here["check"]) == pytest.approx(leaves(direct), abs=1e-6, nan_ok=True)
    pair = tiny_bench.ab_behaviour(model, tokenizer, "the cat sat on", ["original: qa", "compressed: qa"], " the mat")
    assert leaves(here["check_pair"]) == pytest.approx(leaves(pair), abs=1e-6)
    assert leaves(here["check_export"]) == pytest.approx(
        leaves(tiny_bench.check_export(model, tokenizer, PROMPTS)), abs=1e-6
    )
    assert here["check_export"]["qa"].effect_retained < 0.999  # k = 1 loses something: the numbers mean something

    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    env = {**os.environ, **PLACED, "PYTHONPATH": os.pathsep.join([str(STANDIN), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHECKS_APP, str(tmp_path / "jobs.pkl"), str(tmp_path / "out.pkl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    there = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert there["standin"] and len({c["pid"] for c in there["calls"]}) == 3  # a fresh process per call
    assert os.getpid() not in {c["pid"] for c in there["calls"]}
    assert [c["duration"] for c in there["calls"]] == [SECONDS[name](job) for name, job in jobs.items()]
    for name, result in here.items():
        assert type(there["results"][name]) is type(result)
        assert leaves(there["results"][name]) == pytest.approx(leaves(result), abs=1e-6, nan_ok=True), name


CHECKS_APP = """
import os, pickle, sys
import spaces
from ui import gpu
jobs = pickle.loads(open(sys.argv[1], "rb").read())
results = {name: getattr(gpu, name)(job) for name, job in jobs.items()}
with open(sys.argv[2], "wb") as out:
    pickle.dump({"standin": gpu.GPU is spaces.GPU, "calls": spaces.CALLS, "results": results}, out)
"""


def test_the_app_keeps_the_results_and_the_gpu_side_the_reference(tiny_bench, tiny_model_dir, bases, monkeypatch):
    source = str(tiny_model_dir)
    monkeypatch.setattr(gpu, "REFERENCES", gpu.Kept())
    plan = tiny_bench.behaviour_plan("rank", PROMPTS, 2, source)
    k_max = tiny_bench.k_max("rank")
    assert plan.ks == tuple(check_ks(k_max)) and plan.ref is None
    tiny_bench.record_behaviour(plan, gpu.check(gpu.check_job(source, plan)))
    assert tiny_bench.behaviour_plan("rank", PROMPTS, 2, source).ks == ()  # every k measured: no GPU call

    def refuse(*args, **kwargs):
        raise AssertionError("the reference was measured again")

    new_k = next(k for k in range(1, k_max) if k not in plan.ks)
    more = tiny_bench.behaviour_plan("rank", PROMPTS, new_k, source)
    assert more.ks == (new_k,)
    monkeypatch.setattr(ui.checks, "reference", refuse)  # the GPU side still holds it
    tiny_bench.record_behaviour(more, gpu.check(gpu.check_job(source, more)))
    monkeypatch.undo()
    view = tiny_bench.behaviour_view("rank", new_k, 0.95, 0.95)
    assert view.ks == sorted({*plan.ks, new_k}) and view.current_k == new_k

    stale = tiny_bench.behaviour_plan("flat", PROMPTS, 1, source)
    report = gpu.check(gpu.check_job(source, stale))
    tiny_bench.remove(["qa"])  # the adapters changed while the GPU worked: its results are not kept
    tiny_bench.record_behaviour(stale, report)
    assert tiny_bench.behaviour_view("flat", 1, 0.95, 0.95) is None


def test_the_checks_ask_for_a_duration_that_grows_with_the_work_and_is_capped(tiny_bench, tiny_model_dir, bases):
    source = str(tiny_model_dir)
    plan = tiny_bench.behaviour_plan("rank", PROMPTS, 2, source)
    job = gpu.check_job(source, plan)
    one_k = dataclasses.replace(job, ks=job.ks[:1])
    answered = dataclasses.replace(job, prompts=tuple(dataclasses.replace(p, answer="x") for p in PROMPTS))
    assert gpu.SECONDS_FIXED < gpu.check_seconds(one_k) < gpu.check_seconds(job) <= gpu.SECONDS_MOST
    assert gpu.check_seconds(answered) < gpu.check_seconds(job)  # no answers to generate
    assert gpu.check_seconds(dataclasses.replace(job, prompts=PROMPTS * 200)) == gpu.SECONDS_MOST
    assert gpu.SECONDS_FIXED < gpu.pair_seconds(gpu.pair_job(tiny_bench, source, "hi", ["original: qa"] * 2, "x")) < 30


def test_a_check_in_this_process_shows_its_progress_and_on_zero_gpu_crosses_over(
    tiny_bench, tiny_model_dir, bases, monkeypatch
):
    """Without ZeroGPU the check runs here and its batches tick the page's progress bar; on ZeroGPU the job goes to
    the decorated function (a worker), with no callback, and gives the same report."""
    source = str(tiny_model_dir)
    monkeypatch.setattr(gpu, "REFERENCES", gpu.Kept())
    job = gpu.check_job(source, tiny_bench.behaviour_plan("rank", PROMPTS, 2, source))
    ticks = []
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    here = gpu.run_check(job, lambda done, what: ticks.append((done, what)))
    assert len(ticks) > 3 and all(0 <= done <= 1 for done, _ in ticks) and ticks[-1][0] == 1
    assert {what.split(":")[0] for _, what in ticks} >= {"original adapters", "scoring"}
    crossed = []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(gpu, "check", lambda job_: crossed.append(job_) or gpu._check(job_))
    assert gpu.run_check(job, lambda *_: pytest.fail("a callback crossed into the GPU call")) == here
    assert crossed == [job]
