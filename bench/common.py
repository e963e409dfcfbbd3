"""Helpers shared by the benchmark scripts: paths, timing, medians, machine noise, results files."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"  # generated adapters (gitignored)
RESULTS = HERE / "results"
PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"
DEMO = HERE.parent / "assets" / "demo_adapters"  # the bundled demo's PEFT adapter folders


def demo_dirs() -> list[Path]:
    """The demo adapter folders (each holding an adapter_config.json), by name; none when the assets are absent."""
    return sorted(p for p in DEMO.iterdir() if (p / "adapter_config.json").is_file()) if DEMO.is_dir() else []


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def spread(times: list[float]) -> dict:
    """min / median / max of repeated timings, and how many runs."""
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "runs": len(times)}


def machine() -> dict:
    """What the timings ran on: cores and the load average (other jobs share these cores)."""
    return {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def read_result(name: str) -> dict | None:
    """bench/results/<name>.json as written by ``write_result``, or None before the first run."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload | {"machine": machine()}, indent=2, default=str) + "\n")
    return path
