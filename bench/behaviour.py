"""Issue 13: behaviour against k on the demo adapters, next to ΔW error, and what measuring it costs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/behaviour.py [--repeats 3] [--naive-ks 1 8 32] [--greedy-chars 0]

The five demo adapters (assets/demo_adapters/) on the bundled SmolLM2-135M in fp32 (its prefill runs about 5x
faster in fp32 than in bf16 on this project's CPUs), each task on its 8 prompts of assets/demo_prompts.jsonl
(sentiment on reviews, the others on everyday questions), answered once by the original adapter.

- behaviour (``vlora_core.behaviour``): effect retained, top-1 agreement and KL per task at every k of both
  bases (and a few adaptive thresholds), next to the ΔW relative error per task (``quality.sweep_ks``), and the
  recommended k at 0.95 / 0.95;
- cost: ``evaluate`` of 5 tasks x 8 prompts x 10 values of k on the rank basis (reference included: the
  original's answers with the logits it chose them from, the base model's logits; k = 40 keeps every direction,
  so it is the originals, scored without a run), ``--repeats`` times, against the naive way measured in the
  same run: one ``generate`` per task and prompt for the answers, then one forward per task per k per prompt
  (VLoRAModel on the truncated store, ``set_task``, one unpadded row, the LM head on the scored positions only),
  plus the base model and the original once per task and prompt. The naive way is timed in full for its
  reference and on ``--naive-ks`` values of k only, then extrapolated linearly to the 10 values; its answers and
  numbers are checked against the batched ones. Other jobs may share the machine: the load average is recorded
  before and after each timed run, and CPU time (per thread too) next to wall time.

Results: bench/results/behaviour.json and behaviour.png.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import HERE, RESULTS, demo_dirs, write_result  # noqa: E402

from vlora_core import CompressConfig, SharedSubspace, VLoRAModel, load_adapter  # noqa: E402
from vlora_core.base_model import load_base_model  # noqa: E402
from vlora_core.behaviour import (  # noqa: E402
    BehaviourConfig,
    measure,
    recommend,
    reference,
    reference_stats,
    row_sums,
    task_scores,
)
from vlora_core.io.prompts import read_prompts  # noqa: E402
from vlora_core.quality import sweep_ks  # noqa: E402

ASSETS = HERE.parent / "assets"
GRIDS = {"flat": [1, 2, 3, 4], "rank": [1, 2, 4, 6, 8, 12, 16, 24, 32, 40]}  # flat: k ≤ N − 1 = 4
THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]  # adaptive k: variance explained per layer side
TIMED = "rank"  # the basis whose 10 values of k are timed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the batched evaluation (median)")
    parser.add_argument("--naive-ks", type=int, nargs="+", default=[1, 8, 32], help="k timed the naive way")
    parser.add_argument("--greedy-chars", type=int, default=0, help="> 0: also compare greedy answers' first n chars")
    args = parser.parse_args(argv)
    logging.getLogger("vlora").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dirs = demo_dirs()
    adapters, ids = [load_adapter(d) for d in dirs], [d.name for d in dirs]
    prompts = read_prompts(ASSETS / "demo_prompts.jsonl")
    model, tokenizer = load_base_model("bundled", dtype="fp32")
    config = BehaviourConfig(greedy_chars=args.greedy_chars)
    fulls = {method: SharedSubspace.decompose(adapters, ids, method=method) for method in GRIDS}

    timing, ref, timed = time_batched(model, tokenizer, fulls[TIMED], prompts, config, args.repeats)
    measured = {TIMED: timed}  # the timed grid's last report: only the adaptive thresholds are left to measure there
    methods = {m: behaviour(model, tokenizer, fulls[m], ref, GRIDS[m], config, measured.get(m)) for m in GRIDS}
    timing["naive"] = time_naive(model, fulls[TIMED], ref, config, args.naive_ks, methods[TIMED]["report"])
    timing["ratio_naive_to_batched"] = timing["naive"]["extrapolated_s"] / timing["batched"]["median_s"]
    timing["cpu_ratio_naive_to_batched"] = timing["naive"]["extrapolated_cpu_s"] / timing["batched"]["median_cpu_s"]
    payload = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} HF_HUB_OFFLINE=1 .venv/bin/python "
        "bench/behaviour.py " + " ".join(argv or sys.argv[1:]),
        "model": "bundled SmolLM2-135M-Instruct, fp32, CPU",
        "threads": torch.get_num_threads(),
        "tasks": ids,
        "rows": {"tasks": len(ids), "prompts_per_task": len(ref.rows) // len(ids), "ks": len(GRIDS[TIMED])},
        "answer_tokens": config.answer_tokens,
        "scored_positions_per_row": statistics.median(r.answer for r in ref.rows),
        "tokens_per_row": statistics.median(len(r.tokens) for r in ref.rows),
        "methods": {m: {k: v for k, v in result.items() if k != "report"} for m, result in methods.items()},
        "timing": timing,
    }
    print_summary(payload)
    write_result("behaviour", payload)
    plot(payload)
    return payload


# ---- behaviour against k ----------------------------------------------------------------------------
def behaviour(model, tokenizer, full, ref, grid: list[int], config: BehaviourConfig, measured=None) -> dict:
    """Every k of the grid and every adaptive threshold on one basis, with the ΔW error of each fixed k;
    ``measured``: the grid's report already in hand (then only the thresholds run)."""
    adaptive = [CompressConfig(method=full.method, adaptive_k=True, variance_threshold=t) for t in THRESHOLDS]
    if measured is None:
        report = measure(model, tokenizer, full, ref, [*grid, *adaptive], config)
    else:
        extra = measure(model, tokenizer, full, ref, adaptive, config)
        report = replace(measured, settings=measured.settings + extra.settings)
    sweep = sweep_ks(full, grid)
    errors = {k: dict(zip(sweep.task_ids, sweep.task_errors(k).tolist())) for k in grid}
    settings = [
        setting_row(s, errors.get(s.config.num_components) if not s.config.adaptive_k else None)
        for s in report.settings
    ]
    recommendation = recommend(report)
    return {
        "report": report,
        "settings": settings,
        "base": {t: {"kl": b.kl, "agreement": b.agreement} for t, b in report.base.items()},
        "recommended_k": None if recommendation.k is None else recommendation.k.config.num_components,
        "recommended_threshold": None
        if recommendation.adaptive is None
        else recommendation.adaptive.config.variance_threshold,
        "recommendation": recommendation.summary(),
    }


