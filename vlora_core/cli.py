"""The `vlora` command: parse, validate, call the same core functions as the Python API and the UI.

Exit codes: 0 ok, 1 a failure vlora explains (no traceback), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from . import quality
from .config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD
from .errors import VLoRAError, short_list
from .export import EXPORT_FORMATS, export_all, export_all_serving, export_serving, export_task, save_checked
from .io.atomic import disk_problem
from .io.peft_files import load_adapter
from .io.store_files import disk_bytes, store_lock
from .merge import METHODS as MERGE_METHODS
from .merge import MergeConfig, exact_merge
from .methods import METHODS
from .precision import FLAGS as PRECISION_FLAGS
from .precision import PRECISIONS
from .serving import VLLM_DEFAULT_MAX_LORA_RANK
from .subspace import DEFAULT_CHUNK, SharedSubspace, stream_compress

DTYPE_HELP = (
    "storage precision of the basis, means and loadings: "
    + "; ".join(f"{p.flag}: {p.summary}" for p in PRECISIONS.values())
    + " (default: bf16 when every adapter is bf16 or fp16, else fp32)"
)


def compress(args) -> None:
    if args.stream is not None:  # --stream 0 is a value to refuse, not "off"
        if args.adaptive_k:
            raise VLoRAError("--stream keeps a fixed k; drop --adaptive-k or --stream.")
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
            device=args.device,
            dtype=args.dtype,
        )
    subspace.save(args.output, force=args.force)
    print(f"stored {len(subspace.tasks)} tasks in {args.output} ({subspace!r})")
    _print_summary(subspace)
    _print_bytes(subspace, args.output)


def info(args) -> None:
    subspace = SharedSubspace.load(args.store)
    if args.json:
        report = {"summary": quality.summary(subspace), "layers": [vars(r) for r in quality.layer_reports(subspace)]}
        report["storage"] = {"dtype": subspace.dtype, "bytes_on_disk": disk_bytes(args.store)}
        print(json.dumps(_json_safe(report), indent=2, allow_nan=False))
        return
    print(f"{args.store}: {subspace!r}")
    print(f"{'layer':<48} {'k_A':>4} {'k_B':>4} {'var_A':>7} {'var_B':>7} {'ΔW err':>8}")
    for r in quality.layer_reports(subspace):
        print(f"{r.layer[-48:]:<48} {r.k_a:>4} {r.k_b:>4} {r.variance_a:>7.2%} {r.variance_b:>7.2%} {r.error:>8.4f}")
    _print_summary(subspace)
    _print_bytes(subspace, args.store)


def _print_bytes(subspace: SharedSubspace, store) -> None:
    """The store's precision and its bytes on disk by part."""
    parts = disk_bytes(store)
    print(
        f"stored in {subspace.dtype}: {sum(parts.values()):,} bytes on disk — basis {parts['basis']:,}, "
        f"tasks {parts['tasks']:,} ({len(subspace.tasks)} files), manifest {parts['manifest']:,}"
    )


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
    mine = [p for p in prompts if p.task is None or p.task in written]  # other tasks' own prompts are not asked
    source = args.model or "bundled"
    model, tokenizer = load_base_model(source)
    against = "its original folder" if args.original else "the task as stored"
    results = compare_adapters(model, tokenizer, originals, candidates, mine)
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
    if args.base_model:
        _print_merge_behaviour(subspace, task_ids, weights, config, result, args)


def task_weight(text: str) -> tuple[str, float]:
    """'pirate:0.5' -> ('pirate', 0.5); 'pirate' -> ('pirate', 1.0). A task id holding ':' keeps it: only a
    number after the last ':' is a weight."""
    task_id, sep, weight = text.rpartition(":")
    if sep:
        try:
            return task_id, float(weight)
        except ValueError:
            pass
    return text, 1.0


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


