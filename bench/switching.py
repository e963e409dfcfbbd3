"""Task switching, forward overhead, mixed-task batches and memory: VLoRAModel against PEFT, in one run.

    python bench/switching.py                 # bundled SmolLM2-135M, 100 tasks, q_proj+v_proj, r=8, flat k=16
    python bench/switching.py --method rank --k 32 --tasks 50 --rounds 7

Three copies of the base model are timed in interleaved rounds (bare, PEFT with every adapter loaded,
VLoRAModel) so that machine noise hits all of them alike; each figure is the median over the rounds.
The adapters are random PEFT folders built from a few shared prototypes (as adapters trained from one base
tend to be). Results go to bench/results/switching.json. vlora-dev 1.0.0 is timed too when its venv exists
(bench/.venv-peers, made by bench/peers.py): bench/switching_peer.py runs there on the same adapters and
is compared through each tool's ratio to the bare model of its own process. It is skipped otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vlora import LoRAAdapter, LoRALayer, SharedSubspace, VLoRAModel, load_adapter, save_adapter  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "switching.json"
PEERS_VENV = HERE / ".venv-peers"
TARGETS = ("q_proj", "v_proj")


# ---- setup -----------------------------------------------------------------------------------------
def load_models(copies: int):
    """The bundled model when the loader exists, else a config-built Llama of the same shape.

    Returns a description, the source a peer process can load (a folder, or "config"), and the copies.
    """
    try:
        from vlora_core.base_model import bundled_cache_folder, load_base_model

        (model, _), source = load_base_model(), str(bundled_cache_folder())
        name = "bundled SmolLM2-135M"
    except (ImportError, OSError, ValueError) as error:
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"bundled model unavailable ({error}); using a config-built Llama of SmolLM2's shape")
        config = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        )
        model, name, source = LlamaForCausalLM(config), "config-built Llama (SmolLM2 shape)", "config"
    model = model.eval().requires_grad_(False)
    return name, source, [model] + [copy.deepcopy(model) for _ in range(copies - 1)]


def target_shapes(model) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(m, torch.nn.Linear)
    }


def write_adapters(root: Path, shapes: dict, num_tasks: int, rank: int, prototypes: int = 8) -> list[Path]:
    """Random PEFT adapters: mixtures of a few shared prototype factors plus a little noise of their own."""
    gen = torch.Generator().manual_seed(0)
    protos = {
        n: (
            torch.randn(prototypes, rank, d_in, generator=gen) * 0.02,
            torch.randn(prototypes, d_out, rank, generator=gen) * 0.02,
        )
        for n, (d_in, d_out) in shapes.items()
    }
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": None,
    }
    dirs = []
    for i in range(num_tasks):
        mix = torch.randn(prototypes, generator=gen) / prototypes**0.5
        layers = {
            n: LoRALayer(
                A=torch.einsum("p,prd->rd", mix, A) + 0.002 * torch.randn(A.shape[1:], generator=gen),
                B=torch.einsum("p,pdr->dr", mix, B) + 0.002 * torch.randn(B.shape[1:], generator=gen),
                scaling=2.0,
            )
            for n, (A, B) in protos.items()
        }
        dirs.append(save_adapter(LoRAAdapter(f"task{i:03d}", config, layers), root / f"task{i:03d}"))
    return dirs


def load_peft(model, dirs: list[Path]):
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        peft.load_adapter(str(d), adapter_name=d.name)
    return peft.eval()


# ---- timing ----------------------------------------------------------------------------------------
def seconds(fn, repeat: int) -> float:
    """Mean wall time of one call, over ``repeat`` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def interleaved(cases: dict, rounds: int, repeat: int) -> dict[str, float]:
    """Median over rounds; in each round every case runs once, so drift hits all cases alike."""
    samples = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(seconds(fn, repeat))
    return {name: statistics.median(values) for name, values in samples.items()}


def forward(model, ids, **kwargs):
    return lambda: model(ids, **kwargs)


def decode(model, ids, new_tokens: int):
    return lambda: model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )


def cycle(switch, ids: list[str]):
    state = {"i": 0}

    def step():
        state["i"] += 1
        switch(ids[state["i"] % len(ids)])

    return step


# ---- the measurements ------------------------------------------------------------------------------
def measure_switch(peft, vlora, task_ids, args) -> dict:
    times = interleaved(
        {"peft": cycle(peft.set_adapter, task_ids), "vlora": cycle(vlora.set_task, task_ids)}, args.rounds, repeat=50
    )
    return {"what": "set_task vs set_adapter, one call", "unit": "ms", **_ms(times)}


