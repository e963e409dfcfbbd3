"""The top k singular directions of many same-shape matrices at once, without a full decomposition.

A fixed k needs only the k leading singular vectors of each layer side's data X (R, D) — R vectors
of length D, centred or not. ``basis._thin_svd`` forms the R x R Gram and its full eigendecomposition:
R³ work that dominates when R is large (the rank basis: R = N·r). Here a block Krylov subspace is grown
instead, b directions at a time, with thin products X·W and Qᵀ·X only:

    Q₀ = orth(X·Ω)                 Ω (D, b) a fixed random block: the same inputs give the same basis
    Q_{j+1} = orth(X·Xᵀ·Q_j ⟂ Q₀..Q_j)         Krylov blocks, kept orthonormal (two Gram-Schmidt passes)
    T = Qᵀ·X·Xᵀ·Q  (m, m)          read off the orthogonalisation coefficients, no extra product

The eigenpairs of T give the Ritz vectors, and the block Lanczos residual ‖R_{j+1}·Y_last‖ says how far
each is from an exact singular pair (checked once the k leading Ritz values have settled: eigenvalues alone
are half the cost of the vectors). Once the first k are within ``TOL`` of the largest, the leading
k + b Ritz vectors are rotated once more in float64 (the second pass of ``_thin_svd``: their Gram from the
blocks' images Xᵀ·Q_j, kept, so near-equal singular values are told apart as well as the float32 data
allows). A layer that has not converged when the subspace reaches ``max_dim`` is left to the dense path.

All d-sized work is float32 products; only m x m problems are float64. Work runs on the smaller side of
X (its rows when R ≤ D, else its columns), on blocks held as rows — Q_jᵀ (b, n) and Q_jᵀ·X — so every
product reads X as it lies and every block is one contiguous write. A ``Hint`` passes the subspace size at
which one batch of layers converged on to the next: the layers of one model need about the same, so the
Ritz values are not watched on the way there. ``cheaper_than_dense`` says when this beats ``_thin_svd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOL = 1e-6  # converged when each of the k Ritz residuals is below this share of the largest eigenvalue
SETTLE = 1e-5  # Ritz values that moved less than this share since the last step are worth checking
SEED = 0  # of the random start block: fixed, so a compress is deterministic
DRIFT = 1e-6  # a new block overlapping the basis by more than this (Z nearly rank deficient) is orthonormalised again


@dataclass(frozen=True)
class TopSVD:
    """k leading singular triplets of L matrices X (R, D), and which layers converged."""

    loadings: torch.Tensor  # (L, R, k) = U·S: each row's coordinates on the components
    S: torch.Tensor  # (L, k) singular values, descending
    Vh: torch.Tensor  # (L, k, D) orthonormal rows: the components
    energy: torch.Tensor  # (L,) float64 ‖X‖² (centred): the whole spectrum's Σ s², for variance explained
    converged: torch.Tensor  # (L,) bool: False where the dense path must decide
    dim: int  # the size of the Krylov subspace at the end


@dataclass
class Hint:
    """The Krylov subspace size at which the previous batch of a fit converged (0: none yet). ``top_svd`` checks
    convergence at every step from that size on, without watching the Ritz values before it, and updates it.
    Only the work depends on it: every layer still converges below ``TOL`` (or goes the dense way)."""

    dim: int = 0


def block_size(k: int) -> int:
    """Directions added per Krylov step: k plus room for the next ones, a multiple of 8."""
    return -(-max(k + 8, 16) // 8) * 8


def cheaper_than_dense(rows: int, dim: int, k: int) -> bool:
    """Whether the Krylov path is expected to beat ``_thin_svd``'s Gram + full eigh for data (rows, dim).

    Dense costs about n²·n' (the Gram, n = the smaller side, n' the larger) plus 17·n³ (float64 eigh,
    measured relative to the Gram's float32 products); the Krylov path about ten thin products of width
    b at twice the cost per number: 20·b·n·n', and its m x m eigenproblems, which make it slower below
    n = 12·b (measured: n = 128, b = 16 takes 1.6x the dense time; n = 256 0.7x; n = 512 0.07x)."""
    n, n_other = min(rows, dim), max(rows, dim)
    b = block_size(k)
    return 12 * b < n and 20 * b * n * n_other < n * n * n_other + 17 * n**3


def top_svd(
    X: torch.Tensor, k: int, centred: bool = False, max_dim: int | None = None, hint: Hint | None = None
) -> TopSVD:
    """The k leading singular triplets of X (L, R, D), or of X minus its row mean if ``centred``."""
    L, R, D = X.shape
    X = X.float()
    mean = X.mean(dim=-2, keepdim=True) if centred else None  # (L, 1, D)
    op = _Operator(X, mean, transposed=R > D)
    n = op.left_dim
    b = min(block_size(k), n)
    max_dim = min(n, max_dim or max(8 * b, n // 2))
    generator = torch.Generator().manual_seed(SEED)
    omega = torch.randn(op.right_dim, b, generator=generator).to(X.device).mT  # (b, n') rows
    size = max_dim + b
    rows = X.new_empty(L, size, n)  # the blocks Q_jᵀ one under the other, filled as they come
    images = X.new_empty(L, size, op.right_dim)  # Q_jᵀ·A = (Aᵀ·Q_j)ᵀ of every block, kept for the second pass
    rows[:, :b] = _orthonormal(op.forward(omega.expand(L, -1, -1)), None)[0]
    T = X.new_zeros(L, size, size)
    m, width = b, b  # directions so far; the last block's
    check_from = 0 if hint is None else hint.dim  # 0: the Ritz values say when to check
    previous = None  # the last step's leading Ritz values, while they are watched
    while True:
        basis = rows[:, :m]  # (L, m, n)
        image = images[:, m - width : m]
        image.copy_(op.backward(rows[:, m - width : m]))  # (L, width, n') = (Aᵀ·Q_j)ᵀ
        Z = op.forward(image)  # (L, width, n) = (A·Aᵀ·Q_j)ᵀ
        coeffs = Z @ basis.mT  # (L, width, m)
        Z = torch.baddbmm(Z, coeffs, basis, alpha=-1)
        again = Z @ basis.mT  # second Gram-Schmidt pass
        Z = torch.baddbmm(Z, again, basis, alpha=-1)
        Q_next, R_next = _orthonormal(Z, basis)
        T[:, :m, m - width : m] = (coeffs + again).mT
        T[:, m : m + width, m - width : m] = R_next
        step = min(b, n - m)
        last = m + step > max_dim or step == 0
        if check_from:
            check = m >= check_from
        else:
            values = torch.linalg.eigvalsh(T[:, :m, :m]).flip(-1)[:, :k]  # cheap: is it worth the eigenvectors?
            check = previous is not None and bool(((values - previous).abs() <= SETTLE * values[:, :1]).all())
            previous = values
        if last or check:
            theta, Y = _ritz(T[:, :m, :m])
            residual = (R_next.double() @ Y[:, m - width :, :k]).norm(dim=-2)  # (L, k) block Lanczos residuals
            converged = (residual <= TOL * theta[:, :1].clamp(min=0)).all(dim=-1) | (m >= n)
            if last or bool(converged.all()):
                break
        rows[:, m : m + step] = Q_next[:, :step]
        m, width = m + step, step
    if hint is not None:
        hint.dim = m
    return _second_pass(op, basis, images[:, :m], Y[..., : min(m, k + b)], k, converged)


def _orthonormal(Z: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows Q and R with Z = Rᵀ·Q, Q's rows orthonormal and orthogonal to ``basis``'s rows, also where Z is
    (nearly) rank deficient: QR fills such rows with arbitrary directions, which are projected off the basis
    and orthonormalised again (their rows of R are zero, so Z = Rᵀ·Q still holds)."""
    Q, R = torch.linalg.qr(Z.mT)  # Zᵀ (n, width) is column-major: no copy
    if basis is None:
        return Q.mT, R
    overlap = basis @ Q  # (L, m, width): at rounding level unless Z was (nearly) rank deficient
    if bool(overlap.abs().amax() <= DRIFT):
        return Q.mT, R
    Q2, R2 = torch.linalg.qr(torch.baddbmm(Q, basis.mT, overlap, alpha=-1))
    return Q2.mT, R2 @ R


def _ritz(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetrised T (L, m, m), largest first, float64."""
    T = T.double()
    theta, Y = torch.linalg.eigh((T + T.mT) / 2)
    return theta.flip(-1), Y.flip(-1)


def _second_pass(
    op: _Operator, basis: torch.Tensor, images: torch.Tensor, Y: torch.Tensor, k: int, converged: torch.Tensor
) -> TopSVD:
    """Rotate the leading Ritz vectors once more with a float64 eigenproblem of their own Gram."""
    Yt = Y.float().mT  # (L, k', m)
    U1 = Yt @ basis  # (L, k', n) orthonormal rows, left side
    W = Yt @ images  # (L, k', n') = (Aᵀ·U1ᵀ)ᵀ, from the blocks' images: no product with A
    lam, Y2 = _ritz(W.double() @ W.double().mT)  # of the (L, k', k') Gram
    k = min(k, Y2.shape[-1])
    S = lam[:, :k].clamp(min=0).sqrt()
    Y2 = Y2[..., :k].float().mT  # (L, k, k')
    left = Y2 @ U1  # (L, k, n) orthonormal rows
    right = Y2 @ W  # (L, k, n') = (Aᵀ·leftᵀ)ᵀ: the right singular vectors times S
    if op.transposed:  # left is D-sized: the components; right holds the loadings
        Vh, loadings = left, right.mT
    else:
        Vh = right / S.float().clamp(min=1e-30)[:, :, None]
        loadings = left.mT * S.float()[:, None, :]
    return TopSVD(loadings.contiguous(), S.float(), Vh.contiguous(), op.energy(), converged, basis.shape[-2])


class _Operator:
    """A = X − 1·meanᵀ (or its transpose, so that the left side is the smaller one) applied to blocks of rows
    P (c, ·) from the right, P·Aᵀ or P·A, by products with X as it lies (row-major)."""

    def __init__(self, X: torch.Tensor, mean: torch.Tensor | None, transposed: bool):
        self.X, self.mean, self.transposed = X, mean, transposed
        R, D = X.shape[-2:]
        self.left_dim, self.right_dim = (D, R) if transposed else (R, D)

    def _times(self, P: torch.Tensor) -> torch.Tensor:  # P (c, R) @ Xc (R, D)
        out = P @ self.X
        return out if self.mean is None else torch.baddbmm(out, P.sum(dim=-1, keepdim=True), self.mean, alpha=-1)

    def _times_t(self, P: torch.Tensor) -> torch.Tensor:  # P (c, D) @ Xcᵀ (D, R)
        out = P @ self.X.mT
        return out if self.mean is None else out - P @ self.mean.mT

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        """(A·Wᵀ)ᵀ = W·Aᵀ: rows on the right side -> rows on the left side."""
        return self._times(W) if self.transposed else self._times_t(W)

    def backward(self, Q: torch.Tensor) -> torch.Tensor:
        """(Aᵀ·Qᵀ)ᵀ = Q·A: rows on the left side -> rows on the right side."""
        return self._times_t(Q) if self.transposed else self._times(Q)

    def energy(self) -> torch.Tensor:
        """(L,) ‖A‖² in float64."""
        X = self.X if self.mean is None else self.X - self.mean
        return torch.linalg.vector_norm(X, dim=-1).double().pow(2).sum(dim=-1)  # row norms float32, sum float64
