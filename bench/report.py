"""Markdown tables from bench/results/*.json, for docs/benchmarks.md.

python bench/report.py
"""

from __future__ import annotations

from common import read_result


def compress_table(data) -> list[str]:
    lines = ["| kind / N | case | median s | min | max | runs | × floor |", "|---|---|---:|---:|---:|---:|---:|"]
    for key, r in data["results"].items():
        for case, v in r["cases"].items():
            lines.append(
                f"| {key} | {case} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['runs']} "
                f"| {r['ratio_to_floor'][case]:.1f} |"
            )
    return lines


def compress_summary(data) -> list[str]:
    """The targets' ratios per kind and N: medians against the floor and against each peer."""
    lines = [
        "| kind / N | vlora flat × floor | same, no errors × floor | vlora-dev ÷ vlora flat | "
        "(no errors) | lorashare ÷ vlora flat | (no errors) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in data["results"].items():
        med = {case: v["median"] for case, v in r["cases"].items()}
        ours, bare = med.get("vlora flat"), med.get("vlora flat, no errors")

        def speedup(peer, mine, med=med):
            return f"{med[peer] / mine:.1f}×" if peer in med and mine else "–"

        lines.append(
            f"| {key} | {ours / med['floor']:.1f} | {bare / med['floor']:.1f} | {speedup('vlora-dev', ours)} | "
            f"{speedup('vlora-dev', bare)} | {speedup('lorashare', ours)} | {speedup('lorashare', bare)} |"
        )
    return lines


def fidelity_table(data) -> list[str]:
    lines = ["| set | tool | k | stored MiB | ΔW rel. error |", "|---|---|---:|---:|---:|"]
    for name, curves in data["results"].items():
        for tool, pts in curves.items():
            if not isinstance(pts, list):
                lines.append(f"| {name} | original files | – | {pts / 2**20:.1f} | 0 |")
                continue
            for p in pts:
                if "error" in p:
                    lines.append(f"| {name} | {tool} | {p['k']} | {p['bytes'] / 2**20:.2f} | {p['error']:.4f} |")
                else:
                    lines.append(f"| {name} | {tool} | {p['k']} | failed | {p.get('failed', '')[-80:]!r} |")
    return lines


def scale_table(data) -> list[str]:
    lines = [
        "| N | hidden | input MiB | seconds | RSS after imports MiB | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['n']} | {r['hidden']} | {r['input_mib']:.0f} | {r['seconds']:.1f} | "
            f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    return lines


def greedy_table(data) -> list[str]:
    lines = [
        "| method | k | greedy answers unchanged | share | worst task's ΔW rel. error |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['method']} | {r['k']} | {r['unchanged']} / {r['prompts']} | {r['share']:.0%} | "
            f"{r['max_task_delta_w_error']:.3g} |"
        )
    return lines


def budgets_table(data) -> list[str]:
    """Per budget: every variant's best k within it, its bytes, ΔW error and behaviour; then the verdict."""
    lines = [
        "| budget | variant | k | MiB on disk | ΔW rel. error | mean KL | 1 − effect | top-1 agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for budget, picks in data["picks"].items():
        for variant, label in picks.items():
            r = data["rows"][label]
            lines.append(
                f"| {budget} | {variant} | {r['k']} | {r['disk_bytes'] / 2**20:.2f} | {r['error']:.4f} | "
                f"{r['kl']:.4f} | {r['effect_lost']:.4f} | {r['agreement']:.3f} |"
            )
    lines += [
        "",
        "| budget | metric | best vlora | value | best peer | value | ratio | ≤ 0.5× |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for budget, verdict in data["verdicts"].items():
        for metric, v in verdict.items():
            if v.get("vlora") is None:
                lines.append(f"| {budget} | {metric} | none fits | | | | | |")
                continue
            peer = v.get("peer") or "none fits"
            ratio = f"{v['ratio']:.2f}" if "ratio" in v else "–"
            peer_value = f"{v['peer_value']:.4f}" if "peer_value" in v else "–"
            lines.append(
                f"| {budget} | {metric} | {v['vlora']} | {v['vlora_value']:.4f} | {peer} | {peer_value} | {ratio} | "
                f"{'met' if v['meets_half'] else 'missed'} |"
            )
    return lines


def rank_table(data) -> list[str]:
    lines = ["| kind / N | vlora flat s | vlora rank s | rank ÷ flat |", "|---|---:|---:|---:|"]
    for key, r in data["results"].items():
        c = r["cases"]
        lines.append(
            f"| {key} | {c['vlora flat']['median']:.3f} | {c['vlora rank']['median']:.3f} | {r['rank_over_flat']:.2f} |"
        )
    return lines


def switching_table(data) -> list[str]:
    lines = ["| measure | unit | bare | PEFT | vlora |", "|---|---|---:|---:|---:|"]
    for r in data["results"].values():
        cells = [r.get(c) for c in ("bare", "peft", "vlora")]
        lines.append(
            f"| {r['what']} | {r['unit']} | " + " | ".join("–" if c is None else f"{c:.4g}" for c in cells) + " |"
        )
    return lines


def main() -> None:
    tables = (
        ("compress", compress_summary),
        ("compress", compress_table),
        ("fidelity", fidelity_table),
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
