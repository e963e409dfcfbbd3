"""The `vlora` command: parse, validate, call the same core functions as the Python API and the UI.

Exit codes: 0 ok, 1 a failure vlora explains (no traceback), 2 a usage error. This module imports no torch: the
parser's choices and defaults come from torch-free tables (``options``, ``config``), and a command's body
(``commands``) is imported only once the arguments are parsed, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

from .config import DEFAULT_METHOD, DEFAULT_NUM_COMPONENTS, DEFAULT_VARIANCE_THRESHOLD
from .errors import VLoRAError
from .io.atomic import disk_problem
from .options import (
    BASIS_METHODS,
    CALIBRATION_DAMPING,
    DEFAULT_CHUNK,
    EXPORT_FORMATS,
    MERGE_DEFAULTS,
    MERGE_METHODS,
    STORAGE,
    STORAGE_FLAGS,
    VLLM_DEFAULT_MAX_LORA_RANK,
)

DTYPE_HELP = (
    "storage precision of the basis, means and loadings: "
    + "; ".join(f"{flag}: {summary}" for flag, summary in STORAGE.values())
    + " (default: bf16 when every adapter is bf16 or fp16, else fp32)"
)


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


def share(text: str) -> float:
    """An argparse type for a share such as --min-effect: a number from 0 to 1 (NaN and Inf are not)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1 (a share, e.g. 0.95)")
    return value


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
        choices=list(BASIS_METHODS),
        default=DEFAULT_METHOD,
        help="; ".join(f"{name}: {summary}" for name, summary in BASIS_METHODS.items()),
    )
    p.add_argument("--task-ids", nargs="+", help="one id per adapter, in order")
    p.add_argument(
        "--device", help="where the SVDs run, e.g. cuda (default: the CPU); results equal within fp32 rounding"
    )
    p.add_argument("--dtype", choices=list(STORAGE_FLAGS), help=DTYPE_HELP)
    p.add_argument(
        "--calibration",
        metavar="PROMPTS",
        help="fit activation-aware: run these prompts (JSON lines, as for `vlora eval`) through --base-model and "
        "fit each basis to minimise the ΔW error weighted by the layer's inputs, ||(dW - dW')C^1/2|| (default: the "
        "plain fit)",
    )
    p.add_argument("--base-model", help="the model --calibration runs on: bundled (default), a folder, org/name")
    p.add_argument(
        "--damping",
        type=float,
        help=f"--calibration's damping: C + DAMPING x mean(diag C) x I (default {CALIBRATION_DAMPING})",
    )
    p.add_argument(
        "--stream",
        type=int,
        metavar="CHUNK",
        nargs="?",
        const=DEFAULT_CHUNK,
        help=f"read adapters CHUNK at a time (default {DEFAULT_CHUNK}): memory does not grow with "
        "their number (incremental PCA; close to, not equal to, the one-pass basis)",
    )
    p.set_defaults(run="compress")

    p = commands.add_parser("info", help="variance explained and ΔW error per layer and task")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run="info")

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
    p.add_argument("--min-effect", type=share, default=0.95, help="--verify warns below this effect retained")
    p.set_defaults(run="export")

    p = commands.add_parser("merge", help="merge stored tasks on ΔW into one adapter (a folder and/or a new task)")
    p.add_argument("store")
    p.add_argument("tasks", nargs="+", metavar="TASK[:WEIGHT]", help="tasks to merge, each with a weight (default 1)")
    p.add_argument("--method", choices=list(MERGE_METHODS), default=MERGE_DEFAULTS["method"], help="how (see README)")
    p.add_argument("--density", type=float, default=MERGE_DEFAULTS["density"], help="ties/dare: share of entries kept")
    p.add_argument("--rank", type=int, help="write every layer at this rank, by the SVD of the merged ΔW")
    p.add_argument("--seed", type=int, default=MERGE_DEFAULTS["seed"], help="dare: seeds the masks")
    p.add_argument("--task-id", help="add the merge to the store as this task (exactly, as add --incremental)")
    p.add_argument("-o", "--output", help="PEFT folder to write the merge to")
    p.add_argument("--force", action="store_true", help="replace an earlier vlora export at --output (nothing else)")
    p.add_argument("--base-model", help="measure the merge on this model: bundled, a folder, org/name")
    p.add_argument("--prompts", help="prompts for that measure (JSON lines, as for `vlora eval`)")
    p.set_defaults(run="merge")

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
        choices=list(STORAGE_FLAGS),
        help="store the whole store in this precision from now on (default: keep the store's)",
    )
    p.set_defaults(run="add")

    p = commands.add_parser("eval", help="what each task still does at each k, on prompts, and the k to choose")
    p.add_argument("sources", nargs="+", help="a store, or two or more PEFT adapter folders")
    p.add_argument("--prompts", help='JSON lines: {"prompt": ..., "answer": ..., "task": ...} (answer, task optional)')
    p.add_argument("--base-model", default="bundled", help="the base model: bundled (default), a folder, org/name")
    p.add_argument("--method", choices=list(BASIS_METHODS), default=DEFAULT_METHOD, help="basis for adapter folders")
    p.add_argument("--k", default="1,2,4,8,16,32", help="comma-separated k to measure (default 1,2,4,8,16,32)")
    p.add_argument("--min-effect", type=share, default=0.95, help="effect retained every task must keep")
    p.add_argument("--min-agreement", type=share, default=0.95, help="top-1 agreement every task must keep")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run="evaluate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vlora: %(message)s", force=True)
    run = _command(args.run)
    try:
        run(args)
    except VLoRAError as error:
        print(f"vlora {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # one the core did not foresee (the machine refused a read or write): still one line
        where = f"{error.filename}: " if error.filename else ""
        print(f"vlora {args.command}: error: {where}{disk_problem(error)}.", file=sys.stderr)
        return 1
    return 0


def _command(name: str):
    """The body of a command, imported now that its arguments are parsed (this is where torch is imported)."""
    if name == "info":  # answered from the manifest and the data files' headers where the store allows it
        from .info import info

        return info
    from . import commands

    return getattr(commands, name)


if __name__ == "__main__":
    sys.exit(main())
