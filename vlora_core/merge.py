"""Merging tasks on ΔW, and cutting a layer's ΔW to a rank by its SVD.

Glossary (as in ``vlora_core.adapter``): N tasks, r the rank of one task's layer, R the rank of a result,
d_in / d_out, s a task's scaling at a layer (``lora_scaling``: alpha / r or alpha / sqrt(r), alpha and rank
patterns honoured), w a task's weight, c = w·s, ρ the density (share of entries ties and dare keep).

A merge is computed on what each task does, ΔWᵢ = sᵢ·Bᵢ·Aᵢ, one layer at a time; merging the A and B factors
separately (Σ wᵢAᵢ, Σ wᵢBᵢ) gives a different ΔW altogether. The methods (``METHODS``):

    linear  Σ wᵢ·ΔWᵢ in its SVD form, rank min(Σ rᵢ, d_out, d_in); exact
    cat     the factors stacked, B = [c₁B₁ … c_NB_N], A = [A₁; …; A_N]; rank Σ rᵢ; exact
    ties    TIES-Merging (Yadav et al., NeurIPS 2023) on the weighted task vectors τᵢ = wᵢ·ΔWᵢ: trim each τᵢ to
            its ρ share of largest-magnitude entries (ranked per layer, as mergekit does; the paper ranks a whole
            model), elect each entry's sign as the sign of Σ τ̂ᵢ, and take the mean of the trimmed entries that
            carry the elected sign (the disjoint mean). The paper's λ is a common factor of the weights (λ = 1:
            weights of 1).
    dare    DARE (Yu et al., ICML 2024) with task arithmetic: each ΔWᵢ keeps every entry with probability ρ
            (a seeded Bernoulli mask) and is rescaled by 1/ρ; the result is Σ wᵢ·(mask ⊙ ΔWᵢ)/ρ.

linear and cat never form a d_out x d_in matrix: the SVD of B·A comes from QR of both factors and the SVD of the
small core (``factor_svd``). ties and dare act entry by entry, so they form one layer's dense ΔW, one task at a
time (ties passes twice over the tasks: once to elect the signs, once to average). A rank cap keeps the R largest
singular directions (the best rank-R ΔW, Eckart–Young) and the error it reports is exact: the Frobenius norm of the
singular values it drops (the SVD tail). Results are written with scaling 1 at every layer (lora_alpha = r, and
alpha_pattern = rank_pattern where layers differ), so every reader — PEFT, vLLM with or without pattern support —
applies the same ΔW. Decompositions run in float32 (the small core in float64), and factors are cast back.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .adapter import LoRAAdapter, LoRALayer, lora_scaling
from .errors import CompatibilityError, VLoRAError, short_list
from .options import MERGE_DEFAULTS, MERGE_METHODS, agree

Part = tuple[torch.Tensor, torch.Tensor, float]  # one task at one layer: A (r, d_in), B (d_out, r), c = w·s


@dataclass(frozen=True)
class MergeConfig:
    """How to merge; the defaults every caller (library, CLI, workbench) takes."""

    method: str = MERGE_DEFAULTS["method"]  # one of METHODS
    density: float = MERGE_DEFAULTS["density"]  # ties / dare: share ρ of each task's ΔW entries kept (0 < ρ <= 1)
    rank: int | None = None  # each layer's rank, by the SVD of the merged ΔW, at most min(d_out, d_in) (what the layer
    # can hold; a larger rank is cut to that per layer); None: the method's own (see module doc)
    seed: int = MERGE_DEFAULTS["seed"]  # dare: seeds the masks (each layer's generator from the seed and layer name)

    def __post_init__(self):
        if self.method not in METHODS:
            raise VLoRAError(f"merge method {self.method!r} is unknown; choose one of: {', '.join(METHODS)}.")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise VLoRAError(f"--density must be a number in (0, 1] (the share of entries kept), got {self.density!r}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise VLoRAError(f"--rank must be a positive whole number (the merged adapter's rank), got {self.rank!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise VLoRAError(f"--seed must be a whole number >= 0, got {self.seed!r}.")


@dataclass(frozen=True)
class LowRank:
    """One layer's result: ΔW ≈ B·A, and how far that is from the exact result."""

    A: torch.Tensor  # (R, d_in)
    B: torch.Tensor  # (d_out, R)
    tail: float  # ‖ΔW_exact − B·A‖_F: the dropped singular values (0 when nothing was dropped)
    norm: float  # ‖ΔW_exact‖_F


