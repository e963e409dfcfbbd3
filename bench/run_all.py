"""Run every benchmark, then draw the figures. Results: bench/results/*.json and *.png.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/run_all.py     # about an hour on 2 quiet cores

The same steps, in the same order, as the run reported in docs/benchmarks.md. Serving (item 3) is
bench/switching.py's, run separately (it writes bench/results/switching.json).
"""

from __future__ import annotations

import budgets
import compress
import fidelity
import greedy
import plots
import profiles
import scale

FIVE_EACH = ["--runs", "5", "--peer-runs", "vlora-dev=5", "lorashare=5"]


def main() -> None:
    compress.main(["--n", "8", "32", "--kinds", "mixture", "column", *FIVE_EACH])
    scale.main(["--n", "100", "300", "1000", "--hidden", "512"])
    greedy.main(["--tokens", "32"])
    fidelity.main(["--n", "16", "--no-demo"])  # bytes on disk x fp32/bf16/int8; the demo set is budgets.py's
    budgets.main([])  # behaviour at 10x, 25 %, 50 %, 75 % of the demo adapters' bytes (bundled SmolLM2-135M)
    compress.main(
        ["--n", "8", "32", "128", "--kinds", "mixture", "--runs", "5"]
        + ["--cases", "vlora flat", "vlora rank", "--out", "compress_rank_after"]
    )
    compress.main(["--n", "128", "--kinds", "mixture", "--methods", "flat", *FIVE_EACH])
    profiles.main(["--n", "32", "--kind", "mixture"])
    plots.main()


if __name__ == "__main__":
    main()
