"""A PEFT LoRA adapter in memory, and the PEFT rules that give it meaning.

Glossary used across vlora_core:
    N      number of tasks (adapters)
    r      LoRA rank of one layer
    d_in   input features of a targeted layer;  d_out  its output features
    L      number of targeted layers
    scaling  lora_alpha / r  (or lora_alpha / sqrt(r) with rslora), per layer, within [MIN_SCALING, MAX_SCALING]

PEFT stores, per targeted module, ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r); the layer adds
ΔW = scaling · B · A to the frozen weight. This module turns a state dict + adapter_config.json into that
picture and back. It never touches files (see ``vlora_core.io``).
"""

from __future__ import annotations

import math
import numbers
import re
import time
from dataclasses import dataclass, field

import regex  # PEFT's rank_pattern / alpha_pattern keys are regular expressions; `regex` can time out
import torch

from .constants import PEFT_PREFIX
from .errors import AdapterError

# lora_A / lora_B weight keys, with or without the adapter name PEFT uses in memory (".default").
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# Anything else named like a LoRA part is a kind we do not store (DoRA, embedding LoRA, lora bias, ...).
_LORA_LIKE = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)(\.|$)")

# The scalings vlora accepts, checked in one place (``lora_scaling``) by the adapter reader, the export's alpha
# override and VLoRAModel's: 2^-20 .. 2^20 (about 1e-6 .. 1e6; real adapters use about 0.01 .. 100). Both ends
# and their square roots are powers of two, exact in float32, and dividing finite float32 factors by
# sqrt(scaling) (export) or multiplying them by a ratio of two scalings (VLoRAModel) keeps them finite and
# non-zero; float16 exports are checked after the cast, and every export is read back (``export``).
MIN_SCALING, MAX_SCALING = 2.0**-20, 2.0**20
# rank_pattern / alpha_pattern keys are regular expressions, matched against every module name: an adapter whose
# keys take longer than this in all (catastrophic backtracking, or a great many keys) is refused on reading.
PATTERN_BUDGET_S = 2.0
MAX_PATTERN_CHARS = 1000  # longer keys are refused: no module name needs one
# The dtypes vlora reads factors in (float8 and other exotic floats do not mix with these in torch's arithmetic).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# A layer's largest |value| (lora_A's or lora_B's) squared, times its largest size (r, d_in or d_out), must be at
# most 2^64 (about 1.8e19): the Grams B^T·B and A·A^T the gauge takes in float32 then stay below 2^64 too, far from
# float32's 2^128 (about 3.4e38), and so do ΔW (scaling <= 2^20) and the sums over tasks built from them. Real
# adapters are around 1e-3 .. 1e3 a value.
MAX_FACTOR_SQUARE = 2.0**64


@dataclass
class LoRALayer:
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())  # (d_out, d_in)


@dataclass
class LoRAAdapter:
    name: str  # default task id: the folder name
    config: dict  # adapter_config.json, as read
    layers: dict[str, LoRALayer]  # module name (no "base_model.model.") -> factors
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # non-LoRA tensors, keys as in the file
    source: str = ""  # where it came from, for messages

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    @property
    def dtype(self) -> str:
        """The factors' dtype as the precision table names it ("float32", "bfloat16", ...)."""
        return str(next(iter(self.layers.values())).A.dtype).removeprefix("torch.")

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.A, layer.B))

    @property
    def num_parameters(self) -> int:
        """Numbers in every tensor, extras included (what ``AdapterSize.parameters`` counts from a header)."""
        factors = sum(layer.A.numel() + layer.B.numel() for layer in self.layers.values())
        return factors + sum(t.numel() for t in self.extras.values())

    def describe(self) -> str:
        return self.source or self.name


@dataclass(frozen=True)
class AdapterSize:
    """What an adapter's weights cost, from tensor shapes alone (``io.peft_files.read_adapter_size``)."""

    layers: int  # modules with a lora_A tensor
    max_rank: int  # the largest lora_A row count
    parameters: int  # numbers in every tensor of the file


def size_from_shapes(shapes: dict[str, tuple[int, ...] | list[int]]) -> AdapterSize:
    """The size of a state dict given as key -> shape (PEFT keys, with or without the adapter name)."""
    ranks = []
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key)
        if match and match["side"] == "A":
            ranks.append(shape[0] if shape else 0)
    return AdapterSize(len(ranks), max(ranks, default=0), sum(math.prod(shape) for shape in shapes.values()))


