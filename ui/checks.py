"""Behaviour checks of one workbench session (no Gradio): what each task still does at each k, on prompts.

Per basis, base model and prompt set each k is measured once (``vlora_core.behaviour``); a later check with more
k measures only those. ``BehaviourChecks.plan`` says what a check still needs (a ``CheckPlan``), which runs here
(``BehaviourChecks.run``, the reference kept for the next k) or as a GPU call (``ui/gpu.py``, which keeps the
reference where it runs); either way the results are recorded here (``record``). ``BehaviourView`` is what the
k tab draws: effect retained and top-1 agreement per task over k, the current k and the recommended one; the
plot makers only reshape it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vlora_core.behaviour import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_EFFECT,
    BehaviourConfig,
    BehaviourReport,
    Progress,
    Recommendation,
    Reference,
    SettingBehaviour,
    TaskBehaviour,
    measure,
    recommend,
    reference,
)
from vlora_core.io.prompts import Prompt
from vlora_core.subspace import SharedSubspace


@dataclass(frozen=True)
class BehaviourView:
    """One basis's behaviour check at the current setting, ready to draw."""

    method: str
    ks: list[int]  # the k measured, ascending
    task_ids: list[str]
    effect: dict[str, list[float]]  # task -> effect retained at each k (nan: the adapter has no effect to keep)
    agreement: dict[str, list[float]]  # task -> top-1 agreement at each k
    kl: dict[str, list[float]]  # task -> mean KL(original ‖ compressed) at each k
    stored_bytes: list[int]  # the store at each k
    current_k: int | None  # the k tab's k (None: adaptive k is on)
    recommendation: Recommendation
    prompts: int  # prompts in the set checked

    @property
    def recommended_k(self) -> int | None:
        return None if self.recommendation.k is None else self.recommendation.k.config.num_components


@dataclass(frozen=True)
class CheckPlan:
    """What one check still has to measure: the k not measured yet of one basis, base model and prompt set."""

    key: tuple  # (method, base model, prompts): the entry of ``BehaviourChecks`` its results go to
    full: SharedSubspace  # every direction of the basis: its tasks are the original adapters
    prompts: tuple[Prompt, ...]
    ks: tuple[int, ...]  # the k to measure; empty: every k asked is measured already
    config: BehaviourConfig
    ref: Reference | None = None  # the reference measured before in this process (None: measured anew)

    def run(self, base_model, tokenizer, progress: Progress | None = None) -> tuple[Reference, BehaviourReport]:
        """The reference (unless given) and every k of the plan, on ``base_model``."""
        ref = self.ref or reference(base_model, tokenizer, self.full, self.prompts, self.config, progress=progress)
        return ref, measure(base_model, tokenizer, self.full, ref, list(self.ks), self.config, progress)


@dataclass
class _Checked:
    """What one (basis, base model, prompt set) has measured so far."""

    ref: Reference | None = None  # the reference, where it was measured in this process
    base: dict[str, TaskBehaviour] = field(default_factory=dict)
    settings: dict[int, SettingBehaviour] = field(default_factory=dict)  # k -> every task at that k


class BehaviourChecks:
    """The session's checks, cached per basis, base model and prompt set; ``clear`` when the adapters change."""

    def __init__(self, config: BehaviourConfig = BehaviourConfig()):
        self.config = config
        self._found: dict[tuple, _Checked] = {}
        self._last: dict[str, tuple[tuple, int]] = {}  # method -> (key of its latest check, prompts in it)

    def clear(self) -> None:
        self._found.clear()
        self._last.clear()

    def plan(self, full: SharedSubspace, model: object, prompts: Sequence[Prompt], ks: Sequence[int]) -> CheckPlan:
        """Every task of ``full`` at each of ``ks`` on ``prompts``, less the k measured already; ``model`` names
        the base model (its source, or its id in this process)."""
        key = (full.method, model, tuple((p.text, p.answer, p.task) for p in prompts))
        found = self._found.get(key, _Checked())
        missing = tuple(k for k in dict.fromkeys(ks) if k not in found.settings)
        return CheckPlan(key, full, tuple(prompts), missing, self.config, found.ref)

    def run(self, plan: CheckPlan, base_model, tokenizer, progress: Progress | None = None) -> BehaviourReport:
        """``plan`` measured in this process, its reference kept for the next k; the whole check's report."""
        ref, report = plan.run(base_model, tokenizer, progress) if plan.ks else (plan.ref, None)
        return self.record(plan, report, ref)

    def record(self, plan: CheckPlan, report: BehaviourReport | None, ref: Reference | None = None) -> BehaviourReport:
        """Keep what ``plan`` measured (``report``: its k in order; None: nothing was missing) and give the whole
        check's report: every k measured so far for its basis, base model and prompt set."""
        found = self._found.setdefault(plan.key, _Checked())
        found.ref = found.ref or ref
        if report is not None:
            found.base = report.base
            found.settings.update(zip(plan.ks, report.settings))
        self._last[plan.full.method] = (plan.key, len(plan.prompts))
        return _report(plan.full.method, found)

    def view(
        self,
        method: str,
        current_k: int | None,
        min_effect: float = DEFAULT_MIN_EFFECT,
        min_agreement: float = DEFAULT_MIN_AGREEMENT,
    ) -> BehaviourView | None:
        """The latest check of ``method`` at these thresholds, marking ``current_k``; None before any check."""
        if method not in self._last:
            return None
        key, prompts = self._last[method]
        report = _report(method, self._found[key])
        settings = report.settings
        task_ids = list(settings[0].tasks)
        return BehaviourView(
            method=method,
            ks=[s.config.num_components for s in settings],
            task_ids=task_ids,
            effect={t: [s.tasks[t].effect_retained for s in settings] for t in task_ids},
            agreement={t: [s.tasks[t].agreement for s in settings] for t in task_ids},
            kl={t: [s.tasks[t].kl for s in settings] for t in task_ids},
            stored_bytes=[s.stored_bytes for s in settings],
            current_k=current_k,
            recommendation=recommend(report, min_effect, min_agreement),
            prompts=prompts,
        )


def _report(method: str, found: _Checked) -> BehaviourReport:
    ks = sorted(found.settings)
    return BehaviourReport(method, tuple(found.settings[k] for k in ks), found.base)
