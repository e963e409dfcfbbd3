"""A PEFT LoRA adapter in memory, and the PEFT rules that give it meaning.

Glossary used across vlora_core:
    N      number of tasks (adapters)
    r      LoRA rank of one layer
    d_in   input features of a targeted layer;  d_out  its output features
    L      number of targeted layers
    scaling  lora_alpha / r  (or lora_alpha / sqrt(r) with rslora), per layer

PEFT stores, per targeted module, ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r); the layer adds
ΔW = scaling · B · A to the frozen weight. This module turns a state dict + adapter_config.json into that
picture and back. It never touches files (see ``vlora_core.io``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .constants import PEFT_PREFIX
from .errors import AdapterError

# lora_A / lora_B weight keys, with or without the adapter name PEFT uses in memory (".default").
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# Anything else named like a LoRA part is a kind we do not store (DoRA, embedding LoRA, lora bias, ...).
_LORA_LIKE = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)(\.|$)")


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
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in (layer.A, layer.B))

    def describe(self) -> str:
        return self.source or self.name


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """The factor PEFT multiplies B·A by for ``module``, from the adapter's own config."""
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def validate_config(config: object, source: str) -> dict:
    """Check the keys vlora relies on; refuse LoRA variants whose effect is not B·A."""
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: adapter_config.json must hold a JSON object, not {type(config).__name__}.")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{source}: peft_type is {config['peft_type']!r}; vlora stores LoRA adapters only (peft_type LORA)."
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{source}: adapter_config.json has no {key!r}; it is not a complete PEFT LoRA config.")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{source}: {key!r} in adapter_config.json must be a positive number, got {value!r}.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{source}: {key!r} in adapter_config.json must be an object mapping names to numbers.")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if config.get(flag):
            raise AdapterError(f"{source}: {what} adapters ({flag}=true) are not supported; vlora stores plain LoRA.")
    if config.get("target_parameters"):
        raise AdapterError(f"{source}: target_parameters (LoRA on raw parameters) is not supported.")
    return config


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
    layers = {module: _make_layer(module, sides, config, source) for module, sides in parts.items()}
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
        if not tensor.is_floating_point():
            raise AdapterError(
                f"{source}: tensor {key!r} has dtype {tensor.dtype}; adapter weights must be floating point."
            )
    sums = [tensor.sum(dtype=torch.float32) for tensor in state.values()]
    if sums and torch.stack(sums).isfinite().all():
        return
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{source}: tensor {key!r} contains NaN or Inf; retrain or repair this adapter.")


def _make_layer(module: str, sides: dict[str, torch.Tensor], config: dict, source: str) -> LoRALayer:
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
    rank = A.shape[0]
    expected = pattern_value(config.get("rank_pattern"), module, config["r"])
    if expected != rank:
        raise AdapterError(
            f"{source}: {module} has rank {rank} in the weights but {expected} in adapter_config.json "
            "(r / rank_pattern); the config does not describe these weights."
        )
    return LoRALayer(A=A, B=B, scaling=lora_scaling(config, module, rank))
