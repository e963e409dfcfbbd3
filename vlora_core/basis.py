"""Shared bases: the SVD that turns N adapters' factors into one basis plus small loadings.

Each layer and side (A or B) is handled alone. Its canonical factor F (d, r) — F_A = V·S^½ or
F_B = U·S^½, see ``gauge`` — is cut into vectors by the method, and the vectors of all N tasks are
fitted with one thin SVD:

    vectors   (N, g, D)   g vectors of length D per task
    basis     mean (D,) or None, components (k, D) with orthonormal rows, spectrum (m,) all singular values
    loadings  (N, g, k)   vectors ≈ mean + loadings @ components

Methods (a table, see METHODS):
    flat  g = 1, D = d·r: the whole factor is one vector, centred PCA across tasks; k ≤ N − 1.
    rank  g = r, D = d: each rank column is a vector (the Share basis); not centred; k ≤ min(N·r, d).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class Method:
    name: str
    centre: bool  # subtract the mean vector before the SVD
    to_vectors: Callable[[torch.Tensor], torch.Tensor]  # (N, d, r) -> (N, g, D)
    from_vectors: Callable[[torch.Tensor, int, int], torch.Tensor]  # (N, g, D), d, r -> (N, d, r)
    summary: str


METHODS: dict[str, Method] = {
    "flat": Method(
        name="flat",
        centre=True,
        to_vectors=lambda F: F.reshape(F.shape[0], 1, -1),
        from_vectors=lambda V, d, r: V.reshape(V.shape[0], d, r),
        summary="each factor flattened, centred PCA across tasks: k loadings per layer and side",
    ),
    "rank": Method(
        name="rank",
        centre=False,
        to_vectors=lambda F: F.transpose(1, 2),
        from_vectors=lambda V, d, r: V.transpose(1, 2),
        summary="rank columns of all tasks share k directions (Share): k x r loadings per layer and side",
    ),
}


@dataclass(frozen=True)
class Basis:
    components: torch.Tensor  # (k, D), orthonormal rows, by decreasing singular value
    spectrum: torch.Tensor  # (m,) every singular value of the fitted (centred) data, descending
    mean: torch.Tensor | None = None  # (D,) for centring methods

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def truncate(self, k: int) -> Basis:
        return replace(self, components=self.components[:k])

    def variance_explained(self, k: int | None = None) -> float:
        """Share of the data's (centred) energy that the first k directions carry."""
        energy = self.spectrum.double() ** 2
        total = energy.sum().item()
        k = self.k if k is None else k
        return 1.0 if total == 0 else energy[:k].sum().item() / total


def max_components(num_vectors: int, dim: int, centre: bool) -> int:
    """The most directions the data can carry: N·g vectors (one fewer once centred), at most D."""
    return max(0, min(num_vectors - int(centre), dim))


def fit(vectors: torch.Tensor, centre: bool, rtol: float = 1e-6) -> tuple[Basis, torch.Tensor]:
    """Every direction the data has, by one thin SVD. Returns the full basis and its loadings.

    With fewer vectors than dimensions (the usual case) the SVD is taken through the small
    (N·g) x (N·g) Gram matrix in float64 — never a D x D covariance. Directions whose singular value
    is below ``rtol`` of the largest carry no data and are not kept; the spectrum keeps every value.
    """
    N, g, D = vectors.shape
    X = vectors.reshape(N * g, D).float()  # (N·g, D)
    mean = X.mean(dim=0) if centre else None
    if centre:
        X = X - mean
    U, S, Vh = _thin_svd(X)  # (N·g, m), (m,), (m, D)
    m = max_components(N * g, D, centre)
    kept = int((S[:m] > rtol * S[0]).sum()) if m and S[0] > 0 else 0
    loadings = (U[:, :kept] * S[:kept]).reshape(N, g, kept)
    return Basis(components=Vh[:kept].contiguous(), spectrum=S[:m].contiguous(), mean=mean), loadings


