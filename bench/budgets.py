"""Issue 14: fidelity per byte at matched byte budgets — bytes on disk against ΔW error and behaviour.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/budgets.py            # demo adapters, bundled SmolLM2-135M

For each budget (10x, 25 %, 50 %, 75 % of the input files' bytes) and each variant — vlora flat / rank x
fp32 / bf16 / int8 (``SharedSubspace.decompose`` cut at each k, rounded, saved; its folder's bytes), vlora-dev
1.0.0 and lorashare 0.1.3 (their stores as their own save writes them, bench/peer_store.py) — the largest k
whose store fits the budget is taken; every task's reconstruction is then scored against its original
adapter on the demo prompts with ``vlora_core.behaviour`` (teacher-forced on the original's greedy answer:
mean KL, 1 − effect retained, top-1 agreement; every variant in one joint decomposition, one reference run)
and with the pooled ΔW relative error. The goal: vlora's loss at most half the best peer's at every budget.
Results: bench/results/budgets.json.

    python bench/budgets.py --activation-aware [--damping 1]

compares plain and activation-aware bases (``--calibration``, issue 14 point 2) instead: flat and rank at a few k,
the demo prompts split in two folds (alternate lines per task), each half calibrating the bases and the other
half scoring them, so that no prompt scores a basis it calibrated. Results: bench/results/calibration_damping_<λ>.json
(λ = 0.01, 0.1, 1, 10 were run; the default, 1, was chosen from them: README, Activation-aware bases).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch
from common import HERE, PEERS_PYTHON, demo_dirs, dir_bytes, write_result

from vlora import SharedSubspace, load_adapter
from vlora_core.base_model import load_base_model
from vlora_core.behaviour import CANDIDATE, BehaviourConfig, aligned, measure_variants, reference
from vlora_core.io.prompts import read_prompts
from vlora_core.options import CALIBRATION_DAMPING
from vlora_core.quality import delta_w_gap, overall_error

PROMPTS = HERE.parent / "assets" / "demo_prompts.jsonl"
BUDGETS = {"10x": 0.10, "25 %": 0.25, "50 %": 0.50, "75 %": 0.75}
DTYPES = ("float32", "bfloat16", "int8")
KS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40)
PEER_KS = {"vlora-dev": (1, 2, 3, 4), "lorashare": (2, 3, 4, 6, 8, 12, 16, 20, 24, 32)}


def vlora_points(adapters, method: str, dtype: str, tmp: Path) -> list[dict]:
    """Every k of one basis in one precision: bytes of the saved store folder, ΔW error, the task adapters."""
    full = SharedSubspace.decompose(adapters, method=method)
    points, seen = [], set()
    for k in KS:
        sub = full.truncated(k, copy=True)
        used = max(v for sides in sub.layer_ks.values() for v in sides.values())
        if used in seen:
            continue
        seen.add(used)
        sub.set_dtype(dtype)
        sub.measure_against(full)
        folder = sub.save(tmp / f"{method}-{dtype}-{used}")
        candidates = {t: sub.to_adapter(t) for t in sub.task_ids}
        points.append({"k": used, "disk_bytes": dir_bytes(folder), "error": overall_error(sub), "adapters": candidates})
    return points


def peer_points(tool: str, dirs: list[Path], originals: dict, tmp: Path) -> list[dict]:
    points = []
    for k in PEER_KS[tool]:
        out = tmp / f"{tool}-{k}"
        proc = subprocess.run(
            [str(PEERS_PYTHON), str(HERE / "peer_store.py"), tool, "--k", str(k), "--out", str(out), *map(str, dirs)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            points.append({"k": k, "failed": proc.stderr[-300:]})
            continue
        disk = json.loads(proc.stdout.strip().splitlines()[-1])["disk_bytes"]
        candidates = {d.name: load_adapter(out / "tasks" / d.name, d.name) for d in dirs}
        points.append(
            {"k": k, "disk_bytes": disk, "error": pooled_error(originals, candidates), "adapters": candidates}
        )
    return points


def pooled_error(originals: dict, candidates: dict) -> float:
    """sqrt(Σ ‖ΔW − ΔW'‖² / Σ ‖ΔW‖²) over tasks and layers, from 2r x 2r Grams in float64."""
    num = den = 0.0
    for task, adapter in originals.items():
        for name, layer in adapter.layers.items():
            other = candidates[task].layers[name]
            F = (layer.A.double().T * layer.scaling)[None], layer.B.double()[None]
            G = (other.A.double().T * other.scaling)[None], other.B.double()[None]
            norm2 = ((F[1][0].T @ F[1][0]) * (F[0][0].T @ F[0][0])).sum().item()
            num += delta_w_gap(F, G).item() ** 2 * norm2
            den += norm2
    return math.sqrt(num / den)


def pick(points: list[dict], budget: float) -> dict | None:
    """The point with the most bytes within ``budget`` (the best k the budget buys)."""
    fits = [p for p in points if "disk_bytes" in p and p["disk_bytes"] <= budget]
    return max(fits, key=lambda p: p["disk_bytes"]) if fits else None


def behaviour(originals: dict, chosen: dict[str, dict], prompts, config: BehaviourConfig) -> dict[str, dict]:
    """label -> task -> TaskBehaviour, every chosen point's adapters in one joint decomposition."""
    ids = list(originals)
    labels = list(chosen)
    adapters = aligned([originals[t] for t in ids] + [chosen[lb]["adapters"][t] for lb in labels for t in ids])
    names = ids + [f"{CANDIDATE}{lb}/{t}" for lb in labels for t in ids]
    full = SharedSubspace.decompose(adapters, names)
    model, tokenizer = load_base_model("bundled", dtype="fp32")
    ref = reference(model, tokenizer, full, prompts, config, task_ids=ids)
    variants = {lb: {t: full.tasks[f"{CANDIDATE}{lb}/{t}"] for t in ids} for lb in labels}
    return measure_variants(model, tokenizer, full, ref, variants, config)


def summary(tasks: dict) -> dict:
    kl = [b.kl for b in tasks.values()]
    lost = [1 - b.effect_retained for b in tasks.values() if not b.no_effect]
    agree = [b.agreement for b in tasks.values()]
    return {
        "kl": sum(kl) / len(kl),
        "effect_lost": sum(lost) / len(lost) if lost else float("nan"),
        "agreement": sum(agree) / len(agree),
        "per_task": {
            t: {"kl": b.kl, "effect_retained": b.effect_retained, "agreement": b.agreement} for t, b in tasks.items()
        },
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--peers", nargs="*", default=list(PEER_KS))
    parser.add_argument(
        "--activation-aware",
        action="store_true",
        help="instead: plain vs activation-aware bases (calibrated on half the demo prompts, scored on the other half)",
    )
    parser.add_argument(
        "--damping", type=float, default=CALIBRATION_DAMPING, help="--activation-aware: the calibration's damping"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.activation_aware:
        return activation_aware(args)
    dirs = demo_dirs()
    originals = {d.name: load_adapter(d) for d in dirs}
    original_bytes = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
    peers = args.peers if PEERS_PYTHON.exists() else []
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("flat", "rank"):
            for dtype in DTYPES:
                curves[f"vlora {method} {dtype}"] = vlora_points(list(originals.values()), method, dtype, Path(tmp))
        for tool in peers:
            curves[tool] = peer_points(tool, dirs, originals, Path(tmp))
    chosen, table = {}, {}
    for budget, share in BUDGETS.items():
        table[budget] = {}
        for variant, points in curves.items():
            point = pick(points, share * original_bytes)
            if point is not None:
                label = f"{variant} k={point['k']}"
                chosen[label] = point
                table[budget][variant] = label
    config = BehaviourConfig(answer_tokens=args.answer_tokens)
    scored = behaviour(originals, chosen, read_prompts(PROMPTS), config)
    rows = {
        lb: {"k": p["k"], "disk_bytes": p["disk_bytes"], "error": p["error"]} | summary(scored[lb])
        for lb, p in chosen.items()
    }
    verdicts = {}
    for budget, picks in table.items():
        ours = {v: rows[lb] for v, lb in picks.items() if v.startswith("vlora ")}
        theirs = {v: rows[lb] for v, lb in picks.items() if not v.startswith("vlora ")}
        verdicts[budget] = verdict(ours, theirs)
    payload = {
        "original_bytes": original_bytes,
        "budgets": BUDGETS,
        "answer_tokens": args.answer_tokens,
        "curves": {v: [{k: x for k, x in p.items() if k != "adapters"} for p in pts] for v, pts in curves.items()},
        "picks": table,
        "rows": rows,
        "verdicts": verdicts,
    }
    write_result("budgets", payload)
    for budget, v in verdicts.items():
        print(budget, json.dumps(v))
    return payload


# ---- activation-aware bases (issue 14, point 2) ---------------------------------------------------------------
AWARE_KS = {"flat": (1, 2, 3, 4), "rank": (2, 4, 8, 12, 16)}


def folds(prompts) -> list[tuple[list, list]]:
    """Two (calibration, evaluation) splits of the prompts: alternate lines of each task's own prompts and of the
    shared ones, each half calibrating once and scoring once, so no prompt scores the basis it calibrated."""
    groups: dict = {}
    for prompt in prompts:
        groups.setdefault(prompt.task, []).append(prompt)
    halves = [[p for g in groups.values() for p in g[i::2]] for i in (0, 1)]
    return [(halves[0], halves[1]), (halves[1], halves[0])]


def activation_aware(args) -> dict:
    """Plain against activation-aware bases, flat and rank at a few k, at equal bytes (the same k: the same shapes,
    bytes of the saved stores checked equal): ΔW error, activation-weighted error and behaviour (KL, 1 − effect
    retained, top-1 agreement) on the prompts the calibration did not see, for each of the two folds."""
    from vlora_core import compress
    from vlora_core.calibration import calibrate
    from vlora_core.io.prompts import write_prompts
    from vlora_core.reports import task_activation_errors

    dirs = demo_dirs()
    originals = {d.name: load_adapter(d) for d in dirs}
    adapters = list(originals.values())
    layers = list(adapters[0].layers)
    model, tokenizer = load_base_model("bundled", dtype="fp32")
    reference = compress.layer_factors(adapters, layers)  # plain canonical factors, to weigh the plain fits' errors
    config = BehaviourConfig(answer_tokens=args.answer_tokens)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for fold, (calibration_set, evaluation_set) in enumerate(folds(read_prompts(PROMPTS))):
            path = write_prompts(Path(tmp) / f"calibration-{fold}.jsonl", calibration_set)
            calibration = calibrate(
                path, layers, "bundled", damping=args.damping, model_and_tokenizer=(model, tokenizer)
            )
            chosen, rows = {}, {}
            for method, ks in AWARE_KS.items():
                for k in ks:
                    for variant in ("plain", "aware"):
                        sub = SharedSubspace.from_adapters(
                            adapters,
                            num_components=k,
                            method=method,
                            dtype="float32",
                            calibration=calibration if variant == "aware" else None,
                        )
                        if variant == "plain":  # the same C weighs the plain store's error
                            calibration.measure(method, sub.shapes, sub.bases, reference, list(sub.tasks.values()))
                        label = f"{method} {variant} k={k}"
                        folder = sub.save(Path(tmp) / f"{fold}-{label.replace(' ', '-')}")
                        act = task_activation_errors(sub)
                        rows[label] = {
                            "method": method,
                            "variant": variant,
                            "k": k,
                            "disk_bytes": dir_bytes(folder) - (folder / "manifest.json").stat().st_size,
                            "error": overall_error(sub),
                            "act_error": (sum(v * v for v in act.values()) / len(act)) ** 0.5,
                        }
                        chosen[label] = {"adapters": {t: sub.to_adapter(t) for t in sub.task_ids}}
            scored = behaviour(originals, chosen, evaluation_set, config)
            for label in rows:
                rows[label] |= summary(scored[label])
            runs.append({"calibration": calibration.record, "evaluation_prompts": len(evaluation_set), "rows": rows})
    table = {}
    for label in runs[0]["rows"]:
        both = [run["rows"][label] for run in runs]
        table[label] = {key: both[0][key] for key in ("method", "variant", "k", "disk_bytes")} | {
            key: sum(r[key] for r in both) / len(both)
            for key in ("error", "act_error", "kl", "effect_lost", "agreement")
        }
    payload = {"damping": args.damping, "answer_tokens": args.answer_tokens, "folds": runs, "mean_of_folds": table}
    write_result(f"calibration_damping_{args.damping:g}", payload)
    print(f"{'setting':<18} {'bytes':>10} {'ΔW err':>7} {'act err':>7} {'KL':>8} {'1-effect':>8} {'agree':>6}")
    for label, r in table.items():
        print(
            f"{label:<18} {r['disk_bytes']:>10,} {r['error']:>7.4f} {r['act_error']:>7.4f} {r['kl']:>8.4f} "
            f"{r['effect_lost']:>8.4f} {r['agreement']:>6.3f}"
        )
    return payload


def verdict(ours: dict, theirs: dict) -> dict:
    """The best vlora variant against the best peer at one budget, by KL and by effect lost (lower is better)."""
    out = {}
    for metric in ("kl", "effect_lost", "error"):
        mine = min(ours.items(), key=lambda kv: kv[1][metric], default=None)
        peer = min(theirs.items(), key=lambda kv: kv[1][metric], default=None)
        if mine is None:
            out[metric] = {"vlora": None}
            continue
        entry = {"vlora": mine[0], "vlora_value": mine[1][metric]}
        if peer is not None:
            ratio = mine[1][metric] / peer[1][metric] if peer[1][metric] > 0 else float("inf")
            entry |= {"peer": peer[0], "peer_value": peer[1][metric], "ratio": ratio, "meets_half": ratio <= 0.5}
        else:
            entry |= {"peer": None, "meets_half": True}  # no peer store fits this budget at all
        out[metric] = entry
    return out


if __name__ == "__main__":
    main()
