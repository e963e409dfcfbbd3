"""Merging on ΔW: vlora's merges against vlora-dev's, and what a merge does on the bundled model, in one run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/merge.py [--n 32] [--runs 3] [--no-behaviour]

Two sets, each merged with weights 1/N (the mean: vlora-dev's default):
    demo       the 5 demo adapters (assets/demo_adapters: SmolLM2-135M, q_proj/v_proj, r = 8, lora_alpha 16)
    synthetic  N Llama-shaped adapters (bench/synthetic.py, mixture: hidden 1024, 32 layers x q/v, r = 16)
Merges timed (median of --runs; ties and dare once: they form every dense ΔW; adapters already in memory):
    vlora linear        merge.merge_adapters(method="linear"): Σ wᵢ·ΔWᵢ, exact, rank min(Σ rᵢ, d)
    vlora linear @ r    the same cut to the tasks' own rank r per layer by the SVD (its exact tail is stated)
    vlora cat/ties/dare their times (cat is exact; ties and dare are other merges, so no error against the sum)
    vlora-dev           vlora.merge.task_arithmetic in bench/.venv-peers (Σ wᵢ·Aᵢ and Σ wᵢ·Bᵢ, its documented
                        merge), saved by its save_adapter and read back with our load_adapter: the ΔW PEFT applies
                        from that folder; and the same factors at the tasks' own scaling (vlora-dev writes
                        lora_alpha = r, scaling 1), the error of merging A and B separately alone. Without the
                        peers venv (python bench/peers.py) only its approach, reproduced here, is measured.
Errors: sqrt(Σ ‖ΔW − ΔW_ref‖²) / sqrt(Σ ‖ΔW_ref‖²) over layers, against the dense Σ wᵢ·scalingᵢ·Bᵢ·Aᵢ in float64,
one layer's ΔW at a time.
Behaviour (demo set, on the bundled model, built-in prompts; --no-behaviour skips it): each merge's effect retained
against the exact merge (behaviour.compare_adapters), and the exact mean's against each part (measure_merge).
Example (README): pirate + shouting, weights 1 each, greedy answers of each part and of the merge.
Results: bench/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import DEMO, HERE, PEERS_PYTHON, demo_dirs, write_result
from synthetic import adapter_dirs

from vlora_core import SharedSubspace, VLoRAModel, load_adapter
from vlora_core.adapter import LoRAAdapter, LoRALayer
from vlora_core.merge import MergeConfig, exact_merge, merge_adapters

EXAMPLE = (["pirate", "shouting"], [1.0, 1.0])
EXAMPLE_PROMPT = "What is the tallest mountain in the world?"
METHODS = ("linear", "cat", "ties", "dare")


def dense_error(adapter: LoRAAdapter, adapters: list[LoRAAdapter], weights: list[float]) -> float:
    """``adapter``'s ΔW against the dense weighted sum, pooled over layers (float64, one layer at a time)."""
    gap = norm = 0.0
    for name in adapter.layers:
        want = sum(
            w * a.layers[name].scaling * (a.layers[name].B.double() @ a.layers[name].A.double())
            for a, w in zip(adapters, weights)
            if name in a.layers
        )
        layer = adapter.layers[name]
        got = layer.scaling * (layer.B.double() @ layer.A.double())
        gap += (got - want).norm().item() ** 2
        norm += want.norm().item() ** 2
    return math.sqrt(gap / norm)


def ab_separate(adapters: list[LoRAAdapter], weights: list[float], scaling: float | None) -> LoRAAdapter:
    """vlora-dev's approach, reproduced: Σ wᵢ·Aᵢ and Σ wᵢ·Bᵢ per layer, at ``scaling`` (None: 1, as it writes)."""
    layers = {}
    for name in adapters[0].layers:
        A = sum(w * a.layers[name].A.double() for a, w in zip(adapters, weights))
        B = sum(w * a.layers[name].B.double() for a, w in zip(adapters, weights))
        layers[name] = LoRALayer(A, B, 1.0 if scaling is None else scaling)
    return LoRAAdapter("ab-separate", {}, layers)


def timed_merges(adapters: list[LoRAAdapter], weights: list[float], runs: int) -> dict:
    rank = max(adapters[0].ranks.values())
    found = {}
    for label, config in [(m, MergeConfig(m)) for m in METHODS] + [("linear @ r", MergeConfig("linear", rank=rank))]:
        times, result = [], None
        for _ in range(runs if config.method in ("linear", "cat") else 1):  # ties / dare: one run (dense, slow)
            start = time.perf_counter()
            result = merge_adapters(adapters, weights, config=config)
            times.append(time.perf_counter() - start)
        entry = {
            "seconds": statistics.median(times),
            "runs": len(times),
            "ranks": sorted(set(result.adapter.ranks.values())),
        }
        if config.method in ("linear", "cat"):
            entry["error_vs_dense"] = dense_error(result.adapter, adapters, weights)
            entry["stated_error"] = result.error
        found[label] = entry
    return found


