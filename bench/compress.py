"""Item 1: compress time for N synthetic adapters against the floor (bare safetensors load of the same files).

    python bench/compress.py --n 8 32 128 --kinds mixture column --runs 5
    python bench/compress.py --n 8 32 128 --cases "vlora flat" "vlora rank" --out compress_rank   # rank vs flat

Cases, interleaved run by run so machine noise hits all alike:
    floor        safetensors.load_file of every adapter file (nothing else)
    vlora flat   load_adapter + SharedSubspace.from_adapters(k, method="flat")   (in process)
    vlora rank   the same with method="rank"
    vlora flat, no errors   flat with measure=False: no ΔW error per task, which the peers do not compute either
    vlora cli    `vlora compress ... -k K` end to end in a fresh process (imports, load, fit, save)
    peers        bench/peer_driver.py in bench/.venv-peers (each times its own load + compress)
Results: bench/results/compress.json (min / median / max per case, ratios to the floor, rank ÷ flat), or --out NAME.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import HERE, PEERS_PYTHON, read_result, spread, timed, write_result
from safetensors.torch import load_file
from synthetic import adapter_dirs

from vlora import SharedSubspace, load_adapter

VLORA_CLI = Path(sys.executable).parent / "vlora"


def floor(dirs):
    return [load_file(d / "adapter_model.safetensors") for d in dirs]


def vlora_inprocess(method: str, k: int, measure: bool = True):
    return lambda dirs: SharedSubspace.from_adapters(
        [load_adapter(d) for d in dirs], num_components=k, method=method, measure=measure
    )


def vlora_cli(k: int):
    def run(dirs):
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [str(VLORA_CLI), "compress", *map(str, dirs), "-o", f"{out}/store", "-k", str(k)],
                check=True,
                capture_output=True,
            )

    return run


def peer(tool: str, k: int):
    """Runs the peer driver once; returns the seconds the peer reports for its own load + compress."""

    def run(dirs):
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(
                [
                    str(PEERS_PYTHON),
                    str(HERE / "peer_driver.py"),
                    tool,
                    "compress",
                    "--k",
                    str(k),
                    "--out",
                    out,
                    *map(str, dirs),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise RuntimeError(f"{tool}: {proc.stderr[-2000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]

    return run


def cases(k: int, peers: list[str], methods: list[str], only: list[str] | None = None) -> dict:
    table = {"floor": floor} | {f"vlora {m}": vlora_inprocess(m, k) for m in methods}
    table["vlora flat, no errors"] = vlora_inprocess("flat", k, measure=False)  # like the peers: no ΔW errors
    table = table | {"vlora cli": vlora_cli(k)} | {name: peer(name, k) for name in peers}
    if only:
        unknown = sorted(set(only) - set(table))
        if unknown:
            raise SystemExit(f"unknown --cases {unknown}; choose from: {', '.join(table)}")
        table = {name: fn for name, fn in table.items() if name in only}
    return table


def measure(dirs, table: dict, runs: int, peer_runs: dict[str, int]) -> dict:
    times = {name: [] for name in table}
    for run in range(runs):
        for name, fn in table.items():
            if run >= peer_runs.get(name, runs):
                continue  # slow peers: fewer runs (the run count is in the results)
            seconds, out = timed(fn, dirs)
            times[name].append(out if isinstance(out, float) else seconds)
            print(f"  run {run} {name:<12} {times[name][-1]:8.3f} s", flush=True)
    return {name: spread(t) for name, t in times.items() if t}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--kinds", nargs="+", default=["mixture", "column"])
    parser.add_argument("--k", type=int, default=8, help="num_components for every tool")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["flat", "rank"], help="vlora bases timed in process")
    parser.add_argument("--peers", nargs="*", default=["vlora-dev", "lorashare"])
    parser.add_argument(
        "--peer-runs", nargs="*", default=["vlora-dev=3", "lorashare=1"], help="TOOL=RUNS: fewer runs for slow peers"
    )
    parser.add_argument("--cases", nargs="*", help="time only these cases (e.g. 'vlora flat' 'vlora rank')")
    parser.add_argument("--out", default="compress", help="results file name under bench/results/ (no .json)")
    args = parser.parse_args(argv)
    peers = args.peers if PEERS_PYTHON.exists() else []
    results = (read_result(args.out) or {}).get("results", {})  # keep rows of earlier runs (other N / kinds)
    for kind in args.kinds:
        for n in args.n:
            print(f"{kind} N={n}", flush=True)
            row = measure(
                adapter_dirs(kind, n),
                cases(args.k, peers, args.methods, args.cases),
                args.runs,
                {t: int(r) for t, r in (p.split("=") for p in args.peer_runs)},
            )
            entry = {"kind": kind, "n": n, "cases": row}
            if "floor" in row:
                entry["ratio_to_floor"] = {c: v["median"] / row["floor"]["median"] for c, v in row.items()}
            if "vlora flat" in row and "vlora rank" in row:
                entry["rank_over_flat"] = row["vlora rank"]["median"] / row["vlora flat"]["median"]
            results[f"{kind}/{n}"] = entry
            write_result(args.out, {"k": args.k, "results": results})
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(f"{'kind/N':<14} {'case':<12} {'median s':>9} {'min':>8} {'max':>8} {'x floor':>8} runs")
    for key, r in results.items():
        for case, v in r["cases"].items():
            ratio = r.get("ratio_to_floor", {}).get(case, float("nan"))
            print(f"{key:<14} {case:<12} {v['median']:9.3f} {v['min']:8.3f} {v['max']:8.3f} {ratio:8.2f} {v['runs']}")
        if "rank_over_flat" in r:
            print(f"{key:<14} rank ÷ flat {r['rank_over_flat']:9.2f}")


if __name__ == "__main__":
    main()
