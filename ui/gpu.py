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

Without the ``spaces`` package the decorator changes nothing: ``run`` runs in the app's process and finds
the basis by its key in memory. The generation itself is the workbench's (``attached``, ``_generate``).
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
from vlora_core.errors import VLoRAError
from vlora_core.records import Task
from vlora_core.subspace import SharedSubspace

from . import workbench
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


class Bases:
    """The shared bases one process holds, by key, the most recently used last (at most ``keep``)."""

    def __init__(self, keep: int = KEPT_BASES, spill_root: Path = SPILL_ROOT):
        self.keep, self.spill_root = keep, spill_root
        self._held: OrderedDict[str, tuple[SharedSubspace, str | None]] = OrderedDict()  # key -> (basis, folder)
        self._lock = threading.Lock()

    def register(self, subspace: SharedSubspace, spill: bool | None = None) -> BasisKey:
        """The key of ``subspace``'s basis, the same for the same basis objects. ``spill`` (default: on ZeroGPU)
        writes it once as a store, for worker processes that do not share this one's memory."""
        spill = on_zero_gpu() if spill is None else spill
        with self._lock:
            for key, (held, folder) in self._held.items():
                if held.bases is subspace.bases and held.method == subspace.method and (folder or not spill):
                    self._held.move_to_end(key)
                    return BasisKey(key, folder)
            key = secrets.token_hex(8)
            folder = str(subspace.save(self.spill_root / key, force=True)) if spill else None  # tasks too: a store
            self._hold(key, SharedSubspace(subspace.method, subspace.shapes, subspace.bases, {}), folder)
            return BasisKey(key, folder)

    def get(self, ref: BasisKey) -> SharedSubspace:
        """The basis (no tasks) under ``ref.key``: from memory, else read once from ``ref.folder``."""
        with self._lock:
            if ref.key in self._held:
                self._held.move_to_end(ref.key)
                return self._held[ref.key][0]
            if ref.folder is None:
                raise VLoRAError(
                    f"shared basis {ref.key} is not held by this process (pid {os.getpid()}) and was not written "
                    f"out; register it with spill=True (or set {ZERO_GPU_ENV}=true) where GPU calls run elsewhere."
                )
            store = SharedSubspace.load(ref.folder)
            basis = SharedSubspace(store.method, store.shapes, store.bases, {})
            self._hold(ref.key, basis, None)  # the writer's to remove, not a reader's
            return basis

    def _hold(self, key: str, basis: SharedSubspace, folder: str | None) -> None:
        self._held[key] = (basis, folder)
        while len(self._held) > self.keep:
            _, (_, written) = self._held.popitem(last=False)
            if written:
                shutil.rmtree(written, ignore_errors=True)


BASES = Bases()  # this process's; a worker process has its own (filled by fork, or from the written stores)


def on_zero_gpu() -> bool:
    return os.environ.get(ZERO_GPU_ENV, "").lower() in ("1", "t", "true")


# ---- the app's side: small jobs from a session's workbench -------------------------------------------------
def ab_job(bench: Workbench, tokenizer, source: str, prompt: str, choices: list[str], max_new_tokens) -> Job:
    """The A/B tab's generation as a job, checked as ``Workbench.ab_test`` checks it, before any GPU time."""
    return make_job(source, bench.ab_plan(tokenizer, prompt, choices, max_new_tokens))


def merge_job(bench: Workbench, tokenizer, source: str, prompt: str, max_new_tokens) -> Job:
    """The latest merge and each of its parts on one prompt as a job, as ``Workbench.merge_ab`` runs them."""
    return make_job(source, bench.merge_plan(tokenizer, prompt, max_new_tokens))


def make_job(source: str, plan: Plan) -> Job:
    """A job for ``plan``: its basis registered, the chosen tasks' loadings copied (a view would pickle the whole
    tensor it is cut from)."""
    choices, subspace = plan.choices, plan.subspace
    if subspace is None:
        return Job(source, None, plan.text, tuple(choices), {}, plan.max_new_tokens)
    tasks = {c: _own(subspace.tasks[c]) for c in dict.fromkeys(choices) if c in subspace.tasks}
    return Job(source, BASES.register(subspace), plan.text, tuple(choices), tasks, plan.max_new_tokens)


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
    subspace = None
    if job_.basis is not None:
        shared = BASES.get(job_.basis)
        subspace = SharedSubspace(shared.method, shared.shapes, shared.bases, job_.tasks)
    with workbench.attached(model, subspace) as serving:  # the workbench's own generation, step for step
        return [
            asdict(workbench._generate(serving, tokenizer, choice, job_.text, job_.max_new_tokens))
            for choice in job_.choices
        ]
