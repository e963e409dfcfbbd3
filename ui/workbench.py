"""One person's workbench session in plain Python (no Gradio).

It holds the adapters they brought, one untruncated decomposition and one k sweep per basis (so a k change
costs no SVD), the current view at the chosen k, and runs exports and A/B generations. Each callback in
``ui/callbacks.py`` calls one method here; a script or the CLI can drive it the same way.

    folder/uploads/<n>/   an extracted zip or staged folder upload, removed once its adapters are read

An upload loads every good adapter in it; each refused one (damaged, over a limit, an unusable name) is listed
with its reason in the table, so a user fixes that folder, not the whole upload. The limits (``AppSettings``)
are checked before the work they bound: an adapter's from its file's header, before its tensors are read; a
prompt's before the model runs. Heavy steps (reading uploads, the first SVDs of a basis, exports) hold ``gate``,
shared by every session of an app, so that at most ``heavy_jobs`` run at once; light ones (a k change, the
table) never wait for it.
    folder/exports/<n>/   adapters/ and store/ of one export, removed once they are zipped
    downloads/<n>/        that export's two zips, the only files meant to be served; only the latest is kept

``downloads`` is ``folder/downloads`` unless given: a web UI puts it where its server hands files out, apart
from the session folder, so that serving the downloads never serves anything else. ``close`` removes both.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from vlora_core import quality
from vlora_core.adapter import AdapterSize, LoRAAdapter
from vlora_core.base_model import chat_prompt, generate_text
from vlora_core.behaviour import (
    BehaviourReport,
    PairBehaviour,
    TaskBehaviour,
    aligned,
    check_ks,
    compare_adapters,
    compare_pair,
)
from vlora_core.compress import compatibility_problems, shapes_of
from vlora_core.config import CompressConfig
from vlora_core.errors import AdapterError, TaskError, VLoRAError, short_list
from vlora_core.export import export_task, folder_names, save_checked
from vlora_core.io import archive
from vlora_core.io.peft_files import folder_task_id, load_adapter, read_adapter_size
from vlora_core.io.prompts import GENERIC_PROMPTS, Prompt, PromptError, read_prompts
from vlora_core.merge import MergeConfig, MergeResult, merge_adapters
from vlora_core.methods import METHODS
from vlora_core.model import VLoRAModel
from vlora_core.precision import default_precision, get_precision
from vlora_core.records import check_task_id
from vlora_core.subspace import SharedSubspace

from .checks import BehaviourChecks, CheckPlan
from .settings import AppSettings

ADAPTERS_ZIP = "vlora-adapters-{setting}.zip"  # the setting: "rank-k16", "flat-adaptive0.9", "...-int8" (setting_slug)
STORE_ZIP = "vlora-store-{setting}.zip"  # unpacks into one folder of the same name, which `vlora info` reads
MERGE_ZIP = "vlora-merge.zip"
MERGE_CHOICE = "merge"  # the merge's name among its parts in the merge A/B
SWEEP_EVERY_K_UP_TO = 32  # the sweep holds every k up to here (a slider move is a look-up), then k_grid's steps
BASE_CHOICE = "base model"
# A/B choices besides the base model: "<kind>: <task id>"; each kind names the subspace the task comes from.
CHOICE_KINDS = {
    "compressed": "the task rebuilt from the shared basis at the chosen k",
    "original": "the task rebuilt from every direction (no truncation): the original adapter's ΔW",
}
# ... and "compressed k=N: <task id>": the task at N directions per layer side of the same basis, whatever k
# tab 2 is set to, so that two settings of one task can be compared side by side.
AT_K_KIND = "compressed k=N"
_AT_K = re.compile(r"compressed k=([1-9][0-9]{0,5})")


@dataclass(frozen=True)
class Loaded:
    added: list[str]  # task ids, in order
    renamed: dict[str, str] = field(default_factory=dict)  # folder name -> task id given to avoid a clash
    ignored: list[str] = field(default_factory=list)  # uploaded files that are not part of a PEFT folder
    refused: dict[str, str] = field(default_factory=dict)  # folder (as in the upload) -> why it was not loaded


@dataclass(frozen=True)
class AdapterRow:
    task_id: str  # a refused folder: the id it would have had (its path in the upload if that id is taken)
    rank_min: int
    rank_max: int
    alpha: float | None
    target_modules: str
    layers: int
    num_bytes: int
    problem: str  # "" when the adapter fits with the first one; else the core's message with its fix
    refused: bool = False  # not loaded (``problem`` says why); the numbers are zeros


@dataclass(frozen=True)
class KReport:
    """Everything the k panel shows, for one setting; plot makers only reshape it."""

    config: CompressConfig
    layers: list[str]
    k_a: list[int]
    k_b: list[int]
    variance_a: list[float]  # share of variance the kept directions explain, per layer
    variance_b: list[float]
    layer_errors: list[float]  # ΔW relative error per layer over all tasks
    task_ids: list[str]
    task_errors: list[float]  # ΔW relative error per task over all layers
    curve_ks: list[int]  # the k sweep: uniform k, stored bytes, mean and worst task error
    curve_bytes: list[int]
    curve_mean_errors: list[float]
    curve_max_errors: list[float]
    stored_bytes: int  # the shared basis plus every task's loadings, in ``dtype`` (int8: with its row scales)
    basis_bytes: int  # the shared basis alone
    original_bytes: int  # the adapters as uploaded
    k_max: int  # the most directions any layer side has: the slider's useful end
    note: str | None  # where k was clipped
    dtype: str = "float32"  # the storage precision the bytes are counted in (a key of precision.PRECISIONS)
    break_even_k: int | None = None  # the largest uniform k whose store is smaller than the adapters (None: none)
    # each other basis already decomposed: method -> (ks, stored bytes in ``dtype``, mean task error), to compare
    other_curves: dict[str, tuple[list[int], list[int], list[float]]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.stored_bytes, 1)

    @property
    def mean_error(self) -> float:
        return sum(self.task_errors) / max(len(self.task_errors), 1)


@dataclass(frozen=True)
class Plan:
    """One A/B generation, checked and ready: the prompt in the chat template, the choices in order, the basis
    holding their tasks (None: the base model alone) and the tokens to generate. Run here (``run``) or as a
    GPU job (``ui/gpu.py``)."""

    text: str
    choices: list[str]
    subspace: SharedSubspace | None
    max_new_tokens: int

    def run(self, base_model, tokenizer) -> list[Generation]:
        with attached(base_model, self.subspace) as model:  # one VLoRAModel: a switch is ``set_task``
            return [_generate(model, tokenizer, c, self.text, self.max_new_tokens) for c in self.choices]


@dataclass(frozen=True)
class Exported:
    adapters_zip: Path  # standard PEFT folders, one per task
    store_zip: Path  # the vlora store of every task
    task_ids: list[str]
    config: CompressConfig
    written: dict[str, LoRAAdapter] = field(default_factory=dict)  # each folder as read back (its behaviour check)
    dtype: str = "float32"  # the store's precision

    @property
    def zips(self) -> tuple[Path, Path]:
        return self.adapters_zip, self.store_zip


@dataclass(frozen=True)
class Merged:
    zip_path: Path  # the merged adapter as a PEFT folder, zipped
    result: MergeResult  # the adapter, and its exact ΔW error against the uncut merge
    task_ids: list[str]  # the parts, in order
    weights: list[float]

    @property
    def name(self) -> str:
        return self.result.adapter.name


@dataclass(frozen=True)
class Generation:
    choice: str
    text: str
    new_tokens: int  # tokens generated
    switch_ms: float  # time to make ``choice`` the active task
    seconds: float  # generation time

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Decomposition:
    full: SharedSubspace  # every direction: any k is a truncation of it
    shell: SharedSubspace  # the same bases without tasks: truncating it gives k and variance per side at no cost
    sweep: quality.KSweep
    curve_mean: list[float]  # mean and worst task error per swept k
    curve_max: list[float]
    original_bytes: int
    reports: dict[str, dict[int, KReport]] = field(default_factory=dict)  # dtype -> the report at every swept k
    sizes: dict[str, tuple[list[int], int | None]] = field(default_factory=dict)  # dtype -> (swept bytes, break-even)

    def sized(self, dtype: str) -> tuple[list[int], int | None]:
        """The stored bytes at each swept k in ``dtype``, and the break-even k (``quality.break_even_k``)."""
        if dtype not in self.sizes:
            swept = [sum(quality.cut_bytes(self.full, k, dtype)) for k in self.sweep.ks]
            self.sizes[dtype] = swept, quality.break_even_k(self.full, self.original_bytes, dtype)
        return self.sizes[dtype]


class Workbench:
    """One person's session: the adapters they brought, a decomposition and k sweep per basis, the current k."""

    def __init__(
        self,
        folder: str | Path,
        settings: AppSettings = AppSettings(),
        downloads: str | Path | None = None,
        gate: threading.Semaphore | None = None,
    ):
        self.folder = Path(folder)
        self.downloads = Path(downloads) if downloads else self.folder / "downloads"  # export zips, see above
        self.settings = settings  # limits per upload and session, where the demo adapters are
        self.gate: AbstractContextManager = gate or nullcontext()  # held by heavy steps (shared by an app's sessions)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.refused: dict[str, str] = {}  # folders not loaded (as named in their upload) -> why
        self.config: CompressConfig | None = None  # the current setting (None before the first report)
        self.dtype = "float32"  # ... and the precision its store is written in
        self.last_k: dict[str, int] = {}  # method -> the uniform k last set on that basis (restored on switching back)
        self._view: SharedSubspace | None = None  # the subspace at that setting, see ``view``
        self._decompositions: dict[str, _Decomposition] = {}  # method -> full decomposition and sweep
        self._measured = False  # the view's per-task quality is filled in
        self._counter = 0
        self.merged: Merged | None = None  # the latest merge, for its A/B against its parts
        self.exported: Exported | None = None  # the latest export (its zips live until the next one)
        self.checks = BehaviourChecks()  # behaviour per basis and prompt set, measured once (cleared with the adapters)
        self._downloads: dict[str, Path] = {}  # kind ("export", "merge") -> the folder of its latest zips

    # ---- bringing adapters ------------------------------------------------------------------------
    def add_archive(self, zip_path: str | Path, label: str | None = None) -> Loaded:
        """Adapters from an uploaded zip; an adapter at the zip's top level is named after the zip."""
        label = label or Path(zip_path).name
        with self.gate, self._scratch("uploads") as root:
            folder = root / (Path(label).stem or "adapter")
            archive.extract_zip(
                zip_path, folder, max_files=self.settings.max_files, max_total_bytes=self.settings.max_total_bytes
            )
            return self._add_folders(archive.adapter_folders(folder), root, label)

    def add_files(self, files: list[str | Path], task_id: str) -> Loaded:
        """One adapter from a folder upload (a flat list of files); ``task_id`` names it."""
        with self.gate, self._scratch("uploads") as root:
            folder, ignored = archive.stage_files(files, root / "adapter")
            loaded = self._add_folders([folder], root, "folder upload", names=[task_id.strip() or "adapter"])
        return Loaded(loaded.added, loaded.renamed, ignored, loaded.refused)

    def add_path(self, path: str | Path) -> Loaded:
        """Adapters from a folder on the server: an adapter folder or a folder of them."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise VLoRAError(f"{path}: no such folder on the server; give a PEFT adapter folder or a folder of them.")
        with self.gate:
            return self._add_folders(archive.adapter_folders(root), root.parent, str(root))

    def add_demo(self) -> Loaded:
        demo = self.settings.demo_adapters
        if demo is None or not demo.is_dir():
            raise VLoRAError(
                f"{demo}: the demo adapters are missing; make them with "
                "`python assets/make_demo_adapters.py`, or upload your own."
            )
        with self.gate:
            return self._add_folders(archive.adapter_folders(demo), demo, "demo adapters")

    def remove(self, task_ids: list[str] | None = None) -> list[str]:
        """Drop these tasks, and refused entries of these names; None: everything. Returns what went."""
        task_ids = list(self.adapters) + list(self.refused) if task_ids is None else task_ids
        removed = [t for t in task_ids if self.adapters.pop(t, None) is not None]
        dropped = [t for t in task_ids if self.refused.pop(t, None) is not None]
        if removed:
            self._forget()
        return removed + dropped

    def groups(self) -> list[list[str]]:
        """The loaded tasks in groups that can share a subspace (same layers, shapes and ranks), the largest
        first (on a tie, the one holding the first adapter)."""
        found: dict[tuple, list[str]] = {}
        for task_id, adapter in self.adapters.items():
            found.setdefault(tuple(sorted(shapes_of(adapter).items())), []).append(task_id)
        return sorted(found.values(), key=len, reverse=True)

    def table(self) -> list[AdapterRow]:
        """A row per adapter, its problem told against the largest group that fits together (``groups``), then
        a row per refused folder."""
        adapters = list(self.adapters.values())
        if adapters:  # the reference first: the largest group's first adapter
            reference = self.adapters[self.groups()[0][0]]
            adapters = [reference] + [a for a in adapters if a is not reference]
        problems = compatibility_problems(adapters)
        rows = [_row(task_id, a, problems.get(a.describe(), "")) for task_id, a in self.adapters.items()]
        return rows + [AdapterRow(name, 0, 0, None, "", 0, 0, why, refused=True) for name, why in self.refused.items()]

    def _add_folders(self, folders: list[Path], root: Path, label: str, names: list[str] | None = None) -> Loaded:
        """Load every good adapter among ``folders``; refuse each bad one alone, with its reason (kept in
        ``refused`` for the table). If none loads, that is the error."""
        if not folders:
            raise archive.ArchiveError(
                f"{label}: holds no PEFT adapter folder (a folder with adapter_config.json "
                "and adapter_model.safetensors); upload a zip of adapter folders."
            )
        added, renamed, refused, errors = [], {}, {}, []
        for i, folder in enumerate(tqdm(folders, desc="reading adapters", leave=False)):
            name = names[i] if names else folder_task_id(folder)
            shown = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
            try:
                task_id, adapter = self._admit(folder, root, shown, name, label)
            except VLoRAError as error:  # listed under the id it would have had (its path if that is taken)
                refused[shown if name in refused or name in self.adapters else name] = str(error)
                errors.append(error)
                continue
            adapter.source = task_id  # compatibility messages name adapters as the table does
            self.adapters[task_id] = adapter
            for key in (name, shown, task_id):  # loading a fixed folder clears its refusal
                self.refused.pop(key, None)
            added.append(task_id)
            if task_id != name:
                renamed[name] = task_id
        if not added:
            if len(errors) == 1:
                raise errors[0]
            reasons = short_list([str(e) for e in errors], limit=3, sep="; ")
            raise AdapterError(f"{label}: none of its {len(errors)} adapters could be loaded: {reasons}")
        self.refused.update(refused)
        self._forget()
        return Loaded(added, renamed, refused=refused)

    def _admit(self, folder: Path, root: Path, shown: str, name: str, label: str) -> tuple[str, LoRAAdapter]:
        """One folder's task id and adapter, within the session's limits: the cheap checks first, the caps from
        the weights file's header, then the read. A failure names the folder as in the upload, not its server path."""
        limit = self.settings.max_adapters
        if len(self.adapters) >= limit:
            raise VLoRAError(
                f"{shown}: this session already holds {limit} adapters, the limit (max_adapters); remove some first."
            )
        task_id = self._free_id(name, label)
        try:
            self._check_size(read_adapter_size(folder), shown)
            return task_id, load_adapter(folder)
        except VLoRAError as error:
            raise type(error)(str(error).replace(f"{root}/", "")) from None

    def _check_size(self, size: AdapterSize, shown: str) -> None:
        """Refuse an adapter over this workbench's caps (AppSettings), from its header alone."""
        s, held = self.settings, sum(a.num_parameters for a in self.adapters.values())
        elsewhere = "compress it with the `vlora` command on your own machine instead"
        over = [
            (size.max_rank > s.max_rank, f"rank {size.max_rank:,} is over the limit of {s.max_rank:,} (max_rank)"),
            (size.layers > s.max_layers, f"{size.layers:,} layers are over the limit of {s.max_layers:,} (max_layers)"),
            (
                size.parameters > s.max_adapter_parameters,
                f"{size.parameters:,} numbers are over the limit of {s.max_adapter_parameters:,} per adapter "
                "(max_adapter_parameters)",
            ),
        ]
        for bad, problem in over:
            if bad:
                raise AdapterError(f"{shown}: {problem}; {elsewhere}.")
        if held + size.parameters > s.max_session_parameters:
            raise AdapterError(
                f"{shown}: its {size.parameters:,} numbers would take this session past its limit of "
                f"{s.max_session_parameters:,} (max_session_parameters; it holds {held:,}); remove adapters first."
            )

    def _free_id(self, name: str, label: str) -> str:
        """A task id for ``name``, numbered where taken; an unusable one is this folder's refusal."""
        task_id, n = name, 1
        while task_id in self.adapters:
            n += 1
            task_id = f"{name}-{n}"
        try:
            return check_task_id(task_id)
        except TaskError as error:
            raise TaskError(f"{label}: {error}") from None

    def _forget(self) -> None:
        self._decompositions.clear()
        self.checks.clear()
        self._view = self.config = None
        self._measured = False

    # ---- tuning k ---------------------------------------------------------------------------------
    def report(self, config: CompressConfig, progress: bool = False, dtype: str = "float32") -> KReport:
        """Everything about the setting ``config`` stored in ``dtype`` ("fp32", "bf16", "fp16", "int8"), which
        becomes the current one. SVDs run once per basis; after that a uniform k the sweep holds is a look-up (the
        view itself is cut only when an export or an A/B test needs it). The ΔW errors are the cut's; the store's
        rounding to ``dtype`` is measured when it is written (``export``)."""
        dtype = get_precision(dtype).name
        report, view = self._report(config, progress, dtype)
        exact = dtype == "float32"  # else the view is cut and rounded when it is needed (``view``)
        self._view, self.config, self.dtype = view if exact else None, config, dtype
        self._measured = exact and view is not None
        if not config.adaptive_k:
            self.last_k[config.method] = config.num_components
        return report

    def sweep_reports(self, method: str, dtype: str = "float32") -> dict[int, KReport]:
        """The report at every uniform k the sweep holds (look-ups, no view is cut), for a page to show any of
        them at once; computed once per basis and dtype. The current setting stays as it is."""
        found, dtype = self._decomposition(method, progress=False), get_precision(dtype).name
        if dtype not in found.reports:
            found.reports[dtype] = {k: self._report(CompressConfig(k, method), dtype=dtype)[0] for k in found.sweep.ks}
        return found.reports[dtype]

    def _report(
        self, config: CompressConfig, progress: bool = False, dtype: str = "float32"
    ) -> tuple[KReport, SharedSubspace | None]:
        found = self._decomposition(config.method, progress)
        outline = found.shell.truncated(config)  # per-side k (uniform or adaptive), variance, clipping
        reports, sweep, k = quality.layer_reports(outline), found.sweep, config.num_components
        curve_bytes, break_even = found.sized(dtype)
        basis_bytes, loadings_bytes = quality.cut_bytes(found.full, outline.layer_ks, dtype)
        if not config.adaptive_k and min(k, sweep.ks[-1]) in sweep.ks:
            view = None
            task_errors, layer_errors = sweep.task_errors(k).tolist(), sweep.layer_errors(k).tolist()
        else:  # adaptive k, or a k between swept points: cut and measure this view (no SVD, but every layer)
            with self.gate:
                view = found.full.truncated(config)
                view.measure_against(found.full)
            task_errors = list(quality.task_errors(view).values())
            layer_errors = [r.error for r in quality.layer_reports(view)]
        others = {
            method: (d.sweep.ks, d.sized(dtype)[0], d.curve_mean)
            for method, d in self._decompositions.items()
            if method != config.method
        }
        report = KReport(
            config=config,
            layers=[r.layer for r in reports],
            k_a=[r.k_a for r in reports],
            k_b=[r.k_b for r in reports],
            variance_a=[r.variance_a for r in reports],
            variance_b=[r.variance_b for r in reports],
            layer_errors=layer_errors,
            task_ids=found.full.task_ids,
            task_errors=task_errors,
            curve_ks=sweep.ks,
            curve_bytes=curve_bytes,
            curve_mean_errors=found.curve_mean,
            curve_max_errors=found.curve_max,
            stored_bytes=basis_bytes + loadings_bytes,
            basis_bytes=basis_bytes,
            original_bytes=found.original_bytes,
            k_max=sweep.ks[-1],
            note=outline.clipping_note(),
            dtype=dtype,
            break_even_k=break_even,
            other_curves=others,
        )
        return report, view

    def current_report(self) -> KReport:
        """The report of the current setting (the default one before any), without changing anything."""
        return self._report(self.config or CompressConfig(), dtype=self.dtype)[0]

    @property
    def view(self) -> SharedSubspace | None:
        """The subspace at the current setting (None before any); cut from the full decomposition on first use."""
        if self._view is None and self.config is not None:
            view = self._decompositions[self.config.method].full.truncated(self.config)
            if self.dtype != "float32":
                view.set_dtype(self.dtype)  # new tensors: the full decomposition is left as it was
            self._view = view
        return self._view

    def k_max(self, method: str) -> int:
        """The most directions any layer side of this basis has (k above it changes nothing)."""
        return self._decomposition(method, progress=False).sweep.ks[-1]

    def _decomposition(self, method: str, progress: bool) -> _Decomposition:
        if method not in self._decompositions:
            if not self.adapters:
                raise VLoRAError(
                    "no adapters loaded yet; upload a zip of adapter folders, or load the demo adapters, first."
                )
            with self.gate:  # the heavy step: SVDs and the k sweep, once per basis
                self._decompositions[method] = self._decompose(method, progress)
        return self._decompositions[method]

    def _decompose(self, method: str, progress: bool) -> _Decomposition:
        """Every direction of this basis, and its k sweep."""
        full = SharedSubspace.decompose(
            list(self.adapters.values()), list(self.adapters), method=method, progress=progress
        )
        k_max = max(b.k for sides in full.bases.values() for b in sides.values())
        ks = sorted(set(range(1, min(k_max, SWEEP_EVERY_K_UP_TO) + 1)) | set(quality.k_grid(k_max)))
        sweep = quality.sweep_ks(full, ks, progress=_bar("k sweep") if progress else None)
        errors = [sweep.task_errors(k) for k in sweep.ks]
        return _Decomposition(
            full,
            SharedSubspace(full.method, full.shapes, full.bases, {}),  # the shell: bases without tasks
            sweep,
            [e.mean().item() for e in errors],
            [e.max().item() for e in errors],
            sum(a.num_bytes for a in self.adapters.values()),
        )

    # ---- exporting --------------------------------------------------------------------------------
    def export(
        self, task_ids: list[str] | None = None, *, alpha: float | None = None, base_model: str | None = None
    ) -> Exported:
        """The chosen tasks (default all; each once, however often it is named) at the current k as PEFT
        folders, plus the store, each zipped."""
        view = self._current_view()
        ids = list(dict.fromkeys(task_ids or view.task_ids))
        for task_id in ids:
            view.task(task_id)  # unknown ids fail before anything is written
        with self.gate:
            return self._export(view, ids, alpha, base_model)

    def _export(self, view: SharedSubspace, ids: list[str], alpha: float | None, base_model: str | None) -> Exported:
        if not self._measured:
            view.measure_against(self._decompositions[view.method].full)  # the store records each task's error
            self._measured = True
        zips = self._new_folder(self.downloads)
        try:
            with self._scratch("exports") as out:
                names, written = folder_names(ids), {}
                for task_id in tqdm(ids, desc="exporting", leave=False):
                    folder = out / "adapters" / names[task_id]
                    export_task(view, task_id, folder, alpha=alpha, base_model=base_model)
                    written[task_id] = load_adapter(folder, task_id)
                view.save(out / "store")
                adapters_name, store_name = export_names(self.config, self.dtype)
                adapters_zip = archive.make_zip(out / "adapters", zips / adapters_name)
                store_zip = archive.make_zip(out / "store", zips / store_name, root_name=store_folder(store_name))
        except BaseException:
            shutil.rmtree(zips, ignore_errors=True)
            raise
        self._replace_download("export", zips)
        self.exported = Exported(adapters_zip, store_zip, ids, self.config, written, self.dtype)
        return self.exported

    # ---- where to start: the basis and the precision -------------------------------------------------
    def default_dtype(self) -> str:
        """The storage precision the CLI picks for these adapters when none is asked (bf16 when every one is bf16
        or fp16, else fp32: ``precision.default_precision``)."""
        return default_precision([a.dtype for a in self.adapters.values()])

    def preferred_method(self) -> tuple[str, str]:
        """The basis that measures better on these adapters, and why in words: decomposes every basis (once each)
        and compares their mean task ΔW error at equal stored bytes (``compare_curves``); a tie keeps the
        default. The CLI keeps the spec's default (flat)."""
        curves = {}
        for method in METHODS:
            found = self._decomposition(method, progress=False)
            curves[method] = (found.sized("float32")[0], found.curve_mean)
        original = next(iter(self._decompositions.values())).original_bytes
        return compare_curves(curves, original)

    def _replace_download(self, kind: str, folder: Path) -> None:
        """Keep only the latest zips of each kind: an export and a merge do not remove each other's."""
        old = self._downloads.get(kind)
        self._downloads[kind] = folder
        if old is not None and old != folder:
            shutil.rmtree(old, ignore_errors=True)

    def _current_view(self) -> SharedSubspace:
        if self.view is None:
            self.report(CompressConfig())
        return self.view

    # ---- merging ----------------------------------------------------------------------------------
    def merge(
        self,
        task_ids: list[str] | None,
        weights: list[float] | None = None,
        config: MergeConfig = MergeConfig(),
        name: str = "merged",
    ) -> Merged:
        """Merge loaded adapters (default all; their original ΔW, not the compressed one) on ΔW with the core's
        ``merge_adapters`` (what ``vlora merge`` runs), write the result as a PEFT folder (read back and checked)
        and zip it for download."""
        ids = list(dict.fromkeys(task_ids or self.adapters))
        unknown = [t for t in ids if t not in self.adapters]
        if unknown:
            raise TaskError(f"unknown task {unknown[0]!r}; loaded tasks: {short_list(list(self.adapters))}.")
        name = check_task_id((name or "").strip() or "merged")
        with self.gate:
            result = merge_adapters([self.adapters[t] for t in ids], weights, config=config, name=name)
            zips = self._new_folder(self.downloads)
            try:
                with self._scratch("exports") as out:
                    save_checked(result.adapter, out / "merge" / folder_names([name])[name])
                    zip_path = archive.make_zip(out / "merge", zips / MERGE_ZIP)
            except BaseException:
                shutil.rmtree(zips, ignore_errors=True)
                raise
        self._replace_download("merge", zips)
        self.merged = Merged(zip_path, result, ids, list(weights) if weights else [1.0] * len(ids))
        return self.merged

    def merge_plan(self, tokenizer, prompt: str, max_new_tokens: int) -> Plan:
        """The latest merge and each of its parts on one prompt, checked: one generation each, the merge first, all
        held on one basis (padded to one rank per layer: exact ΔW). ``ui/gpu.py``'s merge job runs it."""
        if self.merged is None:
            raise VLoRAError("nothing merged yet; pick tasks and weights and press Merge first.")
        max_new_tokens = self.check_request(prompt, max_new_tokens)
        parts = [t for t in self.merged.task_ids if t in self.adapters]
        choices = [f"{MERGE_CHOICE}: {self.merged.name}", *parts]
        adapters = [self.merged.result.adapter, *(self.adapters[t] for t in parts)]
        with self.gate:
            subspace = SharedSubspace.decompose(aligned(adapters), choices)
        return Plan(chat_prompt(tokenizer, prompt), choices, subspace, max_new_tokens)

    # ---- A/B testing ------------------------------------------------------------------------------
    def choices(self) -> list[str]:
        """The A/B choices: the base model, then each task at the current setting, at a ladder of k (1, 2, 4, ...
        up to the basis's most, once it is decomposed), and original. Any other k can be typed."""
        ladder = [k for k in (1, 2, 4, 8, 16, 32, 64) if k < self._ladder_top()] + [self._ladder_top()]
        kinds = ["compressed", *(f"compressed k={k}" for k in ladder), "original"]
        return [BASE_CHOICE] + [f"{kind}: {t}" for t in self.adapters for kind in kinds]

    def _ladder_top(self) -> int:
        found = self._decompositions.get(self.config.method if self.config else "")
        return found.sweep.ks[-1] if found else 16

    def example_prompts(self) -> list[tuple[str | None, str]]:
        """(task, prompt) examples for the A/B panel: the loaded tasks' own prompts from the demo's prompt file,
        in task order, then the shared ones (task None)."""
        prompts = prompt_file(self.settings.demo_prompts)
        own = [(t, p.text) for t in self.adapters for p in prompts if p.task == t]
        return own + [(None, p.text) for p in prompts if p.task is None]

    def check_request(self, prompt: str, max_new_tokens: object) -> int:
        """An A/B request within this workbench's caps, checked before any model work: the new-token count."""
        s = self.settings
        if not (prompt or "").strip():
            raise VLoRAError("the prompt is empty; type a question or pick an example.")
        if len(prompt) > s.max_prompt_chars:
            raise VLoRAError(
                f"the prompt has {len(prompt):,} characters, over this workbench's limit of {s.max_prompt_chars:,} "
                "(max_prompt_chars); shorten it."
            )
        n = int(max_new_tokens) if isinstance(max_new_tokens, float) and max_new_tokens.is_integer() else max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= s.max_new_tokens:
            raise VLoRAError(
                f"new tokens must be a whole number from 1 to {s.max_new_tokens} (max_new_tokens), got {n!r}."
            )
        return n

    def ab_test(self, base_model, tokenizer, prompt: str, choices: list[str], max_new_tokens: int) -> list[Generation]:
        """Generate for each choice with one VLoRAModel on the shared base model: a switch is ``set_task``."""
        return self.ab_plan(tokenizer, prompt, choices, max_new_tokens).run(base_model, tokenizer)

    def ab_plan(self, tokenizer, prompt: str, choices: list[str], max_new_tokens: int) -> Plan:
        """What ``ab_test`` generates, every choice and limit checked before anything runs."""
        max_new_tokens = self.check_request(prompt, max_new_tokens)
        tasks = [parse_choice(choice, list(self.adapters)) for choice in choices]
        text = chat_prompt(tokenizer, prompt)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens > self.settings.max_prompt_tokens:
            raise VLoRAError(
                f"the prompt is {tokens:,} tokens with the chat template, over this workbench's limit of "
                f"{self.settings.max_prompt_tokens:,} (max_prompt_tokens); shorten it."
            )
        subspace = self.ab_subspace(choices) if any(task_id for _, task_id in tasks) else None
        return Plan(text, choices, subspace, max_new_tokens)

    def ab_subspace(self, choices: list[str] = ()) -> SharedSubspace:
        """Every task twice on the full basis, under its choice name: 'original: id' with all its loadings,
        'compressed: id' with the view's loadings and zeros past the view's k — the same ΔW as the view; and
        each 'compressed k=N: id' among ``choices`` cut at N directions of the same basis, padded the same way."""
        view = self._current_view()
        full = self._decompositions[view.method].full
        tasks = {}
        for task_id, task in full.tasks.items():
            for kind, chosen in (("compressed", view.tasks[task_id].padded(full.layer_ks)), ("original", task)):
                tasks[f"{kind}: {task_id}"] = replace(chosen, id=f"{kind}: {task_id}")
        cuts: dict[int, SharedSubspace] = {}
        for choice in choices:
            kind, _, task_id = choice.partition(": ")
            if _AT_K.fullmatch(kind) and task_id in full.tasks:
                k = int(_AT_K.fullmatch(kind).group(1))
                cut = cuts.setdefault(k, full.truncated(CompressConfig(k, view.method)))
                tasks[choice] = replace(cut.tasks[task_id].padded(full.layer_ks), id=choice)
        return SharedSubspace(full.method, full.shapes, full.bases, tasks)

    # ---- behaviour: what each task still does, on prompts ---------------------------------------------
    def check_prompts(self) -> tuple[Prompt, ...]:
        """The prompts a behaviour check uses when none are given: the demo's prompt file (JSON lines) when it
        names a loaded task (its shared prompts and the loaded tasks' own), else the built-in generic set."""
        path = self.settings.demo_prompts
        demo = read_prompts(path) if path is not None and path.suffix == ".jsonl" and path.is_file() else ()
        if any(p.task in self.adapters for p in demo):
            return tuple(p for p in demo if p.task is None or p.task in self.adapters)
        return GENERIC_PROMPTS

    def check_behaviour(
        self, base_model, tokenizer, method: str, prompts, k: int | None = None, progress=None
    ) -> BehaviourReport:
        """Every task at each k of ``check_ks`` (and ``k``) of this basis on ``prompts``, against its original and
        the base model, in this process; the reference and each k run once per basis and prompt set (``checks``)."""
        plan = self.behaviour_plan(method, prompts, k, id(base_model), progress=progress is not None)
        return self.checks.run(plan, base_model, tokenizer, progress)

    def behaviour_plan(self, method: str, prompts, k: int | None, model: object, progress: bool = False) -> CheckPlan:
        """What ``check_behaviour`` still measures (only the k not measured yet for this basis, base model and
        prompt set), to run here or as a GPU call (``ui/gpu.py``); ``model`` names the base model."""
        full = self._decomposition(method, progress=progress).full
        k_max = self.k_max(method)
        ks = sorted(set(check_ks(k_max)) | ({min(k, k_max)} if k else set()))
        return self.checks.plan(full, model, prompts, ks)

    def record_behaviour(self, plan: CheckPlan, report: BehaviourReport | None) -> None:
        """Keep what ``plan`` measured elsewhere (a GPU call), unless the adapters changed meanwhile."""
        found = self._decompositions.get(plan.full.method)
        if found is not None and found.full is plan.full:
            self.checks.record(plan, report)

    def behaviour_view(self, method: str, k: int | None, min_effect: float, min_agreement: float):
        """The latest check of this basis at these thresholds, marking ``k`` (None: adaptive); None before one.
        A look-up: it never decomposes (a check implies the basis is decomposed)."""
        found = self._decompositions.get(method)
        k = None if k is None or found is None else min(k, found.sweep.ks[-1])
        return self.checks.view(method, k, min_effect, min_agreement)

    def ab_behaviour(self, base_model, tokenizer, prompt: str, choices: list[str], answer: str) -> PairBehaviour:
        """B against A on the A/B prompt, teacher-forced on ``answer`` (A's output): KL(A ‖ B), top-1 agreement."""
        subspace, a, b = self.pair_plan(choices)
        return compare_pair(base_model, tokenizer, subspace, a, b, prompt, answer)

    def pair_plan(self, choices: list[str]) -> tuple[SharedSubspace, str | None, str | None]:
        """What ``ab_behaviour`` compares: the A/B basis holding both choices, and A's and B's task there (None:
        the base model)."""
        tasks = [parse_choice(choice, list(self.adapters))[1] for choice in choices]
        a, b = (None if task is None else choice for choice, task in zip(choices, tasks))
        return self.ab_subspace(choices), a, b

    def check_export(self, base_model, tokenizer, prompts) -> dict[str, TaskBehaviour]:
        """Each task of the latest export, as read back from its folder, against its original adapter (every
        direction of the decomposition), each on its own prompts or else the shared ones (``compare_adapters``)."""
        full, exported = self.export_plan()
        originals = {task_id: full.to_adapter(task_id) for task_id in exported.written}
        return compare_adapters(base_model, tokenizer, originals, exported.written, prompts)

    def export_plan(self) -> tuple[SharedSubspace, Exported]:
        """What ``check_export`` compares: the full decomposition (its tasks are the originals) and the export."""
        if self.exported is None or not self.exported.written:
            raise VLoRAError("nothing exported yet in this session; export first, then check it.")
        return self._decomposition(self.exported.config.method, progress=False).full, self.exported

    # ---- the session's end ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the session folder and the downloads, drop everything held (the shared base model stays)."""
        self.adapters.clear()
        self._forget()
        for folder in (self.folder, self.downloads):
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def _scratch(self, kind: str):
        """A fresh folder for one upload or export, removed when the step ends: what it read lives in memory,
        what it wrote is zipped."""
        folder = self._new_folder(self.folder / kind)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _new_folder(self, parent: Path) -> Path:
        self._counter += 1
        folder = parent / str(self._counter)
        folder.mkdir(parents=True)
        return folder