def pattern_value(
    patterns: dict, module: str, default, source: str = "adapter_config.json", deadline: float | None = None
):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it.

    Matching stops at ``deadline`` (time.monotonic()), or after PATTERN_BUDGET_S for this one lookup: a key that
    backtracks that long is refused (PEFT, which cannot stop it, would hang on it)."""
    for key, value in (patterns or {}).items():
        left = PATTERN_BUDGET_S if deadline is None else deadline - time.monotonic()
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=max(left, 1e-3)):
                return value
        except TimeoutError:
            raise AdapterError(
                f"{source}: matching the rank_pattern / alpha_pattern keys against the module names takes over "
                f"{PATTERN_BUDGET_S:g} s (key {key[:60]!r}, module {module!r}: catastrophic backtracking, or too "
                "many keys); write the keys as plain module names."
            ) from None
    return default


def check_alpha(value: object, source: str) -> float:
    """A lora_alpha: a finite positive real number (not a bool or a string); ``source`` names where it came from."""
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
    if number is None or not math.isfinite(number) or number <= 0:
        raise AdapterError(
            f"{source} must be a positive number (finite, not NaN), got {_shown(value)}; for example 16 (twice r is usual)."
        )
    return number


def lora_scaling(
    config: dict, module: str, rank: int, source: str = "adapter_config.json", deadline: float | None = None
) -> float:
    """The factor PEFT multiplies B·A by for ``module``, from the adapter's own config (or overrides).

    The one check of the scaling's range: outside [MIN_SCALING, MAX_SCALING] is an ``AdapterError`` naming
    ``source`` (a folder, an option) and the lora_alpha range that would fit this rank."""
    raw = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"), source, deadline)
    alpha = check_alpha(raw, f"{source}: lora_alpha for {module}")
    rslora = bool(config.get("use_rslora"))
    root = math.sqrt(rank) if rslora else rank
    scaling = alpha / root
    if not MIN_SCALING <= scaling <= MAX_SCALING:
        r = f"sqrt(r) = sqrt({rank})" if rslora else f"r = {rank}"
        raise AdapterError(
            f"{source}: lora_alpha {alpha:g} over {r} gives a scaling of {scaling:.3g} at {module}, outside the "
            f"range vlora stores exactly (2^-20 .. 2^20, about 1e-6 .. 1e6); "
            f"use a lora_alpha from {MIN_SCALING * root:.3g} to {MAX_SCALING * root:.3g}."
        )
    return scaling


def validate_config(config: object, source: str) -> dict:
    """Check the keys vlora relies on, and every number in the config; refuse LoRA variants whose effect is not B·A."""
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: adapter_config.json must hold a JSON object, not {type(config).__name__}.")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{source}: peft_type is {config['peft_type']!r}; vlora stores LoRA adapters only (peft_type LORA)."
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{source}: adapter_config.json has no {key!r}; it is not a complete PEFT LoRA config.")
    _check_finite(config, source)
    _check_rank(config["r"], f"{source}: 'r' in adapter_config.json")
    check_alpha(config["lora_alpha"], f"{source}: 'lora_alpha' in adapter_config.json")
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", check_alpha)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{source}: {key!r} in adapter_config.json must be an object mapping names to numbers.")
        for name, value in patterns.items():
            _check_pattern_key(name, key, source)
            check(value, f"{source}: {key}[{name[:60]!r}] in adapter_config.json")
    if config.get("use_rslora") not in (None, True, False):
        raise AdapterError(
            f"{source}: 'use_rslora' in adapter_config.json must be true or false, got {_shown(config['use_rslora'])}."
        )
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if config.get(flag):
            raise AdapterError(f"{source}: {what} adapters ({flag}=true) are not supported; vlora stores plain LoRA.")
    if config.get("target_parameters"):
        raise AdapterError(f"{source}: target_parameters (LoRA on raw parameters) is not supported.")
    return config


def _check_rank(value: object, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise AdapterError(
            f"{source} must be a positive number, a whole one (the LoRA rank, e.g. 8), got {_shown(value)}."
        )
    return int(value)


def _check_pattern_key(key: str, what: str, source: str) -> None:
    """A key PEFT can use: a valid regular expression (PEFT wraps it as ``(.*\\.)?(key)$``), of sane length."""
    if len(key) > MAX_PATTERN_CHARS:
        raise AdapterError(
            f"{source}: a key in {what} is {len(key):,} characters long (at most {MAX_PATTERN_CHARS:,}); "
            "write a plain module name (e.g. q_proj)."
        )
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, RecursionError, OverflowError) as error:
        raise AdapterError(
            f"{source}: the key {key[:60]!r} in {what} is not a valid pattern ({error}); PEFT reads these keys "
            "as regular expressions: write a plain module name (e.g. q_proj) or a valid pattern."
        ) from None


def _check_finite(config: dict, source: str) -> None:
    """No NaN or Infinity anywhere in the config (Python's json reads them; PEFT and JSON itself do not)."""
    stack = [("", config)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise AdapterError(f"{source}: adapter_config.json holds {value} at {where}; write a finite number there.")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack += [(f"{where}.{key}" if where else str(key), item) for key, item in items]


def _shown(value: object) -> str:
    """A value for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def adapter_from_state_dict(state: dict[str, torch.Tensor], config: dict, name: str, source: str) -> LoRAAdapter:
    """Group PEFT keys into layers; keep every non-LoRA tensor; refuse what we cannot represent."""
    config = validate_config(config, source)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    _check_tensors(state, source)
    for key, tensor in state.items():
        short = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        match = _LORA_KEY.match(short)
        if match:
            side = parts.setdefault(match["module"], {})
            if match["side"] in side:
                raise AdapterError(f"{source}: two tensors for {match['module']}.lora_{match['side']} (key {key}).")
            side[match["side"]] = tensor
        elif _LORA_LIKE.search(short):
            raise AdapterError(
                f"{source}: tensor {key!r} is a LoRA variant vlora does not store "
                "(DoRA magnitudes, embedding or convolution LoRA, LoRA bias); only lora_A/lora_B of linear layers are."
            )
        else:
            extras[key] = tensor
    if not parts:
        raise AdapterError(f"{source}: no lora_A/lora_B tensors found; is this a PEFT LoRA adapter?")
    deadline = time.monotonic() + PATTERN_BUDGET_S  # for matching the config's patterns against every module
    layers = {module: _make_layer(module, sides, config, source, deadline) for module, sides in parts.items()}
    return LoRAAdapter(name=name, config=config, layers=layers, extras=extras, source=source)


def adapter_to_state_dict(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    """The inverse of ``adapter_from_state_dict``: keys exactly as ``PeftModel.save_pretrained`` writes them."""
    state = {}
    for module, layer in adapter.layers.items():
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = layer.A.contiguous()
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = layer.B.contiguous()
    state.update(adapter.extras)
    return state


def _check_tensors(state: dict, source: str) -> None:
    """Every entry a floating-point tensor without NaN or Inf.

    The finiteness check sums each tensor in float32 (a sum is finite iff every element is, short of
    overflow, which the exact check below then settles): one read per tensor instead of an isfinite mask.
    """
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{source}: entry {key!r} is a {type(tensor).__name__}, not a tensor.")
        if tensor.dtype not in WEIGHT_DTYPES:
            raise AdapterError(
                f"{source}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter weights "
                "must be floating point: float32, float16, bfloat16 or float64 (convert it, e.g. "
                "`tensor.to(torch.float32)`, and save the adapter again)."
            )
    sums = [tensor.sum(dtype=torch.float32) for tensor in state.values()]
    if sums and torch.stack(sums).isfinite().all():
        return
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{source}: tensor {key!r} contains NaN or Inf; retrain or repair this adapter.")


def _check_magnitude(module: str, A: torch.Tensor, B: torch.Tensor, source: str) -> None:
    """The factors' largest |value| small enough that their products stay far inside float32 (MAX_FACTOR_SQUARE)."""
    largest = max((t.abs().amax().item() for t in (A, B) if t.numel()), default=0.0)
    size = max(*A.shape, B.shape[0])  # r, d_in, d_out
    if largest * largest * size > MAX_FACTOR_SQUARE:
        raise AdapterError(
            f"{source}: {module} has a weight of magnitude {largest:.3g} (largest |value| of lora_A, lora_B), too "
            f"large for float32 arithmetic: vlora needs |value|^2 x size <= 2^64 to keep the products it takes from "
            f"overflowing (size {size} here, so |value| <= {math.sqrt(MAX_FACTOR_SQUARE / size):.3g}); retrain or "
            "repair this adapter (if one factor alone is large, lora_A x c and lora_B / c keep ΔW)."
        )


def _make_layer(
    module: str, sides: dict[str, torch.Tensor], config: dict, source: str, deadline: float | None = None
) -> LoRALayer:
    if set(sides) != {"A", "B"}:
        missing = "lora_B" if "A" in sides else "lora_A"
        raise AdapterError(f"{source}: {module} has no {missing} weight; the adapter file is incomplete.")
    A, B = sides["A"], sides["B"]
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterError(
            f"{source}: {module} has lora_A of shape {tuple(A.shape)} and lora_B of shape {tuple(B.shape)}; "
            "only 2-D (linear or Conv1D) LoRA factors are supported."
        )
    if A.shape[0] != B.shape[1]:
        raise AdapterError(
            f"{source}: {module} lora_A is {tuple(A.shape)} but lora_B is {tuple(B.shape)}; "
            "their rank dimensions must agree (lora_A: r x d_in, lora_B: d_out x r)."
        )
    _check_magnitude(module, A, B, source)
    rank = A.shape[0]
    expected = pattern_value(config.get("rank_pattern"), module, config["r"], source, deadline)
    if expected != rank:
        raise AdapterError(
            f"{source}: {module} has rank {rank} in the weights but {expected} in adapter_config.json "
            "(r / rank_pattern); the config does not describe these weights."
        )
    return LoRALayer(A=A, B=B, scaling=lora_scaling(config, module, rank, source, deadline))
