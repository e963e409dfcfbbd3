"""Server work per k change in the workbench: 32 adapters of SmolLM2-135M's shape, target ≤ 50 ms.

    python bench/workbench_k.py                    # 32 tasks, 30 blocks x q_proj + v_proj, r=8, both bases
    python bench/workbench_k.py --tasks 64 --rounds 5

"Server work" is what the compress callback does after the first look at a basis: the Workbench report
(truncating a task-less shell, look-ups in the k sweep) plus building the four plotly figures and
serialising them as gr.Plot does (``fig.to_json()``). The first look (SVDs + k sweep) is reported apart.
Results go to bench/results/workbench_k.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from ui.callbacks import Callbacks  # noqa: E402
from ui.session import Sessions  # noqa: E402
from ui.settings import AppSettings  # noqa: E402
from vlora import LoRAAdapter, LoRALayer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "workbench_k.json"
SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192)}  # SmolLM2-135M: (d_in, d_out)


def adapters(num_tasks: int, blocks: int, rank: int, prototypes: int = 4) -> dict[str, LoRAAdapter]:
    """Random adapters built from a few shared prototypes, as adapters trained from one base tend to be."""
    torch.manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(blocks) for m in SHAPES]
    protos = [
        {
            n: (
                torch.randn(rank, SHAPES[n.rsplit(".", 1)[1]][0]) * 0.1,
                torch.randn(SHAPES[n.rsplit(".", 1)[1]][1], rank) * 0.1,
            )
            for n in names
        }
        for _ in range(prototypes)
    ]
    out = {}
    for j in range(num_tasks):
        proto = protos[j % prototypes]
        layers = {
            n: LoRALayer(A + 0.05 * torch.randn_like(A), B + 0.05 * torch.randn_like(B), 2.0)
            for n, (A, B) in proto.items()
        }
        out[f"task{j:02d}"] = LoRAAdapter(
            f"task{j:02d}", {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(SHAPES)}, layers
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sessions = Sessions(AppSettings(session_root=Path(tempfile.mkdtemp(prefix="vlora-bench-"))))
    calls, request = Callbacks(sessions, AppSettings()), SimpleNamespace(session_hash="bench")
    with sessions.open(request) as bench:
        bench.adapters = adapters(args.tasks, args.blocks, args.rank)
    results = {"tasks": args.tasks, "blocks": args.blocks, "rank": args.rank, "methods": {}}
    for method in ("flat", "rank"):
        start = time.perf_counter()
        calls.compress(method, 4, False, 0.9, request)
        first = time.perf_counter() - start
        ks = list(range(1, min(args.tasks - 1, 32) + 1))
        times = []
        for _ in range(args.rounds):
            for k in ks:
                start = time.perf_counter()
                outputs = calls.compress(method, k, False, 0.9, request)
                [figure.to_json() for figure in outputs[1:5]]  # what gr.Plot does with each figure
                times.append(time.perf_counter() - start)
        start = time.perf_counter()
        calls.compress(method, 4, True, 0.9, request)
        adaptive = time.perf_counter() - start
        row = {
            "first_look_s": round(first, 2),
            "k_change_median_ms": round(1000 * statistics.median(times), 1),
            "k_change_p90_ms": round(1000 * sorted(times)[int(0.9 * len(times))], 1),
            "adaptive_change_s": round(adaptive, 2),
            "ks": [ks[0], ks[-1]],
        }
        results["methods"][method] = row
        print(
            f"{method}: first look {row['first_look_s']} s; k change median {row['k_change_median_ms']} ms, "
            f"p90 {row['k_change_p90_ms']} ms (target 50 ms); adaptive-k change {row['adaptive_change_s']} s"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
