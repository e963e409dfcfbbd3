"""vlora-dev 1.0.0's serving path, timed like bench/switching.py times ours; runs in bench/.venv-peers.

    bench/.venv-peers/bin/python bench/switching_peer.py --model DIR|config --k 16 --seq 64 DIR ...

Prints one JSON line: set_task latency, forward and decode times with the bare model of the same process
(interleaved rounds, medians), and the bytes its serving holds (the compressed numbers plus the dense ΔW
per layer that vlora-dev's set_task caches). This file must not import our vlora (same import name).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]  # never our vlora

import torch  # noqa: E402


def load_model(source: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if source == "config":  # the same fallback shape as bench/switching.py
        config = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config).eval()
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True).eval()


def interleaved(cases: dict, rounds: int, repeat: int) -> dict[str, float]:
    samples = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            samples[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind in (
        ("--model", str),
        ("--k", int),
        ("--rank", int),
        ("--seq", int),
        ("--new-tokens", int),
        ("--rounds", int),
        ("--threads", int),
    ):
        parser.add_argument(flag, type=kind, required=True)
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    import vlora  # vlora-dev 1.0.0

    torch.set_num_threads(args.threads)

    bare = load_model(args.model).requires_grad_(False)
    ids = [Path(d).name for d in args.dirs]
    subspace = vlora.SharedSubspace.from_adapters(
        [vlora.load_adapter(d) for d in args.dirs], task_ids=ids, num_components=args.k
    )
    model = vlora.VLoRAModel(copy.deepcopy(bare), subspace, lora_alpha=2 * args.rank)
    state = {"i": 0}

    def switch():
        state["i"] += 1
        model.set_task(ids[state["i"] % len(ids)])

    x, prompt, n = torch.randint(0, 1000, (1, args.seq)), torch.randint(0, 1000, (1, 16)), args.new_tokens
    gen = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        switch_s = interleaved({"vlora_dev": switch}, args.rounds, repeat=10)
        model.set_task(ids[0])
        forward = interleaved({"bare": lambda: bare(x), "vlora_dev": lambda: model(x)}, args.rounds, repeat=2)
        decode = interleaved(
            {
                "bare": lambda: bare.generate(prompt, **gen),
                "vlora_dev": lambda: model.base_model.generate(prompt, **gen),
            },
            args.rounds,
            repeat=1,
        )
    stats = subspace.compression_stats()
    cached = sum(t.numel() * t.element_size() for t in (model._cached_deltas or {}).values())
    print(
        json.dumps(
            {
                "switch_ms": switch_s["vlora_dev"] * 1e3,
                "forward_ms": {k: v * 1e3 for k, v in forward.items()},
                "decode_ms_per_token": {k: v * 1e3 / n for k, v in decode.items()},
                "stored_mb": 4 * stats["total_params_compressed"] / 1e6,
                "active_task_dense_delta_mb": cached / 1e6,
                "mixed_batch": "not supported (one task per model)",
            }
        )
    )


if __name__ == "__main__":
    main()
