"""SharedSubspace: one shared basis per layer and side, plus each task's small loadings.

A task's canonical factors (see ``gauge``) are ``basis.reconstruct(loadings)`` cut back into (d, r)
matrices; ΔW = F_B · F_Aᵀ with the adapter's own scaling already folded in. Everything here is
in-memory; ``vlora_core.io.store_files`` reads and writes it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import basis as bases
from .adapter import LoRAAdapter, LoRALayer, lora_scaling
from .config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD, CompressConfig
from .constants import SIDES
from .errors import CompatibilityError, TaskError, VLoRAError
from .gauge import canonical_factors

log = logging.getLogger("vlora")

Factors = tuple[torch.Tensor, torch.Tensor]  # F_A (N, d_in, r), F_B (N, d_out, r)


@dataclass(frozen=True)
class LayerShape:
    d_in: int
    d_out: int
    rank: int

    def dim(self, side: str) -> int:
        return self.d_in if side == "A" else self.d_out


@dataclass
class Task:
    id: str
    loadings: dict[str, dict[str, torch.Tensor]]  # layer -> side -> (g, k)
    config: dict  # the adapter's own adapter_config.json
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save and other tensors
    source: str = ""
    dtype: str = "float32"  # the original factors' dtype; exports are cast back to it
    quality: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (ΔW rel. error, ‖ΔW‖)


class SharedSubspace:
    def __init__(self, method: str, shapes: dict[str, LayerShape], bases_: dict[str, dict[str, bases.Basis]],
                 tasks: dict[str, Task], k_requested: int | None = None):
        self.method = method
        self.shapes = shapes
        self.bases = bases_
        self.tasks = tasks
        self.k_requested = k_requested  # what the user asked for, to report clipping

    # ---- building ---------------------------------------------------------------------------------
    @classmethod
    def from_adapters(cls, adapters: list[LoRAAdapter], task_ids: list[str] | None = None,
                      num_components: int = DEFAULT_NUM_COMPONENTS, *, method: str = DEFAULT_METHOD,
                      adaptive_k: bool = False, variance_threshold: float = DEFAULT_VARIANCE_THRESHOLD,
                      measure: bool = True, progress: bool = False) -> SharedSubspace:
        """Compress adapters into a shared subspace with k (or adaptive k) directions per layer and side.

        Each task's ΔW error per layer is measured against its adapter unless ``measure=False`` (about a
        quarter of the time; ``vlora info`` and ``quality`` then report it as unknown).
        """
        config = CompressConfig(num_components, method, adaptive_k, variance_threshold)

        def cut_and_measure(part: SharedSubspace, factors: dict[str, Factors]) -> SharedSubspace:
            part = part.truncated(config, copy=True)
            if measure:
                part.measure(factors)
            return part

        top = None if config.adaptive_k else config.num_components  # a fixed k: form only k directions
        subspace = cls._build(adapters, task_ids, config.method, progress, cut_and_measure, top)
        subspace.k_requested = None if config.adaptive_k else config.num_components
        note = subspace.clipping_note()
        if note:
            log.warning(note)
        return subspace

    @classmethod
    def decompose(cls, adapters: list[LoRAAdapter], task_ids: list[str] | None = None, *,
                  method: str = DEFAULT_METHOD, progress: bool = False) -> SharedSubspace:
        """Every direction the data has (no truncation): ``truncated(k)`` then costs no SVD."""
        return cls._build(adapters, task_ids, method, progress)

    @classmethod
    def _build(cls, adapters, task_ids, method, progress, finish=None, top=None) -> SharedSubspace:
        """Gauge and fit a batch of layers at a time (then ``finish`` it: cut, measure), so that the
        canonical factors of only one batch are ever held, in memory the allocator can reuse."""
        ids = resolve_task_ids(adapters, task_ids)
        shapes = check_compatible(adapters)
        tasks = {i: Task(i, {}, a.config, a.extras, a.source, _dtype_name(a)) for i, a in zip(ids, adapters)}
        whole = cls(method, shapes, {}, tasks)
        for batch in tqdm(layer_batches(adapters, list(shapes)), desc="compress", disable=not progress, leave=False):
            stacked = batch_factors(adapters, batch)  # F_A (L, N, d_in, r), F_B (L, N, d_out, r)
            part = cls(method, {n: shapes[n] for n in batch}, {n: {} for n in batch},
                       {i: _bare(t) for i, t in tasks.items()})
            part._fit_batch(batch, stacked, top)
            if finish:
                part = finish(part, {name: (stacked[0][i], stacked[1][i]) for i, name in enumerate(batch)})
            whole._merge(part)
        whole.bases = {name: whole.bases[name] for name in shapes}  # batches go by shape; restore layer order
        for task in tasks.values():
            task.loadings = {name: task.loadings[name] for name in shapes}
            task.quality = {name: task.quality[name] for name in shapes if name in task.quality}
        return whole

    def _merge(self, part: SharedSubspace) -> None:
        """Take over the layers of ``part`` (same tasks, other layers)."""
        self.bases.update(part.bases)
        for task_id, task in part.tasks.items():
            self.tasks[task_id].loadings.update(task.loadings)
            self.tasks[task_id].quality.update(task.quality)

    @classmethod
    def fit(cls, method: str, shapes: dict[str, LayerShape], factors: dict[str, Factors],
            tasks: dict[str, Task]) -> SharedSubspace:
        """Fit every layer and side; ``tasks`` (in the order of the factors' N axis) get their loadings."""
        subspace = cls(method, shapes, {name: {} for name in shapes}, tasks)
        first = {name: tuple(F[0] for F in pair) for name, pair in factors.items()}
        for batch in _batches(list(shapes), key=lambda n: tuple(F.shape for F in first[n]),
                              size=lambda n: sum(F.numel() for F in factors[n])):
            subspace._fit_batch(batch, tuple(torch.stack([factors[n][i] for n in batch]) for i in range(2)))
        return subspace

    def _fit_batch(self, names: list[str], stacked: Factors, top: int | None = None) -> None:
        """Fit the bases of same-shape layers from their factors F_A (L, N, d_in, r), F_B (L, N, d_out, r),
        forming at most ``top`` directions each (all by default)."""
        rule = _method(self.method)
        for side, F in zip(SIDES, stacked):
            vectors = rule.to_vectors(F.flatten(0, 1)).unflatten(0, F.shape[:2])  # (L, N, g, D), a view for flat
            for name, (basis, loadings) in zip(names, bases.fit_many(vectors, rule.centre, max_k=top)):
                self.bases[name][side] = basis
                for task, rows in zip(self.tasks.values(), loadings):
                    task.loadings.setdefault(name, {})[side] = rows

    def truncated(self, k: int | CompressConfig, copy: bool = False) -> SharedSubspace:
        """Keep the first k directions per layer and side (clipped to what each has), or adaptive k.

        The bases are views of this one's unless ``copy``, which lets the directions cut off be freed.
        """
        config = k if isinstance(k, CompressConfig) else CompressConfig(k, self.method)
        new_bases, ks = {}, {}
        for name, sides in self.bases.items():
            new_bases[name], ks[name] = {}, {}
            for side, basis in sides.items():
                kept = (bases.choose_k(basis.spectrum[: basis.k], config.variance_threshold)
                        if config.adaptive_k else min(config.num_components, basis.k))
                new_bases[name][side], ks[name][side] = basis.truncate(kept, copy), kept
        tasks = {i: _slice_task(t, ks) for i, t in self.tasks.items()}
        requested = None if config.adaptive_k else config.num_components
        return SharedSubspace(self.method, self.shapes, new_bases, tasks, requested)

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return list(self.tasks)

    @property
    def num_components(self) -> dict[str, dict[str, int]]:
        """The k used, per layer and side."""
        return {name: {side: b.k for side, b in sides.items()} for name, sides in self.bases.items()}

    def clipping_note(self) -> str | None:
        if self.k_requested is None:
            return None
        short = [f"{n}.{s}={k}" for n, sides in self.num_components.items() for s, k in sides.items()
                 if k < self.k_requested]
        if not short:
            return None
        limit = "N - 1 for the flat basis" if self.method == "flat" else "min(N x r, d) for the rank basis"
        return (f"k={self.k_requested} is more than the data allows ({limit}) in {len(short)} layer sides; "
                f"clipped there: {', '.join(short[:4])}{' ...' if len(short) > 4 else ''}")

    def num_parameters(self) -> dict[str, int]:
        """Stored numbers: the shared basis, and the loadings of one task."""
        shared = sum(b.components.numel() + (0 if b.mean is None else b.mean.numel())
                     for sides in self.bases.values() for b in sides.values())
        task = next(iter(self.tasks.values()), None)
        per_task = 0 if task is None else sum(t.numel() for sides in task.loadings.values() for t in sides.values())
        return {"basis": shared, "per_task": per_task}

    # ---- reconstruction ---------------------------------------------------------------------------
    def task_factors(self, task_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Canonical factors of one task: layer -> (F_A (d_in, r), F_B (d_out, r)), scaling folded in."""
        task = self.task(task_id)
        return {name: tuple(F[0] for F in self.stacked_factors(name, [task])) for name in self.shapes}

    def stacked_factors(self, name: str, tasks: list[Task] | None = None) -> Factors:
        """F_A (N, d_in, r), F_B (N, d_out, r) of the given tasks (default: all) at one layer."""
        tasks = list(self.tasks.values()) if tasks is None else tasks
        rule, shape = _method(self.method), self.shapes[name]
        out = []
        for side in SIDES:
            basis = self.bases[name][side]
            loadings = torch.stack([t.loadings[name][side] for t in tasks])  # (N, g, k)
            out.append(rule.from_vectors(bases.reconstruct(basis, loadings), shape.dim(side), shape.rank))
        return tuple(out)

    def to_adapter(self, task_id: str, *, alpha: float | None = None, base_model: str | None = None,
                   target_modules: list[str] | None = None) -> LoRAAdapter:
        """The task as PEFT factors under its own config (or overrides); ΔW is the same for any alpha."""
        task = self.task(task_id)
        config = export_config(task.config, alpha, base_model, target_modules, list(self.shapes))
        dtype = getattr(torch, task.dtype)
        layers = {}
        for name, (F_A, F_B) in self.task_factors(task_id).items():
            scaling = lora_scaling(config, name, self.shapes[name].rank)
            root = math.sqrt(scaling)
            layers[name] = LoRALayer(A=(F_A.T / root).to(dtype), B=(F_B / root).to(dtype), scaling=scaling)
        return LoRAAdapter(task_id, config, layers, dict(task.extras), source=f"task {task_id!r}")

    # ---- tasks ------------------------------------------------------------------------------------
    def task(self, task_id: str) -> Task:
        if task_id not in self.tasks:
            known = ", ".join(repr(t) for t in self.tasks) or "none"
            raise TaskError(f"unknown task {task_id!r}; this store holds: {known}.")
        return self.tasks[task_id]

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        """The adapter must target this store's layers with the same shapes and ranks."""
        check_layers(self.shapes, adapter, "this store")

    def check_new_id(self, task_id: str | None, adapter: LoRAAdapter) -> str:
        task_id = check_task_id(task_id or adapter.name)
        if task_id in self.tasks:
            raise TaskError(f"task id {task_id!r} is already in this store; choose another id (--task-id).")
        return task_id

    def project(self, adapter: LoRAAdapter, task_id: str | None = None) -> Task:
        """Loadings of a new adapter on the current basis (the basis does not change)."""
        task_id = check_task_id(task_id or adapter.name)
        self.check_adapter(adapter)
        return self._project(adapter, task_id, layer_factors([adapter], list(self.shapes)))

    def _project(self, adapter: LoRAAdapter, task_id: str, factors: dict[str, Factors]) -> Task:
        rule = _method(self.method)
        task = Task(task_id, {}, adapter.config, adapter.extras, adapter.source, _dtype_name(adapter))
        for name, pair in factors.items():
            for side, F in zip(SIDES, pair):
                task.loadings.setdefault(name, {})[side] = bases.project(self.bases[name][side], rule.to_vectors(F))[0]
        return task

    def add_task(self, task: Task) -> None:
        self.check_new_id(task.id, None)
        self.tasks[task.id] = task

    def add(self, adapter: LoRAAdapter, task_id: str | None = None, *, incremental: bool = False) -> Task:
        """Add an adapter: projected on the fixed basis, or (incremental) growing the basis to hold it exactly."""
        task_id, factors = self._new_adapter(adapter, task_id)
        task = self._project(adapter, task_id, factors)
        if incremental:
            self.extend(factors, [task])
        self.add_task(task)
        self.measure(factors, [task])
        return task

    def absorb(self, adapter: LoRAAdapter, task_id: str | None = None) -> None:
        """Rebuild the basis from every stored task plus the new adapter, keeping each layer side's k."""
        task_id, new_factors = self._new_adapter(adapter, task_id)
        task = self._project(adapter, task_id, new_factors)
        ks = self.num_components
        factors = {name: tuple(torch.cat([old, new]) for old, new in zip(self.stacked_factors(name), new_factors[name]))
                   for name in self.shapes}
        tasks = {i: _bare(t) for i, t in self.tasks.items()} | {task.id: _bare(task)}
        full = SharedSubspace.fit(self.method, self.shapes, factors, tasks)
        rebuilt = full.truncated_per_side(ks)
        rebuilt.measure_against(full)
        self.bases, self.tasks = rebuilt.bases, rebuilt.tasks

    def _new_adapter(self, adapter: LoRAAdapter, task_id: str | None) -> tuple[str, dict[str, Factors]]:
        """A free, valid task id for ``adapter``, checked against this store's layers, and its factors."""
        task_id = self.check_new_id(task_id, adapter)
        self.check_adapter(adapter)
        return task_id, layer_factors([adapter], list(self.shapes))

    def truncated_per_side(self, ks: dict[str, dict[str, int]]) -> SharedSubspace:
        new_bases = {n: {s: b.truncate(ks[n][s]) for s, b in sides.items()} for n, sides in self.bases.items()}
        tasks = {i: _slice_task(t, ks) for i, t in self.tasks.items()}
        return SharedSubspace(self.method, self.shapes, new_bases, tasks, self.k_requested)

    def extend(self, factors: dict[str, Factors], new_tasks: list[Task], max_k: int | None = None) -> None:
        """Grow each basis by what new adapters need (their canonical ``factors``, see ``layer_factors``) and
        give every task (old and new) its loadings.

        Exact for stored tasks unless ``max_k`` caps the basis (streaming). ``new_tasks`` are not added.
        """
        rule = _method(self.method)
        order = list(self.tasks.values()) + list(new_tasks)
        for name, pair in factors.items():
            for side, F in zip(SIDES, pair):
                old = torch.stack([t.loadings[name][side] for t in order[: len(self.tasks)]])
                basis, loadings = bases.extend(self.bases[name][side], old, rule.to_vectors(F), max_k=max_k)
                self.bases[name][side] = basis
                for t, rows in zip(order, loadings):
                    t.loadings[name][side] = rows

    # ---- quality ----------------------------------------------------------------------------------
    def measure(self, reference: dict[str, Factors], tasks: list[Task] | None = None) -> None:
        """Record each task's ΔW error per layer against reference factors of ``tasks`` (default: all, in order)."""
        from .quality import delta_w_errors

        tasks = list(self.tasks.values()) if tasks is None else tasks
        for name in self.shapes:
            err, norm = delta_w_errors(reference[name], self.stacked_factors(name, tasks))
            for task, e, n in zip(tasks, err.tolist(), norm.tolist()):
                task.quality[name] = (e, n)

    def measure_against(self, reference: SharedSubspace) -> None:
        """Record each task's ΔW error against ``reference`` (the untruncated decomposition)."""
        self.measure({name: reference.stacked_factors(name) for name in self.shapes})

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from .io.store_files import save_store

        return save_store(self, path)

    @classmethod
    def load(cls, path: str | Path) -> SharedSubspace:
        from .io.store_files import load_store

        return load_store(path)

    def __repr__(self) -> str:
        ks = sorted({k for sides in self.num_components.values() for k in sides.values()})
        return (f"SharedSubspace(method={self.method!r}, tasks={len(self.tasks)}, layers={len(self.shapes)}, "
                f"k={ks[0] if len(ks) == 1 else ks})")


# ---- helpers shared by building and adding --------------------------------------------------------
def layer_batches(adapters: list[LoRAAdapter], names: list[str]) -> list[list[str]]:
    """Layer names in batches of one shape, each about _BATCH_NUMBERS numbers of factors over all adapters."""
    first = adapters[0].layers
    return _batches(names, key=lambda n: (first[n].A.shape, first[n].B.shape),
                    size=lambda n: len(adapters) * (first[n].A.numel() + first[n].B.numel()))


def layer_factors(adapters: list[LoRAAdapter], names: list[str]) -> dict[str, Factors]:
    """Canonical factors of the named layers for several adapters, a batch of same-shape layers per call."""
    out = {}
    for batch in layer_batches(adapters, names):
        F_A, F_B = batch_factors(adapters, batch)
        out.update({name: (F_A[i], F_B[i]) for i, name in enumerate(batch)})
    return out


def batch_factors(adapters: list[LoRAAdapter], names: list[str]) -> Factors:
    """Canonical factors of same-shape layers: F_A (L, N, d_in, r), F_B (L, N, d_out, r), one gauge call."""
    A = torch.stack([a.layers[n].A for n in names for a in adapters])  # (L·N, r, d_in)
    B = torch.stack([a.layers[n].B for n in names for a in adapters])
    scaling = torch.tensor([a.layers[n].scaling for n in names for a in adapters])
    return tuple(F.unflatten(0, (len(names), len(adapters))) for F in canonical_factors(A, B, scaling))


# Numbers handled per batched call: 8 MiB of float32. Larger temporaries cost more in page faults
# (fresh memory from the OS each time) than batching saves.
_BATCH_NUMBERS = 1 << 21


def _batches(items: list, key, size) -> list[list]:
    """Items grouped by ``key`` (a shape), in order, each group cut into runs of about _BATCH_NUMBERS numbers."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out = []
    for group in groups.values():
        step = max(1, _BATCH_NUMBERS // max(size(group[0]), 1))
        out += [group[i:i + step] for i in range(0, len(group), step)]
    return out


def resolve_task_ids(adapters: list[LoRAAdapter], task_ids: list[str] | None) -> list[str]:
    if len(adapters) < 2:
        raise VLoRAError(
            f"a shared subspace needs at least 2 adapters, got {len(adapters)}; "
            "pass more adapter folders (or add this one to an existing store with `vlora add`)."
        )
    ids = [a.name for a in adapters] if task_ids is None else list(task_ids)
    if len(ids) != len(adapters):
        raise TaskError(f"{len(ids)} task ids for {len(adapters)} adapters; give one id per adapter.")
    seen = {}
    for task_id, adapter in zip(ids, adapters):
        check_task_id(task_id)
        if task_id in seen:
            raise TaskError(
                f"task id {task_id!r} is used twice ({seen[task_id]} and {adapter.describe()}); "
                "task ids must be unique — rename a folder or pass task_ids."
            )
        seen[task_id] = adapter.describe()
    return ids


def check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not task_id.strip():
        raise TaskError(f"task id {task_id!r} is empty; give each task a short name.")
    if len(task_id) > 200 or any(ord(c) < 32 for c in task_id):
        raise TaskError(f"task id {task_id[:40]!r}... must be at most 200 printable characters.")
    return task_id


def check_compatible(adapters: list[LoRAAdapter]) -> dict[str, LayerShape]:
    """All adapters must target the same layers with the same shapes and ranks."""
    first = adapters[0]
    shapes = {n: LayerShape(l.A.shape[1], l.B.shape[0], l.rank) for n, l in first.layers.items()}
    for other in adapters[1:]:
        check_layers(shapes, other, f"{first.describe()}")
    return shapes


def compatibility_problems(adapters: list[LoRAAdapter]) -> dict[str, str]:
    """Every adapter that does not fit with the first one, with the message that says why and the fix."""
    if not adapters:
        return {}
    first = adapters[0]
    shapes = {n: LayerShape(l.A.shape[1], l.B.shape[0], l.rank) for n, l in first.layers.items()}
    problems = {}
    for other in adapters[1:]:
        try:
            check_layers(shapes, other, first.describe())
        except CompatibilityError as error:
            problems[other.describe()] = str(error)
    return problems


def check_layers(shapes: dict[str, LayerShape], adapter: LoRAAdapter, reference: str) -> None:
    missing, extra = sorted(set(shapes) - set(adapter.layers)), sorted(set(adapter.layers) - set(shapes))
    if missing or extra:
        raise CompatibilityError(
            f"{adapter.describe()}: targets different modules than {reference}; "
            f"missing: {_names(missing)}; extra: {_names(extra)}. "
            "A subspace needs the same target modules in every adapter — compress them in separate subspaces."
        )
    for name, shape in shapes.items():
        layer = adapter.layers[name]
        if layer.rank != shape.rank:
            raise CompatibilityError(
                f"{adapter.describe()}: rank {layer.rank} differs from rank {shape.rank} ({reference}) at {name}; "
                "all adapters in a subspace must share a rank — compress them in separate subspaces."
            )
        if (layer.A.shape[1], layer.B.shape[0]) != (shape.d_in, shape.d_out):
            raise CompatibilityError(
                f"{adapter.describe()}: {name} is {layer.B.shape[0]}x{layer.A.shape[1]} (d_out x d_in) but "
                f"{shape.d_out}x{shape.d_in} in {reference}; these adapters are for different base models."
            )


def export_config(config: dict, alpha: float | None, base_model: str | None,
                  target_modules: list[str] | None, layers: list[str]) -> dict:
    """The task's own adapter_config.json, with the overrides the user asked for."""
    config = dict(config)
    if alpha is not None:
        if alpha <= 0:
            raise VLoRAError(f"--alpha must be positive, got {alpha}.")
        config["lora_alpha"], config["alpha_pattern"] = alpha, {}
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    if target_modules is not None:
        unmatched = [n for n in layers if not any(n == t or n.endswith("." + t) for t in target_modules)]
        if unmatched:
            raise VLoRAError(
                f"--target-modules {' '.join(target_modules)} does not cover stored layers: {_names(unmatched)}; "
                "list every module the adapter trains (for example q_proj v_proj)."
            )
        config["target_modules"] = list(target_modules)
    config["inference_mode"] = True
    return config


def _method(name: str) -> bases.Method:
    if name not in bases.METHODS:
        raise VLoRAError(f"unknown method {name!r}; choose one of: {', '.join(bases.METHODS)}.")
    return bases.METHODS[name]


def _slice_task(task: Task, ks: dict[str, dict[str, int]]) -> Task:
    loadings = {n: {s: t[..., : ks[n][s]].clone() for s, t in sides.items()} for n, sides in task.loadings.items()}
    return Task(task.id, loadings, task.config, task.extras, task.source, task.dtype, dict(task.quality))


def _bare(task: Task) -> Task:
    return Task(task.id, {}, task.config, task.extras, task.source, task.dtype)


def _dtype_name(adapter: LoRAAdapter) -> str:
    return str(next(iter(adapter.layers.values())).A.dtype).removeprefix("torch.")


def _names(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
