"""Load a store over and over until a stop file appears; run by test_store_concurrency.py beside writers.

    python store_reader.py STORE STOP_FILE READY_FILE

The ready file appears after the first load, so that writers can start once the reader is reading.

Each load must succeed and be whole: every task's factors rebuild from the basis, and its ids are the
first ones plus some of the added ones. Prints one JSON line: how many loads, the generations and task
counts seen, and every error (the test wants none).
"""

import json
import sys
from pathlib import Path

from vlora import SharedSubspace, VLoRAError


def main() -> None:
    store, stop, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    first = SharedSubspace.load(store).task_ids
    ready.touch()
    loads, generations, counts, errors = 0, set(), set(), []
    while not stop.exists() or loads == 0:
        try:
            subspace = SharedSubspace.load(store)
            for task_id in subspace.task_ids:
                subspace.task_factors(task_id)
            assert subspace.task_ids[: len(first)] == first, subspace.task_ids
        except (VLoRAError, AssertionError, OSError) as error:
            errors.append(f"{type(error).__name__}: {error}")
            continue
        loads += 1
        generations.add(subspace._origin[1])
        counts.add(len(subspace.task_ids))
    print(json.dumps({"loads": loads, "generations": sorted(generations), "counts": sorted(counts), "errors": errors}))


if __name__ == "__main__":
    main()
