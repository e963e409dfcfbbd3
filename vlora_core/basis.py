"""Shared bases: the SVD that turns N adapters' factors into one basis plus small loadings.

Each layer and side (A or B) is handled alone. Its canonical factor F (d, r) — F_A = V·S^½ or
F_B = U·S^½, see ``gauge`` — is cut into vectors by the method, and the vectors of all N tasks are
fitted with one thin SVD:

    vectors   (N, g, D)   g vectors of length D per task
    basis     mean (D,) or None, components (k, D) with orthonormal rows, spectrum (m,) the singular values
              formed (all of them, or the first k for a fixed k), energy Σ s² of the whole spectrum
    loadings  (N, g, k)   vectors ≈ mean + loadings @ components

How a factor is cut into vectors is the method's business (``methods``: flat, rank). A fixed k well below
the data's size is fitted by ``krylov.top_svd`` (the first k directions only, and the energy, so variance
explained stays exact); otherwise, and for every direction, by ``_thin_svd``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import krylov


@dataclass(frozen=True)
class Basis:
    """One layer side's shared directions: ``reconstruct(basis, loadings)`` gives every task's vectors back."""

    components: torch.Tensor  # (k, D), orthonormal rows, by decreasing singular value (``extend`` appends)
    spectrum: torch.Tensor  # (m',) the leading singular values of the fitted (centred) data (m' ≥ k), descending;
    # after ``extend`` without max_k, the first k are the root energy along each direction, in basis order
    mean: torch.Tensor | None = None  # (D,) for centring methods
    energy: float | None = None  # Σ s² over the whole spectrum; None: the spectrum is whole, energy its sum

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def total_energy(self) -> float:
        """The fitted data's (centred) energy, Σ s² over every singular value, formed or not."""
        return float(self.spectrum.double().pow(2).sum()) if self.energy is None else self.energy

    def truncate(self, k: int, copy: bool = False) -> Basis:
        """The first k directions: a view of this basis's, or a copy that lets the rest be freed."""
        kept = self.components[:k]
        return replace(self, components=kept.clone() if copy and k < self.k else kept)

    def to(self, device: str | torch.device) -> Basis:
        """The same basis on ``device``."""
        mean = None if self.mean is None else self.mean.to(device)
        return Basis(self.components.to(device), self.spectrum.to(device), mean, self.energy)

    def variance_explained(self, k: int | None = None) -> float:
        """Share of the data's (centred) energy that the first k directions carry."""
        total = self.total_energy
        k = self.k if k is None else k
        return 1.0 if total == 0 else min(1.0, (self.spectrum.double()[:k] ** 2).sum().item() / total)


def max_components(num_vectors: int, dim: int, centre: bool) -> int:
    """The most directions the data can carry: N·g vectors (one fewer once centred), at most D."""
    return max(0, min(num_vectors - int(centre), dim))


def fit(vectors: torch.Tensor, centre: bool, rtol: float = 1e-6) -> tuple[Basis, torch.Tensor]:
    """Every direction the data (N, g, D) has, by one thin SVD. Returns the full basis and its loadings."""
    return fit_many(vectors[None], centre, rtol)[0]


def fit_many(
    vectors: torch.Tensor, centre: bool, rtol: float = 1e-6, max_k: int | None = None, hint: krylov.Hint | None = None
) -> list[tuple[Basis, torch.Tensor]]:
    """``fit`` for L layers of one shape at once: vectors (L, N, g, D) -> L (basis, loadings (N, g, k)).

    Directions whose singular value is below ``rtol`` of the largest carry no data and are not kept;
    the spectrum keeps every value. With ``max_k`` only that many directions are formed (the spectrum is
    still whole): what a fixed k needs, at a fraction of the d-sized work when k is well below N·g. A ``hint``
    carries the Krylov subspace size from one call to the next (``krylov.Hint``: less work, the same precision).
    """
    L, N, g, D = vectors.shape
    X = vectors.reshape(L, N * g, D).float()
    if (
        max_k is not None
        and 0 < max_k < max_components(N * g, D, centre)
        and krylov.cheaper_than_dense(N * g, D, max_k)
    ):
        return _fit_top(X, N, g, centre, max_k, rtol, hint)
    return _fit_dense(X, N, g, centre, rtol, max_k)