def _json_safe(value):
    """``value`` with every NaN or infinite number as null (strict JSON has neither): an unknown error is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _print_summary(subspace: SharedSubspace) -> None:
    s = quality.summary(subspace)
    print(
        f"k per layer side: {s['k_min']}..{s['k_max']}; variance explained: "
        f"A {s['variance_a_mean']:.2%}, B {s['variance_b_mean']:.2%} (mean over layers)"
    )
    print(f"parameters: basis {s['basis_parameters']:,}, per task {s['parameters_per_task']:,}")
    for task_id, error in s["task_errors"].items():
        print(f"  {task_id}: ΔW relative error {error:.4f}")


def _progress(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=len(items) < 4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlora", description="Many LoRA adapters, one shared basis.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compress", help="compress PEFT adapter folders into a store")
    p.add_argument("adapters", nargs="+", help="PEFT adapter folders (task ids default to folder names)")
    p.add_argument("-o", "--output", required=True, help="store folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace the vlora store already at --output")
    p.add_argument(
        "-k",
        "--num-components",
        dest="k",
        type=int,
        default=DEFAULT_NUM_COMPONENTS,
        help=f"directions kept per layer and side (default {DEFAULT_NUM_COMPONENTS})",
    )
    p.add_argument("--adaptive-k", action="store_true", help="choose k per layer and side from --threshold")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_VARIANCE_THRESHOLD,
        help=f"variance adaptive k must explain (default {DEFAULT_VARIANCE_THRESHOLD})",
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULT_METHOD,
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
    )
    p.add_argument("--task-ids", nargs="+", help="one id per adapter, in order")
    p.add_argument(
        "--device", help="where the SVDs run, e.g. cuda (default: the CPU); results equal within fp32 rounding"
    )
    p.add_argument("--dtype", choices=list(PRECISION_FLAGS), help=DTYPE_HELP)
    p.add_argument(
        "--stream",
        type=int,
        metavar="CHUNK",
        nargs="?",
        const=DEFAULT_CHUNK,
        help=f"read adapters CHUNK at a time (default {DEFAULT_CHUNK}): memory does not grow with "
        "their number (incremental PCA; close to, not equal to, the one-pass basis)",
    )
    p.set_defaults(run=compress)

    p = commands.add_parser("info", help="variance explained and ΔW error per layer and task")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=info)

    p = commands.add_parser("export", help="write a task as a standard PEFT adapter folder")
    p.add_argument("store")
    p.add_argument("task", nargs="?", help="task id (see `vlora info`)")
    p.add_argument("-o", "--output", required=True, help="adapter folder (with --all: a parent folder)")
    p.add_argument("--all", action="store_true", help="export every task")
    p.add_argument("--force", action="store_true", help="replace an earlier vlora export at --output (nothing else)")
    p.add_argument("--alpha", type=float, help="lora_alpha to write (factors are rescaled so ΔW is unchanged)")
    p.add_argument("--base-model", help="base_model_name_or_path to write")
    p.add_argument("--target-modules", nargs="+", help="target_modules to write")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="the factors' dtype (default: each task's original adapter's)"
    )
    p.add_argument(
        "--max-rank",
        type=int,
        help=f"write every layer at rank <= R by the SVD of its ΔW (the optimal rank-R ΔW; vLLM's default "
        f"--max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}); prints each task's exact ΔW error",
    )
    p.add_argument(
        "--format", choices=EXPORT_FORMATS, default="peft", help="peft: a PEFT folder; gguf: one llama.cpp LoRA file"
    )
    p.add_argument(
        "--model",
        help="the base model (bundled, a folder, org/name): its config.json names the GGUF architecture; with "
        "--max-rank, each capped task's behaviour against its exact ΔW is measured on it",
    )
    p.add_argument("--prompts", help="prompts for that measure (JSON lines, as for `vlora eval`)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="then measure each exported task's effect retained on --prompts on --model (default: bundled) against "
        "its --original folder (else the task as stored), and warn below --min-effect or near zero",
    )
    p.add_argument("--original", nargs="+", metavar="DIR", help="--verify against these adapter folders")
    p.add_argument("--min-effect", type=float, default=0.95, help="--verify warns below this effect retained")
    p.set_defaults(run=export)

    p = commands.add_parser("merge", help="merge stored tasks on ΔW into one adapter (a folder and/or a new task)")
    p.add_argument("store")
    p.add_argument("tasks", nargs="+", metavar="TASK[:WEIGHT]", help="tasks to merge, each with a weight (default 1)")
    p.add_argument("--method", choices=list(MERGE_METHODS), default=MergeConfig.method, help="how (see README)")
    p.add_argument("--density", type=float, default=MergeConfig.density, help="ties/dare: share of entries kept")
    p.add_argument("--rank", type=int, help="write every layer at this rank, by the SVD of the merged ΔW")
    p.add_argument("--seed", type=int, default=MergeConfig.seed, help="dare: seeds the masks")
    p.add_argument("--task-id", help="add the merge to the store as this task (exactly, as add --incremental)")
    p.add_argument("-o", "--output", help="PEFT folder to write the merge to")
    p.add_argument("--force", action="store_true", help="replace an earlier vlora export at --output (nothing else)")
    p.add_argument("--base-model", help="measure the merge on this model: bundled, a folder, org/name")
    p.add_argument("--prompts", help="prompts for that measure (JSON lines, as for `vlora eval`)")
    p.set_defaults(run=merge)

    p = commands.add_parser("add", help="add an adapter to an existing store")
    p.add_argument("store")
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("--task-id", help="id of the new task (default: the folder name)")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="grow the basis so the new task is stored exactly; stored tasks stay exactly as they were",
    )
    p.add_argument(
        "--dtype",
        choices=list(PRECISION_FLAGS),
        help="store the whole store in this precision from now on (default: keep the store's)",
    )
    p.set_defaults(run=add)

    p = commands.add_parser("eval", help="what each task still does at each k, on prompts, and the k to choose")
    p.add_argument("sources", nargs="+", help="a store, or two or more PEFT adapter folders")
    p.add_argument("--prompts", help='JSON lines: {"prompt": ..., "answer": ..., "task": ...} (answer, task optional)')
    p.add_argument("--base-model", default="bundled", help="the base model: bundled (default), a folder, org/name")
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD, help="basis for adapter folders")
    p.add_argument("--k", default="1,2,4,8,16,32", help="comma-separated k to measure (default 1,2,4,8,16,32)")
    p.add_argument("--min-effect", type=float, default=0.95, help="effect retained every task must keep")
    p.add_argument("--min-agreement", type=float, default=0.95, help="top-1 agreement every task must keep")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=evaluate)
    return parser


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
    model, tokenizer = load_base_model(args.base_model)
    report = measure(model, tokenizer, full, ks, prompts)
    advice = recommend(report, args.min_effect, args.min_agreement)
    if args.json:
        print(
            json.dumps(
                _json_safe({"report": asdict(report), "recommendation": asdict(advice)}),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vlora: %(message)s", force=True)
    try:
        args.run(args)
    except VLoRAError as error:
        print(f"vlora {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # one the core did not foresee (the machine refused a read or write): still one line
        where = f"{error.filename}: " if error.filename else ""
        print(f"vlora {args.command}: error: {where}{disk_problem(error)}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
