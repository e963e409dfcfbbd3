"""Compressing adapters: validate them, gauge their layers in batches, fit the shared bases, cut to k.

Everything here works on the plain pieces a ``SharedSubspace`` holds (``shapes``, ``bases``, ``tasks``),
so that the container can call it without this module knowing the container:

    adapters ──check──▶ shapes ──gauge (batches of same-shape layers)──▶ factors ──fit──▶ bases + loadings
                                                                                 └──cut to k, measure ΔW error

    bases    layer -> side -> Basis
    tasks    task id -> Task (loadings layer -> side -> (g, k))

Adding later: ``project`` a new adapter on the fixed bases, or ``extend`` them to hold it exactly.
``stream`` compresses a chunk of adapter folders at a time (incremental PCA) so memory does not grow with N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import basis as basis_math
from . import krylov
from .adapter import LoRAAdapter
from .calibration import Calibration
from .config import CompressConfig
from .constants import SIDES
from .errors import CompatibilityError, TaskError, VLoRAError, short_list
from .gauge import canonical_factors
from .io.peft_files import folder_task_id, load_adapter
from .methods import get_method
from .precision import get_precision
from .quality import delta_w_distance, delta_w_errors, delta_w_norms
from .records import Factors, LayerKs, LayerShape, Task, check_task_id

Bases = dict[str, dict[str, basis_math.Basis]]  # layer -> side -> Basis
Pieces = tuple[dict[str, LayerShape], Bases, dict[str, Task]]  # what a SharedSubspace is made of

# Numbers handled per batched call: 8 MiB of float32. Larger temporaries cost more in page faults
# (fresh memory from the OS each time) than batching saves.
_BATCH_NUMBERS = 1 << 21

# How far apart two tasks' ΔW norms in one layer may be. Measured with the test adapters, factors of one scaled by s
# (ΔW by s²) and a lossless k: the others' ΔW error was 3e-4 at s = 1e4, 3e-3 at 1e5, 0.31 at 1e6.
MAX_SCALE_RATIO = 1e8


# ---- fitting ----------------------------------------------------------------------------------------
def fit(
    adapters: list[LoRAAdapter],
    task_ids: list[str] | None,
    method: str,
    *,
    config: CompressConfig | None = None,
    measure: bool = True,
    progress: bool = False,
    device: str | torch.device | None = None,
    precision: str = "float32",
    calibration: Calibration | None = None,
    scales: dict | None = None,
) -> Pieces:
    """Shapes, bases and tasks of ``adapters``: every direction, or cut to ``config``'s k.

    Layers are gauged and fitted a batch of one shape at a time, then cut and measured, so the canonical
    factors of only one batch are ever held. A fixed k forms only k directions (the spectrum lists those,
    and the energy of all). What is kept is rounded to the storage ``precision`` (``precision.round_trip``)
    before each task's ΔW error per layer is recorded, unless ``measure=False``: the errors are those of the
    store on disk. With ``device`` (e.g. "cuda") the gauge and the SVDs of each batch run there; what is
    kept comes back to the CPU. With a ``calibration`` (``vlora_core.calibration``) each batch is fitted in the
    whitened metric and its A sides taken back to plain coordinates after the cut; each task's
    activation-weighted error is recorded next to its ΔW error. A layer where one task's ΔW is too many times
    another's is refused (``check_scales``; ``scales`` carries what earlier calls saw, for ``stream``).
    """
    ids = resolve_task_ids(adapters, task_ids)
    shapes = check_compatible(adapters)
    if calibration is not None:
        calibration.check_layers(shapes)
    tasks = {i: Task.from_adapter(a, i) for i, a in zip(ids, adapters)}
    top = None if config is None or config.adaptive_k else config.num_components
    hints: dict = {}  # (side, shape) -> krylov.Hint: the Krylov subspace size, batch to batch
    columns = get_method(method).columns  # factors laid out so that the method's vectors are contiguous
    bases: Bases = {}
    for batch in tqdm(layer_batches(adapters, list(shapes)), desc="compress", disable=not progress, leave=False):
        stacked = batch_factors(adapters, batch, device, columns)  # F_A (L, N, d_in, r), F_B (L, N, d_out, r)
        if calibration is not None:
            stacked = calibration.whiten(batch, stacked)  # the factors of ΔW·S, in the whitened gauge
        _fit_batch(method, batch, stacked, bases, tasks.values(), top, hints, scales)
        if device is not None:
            _to_cpu(bases, tasks.values(), batch)
            stacked = tuple(F.cpu() for F in stacked)
        if config is not None:
            _cut_layers(bases, tasks.values(), batch, config)
        if calibration is not None:  # the A sides back to plain coordinates; the reference factors likewise
            stacked = calibration.restore(get_method(method), bases, tasks.values(), batch, stacked)
        if config is not None:
            round_to(precision, bases, tasks.values(), batch)
            if measure:
                reference = {name: (stacked[0][i], stacked[1][i]) for i, name in enumerate(batch)}
                measure_errors(method, shapes, bases, reference, list(tasks.values()))
                if calibration is not None:
                    calibration.measure(method, shapes, bases, reference, list(tasks.values()))
    return shapes, _in_order(bases, tasks, shapes), tasks


def fit_factors(method: str, shapes: dict[str, LayerShape], factors: dict[str, Factors], tasks: list[Task]) -> Bases:
    """Bases of every direction from canonical factors; ``tasks`` (in the factors' N order) get loadings."""
    bases: Bases = {}
    first = {name: tuple(F[0] for F in pair) for name, pair in factors.items()}
    for batch in _batches(
        list(shapes), key=lambda n: tuple(F.shape for F in first[n]), size=lambda n: sum(F.numel() for F in factors[n])
    ):
        stacked = tuple(torch.stack([factors[n][i] for n in batch]) for i in range(2))
        _fit_batch(method, batch, stacked, bases, tasks)
    return {name: bases[name] for name in shapes}


def _fit_batch(
    method: str,
    names: list[str],
    stacked: Factors,
    bases: Bases,
    tasks: Iterable[Task],
    top: int | None = None,
    hints: dict | None = None,
    scales: dict | None = None,
) -> None:
    """Fit same-shape layers from F_A (L, N, d_in, r), F_B (L, N, d_out, r), forming at most ``top``
    directions each; ``tasks`` (N of them) get their loadings. ``hints`` ((side, shape) -> ``krylov.Hint``,
    filled here) carry the Krylov work from one batch to the next; ``scales`` the ``check_scales`` of each
    layer's ΔW norms from one batch of tasks to the next."""
    rule = get_method(method)
    tasks = list(tasks)
    check_scales(names, stacked, [t.source or t.id for t in tasks], scales)
    for side, F in zip(SIDES, stacked):
        vectors = rule.to_vectors(F.flatten(0, 1)).unflatten(0, F.shape[:2])  # (L, N, g, D), a view for flat
        hint = None if hints is None else hints.setdefault((side, F.shape[1:]), krylov.Hint())
        for name, (basis, loadings) in zip(names, basis_math.fit_many(vectors, rule.centre, max_k=top, hint=hint)):
            bases.setdefault(name, {})[side] = basis
            for task, rows in zip(tasks, loadings):
                task.loadings.setdefault(name, {})[side] = rows


def check_scales(names: list[str], stacked: Factors, labels: list[str], seen: dict | None = None) -> None:
    """Refuse layers where one task's ΔW is more than MAX_SCALE_RATIO times another's: in one float32 basis the
    smaller would be rounded away, and every task with it (one adapter scaled up 10^6 x in its factors, 10^12 in
    ΔW, left the others at a lossless k with 31-38 % ΔW error). ``labels`` name the N tasks of F_A (L, N, d, r);
    ``seen`` (layer -> the smallest and largest (‖ΔW‖, label) so far) carries the check across batches of tasks.
    A zero ΔW does not count."""
    norms = delta_w_norms(*stacked)  # (L, N)
    seen = {} if seen is None else seen
    for name, row in zip(names, norms.tolist()):
        present = [(norm, label) for norm, label in zip(row, labels) if norm > 0] + seen.get(name, [])
        if not present:
            continue
        small, big = min(present), max(present)
        seen[name] = [small, big]
        if big[0] > MAX_SCALE_RATIO * small[0]:
            raise CompatibilityError(
                f"layer {name}: the ΔW of {big[1]} is {big[0] / small[0]:.1e} times that of {small[1]} (at most "
                f"{MAX_SCALE_RATIO:.0e} can share one float32 basis: the smaller would be lost to rounding). Check "
                "the larger adapter's weights and lora_alpha, or compress it in a store of its own."
            )


def _to_cpu(bases: Bases, tasks: Iterable[Task], names: list[str]) -> None:
    for name in names:
        bases[name] = {s: b.to("cpu") for s, b in bases[name].items()}
        for task in tasks:
            task.loadings[name] = {s: t.cpu() for s, t in task.loadings[name].items()}


def _in_order(bases: Bases, tasks: dict[str, Task], shapes: dict[str, LayerShape]) -> Bases:
    """Batches go by shape: put every layer back in the adapters' order."""
    for task in tasks.values():
        task.loadings = {name: task.loadings[name] for name in shapes}
        task.errors = {name: task.errors[name] for name in shapes if name in task.errors}
        task.act_errors = {name: task.act_errors[name] for name in shapes if name in task.act_errors}
    return {name: bases[name] for name in shapes}


# ---- cutting to k -----------------------------------------------------------------------------------
def kept(basis: basis_math.Basis, config: CompressConfig) -> int:
    """How many of a basis's directions ``config`` keeps: its k (clipped), or adaptive k."""
    if config.adaptive_k:
        return basis_math.choose_k(basis.spectrum[: basis.k], config.variance_threshold)
    return min(config.num_components, basis.k)


def layer_ks(bases: Bases, config: CompressConfig) -> LayerKs:
    return {name: {side: kept(b, config) for side, b in sides.items()} for name, sides in bases.items()}


def cut(bases: Bases, tasks: dict[str, Task], ks: LayerKs, copy: bool = False) -> tuple[Bases, dict[str, Task]]:
    """The first k directions per layer side, and every task's loadings on them (copies)."""
    new = {n: {s: b.truncate(ks[n][s], copy) for s, b in sides.items()} for n, sides in bases.items()}
    return new, {i: t.cut(ks) for i, t in tasks.items()}


def _cut_layers(bases: Bases, tasks: Iterable[Task], names: list[str], config: CompressConfig) -> None:
    """Cut the named layers in place (copies, so the directions cut off can be freed)."""
    ks = layer_ks({n: bases[n] for n in names}, config)
    for name in names:
        bases[name] = {s: b.truncate(ks[name][s], copy=True) for s, b in bases[name].items()}
        for task in tasks:
            task.loadings[name] = {s: t[..., : ks[name][s]].clone() for s, t in task.loadings[name].items()}


def round_to(precision: str, bases: Bases, tasks: Iterable[Task], names: list[str] | None = None) -> None:
    """Round the named layers' (default: all) bases, means and loadings to what ``precision`` stores, in place."""
    rule = get_precision(precision)
    if rule.name == "float32":
        return
    names = list(bases) if names is None else names
    for name in names:
        bases[name] = {
            side: replace(
                b,
                components=rule.round_trip(b.components),
                mean=None if b.mean is None else rule.round_trip(b.mean),
            )
            for side, b in bases[name].items()
        }
    for task in tasks:
        for name in names:
            task.loadings[name] = {side: rule.round_trip(t.detach()) for side, t in task.loadings[name].items()}


def round_again(method: str, shapes: dict[str, LayerShape], precision: str, bases: Bases, tasks: list[Task]) -> None:
    """``round_to`` for tasks already measured (a precision change; stored tasks rounded once more). Where it
    moves a layer's stored numbers, each task's recorded ΔW error there grows by how far its ΔW moved (the
    triangle inequality: an upper bound, as the original adapters are not at hand), and its activation-weighted
    error there, which needs the calibration, is dropped."""
    for name in shapes:
        sides, rows = bases[name], [t.loadings[name] for t in tasks]
        round_to(precision, bases, tasks, [name])
        after = [t.loadings[name] for t in tasks]
        if all(torch.equal(a, b) for a, b in zip(_stored(sides, rows), _stored(bases[name], after))):
            continue  # nothing moved: float32, or numbers already in this precision
        shape = shapes[name]
        moved = delta_w_distance(
            reconstruct(method, shape, sides, rows), reconstruct(method, shape, bases[name], after)
        )
        for task, distance in zip(tasks, moved.tolist()):
            if name in task.errors:
                error, norm = task.errors[name]
                task.errors[name] = (error + (distance / norm if norm > 0 else distance), norm)
            task.act_errors.pop(name, None)


def _stored(sides: dict[str, basis_math.Basis], rows: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """A layer's stored tensors: its bases' components and means, then each task's loadings."""
    return [t for b in sides.values() for t in (b.components, b.mean) if t is not None] + [
        t for sides_rows in rows for t in sides_rows.values()
    ]


# ---- reconstruction and ΔW errors -------------------------------------------------------------------
def reconstruct(
    method: str, shape: LayerShape, sides: dict[str, basis_math.Basis], loadings: list[dict[str, torch.Tensor]]
) -> Factors:
    """F_A (N, d_in, r), F_B (N, d_out, r) of N tasks' loadings (side -> (g, k)) at one layer.

    Directions on which every one of these tasks loads zero are left out of the sum: a task stored before an
    incremental add (its loadings padded with zeros) comes back bit for bit as it did before."""
    rule = get_method(method)
    out = []
    for side in SIDES:
        L = torch.stack([rows[side] for rows in loadings])  # (N, g, k)
        used = L.flatten(0, -2).ne(0).any(dim=0).nonzero()  # directions some task loads on
        k = int(used[-1]) + 1 if len(used) else 0
        out.append(rule.factors(sides[side].truncate(k), L[..., :k], shape.dim(side), shape.rank))
    return tuple(out)


def measure_errors(
    method: str, shapes: dict[str, LayerShape], bases: Bases, reference: dict[str, Factors], tasks: list[Task]
) -> None:
    """Record each task's ΔW error per layer against reference factors (of ``tasks``, in order)."""
    for name, factors in reference.items():
        approx = reconstruct(method, shapes[name], bases[name], [t.loadings[name] for t in tasks])
        err, norm = delta_w_errors(factors, approx)
        for task, e, n in zip(tasks, err.tolist(), norm.tolist()):
            task.errors[name] = (e, n)


# ---- adding tasks later -----------------------------------------------------------------------------
def project(method: str, bases: Bases, adapter: LoRAAdapter, task_id: str, factors: dict[str, Factors]) -> Task:
    """A new task's loadings on the fixed bases, from its canonical ``factors`` (see ``layer_factors``)."""
    rule = get_method(method)
    task = Task.from_adapter(adapter, task_id)
    for name, pair in factors.items():
        task.loadings[name] = {side: rule.loadings(bases[name][side], F)[0] for side, F in zip(SIDES, pair)}
    return task


def extend(
    method: str,
    bases: Bases,
    stored: list[Task],
    factors: dict[str, Factors],
    new: list[Task],
    max_k: int | None = None,
) -> None:
    """Grow each basis by what new adapters need (their canonical ``factors``) and give every task,
    stored and new, its loadings. Exact for stored tasks unless ``max_k`` caps the basis (streaming)."""
    rule = get_method(method)
    for name, pair in factors.items():
        for side, F in zip(SIDES, pair):
            old = torch.stack([t.loadings[name][side] for t in stored])  # (N, g, k)
            basis, loadings = basis_math.extend(bases[name][side], old, rule.to_vectors(F), max_k=max_k)
            bases[name][side] = basis
            for task, rows in zip(stored + new, loadings):
                task.loadings.setdefault(name, {})[side] = rows


def new_task_id(tasks: dict[str, Task], task_id: str) -> str:
    """``task_id`` if it is usable and not taken in ``tasks``."""
    task_id = check_task_id(task_id)
    if task_id in tasks:
        raise TaskError(f"task id {task_id!r} is already in this store; choose another id (--task-id).")
    return task_id


# ---- streaming --------------------------------------------------------------------------------------
def stream(
    paths: list[str | Path],
    task_ids: list[str] | None,
    config: CompressConfig,
    *,
    chunk: int,
    headroom: int,
    measure: bool,
    progress: bool,
    precision: str = "float32",
) -> Pieces:
    """``fit`` a chunk of adapter folders at a time: the first chunk is decomposed, each later one extends
    the bases, dropping the weakest directions beyond ``headroom · k``; then all is cut to k and rounded to
    the storage ``precision``. A second pass over the files measures each task's ΔW error."""
    ids = stream_task_ids(paths, task_ids)
    check_stream_options(chunk, headroom)
    chunks = [range(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    cap = CompressConfig(headroom * config.num_components, config.method)
    shapes, bases, tasks, scales = None, {}, {}, {}
    for part in tqdm(chunks, desc="streaming compress", disable=not progress):
        adapters = [load_adapter(paths[i], ids[i]) for i in part]
        if shapes is None:
            shapes, bases, tasks = fit(adapters, [ids[i] for i in part], config.method, scales=scales)
            bases, tasks = cut(bases, tasks, layer_ks(bases, cap))
            continue
        new = []
        for adapter in adapters:
            check_layers(shapes, adapter, "this store")
            new.append(Task.from_adapter(adapter, new_task_id(tasks | {t.id: t for t in new}, adapter.name)))
        factors = layer_factors(adapters, list(shapes))
        for name, pair in factors.items():
            check_scales([name], tuple(F[None] for F in pair), [a.source for a in adapters], scales)
        extend(config.method, bases, list(tasks.values()), factors, new, max_k=cap.num_components)
        tasks.update({t.id: t for t in new})
    bases, tasks = cut(bases, tasks, layer_ks(bases, config))
    round_to(precision, bases, tasks.values())
    if measure:
        for part in chunks:
            adapters = [load_adapter(paths[i], ids[i]) for i in part]
            measure_errors(
                config.method, shapes, bases, layer_factors(adapters, list(shapes)), [tasks[a.name] for a in adapters]
            )
    return shapes, bases, tasks


def stream_task_ids(paths: list[str | Path], task_ids: list[str] | None) -> list[str]:
    """One usable, distinct id per folder (the given ones, or the folder names), all checked before any is read."""
    ids = [folder_task_id(p) for p in paths] if task_ids is None else list(task_ids)
    if len(ids) != len(paths):
        raise TaskError(f"{len(ids)} task ids for {len(paths)} adapter folders; give one id per folder (--task-ids).")
    seen: dict[str, str] = {}
    for task_id, path in zip(ids, paths):
        check_task_id(task_id)
        if task_id in seen:
            raise TaskError(
                f"task id {task_id!r} is used twice ({seen[task_id]} and {path}); task ids must be unique — "
                "rename a folder or pass --task-ids."
            )
        seen[task_id] = str(path)
    return ids


def check_stream_options(chunk: object, headroom: object) -> None:
    """--stream CHUNK: a whole number of at least 2 (the first chunk starts the basis); headroom at least 1."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2:
        raise VLoRAError(
            f"--stream CHUNK must be a whole number of at least 2 (the first chunk starts the basis), got {chunk!r}; "
            "for example --stream 32."
        )
    if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 1:
        raise VLoRAError(f"headroom must be a whole number of at least 1 (a multiple of k), got {headroom!r}.")


# ---- gauging layers in batches ----------------------------------------------------------------------
def layer_batches(adapters: list[LoRAAdapter], names: list[str]) -> list[list[str]]:
    """Layer names in batches of one shape, each about _BATCH_NUMBERS numbers of factors over all adapters."""
    first = adapters[0].layers
    return _batches(
        names,
        key=lambda n: (first[n].A.shape, first[n].B.shape),
        size=lambda n: len(adapters) * (first[n].A.numel() + first[n].B.numel()),
    )


def layer_factors(adapters: list[LoRAAdapter], names: list[str]) -> dict[str, Factors]:
    """Canonical factors of the named layers for several adapters, a batch of same-shape layers per call."""
    out = {}
    for batch in layer_batches(adapters, names):
        F_A, F_B = batch_factors(adapters, batch)
        out.update({name: (F_A[i], F_B[i]) for i, name in enumerate(batch)})
    return out


def batch_factors(
    adapters: list[LoRAAdapter], names: list[str], device: str | torch.device | None = None, columns: bool = False
) -> Factors:
    """Canonical factors of same-shape layers: F_A (L, N, d_in, r), F_B (L, N, d_out, r), one gauge call
    (on ``device`` if given; with ``columns``, each column contiguous: see ``canonical_factors``)."""
    A = torch.stack([a.layers[n].A for n in names for a in adapters]).to(device)  # (L·N, r, d_in)
    B = torch.stack([a.layers[n].B for n in names for a in adapters]).to(device)
    scaling = torch.tensor([a.layers[n].scaling for n in names for a in adapters], device=device)
    return tuple(F.unflatten(0, (len(names), len(adapters))) for F in canonical_factors(A, B, scaling, columns))


def _batches(items: list, key: Callable, size: Callable) -> list[list]:
    """Items grouped by ``key`` (a shape), in order, each group cut into runs of about _BATCH_NUMBERS numbers."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out = []
    for group in groups.values():
        step = max(1, _BATCH_NUMBERS // max(size(group[0]), 1))
        out += [group[i : i + step] for i in range(0, len(group), step)]
    return out


# ---- validation -------------------------------------------------------------------------------------
def resolve_task_ids(adapters: list[LoRAAdapter], task_ids: list[str] | None) -> list[str]:
    """One usable, distinct id per adapter: the given ones, or the adapters' names."""
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


def shapes_of(adapter: LoRAAdapter) -> dict[str, LayerShape]:
    return {n: LayerShape(l.A.shape[1], l.B.shape[0], l.rank) for n, l in adapter.layers.items()}


def check_compatible(adapters: list[LoRAAdapter]) -> dict[str, LayerShape]:
    """All adapters must target the same layers with the same shapes and ranks: the shapes."""
    shapes = shapes_of(adapters[0])
    for other in adapters[1:]:
        check_layers(shapes, other, adapters[0].describe())
    return shapes


def compatibility_problems(adapters: list[LoRAAdapter]) -> dict[str, str]:
    """Every adapter that does not fit with the first one, with the message that says why and the fix."""
    if not adapters:
        return {}
    shapes, problems = shapes_of(adapters[0]), {}
    for other in adapters[1:]:
        try:
            check_layers(shapes, other, adapters[0].describe())
        except CompatibilityError as error:
            problems[other.describe()] = str(error)
    return problems


def check_layers(shapes: dict[str, LayerShape], adapter: LoRAAdapter, reference: str) -> None:
    """``adapter`` must target exactly the layers of ``shapes``, with the same shapes and ranks."""
    missing, extra = sorted(set(shapes) - set(adapter.layers)), sorted(set(adapter.layers) - set(shapes))
    if missing or extra:
        raise CompatibilityError(
            f"{adapter.describe()}: targets different modules than {reference}; "
            f"missing: {short_list(missing)}; extra: {short_list(extra)}. "
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