@dataclass(frozen=True)
class MergeResult:
    adapter: LoRAAdapter  # the merged task, a valid PEFT adapter (save it with io.peft_files.save_adapter)
    method: str
    layer_errors: dict[str, float]  # per layer ‖ΔW − ΔW_written‖_F / ‖ΔW‖_F (0: exact)
    error: float  # the same over all layers together: sqrt(Σ tail²) / sqrt(Σ ‖ΔW‖²)


# ---- the math: tensors in, tensors out --------------------------------------------------------------------------
def factor_svd(A: torch.Tensor, B: torch.Tensor, rank: int | None = None) -> LowRank:
    """The SVD of ΔW = B·A (A (R, d_in), B (d_out, R)) without forming ΔW, cut to ``rank`` (None: keep all).

    B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR), so ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ and the SVD of the small core
    U·Σ·Vᵀ gives ΔW = (Q_B·U)·Σ·(Q_A·V)ᵀ."""
    Q_b, R_b = torch.linalg.qr(B.float())  # (d_out, m), (m, R)
    Q_a, R_a = torch.linalg.qr(A.float().T)  # (d_in, n), (n, R)
    U, S, Vh = torch.linalg.svd(R_b.double() @ R_a.double().T, full_matrices=False)  # core (m, n): small, float64
    return _cut(Q_b @ U.float(), S, Vh.float() @ Q_a.T, rank)


def dense_svd(delta: torch.Tensor, rank: int) -> LowRank:
    """A dense ΔW (d_out, d_in) as rank-``rank`` factors, by its SVD (float32)."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _cut(U, S.double(), Vh, rank)


def _cut(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int | None) -> LowRank:
    """ΔW = U·diag(S)·Vh kept to its ``rank`` largest directions, √S on each side; zero directions pad a rank
    larger than ΔW has."""
    k = S.shape[0] if rank is None else min(rank, S.shape[0])
    root = S[:k].sqrt().float()  # (k,)
    B, A = U[:, :k] * root, root[:, None] * Vh[:k]  # (d_out, k), (k, d_in)
    if rank is not None and rank > k:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return LowRank(A, B, tail=S[k:].norm().item(), norm=S.norm().item())


def held_rank(parts: Sequence[Part], rank: int | None) -> int | None:
    """A rank cap cut to what the layer can hold, min(d_out, d_in): a larger one would only pad zero directions."""
    if rank is None:
        return None
    A, B, _ = parts[0]
    return min(rank, A.shape[1], B.shape[0])


def stack_parts(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cᵢ·Bᵢ·Aᵢ as one pair of factors A (Σ rᵢ, d_in), B (d_out, Σ rᵢ); √|cᵢ| goes to each side."""
    roots = [math.sqrt(abs(c)) for _, _, c in parts]
    A = torch.cat([a.float() * root for (a, _, _), root in zip(parts, roots)], dim=0)
    B = torch.cat([b.float() * math.copysign(root, c) for (_, b, c), root in zip(parts, roots)], dim=1)
    return A, B


def product_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B·A‖_F from R x R Grams: ‖B·A‖² = trace(BᵀB · AAᵀ)."""
    return math.sqrt(max(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum().item(), 0.0))


def trim(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """TIES' trim: ``tau`` with all but its round(ρ·n) largest-magnitude entries set to 0 (at least one kept;
    entries equal to the threshold are all kept). ``threshold``: the magnitude found before (``trim_threshold``)."""
    if threshold is None:
        threshold = trim_threshold(tau, density)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def trim_threshold(tau: torch.Tensor, density: float) -> float:
    """The magnitude of ``tau``'s round(ρ·n)-th largest entry (0 when every entry is kept); numpy's partition on
    the CPU, several times faster there than torch's kthvalue."""
    n = tau.numel()
    keep = max(1, round(density * n))
    if keep >= n:
        return 0.0
    magnitudes = tau.detach().abs().flatten()
    if magnitudes.device.type == "cpu":
        return float(np.partition(magnitudes.numpy(), n - keep)[n - keep])
    return magnitudes.kthvalue(n - keep + 1).values.item()


