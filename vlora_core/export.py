"""Export stored tasks back to standard PEFT folders: the one path the CLI, the UI and Python share.

A task's canonical factors F_A (d_in, r), F_B (d_out, r) carry its scaling; PEFT wants A (r, d_in) and
B (d_out, r) with ΔW = scaling · B · A, so each side gets 1/√scaling under the config written (the task's
own, or with the user's overrides): ΔW is the same for any alpha (within the scalings ``adapter.lora_scaling``
accepts). Every folder is read back before it is published: its ΔW must equal the stored task's within the
precision of the dtype it is written in (``check_written``), or nothing is written and the error names the folder.

For serving engines (``export_serving``): ``--max-rank R`` caps every layer at rank R by its SVD
(``serving.cap_rank``, the exact error reported), and ``--format gguf`` writes a llama.cpp LoRA file
(``io.gguf_files``); both are read back and compared with the adapter meant, as above. ``save_checked`` does
the same for any adapter (a merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapter import LoRAAdapter, LoRALayer, check_alpha, lora_scaling
from .errors import VLoRAError, short_list
from .io import gguf_files
from .io.outputs import check_export_file, check_export_root, check_export_target
from .io.peft_files import load_adapter, save_adapter
from .options import EXPORT_FORMATS  # a PEFT folder, or one llama.cpp .gguf file
from .precision import get_precision
from .quality import delta_w_gap
from .serving import cap_rank

GGUF_SUFFIX = ".gguf"

if TYPE_CHECKING:  # annotations only: the container imports this module
    from .subspace import SharedSubspace


def export_task(
    subspace: SharedSubspace,
    task_id: str,
    out: str | Path,
    *,
    alpha: float | None = None,
    base_model: str | None = None,
    target_modules: list[str] | None = None,
    force: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write ``task_id`` as a PEFT adapter folder at ``out`` (atomically). ΔW is kept for any alpha.

    Args:
        subspace: the store holding the task.
        task_id: which task (``subspace.task_ids``).
        out: the adapter folder to write.
        alpha: lora_alpha to write instead of the task's own (the factors are rescaled).
        base_model: base_model_name_or_path to write.
        target_modules: target_modules to write (must cover every stored layer).
        force: replace ``out`` if it holds an earlier vlora export. Anything else already there (a file,
            a non-empty folder vlora did not write, a store or a folder inside one) is never replaced.
        dtype: the factors' dtype ("fp32", "bf16", "fp16"); default: the dtype the task's original adapter had.
            The same store and arguments give the same bytes (``io.peft_files`` writes a canonical header).

    Returns:
        The folder written.

    Example:
        >>> export_task(SharedSubspace.load("store/"), "sentiment", "exported/sentiment", alpha=32)
    """
    adapter = task_adapter(
        subspace, task_id, alpha=alpha, base_model=base_model, target_modules=target_modules, dtype=dtype
    )
    return save_adapter(adapter, out, check=lambda written: check_written(subspace, task_id, written, out), force=force)


def export_all(subspace: SharedSubspace, out: str | Path, *, force: bool = False, **overrides) -> dict[str, Path]:
    """Every task in its own folder under ``out`` (ids are not trusted as file names). Every folder is checked
    before the first is written: ``out`` may hold other things, but no sub-folder vlora did not write is replaced."""
    names = folder_names(subspace.task_ids)
    targets = {task_id: Path(out) / names[task_id] for task_id in subspace.task_ids}
    check_export_root(out)
    for target in targets.values():
        check_export_target(target, force)
    return {
        task_id: export_task(subspace, task_id, target, force=force, **overrides) for task_id, target in targets.items()
    }


def task_adapter(
    subspace: SharedSubspace,
    task_id: str,
    *,
    alpha: float | None = None,
    base_model: str | None = None,
    target_modules: list[str] | None = None,
    dtype: str | None = None,
) -> LoRAAdapter:
    """The task as PEFT factors under its own config (or overrides), in its original dtype (or ``dtype``)."""
    task = subspace.task(task_id)
    config = export_config(task.config, alpha, base_model, target_modules, list(subspace.shapes))
    source = f"--alpha {config['lora_alpha']:g}" if alpha is not None else f"task {task_id!r}"
    dtype = getattr(torch, export_dtype(dtype) if dtype else task.dtype)
    layers = {}
    for name, (F_A, F_B) in subspace.task_factors(task_id).items():
        scaling = lora_scaling(config, name, subspace.shapes[name].rank, source)
        root = math.sqrt(scaling)
        A, B = (F_A.T / root).to(dtype), (F_B / root).to(dtype)  # (r, d_in), (d_out, r)
        if not (A.isfinite().all() and B.isfinite().all()):
            fixes = ["--dtype fp32 or bf16 (float32's range)"] if dtype == torch.float16 else []
            fixes += [f"a lora_alpha nearer the task's own ({task.config.get('lora_alpha')})"] if alpha else []
            raise VLoRAError(
                f"task {task_id!r}: at {source} the factors of {name} overflow {str(dtype).removeprefix('torch.')}; "
                f"export with {' or '.join(fixes or ['--dtype fp32'])}."
            )
        layers[name] = LoRALayer(A=A, B=B, scaling=scaling)
    return LoRAAdapter(task_id, config, layers, dict(task.extras), source=f"task {task_id!r}")