def _fit_dense(
    X: torch.Tensor, N: int, g: int, centre: bool, rtol: float, max_k: int | None
) -> list[tuple[Basis, torch.Tensor]]:
    """``fit_many`` by ``_thin_svd`` of X (L, N·g, D): the whole spectrum, at most ``max_k`` directions."""
    L, _, D = X.shape
    m = max_components(N * g, D, centre)
    mean = X.mean(dim=1, keepdim=True) if centre else None  # (L, 1, D)
    U, S, Vh = _thin_svd(X, centred=centre, top=max_k)  # (L, N·g, k'), (L, m), (L, k', D)
    out = []
    for i in range(L):
        largest = S[i, 0] if m else 0
        kept = min(int((S[i, :m] > rtol * largest).sum()) if largest > 0 else 0, Vh.shape[1])
        basis = Basis(
            components=Vh[i, :kept].contiguous(),
            spectrum=S[i, :m].contiguous(),
            mean=None if mean is None else mean[i, 0],
        )
        out.append((basis, (U[i, :, :kept] * S[i, :kept]).reshape(N, g, kept)))
    return out


def _fit_top(
    X: torch.Tensor, N: int, g: int, centre: bool, k: int, rtol: float, hint: krylov.Hint | None
) -> list[tuple[Basis, torch.Tensor]]:
    """``fit_many`` of the first k directions by ``krylov.top_svd``; layers it leaves go the dense way."""
    top = krylov.top_svd(X, k, centred=centre, hint=hint)
    mean = X.mean(dim=1) if centre else None  # (L, D)
    out = []
    for i in range(X.shape[0]):
        if not top.converged[i]:
            out += _fit_dense(X[i : i + 1], N, g, centre, rtol, k)
            continue
        S = top.S[i]
        kept = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        basis = Basis(
            components=top.Vh[i, :kept].contiguous(),
            spectrum=S.contiguous(),
            mean=None if mean is None else mean[i],
            energy=float(top.energy[i]),
        )
        out.append((basis, top.loadings[i, :, :kept].reshape(N, g, kept)))
    return out