def ties(parts: Sequence[Part], density: float) -> torch.Tensor:
    """TIES-Merging of the task vectors τᵢ = cᵢ·Bᵢ·Aᵢ -> ΔW (d_out, d_in). Two passes, one dense τ at a time
    (each τᵢ's trim threshold found once)."""
    taus = [lambda a=a, b=b, c=c: c * (b.float() @ a.float()) for a, b, c in parts]  # (d_out, d_in) each, lazily
    thresholds, elected = [], None
    for tau in taus:
        tau = tau()
        thresholds.append(trim_threshold(tau, density))
        trimmed = trim(tau, density, thresholds[-1])
        elected = trimmed if elected is None else elected + trimmed
    elected = elected.sign()  # the sign of the total mass
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for tau, threshold in zip(taus, thresholds):
        trimmed = trim(tau(), density, threshold)
        agrees = (trimmed.sign() == elected) & (trimmed != 0)
        total += torch.where(agrees, trimmed, 0.0)
        count += agrees
    return total / count.clamp(min=1)


def dare(parts: Sequence[Part], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE with task arithmetic: Σ cᵢ·(maskᵢ ⊙ Bᵢ·Aᵢ)/ρ, maskᵢ Bernoulli(ρ) drawn from ``generator`` in task
    order -> ΔW (d_out, d_in)."""
    out = None
    for a, b, c in parts:
        delta = b.float() @ a.float()  # (d_out, d_in)
        mask = torch.rand(delta.shape, generator=generator) < density
        term = torch.where(mask, delta, 0.0) * (c / density)
        out = term if out is None else out + term
    return out


def layer_generator(seed: int, layer: str) -> torch.Generator:
    """DARE's random stream for one layer: from the seed and the layer's name, so no layer's masks depend on
    which other layers are merged or in what order. (The CPU generator keeps 32 bits of a seed: both go through
    one hash into those 32 bits.)"""
    digest = hashlib.sha256(f"{seed}:{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


# ---- the methods: a table, one entry each -------------------------------------------------------------------------
# Each takes one layer's parts, the config, the layer's name (DARE's masks) and the rank to write (None: its own).
def _linear(parts: Sequence[Part], config: MergeConfig, layer: str, rank: int | None) -> LowRank:
    A, B = stack_parts(parts)
    return factor_svd(A, B, rank)


def _cat(parts: Sequence[Part], config: MergeConfig, layer: str, rank: int | None) -> LowRank:
    A, B = stack_parts(parts)
    if rank is not None:
        return factor_svd(A, B, rank)
    return LowRank(A, B, tail=0.0, norm=product_norm(A, B))


def _ties(parts: Sequence[Part], config: MergeConfig, layer: str, rank: int | None) -> LowRank:
    return dense_svd(ties(parts, config.density), rank or sum(a.shape[0] for a, _, _ in parts))


def _dare(parts: Sequence[Part], config: MergeConfig, layer: str, rank: int | None) -> LowRank:
    delta = dare(parts, config.density, layer_generator(config.seed, layer))
    return dense_svd(delta, rank or sum(a.shape[0] for a, _, _ in parts))


METHODS: dict[str, Callable[[Sequence[Part], MergeConfig, str, int | None], LowRank]] = {
    "linear": _linear,
    "cat": _cat,
    "ties": _ties,
    "dare": _dare,
}
agree(MERGE_METHODS, METHODS, "merge methods")


# ---- bookkeeping: adapters in, adapter out ------------------------------------------------------------------------
def merge_adapters(
    adapters: Sequence[LoRAAdapter],
    weights: Sequence[float] | None = None,
    *,
    config: MergeConfig = MergeConfig(),
    name: str = "merged",
    ranks: dict[str, int] | None = None,
) -> MergeResult:
    """Merge tasks into one LoRA adapter on ΔW, layer by layer (see the module doc for each method).

    Args:
        adapters: the tasks (``io.peft_files.load_adapter`` or ``SharedSubspace.to_adapter``); a layer one task
            lacks counts as ΔW = 0 there.
        weights: one per task, any sign; None: 1 each (task arithmetic, Σ ΔWᵢ, and TIES' paper setting; give
            1/N each for the mean).
        config: method, density, rank cap (cut per layer to min(d_out, d_in)) and seed.
        name: the merged task's name.
        ranks: layer -> rank to write there instead of ``config.rank`` (e.g. a store's own ranks, to add the
            merge to it); zero directions pad a rank larger than the merged ΔW has.

    Returns:
        A ``MergeResult``: the adapter (PEFT config with scaling 1 per layer, rank_pattern where ranks differ) and
        the exact relative error of the rank it was written at, per layer and overall.

    Example:
        >>> result = merge_adapters([a, b], [0.7, 0.3], config=MergeConfig(method="linear", rank=8))
        >>> save_adapter(result.adapter, "merged/"); result.error
    """
    weights = _checked_weights(adapters, weights)
    layers = _layer_parts(adapters, weights)
    method = METHODS[config.method]
    ranks = ranks or {}
    results = {
        layer: method(parts, config, layer, ranks.get(layer, held_rank(parts, config.rank)))
        for layer, parts in layers.items()
    }
    dtype = _common_dtype(adapters)
    template = merged_config(adapters)
    factors = {layer: (result.A, result.B) for layer, result in results.items()}
    names = ", ".join(a.name for a in adapters)
    adapter = adapter_from_factors(name, template, factors, dtype, source=f"merge ({config.method}) of {names}")
    layer_errors, error = relative_errors(results)
    return MergeResult(adapter, config.method, layer_errors, error)


def exact_merge(
    adapters: Sequence[LoRAAdapter],
    weights: Sequence[float] | None = None,
    *,
    config: MergeConfig = MergeConfig(),
    name: str = "exact",
) -> MergeResult:
    """The merge ``config`` stands for, with no rank cut: what a capped merge is measured against.

    linear and cat: the stacked factors (rank Σ rᵢ, ΔW exactly Σ wᵢ·ΔWᵢ). ties and dare: their dense ΔW at full
    rank, min(d_out, d_in) per layer (the same masks and signs as the capped merge: the seed is the same)."""
    if config.method in ("linear", "cat"):
        return merge_adapters(adapters, weights, config=MergeConfig("cat"), name=name)
    full = {layer: min(lora.B.shape[0], lora.A.shape[1]) for a in adapters for layer, lora in a.layers.items()}
    return merge_adapters(
        adapters, weights, config=MergeConfig(config.method, config.density, None, config.seed), name=name, ranks=full
    )


def relative_errors(results: dict[str, LowRank]) -> tuple[dict[str, float], float]:
    """Per layer tail / norm, and sqrt(Σ tail²) / sqrt(Σ norm²) over all layers (0 where ΔW is 0)."""
    per_layer = {name: (r.tail / r.norm if r.norm > 0 else 0.0) for name, r in results.items()}
    total = math.sqrt(sum(r.norm**2 for r in results.values()))
    tail = math.sqrt(sum(r.tail**2 for r in results.values()))
    return per_layer, (tail / total if total > 0 else 0.0)


def adapter_from_factors(
    name: str, template: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, source: str
) -> LoRAAdapter:
    """A LoRAAdapter whose layers apply ΔW = B·A exactly (scaling 1 everywhere, see ``unit_scaling_config``)."""
    ranks = {layer: A.shape[0] for layer, (A, _) in factors.items()}
    config = unit_scaling_config(template, ranks)
    layers = {}
    for layer, (A, B) in factors.items():
        A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
        if not (A.isfinite().all() and B.isfinite().all()):
            raise VLoRAError(
                f"{source}: the factors of {layer} overflow {str(dtype).removeprefix('torch.')}; "
                "use smaller weights, or merge adapters saved in float32."
            )
        layers[layer] = LoRALayer(A=A, B=B, scaling=lora_scaling(config, layer, ranks[layer], source))
    return LoRAAdapter(name=name, config=config, layers=layers, source=source)


def unit_scaling_config(template: dict, ranks: dict[str, int]) -> dict:
    """``template`` (an adapter_config.json) for these layer ranks with scaling 1 at every layer: r is the most
    common rank, rank_pattern names every other layer, lora_alpha = r and alpha_pattern = rank_pattern, no rslora.
    A reader that ignores the patterns (older vLLM) still applies lora_alpha / r = 1 everywhere."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {layer: rank for layer, rank in ranks.items() if rank != common}
    config = dict(template)
    config.update(
        peft_type="LORA",
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        inference_mode=True,
    )
    return config


def merged_config(adapters: Sequence[LoRAAdapter]) -> dict:
    """The first task's config, with target_modules covering every task's (their union when all are lists, else the
    last parts of the layer names) and what the tasks disagree on about which layers are adapted dropped."""
    config = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list) for t in targets):
        config["target_modules"] = sorted({m for t in targets for m in t})
    else:
        config["target_modules"] = sorted({layer.rsplit(".", 1)[-1] for a in adapters for layer in a.layers})
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if any(a.config.get(key) != config.get(key) for a in adapters):
            config[key] = None
    config["modules_to_save"] = None
    return config


