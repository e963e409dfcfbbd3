"""cProfile summaries of vlora's compress paths: where the time goes.

    python bench/profiles.py --n 32 --kind mixture
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
from vlora_core.streaming import stream_compress


def profile(fn, top: int = 15) -> tuple[float, str]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return stats.total_tt, out.getvalue()


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
        total, text = profile(fn)
        results[name] = {"seconds": total, "top": text}
        print(f"==== {name}: {total:.2f} s (profiled)\n{text}", flush=True)
    write_result(f"profile_{args.kind}_n{args.n}", {"n": args.n, "k": args.k, "profiles": results})
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
