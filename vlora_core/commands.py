"""What each `vlora` command does, once ``vlora_core.cli`` has parsed and checked its arguments.

Imported only when a command starts its work: this is where torch comes in (``vlora --help``, an argument error
and ``vlora info`` on a store that records its variance never import it).
"""

from __future__ import annotations

import json
import sys

from . import quality
from .calibration import check_damping
from .cli import task_weight
from .device import check_device
from .errors import VLoRAError, short_list
from .export import export_all, export_all_serving, export_serving, export_task, save_checked
from .info import json_safe, print_bytes, print_summary
from .io.peft_files import load_adapter
from .io.store_files import store_lock
from .merge import MergeConfig, exact_merge
from .subspace import SharedSubspace, stream_compress


def compress(args) -> None:
    if args.calibration is None and (args.base_model is not None or args.damping is not None):
        raise VLoRAError("--base-model and --damping set up --calibration; add --calibration PROMPTS, or drop them.")
    device = None if args.device is None else check_device(args.device, "--device")
    if args.damping is not None:
        check_damping(args.damping)  # before the prompts run, not after
    if args.stream is not None:  # --stream 0 is a value to refuse, not "off"
        if args.adaptive_k:
            raise VLoRAError("--stream keeps a fixed k; drop --adaptive-k or --stream.")
        if args.calibration is not None:
            raise VLoRAError("--stream fits in the plain metric; drop --calibration or --stream.")
        subspace = stream_compress(
            args.adapters,
            args.task_ids,
            args.k,
            method=args.method,
            chunk=args.stream,
            progress=True,
            dtype=args.dtype or "float32",
        )
    else:
        adapters = [load_adapter(path) for path in _progress(args.adapters, "reading adapters")]
        subspace = SharedSubspace.from_adapters(
            adapters,
            task_ids=args.task_ids,
            num_components=args.k,
            method=args.method,
            adaptive_k=args.adaptive_k,
            variance_threshold=args.threshold,
            progress=True,
            device=device,
            dtype=args.dtype,
            calibration=args.calibration,
            base_model=args.base_model,
            damping=args.damping,
        )
    subspace.save(args.output, force=args.force)
    print(f"stored {len(subspace.tasks)} tasks in {args.output} ({subspace!r})")
    print_summary(subspace)
    print_bytes(subspace, args.output)


def export(args) -> None:
    subspace = SharedSubspace.load(args.store)
    overrides = dict(alpha=args.alpha, base_model=args.base_model, target_modules=args.target_modules, force=args.force)
    overrides["dtype"] = args.dtype
    if args.all == (args.task is not None):
        raise VLoRAError("give either a TASK or --all (not both); `vlora info STORE` lists the tasks.")
    if args.verify and args.format != "peft":
        raise VLoRAError("--verify reads the export back as a PEFT folder; drop --format gguf, or --verify.")
    if args.max_rank is None and args.format == "peft":
        if args.all:
            written = export_all(subspace, args.output, **overrides)
        else:
            written = {args.task: export_task(subspace, args.task, args.output, **overrides)}
        for task_id, path in written.items():
            print(f"exported {task_id!r} to {path}")
        if args.verify:
            _verify_export(subspace, written, args)
        return
    options = dict(overrides, max_rank=args.max_rank, format=args.format)
    if args.format == "gguf":
        from .base_model import base_model_config

        if not args.model:
            raise VLoRAError(
                "--format gguf needs the base model's config: add --model SRC (bundled, a model folder or its "
                "config.json, org/name); its architecture names the llama.cpp tensors."
            )
        options["base_config"] = base_model_config(args.model)
        options["gguf_dtype"] = "f16" if args.dtype == "fp16" else "f32"  # llama.cpp reads f32 and f16 pairs
    if args.all:
        done = list(export_all_serving(subspace, args.output, **options).values())
    else:
        done = [export_serving(subspace, args.task, args.output, **options)]
    for result in done:
        cap = "" if result.max_rank is None else f", rank <= {result.max_rank}: ΔW relative error {result.error:.4f}"
        print(f"exported {result.task_id!r} to {result.path} ({result.format}, ranks {_rank_range(result.ranks)}{cap})")
    if args.model and args.max_rank is not None and args.format == "peft":
        _print_cap_behaviour(subspace, done, args)
    if args.verify:
        _verify_export(subspace, {r.task_id: r.path for r in done}, args)


