"""The workbench's GPU work in the shape ZeroGPU needs: a small picklable job in, plain Python values out.

On a ZeroGPU Space, ``spaces.GPU`` runs the decorated function in a worker process forked from the app and
kept for later calls, so a worker may predate anything the app set up after it; the function's arguments
and its result are pickled across. Hence the documented pattern, followed here:

- the base model is loaded on the CPU and placed with ``.to("cuda")`` in the app's process, outside the
  decorated function (``get_base_model``; ZeroGPU moves tensors placed so onto the GPU when a worker starts).
  A worker finds it by its source, the key ``get_base_model`` keeps it under, and loads it itself if absent;
- the shared basis is registered once per process under a key (``BASES``). The job carries the key and, on
  ZeroGPU, the folder where the basis was written once, for a worker that started before it was registered;
- a job (``Job``) holds the prompt, the choices, the loadings of the chosen tasks only (own copies) and the
  generation settings: tens of kilobytes for the demo, never a model, a ``Workbench`` or the basis;
- ``run`` returns plain dicts of text, token counts and timings, never tensors.

The behaviour checks are GPU calls of the same shape: ``check`` (the k tab: the k not measured yet, on every
task of the full decomposition, whose loadings with every direction are the originals), ``check_pair`` (the
A/B pair line: A's and B's loadings) and ``check_export`` (the export against the originals: the exported
tasks' loadings, and the export's zip by its path on disk, read in the call, as a late worker reads a basis:
the written factors are megabytes). They return the core's reports, frozen dataclasses of str, int, float and
bool. The app keeps the results (``checks.BehaviourChecks``: each k measured once per basis and prompt set);
the process that runs a check keeps its reference, the originals' answers and logits, for the next k
(``REFERENCES``, the last few).

Without the ``spaces`` package the decorator changes nothing: ``run`` runs in the app's process and finds
the basis by its key in memory. The generation itself is the workbench's (``attached``, ``_generate``), the
checks the core's (``vlora_core.behaviour``), as the workbench runs them in process.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vlora_core.base_model import get_base_model
from vlora_core.behaviour import (
    BehaviourConfig,
    BehaviourReport,
    PairBehaviour,
    Progress,
    TaskBehaviour,
    compare_adapters,
    compare_pair,
)
from vlora_core.errors import VLoRAError
from vlora_core.export import folder_names
from vlora_core.io import archive
from vlora_core.io.peft_files import load_adapter
from vlora_core.io.prompts import Prompt
from vlora_core.records import Task
from vlora_core.subspace import SharedSubspace

from . import workbench
from .checks import CheckPlan
from .workbench import Generation, Plan, Workbench

try:  # ZeroGPU on a Space (imported before anything touches CUDA); elsewhere the decorator changes nothing
    from spaces import GPU
except ImportError:

    def GPU(fn=None, **_):
        return fn if fn is not None else (lambda f: f)


ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set by Spaces on ZeroGPU hardware: GPU functions run in a worker process
KEPT_BASES = 4  # shared bases a process keeps by key, the most recently used
SPILL_ROOT = Path(tempfile.gettempdir()) / "vlora-bases"  # where bases are written for workers, on ZeroGPU
SECONDS_PER_TOKEN = 0.1  # the ZeroGPU duration asked for: a floor of 10 tokens/s per choice ...
SECONDS_FIXED, SECONDS_MOST = 20, 120  # ... plus start-up (the model's move to the GPU), capped
SECONDS_PER_ROW = 0.02  # a check's: a floor speed per prompt row and pass over it (a forward or a decoded token)
KEPT_REFERENCES = 2  # behaviour references a process keeps, the most recently used


@dataclass(frozen=True)
class BasisKey:
    key: str  # the basis's key in every process that holds it
    folder: str | None = None  # the store it was written to, for a worker process without it (ZeroGPU only)


@dataclass(frozen=True)
class Job:
    """One GPU call's argument: all that ZeroGPU pickles into its worker."""

    source: str  # the base model's source, the key ``get_base_model`` keeps it under
    basis: BasisKey | None  # the registered shared basis; None: every choice is the base model
    text: str  # the prompt in the model's chat template
    choices: tuple[str, ...]  # what to generate for, in order ("base model", "compressed: qa", ...)
    tasks: dict[str, Task]  # choice -> its loadings on the basis (own copies, nothing else), where it has one
    max_new_tokens: int


