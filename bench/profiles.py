"""cProfile summaries of vlora's compress paths: where the time goes, by phase and by function.

    python bench/profiles.py --n 32 --kind mixture

Phases are the cumulative times of the functions that make up a compress: reading the files
(``load_adapter``), the canonical gauge (``batch_factors``), the SVDs (``_fit_batch``), cutting to k
(``truncated``) and the ΔW-error measurement (``measure``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

from common import write_result
from synthetic import adapter_dirs

from vlora import SharedSubspace, load_adapter
from vlora_core.subspace import stream_compress

PHASES = {
    "read (load_adapter)": "load_adapter",
    "gauge (batch_factors)": "batch_factors",
    "SVDs (_fit_batch)": "_fit_batch",
    "cut to k (truncated)": "truncated",
    "ΔW errors (measure)": "measure",
}


def profile(fn, top: int = 15) -> tuple[float, dict[str, float], str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    phases = {
        phase: sum(row[3] for (path, _, func), row in stats.stats.items() if func == name and "vlora_core" in path)
        for phase, name in PHASES.items()
    }
    stats.sort_stats("tottime").print_stats(top)
    return stats.total_tt, phases, out.getvalue()


def cases(dirs, k):
    def from_adapters(method):
        return lambda: SharedSubspace.from_adapters([load_adapter(d) for d in dirs], num_components=k, method=method)

    return {
        "from_adapters flat": from_adapters("flat"),
        "from_adapters rank": from_adapters("rank"),
        "stream_compress flat": lambda: stream_compress(dirs, num_components=k, method="flat"),
        "stream_compress rank": lambda: stream_compress(dirs, num_components=k, method="rank"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--kind", default="mixture")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)
    dirs = adapter_dirs(args.kind, args.n)
    results = {}
    for name, fn in cases(dirs, args.k).items():
        if args.only and not any(o in name for o in args.only):
            continue
        total, phases, text = profile(fn)
        results[name] = {"seconds": total, "phases": phases, "top": text}
        shares = ", ".join(f"{phase} {t:.2f} s" for phase, t in phases.items())
        print(f"==== {name}: {total:.2f} s (profiled): {shares}\n{text}", flush=True)
    write_result(f"profile_{args.kind}_n{args.n}", {"n": args.n, "k": args.k, "profiles": results})
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
