"""How long `vlora` takes to answer, whole process, against `python -c "import torch"` measured in the same run.

    OMP_NUM_THREADS=1 python bench/cli_startup.py [--runs 7]

Each command runs --runs times in a new process under /usr/bin/time (wall seconds and peak RSS); the median is
reported, and its ratio to the median of `python -c "import torch"`. The store is the 5 demo adapters
(assets/demo_adapters) compressed with the defaults, made once before timing; "info, older store" is the same
store with its manifest's recorded variance explained removed (a store written before it was recorded: loaded
in full, with torch). `python -X importtime` of `vlora --help` lists the slowest imports and whether torch is one.
Results: bench/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo_adapters"
VLORA = [sys.executable, "-m", "vlora_core.cli"]


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run of ``command``, by /usr/bin/time."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True, cwd=ROOT)
    wall, rss = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss)


def median_of(command: list[str], runs: int) -> dict:
    times, rss = zip(*(timed(command) for _ in range(runs)))
    return {"seconds": statistics.median(times), "all_seconds": list(times), "peak_rss_mib": max(rss) / 1024}


def make_stores(folder: Path) -> tuple[Path, Path]:
    store, older = folder / "store", folder / "older"
    adapters = sorted(p for p in DEMO.iterdir() if p.is_dir())
    subprocess.run([*VLORA, "compress", *map(str, adapters), "-o", str(store)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", _OLDER, str(store), str(older)], check=True, capture_output=True, cwd=ROOT)
    return store, older


_OLDER = """
import json, shutil, sys
from vlora_core.io import manifest as schema
shutil.copytree(sys.argv[1], sys.argv[2])
path = sys.argv[2] + "/manifest.json"
m = json.load(open(path))
for layer in m["layers"]:
    layer.pop("variance_explained", None)
open(path, "w").write(json.dumps(schema.seal(m), indent=2))
"""


def slowest_imports(command: list[str], top: int = 8) -> list[dict]:
    """`python -X importtime`: the slowest top-level imports (cumulative µs) of ``command``."""
    done = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True, cwd=ROOT)
    rows = []
    for line in done.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if found and len(found.group(3)) <= 1:  # top level only
            rows.append({"module": found.group(4), "cumulative_ms": int(found.group(2)) / 1000})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, older = make_stores(Path(tmp))
        commands = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "vlora --help": [*VLORA, "--help"],
            "vlora compress (argument error)": [*VLORA, "compress", "x", "-o", "y", "--method", "nope"],
            "vlora info STORE": [*VLORA, "info", str(store)],
            "vlora info STORE --json": [*VLORA, "info", str(store), "--json"],
            "vlora info, older store (full load)": [*VLORA, "info", str(older)],
        }
        rows = {name: median_of(command, args.runs) for name, command in commands.items()}
        imports = slowest_imports([*VLORA, "--help"])
    torch_s = rows['python -c "import torch"']["seconds"]
    for row in rows.values():
        row["ratio_to_import_torch"] = row["seconds"] / torch_s
    print(f"{'command':<40} {'median s':>9} {'/ torch':>8} {'peak MiB':>9}   (median of {args.runs} runs)")
    for name, row in rows.items():
        print(f"{name:<40} {row['seconds']:>9.2f} {row['ratio_to_import_torch']:>8.2f} {row['peak_rss_mib']:>9.0f}")
    torch_in_help = any(r["module"] == "torch" for r in imports)
    print(
        "slowest imports of `vlora --help`: " + ", ".join(f"{r['module']} {r['cumulative_ms']:.0f} ms" for r in imports)
    )
    print(f"torch imported by `vlora --help`: {torch_in_help}")
    out = ROOT / "bench" / "results" / "cli_startup.json"
    result = {"runs": args.runs, "commands": rows, "help_imports": imports, "torch_in_help": torch_in_help}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