def setting_row(setting, errors: dict | None) -> dict:
    tasks = {
        t: {
            "effect_retained": r.effect_retained,
            "agreement": r.agreement,
            "kl": r.kl,
            "no_effect": r.no_effect,
            "greedy_same": r.greedy_same,
            "delta_w_error": None if errors is None else errors[t],
        }
        for t, r in setting.tasks.items()
    }
    return {
        "label": setting.label,
        "k": None if setting.config.adaptive_k else setting.config.num_components,
        "threshold": setting.config.variance_threshold if setting.config.adaptive_k else None,
        "bytes": setting.stored_bytes,
        "tasks": tasks,
        "min_effect": min(r.effect_retained for r in setting.tasks.values()),
        "median_effect": statistics.median(r.effect_retained for r in setting.tasks.values()),
        "min_agreement": min(r.agreement for r in setting.tasks.values()),
        "median_kl": statistics.median(r.kl for r in setting.tasks.values()),
        "max_delta_w_error": None if errors is None else max(errors.values()),
    }


# ---- cost: batched against naive --------------------------------------------------------------------------
def time_batched(model, tokenizer, full, prompts, config, repeats: int):
    """``reference`` + ``measure`` of the timed grid (= ``evaluate``), ``repeats`` times; the last reference is kept."""
    runs, threads = [], torch.get_num_threads()
    for _ in range(repeats):
        load, cpu = os.getloadavg()[0], time.process_time()
        start = time.perf_counter()
        ref = reference(model, tokenizer, full, prompts, config)
        middle = time.perf_counter()
        report = measure(model, tokenizer, full, ref, GRIDS[TIMED], config)
        end = time.perf_counter()
        cpu_s = time.process_time() - cpu  # this process's CPU time, all threads: the work, whatever else runs
        runs.append(
            {
                "reference_s": middle - start,
                "measure_s": end - middle,
                "cpu_s": cpu_s,
                "cpu_per_thread_s": cpu_s / threads,  # the wall time with each thread on a core of its own
                "load_before": load,
                "load_after": os.getloadavg()[0],
            }
        )
    totals = [r["reference_s"] + r["measure_s"] for r in runs]
    k_max = max(b.k for sides in full.bases.values() for b in sides.values())
    cut = sum(k < k_max for k in GRIDS[TIMED])  # the k that keep fewer directions than the full basis
    rows = len(ref.rows) * (1 + cut)  # base (deduplicated where equal) + one per k that cuts (answers generated)
    batched = {
        "runs": runs,
        "median_s": statistics.median(totals),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "median_cpu_per_thread_s": statistics.median(r["cpu_per_thread_s"] for r in runs),
        "rows": rows,
        "target_s": 60,
    }
    return {"batched": batched}, ref, report


