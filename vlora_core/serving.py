"""Tasks in the shape a serving engine wants: a rank cap by each layer's SVD, and vLLM's own loading checks.

``cap_rank`` writes every layer at rank <= R. A layer above R gets its best rank-R ΔW (the R largest singular
directions of scaling·B·A, from QR of the factors: ``merge.factor_svd``), and the error stated is exact: the norm
of the dropped singular values over the norm of ΔW, per layer and for the whole task. vLLM holds every adapter in
slots of ``max_lora_rank`` rows (16 by default) and refuses larger ones; a cap is how a rank-64 task gets in.
A capped (or re-written) adapter has scaling 1 at every layer (``merge.unit_scaling_config``), because vLLM applies
one scaling, lora_alpha / r of the config, to every layer: it reads no rank_pattern or alpha_pattern.

``check_vllm`` reproduces the checks vLLM applies when it loads a LoRA adapter from a folder, as read in vLLM's
source (vllm/config/lora.py, vllm/lora/peft_helper.py, lora_model.py, utils.py, layers/base_linear.py; main
branch, 2025-26), so that a folder can be judged before a server is started:

    LoRAConfig.max_lora_rank            one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (16 by default)
    PEFTHelper.from_dict                r, lora_alpha and target_modules are in adapter_config.json
    PEFTHelper.__post_init__            r > 0
    PEFTHelper._validate_features       no modules_to_save ("vLLM only supports modules_to_save being None"), no
                                        use_dora
    PEFTHelper.validate_legal           r <= max_lora_rank ("LoRA rank r is greater than max_lora_rank"), bias
                                        is "none"
    LoRAModel.from_local_checkpoint     a weights file: adapter_model.safetensors, else .bin or .pt
    check_unexpected_modules            every adapted module's last name is one the model takes LoRA on
                                        (``supported_modules``; for Llama, vllm/model_executor/models/llama.py's
                                        linear layers with packed_modules_mapping qkv_proj -> q/k/v_proj and
                                        gate_up_proj -> gate/up_proj, and embed_tokens, lm_head); tensors named
                                        *.embed_tokens.base_layer.weight, *.lm_head.base_layer.weight or holding
                                        "base_layer" are skipped, as vLLM skips them
    parse_fine_tuned_lora_name          every tensor ends in lora_A.weight, lora_B.weight, lora_embedding_A or
                                        lora_embedding_B ("... is unsupported LoRA weight": e.g. a key that still
                                        holds the adapter name, lora_A.default.weight)
    set_lora (BaseLinearLayerWithLoRA)  lora_a is copied into a slot of max_lora_rank rows: a layer whose weights
                                        have a larger rank fails there even when the config's r is within it
    vllm_lora_scaling_factor            the scaling vLLM applies, lora_alpha / r (lora_alpha / sqrt(r) with
                                        use_rslora) of the config, equals PEFT's own scaling at every layer; a
                                        folder whose rank_pattern / alpha_pattern make them differ loads, but is
                                        served with another ΔW (not an error in vLLM: a silent difference)

Not reproduced: checks that need the model itself (tensor shapes against the base layers, an embedding LoRA's
vocabulary size, tensor-parallel sharding), trainable_token_indices (max_lora_trainable_tokens), tensorizer
checkpoints, and the checks of vLLM versions other than the one read. ``check_vllm`` reads the folder as vLLM
does, names as written: ``io.peft_files.load_adapter`` would accept and normalise a name vLLM refuses (an adapter
name such as ``.default.`` in a key), so only its config and header readers are used here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import LoRAAdapter, check_alpha, lora_scaling
from .constants import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY, PEFT_PREFIX
from .errors import AdapterError, CompatibilityError, VLoRAError
from .io.peft_files import read_adapter_config, weight_shapes
from .merge import LowRank, adapter_from_factors, factor_svd, product_norm, relative_errors
from .options import VLLM_DEFAULT_MAX_LORA_RANK

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_WEIGHT_FILES = (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_LEGACY, "adapter_model.pt")  # from_local_checkpoint's order
# What vLLM's Llama takes LoRA on (packed modules expanded): vllm/model_executor/models/llama.py.
LLAMA_LORA_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
)
_BASE_EMBEDDINGS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")  # is_base_embedding_weights
_SCALING_RTOL = 1e-6  # PEFT's and vLLM's scaling of a layer agree within this (float rounding of alpha / r)
VLLM_CHECKS = (
    "LoRAConfig.max_lora_rank",
    "PEFTHelper.from_dict",
    "PEFTHelper.__post_init__",
    "PEFTHelper._validate_features",
    "PEFTHelper.validate_legal",
    "LoRAModel.from_local_checkpoint",
    "check_unexpected_modules",
    "parse_fine_tuned_lora_name",
    "BaseLinearLayerWithLoRA.set_lora",
    "vllm_lora_scaling_factor",
)


@dataclass(frozen=True)
class CapResult:
    adapter: LoRAAdapter  # every layer at rank <= max_rank (the input itself when it already was, as vLLM reads it)
    max_rank: int
    layer_errors: dict[str, float]  # per layer ‖ΔW − ΔW_capped‖_F / ‖ΔW‖_F (0 for layers kept whole)
    error: float  # the task's: sqrt(Σ tail²) / sqrt(Σ ‖ΔW‖²)

    @property
    def ranks(self) -> dict[str, int]:
        return self.adapter.ranks


@dataclass(frozen=True)
class ServingCheck:
    engine: str  # "vllm"
    max_lora_rank: int  # the limit checked against
    largest_rank: int  # the largest rank in the weights
    modules: tuple[str, ...]  # the adapted modules' last names
    checks: tuple[str, ...]  # the vLLM functions whose checks passed


# ---- rank cap --------------------------------------------------------------------------------------------------
def cap_rank(adapter: LoRAAdapter, max_rank: int) -> CapResult:
    """``adapter`` with every layer at rank <= ``max_rank``, by the SVD of each layer's ΔW; the exact error.

    An adapter already within the cap (weights and config) whose every layer vLLM scales as PEFT does comes back as
    it is. Otherwise every layer is rewritten with scaling 1 (``merge.unit_scaling_config``: lora_alpha = r,
    rank_pattern / alpha_pattern where ranks differ): layers within the cap keep their ΔW exactly, layers above
    it get their best rank-``max_rank`` ΔW.

    Example:
        >>> capped = cap_rank(load_adapter("adapters/big"), 16); save_adapter(capped.adapter, "out/big-r16")
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise VLoRAError(f"--max-rank must be a positive whole number (e.g. 16, vLLM's default), got {max_rank!r}.")
    if _within(adapter, max_rank) and not _scaling_mismatches(adapter.config, adapter.ranks):
        zero = dict.fromkeys(adapter.layers, 0.0)
        return CapResult(adapter, max_rank, zero, 0.0)
    results = {name: _capped_layer(layer.A, layer.B, layer.scaling, max_rank) for name, layer in adapter.layers.items()}
    dtype = next(iter(adapter.layers.values())).A.dtype
    factors = {name: (r.A, r.B) for name, r in results.items()}
    source = f"{adapter.describe()} (rank cap {max_rank})"
    capped = adapter_from_factors(adapter.name, adapter.config, factors, dtype, source)
    capped.extras.update(adapter.extras)
    layer_errors, error = relative_errors(results)
    return CapResult(capped, max_rank, layer_errors, error)


