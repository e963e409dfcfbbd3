"""Item 2, on the real demo adapters: the share of demo prompts whose greedy answer is unchanged after export.

    HF_HUB_OFFLINE=1 python bench/greedy.py --tokens 32

For every demo adapter (assets/demo_adapters/) and each of its demo prompts (assets/demo_prompts.json),
the original adapter, loaded by PEFT on the bundled SmolLM2-135M, gives the reference greedy answer. The
adapters are then compressed at each (method, k), every task exported as a PEFT folder (``export_task``),
loaded back by PEFT the same way, and asked again. Results: bench/results/greedy.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from common import HERE, write_result
from peft import PeftModel

from vlora import SharedSubspace, load_adapter
from vlora_core.base_model import chat_prompt, generate_text, load_base_model
from vlora_core.export import export_task
from vlora_core.quality import task_errors

ASSETS = HERE.parent / "assets"
SETTINGS = {"flat": (1, 2, 4), "rank": (4, 8, 16, 24, 40)}


def prompts_for(task: str) -> list[str]:
    prompts = json.loads((ASSETS / "demo_prompts.json").read_text())
    return prompts.get("by_task", {}).get(task) or prompts["shared"]


def answers(model: PeftModel, tokenizer, adapter_name: str, task: str, tokens: int) -> list[str]:
    model.set_adapter(adapter_name)
    return [generate_text(model, tokenizer, chat_prompt(tokenizer, p), tokens) for p in prompts_for(task)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer")
    args = parser.parse_args(argv)
    logging.getLogger("vlora").setLevel(logging.ERROR)  # k clipping notes
    dirs = sorted(p for p in (ASSETS / "demo_adapters").iterdir() if (p / "adapter_config.json").is_file())
    adapters = [load_adapter(d) for d in dirs]
    base, tokenizer = load_base_model()
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    for folder in dirs[1:]:
        model.load_adapter(str(folder), adapter_name=folder.name)
    reference = {d.name: answers(model, tokenizer, d.name, d.name, args.tokens) for d in dirs}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, ks in SETTINGS.items():
            for k in ks:
                subspace = SharedSubspace.from_adapters(adapters, num_components=k, method=method)
                same = total = 0
                for task in subspace.task_ids:
                    name = f"{method}-k{k}-{task}"
                    model.load_adapter(str(export_task(subspace, task, Path(tmp) / name)), adapter_name=name)
                    got = answers(model, tokenizer, name, task, args.tokens)
                    same += sum(a == b for a, b in zip(got, reference[task]))
                    total += len(got)
                    model.delete_adapter(name)
                rows.append(
                    {
                        "method": method,
                        "k": k,
                        "unchanged": same,
                        "prompts": total,
                        "share": same / total,
                        "max_task_delta_w_error": max(task_errors(subspace).values()),
                    }
                )
                print(rows[-1], flush=True)
                write_result("greedy", {"tokens": args.tokens, "rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
