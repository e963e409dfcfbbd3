"""Item 2 / issue 14: fidelity per byte — pooled ΔW relative error against the bytes a store takes on disk.

    python bench/fidelity.py --n 16 --kinds mixture column

Bytes are those of the store folder each tool writes (vlora: ``SharedSubspace.save``, every file; peers: their
own save, bench/peer_store.py), for all N tasks. vlora's curves come from one decomposition per basis
(``SharedSubspace.decompose``) cut at each k and rounded to each storage dtype (fp32, bf16, int8); peers' points
at each k are scored with the same ΔW error (bench/budgets.py's ``pooled_error`` of their reconstructions).
Demo adapters (assets/demo_adapters/) are used when present; their behaviour at matched budgets is
bench/budgets.py's. Results: bench/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from budgets import pooled_error
from common import HERE, PEERS_PYTHON, demo_dirs, dir_bytes, write_result
from synthetic import adapter_dirs

from vlora import SharedSubspace, load_adapter
from vlora_core.quality import overall_error

KS = (1, 2, 4, 8, 16, 24, 31, 48, 64, 96, 128)
DTYPES = ("float32", "bfloat16", "int8")


def vlora_curve(adapters, method: str, ks, dtype: str = "float32") -> list[dict]:
    full = SharedSubspace.decompose(adapters, method=method)
    points, seen = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            sub = full.truncated(k, copy=True)
            used = max(v for sides in sub.layer_ks.values() for v in sides.values())
            if used in seen:
                continue  # clipped: the same subspace as a smaller k
            seen.add(used)
            sub.set_dtype(dtype)
            sub.measure_against(full)
            folder = sub.save(Path(tmp) / str(used))
            points.append({"k": used, "bytes": dir_bytes(folder), "error": overall_error(sub)})
    return points


def peer_curve(tool: str, dirs, ks) -> list[dict]:
    """The peer's store on disk at each k (its own save) and the ΔW error of its reconstructions."""
    originals = {Path(d).name: load_adapter(d) for d in dirs}
    points = []
    for k in ks:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(
                [str(PEERS_PYTHON), str(HERE / "peer_store.py"), tool, "--k", str(k), "--out", out, *map(str, dirs)],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                points.append({"k": k, "failed": proc.stderr[-500:]})
                continue
            disk = json.loads(proc.stdout.strip().splitlines()[-1])["disk_bytes"]
            rebuilt = {name: load_adapter(Path(out) / "tasks" / name, name) for name in originals}
            points.append({"k": k, "bytes": disk, "error": pooled_error(originals, rebuilt)})
    return points


def curves(dirs, ks, peers: dict[str, list[int]]) -> dict:
    adapters = [load_adapter(d) for d in dirs]
    out = {"original_bytes": sum((Path(d) / "adapter_model.safetensors").stat().st_size for d in dirs)}
    for method in ("flat", "rank"):
        for dtype in DTYPES:
            name = f"vlora {method}" + ("" if dtype == "float32" else f" {dtype}")
            out[name] = vlora_curve(adapters, method, ks, dtype)
    for tool, peer_ks in peers.items():
        out[tool] = peer_curve(tool, dirs, peer_ks)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["mixture", "column"])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--no-demo", action="store_true", help="synthetic sets only (bench/budgets.py has the demo)")
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["vlora-dev=1,4,15", "lorashare=4,16,64"],
        help="TOOL=K,K,...: the ks each peer is run at (one compress per k)",
    )
    args = parser.parse_args(argv)
    peers = {t: [int(k) for k in ks.split(",")] for t, ks in (p.split("=") for p in args.peers)}
    peers = peers if PEERS_PYTHON.exists() else {}
    sets = {f"{kind} N={args.n}": adapter_dirs(kind, args.n) for kind in args.kinds}
    demo = demo_dirs()
    if len(demo) >= 2 and not args.no_demo:
        sets["demo adapters"] = demo
    results = {}
    for name, dirs in sets.items():
        results[name] = curves(dirs, args.ks, peers)
        write_result("fidelity", {"results": results, "demo": "present" if demo else "absent (skipped)"})
        for tool, pts in results[name].items():
            if isinstance(pts, list):
                print(name, tool, [(p.get("k"), p.get("bytes"), round(p.get("error", float("nan")), 4)) for p in pts])
    return results


if __name__ == "__main__":
    main()