def _capped_layer(A: torch.Tensor, B: torch.Tensor, scaling: float, max_rank: int) -> LowRank:
    """ΔW = scaling·B·A at rank <= max_rank: the factors themselves (√scaling on each side) when they fit."""
    root = math.sqrt(scaling)
    A, B = A.float() * root, B.float() * root  # (r, d_in), (d_out, r)
    if A.shape[0] <= max_rank:
        return LowRank(A, B, tail=0.0, norm=product_norm(A, B))
    return factor_svd(A, B, max_rank)


def _within(adapter: LoRAAdapter, max_rank: int) -> bool:
    config_ranks = [adapter.config.get("r", 0), *(adapter.config.get("rank_pattern") or {}).values()]
    return max(adapter.ranks.values()) <= max_rank and max(config_ranks) <= max_rank


def vllm_scaling(config: dict) -> float:
    """The one scaling vLLM applies to every layer (PEFTHelper.__post_init__): lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora, from the config's top-level r and lora_alpha."""
    r, alpha = config["r"], check_alpha(config["lora_alpha"], "adapter_config.json: lora_alpha")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _scaling_mismatches(config: dict, ranks: dict[str, int]) -> list[str]:
    """The layers (module -> its weights' rank) PEFT scales otherwise than vLLM would."""
    served = vllm_scaling(config)
    return [
        module
        for module, rank in ranks.items()
        if not math.isclose(lora_scaling(config, module, rank), served, rel_tol=_SCALING_RTOL)
    ]