def _verify_export(subspace: SharedSubspace, written: dict, args) -> None:
    """Each task as written, read back, against its original (--original, else the task as the store holds it)
    on the prompts, on --model (default: bundled): a line per task, and a warning for each that keeps less than
    --min-effect of its effect, or nearly none (the export still stands: exit 0)."""
    from .base_model import load_base_model
    from .behaviour import compare_adapters, effect_warnings
    from .io.prompts import GENERIC_PROMPTS, read_prompts

    originals = _originals(subspace, list(written), args.original or [])
    candidates = {task_id: load_adapter(path, task_id) for task_id, path in written.items()}
    prompts = read_prompts(args.prompts) if args.prompts else GENERIC_PROMPTS
    source = args.model or "bundled"
    model, tokenizer = load_base_model(source)
    against = "its original folder" if args.original else "the task as stored"
    results = compare_adapters(model, tokenizer, originals, candidates, prompts)
    for task_id, b in results.items():
        print(f"  {task_id}: {_behaviour_line(b)} (the export against {against}, on {source})")
    for warning in effect_warnings(results, args.min_effect):
        print(f"vlora export: warning: {warning}", file=sys.stderr)


def _originals(subspace: SharedSubspace, task_ids: list[str], folders: list[str]) -> dict:
    """Each task's original: its --original folder (named as the task; one folder for one task), else the store's."""
    from .io.peft_files import folder_task_id

    if not folders:
        return {task_id: subspace.to_adapter(task_id) for task_id in task_ids}
    named = {task_id: folders[0] for task_id in task_ids} if len(folders) == len(task_ids) == 1 else {}
    named |= {folder_task_id(folder): folder for folder in folders if folder_task_id(folder) in task_ids}
    missing = [task_id for task_id in task_ids if task_id not in named]
    if missing:
        raise VLoRAError(
            f"--original: no folder named {short_list([repr(t) for t in missing])} among {short_list(folders)}; "
            "give each exported task's original adapter folder, named as its task id."
        )
    return {task_id: load_adapter(folder, task_id) for task_id, folder in named.items()}


def _rank_range(ranks: dict[str, int]) -> str:
    low, high = min(ranks.values()), max(ranks.values())
    return str(low) if low == high else f"{low}..{high}"


def _print_cap_behaviour(subspace: SharedSubspace, done, args) -> None:
    """Each capped task against its exact ΔW on prompts: what the cap costs in behaviour."""
    from .base_model import load_base_model
    from .behaviour import compare_adapters
    from .io.prompts import GENERIC_PROMPTS, read_prompts

    capped = [r for r in done if r.error > 0]
    if not capped:
        print("every layer was within the cap: each task's ΔW is exact, its behaviour unchanged")
        return
    model, tokenizer = load_base_model(args.model)
    prompts = read_prompts(args.prompts) if args.prompts else GENERIC_PROMPTS
    originals = {r.task_id: subspace.to_adapter(r.task_id) for r in capped}
    candidates = {r.task_id: load_adapter(r.path, r.task_id) for r in capped}
    for task_id, b in compare_adapters(model, tokenizer, originals, candidates, prompts).items():
        print(f"  {task_id}: {_behaviour_line(b)} (capped against exact, on {args.model})")


def _behaviour_line(b) -> str:
    effect = "no effect to keep" if b.no_effect else f"effect retained {b.effect_retained:.3f}"
    return f"{effect}, top-1 agreement {b.agreement:.3f}, KL {b.kl:.4f}"


def merge(args) -> None:
    """Merge stored tasks on ΔW; write the merge as a PEFT folder and/or add it to the store (exactly)."""
    if not args.output and not args.task_id:
        raise VLoRAError("say where the merge goes: -o OUT (a PEFT folder) and/or --task-id NEW (into the store).")
    task_ids, weights = zip(*(task_weight(text) for text in args.tasks))
    config = MergeConfig(args.method, args.density, args.rank, args.seed)
    name = args.task_id or "merged"
    if args.task_id:
        with store_lock(args.store):  # load, merge, add and save as one step, as `vlora add` does
            subspace = SharedSubspace.load(args.store)
            _check_weights(args.tasks, subspace.task_ids)
            stored = subspace.merge(list(task_ids), list(weights), config=config, name=name, fit_store=True)
            task = subspace.add(stored.adapter, args.task_id, incremental=True)
            subspace.save(args.store)
        added = quality.task_errors(subspace)[task.id]
        print(
            f"added {task.id!r} to {args.store} ({args.method} merge of {', '.join(task_ids)} at the store's rank: "
            f"ΔW relative error {stored.error:.4f} against the exact merge; stored exactly, {added:.1e}; {subspace!r})"
        )
    else:
        subspace = SharedSubspace.load(args.store)
        _check_weights(args.tasks, subspace.task_ids)
    if args.task_id and not args.output:
        result = stored
    else:
        result = subspace.merge(list(task_ids), list(weights), config=config, name=name)
    if args.output:
        save_checked(result.adapter, args.output, force=args.force)
        print(
            f"wrote the {args.method} merge of {', '.join(f'{t} x {w:g}' for t, w in zip(task_ids, weights))} to "
            f"{args.output} (ranks {_rank_range(result.adapter.ranks)}; ΔW relative error {result.error:.4f} "
            "against the exact merge)"
        )
        if args.rank is not None and min(result.adapter.ranks.values()) < args.rank:
            print(
                f"vlora merge: note: --rank {args.rank} is more than some layers can hold; each layer is written at "
                "most at its min(d_out, d_in)",
                file=sys.stderr,
            )
    if args.base_model:
        _print_merge_behaviour(subspace, task_ids, weights, config, result, args)


