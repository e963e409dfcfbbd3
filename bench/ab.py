"""A/B generation speed: tokens/s of the workbench's A/B tab against bare transformers ``generate``.

Both sides run the A/B tab's own GPU call (``ui/gpu.py``'s ``run`` on a job from a workbench session holding the
demo adapters): a task's choice wraps the shared base model in a VLoRAModel over the whole basis and generates
with ``generate_text``; the "base model" choice is ``generate_text`` on the unwrapped model, i.e. bare
``generate``, here with its parameters requiring gradients as ``from_pretrained`` leaves them (the shared model is
frozen, and frozen, ``generate``'s last-position logits make ``matmul`` copy the whole output weight once per
call: 0.08-0.19 s on SmolLM2; VLoRAModel avoids that copy, so a frozen baseline would flatter it). Same chat prompt, same number of new tokens (``min_new_tokens`` on the model's generation config),
for each dtype the CPU default could be. Runs interleave; medians of the tab's own tokens/s (wall time of the
generation) and of tokens per second of this process's CPU time, which other jobs on a shared machine disturb
less; each ratio is the median over rounds of that round's ratio (the sides of a round run back to back, in
alternating order), so that a load that drifts over the minutes of a run cancels out. ``--per-call`` also times the layers as they ran before they kept each task's factors (the loadings and
the basis multiplied on every call, in the model's dtype).

    OMP_NUM_THREADS=1 python bench/ab.py [--tokens 48] [--runs 5] [--dtypes fp32 bf16] [--method flat] [--per-call]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common import spread, write_result

from ui import gpu
from ui.settings import AppSettings
from ui.workbench import BASE_CHOICE, Plan, Workbench
from vlora_core.base_model import BUNDLED, chat_prompt, get_base_model
from vlora_core.config import CompressConfig
from vlora_core.layer import SubspaceLayer

PROMPT = "What is the tallest mountain in the world?"
TASK = "pirate"  # a demo adapter that answers at length


def timed(job: gpu.Job) -> tuple[float, float]:
    """(tokens/s as the A/B tab shows it, tokens per CPU second) of one run of the tab's GPU call."""
    start = time.process_time()
    [run] = gpu.run(job)
    cpu = time.process_time() - start
    return run["new_tokens"] / run["seconds"], run["new_tokens"] / cpu


@contextmanager
def unfrozen(model):
    """The model's parameters requiring gradients, as ``from_pretrained`` leaves them, for the block."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextmanager
def per_call():
    """The layers' forward before kept factors: the loadings times the basis on every call, in the layer's dtype."""

    def forward(self, x, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        return out if self.loadings is None else out + self.update(x, *self.loadings, self.gain).to(out.dtype)

    kept, SubspaceLayer.forward = SubspaceLayer.forward, forward
    try:
        yield
    finally:
        SubspaceLayer.forward = kept


def measure(dtype: str, tokens: int, runs: int, method: str, old_too: bool) -> dict:
    os.environ.update(VLORA_DEVICE="cpu", VLORA_DTYPE=dtype)  # get_base_model places the shared model by these
    model, tokenizer = get_base_model(BUNDLED)
    model.generation_config.min_new_tokens = tokens  # every side generates exactly ``tokens``
    with tempfile.TemporaryDirectory() as tmp:
        bench = Workbench(Path(tmp) / "session", AppSettings(max_new_tokens=max(tokens, 256)))
        bench.add_demo()
        bench.report(CompressConfig(method=method))
        task = gpu.ab_job(bench, tokenizer, BUNDLED, PROMPT, [f"compressed: {TASK}"], tokens)
        bench.close()
    bare = gpu.make_job(BUNDLED, Plan(chat_prompt(tokenizer, PROMPT), [BASE_CHOICE], None, tokens))
    sides = {"bare": (bare, lambda: unfrozen(model)), "vlora": (task, nullcontext)}
    if old_too:
        sides["per_call"] = (task, per_call)
    timed(task)  # warm-up: first-call allocations, the kept factors' first build
    speed = {clock: {name: [] for name in sides} for clock in ("wall", "cpu")}
    for round_ in range(runs):  # interleaved, alternating order: the machine's noise hits every side alike
        for name in list(sides)[:: 1 if round_ % 2 == 0 else -1]:
            job, context = sides[name]
            with context():
                w, c = timed(job)
            speed["wall"][name].append(w)
            speed["cpu"][name].append(c)
    model.generation_config.min_new_tokens = None
    out = {name: {clock: spread(speed[clock][name]) for clock in speed} for name in sides}
    for name in sides.keys() - {"bare"}:
        for clock, by_side in speed.items():
            rounds = [mine / bare for mine, bare in zip(by_side[name], by_side["bare"])]
            out[f"{name}_ratio_{clock}"] = statistics.median(rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--method", default="flat", help="the workbench's basis (its default k)")
    parser.add_argument("--per-call", action="store_true", help="also time the layers' forward before kept factors")
    args = parser.parse_args()
    start_load = os.getloadavg()
    results = {dtype: measure(dtype, args.tokens, args.runs, args.method, args.per_call) for dtype in args.dtypes}
    for dtype, r in results.items():
        line = f"{dtype}: bare {r['bare']['wall']['median']:.1f} tokens/s, vlora {r['vlora']['wall']['median']:.1f}"
        line += f"; vlora / bare {r['vlora_ratio_wall']:.2f} (wall), {r['vlora_ratio_cpu']:.2f} (CPU time)"
        if "per_call" in r:
            line += f"; per-call layers {r['per_call_ratio_wall']:.2f} (wall), {r['per_call_ratio_cpu']:.2f} (CPU)"
        print(line)
    if {"fp32", "bf16"} <= set(results):
        speed = results["bf16"]["bare"]["wall"]["median"] / results["fp32"]["bare"]["wall"]["median"]
        print(f"bf16 / fp32 bare speed on this CPU: {speed:.2f}")
    print(f"load average {start_load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    command = "OMP_NUM_THREADS=1 python bench/ab.py " + " ".join(
        [f"--tokens {args.tokens} --runs {args.runs} --dtypes {' '.join(args.dtypes)} --method {args.method}"]
        + ["--per-call"] * args.per_call
    )
    payload = {"command": command, "tokens": args.tokens, "runs": args.runs, "prompt": PROMPT, "task": TASK}
    write_result("ab", payload | {"loadavg_start": start_load, "results": results})


if __name__ == "__main__":
    main()