def setting_slug(config: CompressConfig | None, dtype: str = "float32") -> str:
    """A setting in a file name: 'rank-k16', 'flat-adaptive0.9', with '-int8' (the flag) when not stored in fp32."""
    config = config or CompressConfig()
    k = f"adaptive{config.variance_threshold:g}" if config.adaptive_k else f"k{config.num_components}"
    flag = get_precision(dtype).flag
    return f"{config.method}-{k}" + ("" if flag == "fp32" else f"-{flag}")


def export_names(config: CompressConfig | None, dtype: str = "float32") -> tuple[str, str]:
    """The zips an export at this setting writes: (PEFT adapters, store)."""
    setting = setting_slug(config, dtype)
    return ADAPTERS_ZIP.format(setting=setting), STORE_ZIP.format(setting=setting)


def store_folder(store_zip: str | Path) -> str:
    """The one folder a store zip unpacks into: its own name, so `unzip X.zip && vlora info X` reads it."""
    return Path(store_zip).name.removesuffix(".zip")


def compare_curves(curves: dict[str, tuple[list[int], list[float]]], original_bytes: int) -> tuple[str, str]:
    """Which basis holds the adapters better, from each one's k sweep (stored bytes, mean task ΔW error): at every
    byte budget some sweep reaches without passing ``original_bytes`` (past it a store is not worth having), each
    basis's best mean error within that budget (1: nothing fits, nothing kept), averaged over the budgets; the
    lower average wins. A tie (within 1e-9) keeps the default basis. Returns (method, why in words)."""
    budgets = sorted({b for sizes, _ in curves.values() for b in sizes if b < original_bytes})
    if not budgets:  # no basis is smaller than the adapters at any k: compare at the smallest store each has
        budgets = [max(min(sizes) for sizes, _ in curves.values())]

    def best_within(method: str, budget: int) -> float:
        sizes, errors = curves[method]
        return min([e for b, e in zip(sizes, errors) if b <= budget], default=1.0)

    means = {m: sum(best_within(m, b) for b in budgets) / len(budgets) for m in curves}
    order = sorted(means, key=lambda m: (round(means[m], 9), m != CompressConfig().method))
    best, other = order[0], order[1:]
    if not other:
        return best, f"{best} basis, the only one"
    against = ", ".join(f"{m}'s {means[m]:.1%}" for m in other)
    if round(means[best], 9) == round(means[other[0]], 9):
        return best, f"{best} basis (the default): the bases measure the same here (mean ΔW error {means[best]:.1%})"
    return best, (
        f"{best} basis: mean ΔW error {means[best]:.1%} against {against} at equal stored bytes, over "
        f"{len(budgets)} budgets up to the adapters' own size"
    )