def export_dtype(name: str) -> str:
    """A dtype PEFT factors can be written in ("fp32", "bf16", "fp16" or their torch names)."""
    precision = get_precision(name)
    if precision.name not in ("float32", "bfloat16", "float16"):
        raise VLoRAError(f"--dtype {name}: PEFT adapters hold floating-point factors; choose fp32, bf16 or fp16.")
    return precision.name


def export_tolerance(dtype: torch.dtype) -> float:
    """How far (relative, per layer) a written folder's ΔW may be from the stored task's: two epsilons of the
    written dtype for rounding the factors to it (measured: under 0.4), plus eight of float32 for the float32
    arithmetic before (measured: about 2). float32 1.2e-6, bfloat16 1.6e-2, float16 2.0e-3."""
    return 2 * torch.finfo(dtype).eps + 8 * torch.finfo(torch.float32).eps


def check_written(subspace: SharedSubspace, task_id: str, folder: Path, out: str | Path) -> None:
    """Read the adapter written to ``folder`` (to be published as ``out``) back with the reader every user has,
    and check each layer's ΔW against the stored task's: relative error within ``export_tolerance`` of the
    written dtype, from 2r x 2r Grams in float64 (``quality.delta_w_gap``)."""
    try:
        written = load_adapter(folder, task_id)
    except VLoRAError as error:
        message = f"{out}: the exported adapter does not read back: {error}".replace(str(folder), str(out))
        raise VLoRAError(message) from None
    stored = subspace.task_factors(task_id)
    if set(written.layers) != set(stored):
        raise VLoRAError(f"{out}: the exported adapter holds other layers than task {task_id!r}; nothing was written.")
    worst, where, dtype = 0.0, "", torch.float32
    for name, (F_A, F_B) in stored.items():
        layer = written.layers[name]
        dtype = layer.A.dtype
        G_A, G_B = layer.A.double().T * layer.scaling, layer.B.double()  # ΔW = G_B · G_Aᵀ
        error = delta_w_gap((F_A[None], F_B[None]), (G_A[None], G_B[None]))
        if not error.item() <= worst:  # NaN counts as the worst
            worst, where = error.item(), name
    tolerance = export_tolerance(dtype)
    if not worst <= tolerance:
        raise VLoRAError(
            f"{out}: the exported ΔW of {where} differs from task {task_id!r}'s stored ΔW by {worst:.3g} (relative; "
            f"{str(dtype).removeprefix('torch.')} allows {tolerance:.2g}); nothing was written — export with the "
            "task's own lora_alpha, or report this as a bug."
        )


def export_config(
    config: dict, alpha: float | None, base_model: str | None, target_modules: list[str] | None, layers: list[str]
) -> dict:
    """The task's own adapter_config.json, with the overrides the user asked for."""
    config = dict(config)
    if alpha is not None:
        config["lora_alpha"], config["alpha_pattern"] = check_alpha(alpha, "--alpha (the lora_alpha to write)"), {}
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    if target_modules is not None:
        unmatched = [n for n in layers if not any(n == t or n.endswith("." + t) for t in target_modules)]
        if unmatched:
            raise VLoRAError(
                f"--target-modules {' '.join(target_modules)} does not cover stored layers: {short_list(unmatched)}; "
                "list every module the adapter trains (for example q_proj v_proj)."
            )
        config["target_modules"] = list(target_modules)
    config["inference_mode"] = True
    return config


def folder_names(task_ids: list[str]) -> dict[str, str]:
    """A distinct folder name per task id: the id itself where it is plain, else a numbered safe form."""
    names, taken = {}, set()
    for index, task_id in enumerate(task_ids):
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in task_id)[:60].strip("_")
        name = safe if safe == task_id else f"{index:03d}-{safe or 'task'}"
        while name in taken:
            name = f"{index:03d}-{name}"
        names[task_id] = name
        taken.add(name)
    return names


# ---- for serving engines: a rank cap, a llama.cpp file ---------------------------------------------------------
@dataclass(frozen=True)
class ServingExport:
    task_id: str
    path: Path  # the folder (peft) or file (gguf) written
    format: str  # one of EXPORT_FORMATS
    max_rank: int | None  # the cap asked for (None: none)
    ranks: dict[str, int]  # each layer's rank as written
    layer_errors: dict[str, float]  # the cap's exact relative ΔW error per layer (0: kept whole)
    error: float  # the task's: sqrt(Σ tail²) / sqrt(Σ ‖ΔW‖²)


