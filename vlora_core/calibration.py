"""Activation-aware bases: fit the shared basis where the model's inputs are, not in plain weight space.

A ΔW error along directions the layer's inputs never take costs nothing; one along their main directions
costs behaviour. With calibration prompts and a base model, each targeted layer's inputs x (d_in) over every
token give its second moment C = Σ xxᵀ / T (streamed by forward hooks, one prompt at a time: no activation is
kept), and the basis is fitted to minimise the activation-weighted error

    ‖X·(ΔW − ΔŴ)ᵀ‖_F  =  ‖(ΔW − ΔŴ)·C^½‖_F        instead of  ‖ΔW − ΔŴ‖_F.

The design (the simplest one we found that keeps every other part of vlora unchanged):

1. **Whiten.** S = C_λ^½ (symmetric, by eigh in float64) with C damped, C_λ = C + λ·mean(diag C)·I, so S is
   invertible (λ = ``DEFAULT_DAMPING`` unless asked; at λ → ∞ the fit is the plain one). Each adapter's ΔW is
   taken to the whitened space, ΔW' = ΔW·S, and gauged there (``gauge``): ΔW' = F'_B·F'_Aᵀ with F'_A =
   S·F_A. The whitened gauge balances the two sides by ΔW's action on the inputs, so the B side too is
   weighted by how strongly each output direction is excited (for the rank basis the B side's Gram becomes
   Σ_t (ΔW_t·C·ΔW_tᵀ)^½ instead of Σ_t (ΔW_t·ΔW_tᵀ)^½).
2. **Fit** the bases exactly as without calibration (the method's vectors, the same SVD, the same cut to k) on
   the whitened factors: the plain fit in the whitened metric.
3. **Store in the plain space.** The A side's directions (and the flat basis's mean) are taken back by S⁻¹
   block by block — every method's vector is a (d, m) block of rows of the factor, row-major (m = r for flat,
   1 for rank; ``check_layout``) — and the directions are made orthonormal again in the plain metric by a QR
   (float64), the tasks' A loadings re-expressed exactly (L = L'·Rᵀ). A QR keeps nested spans, so the first
   k' directions of the store still span the first k' whitened ones.

So the store is an ordinary store — an orthonormal basis per layer side and loadings, F_A stored in the
plain space — and everything that reads one (load, export, ``VLoRAModel``, merge, serving) works unchanged:
each stored task stands for its activation-aware approximation ΔŴ. It holds no whitening (C is d_in² a
layer, more than the basis itself); the manifest records what the calibration was (the prompt file's
SHA-256, the base model, λ, the token count) and each task's activation-weighted error next to its ΔW error.

What follows from not storing C:
- ``add`` (projection on the fixed basis) and ``add --incremental`` gauge and project a new adapter in the
  plain metric. ``--incremental`` stores it exactly anyway; a projection is the plain least-squares fit within
  the activation-chosen subspace. For the rank basis that is Π_B·ΔW·Π_A whatever the gauge; for the flat
  basis the new task's plain gauge is not the stored tasks' whitened one, so a projected task is fitted less
  well than on a plain store (recompress with --calibration to fit it in the metric).
- Cutting a calibrated store to a smaller k later (``truncated``) keeps the activation-chosen directions but
  gives the plain projection onto them; compress at the k wanted to get the activation-aware fit at that k.
- The spectrum and variance explained are the whitened ones (the share of the activation-weighted energy).

At full k nothing is lost: every adapter's whitened factors lie in the whitened span, S⁻¹ maps it onto the
plain span, so export gives ΔW back to float32 rounding times the whitening's condition (√ of C_λ's, which λ
bounds by √(d_in/λ)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import CompatibilityError, VLoRAError, short_list
from .gauge import canonical_factors
from .options import CALIBRATION_DAMPING as DEFAULT_DAMPING

# λ from 1e-6 (C_λ's condition number at most about 1e6 / the share of C's mean eigenvalue: S⁻¹ stays far inside float32)
# to 1e3 (C_λ is then nearly λ·mean(diag C)·I: the plain fit; larger λ only adds rounding).
MIN_DAMPING, MAX_DAMPING = 1e-6, 1e3
MAX_CALIBRATION_TOKENS = 1 << 20  # tokens over which C is summed; a longer file is refused (a few MB of text)


def check_damping(damping: object) -> float:
    """The one check of a calibration's damping λ: a number from MIN_DAMPING to MAX_DAMPING (--damping, the API)."""
    number = damping if isinstance(damping, (int, float)) and not isinstance(damping, bool) else math.nan
    if not MIN_DAMPING <= number <= MAX_DAMPING:  # compared before float(): an int too large for a float is refused
        raise VLoRAError(
            f"calibration damping (--damping) must be a number from {MIN_DAMPING:g} to {MAX_DAMPING:g}, got "
            f"{damping!r}; for example 1 (the default): smaller trusts the prompts' activations more, larger moves "
            "towards the plain fit."
        )
    return float(number)