# ---- vLLM's loading checks ---------------------------------------------------------------------------------------
def check_vllm(
    source: str | Path | LoRAAdapter,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    *,
    supported_modules: tuple[str, ...] = LLAMA_LORA_MODULES,
) -> ServingCheck:
    """Would vLLM (``--max-lora-rank max_lora_rank``) load this adapter, and serve it with PEFT's ΔW? The checks
    are listed in the module doc.

    Args:
        source: an adapter folder (read as vLLM reads it: config and tensor names as written) or a LoRAAdapter
            (as ``save_adapter`` would write it).
        max_lora_rank: vLLM's limit; one of VLLM_MAX_LORA_RANKS.
        supported_modules: the module names the served model takes LoRA on (default: Llama's).

    Returns:
        A ``ServingCheck`` when every check passes; otherwise a ``CompatibilityError`` lists each problem with
        the vLLM function that refuses it and the fix.

    Example:
        >>> check_vllm("exported/pirate", max_lora_rank=16).largest_rank
    """
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise VLoRAError(
            f"max_lora_rank {max_lora_rank!r} is not one vLLM accepts (vllm/config/lora.py); choose one of "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}."
        )
    if isinstance(source, LoRAAdapter):
        config, shapes, where = source.config, _adapter_shapes(source), source.describe()
    else:
        config, shapes, where = read_adapter_config(Path(source)), weight_shapes(source, VLLM_WEIGHT_FILES), source
    problems = _config_problems(config, max_lora_rank) + _weight_problems(shapes, max_lora_rank, supported_modules)
    if not problems:
        problems = _scaling_problems(config, _ranks(shapes))
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise CompatibilityError(f"{where}: vLLM (max_lora_rank {max_lora_rank}) would refuse this adapter: {listed}.")
    modules = sorted({_module(key).rsplit(".", 1)[-1] for key in shapes if _is_lora_key(key)})
    return ServingCheck("vllm", max_lora_rank, max(_ranks(shapes).values(), default=0), tuple(modules), VLLM_CHECKS)


