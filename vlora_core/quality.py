"""How good a subspace is: variance explained per layer side, and ΔW error per task and layer.

ΔW errors come from r x r Gram matrices, never from d_out x d_in products. With the residuals
E = F − G of the approximation G, the error is written so that every term is small when E is small
(no cancellation of large numbers, so fp32 is enough):
    F_B F_Aᵀ − G_B G_Aᵀ = E_B G_Aᵀ + F_B E_Aᵀ
    ‖·‖² = ⟨E_BᵀE_B, G_AᵀG_A⟩ + ⟨F_BᵀF_B, E_AᵀE_A⟩ + 2 ⟨E_BᵀF_B, G_AᵀE_A⟩
where ⟨X, Y⟩ = Σ X ∘ Y and ‖XYᵀ‖² = ⟨XᵀX, YᵀY⟩.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .methods import get_method
from .precision import get_precision
from .reports import LayerReport, layer_reports, overall_error, summary, task_errors  # noqa: F401  (torch-free)


def delta_w_errors(reference: tuple[torch.Tensor, torch.Tensor], approx: tuple[torch.Tensor, torch.Tensor]):
    """Relative ΔW error and ‖ΔW‖ per task: factors F_A (N, d_in, r), F_B (N, d_out, r) -> (N,), (N,)."""
    (F_A, F_B), (G_A, G_B) = reference, approx
    E_A, E_B = F_A - G_A, F_B - G_B

    def gram(X, Y):  # (N, d, r), (N, d, r) -> (N, r, r)
        return X.transpose(1, 2) @ Y

    def inner(X, Y):  # batched Frobenius inner product of r x r matrices
        return (X * Y).sum(dim=(1, 2))

    FbFb = gram(F_B, F_B)
    err = (
        inner(gram(E_B, E_B), gram(G_A, G_A)) + inner(FbFb, gram(E_A, E_A)) + 2 * inner(gram(E_B, F_B), gram(G_A, E_A))
    )
    norm = inner(FbFb, gram(F_A, F_A)).clamp(min=0).sqrt()
    err = err.clamp(min=0).sqrt()
    return torch.where(norm > 0, err / norm.clamp(min=1e-30), err), norm


def delta_w_gap(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]):
    """Relative ‖ΔW − ΔW'‖ per task for two factorisations in any gauge: F_A (N, d_in, r), F_B (N, d_out, r) and
    G_A (N, d_in, r'), G_B (N, d_out, r') -> (N,) (absolute where ΔW is zero).

    ΔW − ΔW' = [F_B, G_B]·[F_A, −G_A]ᵀ, so its squared norm is ⟨XᵀX, YᵀY⟩ of (r + r') x (r + r') Grams, in
    float64: whatever the two gauges, the result is good to about 1e-8 of ‖ΔW‖ (``delta_w_errors`` is cheaper
    and exact for small errors, but only when both factorisations share a gauge)."""
    F_A, F_B = reference
    gap = delta_w_distance(reference, other)
    norm = ((F_B.double().mT @ F_B.double()) * (F_A.double().mT @ F_A.double())).sum(dim=(1, 2)).clamp(min=0).sqrt()
    return torch.where(norm > 0, gap / norm.clamp(min=1e-300), gap)


def delta_w_distance(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]):
    """‖ΔW − ΔW'‖ per task (float64, any gauges; see ``delta_w_gap``) -> (N,)."""
    (F_A, F_B), (G_A, G_B) = reference, other
    X = torch.cat([F_B, G_B], dim=-1).double()  # (N, d_out, r + r')
    Y = torch.cat([F_A, -G_A], dim=-1).double()  # (N, d_in, r + r')
    return ((X.mT @ X) * (Y.mT @ Y)).sum(dim=(1, 2)).clamp(min=0).sqrt()


def delta_w_norms(F_A: torch.Tensor, F_B: torch.Tensor) -> torch.Tensor:
    """‖ΔW‖ = ⟨F_BᵀF_B, F_AᵀF_A⟩^½ per task, float64, for factors (..., d, r) of any gauge -> (...,). The r x r
    Grams are formed in float32 (below 2^64 for factors the adapter reader accepts: ``adapter._check_magnitude``;
    in float64 where they are not finite, e.g. after calibration's whitening) and multiplied in float64."""
    grams = [F.mT @ F for F in (F_A, F_B)]
    if not all(bool(G.isfinite().all()) for G in grams):
        grams = [F.double().mT @ F.double() for F in (F_A, F_B)]
    return (grams[0].double() * grams[1].double()).sum(dim=(-2, -1)).clamp(min=0).sqrt()


def stored_bytes(subspace, bytes_per_number: int | None = None) -> int:
    """Bytes of the shared basis plus every task's loadings in the store's precision (int8: with its scales),
    or at ``bytes_per_number``; extras, singular values and file headers not counted."""
    if bytes_per_number is not None:
        params = subspace.num_parameters()
        return bytes_per_number * (params["basis"] + params["per_task"] * len(subspace.tasks))
    rule = get_precision(getattr(subspace, "dtype", "float32"))
    shapes = [b.components.shape for sides in subspace.bases.values() for b in sides.values()]
    shapes += [b.mean.shape for sides in subspace.bases.values() for b in sides.values() if b.mean is not None]
    shapes += [t.shape for task in subspace.tasks.values() for sides in task.loadings.values() for t in sides.values()]
    return sum(rule.num_bytes(tuple(shape)) for shape in shapes)


def cut_bytes(subspace, k, dtype: str | None = None) -> tuple[int, int]:
    """(shared basis, every task's loadings) bytes of ``subspace`` cut at ``k`` directions per layer side (an int,
    or layer -> side -> k), stored in ``dtype`` (default: its own): what ``stored_bytes`` counts of that cut,
    from the shapes alone (nothing is cut or rounded)."""
    rule, basis, loadings = get_precision(dtype or subspace.dtype), 0, 0
    for name, sides in subspace.bases.items():
        for side, b in sides.items():
            kept = min(k if isinstance(k, int) else k[name][side], b.k)
            basis += rule.num_bytes((kept, b.components.shape[1]))
            basis += 0 if b.mean is None else rule.num_bytes(tuple(b.mean.shape))
            for task in subspace.tasks.values():
                loadings += rule.num_bytes((*task.loadings[name][side].shape[:-1], kept))
    return basis, loadings


def break_even_k(subspace, original_bytes: int, dtype: str | None = None) -> int | None:
    """The largest uniform k at which ``subspace`` cut at k (stored in ``dtype``) takes fewer bytes than
    ``original_bytes``, the adapters it holds; None when even k = 1 does not (bytes grow with k)."""
    k_max = max((b.k for sides in subspace.bases.values() for b in sides.values()), default=0)
    low, high = 0, k_max  # sum(cut_bytes(k)) < original_bytes holds at low (k = 0: nothing), is looked for up to high
    while low < high:
        mid = (low + high + 1) // 2
        if sum(cut_bytes(subspace, mid, dtype)) < original_bytes:
            low = mid
        else:
            high = mid - 1
    return low or None


@dataclass(frozen=True)
class KSweep:
    """ΔW error for every uniform k, computed once from an untruncated decomposition (the bytes of each cut:
    ``cut_bytes``)."""

    ks: list[int]
    errors: torch.Tensor  # (K, L, N) relative ΔW error per k, layer, task
    norms: torch.Tensor  # (L, N) ‖ΔW‖ per layer and task
    layers: list[str]
    task_ids: list[str]

    def task_errors(self, k: int) -> torch.Tensor:
        """(N,) each task's ΔW relative error over all layers, at the nearest swept k not above ``k``."""
        e = self.errors[self._index(k)]  # (L, N)
        return ((e * self.norms) ** 2).sum(0).div(self.norms.pow(2).sum(0).clamp(min=1e-30)).sqrt()

    def layer_errors(self, k: int) -> torch.Tensor:
        """(L,) ΔW relative error per layer over all tasks."""
        e = self.errors[self._index(k)]
        return ((e * self.norms) ** 2).sum(1).div(self.norms.pow(2).sum(1).clamp(min=1e-30)).sqrt()

    def _index(self, k: int) -> int:
        return max([i for i, swept in enumerate(self.ks) if swept <= k] or [0])


def sweep_ks(full, ks: list[int] | None = None, progress=None) -> KSweep:
    """ΔW error of ``full`` (from SharedSubspace.decompose) cut at every k: no SVD is recomputed.

    Per layer, each side's reconstruction grows from one k to the next by only the added directions, so
    the whole sweep costs one reconstruction plus the r x r Grams of each k.
    """
    ks = ks or k_grid(max(b.k for sides in full.bases.values() for b in sides.values()))
    layers, tasks, rule = list(full.shapes), list(full.tasks.values()), get_method(full.method)
    errors = torch.zeros(len(ks), len(layers), len(tasks))  # (K, L, N)
    norms = torch.zeros(len(layers), len(tasks))
    for li, name in enumerate(progress(layers) if progress else layers):
        shape, reference = full.shapes[name], full.stacked_factors(name)
        sides = {side: _Growing(full.bases[name][side], tasks, name, side) for side in ("A", "B")}
        for ki, k in enumerate(ks):
            approx = tuple(rule.from_vectors(sides[s].at(k), shape.dim(s), shape.rank) for s in ("A", "B"))
            errors[ki, li], norms[li] = delta_w_errors(reference, approx)
    return KSweep(ks, errors, norms, layers, [t.id for t in tasks])


class _Growing:
    """One layer side's reconstruction of every task, grown direction by direction as k rises."""

    def __init__(self, basis, tasks, name: str, side: str):
        self.basis = basis
        self.loadings = torch.stack([t.loadings[name][side] for t in tasks])  # (N, g, K)
        self.vectors = torch.zeros(*self.loadings.shape[:2], basis.components.shape[1])  # (N, g, D)
        if basis.mean is not None:
            self.vectors += basis.mean
        self.k = 0

    def at(self, k: int) -> torch.Tensor:
        k = min(k, self.basis.k)
        if k > self.k:  # ks only rise within a sweep
            self.vectors += self.loadings[..., self.k : k] @ self.basis.components[self.k : k]
            self.k = k
        return self.vectors


def k_grid(k_max: int, dense_up_to: int = 16, points: int = 40) -> list[int]:
    """Every k up to ``dense_up_to``, then roughly geometric steps to ``k_max``."""
    dense = list(range(1, min(k_max, dense_up_to) + 1))
    if k_max <= dense_up_to:
        return dense
    ratio = (k_max / dense_up_to) ** (1 / max(1, points - dense_up_to))
    tail = sorted({min(k_max, round(dense_up_to * ratio**i)) for i in range(1, points - dense_up_to + 1)})
    return dense + [k for k in tail if k > dense_up_to] + ([k_max] if k_max not in tail else [])