def measure_forward(bare, peft, vlora, task_ids, args) -> dict:
    ids = torch.randint(0, 1000, (1, args.seq))
    peft.set_adapter(task_ids[0]), vlora.set_task(task_ids[0])
    times = interleaved(
        {"bare": forward(bare, ids), "peft": forward(peft, ids), "vlora": forward(vlora, ids)}, args.rounds, repeat=2
    )
    vlora.merge_task(task_ids[0])
    merged = interleaved({"bare": forward(bare, ids), "vlora": forward(vlora, ids)}, args.rounds, repeat=2)
    vlora.unmerge()
    return {
        "what": f"forward of 1 x {args.seq} tokens, one task active",
        "unit": "ms",
        **_ms(times),
        "vlora_merged": merged["vlora"] * 1e3,
        "bare_merged_round": merged["bare"] * 1e3,
    }


def measure_decode(bare, peft, vlora, task_ids, args) -> dict:
    ids = torch.randint(0, 1000, (1, 16))
    peft.set_adapter(task_ids[0]), vlora.set_task(task_ids[0])
    n = args.new_tokens
    times = interleaved(
        {"bare": decode(bare, ids, n), "peft": decode(peft, ids, n), "vlora": decode(vlora, ids, n)},
        args.rounds,
        repeat=1,
    )
    return {
        "what": f"greedy generate of {n} tokens (per token)",
        "unit": "ms",
        **{k: v * 1e3 / n for k, v in times.items()},
    }


def measure_mixed(peft, vlora, task_ids, args) -> dict:
    rows = task_ids[: args.batch]
    ids = torch.randint(0, 1000, (len(rows), args.seq))
    peft.set_adapter(rows[0]), vlora.set_task(rows[0])
    cases = {
        "peft": forward(peft, ids, adapter_names=rows),
        "vlora": forward(vlora, ids, task_ids=rows),
        "peft_one_task": forward(peft, ids),
        "vlora_one_task": forward(vlora, ids),
    }
    times = interleaved(cases, args.rounds, repeat=1)
    return {"what": f"forward of {len(rows)} x {args.seq}, a different task per row", "unit": "ms", **_ms(times)}


def measure_memory(peft, vlora, num_tasks: int) -> dict:
    peft_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    basis = sum(layer.P_A.nbytes + layer.P_B.nbytes for layer in vlora.targets.values())
    task = next(iter(vlora.subspace.tasks.values()))
    per_task = sum(t.nbytes for sides in task.loadings.values() for t in sides.values())
    return {
        "what": f"adapter bytes for {num_tasks} tasks",
        "unit": "MB",
        "peft": peft_bytes / 1e6,
        "vlora": (basis + num_tasks * per_task) / 1e6,
        "peft_per_task": peft_bytes / num_tasks / 1e6,
        "vlora_per_task": per_task / 1e6,
        "vlora_shared_basis": basis / 1e6,
    }


def _ms(times: dict[str, float]) -> dict[str, float]:
    return {k: v * 1e3 for k, v in times.items()}


# ---- report ----------------------------------------------------------------------------------------
def ratios(results: dict) -> dict[str, float]:
    f, d, m, s, mem = (results[k] for k in ("forward", "decode", "mixed", "switch", "memory"))
    return {
        "switch: vlora / peft": s["vlora"] / s["peft"],
        "forward: vlora / bare": f["vlora"] / f["bare"],
        "forward: peft / bare": f["peft"] / f["bare"],
        "forward merged: vlora / bare": f["vlora_merged"] / f["bare_merged_round"],
        "decode: vlora / bare": d["vlora"] / d["bare"],
        "decode: peft / bare": d["peft"] / d["bare"],
        "mixed batch: vlora / peft": m["vlora"] / m["peft"],
        "mixed batch: vlora / vlora one task": m["vlora"] / m["vlora_one_task"],
        "memory: vlora / peft": mem["vlora"] / mem["peft"],
        "memory per added task: vlora / peft": mem["vlora_per_task"] / mem["peft_per_task"],
    }


def peer_ratios(results: dict, peer: dict | None) -> dict[str, float]:
    """Against vlora-dev: its switch time, and each tool's overhead over the bare model of its own process."""
    if not peer or "error" in peer:
        return {}
    f, d, mem = results["forward"], results["decode"], results["memory"]
    own = lambda times: times["vlora_dev"] / times["bare"]  # noqa: E731
    return {
        "switch: vlora / vlora-dev": results["switch"]["vlora"] / peer["switch_ms"],
        "forward: vlora-dev / bare": own(peer["forward_ms"]),
        "forward overhead: vlora / vlora-dev": (f["vlora"] / f["bare"]) / own(peer["forward_ms"]),
        "decode: vlora-dev / bare": own(peer["decode_ms_per_token"]),
        "decode overhead: vlora / vlora-dev": (d["vlora"] / d["bare"]) / own(peer["decode_ms_per_token"]),
        "memory: vlora / vlora-dev (stored + active ΔW)": mem["vlora"]
        / (peer["stored_mb"] + peer["active_task_dense_delta_mb"]),
    }


