"""Item 4: streaming compress of many adapters; peak memory must not grow with N.

    python bench/scale.py --n 100 300 1000 --hidden 512

Each N runs in a fresh process (``--child``). After its imports it reads its RSS (the baseline) and resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``), so the peak it reports after ``stream_compress`` of
the first N synthetic mixture adapters is that of the compress alone, not of importing torch.
Results: bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import write_result
from synthetic import adapter_dirs


def child(n: int, hidden: int, k: int, chunk: int, method: str) -> dict:
    from vlora_core.subspace import stream_compress

    dirs = adapter_dirs("mixture", n, hidden)
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    start = time.perf_counter()
    sub = stream_compress(dirs, num_components=k, method=method, chunk=chunk)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return {
        "n": n,
        "hidden": hidden,
        "k": k,
        "chunk": chunk,
        "method": method,
        "seconds": seconds,
        "baseline_rss_mib": base,
        "peak_rss_mib": peak,
        "tasks": len(sub.tasks),
        "input_mib": sum((d / "adapter_model.safetensors").stat().st_size for d in dirs) / 2**20,
    }


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (kB there), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--method", default="flat")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.n[0], args.hidden, args.k, args.chunk, args.method)))
        return {}
    adapter_dirs("mixture", max(args.n), args.hidden)  # generate once, outside the measured processes
    rows = []
    for n in args.n:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--n",
            str(n),
            "--hidden",
            str(args.hidden),
            "--k",
            str(args.k),
            "--chunk",
            str(args.chunk),
            "--method",
            args.method,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
        write_result("scale", {"rows": rows})
    return {"rows": rows}


if __name__ == "__main__":
    main()
