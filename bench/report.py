"""Markdown tables from bench/results/*.json, for docs/benchmarks.md.

python bench/report.py
"""

from __future__ import annotations

from budgets import BUDGETS
from common import read_result


def table(columns: str, rows) -> list[str]:
    """A markdown table: ``columns`` as "name | name: | ..." (a trailing ":" right-aligns the column), then each
    row's cells (anything that formats as text)."""
    names = [c.strip() for c in columns.split("|")]
    head = "| " + " | ".join(n.removesuffix(":") for n in names) + " |"
    rule = "|" + "|".join("---:" if n.endswith(":") else "---" for n in names) + "|"
    return [head, rule, *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def compress_table(data) -> list[str]:
    return table(
        "kind / N | case | median s: | min: | max: | runs: | × floor:",
        (
            (key, case, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}", v["runs"],
             f"{r['ratio_to_floor'][case]:.1f}")
            for key, r in data["results"].items()
            for case, v in r["cases"].items()
        ),
    )  # fmt: skip


def compress_summary(data) -> list[str]:
    """The targets' ratios per kind and N: medians against the floor and against each peer."""

    def row(key, r):
        med = {case: v["median"] for case, v in r["cases"].items()}
        ours, bare = med.get("vlora flat"), med.get("vlora flat, no errors")

        def speedup(peer, mine):
            return f"{med[peer] / mine:.1f}×" if peer in med and mine else "–"

        return (
            key, f"{ours / med['floor']:.1f}", f"{bare / med['floor']:.1f}", speedup("vlora-dev", ours),
            speedup("vlora-dev", bare), speedup("lorashare", ours), speedup("lorashare", bare),
        )  # fmt: skip

    return table(
        "kind / N | vlora flat × floor: | same, no errors × floor: | vlora-dev ÷ vlora flat: | (no errors): | "
        "lorashare ÷ vlora flat: | (no errors):",
        (row(key, r) for key, r in data["results"].items()),
    )


def fidelity_table(data) -> list[str]:
    def rows():
        for name, curves in data["results"].items():
            for tool, pts in curves.items():
                if not isinstance(pts, list):
                    yield name, "original files", "–", f"{pts / 2**20:.1f}", 0
                    continue
                for p in pts:
                    if "error" in p:
                        yield name, tool, p["k"], f"{p['bytes'] / 2**20:.2f}", f"{p['error']:.4f}"
                    else:
                        yield name, tool, p["k"], "failed", repr(p.get("failed", "")[-80:])

    return table("set | tool | k: | stored MiB: | ΔW rel. error:", rows())


def fidelity_budgets(data) -> list[str]:
    """Per set and budget (bench/budgets.py's shares of the input files): the lowest ΔW error among vlora's measured
    points whose store fits, against the lowest among the peers' (stores as they write them); ≤ 0.5× is the goal."""

    def best(curves, ours: bool, budget: float):
        fits = [
            (p["error"], tool, p)
            for tool, pts in curves.items()
            if isinstance(pts, list) and tool.startswith("vlora ") == ours
            for p in pts
            if "error" in p and p["bytes"] <= budget
        ]
        return min(fits, key=lambda f: f[0], default=None)

    def point(found) -> str:
        _, tool, p = found
        return f"{tool} k = {p['k']} ({p['bytes'] / 2**20:.1f} MiB)"

    def rows():
        for name, curves in data["results"].items():
            for label, share in BUDGETS.items():
                budget = share * curves["original_bytes"]
                mine, peer = best(curves, True, budget), best(curves, False, budget)
                if mine is None:
                    yield name, label, "none fits", "", "", "", "", ""
                    continue
                ratio = mine[0] / peer[0] if peer and peer[0] > 0 else None
                yield (
                    name, label, point(mine), f"{mine[0]:.4f}", point(peer) if peer else "none fits",
                    f"{peer[0]:.4f}" if peer else "–", "–" if ratio is None else f"{ratio:.2f}",
                    "met" if ratio is None or ratio <= 0.5 else "**missed**",
                )  # fmt: skip

    return table(
        "set | budget | best vlora | ΔW error: | best peer within the budget | ΔW error: | ratio: | ≤ 0.5×", rows()
    )


