"""Runs one peer tool (vlora-dev 1.0.0 or lorashare 0.1.3) in bench/.venv-peers; prints one JSON line.

    bench/.venv-peers/bin/python bench/peer_driver.py vlora-dev compress --k 8 --out /tmp/x DIR ...
    bench/.venv-peers/bin/python bench/peer_driver.py lorashare fidelity --k 8 --out /tmp/x DIR ...

This file must not import our vlora (vlora-dev's import name is also ``vlora``). Each tool is called
through its documented Python API with its recommended settings and an explicit k:
    vlora-dev   vlora.load_adapter + vlora.SharedSubspace.from_adapters(adapters, num_components=k)
    lorashare   lorashare.SHAREModel.from_adapters(paths, num_components=k)
``compress`` reports the seconds of load + compress (imports excluded). ``fidelity`` reports the stored
bytes (fp32 numbers kept for all tasks) and the pooled ΔW relative error, computed from r x r Grams the
same way as vlora_core.quality (sqrt(Σ ‖ΔW − ΔW'‖² / Σ ‖ΔW‖²) over tasks and layers).
``merge`` (vlora-dev only, bench/merge.py) runs its documented merge, vlora.merge.task_arithmetic(adapters,
weights) — the weighted sums of the A and of the B factors — and saves it with vlora.save_adapter to --out;
it reports the seconds of the merge alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]  # never our vlora

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def originals(dirs) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per adapter: layer -> {"A": (r, d_in), "B": (d_out, r)}, straight from the files."""
    out = []
    for d in dirs:
        layers: dict = {}
        for key, t in load_file(str(Path(d) / "adapter_model.safetensors")).items():
            m = _KEY.match(key)
            if m:
                layers.setdefault(m["layer"], {})[m["side"]] = t.double()
        out.append(layers)
    return out


def sq_error(A, B, A2, B2) -> tuple[float, float]:
    """‖B·A − B2·A2‖² and ‖B·A‖² from 2r x 2r Grams (no d_out x d_in product)."""
    L = torch.cat([B, -B2.double()], dim=1)  # (d_out, 2r)
    R = torch.cat([A, A2.double()], dim=0)  # (2r, d_in)
    err = (L.T @ L * (R @ R.T)).sum().clamp(min=0).item()
    norm = (B.T @ B * (A @ A.T)).sum().item()
    return err, norm


def pooled(pairs) -> float:
    num, den = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return (num / den) ** 0.5 if den > 0 else 0.0


# ---- vlora-dev ----------------------------------------------------------------------------------------
def vlora_dev_compress(dirs, k):
    import vlora

    adapters = [vlora.load_adapter(d) for d in dirs]
    return vlora.SharedSubspace.from_adapters(adapters, task_ids=[Path(d).name for d in dirs], num_components=k)


def vlora_dev_score(sub, dirs):
    stats = sub.compression_stats()
    pairs = []
    for d, orig in zip(dirs, originals(dirs)):
        w = sub.reconstruct(Path(d).name)
        for layer, f in orig.items():
            pairs.append(sq_error(f["A"], f["B"], w.lora_a[layer], w.lora_b[layer]))
    return 4 * stats["total_params_compressed"], pooled(pairs)


# ---- lorashare ----------------------------------------------------------------------------------------
def lorashare_compress(dirs, k):
    from lorashare import SHAREModel

    return SHAREModel.from_adapters({Path(d).name: str(d) for d in dirs}, num_components=k)


def lorashare_score(share, dirs):
    numbers = sum(c.numel() for c in share.components.values())
    numbers += sum(t.numel() for loads in share.all_loadings.values() for t in loads.values())
    pairs = []
    for d, orig in zip(dirs, originals(dirs)):
        w = share.reconstruct(Path(d).name)
        rebuilt: dict = {}
        for key, t in w.items():
            m = _KEY.match(key)
            if m:
                rebuilt.setdefault(m["layer"], {})[m["side"]] = t
        for layer, f in orig.items():
            pairs.append(sq_error(f["A"], f["B"], rebuilt[layer]["A"], rebuilt[layer]["B"]))
    return 4 * numbers, pooled(pairs)


TOOLS = {"vlora-dev": (vlora_dev_compress, vlora_dev_score), "lorashare": (lorashare_compress, lorashare_score)}


def vlora_dev_merge(dirs, weights, out) -> float:
    import vlora
    from vlora.merge import task_arithmetic

    adapters = [vlora.load_adapter(d) for d in dirs]
    start = time.perf_counter()
    merged = task_arithmetic(adapters, weights)
    seconds = time.perf_counter() - start
    vlora.save_adapter(merged, out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=list(TOOLS))
    parser.add_argument("mode", choices=["compress", "fidelity", "merge"])
    parser.add_argument("--k", type=int)
    parser.add_argument("--weights", help="merge: comma-separated, one per folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    if args.mode == "merge":
        weights = [float(w) for w in args.weights.split(",")]
        seconds = vlora_dev_merge(args.dirs, weights, args.out)
        print(json.dumps({"tool": args.tool, "seconds": seconds, "torch": torch.__version__}))
        return
    compress, score = TOOLS[args.tool]
    start = time.perf_counter()
    result = compress(args.dirs, args.k)
    seconds = time.perf_counter() - start
    payload = {"tool": args.tool, "k": args.k, "seconds": seconds, "torch": torch.__version__}
    if args.mode == "fidelity":
        payload["bytes"], payload["error"] = score(result, args.dirs)
    print(json.dumps(payload))


if __name__ == "__main__":
    sys.exit(main())