def _adapter_shapes(adapter: LoRAAdapter) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes ``save_adapter`` writes for ``adapter``."""
    shapes = {}
    for module, layer in adapter.layers.items():
        shapes[f"{PEFT_PREFIX}{module}.lora_A.weight"] = tuple(layer.A.shape)
        shapes[f"{PEFT_PREFIX}{module}.lora_B.weight"] = tuple(layer.B.shape)
    shapes.update({key: tuple(tensor.shape) for key, tensor in adapter.extras.items()})
    return shapes


def _config_problems(config: object, max_lora_rank: int) -> list[str]:
    """PEFTHelper.from_dict, __post_init__, _validate_features and validate_legal (vllm/lora/peft_helper.py)."""
    if not isinstance(config, dict):
        return ["adapter_config.json is not a JSON object (PEFTHelper.from_dict); restore the file PEFT wrote"]
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        return [
            f"adapter_config.json has no {', '.join(missing)} (PEFTHelper.from_dict requires r, lora_alpha and "
            "target_modules); write the adapter with PEFT's save_pretrained or vlora export"
        ]
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        return [f"r is {r!r}, not a positive integer (PEFTHelper.__post_init__); write the adapter's rank"]
    problems = []
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is {config['modules_to_save']!r}: vLLM only supports modules_to_save being None "
            "(PEFTHelper._validate_features); serve a merged model instead, or drop those modules"
        )
    if config.get("use_dora"):
        problems.append("use_dora is set: vLLM does not yet support DoRA (PEFTHelper._validate_features)")
    if r > max_lora_rank:
        problems.append(
            f"LoRA rank {r} is greater than max_lora_rank {max_lora_rank} (PEFTHelper.validate_legal); export it "
            f"capped (vlora export --max-rank {max_lora_rank}) or start vLLM with --max-lora-rank "
            f"{_next_vllm_rank(r)}"
        )
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias is {config['bias']!r}: adapter bias is not supported (PEFTHelper.validate_legal); use an adapter "
            "trained with bias='none'"
        )
    return problems


def _weight_problems(
    shapes: dict[str, tuple[int, ...]] | None, max_lora_rank: int, supported: tuple[str, ...]
) -> list[str]:
    """LoRAModel.from_local_checkpoint, check_unexpected_modules, parse_fine_tuned_lora_name and set_lora's slot."""
    if not shapes:
        return ["the folder holds no adapter_model.safetensors, .bin or .pt (LoRAModel.from_local_checkpoint)"]
    problems = []
    keys = [key for key in shapes if not key.endswith(_BASE_EMBEDDINGS) and "base_layer" not in key]
    bad = [key for key in keys if not _is_lora_key(key)]
    if bad:
        problems.append(
            f"{bad[0]} is unsupported LoRA weight (parse_fine_tuned_lora_name; {len(bad)} such tensors): keys "
            "must end in lora_A.weight / lora_B.weight, without an adapter name — re-save with "
            "io.peft_files.save_adapter or PEFT's save_pretrained"
        )
    leaves = {_module(k) for k in keys if _is_lora_key(k)}
    unexpected = sorted(m for m in leaves if m.rsplit(".", 1)[-1] not in supported)
    if unexpected:
        problems.append(
            f"expected target modules in {list(supported)} but received {unexpected[:4]} "
            "(check_unexpected_modules); serve a model that takes LoRA on these modules, or export without them"
        )
    too_big = {module: rank for module, rank in _ranks(shapes).items() if rank > max_lora_rank}
    if too_big:
        module, rank = max(too_big.items(), key=lambda item: item[1])
        problems.append(
            f"{module} has rank {rank} in its weights, more than the {max_lora_rank} rows of vLLM's LoRA slot "
            f"(BaseLinearLayerWithLoRA.set_lora; {len(too_big)} such layers); export it with "
            f"vlora export --max-rank {max_lora_rank}"
        )
    return problems


def _scaling_problems(config: dict, ranks: dict[str, int]) -> list[str]:
    """vLLM's one scaling against PEFT's per layer (after the checks above passed: the config's numbers are sane)."""
    try:
        wrong = _scaling_mismatches(config, ranks)
    except AdapterError as error:  # a lora_alpha PEFT itself would not use
        return [f"{error} (vllm_lora_scaling_factor)"]
    if not wrong:
        return []
    module = wrong[0]
    return [
        f"vLLM scales every layer by lora_alpha / r = {vllm_scaling(config):.6g} (vllm_lora_scaling_factor: it "
        f"reads no rank_pattern or alpha_pattern) but PEFT scales {module} by "
        f"{lora_scaling(config, module, ranks[module]):.6g} ({len(wrong)} such layers): vLLM would serve another "
        "ΔW — export it with vlora export --max-rank, which writes scaling 1 at every layer"
    ]


_LORA_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _is_lora_key(key: str) -> bool:
    return bool(_LORA_SUFFIX.search(key))


def _module(key: str) -> str:
    """A tensor key's module name as vLLM parses it: no base_model.model. prefix, no lora suffix."""
    key = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return _LORA_SUFFIX.sub("", key)


def _ranks(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """module -> rank: lora_A's rows (lora_embedding_A's too, whose rank is its first dimension)."""
    return {
        _module(key): shape[0]
        for key, shape in shapes.items()
        if shape and (key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"))
    }


def _next_vllm_rank(rank: int) -> int | str:
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), f"{VLLM_MAX_LORA_RANKS[-1]} at most (too large)")
