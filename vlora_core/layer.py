"""SubspaceLayer: the module VLoRAModel puts on each targeted linear layer.

It adds a task's low-rank update to the frozen layer without ever forming ΔW (d_out x d_in). Each side
keeps its shared basis as one matrix P (a, d) whose rows are (direction, rank column) pairs, and a task's
loadings L (g, k) expand to a small E (r, a):

    F_Aᵀ = E_A · P_A  (r, d_in)      F_Bᵀ = E_B · P_B  (r, d_out)      ΔW = F_B · F_Aᵀ

with P and E as each basis method defines them (``methods``: flat, rank, ...).

The update x·ΔWᵀ = x · P_Aᵀ · E_Aᵀ · E_B · P_B is a matrix chain, multiplied in the cheaper of two
orders, chosen on every call from the shapes (flop counts in ``basis_first_is_cheaper``):

    basis first    h = x·P_Aᵀ once for the whole batch, then each row's E_A, E_B, then ·P_B
                   (few tokens: decoding one token at a time, mixed batches of short rows)
    factors first  F_Aᵀ, F_Bᵀ once per task from its loadings, then x·F_A·F_Bᵀ (many tokens: prefill)

A single active task that is not being trained takes a third way: its F_Aᵀ and F_Bᵀ are made on its first
forward after a switch and kept (``Factors``), so each later call is two rank-r products, as in a PEFT LoRA
layer. They are kept in float32 when the layer is half precision (PEFT's ``autocast_adapter_dtype`` does the
same): rank-r products in bf16 are several times slower than in fp32 on CPUs, and more exact in fp32. They are
made again when the loadings change in place (their version counter), so training and editing are seen.

Loadings being trained and mixed batches read the loadings on every call, so gradients reach them; switching
tasks only moves pointers either way. Glossary as in ``adapter``; x is (B, T, d_in); a_A, a_B are the two sides'
basis rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .basis import Basis
from .errors import VLoRAError
from .methods import get_method
from .records import LayerShape


# ---- the math ------------------------------------------------------------------------------------
def basis_first_is_cheaper(tokens: int, tasks: int, g: int, r: int, P_A: torch.Tensor, P_B: torch.Tensor) -> bool:
    """Multiply-adds of the two orders: ``tokens`` rows of x, ``tasks`` distinct loadings of g rows each."""
    (a_A, d_in), (a_B, d_out) = P_A.shape, P_B.shape
    basis_first = tokens * (a_A * d_in + a_A * r + r * a_B + a_B * d_out)
    factors_first = tasks * g * (a_A * d_in + a_B * d_out) + tokens * r * (d_in + d_out)
    return basis_first < factors_first


def dense_delta(FA_T: torch.Tensor, FB_T: torch.Tensor) -> torch.Tensor:
    """ΔW (d_out, d_in) = F_B · F_Aᵀ in fp32; only merging needs it."""
    return FB_T.float().T @ FA_T.float()


# ---- which base layers we can carry: (d_in, d_out) and how ΔW sits in their weight ----------------
@dataclass(frozen=True)
class Kind:
    features: Callable[[nn.Module], tuple[int, int]]  # -> (d_in, d_out)
    transposed: bool  # weight is (d_in, d_out) (GPT-2's Conv1D) instead of (d_out, d_in)


@functools.cache
def kinds() -> dict[type, Kind]:
    from transformers.pytorch_utils import Conv1D  # imported when a model is wrapped, not with vlora

    return {
        nn.Linear: Kind(lambda m: (m.in_features, m.out_features), transposed=False),
        Conv1D: Kind(lambda m: (m.weight.shape[0], m.weight.shape[1]), transposed=True),
    }


def layer_kind(module: nn.Module) -> Kind | None:
    return next((kind for cls, kind in kinds().items() if isinstance(module, cls)), None)


def update_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a kept task's update runs in: float32 for half-precision layers, else the layer's own."""
    return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else weight_dtype


# ---- the module --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factors:
    """The active task's factors, kept between calls, and what they were made from."""

    FA_T: torch.Tensor  # (r, d_in), in ``update_dtype``
    FB: torch.Tensor  # (d_out, r), the scaling folded in; contiguous for F.linear
    loadings: tuple[torch.Tensor, torch.Tensor]  # the L_A, L_B they were made from (identity)
    stamp: tuple  # their in-place version counters and the gain, then


