"""The canonical gauge: one factorisation per ΔW, so the store depends on what an adapter does.

ΔW = scaling · B · A has many factorisations (B·R, R⁻¹·A for any invertible R). We write it as
U·S·Vᵀ and keep F_B = U·S^½ (d_out, r) and F_A = V·S^½ (d_in, r), so that ΔW = F_B · F_Aᵀ with the
scaling folded in. The sign of each singular pair is fixed by making the largest entry of U's column
positive. Cost: two thin QRs and an r × r SVD per adapter and layer, batched over adapters.
"""

import torch


def canonical_factors(A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, r, d_in), B (N, d_out, r), scaling (N,) -> F_A (N, d_in, r), F_B (N, d_out, r), fp32."""
    A, B = A.float(), B.float()
    Q_b, R_b = torch.linalg.qr(B)  # (N, d_out, r), (N, r, r)
    Q_a, R_a = torch.linalg.qr(A.transpose(1, 2))  # (N, d_in, r), (N, r, r)
    core = scaling.float()[:, None, None] * R_b @ R_a.transpose(1, 2)  # (N, r, r)
    U, S, Vh = torch.linalg.svd(core)  # ΔW = (Q_b U) S (Q_a Vhᵀ)ᵀ
    U, V = Q_b @ U, Q_a @ Vh.transpose(1, 2)  # (N, d_out, r), (N, d_in, r)
    signs = _column_signs(U)  # (N, 1, r)
    root = S.sqrt()[:, None, :]  # (N, 1, r)
    return V * signs * root, U * signs * root


def _column_signs(U: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column so that each column's largest-magnitude entry is positive."""
    index = U.abs().argmax(dim=1, keepdim=True)  # (N, 1, r)
    signs = torch.gather(U, 1, index).sign()
    return torch.where(signs == 0, torch.ones_like(signs), signs)
