"""Run every benchmark, then draw the figures. Results: bench/results/*.json and *.png.

    OMP_NUM_THREADS=1 python bench/run_all.py            # the full set (hours on 2 busy cores)
    OMP_NUM_THREADS=1 python bench/run_all.py --quick    # what docs/benchmarks.md reports

Serving (item 3) is bench/switching.py's, run separately (it writes bench/results/switching.json).
"""

from __future__ import annotations

import argparse

import compress
import fidelity
import plots
import profiles
import scale


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 8, 32; fidelity at N = 16; scale N = 100, 300")
    args = parser.parse_args(argv)
    if args.quick:
        compress.main(["--n", "8", "32", "--kinds", "mixture"])
        profiles.main(["--n", "32"])
        fidelity.main(["--n", "16"])
        scale.main(["--n", "100", "300", "--hidden", "512"])
    else:
        compress.main([])
        profiles.main(["--n", "32"])
        fidelity.main(["--n", "32"])
        scale.main(["--n", "100", "300", "1000", "--hidden", "512"])
    plots.main()


if __name__ == "__main__":
    main()