def time_naive(model, full, ref, config, ks: list[int], report) -> dict:
    """The naive way: its reference (the original's answer to each prompt, generated one prompt at a time;
    the base model and the original, a row each) in full, then one row per task x prompt at each of ``ks``;
    extrapolated to the timed grid. Its numbers are checked against ``report``'s."""
    load_before = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    same_answers = answer_each(model, full, ref, config)
    greedy_s = time.perf_counter() - start
    one_row_each(model, None, ref)  # the base model
    one_row_each(model, full, ref)  # the originals
    reference_s, reference_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    per_k, per_k_cpu, gaps = [], [], []
    for k in ks:
        start, cpu = time.perf_counter(), time.process_time()
        sums = one_row_each(model, full.truncated(k), ref)
        per_k.append(time.perf_counter() - start)
        per_k_cpu.append(time.process_time() - cpu)
        naive = task_scores(ref, sums, config)
        batched = next(s for s in report.settings if s.config.num_components == k).tasks
        gaps += [abs(naive[t].effect_retained - batched[t].effect_retained) for t in naive]
        gaps += [abs(naive[t].agreement - batched[t].agreement) for t in naive]
    return {
        "reference_s": reference_s,
        "greedy_s": greedy_s,
        "same_answers_as_batched": same_answers,
        "ks_timed": ks,
        "per_k_s": per_k,
        "median_per_k_s": statistics.median(per_k),
        "extrapolated_s": reference_s + statistics.median(per_k) * len(GRIDS[TIMED]),
        "reference_cpu_s": reference_cpu_s,
        "per_k_cpu_s": per_k_cpu,
        "extrapolated_cpu_s": reference_cpu_s + statistics.median(per_k_cpu) * len(GRIDS[TIMED]),
        "forwards": len(ref.rows) * (3 + len(GRIDS[TIMED])),  # + the generations, one per row
        "median_forward_s": statistics.median(per_k) / len(ref.rows),
        "max_gap_to_batched": max(gaps),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def answer_each(model, full, ref, config) -> float:
    """The original's greedy answer to each prompt, one ``generate`` per task and prompt (the naive reference's
    first step); returns the share equal to the batched reference's answers."""
    wrapped, same = VLoRAModel(model, full), 0
    try:
        with torch.inference_mode():
            for row in ref.rows:
                wrapped.set_task(row.task)
                prompt = torch.tensor([row.prompt])
                out = wrapped.generate(prompt, max_new_tokens=config.answer_tokens, do_sample=False)
                same += tuple(out[0, prompt.shape[1] :].tolist())[: row.answer] == row.tokens[len(row.prompt) :]
    finally:
        wrapped.unload()
    return same / len(ref.rows)


def one_row_each(model, subspace, ref) -> torch.Tensor:
    """One unpadded forward per reference row, the LM head on its scored positions only: ``set_task`` to the
    row's task on ``subspace`` (None: the base model); ``row_sums`` (R, 5) against the reference."""
    wrapped = None if subspace is None else VLoRAModel(model, subspace)
    sums = torch.zeros(len(ref.rows), 5)
    try:
        with torch.inference_mode():
            for i, row in enumerate(ref.rows):
                if wrapped is not None:
                    wrapped.set_task(row.task)
                logits = (wrapped or model)(torch.tensor([row.inputs]), logits_to_keep=row.answer).logits  # (1, a, V)
                z_o = ref.logits[i]
                sums[i] = row_sums(logits[0].float(), z_o, *reference_stats(z_o))
    finally:
        if wrapped is not None:
            wrapped.unload()
    return sums


# ---- printing and plotting ---------------------------------------------------------------------------------
def print_summary(payload: dict) -> None:
    for method, result in payload["methods"].items():
        print(f"\n{method} basis")
        print(
            f"{'setting':>14} {'bytes':>9} {'max ΔW err':>10} {'min effect':>10} {'median effect':>13} "
            f"{'min agree':>9} {'median KL':>9}"
        )
        for s in result["settings"]:
            err = "" if s["max_delta_w_error"] is None else f"{s['max_delta_w_error']:.3f}"
            print(
                f"{s['label']:>14} {s['bytes']:>9} {err:>10} {s['min_effect']:>10.3f} {s['median_effect']:>13.3f} "
                f"{s['min_agreement']:>9.3f} {s['median_kl']:>9.4f}"
            )
        print(result["recommendation"])
    t = payload["timing"]
    b, n = t["batched"], t["naive"]
    print(
        f"\n5 tasks x 8 prompts x 10 k ({TIMED}): batched {b['median_s']:.1f} s (median of {len(b['runs'])}; "
        f"target {b['target_s']} s) over {b['rows']} rows; naive {n['extrapolated_s']:.1f} s (reference "
        f"{n['reference_s']:.1f} s + {n['median_per_k_s']:.1f} s per k, median of {len(n['per_k_s'])} k, "
        f"{n['median_forward_s'] * 1000:.0f} ms per forward); naive / batched = {t['ratio_naive_to_batched']:.2f}x; "
        f"CPU time: batched {b['median_cpu_s']:.1f} s ({b['median_cpu_per_thread_s']:.1f} s per thread), naive "
        f"{n['extrapolated_cpu_s']:.1f} s "
        f"({t['cpu_ratio_naive_to_batched']:.2f}x); largest gap between the two ways' numbers: "
        f"{n['max_gap_to_batched']:.1e}"
    )


def plot(payload: dict) -> None:
    """Per basis: effect retained, top-1 agreement and ΔW error per task against k; the recommended k dashed."""
    methods = payload["methods"]
    fig, axes = plt.subplots(len(methods), 3, figsize=(15, 4 * len(methods)), squeeze=False)
    for row, (method, result) in zip(axes, methods.items()):
        fixed = [s for s in result["settings"] if s["k"] is not None]
        ks = [s["k"] for s in fixed]
        panels = (
            ("effect_retained", "effect retained"),
            ("agreement", "top-1 agreement"),
            ("delta_w_error", "ΔW relative error"),
        )
        for ax, (key, name) in zip(row, panels):
            for task in payload["tasks"]:
                ax.plot(ks, [s["tasks"][task][key] for s in fixed], "o-", ms=3, label=task)
            if key != "delta_w_error":
                ax.axhline(0.95, color="grey", ls=":", lw=1)
            if result["recommended_k"] is not None:
                ax.axvline(
                    result["recommended_k"],
                    color="black",
                    ls="--",
                    lw=1,
                    label=f"recommended k={result['recommended_k']}",
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k")
            ax.set_title(f"{method}: {name}")
        row[0].legend(fontsize=7)
    fig.suptitle("Demo adapters on SmolLM2-135M: behaviour (8 prompts per task, teacher-forced) and ΔW error against k")
    fig.tight_layout()
    fig.savefig(RESULTS / "behaviour.png", dpi=110)


if __name__ == "__main__":
    main()
