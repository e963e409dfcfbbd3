"""Item 2: fidelity per byte — pooled ΔW relative error against stored bytes, one curve per tool and basis.

    python bench/fidelity.py --n 32 --kinds mixture column

Stored bytes count everything a tool keeps for all N tasks (shared basis incl. mean + every task's loadings,
fp32). vlora's curves come from one decomposition per method (``SharedSubspace.decompose``) cut at each k;
peers' points come from bench/peer_driver.py at each k, scored with the same ΔW error (``quality``).
Demo adapters (assets/demo_adapters/) are used when present. Results: bench/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from common import HERE, PEERS_PYTHON, write_result
from synthetic import adapter_dirs

from vlora import SharedSubspace, load_adapter
from vlora_core.quality import overall_error, stored_bytes

DEMO = HERE.parent / "assets" / "demo_adapters"
KS = (1, 2, 4, 8, 16, 24, 31, 48, 64)


def vlora_curve(adapters, method: str, ks) -> list[dict]:
    full = SharedSubspace.decompose(adapters, method=method)
    points, seen = [], set()
    for k in ks:
        sub = full.truncated(k)
        used = max(v for sides in sub.layer_ks.values() for v in sides.values())
        if used in seen:
            continue  # clipped: the same subspace as a smaller k
        seen.add(used)
        sub.measure_against(full)
        points.append({"k": used, "bytes": stored_bytes(sub), "error": overall_error(sub)})
    return points


def peer_curve(tool: str, dirs, ks) -> list[dict]:
    points = []
    for k in ks:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(
                [
                    str(PEERS_PYTHON),
                    str(HERE / "peer_driver.py"),
                    tool,
                    "fidelity",
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
                points.append({"k": k, "failed": proc.stderr[-500:]})
                continue
            points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return points


def curves(dirs, ks, peers: dict[str, list[int]]) -> dict:
    adapters = [load_adapter(d) for d in dirs]
    out = {"original_bytes": sum((Path(d) / "adapter_model.safetensors").stat().st_size for d in dirs)}
    for method in ("flat", "rank"):
        out[f"vlora {method}"] = vlora_curve(adapters, method, ks)
    for tool, peer_ks in peers.items():
        out[tool] = peer_curve(tool, dirs, peer_ks)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--kinds", nargs="+", default=["mixture", "column"])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["vlora-dev=1,2,4,8,15", "lorashare=4,16,64"],
        help="TOOL=K,K,...: the ks each peer is run at (one compress per k)",
    )
    args = parser.parse_args(argv)
    peers = {t: [int(k) for k in ks.split(",")] for t, ks in (p.split("=") for p in args.peers)}
    peers = peers if PEERS_PYTHON.exists() else {}
    sets = {f"{kind} N={args.n}": adapter_dirs(kind, args.n) for kind in args.kinds}
    demo = sorted(p for p in DEMO.iterdir() if (p / "adapter_config.json").is_file()) if DEMO.is_dir() else []
    if len(demo) >= 2:
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