@dataclass(frozen=True)
class CheckJob:
    """The k tab's behaviour check as one GPU call's argument: the k not measured yet."""

    source: str  # the base model's source
    basis: BasisKey  # the full decomposition's basis
    tasks: dict[str, Task]  # every task with every direction (own copies): the originals, and what each k cuts
    prompts: tuple[Prompt, ...]
    ks: tuple[int, ...]
    config: BehaviourConfig


@dataclass(frozen=True)
class PairJob:
    """The A/B tab's pair line as one GPU call's argument: B against A on the prompt, teacher-forced on A's answer."""

    source: str
    basis: BasisKey  # the A/B basis (the full decomposition's)
    tasks: dict[str, Task]  # A's and B's loadings (own copies); the base model has none
    a: str | None  # A's choice (None: the base model)
    b: str | None
    prompt: str
    answer: str


@dataclass(frozen=True)
class ExportCheckJob:
    """The export's check as one GPU call's argument: each exported task as written against its original."""

    source: str
    basis: BasisKey  # the full decomposition's basis
    tasks: dict[str, Task]  # the exported tasks with every direction (own copies): the originals
    adapters_zip: str  # the export's zip of PEFT folders, read in the call (the factors: MBs; the path: bytes)
    folders: dict[str, str]  # exported task -> its folder in the zip
    prompts: tuple[Prompt, ...]


class Kept:
    """Values by key, the most recently used last, at most ``keep`` of them; ``on_drop(value)`` is called for each
    one pushed out."""

    def __init__(self, keep: int = KEPT_REFERENCES, on_drop=None):
        self.keep, self.on_drop = keep, on_drop
        self._held: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self):  # the keys, least recently used first
        return iter(list(self._held))

    def __getitem__(self, key):  # a look without counting as a use
        return self._held[key]

    def get(self, key):
        with self._lock:
            if key in self._held:
                self._held.move_to_end(key)
            return self._held.get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._held[key] = value
            self._held.move_to_end(key)
            while len(self._held) > self.keep:
                _, dropped = self._held.popitem(last=False)
                if self.on_drop is not None:
                    self.on_drop(dropped)

    def find(self, wanted) -> tuple | None:
        """The first (key, value) for which ``wanted(value)`` holds, now the most recently used; None if none."""
        with self._lock:
            key = next((key for key, value in self._held.items() if wanted(value)), None)
            if key is None:
                return None
            self._held.move_to_end(key)
            return key, self._held[key]


class Bases:
    """The shared bases one process holds, by key, the most recently used last (at most ``keep``); a basis written
    out for workers (``register(spill=True)``) is removed from disk when it is pushed out."""

    def __init__(self, keep: int = KEPT_BASES, spill_root: Path = SPILL_ROOT):
        self.spill_root = spill_root
        self._held = Kept(keep, on_drop=_remove_written)  # key -> (basis, the folder it was written to or None)
        self._lock = threading.Lock()  # a look-up and the write and hold that may follow it, as one step

    def register(self, subspace: SharedSubspace, spill: bool | None = None) -> BasisKey:
        """The key of ``subspace``'s basis, the same for the same basis objects. ``spill`` (default: on ZeroGPU)
        writes it once as a store, for worker processes that do not share this one's memory."""
        spill = on_zero_gpu() if spill is None else spill

        def same(held) -> bool:
            basis, folder = held
            return basis.bases is subspace.bases and basis.method == subspace.method and bool(folder or not spill)

        with self._lock:
            found = self._held.find(same)
            if found is not None:
                key, (_, folder) = found
                return BasisKey(key, folder)
            key = secrets.token_hex(8)
            folder = str(subspace.save(self.spill_root / key, force=True)) if spill else None  # tasks too: a store
            self._held.put(key, (SharedSubspace(subspace.method, subspace.shapes, subspace.bases, {}), folder))
            return BasisKey(key, folder)

    def get(self, ref: BasisKey) -> SharedSubspace:
        """The basis (no tasks) under ``ref.key``: from memory, else read once from ``ref.folder``."""
        with self._lock:
            held = self._held.get(ref.key)
            if held is not None:
                return held[0]
            if ref.folder is None:
                raise VLoRAError(
                    f"shared basis {ref.key} is not held by this process (pid {os.getpid()}) and was not written "
                    f"out; register it with spill=True (or set {ZERO_GPU_ENV}=true) where GPU calls run elsewhere."
                )
            store = SharedSubspace.load(ref.folder)
            basis = SharedSubspace(store.method, store.shapes, store.bases, {})
            self._held.put(ref.key, (basis, None))  # the writer's to remove, not a reader's
            return basis


