"""Compress many adapters a chunk at a time: peak memory is set by the chunk and the basis, not by N.

The first chunk is decomposed as usual; each later chunk extends the bases (``basis.extend``) and the
weakest directions beyond ``headroom · k`` are dropped, as in incremental PCA. The result is then cut to
k. A second pass over the files measures each task's ΔW error against its original.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, CompressConfig
from .io.peft_files import load_adapter
from .subspace import SharedSubspace, Task, _dtype_name, check_task_id, layer_factors

DEFAULT_CHUNK = 32


def stream_compress(paths: list[str | Path], task_ids: list[str] | None = None,
                    num_components: int = DEFAULT_NUM_COMPONENTS, *, method: str = DEFAULT_METHOD,
                    chunk: int = DEFAULT_CHUNK, headroom: int = 2, measure: bool = True,
                    progress: bool = False) -> SharedSubspace:
    config = CompressConfig(num_components, method)
    ids = [Path(p).resolve().name for p in paths] if task_ids is None else list(task_ids)
    chunks = [range(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    cap = headroom * config.num_components
    subspace = None
    for part in tqdm(chunks, desc="streaming compress", disable=not progress):
        adapters = [load_adapter(paths[i], ids[i]) for i in part]
        if subspace is None:
            subspace = SharedSubspace.decompose(adapters, [ids[i] for i in part], method=method).truncated(cap)
            continue
        tasks = [_new_task(subspace, adapter) for adapter in adapters]
        subspace.extend(layer_factors(adapters, list(subspace.shapes)), tasks, max_k=cap)
        for task in tasks:
            subspace.add_task(task)
    subspace = subspace.truncated(config)
    if measure:
        for part in chunks:
            adapters = [load_adapter(paths[i], ids[i]) for i in part]
            tasks = [subspace.tasks[a.name] for a in adapters]
            subspace.measure(layer_factors(adapters, list(subspace.shapes)), tasks)
    return subspace


def _new_task(subspace: SharedSubspace, adapter) -> Task:
    task_id = subspace.check_new_id(check_task_id(adapter.name), adapter)
    subspace.check_adapter(adapter)
    return Task(task_id, {n: {} for n in subspace.shapes}, adapter.config, adapter.extras, adapter.source,
                _dtype_name(adapter))