def _thin_svd(
    X: torch.Tensor, centred: bool = False, top: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (..., R, k), S (..., m), Vh (..., k, D) of X (..., R, D), or of X minus its row mean if ``centred``.

    With fewer rows than columns (the usual case) this goes through R x R Grams, never a D x D one, in
    two passes (as in CholeskyQR2): the eigenvectors U₁ of the float32 Gram rotate X to rows Y = U₁ᵀX
    that are nearly orthogonal, and the Gram of Y — accurate relative to each row's own norm — is
    decomposed again. Small singular values thus come out as accurate as the float32 data allows,
    not relative to the largest one; all d-sized work is float32, the R x R eigenproblems float64.
    Centring is done on the R x R side (U₁ is orthogonal to the all-ones vector), so X is not copied.
    With ``top``, the second pass keeps the first ``top`` rows of Y only (k = top directions); the rest
    of the spectrum comes from the first pass. Otherwise k = m, every direction.
    """
    rows, dim = X.shape[-2:]
    if rows > dim:
        if centred:
            X = X - X.mean(dim=-2, keepdim=True)
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return (U, S, Vh) if top is None else (U[..., :top], S, Vh[..., :top, :])
    lam1, U1 = _eigh(X @ X.mT, centred)  # (..., R) and (..., R, R), or R − 1 of them centred; float64
    U1 = U1 if top is None else U1[..., :top]
    Y = U1.mT.float() @ X
    lam, U2 = _eigh(Y @ Y.mT, False)
    S = torch.cat([lam, lam1[..., U1.shape[-1] :]], dim=-1).clamp(min=0).sqrt()
    k = U2.shape[-1]
    Vh = (U2.mT / S[..., :k].clamp(min=1e-30)[..., None]).float() @ Y  # rows along the principal axes
    return (U1 @ U2).float(), S.float(), Vh


def _eigh(G: torch.Tensor, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and vectors of a Gram (..., R, R), largest first, float64.

    With ``centred``, those of the Gram of the centred rows, R − 1 of them, each vector exactly orthogonal
    to the all-ones vector: G is taken to an orthonormal basis Q of that vector's complement.
    """
    G = G.double()
    if not centred:
        lam, U = torch.linalg.eigh(G)
        return lam.flip(-1), U.flip(-1)
    Q = _complement_of_ones(G.shape[-1], G.device)  # (R, R − 1)
    lam, V = torch.linalg.eigh(Q.T @ G @ Q)
    return lam.flip(-1), Q @ V.flip(-1)


def _complement_of_ones(R: int, device) -> torch.Tensor:
    """R − 1 orthonormal columns orthogonal to (1, ..., 1): a Householder reflection of e_R onto it."""
    w = torch.full((R,), R**-0.5, dtype=torch.float64, device=device)
    w[-1] -= 1
    H = torch.eye(R, dtype=torch.float64, device=device)
    if w.norm() > 0:
        w = w / w.norm()
        H = H - 2 * torch.outer(w, w)
    return H[:, :-1]


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


def extend(
    basis: Basis, loadings: torch.Tensor, vectors: torch.Tensor, rtol: float = 1e-5, max_k: int | None = None
) -> tuple[Basis, torch.Tensor]:
    """Add tasks' vectors (c, g, D) without the original data of the tasks already stored.

    The basis grows by the directions of the new vectors it lacks (residual above ``rtol``). Without
    ``max_k`` they are appended: the stored directions, the mean and every stored task's loadings stay as
    they are (padded with zeros), so a stored task reconstructs bit for bit as before, in any storage
    precision, however many tasks are added; the spectrum then lists the energy each direction carries, in
    basis order. With ``max_k`` (streaming) the basis is rotated (and re-centred) to principal axes of all
    the data and the weakest directions beyond ``max_k`` are dropped.
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
    if max_k is None:  # appended: nothing stored moves (rotating would round every stored task again)
        carried = Z.double().pow(2).sum(dim=0)  # (k + m,) the energy along each direction
        spectrum = torch.cat([carried.sqrt().float(), basis.spectrum[k:]])  # then what was never formed
        energy = None if basis.energy is None else basis.energy + float(new.double().pow(2).sum())
        return replace(basis, components=extended, spectrum=spectrum, energy=energy), Z.reshape(N + c, g, -1)
    mean = basis.mean
    if mean is not None:
        shift = Z.mean(dim=0)  # re-centre on all N + c tasks
        mean, Z = mean + shift @ extended, Z - shift
    _, S, Hh = torch.linalg.svd(Z, full_matrices=False)  # rotate to principal axes
    keep = min(max_k, len(S))
    components = Hh[:keep] @ extended
    tail = torch.cat([S[keep:], basis.spectrum[k:]])  # energy no longer (or never) kept stays unexplained
    spectrum = torch.cat([S[:keep], tail.sort(descending=True).values])
    energy = None if basis.energy is None else float(S.double().pow(2).sum()) + unformed_energy(basis)
    basis = Basis(components=components, spectrum=spectrum, mean=mean, energy=energy)
    return basis, (Z @ Hh[:keep].T).reshape(N + c, g, keep)


def unformed_energy(basis: Basis) -> float:
    """The energy of the data beyond a basis's k directions that its spectrum does not list (0 if it is whole)."""
    if basis.energy is None:
        return 0.0
    return max(0.0, basis.energy - float(basis.spectrum.double().pow(2).sum()))


def _split(x: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of x in the row space of P, and the residual orthogonal to it."""
    coords = x @ P.T
    return coords, x - coords @ P