def _check_weights(texts: list[str], known: list[str]) -> None:
    """'qa:abc' naming no task while 'qa' is one: the weight is the typo (a task id may hold ':', so
    ``task_weight`` keeps it whole)."""
    for text in texts:
        task_id, sep, weight = text.rpartition(":")
        if sep and text not in known and task_id in known and task_weight(text)[0] == text:
            raise VLoRAError(
                f"{text!r}: the weight {weight!r} of task {task_id!r} is not a number; write TASK:WEIGHT with a "
                f"number, e.g. {task_id}:0.5."
            )


def _print_merge_behaviour(subspace, task_ids, weights, config, result, args) -> None:
    from .base_model import load_base_model
    from .behaviour import measure_merge
    from .io.prompts import GENERIC_PROMPTS, read_prompts

    model, tokenizer = load_base_model(args.base_model)
    prompts = read_prompts(args.prompts) if args.prompts else GENERIC_PROMPTS
    parts = {t: subspace.to_adapter(t) for t in dict.fromkeys(task_ids)}
    exact = None if result.error == 0 else exact_merge(list(parts.values()), list(weights), config=config).adapter
    found = measure_merge(model, tokenizer, parts, result.adapter, exact, prompts)
    if found.exact is None:
        print("the merge as written is exact: its behaviour is the exact merge's")
    else:
        print(f"  against the exact merge: {_behaviour_line(found.exact)}")
    for task_id, b in found.parts.items():
        print(f"  against {task_id}: {_behaviour_line(b)}")


def add(args) -> None:
    adapter = load_adapter(args.adapter)
    with store_lock(args.store):  # load, add and save as one step: a concurrent add waits, no task is lost
        subspace = SharedSubspace.load(args.store)
        if args.dtype:  # the whole store moves to this precision
            subspace.set_dtype(args.dtype)
        task = subspace.add(adapter, args.task_id, incremental=args.incremental)
        subspace.save(args.store)
    error = quality.task_errors(subspace)[task.id]
    how = "basis extended" if args.incremental else "projected on the fixed basis"
    print(f"added {task.id!r} to {args.store} ({how}; ΔW relative error {error:.4f}; {subspace!r})")


def _progress(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=len(items) < 4)


def evaluate(args) -> None:
    """Behaviour of every task per k against its original (a store's own tasks, or every direction of the
    adapters' decomposition) and the base model; then the recommended k."""
    from dataclasses import asdict

    from .base_model import load_base_model
    from .behaviour import evaluate as measure
    from .behaviour import recommend
    from .io.prompts import GENERIC_PROMPTS, read_prompts

    ks = _whole_numbers(args.k, "--k")
    prompts = read_prompts(args.prompts) if args.prompts else GENERIC_PROMPTS
    if len(args.sources) == 1:
        full = SharedSubspace.load(args.sources[0])  # the store's tasks are the originals; smaller k are measured
    else:
        adapters = [load_adapter(path) for path in args.sources]
        full = SharedSubspace.decompose(adapters, method=args.method)
    most = max(k for sides in full.layer_ks.values() for k in sides.values())
    if max(ks) > most:  # past every layer's k a setting is the whole store again, not a smaller one
        print(f"note: --k above {most} (the most any layer holds) measured as k={most}", file=sys.stderr)
        ks = sorted({min(k, most) for k in ks})
    model, tokenizer = load_base_model(args.base_model)
    report = measure(model, tokenizer, full, ks, prompts)
    advice = recommend(report, args.min_effect, args.min_agreement)
    if args.json:
        print(
            json.dumps(
                json_safe({"report": asdict(report), "recommendation": asdict(advice)}),
                indent=2,
                allow_nan=False,
                default=str,
            )
        )
        return
    print(f"{'setting':<14} {'task':<24} {'effect':>7} {'top-1':>6} {'KL':>8} {'bytes':>10}")
    for setting in report.settings:
        for task in setting.tasks.values():
            effect = "no effect" if task.no_effect else f"{task.effect_retained:7.3f}"
            print(
                f"{setting.label:<14} {task.task[:24]:<24} {effect:>7} {task.agreement:6.3f} {task.kl:8.4f} "
                f"{setting.stored_bytes:>10,}"
            )
    print(advice.summary())


def _whole_numbers(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise VLoRAError(f"{option} {text!r}: give whole numbers of at least 1, comma-separated, e.g. 1,2,4,8.")
    return values
