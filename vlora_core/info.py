"""`vlora info`, torch-free: what a store holds, per layer and task, and its bytes on disk.

The numbers come from ``reports`` on a ``StoreView`` read from the manifest and the data files' headers; a store
whose manifest predates the recorded variance explained is loaded in full instead (torch), with the same output.
The summary and bytes lines are also what `vlora compress` prints.
"""

from __future__ import annotations

import json
import math

from . import reports
from .io.manifest import disk_bytes
from .io.store_view import read_view


def info(args) -> None:
    """`vlora info STORE [--json]`: from the manifest and the data files' headers (no torch) where the store
    records its variance explained, else from the loaded store; the same lines either way."""
    subspace = read_view(args.store)
    if subspace is None:  # a store written before its manifest recorded the variance explained
        from .subspace import SharedSubspace

        subspace = SharedSubspace.load(args.store)
    report(subspace, args.store, args.json)


def report(subspace, store, as_json: bool = False) -> None:
    """Print what info says of ``subspace`` (a SharedSubspace or a StoreView) stored at ``store``."""
    if as_json:
        found = {"summary": reports.summary(subspace), "layers": [vars(r) for r in reports.layer_reports(subspace)]}
        found["storage"] = {"dtype": subspace.dtype, "bytes_on_disk": disk_bytes(store)}
        print(json.dumps(json_safe(found), indent=2, allow_nan=False))
        return
    print(f"{store}: {subspace!r}")
    act = reports.layer_activation_errors(subspace) if getattr(subspace, "calibration", None) else None
    extra = "" if act is None else f" {'act err':>8}"  # a calibrated store: its activation-weighted error too
    print(f"{'layer':<48} {'k_A':>4} {'k_B':>4} {'var_A':>7} {'var_B':>7} {'ΔW err':>8}{extra}")
    for r in reports.layer_reports(subspace):
        extra = "" if act is None else f" {act[r.layer]:>8.4f}"
        print(
            f"{r.layer[-48:]:<48} {r.k_a:>4} {r.k_b:>4} {r.variance_a:>7.2%} {r.variance_b:>7.2%} {r.error:>8.4f}{extra}"
        )
    print_summary(subspace)
    print_bytes(subspace, store)


def print_bytes(subspace, store) -> None:
    """The store's precision and its bytes on disk by part."""
    parts = disk_bytes(store)
    print(
        f"stored in {subspace.dtype}: {sum(parts.values()):,} bytes on disk — basis {parts['basis']:,}, "
        f"tasks {parts['tasks']:,} ({len(subspace.tasks)} files), manifest {parts['manifest']:,}"
    )


def json_safe(value):
    """``value`` with every NaN or infinite number as null (strict JSON has neither): an unknown error is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def print_summary(subspace) -> None:
    s = reports.summary(subspace)
    print(
        f"k per layer side: {s['k_min']}..{s['k_max']}; variance explained: "
        f"A {s['variance_a_mean']:.2%}, B {s['variance_b_mean']:.2%} (mean over layers)"
    )
    print(f"parameters: basis {s['basis_parameters']:,}, per task {s['parameters_per_task']:,}")
    calibration = s.get("calibration")
    if calibration is not None:
        print(
            f"activation-aware: calibrated on {calibration['prompts']} (sha256 {calibration['prompts_sha256'][:12]}, "
            f"{calibration['prompt_count']} prompts, {calibration['tokens']:,} tokens) with {calibration['base_model']}, "
            f"damping {calibration['damping']:g}; variance explained is in the activation metric"
        )
    for task_id, error in s["task_errors"].items():
        act = s.get("task_activation_errors", {}).get(task_id)
        tail = "" if act is None else f", activation-weighted {act:.4f}"
        if act is not None and math.isnan(act):  # added after the calibrated fit: its inputs' C is not stored
            tail = ", activation-weighted not measured (added later)"
        print(f"  {task_id}: ΔW relative error {error:.4f}{tail}")
