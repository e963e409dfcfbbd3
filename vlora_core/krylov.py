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
k + b Ritz vectors are rotated once more in float64 (the second pass of ``_thin_svd``: their Gram from
one more product, so near-equal singular values are told apart as well as the float32 data allows).
A layer that has not converged when the subspace reaches ``max_dim`` is left to the dense path.

All d-sized work is float32 products; only m x m problems are float64. Work runs on the smaller side of
X (its rows when R ≤ D, else its columns). ``cheaper_than_dense`` says when this beats ``_thin_svd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOL = 1e-6  # converged when each of the k Ritz residuals is below this share of the largest eigenvalue
SETTLE = 1e-5  # Ritz values that moved less than this share since the last step are worth checking
SEED = 0  # of the random start block: fixed, so a compress is deterministic


@dataclass(frozen=True)
class TopSVD:
    """k leading singular triplets of L matrices X (R, D), and which layers converged."""

    loadings: torch.Tensor  # (L, R, k) = U·S: each row's coordinates on the components
    S: torch.Tensor  # (L, k) singular values, descending
    Vh: torch.Tensor  # (L, k, D) orthonormal rows: the components
    energy: torch.Tensor  # (L,) float64 ‖X‖² (centred): the whole spectrum's Σ s², for variance explained
    converged: torch.Tensor  # (L,) bool: False where the dense path must decide


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


def top_svd(X: torch.Tensor, k: int, centred: bool = False, max_dim: int | None = None) -> TopSVD:
    """The k leading singular triplets of X (L, R, D), or of X minus its row mean if ``centred``."""
    L, R, D = X.shape
    X = X.float()
    mean = X.mean(dim=-2, keepdim=True) if centred else None  # (L, 1, D)
    op = _Operator(X, mean, transposed=R > D)
    n = op.left_dim
    b = min(block_size(k), n)
    max_dim = min(n, max_dim or max(8 * b, n // 2))
    generator = torch.Generator().manual_seed(SEED)
    omega = torch.randn(op.right_dim, b, generator=generator).to(X.device)
    size = max_dim + b
    basis_all = X.new_empty(L, n, size)  # the blocks Q_j side by side (filled as they come: no re-concatenation)
    images = X.new_empty(L, op.right_dim, size)  # Aᵀ·Q_j of every block, kept for the second pass
    basis_all[..., :b] = torch.linalg.qr(op.forward(omega.expand(L, -1, -1))).Q
    T = X.new_zeros(L, size, size)
    m, width = b, b  # directions so far; the last block's
    previous = None  # the last step's leading Ritz values
    while True:
        basis, block = basis_all[..., :m], basis_all[..., m - width : m]  # (L, n, m), (L, n, width)
        images[..., m - width : m] = op.backward(block)  # (L, n', width) = Aᵀ·Q_j
        Z = op.forward(images[..., m - width : m])  # (L, n, width) = A·Aᵀ·Q_j
        coeffs = basis.mT @ Z
        Z = Z - basis @ coeffs
        again = basis.mT @ Z  # second Gram-Schmidt pass
        Z = Z - basis @ again
        Q_next, R_next = _orthonormal(Z, basis)
        T[:, :m, m - width : m] = coeffs + again
        T[:, m : m + width, m - width : m] = R_next
        step = min(b, n - m)
        last = m + step > max_dim or step == 0
        values = torch.linalg.eigvalsh(T[:, :m, :m]).flip(-1)[:, :k]  # cheap: is it worth the eigenvectors?
        if last or (previous is not None and bool(((values - previous).abs() <= SETTLE * values[:, :1]).all())):
            theta, Y = _ritz(T[:, :m, :m])
            residual = (R_next.double() @ Y[:, m - width :, :k]).norm(dim=-2)  # (L, k) block Lanczos residuals
            converged = (residual <= TOL * theta[:, :1].clamp(min=0)).all(dim=-1) | (m >= n)
            if last or bool(converged.all()):
                break
        previous = values
        basis_all[..., m : m + step] = Q_next[..., :step]
        m, width = m + step, step
    return _second_pass(op, basis, images[..., :m], Y[..., : min(m, k + b)], k, converged)


def _orthonormal(Z: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, R with Z = Q·R and Q orthonormal and orthogonal to ``basis``, also where Z is (nearly) rank deficient:
    QR fills such columns with arbitrary directions, which are projected off the basis and orthonormalised
    again (their rows of R are zero, so Z = Q·R still holds)."""
    Q, R = torch.linalg.qr(Z)
    Q = Q - basis @ (basis.mT @ Q)
    Q2, R2 = torch.linalg.qr(Q)
    return Q2, R2 @ R


def _ritz(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetrised T (L, m, m), largest first, float64."""
    T = T.double()
    theta, Y = torch.linalg.eigh((T + T.mT) / 2)
    return theta.flip(-1), Y.flip(-1)


def _second_pass(
    op: _Operator, basis: torch.Tensor, images: torch.Tensor, Y: torch.Tensor, k: int, converged: torch.Tensor
) -> TopSVD:
    """Rotate the leading Ritz vectors once more with a float64 eigenproblem of their own Gram."""
    U1 = basis @ Y.float()  # (L, n, k') orthonormal, left side
    W = images @ Y.float()  # (L, n', k') = Aᵀ·U1, from the blocks' images: no product with A
    G = W.double().mT @ W.double()  # (L, k', k')
    lam, Y2 = _ritz(G)
    k = min(k, Y2.shape[-1])
    S = lam[:, :k].clamp(min=0).sqrt()
    left = U1 @ Y2[..., :k].float()  # (L, n, k) orthonormal
    right = W @ Y2[..., :k].float()  # (L, n', k) = Aᵀ·left = right singular vectors · S
    if op.transposed:  # left is D-sized: the components; right holds the loadings
        Vh, loadings = left.mT, right
    else:
        Vh = (right / S.float().clamp(min=1e-30)[:, None, :]).mT
        loadings = left * S.float()[:, None, :]
    return TopSVD(loadings.contiguous(), S.float(), Vh.contiguous(), op.energy(), converged)


class _Operator:
    """A = X − 1·meanᵀ (or its transpose, so that the left side is the smaller one), by products only."""

    def __init__(self, X: torch.Tensor, mean: torch.Tensor | None, transposed: bool):
        self.X, self.mean, self.transposed = X, mean, transposed
        R, D = X.shape[-2:]
        self.left_dim, self.right_dim = (D, R) if transposed else (R, D)

    def _times(self, W: torch.Tensor) -> torch.Tensor:  # Xc (R, D) @ W (D, c)
        out = self.X @ W
        return out if self.mean is None else out - self.mean @ W

    def _times_t(self, Q: torch.Tensor) -> torch.Tensor:  # Xcᵀ (D, R) @ Q (R, c), as (Qᵀ·X)ᵀ: X stays row-major
        out = (Q.mT @ self.X).mT
        return out if self.mean is None else out - self.mean.mT @ Q.sum(dim=-2, keepdim=True)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        """A·W: right side -> left side."""
        return self._times_t(W) if self.transposed else self._times(W)

    def backward(self, Q: torch.Tensor) -> torch.Tensor:
        """Aᵀ·Q: left side -> right side."""
        return self._times(Q) if self.transposed else self._times_t(Q)

    def energy(self) -> torch.Tensor:
        """(L,) ‖A‖² in float64."""
        X = self.X if self.mean is None else self.X - self.mean
        return torch.linalg.vector_norm(X, dim=-1).double().pow(2).sum(dim=-1)  # row norms float32, sum float64
