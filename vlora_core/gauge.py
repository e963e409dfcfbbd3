"""The canonical gauge: one factorisation per ΔW, so the store depends on what an adapter does.

ΔW = scaling · B · A has many factorisations (B·R, R⁻¹·A for any invertible R). We write it as
U·S·Vᵀ and keep F_B = U·S^½ (d_out, r) and F_A = V·S^½ (d_in, r), so that ΔW = F_B · F_Aᵀ with the
scaling folded in. The sign of each singular pair is fixed by making the largest entry of F_B's column
positive.

All decompositions are of r x r matrices, batched over adapters, in float64 (the d-sized products
that form the factors run in float32): with the Grams
G_B = BᵀB = W_B Λ_B W_Bᵀ and G_A = A·Aᵀ = W_A Λ_A W_Aᵀ, the SVD of the core
C = scaling · Λ_B^½ W_Bᵀ W_A Λ_A^½ = U_c Σ V_cᵀ gives F_B = B · W_B Λ_B^-½ U_c Σ^½ and
F_A = Aᵀ · W_A Λ_A^-½ V_c Σ^½. The d-sized work is four (d x r)·(r x r) products per adapter.
"""

import torch

_RANK_TOL = 1e-12  # eigenvalues of a Gram below this share of its largest are treated as zero


def canonical_factors(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, r, d_in), B (N, d_out, r), scaling (N,) -> F_A (N, d_in, r), F_B (N, d_out, r), fp32."""
    A64, B64 = A.double(), B.double()
    lam_b, W_b = _eigh_psd(B64.transpose(1, 2) @ B64)  # (N, r), (N, r, r)
    lam_a, W_a = _eigh_psd(A64 @ A64.transpose(1, 2))
    core = scaling.double()[:, None, None] * (lam_b.sqrt()[:, :, None] * (W_b.transpose(1, 2) @ W_a)
                                              * lam_a.sqrt()[:, None, :])  # (N, r, r)
    U_c, sigma, Vh_c = torch.linalg.svd(core)
    root = sigma.sqrt()[:, None, :]  # (N, 1, r)
    T_b = (W_b * _inv_sqrt(lam_b)[:, None, :]) @ U_c * root  # (N, r, r)
    T_a = (W_a * _inv_sqrt(lam_a)[:, None, :]) @ Vh_c.transpose(1, 2) * root
    F_B = B.float() @ T_b.float()  # (N, d_out, r)
    F_A = A.float().transpose(1, 2) @ T_a.float()  # (N, d_in, r)
    signs = _column_signs(F_B)
    return F_A * signs, F_B * signs


def _eigh_psd(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lam, W = torch.linalg.eigh(G)
    return lam.clamp(min=0), W


def _inv_sqrt(lam: torch.Tensor) -> torch.Tensor:
    keep = lam > _RANK_TOL * lam.amax(dim=-1, keepdim=True)
    return torch.where(keep, lam.clamp(min=1e-300).rsqrt(), torch.zeros_like(lam))


def _column_signs(F: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column so that each column's largest-magnitude entry is positive."""
    index = F.abs().argmax(dim=1, keepdim=True)  # (N, 1, r)
    signs = torch.gather(F, 1, index).sign()
    return torch.where(signs == 0, torch.ones_like(signs), signs)
