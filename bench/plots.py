"""PNG figures from bench/results/*.json (matplotlib): compress times, fidelity per byte, streaming memory."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, read_result  # noqa: E402


def _save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


def compress_plot() -> None:
    """Each case's median as a multiple of the floor (the bare load of the same files), per kind and N."""
    data = read_result("compress")
    if not data:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    keys = list(data["results"])
    cases = [c for c in dict.fromkeys(c for k in keys for c in data["results"][k]["cases"]) if c != "floor"]
    width = 0.8 / len(cases)
    for j, case in enumerate(cases):
        vals = [data["results"][k]["ratio_to_floor"].get(case, float("nan")) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=case)
    ax.axhline(1.5, color="black", ls="--", lw=1, label="target: 1.5x the floor")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set_yscale("log")
    ax.set_ylabel("median time / floor (log)")
    ax.set_title("Compress time as a multiple of the bare load of the same files (OMP_NUM_THREADS=1)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, "compress")


def fidelity_plot() -> None:
    data = read_result("fidelity")
    if not data:
        return
    sets = data["results"]
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], sets.items()):
        for tool, pts in curves.items():
            pts = [p for p in pts if "error" in p] if isinstance(pts, list) else []
            if pts:
                ax.plot([p["bytes"] / 2**20 for p in pts], [p["error"] for p in pts], "o-", label=tool)
        ax.axvline(curves["original_bytes"] / 2**20, color="grey", ls=":", label="original files")
        ax.set_xscale("log")
        ax.set_xlabel("store MiB on disk (all tasks)")
        ax.set_ylabel("pooled ΔW relative error")
        ax.set_title(name)
        ax.legend(fontsize=8)
    _save(fig, "fidelity")


def budgets_plot() -> None:
    """Behaviour lost (mean KL; 1 − effect retained) against bytes on disk, per variant, demo adapters."""
    data = read_result("budgets")
    if not data:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_variant: dict = {}
    for label, row in data["rows"].items():
        by_variant.setdefault(label.rsplit(" k=", 1)[0], []).append(row)
    for ax, metric, name in zip(axes, ("kl", "effect_lost"), ("mean KL (nats)", "1 − effect retained")):
        for variant, rows in by_variant.items():
            rows = sorted(rows, key=lambda r: r["disk_bytes"])
            style = "o-" if variant.startswith("vlora") else "s--"
            ax.plot([r["disk_bytes"] / 2**20 for r in rows], [r[metric] for r in rows], style, label=variant)
        for share in data["budgets"].values():
            ax.axvline(share * data["original_bytes"] / 2**20, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("store MiB on disk (5 demo adapters; dotted: the budgets)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Behaviour lost at matched byte budgets (SmolLM2-135M, demo prompts)")
    _save(fig, "budgets")


def scale_plot() -> None:
    data = read_result("scale")
    if not data:
        return
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["n"] for r in rows], [r["peak_rss_mib"] for r in rows], "o-", label="peak RSS")
    ax.plot([r["n"] for r in rows], [r["input_mib"] for r in rows], "s--", label="input files")
    ax.set_xlabel("N adapters (streamed)")
    ax.set_ylabel("MiB")
    ax.set_title("stream_compress: peak memory vs N")
    ax.legend()
    _save(fig, "scale")


def main() -> None:
    compress_plot()
    fidelity_plot()
    budgets_plot()
    scale_plot()


if __name__ == "__main__":
    main()
