"""SharedSubspace: the container of a store — one shared basis per layer and side, and each task's loadings.

A task's canonical factors (see ``gauge``) are rebuilt from the basis and its loadings by its method
(``methods``); ΔW = F_B · F_Aᵀ with the adapter's own scaling already folded in. The work is done by the
modules the data flows through, which this class only calls:

    compress            adapters -> bases + loadings (fit, cut to k, add later, stream)
    io/store_files      the store on disk
    export              a task -> PEFT factors and folder
    merge               tasks -> one merged task, on ΔW
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import compress, export, merge
from .adapter import LoRAAdapter
from .basis import Basis
from .calibration import DEFAULT_DAMPING, Calibration, calibrate
from .config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD, CompressConfig
from .device import check_device
from .errors import TaskError, VLoRAError, short_list
from .io import store_files
from .io.peft_files import load_adapter
from .merge import MergeConfig, MergeResult
from .methods import get_method
from .options import DEFAULT_CHUNK  # adapters read at a time by stream_compress
from .precision import default_precision, get_precision
from .records import Factors, LayerKs, LayerShape, Task, check_task_id
from .reports import describe

log = logging.getLogger("vlora")


class SharedSubspace:
    """Many LoRA adapters of one base model as one shared basis plus small per-task loadings.

    Attributes:
        method: the basis method, a key of ``vlora_core.methods.METHODS`` ("flat" or "rank").
        shapes: layer name -> LayerShape (d_in, d_out, rank), in the adapters' order.
        bases: layer name -> side ("A"/"B") -> Basis (components (k, D), spectrum, mean).
        tasks: task id -> Task (loadings layer -> side -> (g, k), its adapter_config.json, extras).
        k_requested: the k asked for (None for adaptive k), to say where it was clipped.
        dtype: the storage precision, a key of ``vlora_core.precision.PRECISIONS`` ("float32", "bfloat16",
            "float16", "int8"); the numbers in memory are those it stores, as float32.
        calibration: None for the plain fit; for an activation-aware one (``vlora_core.calibration``), what it was
            fitted on: the prompt file's name and SHA-256, prompt and token counts, base model, damping.

    Example:
        >>> subspace = SharedSubspace.from_adapters([load_adapter(p) for p in paths], num_components=4)
        >>> subspace.save("store/"); SharedSubspace.load("store/").task_ids
    """

    def __init__(
        self,
        method: str,
        shapes: dict[str, LayerShape],
        bases: dict[str, dict[str, Basis]],
        tasks: dict[str, Task],
        k_requested: int | None = None,
        dtype: str = "float32",
        calibration: dict | None = None,
    ):
        self.method = method
        self.shapes = shapes
        self.bases = bases
        self.tasks = tasks
        self.k_requested = k_requested
        self.dtype = get_precision(dtype).name
        self.calibration = None if calibration is None else dict(calibration)
        self._origin: tuple[Path, int] | None = None  # the store folder it was loaded from / saved to, generation

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        adapters: list[LoRAAdapter],
        task_ids: list[str] | None = None,
        num_components: int = DEFAULT_NUM_COMPONENTS,
        *,
        method: str = DEFAULT_METHOD,
        adaptive_k: bool = False,
        variance_threshold: float = DEFAULT_VARIANCE_THRESHOLD,
        measure: bool = True,
        progress: bool = False,
        device: str | None = None,
        dtype: str | None = None,
        calibration: Calibration | str | Path | None = None,
        base_model: str | None = None,
        damping: float | None = None,
    ) -> SharedSubspace:
        """Compress adapters into a shared subspace with k (or adaptive k) directions per layer and side.

        Args:
            adapters: two or more ``LoRAAdapter`` (``load_adapter``) with the same layers, shapes and rank.
            task_ids: one distinct id per adapter; default: each adapter's name (its folder name).
            num_components: k, directions kept per layer and side (clipped where the data has fewer).
            method: "flat" (centred PCA of whole factors) or "rank" (rank columns share directions).
            adaptive_k: choose k per layer and side as the fewest directions explaining ``variance_threshold``.
            measure: record each task's ΔW error per layer (about a quarter of the time).
            progress: show a progress bar.
            device: where the gauge and the SVDs run ("cuda" on a GPU; default: the CPU). The result is on the CPU.
            dtype: storage precision of the basis, means and loadings: "fp32", "bf16", "fp16" or "int8" (a bf16
                scale per block of a row); default: bf16 when every adapter is bf16 or fp16, else fp32
                (``precision.default_precision``). The ΔW errors recorded include the rounding.
            calibration: fit activation-aware: a prompt file (JSON lines, as for ``vlora eval``) run through
                ``base_model``, or a ``Calibration`` already collected (``vlora_core.calibration.calibrate``). The
                basis then minimises ‖(ΔW − ΔŴ)·C^½‖ with C each layer's input second moment; each task's
                activation-weighted error is recorded next to its ΔW error. Default: the plain fit.
            base_model: the model the calibration prompts run on: "bundled" (default), a folder, org/name.
            damping: λ of the calibration's C + λ·mean(diag C)·I (default ``calibration.DEFAULT_DAMPING``, 1).

        Returns:
            The subspace; ``vlora_core.quality`` reports its variance explained and ΔW errors.

        Example:
            >>> SharedSubspace.from_adapters(adapters, task_ids=["a", "b", "c"], num_components=4)
        """
        config = CompressConfig(num_components, method, adaptive_k, variance_threshold)
        adapters = [_as_adapter(a) for a in adapters]
        device = None if device is None else check_device(device)
        _warn_if_base_models_differ([(a.config, a.source or a.name) for a in adapters])
        calibration = _calibration(calibration, adapters, task_ids, base_model, damping)
        dtype = get_precision(dtype).name if dtype else default_precision([a.dtype for a in adapters])
        pieces = compress.fit(
            adapters,
            task_ids,
            config.method,
            config=config,
            measure=measure,
            progress=progress,
            device=device,
            precision=dtype,
            calibration=calibration,
        )
        k = None if config.adaptive_k else config.num_components
        subspace = cls(config.method, *pieces, k, dtype, None if calibration is None else calibration.record)
        note = subspace.clipping_note()
        if note:
            log.warning(note)
        return subspace

    @classmethod
    def decompose(
        cls,
        adapters: list[LoRAAdapter],
        task_ids: list[str] | None = None,
        *,
        method: str = DEFAULT_METHOD,
        progress: bool = False,
    ) -> SharedSubspace:
        """Every direction the data has (no truncation): ``truncated(k)`` then costs no SVD."""
        return cls(get_method(method).name, *compress.fit(adapters, task_ids, method, progress=progress))

    def truncated(self, k: int | CompressConfig, copy: bool = False) -> SharedSubspace:
        """Keep the first k directions per layer and side (clipped to what each has), or adaptive k.

        The bases are views of this one's unless ``copy``, which lets the directions cut off be freed.
        """
        config = k if isinstance(k, CompressConfig) else CompressConfig(k, self.method)
        bases, tasks = compress.cut(self.bases, self.tasks, compress.layer_ks(self.bases, config), copy)
        k = None if config.adaptive_k else config.num_components
        return SharedSubspace(self.method, self.shapes, bases, tasks, k, self.dtype, self.calibration)

    def set_dtype(self, dtype: str) -> None:
        """Store in ``dtype`` ("fp32", "bf16", "fp16", "int8") from now on: every basis and loading is rounded to
        it (a store of higher precision loses what the lower one cannot hold), and each task's recorded ΔW error
        grows by what the rounding moved its ΔW (``compress.round_again``: an upper bound)."""
        self.dtype = get_precision(dtype).name
        compress.round_again(self.method, self.shapes, self.dtype, self.bases, list(self.tasks.values()))

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return list(self.tasks)

    @property
    def layer_ks(self) -> LayerKs:
        """The k kept, per layer and side."""
        return {name: {side: b.k for side, b in sides.items()} for name, sides in self.bases.items()}

    def clipping_note(self) -> str | None:
        """Where the requested k was more than the data allows, in words (None if nowhere)."""
        if self.k_requested is None:
            return None
        short = [f"{n}.{s}={k}" for n, sides in self.layer_ks.items() for s, k in sides.items() if k < self.k_requested]
        if not short:
            return None
        return (
            f"k={self.k_requested} is more than the data allows ({get_method(self.method).k_limit}) in "
            f"{len(short)} layer sides; clipped there: {', '.join(short[:4])}{' ...' if len(short) > 4 else ''}"
        )

    def num_parameters(self) -> dict[str, int]:
        """Stored numbers: the shared basis, and the loadings of one task."""
        shared = sum(
            b.components.numel() + (0 if b.mean is None else b.mean.numel())
            for sides in self.bases.values()
            for b in sides.values()
        )
        task = next(iter(self.tasks.values()), None)
        per_task = 0 if task is None else sum(t.numel() for sides in task.loadings.values() for t in sides.values())
        return {"basis": shared, "per_task": per_task}

    # ---- tasks and their factors ------------------------------------------------------------------
    def task(self, task_id: str) -> Task:
        """The task ``task_id``; an unknown id is a ``TaskError`` listing the stored ones."""
        if task_id not in self.tasks:
            known = ", ".join(repr(t) for t in self.tasks) or "none"
            raise TaskError(f"unknown task {task_id!r}; this store holds: {known}.")
        return self.tasks[task_id]

    def task_factors(self, task_id: str) -> dict[str, Factors]:
        """Canonical factors of one task: layer -> (F_A (d_in, r), F_B (d_out, r)), scaling folded in."""
        task = self.task(task_id)
        return {name: tuple(F[0] for F in self.stacked_factors(name, [task])) for name in self.shapes}

    def stacked_factors(self, name: str, tasks: list[Task] | None = None) -> Factors:
        """F_A (N, d_in, r), F_B (N, d_out, r) of the given tasks (default: all) at one layer."""
        tasks = list(self.tasks.values()) if tasks is None else tasks
        return compress.reconstruct(self.method, self.shapes[name], self.bases[name], [t.loadings[name] for t in tasks])

    def to_adapter(
        self,
        task_id: str,
        *,
        alpha: float | None = None,
        base_model: str | None = None,
        target_modules: list[str] | None = None,
    ) -> LoRAAdapter:
        """The task as PEFT factors under its own config (or overrides); ΔW is the same for any alpha."""
        return export.task_adapter(self, task_id, alpha=alpha, base_model=base_model, target_modules=target_modules)

    def merge(
        self,
        task_ids: list[str],
        weights: list[float] | None = None,
        *,
        config: MergeConfig = MergeConfig(),
        name: str = "merged",
        fit_store: bool = False,
    ) -> MergeResult:
        """Merge stored tasks into one adapter on their ΔW (``merge.merge_adapters``: linear, cat, ties, dare).

        Args:
            task_ids: the tasks to merge (``task_ids``).
            weights: one per task, any sign; None: 1 each.
            config: method, density, rank and seed.
            name: the merged task's name.
            fit_store: write each layer at this store's rank (zero-padded, or cut by the SVD with its exact error
                reported) whatever ``config.rank`` says: what ``add`` needs to store the merge as a task.

        Example:
            >>> result = store.merge(["pirate", "shouting"], [1.0, 1.0], config=MergeConfig("ties", density=0.5))
            >>> store.add(store.merge(["a", "b"], fit_store=True, name="ab").adapter, "ab", incremental=True)
        """
        ranks = {layer: shape.rank for layer, shape in self.shapes.items()} if fit_store else None
        adapters = [self.to_adapter(task_id) for task_id in task_ids]
        return merge.merge_adapters(adapters, weights, config=config, name=name, ranks=ranks)

    # ---- adding tasks -----------------------------------------------------------------------------
    def project(self, adapter: LoRAAdapter, task_id: str | None = None) -> Task:
        """Loadings of a new adapter on the current basis, as a Task (not added; the basis does not change)."""
        task_id, factors = self._new_adapter(adapter, task_id, check_free=False)
        return compress.project(self.method, self.bases, adapter, task_id, factors)

    def add(self, adapter: LoRAAdapter, task_id: str | None = None, *, incremental: bool = False) -> Task:
        """Add an adapter: projected on the fixed basis, or (``incremental``) growing the basis so it is
        stored exactly while every stored task stays as it was, bit for bit, in any precision (the basis grows
        by appended directions: ``basis.extend``; one exception: an int8 store whose k reaches 128 rounds the
        stored loadings again in longer blocks, and their recorded errors grow by what that moved). Returns the
        new task, its ΔW error recorded (rounding included)."""
        task_id, factors = self._new_adapter(adapter, task_id)
        task = compress.project(self.method, self.bases, adapter, task_id, factors)
        if incremental:
            stored = list(self.tasks.values())
            compress.extend(self.method, self.bases, stored, factors, [task])
            compress.round_again(self.method, self.shapes, self.dtype, self.bases, stored)
        compress.round_to(self.dtype, self.bases, [task])
        self.tasks[task.id] = task
        compress.measure_errors(self.method, self.shapes, self.bases, factors, [task])
        return task

    def absorb(self, adapter: LoRAAdapter, task_id: str | None = None) -> Task:
        """Rebuild the basis from every stored task plus the new adapter, keeping each layer side's k.
        Returns the new task; every task's ΔW error is re-measured against the rebuilt data."""
        task_id, new_factors = self._new_adapter(adapter, task_id)
        ks = self.layer_ks
        factors = {
            name: tuple(torch.cat(pair) for pair in zip(self.stacked_factors(name), new_factors[name]))
            for name in self.shapes
        }
        tasks = {i: t.bare() for i, t in self.tasks.items()} | {task_id: Task.from_adapter(adapter, task_id)}
        full = compress.fit_factors(self.method, self.shapes, factors, list(tasks.values()))
        self.bases, self.tasks = compress.cut(full, tasks, ks, copy=True)
        self.calibration = None  # rebuilt in the plain metric
        compress.round_to(self.dtype, self.bases, list(self.tasks.values()))
        compress.measure_errors(self.method, self.shapes, self.bases, factors, list(self.tasks.values()))
        return self.tasks[task_id]

    def _new_adapter(
        self, adapter: LoRAAdapter, task_id: str | None, check_free: bool = True
    ) -> tuple[str, dict[str, Factors]]:
        """A valid task id for ``adapter`` (free in this store), checked against its layers, and its factors."""
        task_id = adapter.name if task_id is None else task_id
        task_id = compress.new_task_id(self.tasks, task_id) if check_free else check_task_id(task_id)
        compress.check_layers(self.shapes, adapter, "this store")
        stored = [(t.config, f"task {t.id}") for t in self.tasks.values()]
        _warn_if_base_models_differ([*stored, (adapter.config, adapter.source or adapter.name)])
        return task_id, compress.layer_factors([adapter], list(self.shapes))

    # ---- quality ----------------------------------------------------------------------------------
    def measure_against(self, reference: SharedSubspace) -> None:
        """Record each task's ΔW error against ``reference`` (e.g. the untruncated decomposition)."""
        factors = {name: reference.stacked_factors(name) for name in self.shapes}
        compress.measure_errors(self.method, self.shapes, self.bases, factors, list(self.tasks.values()))

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the store to the folder ``path`` (atomically: a reader sees the old store or the new one).

        Saving over the store this subspace was loaded from (or last saved to) is what ``save`` is for; a
        store that another writer changed meanwhile, or any other existing store, is refused unless ``force``,
        so that no task is replaced unseen. A folder that is not a store is never written into.

        Example:
            >>> subspace.save("shared_subspace/")
        """
        folder = Path(path)
        origin = self._origin
        loaded = origin[1] if origin and origin[0] == folder.resolve() else None
        generation = store_files.save_store(
            folder,
            self.method,
            self.shapes,
            self.bases,
            self.tasks,
            self.k_requested,
            dtype=self.dtype,
            calibration=self.calibration,
            loaded_generation=loaded,
            force=force,
        )
        self._origin = (folder.resolve(), generation)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> SharedSubspace:
        """Read a store written by ``save`` (or ``vlora compress``); a damaged one is a ``StoreError``.

        Example:
            >>> SharedSubspace.load("shared_subspace/").task_ids
        """
        *pieces, generation = store_files.load_store(path)
        subspace = cls(*pieces)
        subspace._origin = (Path(path).resolve(), generation)
        return subspace

    def __repr__(self) -> str:
        return describe(self.method, len(self.tasks), len(self.shapes), self.layer_ks)


def _calibration(
    given: Calibration | str | Path | None,
    adapters: list[LoRAAdapter],
    task_ids: list[str] | None,
    base_model: str | None,
    damping: float | None,
) -> Calibration | None:
    """The calibration ``from_adapters`` fits with: None, one already collected, or one collected now from a file."""
    if given is None:
        if base_model is not None or damping is not None:
            raise VLoRAError("base_model and damping belong to a calibration; pass calibration= (a prompt file) too.")
        return None
    if isinstance(given, Calibration):
        return given if damping is None else given.with_damping(damping)
    compress.resolve_task_ids(adapters, task_ids)  # what fit refuses, refused before the base model is loaded
    layers = list(compress.check_compatible(adapters))
    return calibrate(given, layers, base_model, damping=DEFAULT_DAMPING if damping is None else damping)


def stream_compress(
    paths: list[str | Path],
    task_ids: list[str] | None = None,
    num_components: int = DEFAULT_NUM_COMPONENTS,
    *,
    method: str = DEFAULT_METHOD,
    chunk: int = DEFAULT_CHUNK,
    headroom: int = 2,
    measure: bool = True,
    progress: bool = False,
    dtype: str = "float32",
) -> SharedSubspace:
    """Compress adapter folders a chunk at a time: peak memory is set by the chunk and the basis, not by N.

    The first chunk is decomposed; each later chunk extends the bases and the weakest directions beyond
    ``headroom · k`` are dropped, as in incremental PCA (close to, not equal to, the one-pass basis). The
    result is cut to k; a second pass over the files measures each task's ΔW error unless ``measure=False``.

    Args:
        paths: PEFT adapter folders.
        task_ids: one id per folder; default: the folder names.
        num_components: k kept per layer and side.
        method: "flat" or "rank".
        chunk: adapters read at a time (at least 2: the first chunk starts the basis).
        headroom: directions kept while streaming, as a multiple of k.
        dtype: storage precision ("fp32", "bf16", "fp16", "int8"), as in ``SharedSubspace.from_adapters``.

    Returns:
        The ``SharedSubspace`` of every folder.

    Example:
        >>> stream_compress(sorted(Path("adapters").iterdir()), num_components=8, chunk=32).save("store/")
    """
    config = CompressConfig(num_components, method)
    dtype = get_precision(dtype).name
    pieces = compress.stream(
        paths, task_ids, config, chunk=chunk, headroom=headroom, measure=measure, progress=progress, precision=dtype
    )
    return SharedSubspace(config.method, *pieces, config.num_components, dtype)


def _as_adapter(item: LoRAAdapter | str | Path) -> LoRAAdapter:
    """An adapter given as itself or as its folder."""
    if isinstance(item, LoRAAdapter):
        return item
    if isinstance(item, (str, Path)):
        return load_adapter(item)
    raise VLoRAError(f"expected a LoRAAdapter (load_adapter) or an adapter folder, got {type(item).__name__}.")


def _warn_if_base_models_differ(items: list[tuple[dict, str]]) -> None:
    """Say when adapters (their configs, and where each came from) name different base models: their shapes agree
    (checked when fitting), so they can share a basis, but one may be for another model of the same shape; each
    export keeps its own base_model_name_or_path."""
    named: dict[str, list[str]] = {}
    for config, source in items:
        named.setdefault(str(config.get("base_model_name_or_path")), []).append(source)
    if len(named) > 1:
        log.warning(
            "these adapters name %d base models: %s. Their shapes agree, so they share a basis; check that they "
            "are meant for one model (each export keeps its own base_model_name_or_path).",
            len(named),
            "; ".join(f"{model} ({short_list(sources, limit=2)})" for model, sources in named.items()),
        )