def _checked_weights(adapters: Sequence[LoRAAdapter], weights: Sequence[float] | None) -> list[float]:
    if not adapters:
        raise VLoRAError("merge: no tasks given; name at least one task to merge.")
    if weights is None:
        return [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise VLoRAError(f"merge: {len(weights)} weights for {len(adapters)} tasks; give one weight per task.")
    checked = []
    for adapter, weight in zip(adapters, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise VLoRAError(f"{adapter.describe()}: merge weight {weight!r} is not a finite number; e.g. 0.5 or -1.")
        checked.append(float(weight))
    return checked


def _layer_parts(adapters: Sequence[LoRAAdapter], weights: list[float]) -> dict[str, list[Part]]:
    """layer -> (A, B, wᵢ·sᵢ) of every task holding it; shapes and layouts checked to agree."""
    _check_mergeable(adapters)
    layers: dict[str, list[Part]] = {}
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter, weight in zip(adapters, weights):
        for layer, lora in adapter.layers.items():
            shape = (lora.B.shape[0], lora.A.shape[1])
            seen = shapes.setdefault(layer, (shape, adapter.describe()))
            if seen[0] != shape:
                raise CompatibilityError(
                    f"{adapter.describe()}: {layer} is {shape[0]} x {shape[1]} (d_out x d_in) but {seen[0][0]} x "
                    f"{seen[0][1]} in {seen[1]}; merged tasks must be trained on the same base model."
                )
            layers.setdefault(layer, []).append((lora.A, lora.B, weight * lora.scaling))
    return layers


def _check_mergeable(adapters: Sequence[LoRAAdapter]) -> None:
    for adapter in adapters:
        if adapter.extras:
            raise CompatibilityError(
                f"{adapter.describe()}: holds non-LoRA tensors ({short_list(sorted(adapter.extras), 3)}, e.g. "
                "modules_to_save); a merge of those is not defined — merge adapters without them."
            )
    layouts = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(layouts) > 1:
        raise CompatibilityError(
            "merge: some tasks are fan_in_fan_out (Conv1D, as GPT-2) and some are not; they cannot share a base "
            "model — merge tasks of one base model."
        )


def _common_dtype(adapters: Sequence[LoRAAdapter]) -> torch.dtype:
    dtype = next(iter(adapters[0].layers.values())).A.dtype
    for adapter in adapters:
        for layer in adapter.layers.values():
            dtype = torch.promote_types(torch.promote_types(dtype, layer.A.dtype), layer.B.dtype)
    return dtype
