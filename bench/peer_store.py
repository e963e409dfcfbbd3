"""A peer's store as it writes it, and its reconstructed adapters, for bench/fidelity.py; one JSON line.

    bench/.venv-peers/bin/python bench/peer_store.py lorashare --k 8 --out /tmp/x DIR ...

Runs in bench/.venv-peers (vlora-dev's import name is ``vlora``, as ours). Compresses the folders with the tool's
documented API at k, saves the store with the tool's own save (vlora-dev ``SharedSubspace.save``, lorashare
``SHAREModel.save_pretrained``) to OUT/store, and writes each task's reconstruction as a PEFT folder
OUT/tasks/<name>/ (its original adapter_config.json, factors in float32), so that the same behaviour measure
scores every tool. Prints the store's bytes on disk (every file under OUT/store).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch  # noqa: E402  (peer_driver has put our vlora off the path)
from peer_driver import _KEY, TOOLS
from safetensors.torch import save_file  # noqa: E402


def factors(tool: str, model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (A (r, d_in), B (d_out, r)) of one task's reconstruction."""
    if tool == "vlora-dev":
        w = model.reconstruct(name)
        return {layer: (w.lora_a[layer], w.lora_b[layer]) for layer in w.lora_a}
    out: dict = {}
    for key, t in model.reconstruct(name).items():
        m = _KEY.match(key)
        if m:
            out.setdefault(m["layer"], {})[m["side"]] = t
    return {layer: (f["A"], f["B"]) for layer, f in out.items()}


def save(tool: str, model, folder: Path) -> None:
    if tool == "vlora-dev":
        model.save(str(folder))
    else:
        model.save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=list(TOOLS))
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("dirs", nargs="+")
    args = parser.parse_args()
    out = Path(args.out)
    model = TOOLS[args.tool][0](args.dirs, args.k)
    save(args.tool, model, out / "store")
    stored = sum(p.stat().st_size for p in (out / "store").rglob("*") if p.is_file())
    for d in map(Path, args.dirs):
        folder = out / "tasks" / d.name
        folder.mkdir(parents=True)
        state = {}
        for layer, (A, B) in factors(args.tool, model, d.name).items():
            state[f"base_model.model.{layer}.lora_A.weight"] = A.float().contiguous()
            state[f"base_model.model.{layer}.lora_B.weight"] = B.float().contiguous()
        save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        shutil.copy(d / "adapter_config.json", folder / "adapter_config.json")
    print(json.dumps({"tool": args.tool, "k": args.k, "disk_bytes": stored}))


if __name__ == "__main__":
    sys.exit(main())
