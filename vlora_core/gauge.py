"""The canonical gauge: one factorisation per ΔW, so the store depends on what an adapter does.

ΔW = scaling · B · A has many factorisations (B·R, R⁻¹·A for any invertible R). We write it as
U·Σ·Vᵀ and keep F_B = U·Σ^½ (d_out, r) and F_A = V·Σ^½ (d_in, r), so that ΔW = F_B · F_Aᵀ with the
scaling folded in; singular values descending. The sign of each singular pair is fixed by making the
sum of F_B's column positive (the sum comes from B's column sums and the r x r transform: no pass over F_B).

Only r x r matrices are decomposed, in float64, batched over every matrix given (many adapters and
layers in one call); the d-sized work — two Grams and two (d x r)·(r x r) products per adapter — runs
in float32. With G_B = BᵀB = W Λ Wᵀ, B = Q·Λ^½·Wᵀ where Q = B·W·Λ^-½ has orthonormal columns, so
ΔW = Q·M with M = scaling · Λ^½·Wᵀ·A. The eigenvectors of the r x r matrix
M·Mᵀ = scaling² · Λ^½·Wᵀ·G_A·W·Λ^½ = U_c·Σ²·U_cᵀ (G_A = A·Aᵀ) give the SVD ΔW = (Q·U_c)·Σ·Vᵀ, hence
    F_B = B · (W Λ^-½ U_c Σ^½)        F_A = Aᵀ · (scaling · W Λ^½ U_c Σ^-½).
T_B·T_Aᵀ = scaling · W·Wᵀ whatever the accuracy of Λ and Σ, so F_B·F_Aᵀ = ΔW to float32 rounding even
though the Grams are only float32.
"""

import torch

_RANK_TOL = 1e-12  # eigenvalues below this share of the largest are treated as zero


def canonical_factors(
    A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, columns: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (..., r, d_in), B (..., d_out, r), scaling (...) -> F_A (..., d_in, r), F_B (..., d_out, r), fp32.

    With ``columns`` each factor is the transposed view of an (..., r, d) tensor: the same numbers, each column
    (a rank vector) contiguous, for methods whose vectors are the columns."""
    A, B = A.float(), B.float()
    s = scaling.double()[..., None, None]
    lam, W = _eigh_psd((B.mT @ B).double())  # (..., r), (..., r, r)
    WR = W * lam.sqrt()[..., None, :]  # W Λ^½
    sigma2, U = _eigh_psd(s * s * (WR.mT @ (A @ A.mT).double() @ WR))  # Σ², ascending
    sigma2, U = sigma2.flip(-1)[..., None, :], U.flip(-1)
    T_b = (W * _inv_sqrt(lam)[..., None, :]) @ U * sigma2.pow(0.25)
    T_a = s * (WR @ U) * _inv_sqrt(sigma2).sqrt()
    signs = _column_signs(B.sum(dim=-2, keepdim=True).double() @ T_b)  # (..., 1, r)
    T_a, T_b = (T_a * signs).float(), (T_b * signs).float()
    if columns:
        return (T_a.mT @ A).mT, (T_b.mT @ B.mT).mT
    return A.mT @ T_a, B @ T_b


def _eigh_psd(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, W = torch.linalg.eigh(G)
    return lam.clamp(min=0), W


def _inv_sqrt(lam: torch.Tensor) -> torch.Tensor:
    """λ^-½, and 0 where λ is zero against the largest eigenvalue of its matrix."""
    keep = lam > _RANK_TOL * lam.amax(dim=-1, keepdim=True)
    return torch.where(keep, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))


def _column_signs(column_sums: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column: the one that makes the column's sum positive (+1 for a zero sum)."""
    return torch.where(column_sums >= 0, 1.0, -1.0).to(column_sums.dtype)