# ---- the math: tensors in, tensors out ------------------------------------------------------------------
def damped(C: torch.Tensor, damping: float) -> torch.Tensor:
    """C + λ·mean(diag C)·I (float64): positive definite for λ > 0 (the identity where C is zero)."""
    C = C.double()
    scale = float(C.diagonal().mean()) if C.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    return C + damping * scale * torch.eye(C.shape[0], dtype=torch.float64, device=C.device)


def whitening(C: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S = C_λ^½ and S⁻¹ (d, d), symmetric, float64, with C_λ = ``damped(C, damping)``."""
    e, Q = torch.linalg.eigh(damped(C, damping))
    root = e.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    return (Q * root) @ Q.T, (Q / root) @ Q.T


def apply_rows(M: torch.Tensor, vectors: torch.Tensor, d: int) -> torch.Tensor:
    """M (d, d) applied to the rows of each vector (..., D), seen as a (d, D/d) block row-major (``check_layout``)."""
    blocks = vectors.double().unflatten(-1, (d, vectors.shape[-1] // d))  # (..., d, m)
    return (M.double() @ blocks).flatten(-2).to(vectors.dtype)


def whitened_factors(F_A: torch.Tensor, F_B: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical factors of ΔW·S from those of ΔW (any gauge): F'_A (..., d_in, r) in whitened coordinates,
    F'_B (..., d_out, r); ΔW·S = F'_B·F'_Aᵀ, scaling folded in."""
    A_white = (S.double() @ F_A.double()).float().mT  # (..., r, d_in): the rows of ΔW·S, up to F_B
    return canonical_factors(A_white, F_B, torch.ones(F_A.shape[:-2], device=F_A.device))


def orthonormal(components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (k, D) with orthonormal rows and R (k, k) lower triangular with components = R·Q (float64 QR):
    the first k' rows of Q span the first k' components."""
    Qt, Rt = torch.linalg.qr(components.double().T)
    return Qt.T, Rt.T


def unwhitened(
    components: torch.Tensor, mean: torch.Tensor | None, loadings: torch.Tensor, S_inv: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A basis fitted in whitened coordinates, taken back to the plain ones and made orthonormal there.

    components (k, D), mean (D,) or None, loadings (..., k) -> components (k, D) orthonormal, mean, loadings
    (..., k) with mean + loadings·components equal to S⁻¹ applied to the whitened reconstruction.
    """
    if components.shape[0] == 0:
        back_mean = None if mean is None else apply_rows(S_inv, mean, d)
        return components, back_mean, loadings
    Q, R = orthonormal(apply_rows(S_inv, components, d).double())
    back_mean = None if mean is None else apply_rows(S_inv, mean, d)
    return Q.float(), back_mean, (loadings.double() @ R).float()


def check_layout(method, d: int, r: int) -> None:
    """Every vector of ``method`` must be a (d, D/d) block of the factor's rows, row-major (what ``apply_rows``
    assumes): true of flat and rank; a registered method that cuts factors otherwise cannot be calibrated."""
    F = torch.arange(d * r, dtype=torch.float64).view(1, d, r)
    vectors = method.to_vectors(F)[0]  # (g, D)
    D = vectors.shape[-1]
    rows = (torch.arange(D) // max(D // d, 1)).double().expand_as(vectors)  # the factor row each element holds
    if D % d or not torch.equal(torch.div(vectors, r, rounding_mode="floor"), rows):
        raise VLoRAError(
            f"the {method.name!r} method does not cut a factor into blocks of its rows; it cannot be fitted with "
            "--calibration — drop --calibration or use flat or rank."
        )


# ---- collecting C ------------------------------------------------------------------------------------------
def collect_moments(
    model, tokenizer, texts: Iterable[Sequence[int]], layers: Sequence[str], where: str = "the base model"
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ xxᵀ (d_in, d_in, float64) of every input row x to each named module over the token sequences ``texts``
    (one forward each, no padding), and the number of tokens. Forward hooks add each batch's XᵀX and keep
    nothing else; modules fed the same tensor (q, k and v of one attention) share one product."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise CompatibilityError(
            f"{where} has no layer {short_list(missing, limit=3)} that the adapters target; calibrate on the base "
            "model the adapters were trained on (--base-model)."
        )
    sums: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(input) -> (input, its XᵀX), this forward only

    def hook(name):
        def add(module, args):
            x = args[0]
            if id(x) not in seen or seen[id(x)][0] is not x:
                rows = x.detach().reshape(-1, x.shape[-1]).double()
                seen[id(x)] = (x, rows.T @ rows)
            product = seen[id(x)][1]
            sums[name] = product.clone() if name not in sums else sums[name].add_(product)

        return add

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    device = next(model.parameters()).device
    tokens = 0
    try:
        with torch.inference_mode():
            for ids in texts:
                seen.clear()
                model(torch.tensor([list(ids)], device=device))
                tokens += len(ids)
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    silent = [name for name in layers if name not in sums]
    if silent:
        raise CompatibilityError(
            f"{where} never ran {short_list(silent, limit=3)} on the calibration prompts; calibrate on the base "
            "model the adapters were trained on (--base-model)."
        )
    return {name: sums[name].cpu() for name in layers}, tokens


# ---- a calibration: its moments, whitenings, and the record the manifest keeps ----------------------------------
@dataclass
class Calibration:
    """Each targeted layer's input second moment C (per token), and what the manifest records of how it was made."""

    moments: dict[str, torch.Tensor]  # layer -> C = Σ xxᵀ / T (d_in, d_in), float64
    damping: float = DEFAULT_DAMPING
    record: dict = field(default_factory=dict)  # prompts file, its SHA-256, base model, tokens, damping
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.damping = check_damping(self.damping)
        self.record = dict(self.record) | {"damping": self.damping}

    def with_damping(self, damping: float) -> Calibration:
        """The same moments under another λ."""
        return replace(self, damping=damping, _cache={})

    def whitening(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """S, S⁻¹ of layer ``name`` (float64), computed once per distinct C (layers fed the same inputs share it)."""
        C = self.moments[name]
        key = next((k for k, (c, _) in self._cache.items() if c is C or torch.equal(c, C)), None)
        if key is None:
            key = len(self._cache)
            self._cache[key] = (C, whitening(C, self.damping))
        return self._cache[key][1]

    def check_layers(self, shapes) -> None:
        """The moments cover every layer of ``shapes`` (name -> LayerShape) at its d_in."""
        missing = [n for n in shapes if n not in self.moments]
        wrong = [n for n, s in shapes.items() if n in self.moments and self.moments[n].shape != (s.d_in, s.d_in)]
        if missing or wrong:
            raise CompatibilityError(
                f"the calibration has no inputs of {short_list(missing + wrong, limit=3)} at the adapters' size; "
                "collect it on the base model these adapters were trained on."
            )

    # -- the steps of a fit (compress.fit calls them per batch of same-shape layers) --
    def whiten(self, names: list[str], stacked):
        """F_A (L, N, d_in, r), F_B (L, N, d_out, r) -> the whitened-gauge factors of ΔW·S per layer."""
        F_A, F_B = stacked
        out = [whitened_factors(F_A[i], F_B[i], self.whitening(n)[0].to(F_A.device)) for i, n in enumerate(names)]
        return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])

    def restore(self, method, bases, tasks, names: list[str], stacked):
        """Take the named layers' A sides back to plain coordinates (orthonormal), in place; returns the factors
        ``stacked`` (whitened) as plain-space reference factors of the same ΔW and gauge."""
        F_A, F_B = stacked
        tasks, back = list(tasks), []
        for i, name in enumerate(names):
            _, S_inv = self.whitening(name)
            basis = bases[name]["A"]
            d = F_A.shape[-2]
            check_layout(method, d, F_A.shape[-1])
            loadings = torch.stack([t.loadings[name]["A"] for t in tasks]) if tasks else None
            comps, mean, new = unwhitened(
                basis.components.cpu(),
                None if basis.mean is None else basis.mean.cpu(),
                loadings.cpu() if loadings is not None else torch.zeros(0, 0, basis.k),
                S_inv,
                d,
            )
            bases[name]["A"] = replace(basis, components=comps.to(basis.components.device), mean=mean)
            for task, rows in zip(tasks, new):
                task.loadings[name]["A"] = rows
            back.append((S_inv.to(F_A.device) @ F_A[i].double()).float())  # (N, d_in, r), plain coordinates
        return torch.stack(back), F_B

    def measure(self, method, shapes, bases, reference, tasks) -> None:
        """Record each task's activation-weighted error per layer, ‖(ΔW − ΔŴ)·S‖ / ‖ΔW·S‖, in ``act_errors``."""
        from .compress import reconstruct
        from .quality import delta_w_errors

        for name, (F_A, F_B) in reference.items():
            S = self.whitening(name)[0].float()
            G_A, G_B = reconstruct(method, shapes[name], bases[name], [t.loadings[name] for t in tasks])
            err, norm = delta_w_errors((S @ F_A, F_B), (S @ G_A, G_B))
            for task, e, n in zip(tasks, err.tolist(), norm.tolist()):
                task.act_errors[name] = (e, n)


def calibrate(
    prompts: str | Path,
    layers: Sequence[str],
    base_model: str | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    model_and_tokenizer=None,
) -> Calibration:
    """Read the prompt file, run the base model (``base_model``: bundled by default, a folder, org/name) over every
    prompt (its chat turn, and its answer if it has one) and collect the named layers' input moments.

    ``model_and_tokenizer`` skips the load (a model already in memory; ``base_model`` then only names it)."""
    from .base_model import BUNDLED, chat_prompt, load_base_model
    from .io.prompts import PromptError, read_prompts

    path = Path(prompts)
    found = read_prompts(path)  # PromptError naming the file and line
    source = base_model or BUNDLED
    model, tokenizer = model_and_tokenizer or load_base_model(source)
    texts = []
    for prompt in found:
        ids = tokenizer(chat_prompt(tokenizer, prompt.text), add_special_tokens=False)["input_ids"]
        if prompt.answer:
            ids = ids + tokenizer(prompt.answer, add_special_tokens=False)["input_ids"]
        texts.append(ids)
    total = sum(len(ids) for ids in texts)
    if total == 0:
        raise PromptError(f"{path}: its prompts have no tokens; write some text in each prompt.")
    if total > MAX_CALIBRATION_TOKENS:
        raise PromptError(
            f"{path}: {total:,} tokens, more than the {MAX_CALIBRATION_TOKENS:,} a calibration sums over; use fewer "
            "prompts (a few hundred are plenty)."
        )
    sums, tokens = collect_moments(model, tokenizer, texts, list(layers), where=f"base model {source}")
    record = {
        "prompts": path.name,
        "prompts_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "prompt_count": len(found),
        "tokens": tokens,
        "base_model": str(source),
    }
    return Calibration({n: C / tokens for n, C in sums.items()}, damping, record)