def vlora_dev(dirs: list[Path], adapters: list[LoRAAdapter], weights: list[float]) -> tuple[dict, LoRAAdapter | None]:
    """vlora-dev's merge of the same tasks (and its approach reproduced here), each against the dense sum."""
    scaling = adapters[0].layers[next(iter(adapters[0].layers))].scaling
    reproduced = ab_separate(adapters, weights, None)
    entry = {
        "reproduced_as_written_error": dense_error(reproduced, adapters, weights),
        "reproduced_scaling_restored_error": dense_error(ab_separate(adapters, weights, scaling), adapters, weights),
    }
    if not PEERS_PYTHON.exists():
        entry["note"] = "bench/.venv-peers missing (python bench/peers.py): vlora-dev's approach reproduced only"
        return entry, None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        done = subprocess.run(
            [
                str(PEERS_PYTHON),
                str(HERE / "peer_driver.py"),
                "vlora-dev",
                "merge",
                "--out",
                str(out),
                "--weights",
                ",".join(map(str, weights)),
                *map(str, dirs),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp,
        )
        written = load_adapter(out)
    entry["seconds"] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    entry["as_written_error"] = dense_error(written, adapters, weights)
    restored = LoRAAdapter("restored", {}, {n: LoRALayer(l.A, l.B, scaling) for n, l in written.layers.items()})
    entry["scaling_restored_error"] = dense_error(restored, adapters, weights)
    entry["written_lora_alpha"] = written.config.get("lora_alpha")
    return entry, written


def run_set(label: str, dirs: list[Path], runs: int) -> tuple[dict, dict]:
    adapters = [load_adapter(d) for d in dirs]
    weights = [1.0 / len(adapters)] * len(adapters)
    print(f"{label}: {len(adapters)} adapters, {len(adapters[0].layers)} layers, rank {adapters[0].ranks}"[:120])
    merges = timed_merges(adapters, weights, runs)
    dev, written = vlora_dev(dirs, adapters, weights)
    for name, entry in merges.items():
        error = f", error vs dense {entry['error_vs_dense']:.2e}" if "error_vs_dense" in entry else ""
        print(f"  vlora {name:<11} {entry['seconds']:8.3f} s{error}")
    for key in ("as_written_error", "scaling_restored_error", "reproduced_scaling_restored_error"):
        if key in dev:
            print(f"  vlora-dev {key:<34} {dev[key]:.3f}")
    return {"adapters": len(adapters), "weights": weights, "vlora": merges, "vlora_dev": dev}, {
        "adapters": adapters,
        "weights": weights,
        "vlora_dev": written,
    }


def behaviour(held: dict) -> dict:
    """The demo merges on the bundled model: each against the exact mean; the exact mean against each part."""
    from vlora_core.base_model import load_base_model
    from vlora_core.behaviour import compare_adapters, measure_merge

    model, tokenizer = load_base_model("bundled")
    adapters, weights = held["adapters"], held["weights"]
    exact = exact_merge(adapters, weights).adapter
    candidates = {"vlora linear @ r": merge_adapters(adapters, weights, config=MergeConfig(rank=8)).adapter}
    if held["vlora_dev"] is not None:
        candidates["vlora-dev as written"] = held["vlora_dev"]
    scaling = adapters[0].layers[next(iter(adapters[0].layers))].scaling
    candidates["A and B merged separately, scaling restored"] = ab_separate(adapters, weights, scaling)
    found = compare_adapters(model, tokenizer, dict.fromkeys(candidates, exact), candidates)
    parts = measure_merge(model, tokenizer, {a.name: a for a in adapters}, exact)
    out = {"against_exact_mean": {k: _numbers(b) for k, b in found.items()}}
    out["exact_mean_against_each_part"] = {k: _numbers(b) for k, b in parts.parts.items()}
    for k, b in found.items():
        print(f"  {k:<44} effect retained {b.effect_retained:.3f}, top-1 {b.agreement:.3f}")
    for k, b in parts.parts.items():
        print(f"  exact mean against {k:<25} effect retained {b.effect_retained:.3f}, top-1 {b.agreement:.3f}")
    return out


def _numbers(b) -> dict:
    return {k: v for k, v in asdict(b).items() if k in ("effect_retained", "agreement", "kl", "no_effect", "positions")}


def example() -> dict:
    """pirate + shouting, weights 1 each: greedy answers of each part and of the merge on the bundled model."""
    from vlora_core.base_model import chat_prompt, generate_text, load_base_model
    from vlora_core.behaviour import aligned

    model, tokenizer = load_base_model("bundled")
    names, weights = EXAMPLE
    parts = [load_adapter(DEMO / n) for n in names]
    merged = merge_adapters(parts, weights, name="pirate+shouting").adapter
    ids = [*names, merged.name]
    served = VLoRAModel(model, SharedSubspace.decompose(aligned([*parts, merged]), ids))
    answers = {}
    for task_id in ids:
        served.set_task(task_id)
        answers[task_id] = generate_text(served, tokenizer, chat_prompt(tokenizer, EXAMPLE_PROMPT), 40)
        print(f"  {task_id}: {answers[task_id]!r}")
    served.unload()
    return {"prompt": EXAMPLE_PROMPT, "weights": dict(zip(names, weights)), "answers": answers}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="synthetic adapters (default 32)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-behaviour", action="store_true", help="skip the bundled model (merges and errors only)")
    args = parser.parse_args(argv)
    demo, held = run_set("demo", demo_dirs(), args.runs)
    synthetic, _ = run_set(f"synthetic x{args.n}", adapter_dirs("mixture", args.n), args.runs)
    payload = {
        "command": f"python bench/merge.py --n {args.n} --runs {args.runs}",
        "demo": demo,
        f"synthetic_{args.n}": synthetic,
    }
    if not args.no_behaviour:
        payload["demo"]["behaviour"] = behaviour(held)
        payload["example"] = example()
    print(f"wrote {write_result('merge', payload)}")


if __name__ == "__main__":
    main()