@dataclass
class Rows:
    """A mixed batch at one layer: n distinct tasks, and which of them each row uses."""

    L_A: torch.Tensor  # (n, g, k_A)
    L_B: torch.Tensor  # (n, g, k_B)
    gain: torch.Tensor  # (n, 1, 1); 0 for rows that run the bare base model
    index: torch.Tensor  # (B,) long, into the n tasks


class SubspaceLayer(nn.Module):
    """A frozen linear (or Conv1D) layer plus the active task's update from a shared basis."""

    def __init__(self, base: nn.Module, shape: LayerShape, method: str):
        super().__init__()
        self.base = base
        self.shape = shape
        self.method = get_method(method)  # how P and E are cut from the basis and loadings
        self.kind = layer_kind(base)
        self.register_buffer("P_A", None, persistent=False)  # (a_A, d_in)
        self.register_buffer("P_B", None, persistent=False)  # (a_B, d_out)
        self.source: tuple[Basis, Basis] | None = None  # the basis objects P_A and P_B were cut from
        self.loadings: tuple[torch.Tensor, torch.Tensor] | None = None  # active task: L_A (g, k_A), L_B (g, k_B)
        self.gain = 1.0  # extra scaling of the active task (a lora_alpha override)
        self.rows: Rows | None = None  # set only while a mixed batch runs
        self.kept: Factors | None = None  # the active task's factors, made on its first forward (not a buffer)
        self.merged: torch.Tensor | None = None  # the base weight as it was before merge()

    @property
    def weight(self) -> torch.Tensor:  # for code that reads layer.weight (dtype, device, tying checks)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # ---- state ---------------------------------------------------------------------------------
    def use_bases(self, A: Basis, B: Basis) -> None:
        """Cut the shared projections from the bases, on this layer's device and dtype."""
        weight, shape = self.base.weight, self.shape
        self.P_A = self.method.projection(A, shape.d_in, shape.rank).to(weight.device, weight.dtype).contiguous()
        self.P_B = self.method.projection(B, shape.d_out, shape.rank).to(weight.device, weight.dtype).contiguous()
        self.source = (A, B)
        self.kept = None

    def cut_from(self, A: Basis, B: Basis) -> bool:
        """Whether the projections come from exactly these basis objects (identity, not values)."""
        return self.source is not None and self.source[0] is A and self.source[1] is B

    def point(self, L_A: torch.Tensor | None, L_B: torch.Tensor | None, gain: float = 1.0) -> None:
        """Make a task active (or none). Loadings already on this layer's device and dtype are pointed at, as
        are ones being trained (so gradients reach them); others are copied there once, here, not per forward."""
        self.loadings = None if L_A is None else (self._placed(L_A, self.P_A), self._placed(L_B, self.P_B))
        self.gain = gain
        self.kept = None

    @staticmethod
    def _placed(L: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        return L if L.requires_grad else L.to(P.device, P.dtype)

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` and friends move P_A and P_B; kept factors are made again where they now are."""
        self.kept = None
        return super()._apply(fn, *args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.rows is not None:
            rows = self.rows
            return out + self.update(x, rows.L_A, rows.L_B, rows.gain, self._row_index(x)).to(out.dtype)
        if self.loadings is None or self.merged is not None:
            return out
        if any(L.requires_grad for L in self.loadings):  # being trained: read them on every call
            return out + self.update(x, *self.loadings, self.gain).to(out.dtype)
        kept = self._kept()
        h = F.linear(x.to(kept.FA_T.dtype), kept.FA_T)  # (B, T, r)
        return out + F.linear(h, kept.FB).to(out.dtype)  # (B, T, d_out)

    def _kept(self) -> Factors:
        """The active task's factors, made again only when the loadings or the gain changed since."""
        L_A, L_B = self.loadings
        kept, stamp = self.kept, (_version(L_A), _version(L_B), self.gain)
        if kept is None or kept.loadings[0] is not L_A or kept.loadings[1] is not L_B or kept.stamp != stamp:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in and out of inference
                FA_T, FB_T = self.factors(L_A, L_B, self.gain, dtype=update_dtype(self.P_A.dtype))
            self.kept = kept = Factors(FA_T.contiguous(), FB_T.T.contiguous(), (L_A, L_B), stamp)
        return kept

    def update(self, x: torch.Tensor, L_A: torch.Tensor, L_B: torch.Tensor, gain, index=None) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out). One task: L (g, k), gain a float; rows: L (n, g, k), index (B,)."""
        P_A, P_B, r = self.P_A, self.P_B, self.shape.rank
        L_A, L_B = L_A.to(P_A.device, P_A.dtype), L_B.to(P_B.device, P_B.dtype)
        tasks = 1 if index is None else L_A.shape[0]
        if basis_first_is_cheaper(x.numel() // x.shape[-1], tasks, L_A.shape[-2], r, P_A, P_B):
            E_A, E_B = self.method.expand(L_A, r), _scaled(self.method.expand(L_B, r), gain)  # (..., r, a)
            E_A, E_B = (E_A, E_B) if index is None else (E_A[index], E_B[index])  # (B, r, a) per row
            h = F.linear(x, P_A)  # (B, T, a_A): the shared basis, once for the whole batch
            return (h @ E_A.transpose(-1, -2)) @ E_B @ P_B  # (B, T, r) -> (B, T, a_B) -> (B, T, d_out)
        FA_T, FB_T = self.factors(L_A, L_B, gain)  # (..., r, d_in), (..., r, d_out)
        FA_T, FB_T = (FA_T, FB_T) if index is None else (FA_T[index], FB_T[index])
        return (x @ FA_T.transpose(-1, -2)) @ FB_T  # (B, T, r) -> (B, T, d_out)

    def factors(
        self, L_A: torch.Tensor, L_B: torch.Tensor, gain=1.0, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F_Aᵀ (..., r, d_in) and F_Bᵀ (..., r, d_out), the scaling folded into F_B; in ``dtype`` (default: P's)."""
        P_A, P_B, r = self.P_A, self.P_B, self.shape.rank
        dtype = dtype or P_A.dtype
        P_A, P_B = P_A.to(dtype), P_B.to(dtype)
        L_A, L_B = L_A.to(P_A.device, dtype), L_B.to(P_B.device, dtype)
        return self.method.factor(L_A, P_A, r), _scaled(self.method.factor(L_B, P_B, r), gain)

    def _row_index(self, x: torch.Tensor) -> torch.Tensor:
        index = self.rows.index
        batch = x.shape[0] if x.dim() == 3 else 0
        if batch == 0 or batch % len(index):
            raise VLoRAError(
                f"a mixed batch of {len(index)} task ids reached a layer with input of shape {tuple(x.shape)}; "
                "pass one task id per row of input_ids (beam search may multiply rows by a whole number)."
            )
        return index.to(x.device).repeat_interleave(batch // len(index))  # generate() may expand each row

    # ---- merging -------------------------------------------------------------------------------
    def merge(self) -> None:
        """Add the active task's ΔW into the base weight; the weight's own values are kept for an exact undo."""
        with torch.no_grad():
            weight = self.base.weight  # (d_out, d_in), or (d_in, d_out) for Conv1D
            self.merged = weight.detach().clone()
            delta = dense_delta(*self.factors(*self.loadings, self.gain))
            delta = delta.T if self.kind.transposed else delta
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def unmerge(self) -> None:
        """The base weight exactly as it was before ``merge`` (in any dtype: no subtraction round-off)."""
        with torch.no_grad():
            self.base.weight.copy_(self.merged)
        self.merged = None

    def extra_repr(self) -> str:
        return f"d_in={self.shape.d_in}, d_out={self.shape.d_out}, r={self.shape.rank}"


def _scaled(t: torch.Tensor, gain) -> torch.Tensor:
    return t if isinstance(gain, float) and gain == 1.0 else t * gain


def _version(t: torch.Tensor) -> int | None:
    """How often ``t`` was changed in place (None for inference tensors, which keep no count)."""
    return None if t.is_inference() else t._version