def parse_choice(choice: str, task_ids: list[str]) -> tuple[str, str | None]:
    """'base model' -> ('base', None); 'compressed: qa' -> ('compressed', 'qa'); 'compressed k=4: qa' ->
    ('compressed k=4', 'qa'); unknown parts raise."""
    if choice == BASE_CHOICE:
        return "base", None
    kind, sep, task_id = (choice or "").partition(": ")
    if not sep or not (kind in CHOICE_KINDS or _AT_K.fullmatch(kind)):
        kinds = ", ".join(f"'{k}: <task>'" for k in (*CHOICE_KINDS, AT_K_KIND))
        raise VLoRAError(f"unknown choice {choice!r}; choose '{BASE_CHOICE}', {kinds}.")
    if task_id not in task_ids:
        raise TaskError(f"unknown task {task_id!r}; loaded tasks: {', '.join(map(repr, task_ids)) or 'none'}.")
    return kind, task_id


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """'0.7, -0.3' -> [0.7, -0.3] for ``count`` tasks; blank -> None (1 each). Anything else raises."""
    parts = [p for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return None
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise VLoRAError(
            f"merge weights {text!r}: write numbers separated by commas, one per task in order (e.g. 1, -0.5)."
        ) from None
    if len(weights) != count:
        raise VLoRAError(
            f"merge weights: {len(weights)} numbers for {count} tasks; give one per task, in the order chosen "
            "(blank: 1 each)."
        )
    return weights


@contextmanager
def attached(base_model, subspace: SharedSubspace | None):
    """A VLoRAModel on ``base_model`` for the block (the base itself when ``subspace`` is None).

    VLoRAModel wraps the targeted layers in place; on the way out ``unload`` gives the base model its own
    layers back, so the shared base model is unchanged between calls. Callers must hold it exclusively meanwhile.
    """
    if subspace is None:
        yield base_model
        return
    model = VLoRAModel(base_model, subspace)
    try:
        yield model
    finally:
        model.unload()


def _generate(model, tokenizer, choice: str, prompt: str, max_new_tokens: int) -> Generation:
    """One greedy generation after making ``choice`` the active task (timed apart)."""
    start = time.perf_counter()
    if choice != BASE_CHOICE:
        model.set_task(choice)
    elif hasattr(model, "clear_task"):
        model.clear_task()
    switched = time.perf_counter()
    counted = _Counted(model)
    answer = generate_text(counted, tokenizer, prompt, max_new_tokens)
    return Generation(choice, answer, counted.new_tokens, 1000 * (switched - start), time.perf_counter() - switched)


class _Counted:
    """The model as ``generate_text`` uses it, remembering how many tokens the last ``generate`` added."""

    def __init__(self, model):
        self.model, self.new_tokens = model, 0

    def parameters(self):
        return self.model.parameters()

    def generate(self, input_ids, **kwargs):
        output = self.model.generate(input_ids=input_ids, **kwargs)  # (1, T + T_new)
        self.new_tokens = output.shape[1] - input_ids.shape[1]
        return output


def demo_prompts(path: Path | None) -> list[str]:
    """Example prompts for the A/B panel before any adapter is loaded: the prompt file's shared prompts."""
    return [p.text for p in prompt_file(path) if p.task is None]


def prompt_file(path: Path | None) -> list[Prompt]:
    """The prompts of the demo's prompt file: JSON lines (``vlora_core.io.prompts``), or the older JSON of
    {"shared": [...], "by_task": {task: [...]}}; none when there is no such file."""
    if path is None or not path.is_file():
        return []
    if path.suffix == ".jsonl":
        try:
            return list(read_prompts(path))
        except PromptError:
            return []  # examples are a convenience: a damaged file gives none, not a broken page
    data = json.loads(path.read_text(encoding="utf-8"))
    shared = [Prompt(text) for text in data.get("shared", [])]
    return shared + [Prompt(text, task=task) for task, texts in data.get("by_task", {}).items() for text in texts]


def _row(task_id: str, adapter: LoRAAdapter, problem: str) -> AdapterRow:
    ranks = adapter.ranks.values()
    targets = adapter.config.get("target_modules") or []
    return AdapterRow(
        task_id,
        min(ranks),
        max(ranks),
        adapter.config.get("lora_alpha"),
        targets if isinstance(targets, str) else ", ".join(sorted(targets)),
        len(adapter.layers),
        adapter.num_bytes,
        problem,
    )


def _bar(desc: str):
    return lambda items: tqdm(items, desc=desc, leave=False)
