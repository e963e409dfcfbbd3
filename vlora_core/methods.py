"""The basis methods: one table entry says everything a way of sharing a basis means.

A method cuts each task's canonical factor F (d, r) into g vectors of length D, which ``basis.fit``
shares across tasks; and it tells ``SubspaceLayer`` how to run a task from the shared basis without
rebuilding F: the basis as a matrix P (a, d) of rows, and a task's loadings L (g, k) expanded to
E (r, a), so that Fᵀ = E · P.

    flat  g = 1, D = d·r   the whole factor is one vector, centred PCA across tasks; k ≤ N − 1
                           P = [mean; components] cut into r rows each, E = [1, L] ⊗ I_r
    rank  g = r, D = d     each rank column is a vector (the Share basis), not centred; k ≤ min(N·r, d)
                           P = components, E = L

A third method is one more ``Method`` passed to ``register``; nothing else in vlora changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import basis as bases
from .errors import VLoRAError
from .options import BASIS_METHODS, agree


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help and the workbench
    k_limit: str  # the most directions the data allows, in words, for clipping notes
    centre: bool  # subtract the mean vector before the SVD
    to_vectors: Callable[[torch.Tensor], torch.Tensor]  # F (N, d, r) -> (N, g, D)
    from_vectors: Callable[[torch.Tensor, int, int], torch.Tensor]  # (N, g, D), d, r -> F (N, d, r)
    projection: Callable[[bases.Basis, int, int], torch.Tensor]  # basis, d, r -> P (a, d)
    expand: Callable[[torch.Tensor, int], torch.Tensor]  # L (..., g, k), r -> E (..., r, a)
    factor: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # L (..., g, k), P (a, d), r -> Fᵀ (..., r, d)
    columns: bool = False  # the vectors are F's columns: compress forms F with contiguous columns (a view to cut)

    def vectors_per_factor(self, d: int, r: int) -> int:
        """g: how many loading rows one task has at a layer side."""
        return self.to_vectors(torch.empty(1, d, r, device="meta")).shape[1]  # shapes only: nothing allocated

    def loadings(self, basis: bases.Basis, F: torch.Tensor) -> torch.Tensor:
        """Factors F (N, d, r) -> their loadings (N, g, k) on a fixed basis."""
        return bases.project(basis, self.to_vectors(F))

    def factors(self, basis: bases.Basis, loadings: torch.Tensor, d: int, r: int) -> torch.Tensor:
        """Loadings (N, g, k) -> the factors (N, d, r) they stand for."""
        return self.from_vectors(bases.reconstruct(basis, loadings), d, r)


def _flat_projection(basis: bases.Basis, d: int, r: int) -> torch.Tensor:
    V = torch.cat([basis.mean[None], basis.components])  # (1+k, d·r), each row a flattened (d, r) factor
    return V.reshape(-1, d, r).transpose(1, 2).reshape(-1, d)  # ((1+k)·r, d): row j·r+s = column s of V_j


def _flat_expand(L: torch.Tensor, r: int) -> torch.Tensor:
    c = F.pad(L[..., 0, :], (1, 0), value=1.0)  # (..., 1+k): the 1 weighs the mean
    eye = torch.eye(r, dtype=L.dtype, device=L.device)
    return (c[..., None, :, None] * eye[:, None, :]).flatten(-2)  # (..., r, 1+k, r) -> (..., r, (1+k)·r)


def _flat_factor(L: torch.Tensor, P: torch.Tensor, r: int) -> torch.Tensor:
    c = F.pad(L[..., 0, :], (1, 0), value=1.0)  # (..., 1+k)
    return (c @ P.view(c.shape[-1], -1)).unflatten(-1, (r, -1))  # (..., r·d) -> (..., r, d)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the table (or replace one of the same name); returns it."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The table entry for ``name``; an unknown name is an error listing the known ones."""
    if name not in METHODS:
        raise VLoRAError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[name]


register(
    Method(
        name="flat",
        summary=BASIS_METHODS["flat"],
        k_limit="N - 1 for the flat basis",
        centre=True,
        to_vectors=lambda F_: F_.reshape(F_.shape[0], 1, -1),
        from_vectors=lambda V, d, r: V.reshape(V.shape[0], d, r),
        projection=_flat_projection,
        expand=_flat_expand,
        factor=_flat_factor,
    )
)
register(
    Method(
        name="rank",
        summary=BASIS_METHODS["rank"],
        k_limit="min(N x r, d) for the rank basis",
        centre=False,
        to_vectors=lambda F_: F_.transpose(1, 2),
        from_vectors=lambda V, d, r: V.transpose(1, 2),
        projection=lambda basis, d, r: basis.components,
        expand=lambda L, r: L,
        factor=lambda L, P, r: L @ P,
        columns=True,
    )
)
agree(BASIS_METHODS, METHODS, "basis methods")
