"""Write a task as a llama.cpp LoRA adapter (one GGUF file), and read one back.

The format, from llama.cpp's convert_lora_to_gguf.py (what it writes) and src/llama-adapter.cpp
(llama_adapter_lora_init_impl, what the loader requires), written here with the ``gguf`` package:

    general.architecture   the base model's llama.cpp architecture; must equal the model's ("model arch and LoRA
                           arch mismatch" otherwise)
    general.type           "adapter";  adapter.type  "lora";  adapter.lora.alpha  float32
    vlora.producer         "vlora-export/1": vlora's mark (llama.cpp reads only the keys it knows), so that
                           --force replaces only a file vlora wrote
    <weight>.lora_a        A, numpy shape (r, d_in)   (GGUF ne = [d_in, r])
    <weight>.lora_b        B, numpy shape (d_out, r)  (GGUF ne = [r, d_out])
    <weight>               the base tensor's GGUF name, e.g. blk.3.attn_q.weight for model.layers.3.self_attn.q_proj

llama.cpp applies B·A at scale alpha / r, r being each pair's own rank (llama_adapter_lora_weight::get_scale:
b->ne[0]); it knows no rslora, alpha_pattern or rank_pattern. So the file carries the task's lora_alpha and each
layer's B is multiplied by sᵢ·rᵢ / alpha, which is 1 for a plain adapter (its factors are then written unchanged,
as convert_lora_to_gguf.py writes them) and makes any other exact. For the llama architecture, the rows of q_proj's
and k_proj's B are permuted as convert_hf_to_gguf.py's LlamaModel.permute permutes the base weights (the rotary
halves interleaved per head; heads = num_attention_heads for q, num_key_value_heads for k), since the GGUF base
weights are stored permuted.

Supported: base models whose config.json ``architectures`` is one of GGUF_ARCHITECTURES (LlamaForCausalLM and
MistralForCausalLM -> llama; Qwen2ForCausalLM -> qwen2; Qwen3ForCausalLM -> qwen3), LoRA on the llama-style
projections of the decoder blocks (q/k/v/o_proj -> attn_q/attn_k/attn_v/attn_output, gate/up/down_proj ->
ffn_gate/ffn_up/ffn_down). Embedding and lm_head LoRA are refused.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..adapter import LoRAAdapter, LoRALayer
from ..constants import EXPORT_PRODUCER
from ..errors import AdapterError, CompatibilityError, StoreError, VLoRAError, short_list
from .atomic import disk_problem, make_folders, write_bytes_atomic
from .outputs import check_export_file

# HF architecture -> (llama.cpp architecture, whether convert_hf_to_gguf.py permutes q_proj / k_proj rows)
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
# HF module (after model.layers.<i>.) -> llama.cpp tensor (after blk.<i>.), as gguf's TensorNameMap has them
GGUF_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
_BLOCK = re.compile(r"^model\.layers\.(?P<block>\d+)\.(?P<module>.+)$")
PRODUCER_KEY = "vlora.producer"
PRODUCER = f"{EXPORT_PRODUCER}/1"


@dataclass(frozen=True)
class GGUFTarget:
    """What the file needs to know about the base model (from its config.json)."""

    architecture: str  # llama.cpp's name: llama, qwen2, qwen3
    permute_qk: bool  # permute q_proj / k_proj rows as convert_hf_to_gguf.py does
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads (num_heads without GQA)

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "the base model's config.json") -> GGUFTarget:
        architectures = config.get("architectures") or []
        known = [a for a in architectures if a in GGUF_ARCHITECTURES]
        if not known:
            raise CompatibilityError(
                f"{source}: architectures {architectures} has none vlora writes llama.cpp adapters for; supported: "
                f"{', '.join(GGUF_ARCHITECTURES)} (convert other models with llama.cpp's convert_lora_to_gguf.py)."
            )
        heads = config.get("num_attention_heads")
        if not isinstance(heads, int) or heads < 1:
            raise CompatibilityError(f"{source}: num_attention_heads is {heads!r}; pass the base model's config.json.")
        kv_heads = config.get("num_key_value_heads") or heads
        architecture, permute = GGUF_ARCHITECTURES[known[0]]
        return cls(architecture, permute, heads, kv_heads)


@dataclass(frozen=True)
class GGUFAdapter:
    """A llama.cpp LoRA file as read back: tensors in its own layout (q/k rows permuted for llama)."""

    architecture: str
    alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # GGUF weight name -> A (r, d_in), B (d_out, r)
    metadata: dict[str, object]  # every scalar key-value


# ---- the conversion: tensors in, tensors out ---------------------------------------------------------------------
def gguf_name(module: str) -> str | None:
    """The llama.cpp weight a PEFT module adapts (``blk.3.attn_q.weight``), or None when it is not supported."""
    match = _BLOCK.match(module)
    tensor = GGUF_BLOCK_TENSORS.get(match["module"]) if match else None
    return f"blk.{int(match['block'])}.{tensor}.weight" if tensor else None


def permute_rows(W: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the rows of W (d_out, ...): each head's two rotary halves
    interleaved."""
    return W.reshape(heads, 2, W.shape[0] // heads // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def unpermute_rows(W: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows``: GGUF row order back to the Hugging Face one."""
    return W.reshape(heads, W.shape[0] // heads // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def hf_layers(adapter: GGUFAdapter, target: GGUFTarget) -> dict[str, LoRALayer]:
    """A GGUF adapter's pairs as PEFT layers of the Hugging Face model: module names back from llama.cpp's
    tensor names, q/k rows back in Hugging Face order, llama.cpp's scale alpha / r as each layer's scaling."""
    modules = {tensor: module for module, tensor in GGUF_BLOCK_TENSORS.items()}
    layers = {}
    for name, (A, B) in adapter.factors.items():
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if not match or match[2] not in modules:
            raise AdapterError(f"{name}: not a llama.cpp tensor vlora maps back ({', '.join(modules)} of a block).")
        module = f"model.layers.{int(match[1])}.{modules[match[2]]}"
        leaf = module.rsplit(".", 1)[-1]
        if target.permute_qk and leaf in ("q_proj", "k_proj"):
            B = unpermute_rows(B, target.num_heads if leaf == "q_proj" else target.num_kv_heads)
        rank = B.shape[1]
        layers[module] = LoRALayer(A, B, adapter.alpha / rank if adapter.alpha else 1.0)  # get_scale
    return layers


def gguf_factors(module: str, layer: LoRALayer, alpha: float, target: GGUFTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, d_in), B (d_out, r) such that llama.cpp's (alpha / r)·B·A is this layer's ΔW in GGUF row order."""
    A, B = layer.A.float(), layer.B.float()
    fold = layer.scaling * layer.rank / alpha
    if fold != 1.0:
        B = B * fold
    leaf = module.rsplit(".", 1)[-1]
    if target.permute_qk and leaf in ("q_proj", "k_proj"):
        heads = target.num_heads if leaf == "q_proj" else target.num_kv_heads
        if B.shape[0] % (2 * heads):
            raise CompatibilityError(
                f"{module}: {B.shape[0]} output rows do not split into {heads} heads of two rotary halves; "
                "pass the config.json of the model this adapter was trained on."
            )
        B = permute_rows(B, heads)
    return A, B


# ---- files -------------------------------------------------------------------------------------------------------
def save_gguf_adapter(
    adapter: LoRAAdapter,
    path: str | Path,
    base_config: dict,
    *,
    dtype: str = "f32",
    force: bool = False,
    check: Callable[[Path, GGUFTarget], None] | None = None,
) -> Path:
    """Write ``adapter`` as a llama.cpp LoRA adapter file at ``path`` (atomically).

    Args:
        adapter: the task (``load_adapter``, ``SharedSubspace.to_adapter``, a merge or a rank cap).
        path: the .gguf file to write; an existing file is replaced only with ``force``.
        base_config: the base model's config.json (architectures, num_attention_heads, num_key_value_heads).
        dtype: "f32" or "f16" for the tensors.
        force: replace an existing file vlora wrote (never another file, a folder, or a path inside a store).
        check: called with the written temp file and the target before it takes ``path``'s place; if it raises,
            nothing is published.

    Example:
        >>> save_gguf_adapter(load_adapter("adapters/pirate"), "pirate.gguf", json.load(open("model/config.json")))
    """
    target = GGUFTarget.from_hf_config(base_config)
    if dtype not in GGUF_DTYPES:
        raise VLoRAError(f"GGUF dtype {dtype!r} is not supported; choose one of: {', '.join(GGUF_DTYPES)}.")
    out = Path(path)
    check_export_file(out, force, is_vlora_gguf)
    data = gguf_bytes(adapter, target, dtype, check)
    try:
        make_folders(out.parent)
        write_bytes_atomic(out, data)
    except OSError as error:
        raise StoreError(f"{out}: cannot write the GGUF adapter: {disk_problem(error)}; nothing was written.") from None
    return out


def gguf_bytes(
    adapter: LoRAAdapter,
    target: GGUFTarget,
    dtype: str = "f32",
    check: Callable[[Path, GGUFTarget], None] | None = None,
) -> bytes:
    """The whole GGUF file for ``adapter``, in memory (the gguf writer needs a real file: a private temp one)."""
    np_dtype, file_type = GGUF_DTYPES[dtype]
    alpha = float(np.float32(adapter.config.get("lora_alpha") or 1.0))  # as llama.cpp reads it back
    tensors = _named_tensors(adapter, target, alpha, np_dtype)
    with tempfile.TemporaryDirectory(prefix="vlora-gguf-") as folder:
        file = Path(folder) / "adapter.gguf"
        writer = gguf.GGUFWriter(file, target.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter.name)
        writer.add_string(PRODUCER_KEY, PRODUCER)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if check is not None:
            check(file, target)
        return file.read_bytes()


def _named_tensors(adapter: LoRAAdapter, target: GGUFTarget, alpha: float, np_dtype) -> dict[str, np.ndarray]:
    if adapter.extras:
        raise CompatibilityError(
            f"{adapter.describe()}: holds non-LoRA tensors ({short_list(sorted(adapter.extras), 3)}); llama.cpp "
            "adapters carry LoRA pairs only — export the task without modules_to_save."
        )
    names = {module: gguf_name(module) for module in adapter.layers}
    unsupported = [module for module, name in names.items() if name is None]
    if unsupported:
        raise CompatibilityError(
            f"{adapter.describe()}: no llama.cpp tensor for {short_list(unsupported, 3)}; GGUF export supports LoRA "
            f"on model.layers.<i>.{{{', '.join(GGUF_BLOCK_TENSORS)}}}."
        )
    tensors = {}
    for module in sorted(adapter.layers, key=_block_order):
        A, B = gguf_factors(module, adapter.layers[module], alpha, target)
        for suffix, factor in (("lora_a", A), ("lora_b", B)):
            array = np.ascontiguousarray(factor.numpy(), dtype=np_dtype)
            if not np.isfinite(array).all():
                raise VLoRAError(
                    f"{adapter.describe()}: {module}'s factors overflow {np.dtype(np_dtype).name}; write f32."
                )
            tensors[f"{names[module]}.{suffix}"] = array
    return tensors


def _block_order(module: str) -> tuple[int, str]:
    match = _BLOCK.match(module)
    return (int(match["block"]), match["module"]) if match else (math.inf, module)


def is_vlora_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file carrying vlora's mark (see the module doc)."""
    try:
        field = gguf.GGUFReader(path).fields.get(PRODUCER_KEY)
        return field is not None and str(field.contents()).startswith(f"{EXPORT_PRODUCER}/")
    except (OSError, ValueError, KeyError, IndexError):
        return False


def load_gguf_adapter(path: str | Path) -> GGUFAdapter:
    """Read a llama.cpp LoRA adapter file (with ``gguf.GGUFReader``): its architecture, alpha and A/B pairs."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path}: not a readable GGUF file ({error}).") from None
    metadata = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[key] = field.contents()
    if metadata.get(gguf.Keys.General.TYPE) != "adapter" or metadata.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise AdapterError(
            f"{path}: not a llama.cpp LoRA adapter (general.type / adapter.type are not adapter / lora)."
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        base, _, side = tensor.name.rpartition(".")
        pairs.setdefault(base, {})[side] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    broken = [base for base, sides in pairs.items() if set(sides) != {"lora_a", "lora_b"}]
    if broken:
        raise AdapterError(f"{path}: {short_list(broken, 3)} lack a lora_a or lora_b tensor; write the file again.")
    factors = {base: (sides["lora_a"], sides["lora_b"]) for base, sides in pairs.items()}
    return GGUFAdapter(
        architecture=metadata.get(gguf.Keys.General.ARCHITECTURE, ""),
        alpha=float(metadata.get(gguf.Keys.Adapter.LORA_ALPHA, 0.0)),
        factors=factors,
        metadata=metadata,
    )