def export_serving(
    subspace: SharedSubspace,
    task_id: str,
    out: str | Path,
    *,
    max_rank: int | None = None,
    format: str = "peft",
    base_config: dict | None = None,
    gguf_dtype: str = "f32",
    force: bool = False,
    **overrides,
) -> ServingExport:
    """Write ``task_id`` for a serving engine: every layer at rank <= ``max_rank`` by its SVD (the optimal
    rank-R ΔW; layers within the cap kept exactly), as a PEFT folder or a llama.cpp GGUF file.

    Args:
        max_rank: the cap (e.g. vLLM's --max-lora-rank, 16 by default); None: every layer at its own rank.
        format: "peft" (a folder, checked with ``serving.check_vllm`` conventions: scaling 1 where capped) or
            "gguf" (one file; ``base_config`` is then the base model's config.json, see ``io.gguf_files``).
        gguf_dtype: the GGUF tensors' dtype, "f32" or "f16".
        force, overrides: as for ``export_task`` (alpha, base_model, target_modules, dtype of the factors).

    Returns:
        A ``ServingExport`` with the path and the cap's exact truncation error.

    Example:
        >>> export_serving(store, "pirate", "pirate-r4", max_rank=4).error
    """
    if format not in EXPORT_FORMATS:
        raise VLoRAError(f"--format {format!r} is unknown; choose one of: {', '.join(EXPORT_FORMATS)}.")
    adapter = task_adapter(subspace, task_id, **overrides)
    if max_rank is not None:
        capped = cap_rank(adapter, max_rank)
        adapter, layer_errors, error = capped.adapter, capped.layer_errors, capped.error
    else:
        layer_errors, error = dict.fromkeys(adapter.layers, 0.0), 0.0
    if format == "gguf":
        if base_config is None:
            raise VLoRAError("--format gguf needs the base model's config (--model SRC: bundled, a folder, org/name).")
        path = save_gguf_checked(adapter, out, base_config, dtype=gguf_dtype, force=force)
    else:
        path = save_checked(adapter, out, force=force)
    return ServingExport(task_id, path, format, max_rank, adapter.ranks, layer_errors, error)


def export_all_serving(
    subspace: SharedSubspace, out: str | Path, *, format: str = "peft", force: bool = False, **options
) -> dict[str, ServingExport]:
    """Every task under ``out`` (a folder each, or ``<task>.gguf`` each), every target checked before the first
    is written, as ``export_all`` does; options as for ``export_serving``."""
    names = folder_names(subspace.task_ids)
    suffix = GGUF_SUFFIX if format == "gguf" else ""
    targets = {task_id: Path(out) / (names[task_id] + suffix) for task_id in subspace.task_ids}
    check_export_root(out)
    for target in targets.values():
        if format == "gguf":
            check_export_file(target, force, gguf_files.is_vlora_gguf)
        else:
            check_export_target(target, force)
    return {
        task_id: export_serving(subspace, task_id, target, format=format, force=force, **options)
        for task_id, target in targets.items()
    }


def save_checked(adapter: LoRAAdapter, out: str | Path, *, force: bool = False) -> Path:
    """``save_adapter`` with the read-back check: the folder's ΔW, read with ``load_adapter``, must equal
    ``adapter``'s layer by layer within ``export_tolerance``, or nothing is published."""

    def check(folder: Path) -> None:
        try:
            written = load_adapter(folder, adapter.name)
        except VLoRAError as error:
            message = f"{out}: the adapter written does not read back: {error}".replace(str(folder), str(out))
            raise VLoRAError(message) from None
        _check_same_delta(adapter, written.layers, out)

    return save_adapter(adapter, out, check=check, force=force)


def save_gguf_checked(adapter: LoRAAdapter, out: str | Path, base_config: dict, **options) -> Path:
    """``io.gguf_files.save_gguf_adapter`` with the read-back check: the file, read with ``gguf.GGUFReader`` and
    mapped back to the model's modules, must apply ``adapter``'s ΔW within the tolerance of its dtype."""

    def check(file: Path, target: gguf_files.GGUFTarget) -> None:
        layers = gguf_files.hf_layers(gguf_files.load_gguf_adapter(file), target)
        _check_same_delta(adapter, layers, out, torch.float16 if options.get("dtype") == "f16" else None)

    return gguf_files.save_gguf_adapter(adapter, out, base_config, check=check, **options)


def _check_same_delta(
    adapter: LoRAAdapter, written: dict[str, LoRALayer], out: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Each layer's ΔW as written against ``adapter``'s, within ``export_tolerance`` of the dtype written
    (``dtype``, else the written tensors')."""
    if set(written) != set(adapter.layers):
        raise VLoRAError(
            f"{out}: the adapter written holds other layers than {adapter.describe()}; nothing was written."
        )
    worst, where, written_dtype = 0.0, "", torch.float32
    for name, layer in adapter.layers.items():
        got = written[name]
        written_dtype = dtype or got.A.dtype
        want = ((layer.A.double().T * layer.scaling)[None], layer.B.double()[None])  # F_A (1, d_in, r), F_B
        have = ((got.A.double().T * got.scaling)[None], got.B.double()[None])
        error = delta_w_gap(want, have).item()
        if not error <= worst:
            worst, where = error, name
    tolerance = export_tolerance(written_dtype)
    if not worst <= tolerance:
        raise VLoRAError(
            f"{out}: the written ΔW of {where} differs from {adapter.describe()}'s by {worst:.3g} (relative; "
            f"{str(written_dtype).removeprefix('torch.')} allows {tolerance:.2g}); nothing was written — report this as a bug."
        )
