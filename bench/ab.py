"""A/B generation speed: greedy tokens/s of a task on VLoRAModel against the bare model's ``generate``.

The workbench's A/B tab generates with one VLoRAModel on the shared base model; this measures that path
(``generate_text`` on the wrapped model) against transformers' ``generate`` on the unwrapped model, same
prompt, same number of new tokens, for each dtype the CPU default could be. Interleaved runs, medians.

    python bench/ab.py [--tokens 48] [--runs 5] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import HERE, spread, write_result

from vlora import SharedSubspace, VLoRAModel, load_adapter
from vlora_core.base_model import chat_prompt, load_base_model

DEMO = HERE.parent / "assets" / "demo_adapters"
PROMPT = "What is the tallest mountain in the world?"


def tokens_per_s(model, tokenizer, text: str, tokens: int) -> float:
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - start)


def measure(dtype: str, tokens: int, runs: int) -> dict:
    model, tokenizer = load_base_model("bundled", dtype=dtype, device="cpu")
    dirs = sorted(p for p in DEMO.iterdir() if (p / "adapter_config.json").is_file())
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=4)
    text = chat_prompt(tokenizer, PROMPT)
    bare, vlora = [], []
    for _ in range(runs):  # interleaved: the machine's noise hits both alike
        bare.append(tokens_per_s(model, tokenizer, text, tokens))
        wrapped = VLoRAModel(model, subspace)
        wrapped.set_task(subspace.task_ids[0])
        vlora.append(tokens_per_s(wrapped, tokenizer, text, tokens))
        wrapped.unload()
    return {"bare": spread(bare), "vlora": spread(vlora), "ratio": statistics.median(vlora) / statistics.median(bare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {dtype: measure(dtype, args.tokens, args.runs) for dtype in args.dtypes}
    for dtype, r in results.items():
        print(
            f"{dtype}: bare {r['bare']['median']:.1f} tokens/s, vlora {r['vlora']['median']:.1f} tokens/s, "
            f"vlora / bare {r['ratio']:.2f}"
        )
    if {"fp32", "bf16"} <= set(results):
        speed = results["bf16"]["bare"]["median"] / results["fp32"]["bare"]["median"]
        print(f"bf16 / fp32 bare speed on this CPU: {speed:.2f}")
    write_result(
        "ab",
        {
            "command": "python bench/ab.py",
            "tokens": args.tokens,
            "runs": args.runs,
            "prompt": PROMPT,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