def _remove_written(held: tuple[SharedSubspace, str | None]) -> None:
    if held[1]:
        shutil.rmtree(held[1], ignore_errors=True)


BASES = Bases()  # this process's; a worker process has its own (filled by fork, or from the written stores)
REFERENCES = Kept()  # this process's: (source, basis key, prompts, config) -> its last references


def on_zero_gpu() -> bool:
    return os.environ.get(ZERO_GPU_ENV, "").lower() in ("1", "t", "true")


# ---- the app's side: small jobs from a session's workbench -------------------------------------------------
def ab_job(bench: Workbench, tokenizer, source: str, prompt: str, choices: list[str], max_new_tokens) -> Job:
    """The A/B tab's generation as a job, checked as ``Workbench.ab_test`` checks it, before any GPU time."""
    return make_job(source, bench.ab_plan(tokenizer, prompt, choices, max_new_tokens))


def merge_job(bench: Workbench, tokenizer, source: str, prompt: str, max_new_tokens) -> Job:
    """The latest merge and each of its parts on one prompt as a job (``Workbench.merge_plan``)."""
    return make_job(source, bench.merge_plan(tokenizer, prompt, max_new_tokens))


def make_job(source: str, plan: Plan) -> Job:
    """A job for ``plan``: its basis registered, the chosen tasks' loadings copied (a view would pickle the whole
    tensor it is cut from)."""
    choices, subspace = plan.choices, plan.subspace
    if subspace is None:
        return Job(source, None, plan.text, tuple(choices), {}, plan.max_new_tokens)
    return Job(
        source, BASES.register(subspace), plan.text, tuple(choices), _owned(subspace, choices), plan.max_new_tokens
    )


def check_job(source: str, plan: CheckPlan) -> CheckJob:
    """A behaviour check's missing k as a job (``Workbench.behaviour_plan``): every task of the full basis."""
    full = plan.full
    return CheckJob(source, BASES.register(full), _owned(full, full.task_ids), plan.prompts, plan.ks, plan.config)


def pair_job(bench: Workbench, source: str, prompt: str, choices: list[str], answer: str) -> PairJob:
    """The A/B pair line as a job, as ``Workbench.ab_behaviour`` compares it."""
    subspace, a, b = bench.pair_plan(choices)
    return PairJob(source, BASES.register(subspace), _owned(subspace, (a, b)), a, b, prompt, answer)


def export_check_job(bench: Workbench, source: str, prompts) -> ExportCheckJob:
    """The latest export's check as a job, as ``Workbench.check_export`` compares it."""
    full, exported = bench.export_plan()
    folders = folder_names(exported.task_ids)  # as ``Workbench.export`` named them in the zip
    ids = list(exported.written)
    tasks = _owned(full, ids)
    return ExportCheckJob(
        source, BASES.register(full), tasks, str(exported.adapters_zip), {t: folders[t] for t in ids}, tuple(prompts)
    )


def _owned(subspace: SharedSubspace, names) -> dict[str, Task]:
    """The named tasks of ``subspace`` (each once; names it lacks, the base model, skipped) as a job holds them."""
    return {n: _own(subspace.tasks[n]) for n in dict.fromkeys(names) if n in subspace.tasks}


def _own(task: Task) -> Task:
    """The task as a GPU call needs it: its loadings (own contiguous copies) and config, nothing else."""
    loadings = {n: {s: t.detach().clone() for s, t in sides.items()} for n, sides in task.loadings.items()}
    return replace(task, loadings=loadings, extras={}, errors={}, act_errors={}, source="")


def generate(job_: Job) -> list[Generation]:
    """Run ``job_`` where the GPU is (``run``) and give the workbench's records back."""
    return [Generation(**fields) for fields in run(job_)]


# ---- the GPU's side ------------------------------------------------------------------------------------
def gpu_seconds(job_: Job) -> int:
    """The ZeroGPU duration to ask for: start-up plus a floor speed per generated token, capped."""
    return min(SECONDS_MOST, SECONDS_FIXED + math.ceil(SECONDS_PER_TOKEN * len(job_.choices) * job_.max_new_tokens))