def print_table(results: dict, summary: dict[str, float], peer: dict | None) -> None:
    print(f"\n{'measure':<12} {'unit':<5} " + " ".join(f"{k:>16}" for k in ("bare", "peft", "vlora")))
    for name, row in results.items():
        cells = " ".join(f"{row[k]:>16.4g}" if k in row else f"{'-':>16}" for k in ("bare", "peft", "vlora"))
        print(f"{name:<12} {row['unit']:<5} {cells}   {row['what']}")
    if peer is None:
        print(f"\nvlora-dev 1.0.0: skipped (no venv at {PEERS_VENV.relative_to(HERE.parent)})")
    else:
        print(f"\nvlora-dev 1.0.0 (own process, timed against its own bare model): {json.dumps(peer)}")
    print()
    for name, value in summary.items():
        print(f"{name:<48} {value:8.3f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100, help="adapters stored (PEFT loads them all)")
    parser.add_argument("--k", type=int, default=16, help="num_components of the subspace")
    parser.add_argument("--method", default="flat", choices=["flat", "rank"])
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians (>= 5)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row in forward timings")
    parser.add_argument("--batch", type=int, default=4, help="rows (tasks) in the mixed batch")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated in the decode timing")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on shared, busy cores more threads wait on each other",
    )
    return parser.parse_args(argv)


def build(dirs: list[Path], for_peft, for_vlora, args) -> tuple:
    start = time.perf_counter()
    peft = load_peft(for_peft, dirs)
    peft_load = time.perf_counter() - start
    start = time.perf_counter()
    subspace = SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=args.k, method=args.method)
    vlora = VLoRAModel(for_vlora, subspace).eval()
    setup = {"peft_load_adapters": peft_load, "vlora_compress_and_wrap": time.perf_counter() - start}
    print(f"setup: PEFT {peft_load:.0f} s, vlora {setup['vlora_compress_and_wrap']:.0f} s", flush=True)
    return peft, vlora, setup


def measure_all(bare, peft, vlora, task_ids: list[str], args) -> dict:
    steps = {
        "switch": lambda: measure_switch(peft, vlora, task_ids, args),
        "forward": lambda: measure_forward(bare, peft, vlora, task_ids, args),
        "decode": lambda: measure_decode(bare, peft, vlora, task_ids, args),
        "mixed": lambda: measure_mixed(peft, vlora, task_ids, args),
        "memory": lambda: measure_memory(peft, vlora, args.tasks),
    }
    results = {}
    with torch.inference_mode():
        for step, measure in steps.items():
            start = time.perf_counter()
            results[step] = measure()
            print(f"  {step}: {time.perf_counter() - start:.0f} s", flush=True)
    return results


def measure_peer(source: str, dirs: list[Path], args) -> dict | None:
    """vlora-dev 1.0.0 in its own venv (bench/.venv-peers), on the same adapters; None when absent."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        return None
    command = [
        str(python),
        str(HERE / "switching_peer.py"),
        "--model",
        source,
        "--k",
        str(args.k),
        "--rank",
        str(args.rank),
        "--seq",
        str(args.seq),
        "--new-tokens",
        str(args.new_tokens),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
        *map(str, dirs),
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=HERE, env=env)
    print(f"  vlora-dev: {time.perf_counter() - start:.0f} s", flush=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name, source, (bare, for_peft, for_vlora) = load_models(3)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(Path(tmp), target_shapes(bare), args.tasks, args.rank)
        peft, vlora, setup = build(dirs, for_peft, for_vlora, args)
        results = measure_all(bare, peft, vlora, [d.name for d in dirs], args)
        del peft, for_peft  # free memory before the peer process loads its copies
        peer = measure_peer(source, dirs, args)
    summary = ratios(results) | peer_ratios(results, peer)
    report = {
        "model": name,
        "tasks": args.tasks,
        "method": args.method,
        "k": args.k,
        "rank": args.rank,
        "targets": list(TARGETS),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "loadavg": os.getloadavg(),
        "setup_s": setup,
        "results": results,
        "ratios": summary,
        "vlora_dev": peer if peer is not None else f"skipped: no venv at {PEERS_VENV}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{name}: {args.tasks} tasks, {args.method} k={args.k}, r={args.rank}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print_table(results, summary, peer)
    print(f"\nwrote {RESULTS.relative_to(HERE.parent)}")
    return report


if __name__ == "__main__":
    main()
