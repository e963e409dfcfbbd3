"""Tiny real models from a config (never downloaded) and real PEFT adapters written by peft itself."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("VLORA_DTYPE", "fp32")  # models loaded in tests compare logits with PEFT at fp32 tolerances

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ("q_proj", "v_proj")


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def write_adapter(path, seed: int, *, r: int = 4, alpha: float = 8, targets=TARGETS, shared=None, **lora_kwargs):
    """A real PEFT LoRA adapter folder, random (non-zero) factors; ``shared`` mixes in common structure.

    ``shared``: an optional dict {module: (A, B)} added to this adapter's own random factors, so that a
    set of adapters has structure in common (as adapters trained from one base usually do).
    """
    model = tiny_llama(0)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1000 + seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                    factor.normal_(0, 0.3)
    peft_model.save_pretrained(str(path))
    return path


def peft_logits(adapter_dir, input_ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="session")
def input_ids():
    torch.manual_seed(7)
    return torch.randint(0, 128, (2, 12))


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """Four real adapters of rank 4 on q_proj and v_proj of a 2-layer tiny Llama."""
    root = tmp_path_factory.mktemp("adapters")
    names = ["sentiment", "summarization", "translation", "qa"]
    return [write_adapter(root / name, seed) for seed, name in enumerate(names)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a byte-level tokenizer, loaded by path like any local model (make_tiny_model)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    return GPT2LMHeadModel(config).eval()


def write_gpt2_adapter(path, seed: int, r: int = 4):
    """A real PEFT adapter on GPT-2's Conv1D attention (fan_in_fan_out=True)."""
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(tiny_gpt2(0), config)
    torch.manual_seed(2000 + seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(str(path))
    return path


def delta_weights(adapter) -> dict:
    """layer -> dense ΔW of a LoRAAdapter (for checks on tiny models only)."""
    return {name: layer.delta_weight() for name, layer in adapter.layers.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, subprocess_: bool = False) -> CliResult:
    """`vlora ARGS` in this process (fast; the same main() the console script calls), or in a new one."""
    args = [str(a) for a in args]
    if subprocess_:
        done = subprocess.run(
            [sys.executable, "-m", "vlora_core.cli", *args], capture_output=True, text=True, timeout=300
        )
        return CliResult(done.returncode, done.stdout, done.stderr)
    from vlora_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse usage errors and --help
            code = exit_.code
    return CliResult(code, out.getvalue(), err.getvalue())


# ---- files and the workbench ----------------------------------------------------------------------
def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes: what "left as it was" is checked against."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (257 tokens), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def make_tiny_model(folder: Path) -> Path:
    """A tiny Llama (hidden 32, 2 layers, as above) with a byte-level BPE tokenizer, all offline."""
    tokenizer = byte_tokenizer()
    config = tiny_llama_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def zip_tree(root: Path, out: Path, folders: list[str] | None = None) -> Path:
    """Zip the given sub-folders of ``root`` (default: all), paths relative to ``root``."""
    with zipfile.ZipFile(out, "w") as zf:
        for file in sorted(root.rglob("*")):
            rel = file.relative_to(root)
            if file.is_file() and (folders is None or rel.parts[0] in folders):
                zf.write(file, rel.as_posix())
    return out


def launch(settings):
    """The workbench built from ``settings`` (an AppSettings), serving on a free port of 127.0.0.1."""
    from ui.layout import build_app, launch_options

    demo = build_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options(settings)
    )
    return demo


@contextlib.contextmanager
def served(settings):
    """The workbench launched in-process from ``settings`` for the block: (url, root, settings), closed after."""
    demo = launch(settings)
    try:
        yield SimpleNamespace(url=demo.local_url, root=settings.session_root, settings=settings)
    finally:
        demo.close()


def api_client(url: str, downloads: Path):
    """A gradio_client on ``url`` that saves downloaded files under ``downloads``."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads))