@GPU(duration=gpu_seconds)
def run(job_: Job) -> list[dict]:
    """Generate for each choice of ``job_`` on the base model (on the GPU when there is one): a switch is
    ``set_task``. Returns one dict per choice (``Generation``'s fields: str, int and float only)."""
    model, tokenizer = get_base_model(job_.source)  # placed at start-up; loaded here only by a worker without it
    subspace = None if job_.basis is None else _subspace(job_.basis, job_.tasks)
    with workbench.attached(model, subspace) as serving:  # the workbench's own generation, step for step
        return [
            asdict(workbench._generate(serving, tokenizer, choice, job_.text, job_.max_new_tokens))
            for choice in job_.choices
        ]


def _subspace(basis: BasisKey, tasks: dict[str, Task]) -> SharedSubspace:
    """The registered basis holding the job's tasks."""
    shared = BASES.get(basis)
    return SharedSubspace(shared.method, shared.shapes, shared.bases, tasks)


def _seconds(row_passes: int) -> int:
    """The ZeroGPU duration to ask for a check: start-up plus a floor speed per row and pass, capped."""
    return min(SECONDS_MOST, SECONDS_FIXED + math.ceil(SECONDS_PER_ROW * row_passes))


def _rows(tasks, prompts: tuple[Prompt, ...]) -> int:
    """Prompt rows of a check: each task's own prompts and the shared ones (an upper bound)."""
    return sum(1 for t in tasks for p in prompts if p.task in (None, t))


def _reference_passes(prompts: tuple[Prompt, ...], config: BehaviourConfig) -> int:
    """Passes over each row that the reference takes: the originals, the base model and, where a prompt has no
    answer, the originals' greedy answer token by token."""
    return 2 + (config.answer_tokens if any(p.answer is None for p in prompts) else 0)


def check_seconds(job_: CheckJob) -> int:
    return _seconds(_rows(job_.tasks, job_.prompts) * (len(job_.ks) + _reference_passes(job_.prompts, job_.config)))


def run_check(job_: CheckJob, progress: Progress | None = None) -> BehaviourReport:
    """``check`` where it runs: in this process when there is no ZeroGPU, with its batches ticking ``progress``
    (e.g. a gr.Progress); on ZeroGPU in a worker, where no callback can follow the pickled job."""
    return check(job_) if on_zero_gpu() else _check(job_, progress)


@GPU(duration=check_seconds)
def check(job_: CheckJob) -> BehaviourReport:
    """Every task of the job's basis at each of its k, on its prompts (``CheckPlan.run``); the reference of the
    same basis, prompts and model is reused from this process's last checks. The report holds no tensor."""
    return _check(job_)


def _check(job_: CheckJob, progress: Progress | None = None) -> BehaviourReport:
    model, tokenizer = get_base_model(job_.source)
    key = (job_.source, job_.basis.key, job_.prompts, job_.config)  # the reference's, in this process
    full = _subspace(job_.basis, job_.tasks)
    plan = CheckPlan((), full, job_.prompts, job_.ks, job_.config, REFERENCES.get(key))
    ref, report = plan.run(model, tokenizer, progress)
    REFERENCES.put(key, ref)
    return report


def pair_seconds(job_: PairJob) -> int:
    return _seconds(2)


@GPU(duration=pair_seconds)
def check_pair(job_: PairJob) -> PairBehaviour:
    """B against A on the job's prompt, teacher-forced on its answer (``compare_pair``): floats and a count."""
    model, tokenizer = get_base_model(job_.source)
    subspace = _subspace(job_.basis, job_.tasks)
    return compare_pair(model, tokenizer, subspace, job_.a, job_.b, job_.prompt, job_.answer)


def export_check_seconds(job_: ExportCheckJob) -> int:
    return _seconds(_rows(job_.folders, job_.prompts) * (1 + _reference_passes(job_.prompts, BehaviourConfig())))


@GPU(duration=export_check_seconds)
def check_export(job_: ExportCheckJob) -> dict[str, TaskBehaviour]:
    """Each exported task, read back from the export's zip, against its original (``compare_adapters``)."""
    model, tokenizer = get_base_model(job_.source)
    full = _subspace(job_.basis, job_.tasks)
    originals = {task_id: full.to_adapter(task_id) for task_id in job_.folders}
    with tempfile.TemporaryDirectory(prefix="vlora-export-check-") as scratch:
        most = max(archive.MAX_FILES, 4 * len(job_.folders))
        root = archive.extract_zip(job_.adapters_zip, Path(scratch) / "adapters", max_files=most)
        written = {task_id: load_adapter(root / folder, task_id) for task_id, folder in job_.folders.items()}
        return compare_adapters(model, tokenizer, originals, written, job_.prompts)
