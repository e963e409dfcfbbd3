"""Behaviour checks of one workbench session (no Gradio): what each task still does at each k, on prompts.

Per basis, base model and prompt set, the reference (the original adapters' answers and logits, the base
model's) runs once and each k is measured once (``vlora_core.behaviour``); a later check with more k measures
only those. ``BehaviourView`` is what the k tab draws: effect retained and top-1 agreement per task over k, the
current k and the recommended one; the plot makers only reshape it.
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


@dataclass
class _Checked:
    """What one (basis, base model, prompt set) has measured so far."""

    ref: object  # vlora_core.behaviour.Reference
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

    def run(
        self,
        base_model,
        tokenizer,
        full: SharedSubspace,
        prompts: Sequence[Prompt],
        ks: Sequence[int],
        progress: Progress | None = None,
    ) -> BehaviourReport:
        """Every task of ``full`` at each of ``ks`` on ``prompts``: the reference once per prompt set, then only
        the k not measured yet."""
        key = (full.method, id(base_model), tuple((p.text, p.answer, p.task) for p in prompts))
        found = self._found.get(key)
        if found is None:
            found = _Checked(reference(base_model, tokenizer, full, prompts, self.config, progress=progress))
        missing = [k for k in dict.fromkeys(ks) if k not in found.settings]
        if missing:
            report = measure(base_model, tokenizer, full, found.ref, missing, self.config, progress)
            found.base = report.base
            found.settings.update(zip(missing, report.settings))
        self._found[key] = found
        self._last[full.method] = (key, len(prompts))
        return _report(full.method, found)

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