def scale_table(data) -> list[str]:
    return table(
        "N: | hidden: | input MiB: | seconds: | RSS after imports MiB: | peak RSS MiB:",
        (
            (r["n"], r["hidden"], f"{r['input_mib']:.0f}", f"{r['seconds']:.1f}", f"{r['baseline_rss_mib']:.0f}",
             f"{r['peak_rss_mib']:.0f}")
            for r in data["rows"]
        ),
    )  # fmt: skip


def greedy_table(data) -> list[str]:
    return table(
        "method | k: | greedy answers unchanged: | share: | worst task's ΔW rel. error:",
        (
            (r["method"], r["k"], f"{r['unchanged']} / {r['prompts']}", f"{r['share']:.0%}",
             f"{r['max_task_delta_w_error']:.3g}")
            for r in data["rows"]
        ),
    )  # fmt: skip


def budgets_table(data) -> list[str]:
    """Per budget: every variant's best k within it, its bytes, ΔW error and behaviour; then the verdict."""
    picks = table(
        "budget | variant | k: | MiB on disk: | ΔW rel. error: | mean KL: | 1 − effect: | top-1 agreement:",
        (
            (budget, variant, r["k"], f"{r['disk_bytes'] / 2**20:.2f}", f"{r['error']:.4f}", f"{r['kl']:.4f}",
             f"{r['effect_lost']:.4f}", f"{r['agreement']:.3f}")
            for budget, chosen in data["picks"].items()
            for variant, r in ((v, data["rows"][label]) for v, label in chosen.items())
        ),
    )  # fmt: skip

    def verdict(budget, metric, v):
        if v.get("vlora") is None:
            return budget, metric, "none fits", "", "", "", "", ""
        return (
            budget, metric, v["vlora"], f"{v['vlora_value']:.4f}", v.get("peer") or "none fits",
            f"{v['peer_value']:.4f}" if "peer_value" in v else "–", f"{v['ratio']:.2f}" if "ratio" in v else "–",
            "met" if v["meets_half"] else "missed",
        )  # fmt: skip

    verdicts = table(
        "budget | metric | best vlora | value: | best peer | value: | ratio: | ≤ 0.5×",
        (verdict(b, m, v) for b, found in data["verdicts"].items() for m, v in found.items()),
    )
    return [*picks, "", *verdicts]


def rank_table(data) -> list[str]:
    return table(
        "kind / N | vlora flat s: | vlora rank s: | rank ÷ flat:",
        (
            (key, f"{r['cases']['vlora flat']['median']:.3f}", f"{r['cases']['vlora rank']['median']:.3f}",
             f"{r['rank_over_flat']:.2f}")
            for key, r in data["results"].items()
        ),
    )  # fmt: skip


def switching_table(data) -> list[str]:
    return table(
        "measure | unit | bare: | PEFT: | vlora:",
        (
            (r["what"], r["unit"], *("–" if r.get(c) is None else f"{r[c]:.4g}" for c in ("bare", "peft", "vlora")))
            for r in data["results"].values()
        ),
    )


def main() -> None:
    tables = (
        ("compress", compress_summary),
        ("compress", compress_table),
        ("fidelity", fidelity_table),
        ("fidelity", fidelity_budgets),
        ("budgets", budgets_table),
        ("compress_rank_before", rank_table),
        ("compress_rank_krylov1", rank_table),
        ("compress_rank_after", rank_table),
        ("greedy", greedy_table),
        ("scale", scale_table),
        ("switching", switching_table),
    )
    for name, fn in tables:
        data = read_result(name)
        if data:
            load = data.get("machine", {}).get("loadavg") or data.get("loadavg")
            print(f"### {name}  (load average at the end: {load})\n")
            print("\n".join(fn(data)) + "\n")


if __name__ == "__main__":
    main()