def _thin_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, dim = X.shape
    if rows > dim:
        return torch.linalg.svd(X, full_matrices=False)
    X64 = X.double()
    lam, U = torch.linalg.eigh(X64 @ X64.T)  # ascending
    lam, U = lam.flip(0).clamp(min=0), U.flip(1)
    S = lam.sqrt()
    Vh = (U.T @ X64) / S.clamp(min=1e-300)[:, None]
    return U.float(), S.float(), Vh.float()


def project(basis: Basis, vectors: torch.Tensor) -> torch.Tensor:
    """Loadings of new vectors (N, g, D) on a fixed basis: (N, g, k)."""
    X = vectors.float()
    if basis.mean is not None:
        X = X - basis.mean
    return X @ basis.components.T


def reconstruct(basis: Basis, loadings: torch.Tensor) -> torch.Tensor:
    """(N, g, k) loadings -> (N, g, D) vectors."""
    X = loadings[..., : basis.k] @ basis.components
    return X if basis.mean is None else X + basis.mean


def choose_k(spectrum: torch.Tensor, threshold: float) -> int:
    """Smallest k whose directions explain at least ``threshold`` of the energy (at least 1)."""
    energy = spectrum.double() ** 2
    if energy.sum() == 0:
        return min(1, len(spectrum))
    share = energy.cumsum(0) / energy.sum()
    reached = (share >= threshold - 1e-12).nonzero()
    k = int(reached[0]) + 1 if len(reached) else len(spectrum)
    return min(max(k, 1), len(spectrum))


def extend(basis: Basis, loadings: torch.Tensor, vectors: torch.Tensor, rtol: float = 1e-5,
           max_k: int | None = None) -> tuple[Basis, torch.Tensor]:
    """Add tasks' vectors (c, g, D) without the original data of the tasks already stored.

    The basis grows by the directions of the new vectors it lacks (residual above ``rtol``), then is
    rotated (and re-centred) to principal axes of all stored data. Without ``max_k`` nothing is
    truncated, so every task already stored reconstructs exactly as before: its loadings are
    re-expressed, not padded. With ``max_k`` (streaming) the weakest directions beyond it are dropped.
    Returns the new basis and the loadings of all tasks, the new ones last: (N + c, g, k').
    """
    N, g, k = loadings.shape
    c = vectors.shape[0]
    P = basis.components  # (k, D)
    x = vectors.reshape(c * g, -1).float() - (0 if basis.mean is None else basis.mean)  # (c·g, D)
    coords, resid = _split(x, P)
    _, S_r, Vh_r = _thin_svd(resid)  # (c·g,), (c·g, D)
    scale = max(x.norm().item(), torch.finfo(torch.float32).tiny)
    Q = Vh_r[S_r > rtol * scale]  # (m, D) new directions
    Q = _split(Q, P)[1]  # one more Gram-Schmidt pass against P for orthogonality
    Q = torch.linalg.qr(Q.T)[0].T if len(Q) else Q
    extended = torch.cat([P, Q])  # (k + m, D)
    old = torch.cat([loadings.reshape(N * g, k), loadings.new_zeros(N * g, len(Q))], dim=1)
    new = torch.cat([coords, resid @ Q.T], dim=1)  # (c·g, k + m)
    Z = torch.cat([old, new])  # ((N + c)·g, k + m): every task in the extended coordinates
    mean = basis.mean
    if mean is not None:
        shift = Z.mean(dim=0)  # re-centre on all N + c tasks
        mean, Z = mean + shift @ extended, Z - shift
    _, S, Hh = torch.linalg.svd(Z, full_matrices=False)  # rotate to principal axes
    keep = len(S) if max_k is None else min(max_k, len(S))
    components = Hh[:keep] @ extended
    tail = torch.cat([S[keep:], basis.spectrum[k:]])  # energy no longer (or never) kept stays unexplained
    spectrum = torch.cat([S[:keep], tail.sort(descending=True).values])
    return Basis(components=components, spectrum=spectrum, mean=mean), (Z @ Hh[:keep].T).reshape(N + c, g, keep)


def _split(x: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of x in the row space of P, and the residual orthogonal to it."""
    coords = x @ P.T
    return coords, x - coords @ P
