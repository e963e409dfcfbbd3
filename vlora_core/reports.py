"""What ``vlora info`` reports, torch-free: k and variance explained per layer side, ΔW error per task and layer.

Each function reads only a store's numbers (a basis's ``k`` and ``variance_explained()``, each task's recorded
``errors``, ``num_parameters()``), so it reports a loaded ``SharedSubspace`` and a ``StoreView`` read from the
manifest alike (``vlora_core.quality`` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass


def describe(method: str, num_tasks: int, num_layers: int, layer_ks: dict[str, dict[str, int]]) -> str:
    """A store in one line, as ``repr(SharedSubspace)`` writes it."""
    ks = sorted({k for sides in layer_ks.values() for k in sides.values()})
    return (
        f"SharedSubspace(method={method!r}, tasks={num_tasks}, layers={num_layers}, k={ks[0] if len(ks) == 1 else ks})"
    )


@dataclass(frozen=True)
class LayerReport:
    layer: str
    k_a: int
    k_b: int
    variance_a: float  # share of variance the kept A directions explain
    variance_b: float
    error: float  # ΔW relative error over all tasks at this layer (nan when unknown)


def layer_reports(subspace) -> list[LayerReport]:
    rows = []
    for name, sides in subspace.bases.items():
        ks = {s: b.k for s, b in sides.items()}
        var = {s: b.variance_explained() for s, b in sides.items()}
        pairs = [t.errors[name] for t in subspace.tasks.values() if name in t.errors]
        rows.append(LayerReport(name, ks["A"], ks["B"], var["A"], var["B"], _pooled(pairs)))
    return rows


def task_errors(subspace) -> dict[str, float]:
    """Each task's ΔW relative error over all layers (nan when unknown, e.g. a freshly initialised task)."""
    return {t.id: _pooled(list(t.errors.values())) for t in subspace.tasks.values()}


def task_activation_errors(subspace) -> dict[str, float]:
    """Each task's activation-weighted error ‖(ΔW − ΔŴ)·C^½‖ / ‖ΔW·C^½‖ over all layers, where a calibrated fit
    recorded it (nan for a task added later, whose inputs' C the store does not hold)."""
    return {t.id: _pooled(list(getattr(t, "act_errors", {}).values())) for t in subspace.tasks.values()}


def layer_activation_errors(subspace) -> dict[str, float]:
    """The activation-weighted error per layer over all tasks that recorded it (nan where none did)."""
    return {
        name: _pooled([t.act_errors[name] for t in subspace.tasks.values() if name in getattr(t, "act_errors", {})])
        for name in subspace.bases
    }


def overall_error(subspace) -> float:
    """The ΔW relative error pooled over every task and layer (nan when unknown)."""
    return _pooled([pair for t in subspace.tasks.values() for pair in t.errors.values()])


def _pooled(pairs: list[tuple[float, float]]) -> float:
    """sqrt(Σ err² ‖ΔW‖² / Σ ‖ΔW‖²) from per-part (relative error, norm) pairs."""
    if not pairs:
        return float("nan")
    num = sum((e * n) ** 2 for e, n in pairs)
    den = sum(n * n for _, n in pairs)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def summary(subspace) -> dict:
    reports = layer_reports(subspace)
    params = subspace.num_parameters()
    ks = [r.k_a for r in reports] + [r.k_b for r in reports]
    return {
        "method": subspace.method,
        "tasks": len(subspace.tasks),
        "layers": len(reports),
        "k_min": min(ks),
        "k_max": max(ks),
        "variance_a_mean": sum(r.variance_a for r in reports) / len(reports),
        "variance_b_mean": sum(r.variance_b for r in reports) / len(reports),
        "basis_parameters": params["basis"],
        "parameters_per_task": params["per_task"],
        "task_errors": task_errors(subspace),
    } | _calibrated(subspace)


def _calibrated(subspace) -> dict:
    """What a calibrated store adds to the summary: its calibration and each task's activation-weighted error."""
    calibration = getattr(subspace, "calibration", None)
    if calibration is None:
        return {}
    return {"calibration": dict(calibration), "task_activation_errors": task_activation_errors(subspace)}
