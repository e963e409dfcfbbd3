"""Deterministic synthetic Llama-shaped PEFT adapters, written as real PEFT folders under bench/data/.

    python bench/synthetic.py --kind mixture --n 32

Two kinds of shared structure (r = 16, 32 layers x q_proj/v_proj, hidden 1024 by default):
    mixture  each adapter's factors are a random mixture of a few template adapters, plus 5% noise
    column   each adapter's rank vectors lie in a column space shared by all (dim 64 per layer side),
             with per-adapter random coefficients, plus 5% noise
Folders are cached per (kind, hidden, seed); adapter i is the same for every n, so n = 8 is a prefix of n = 128.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import DATA
from safetensors.torch import save_file

KINDS = ("mixture", "column")
RANK, LAYERS, HIDDEN, TEMPLATES, SHARED_DIM, NOISE = 16, 32, 1024, 4, 64, 0.05
TARGETS = ("q_proj", "v_proj")


def module_names(layers: int = LAYERS) -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}" for i in range(layers) for t in TARGETS]


def adapter_config(rank: int) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": "synthetic-llama",
        "inference_mode": True,
    }


def write_folder(path: Path, factors: dict, rank: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, (A, B) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(rank), indent=2) + "\n")


def adapter_dirs(
    kind: str, n: int, hidden: int = HIDDEN, seed: int = 0, rank: int = RANK, layers: int = LAYERS
) -> list[Path]:
    """Folders of the first n adapters of one kind, generated once; n = 8 is a prefix of n = 128."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    root = DATA / f"{kind}-h{hidden}-r{rank}-L{layers}-s{seed}"
    dirs = [root / f"task_{i:04d}" for i in range(n)]
    missing = [i for i, d in enumerate(dirs) if not (d / "adapter_model.safetensors").is_file()]
    for start in range(0, len(missing), 64):  # bounded memory: 64 adapters at a time
        part = missing[start : start + 64]
        for i, factors in zip(part, _generate(kind, seed, part, hidden, rank, layers)):
            write_folder(dirs[i], factors, rank)
    return dirs


def _generate(kind, seed, indices, d, rank, layers):
    """Shared structure from ``seed`` (same for every adapter); each adapter's coefficients from its index."""
    names = module_names(layers)
    M = len(names)
    structure = torch.Generator().manual_seed(seed)
    if kind == "mixture":
        tA = torch.randn(M, TEMPLATES, rank, d, generator=structure) / d**0.5  # (M, T, r, d_in)
        tB = torch.randn(M, TEMPLATES, d, rank, generator=structure) / rank**0.5  # (M, T, d_out, r)
    else:
        QA = torch.linalg.qr(torch.randn(M, d, SHARED_DIM, generator=structure))[0]  # (M, d_in, s)
        QB = torch.linalg.qr(torch.randn(M, d, SHARED_DIM, generator=structure))[0]  # (M, d_out, s)
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        if kind == "mixture":
            w = torch.randn(M, TEMPLATES, generator=gen)  # (M, T)
            A = torch.einsum("mt,mtrd->mrd", w, tA) + NOISE * torch.randn(M, rank, d, generator=gen) / d**0.5
            B = torch.einsum("mt,mtdr->mdr", w, tB) + NOISE * torch.randn(M, d, rank, generator=gen) / rank**0.5
        else:
            A = (QA @ torch.randn(M, SHARED_DIM, rank, generator=gen)).transpose(1, 2)  # (M, r, d_in)
            B = QB @ torch.randn(M, SHARED_DIM, rank, generator=gen)  # (M, d_out, r)
            A = A + NOISE * A.std() * torch.randn(M, rank, d, generator=gen)
            B = B + NOISE * B.std() * torch.randn(M, d, rank, generator=gen)
        out.append({name: (A[m].contiguous(), B[m].contiguous()) for m, name in enumerate(names)})
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default="mixture")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    args = parser.parse_args()
    dirs = adapter_dirs(args.kind, args.n, args.hidden)
    print(f"{len(dirs)} adapters under {dirs[0].parent}")
