"""Behaviour: what each compressed task still does on prompts, and the k that keeps every task working.

ΔW error says how far a task's weights moved; this module says how far its outputs moved. For each task and
each compression setting, teacher-forced on prompt + answer tokens, against the original adapter (every
direction of the full decomposition kept) and the base model, with z the logits at a scored position:

    kl         mean KL(original ‖ compressed) of the next-token distributions, nats per position
    agreement  share of positions whose top-1 token is the original's
    effect     effect retained = 1 − ‖z_c − z_o‖ / ‖z_o − z_base‖, norms over all the task's positions:
               1 = the adapter's whole effect kept, 0 = as good as no adapter; nan, and ``no_effect``, when the
               original moves the logits by at most ``no_effect_tol`` · ‖z_base‖ (nothing to keep: an adapter,
               or an export, that does nothing)
    greedy     optionally, share of prompts whose greedy answer starts with the original's first n characters

Scored positions are those that predict the answer's tokens: the prompt's own tokens are what the user typed,
which no adapter is asked to change, and would only dilute the measure. A prompt without an answer is answered
once by the original adapter (greedy, ``answer_tokens`` tokens, up to and including an end token), so the
positions cover the adapter's own behaviour.

Forward passes: one VLoRAModel over the full basis holds every variant as a task (a setting's loadings,
zero-padded to the full k, stand for the same ΔW as the truncated store), so each task x setting x prompt is
one row of a mixed batch; rows are sorted by length and left-padded (a batch ends before its padding passes
``MAX_PADDING`` of its tokens), and the LM head runs on the scored positions only. The tokens every row starts
with (a chat template's system turn: 24 of SmolLM2's ~55 per row) run once per task, and every row goes on from
that cache (``Runner.shared_prefix``). The base model's and the originals' logits are computed once
(``reference``; where the original wrote the answer, the logits it chose each token from are kept as it
generates) and reused for every setting; settings that keep the same k everywhere are measured once, and one
that keeps every direction is the originals themselves, scored from the reference without a run.

Glossary (with ``adapter``'s): N tasks, P prompts of a task, R rows of a batch, W its width in tokens, A scored
positions per row (padded to the batch's longest answer), V vocabulary, z logits.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from vlora_core import CompressConfig, SharedSubspace, VLoRAModel
from vlora_core.adapter import LoRAAdapter, LoRALayer
from vlora_core.base_model import chat_prompt
from vlora_core.errors import CompatibilityError, TaskError, VLoRAError, short_list
from vlora_core.io.prompts import GENERIC_PROMPTS, Prompt, PromptError, prompts_by_task
from vlora_core.quality import stored_bytes

DEFAULT_MIN_EFFECT = 0.95  # effect retained every task must keep for a setting to be recommended
DEFAULT_MIN_AGREEMENT = 0.95  # top-1 agreement every task must keep
SUMS = ("kl", "agree", "gap_sq", "norm_sq", "positions")  # the columns of ``row_sums``
KL, AGREE, GAP_SQ, NORM_SQ, POSITIONS = range(len(SUMS))
CANDIDATE = "candidate: "  # prefix of the candidates' ids inside ``compare_adapters``' joint decomposition
NEAR_ZERO_EFFECT = 0.1  # effect retained below this: the task acts about like the base model
UNDERFLOW = 1e-20  # row_sums: a log-sum-exp term below this is recomputed from log-softmaxes
MAX_PADDING = 0.05  # a scoring batch's padded positions, at most this share of its tokens

Progress = Callable[[float, str], object]  # (fraction done, what is running), e.g. a gr.Progress


@dataclass(frozen=True)
class BehaviourConfig:
    answer_tokens: int = 16  # greedy tokens of the original's answer to a prompt without one
    max_answer_tokens: int = 64  # a given answer is cut to this many tokens (the positions scored per prompt)
    batch_rows: int = 32  # rows per forward: bounds memory (logits are batch_rows x A x V floats)
    greedy_chars: int = 0  # > 0: also compare each variant's greedy answer with the original's first n characters
    chat: bool = True  # wrap prompts in the tokenizer's chat template (as chat adapters are trained)
    no_effect_tol: float = 1e-4  # ‖z_o − z_base‖ ≤ tol · ‖z_base‖: the adapter has no effect to keep
    share_prefix: bool = True  # run the tokens every row starts with (a chat template's system turn) once per task

    def __post_init__(self):
        for name, least in (("answer_tokens", 1), ("max_answer_tokens", 1), ("batch_rows", 1), ("greedy_chars", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise VLoRAError(f"{name} must be a whole number of at least {least}, got {value!r}.")
        if not 0.0 <= self.no_effect_tol < 1.0:
            raise VLoRAError(f"no_effect_tol must be in [0, 1), got {self.no_effect_tol!r}; for example 1e-4.")


# ---- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskBehaviour:
    """One task at one setting, against its original adapter, over the task's scored positions."""

    task: str
    kl: float  # mean KL(original ‖ this) per position, nats
    agreement: float  # share of positions whose top-1 token is the original's
    effect_retained: float  # 1 − ‖z − z_o‖ / ‖z_o − z_base‖; nan when no_effect
    no_effect: bool  # the original barely moves the logits: there is no effect to keep (or lose)
    positions: int  # scored positions: answer tokens over the task's prompts
    greedy_same: float | None = None  # share of prompts whose greedy answer starts like the original's; None: not run

    def margin(self, min_effect: float, min_agreement: float) -> float:
        """How far above the thresholds (negative: below); a task with no effect is held to agreement alone."""
        effect = math.inf if self.no_effect else self.effect_retained - min_effect
        return min(self.agreement - min_agreement, effect)


@dataclass(frozen=True)
class SettingBehaviour:
    """Every task at one compression setting, and what the setting stores."""

    label: str  # "k=4" or "adaptive 0.9"
    config: CompressConfig
    stored_bytes: int  # shared basis + every task's loadings, in the store's precision (quality.stored_bytes)
    tasks: dict[str, TaskBehaviour]

    def margin(self, min_effect: float, min_agreement: float) -> float:
        return min(t.margin(min_effect, min_agreement) for t in self.tasks.values())

    def worst(self, min_effect: float, min_agreement: float) -> TaskBehaviour:
        return min(self.tasks.values(), key=lambda t: t.margin(min_effect, min_agreement))


@dataclass(frozen=True)
class BehaviourReport:
    """Behaviour of every task over the settings of one basis method."""

    method: str
    settings: tuple[SettingBehaviour, ...]  # in the order asked
    base: dict[str, TaskBehaviour]  # the bare base model as if it were a setting: how far each adapter moves outputs


@dataclass(frozen=True)
class Recommendation:
    """The cheapest measured settings at which every task keeps the thresholds."""

    method: str
    min_effect: float
    min_agreement: float
    k: SettingBehaviour | None  # the smallest fixed k keeping every task; None: no measured k does
    adaptive: SettingBehaviour | None  # the lowest adaptive-k threshold keeping every task (None: none measured does)
    closest: SettingBehaviour | None  # when k is None: the measured fixed k nearest to the thresholds
    no_effect: tuple[str, ...]  # tasks whose adapter changes nothing: held to agreement alone

    def summary(self) -> str:
        """The recommendation in words (what the CLI prints)."""
        need = f"effect retained ≥ {self.min_effect:g} and top-1 agreement ≥ {self.min_agreement:g}"
        if self.k is not None:
            text = f"{self.method} basis: {self.k.label} keeps every task at {need}; it stores {_size(self.k)}."
        elif self.closest is not None:
            worst = self.closest.worst(self.min_effect, self.min_agreement)
            text = (
                f"{self.method} basis: none of the k measured keeps every task at {need}; closest: "
                f"{self.closest.label}, where {worst.task!r} keeps effect {worst.effect_retained:.3f} and "
                f"agreement {worst.agreement:.3f} — measure larger k, or lower the thresholds."
            )
        else:
            text = f"{self.method} basis: no fixed k was measured."
        if self.adaptive is not None:
            text += f" Adaptive k: {self.adaptive.label} keeps every task; it stores {_size(self.adaptive)}."
        if self.no_effect:
            text += f" No effect to keep (held to agreement alone): {short_list(list(self.no_effect))}."
        return text


# ---- the math: tensors in, tensors out ------------------------------------------------------------------
def reference_stats(z_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``row_sums`` needs of reference logits z_o (a, V), computed once however many rows are compared
    with them: the next-token distribution p (a, V), its total (a,) (1 up to rounding) and its top-1 token (a,)."""
    p = z_o.softmax(-1)
    return p, p.sum(-1), z_o.argmax(-1)


def row_sums(
    z: torch.Tensor, z_o: torch.Tensor, p: torch.Tensor, mass: torch.Tensor, top: torch.Tensor
) -> torch.Tensor:
    """Sums over one row's positions of logits z (a, V) against reference logits z_o (a, V), columns as ``SUMS``:
    KL(softmax z_o ‖ softmax z), top-1 agreement, ‖z − z_o‖², ‖z‖² and 1. With ``reference_stats(z_o)``: a few
    passes over the row, no (a, V) temporary kept.

    With d = z − z_o and m = max d, KL(p ‖ softmax z) = m + log Σ p·exp(d − m) − Σ p·d: the difference of two
    log-sum-exps without forming either, so a variant equal to the original gives KL 0, not rounding noise.
    Where Σ p·exp(d − m) underflows (p and exp(d − m) both tiny: the two put their mass on different tokens),
    those positions take log-softmaxes instead."""
    d = z - z_o  # (a, V)
    gap = torch.linalg.vector_norm(d, dim=-1).square()  # (a,)
    p_d = (p * d).sum(-1) / mass  # (a,)
    m = d.amax(-1, keepdim=True)  # (a, 1)
    s = (p * d.sub_(m).exp_()).sum(-1) / mass  # (a,); d is spent: exp(d − m) in its place
    kl = m[:, 0] + s.log() - p_d
    far = s < UNDERFLOW
    if far.any():
        kl[far] = kl_divergence(z[far], z_o[far])
    agree = (z.argmax(-1) == top).float()
    norm = torch.linalg.vector_norm(z, dim=-1).square()
    return torch.stack([kl.clamp(min=0).sum(), agree.sum(), gap.sum(), norm.sum(), gap.new_tensor(float(len(z)))])


def kl_divergence(z: torch.Tensor, z_o: torch.Tensor) -> torch.Tensor:
    """KL(softmax z_o ‖ softmax z) per position, from log-softmaxes: z, z_o (a, V) -> (a,)."""
    log_p, log_q = z_o.log_softmax(-1), z.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def scores(task: str, sums: torch.Tensor, base: torch.Tensor, tol: float) -> TaskBehaviour:
    """A task's measures from its rows' ``row_sums`` added up (5,), against the original, and those of the
    base model against the original (5,): its GAP_SQ is Σ‖z_o − z_base‖², its NORM_SQ Σ‖z_base‖²."""
    kl, agree, gap_sq, _, positions = sums.tolist()
    effect_sq, base_sq = base[GAP_SQ].item(), base[NORM_SQ].item()
    no_effect = effect_sq <= tol * tol * base_sq
    effect = math.nan if no_effect else 1.0 - math.sqrt(gap_sq / effect_sq)
    return TaskBehaviour(task, kl / positions, agree / positions, effect, no_effect, int(positions))


def padded(task, full: SharedSubspace):
    """A truncated task's loadings with zeros past its k, up to ``full``'s: the same ΔW on the full basis."""
    loadings = {
        name: {side: F.pad(L, (0, full.bases[name][side].k - L.shape[-1])) for side, L in sides.items()}
        for name, sides in task.loadings.items()
    }
    return replace(task, loadings=loadings)


# ---- rows, and running them -------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredRow:
    """One task's prompt and answer as tokens; the positions predicting the answer are scored."""

    task: str  # the task whose prompt it is
    tokens: tuple[int, ...]  # prompt + answer
    answer: int  # how many of the tokens are the answer

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.tokens[: -self.answer]

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.tokens[:-1]  # the last answer token is only a target


Run = tuple[str | None, tuple[int, ...]]  # (task id in the model, None: the base model; input tokens)
Target = tuple[int, int]  # (reference row compared with, slot of the result)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> input_ids and attention_mask (R, W), right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _batches(lengths: Sequence[int], batch_rows: int, padding: float | None = MAX_PADDING) -> Iterator[list[int]]:
    """Row indices in batches of at most ``batch_rows``, shortest rows first; a batch also ends where the next
    row would make its padding more than ``padding`` of its tokens (None: no such limit). Rows of one length
    (a prompt at every k) share a batch, so a padded position is rare."""
    batch: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        tokens = sum(lengths[i] for i in batch) + lengths[j]
        if batch and (
            len(batch) == batch_rows
            or padding is not None
            and lengths[j] * (len(batch) + 1) - tokens > padding * tokens
        ):
            yield batch
            batch = []
        batch.append(j)
    if batch:
        yield batch


def _run_lengths(runs: Sequence[Run], prefix: Prefix | None) -> list[int]:
    """The tokens each run feeds the model: its own, past the shared prefix (what a batch's padding is of)."""
    return [len(tokens) - (0 if prefix is None else len(prefix.tokens)) for _, tokens in runs]


@dataclass(frozen=True)
class Prefix:
    """The tokens every row of a pass starts with (the chat template's system turn, say), run once per task:
    each layer's keys and values (n, heads, p, head_dim), row i for ``tasks[i]``. Rows then run only the rest."""

    tokens: tuple[int, ...]
    tasks: dict[str | None, int]  # task id -> its row in the keys and values
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per decoder layer: keys, values

    def cache(self, tasks: Sequence[str | None]) -> DynamicCache:
        """A fresh cache holding, for each row, the prefix as its task ran it."""
        index = torch.tensor([self.tasks[t] for t in tasks], device=self.layers[0][0].device)
        return DynamicCache([(keys[index], values[index]) for keys, values in self.layers])


@dataclass(frozen=True)
class Runner:
    """A VLoRAModel holding every task a pass needs, and what running it takes."""

    model: VLoRAModel
    pad_id: int  # fills the left of short rows (masked out)
    ends: frozenset[int]  # tokens that end a greedy answer
    config: BehaviourConfig
    progress: Progress | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.base_model.parameters()).device

    def logits(self, runs: Sequence[Run], answers: Sequence[int], prefix: Prefix | None = None) -> torch.Tensor:
        """Teacher-forced logits at each row's scored positions, its last ``answer`` inputs: (Σ answers, V), row
        after row; rows go on from ``prefix`` (a ``shared_prefix`` of them all) when given. The LM head runs on
        those positions only (``_scored_head``)."""
        ids, mask, past = self._inputs(runs, prefix)
        A, p = max(answers), 0 if prefix is None else len(prefix.tokens)
        scored = (torch.arange(A)[None] >= (A - torch.tensor(answers))[:, None]).to(self.device)  # (R, A)
        with self._scored_head(scored) as picked:
            out = self.model(
                input_ids=ids[:, p:],
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, p:],  # left padding: each row counts from 0
                past_key_values=past,
                task_ids=[task for task, _ in runs],
                use_cache=False,
                **self._keep(A),  # the model's own cut: the LM head on the last A positions, not W
            )
        return out.logits if picked else out.logits[:, -A:][scored]

    @contextmanager
    def _scored_head(self, scored: torch.Tensor) -> Iterator[list[bool]]:
        """While a forward runs, the LM head gets only the hidden states of the scored positions (R, A) -> (S, d),
        as one contiguous matrix (a sliced 3-d input runs it as a batched product, about half as fast). The
        list yielded holds True once that happened; a model without an output embedding, one whose head the
        adapters target (it then runs each row's task: rows must stay rows), or whose head sees another shape,
        runs as it is."""
        picked: list[bool] = []
        head = getattr(self.model.base_model, "get_output_embeddings", lambda: None)()
        if any(head is layer for layer in self.model.targets.values()):
            head = None

        def pick(module, args):
            hidden = args[0]
            if picked or hidden.dim() != 3 or hidden.shape[:2] != scored.shape:
                return None
            picked.append(True)
            return (hidden[scored], *args[1:])

        handle = None if head is None else head.register_forward_pre_hook(pick)
        try:
            yield picked
        finally:
            if handle is not None:
                handle.remove()

    def shared_prefix(self, runs: Sequence[Run], starts: Sequence[int]) -> Prefix | None:
        """The leading tokens all ``runs`` share, short of each row's first position whose output is used
        (``starts``), run once per task; None when that saves nothing (``BehaviourConfig.share_prefix`` off,
        no such tokens, or a task per row)."""
        tokens = tuple(os.path.commonprefix([t for _, t in runs]))[: min(starts, default=0)]
        tasks = list(dict.fromkeys(task for task, _ in runs))
        if not self.config.share_prefix or not tokens or len(tasks) == len(runs):
            return None
        parts = []
        for start in range(0, len(tasks), self.config.batch_rows):
            chunk = tasks[start : start + self.config.batch_rows]
            ids = torch.tensor([tokens] * len(chunk), device=self.device)
            past = self.model(input_ids=ids, task_ids=chunk, use_cache=True, **self._keep(1)).past_key_values
            parts.append([(layer.keys, layer.values) for layer in past.layers])
        layers = tuple((torch.cat(keys), torch.cat(values)) for keys, values in (zip(*ls) for ls in zip(*parts)))
        return Prefix(tokens, {task: i for i, task in enumerate(tasks)}, layers)

    def _inputs(self, runs: Sequence[Run], prefix: Prefix | None):
        """input_ids and attention_mask (R, p + W): the prefix, left padding, each row's own tokens; and the
        prefix's cache (None without one)."""
        shared = () if prefix is None else prefix.tokens
        ids, mask = left_padded([tokens[len(shared) :] for _, tokens in runs], self.pad_id)
        ids = torch.cat([torch.tensor(shared, dtype=torch.long).expand(len(runs), len(shared)), ids], 1)
        mask = F.pad(mask, (len(shared), 0), value=1)
        past = None if prefix is None else prefix.cache([task for task, _ in runs])
        return ids.to(self.device), mask.to(self.device), past

    def _keep(self, n: int) -> dict:
        """``logits_to_keep=n`` where the model takes it: the LM head runs on the last n positions only."""
        keep = "logits_to_keep" in inspect.signature(type(self.model.base_model).forward).parameters
        return {"logits_to_keep": n} if keep else {}

    def compare(
        self,
        runs: Sequence[Run],
        answers: Sequence[int],
        targets: Sequence[Sequence[Target]],
        ref: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """``row_sums`` of each run against each of its reference rows' logits (a, V), in result slots (S, 5).

        Scored as each batch comes, row by row: only one batch's logits are ever held, and each reference row's
        distribution is computed once per batch, however many rows (a prompt at every k) are compared with it."""
        slots = torch.zeros(sum(len(t) for t in targets), len(SUMS))
        prefix = self.shared_prefix(runs, [len(t) - a for (_, t), a in zip(runs, answers)])
        batches = list(_batches(_run_lengths(runs, prefix), self.config.batch_rows))
        for done, batch in enumerate(batches):
            logits = self.logits([runs[j] for j in batch], [answers[j] for j in batch], prefix).float()
            rows = logits.split([answers[j] for j in batch])  # (a_j, V) per row of the batch
            stats = {}  # reference row -> (z_o, reference_stats(z_o)) on this device
            for z, j in zip(rows, batch):
                for i, slot in targets[j]:
                    if i not in stats:
                        z_o = ref[i].to(z.device, torch.float32)
                        stats[i] = (z_o, reference_stats(z_o))
                    z_o, found = stats[i]
                    slots[slot] = row_sums(z, z_o, *found).cpu()
            self._tick(done + 1, len(batches), "scoring")
        return slots

    def originals(self, rows: Sequence[ScoredRow]) -> list[torch.Tensor]:
        """The original adapters' logits (a, V) at each row's scored positions, fp32 on the CPU."""
        kept: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        runs = [(row.task, row.inputs) for row in rows]
        prefix = self.shared_prefix(runs, [len(row.inputs) - row.answer for row in rows])
        batches = list(_batches(_run_lengths(runs, prefix), self.config.batch_rows))
        for done, batch in enumerate(batches):
            logits = self.logits([runs[j] for j in batch], [rows[j].answer for j in batch], prefix)
            for z, j in zip(logits.split([rows[j].answer for j in batch]), batch):
                kept[j] = z.to("cpu", torch.float32, copy=True)
            self._tick(done + 1, len(batches), "original adapters")
        return kept

    def greedy(
        self, runs: Sequence[Run], keep_logits: bool = False
    ) -> tuple[list[tuple[int, ...]], list[torch.Tensor]]:
        """Each run's greedy continuation (at most ``answer_tokens``), up to and including its first end token;
        and with ``keep_logits`` the logits (answer, V) each answer token was chosen from, fp32 on the CPU (an
        original's reference logits come with its answer, with no second pass), else an empty list."""
        found: list[tuple[int, ...]] = [()] * len(runs)
        kept: list[torch.Tensor] = [torch.empty(0)] * len(runs) if keep_logits else []
        prefix = self.shared_prefix(runs, [len(t) - 1 for _, t in runs])
        # a decoding step costs about the same for 8 rows as for 64 (it reads every weight once): big batches,
        # of as many rows x steps as a scoring batch has positions (the same logits memory when they are kept)
        rows = max(1, self.config.batch_rows * self.config.max_answer_tokens // self.config.answer_tokens)
        batches = list(_batches([len(t) for _, t in runs], rows, padding=None))
        for done, batch in enumerate(batches):
            ids, mask, past = self._inputs([runs[j] for j in batch], prefix)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=past,  # generate runs only what the cache does not hold
                task_ids=[runs[j][0] for j in batch],
                max_new_tokens=self.config.answer_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=keep_logits,  # the raw logits of each step, before any logits processor
            )
            steps = torch.stack(out.logits, 1) if keep_logits else None  # (B, steps, V)
            for b, (j, new) in enumerate(zip(batch, out.sequences[:, ids.shape[1] :].tolist())):
                found[j] = tuple(new[: next((i + 1 for i, t in enumerate(new) if t in self.ends), len(new))])
                if steps is not None:
                    kept[j] = steps[b, : len(found[j])].to("cpu", torch.float32, copy=True)
            self._tick(done + 1, len(batches), "greedy answers")
        return found, kept

    def _tick(self, done: int, total: int, what: str) -> None:
        if self.progress is not None:
            self.progress(done / total, f"{what}: batch {done} of {total}")


@contextmanager
def running(base_model, tokenizer, full: SharedSubspace, tasks: dict, config: BehaviourConfig, progress=None):
    """A Runner over ``full``'s basis holding ``tasks`` (id -> Task), in inference mode; the base model is given
    back unchanged (``unload``) on the way out."""
    ends = getattr(getattr(base_model, "generation_config", None), "eos_token_id", None)
    ends = frozenset(({ends} if isinstance(ends, int) else set(ends or ())) | ({tokenizer.eos_token_id} - {None}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ends, default=0)
    model = VLoRAModel(base_model, SharedSubspace(full.method, full.shapes, full.bases, tasks))
    try:
        with torch.inference_mode():
            yield Runner(model, pad_id, ends, config, progress)
    finally:
        model.unload()


# ---- the reference: originals and base model, once -------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """What every setting is compared with, computed once for a set of tasks and prompts (``reference``).

    The reference of one full decomposition serves any other full decomposition of the same adapters (the
    ``flat`` and the ``rank`` one): both hold every adapter's ΔW exactly."""

    rows: tuple[ScoredRow, ...]  # one per task and prompt, task by task
    logits: tuple[torch.Tensor, ...]  # per row: the original's logits (answer, V) at its scored positions, fp32
    base: torch.Tensor  # (R, 5) ``row_sums`` of the base model against the original
    greedy: tuple[str, ...] | None  # the original's greedy answer per row (when greedy_chars > 0)

    @property
    def task_ids(self) -> list[str]:
        return list(dict.fromkeys(row.task for row in self.rows))


def reference(
    base_model,
    tokenizer,
    full: SharedSubspace,
    prompts: Sequence[Prompt] = GENERIC_PROMPTS,
    config: BehaviourConfig = BehaviourConfig(),
    *,
    task_ids: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Reference:
    """Tokenise each task's prompts, answer those without an answer with the original adapter, and run the
    originals and the base model once.

    Args:
        base_model, tokenizer: the model the adapters were trained on (wrapped for the call, then given back).
        full: the full decomposition (``SharedSubspace.decompose``): its tasks are the original adapters.
        prompts: shared and per-task prompts (``io.prompts``); default: the built-in generic set.
        task_ids: the tasks to check (default: all of ``full``'s).
    """
    task_ids = _known(full, task_ids)
    chosen = prompts_by_task(prompts, task_ids, known=full.task_ids)
    pairs = [(task, p) for task in task_ids for p in chosen[task]]
    heads = [
        _tokens(tokenizer, chat_prompt(tokenizer, p.text) if config.chat else p.text, p, "prompt") for _, p in pairs
    ]
    with running(base_model, tokenizer, full, {t: full.tasks[t] for t in task_ids}, config, progress) as runner:
        need = [i for i, (_, p) in enumerate(pairs) if p.answer is None or config.greedy_chars]
        keep = any(pairs[i][1].answer is None for i in need)  # the original writes some answers: keep their logits
        answers, chosen_from = runner.greedy([(pairs[i][0], heads[i]) for i in need], keep_logits=keep)
        generated = dict(zip(need, answers))
        tails = [
            generated[i] if p.answer is None else _tokens(tokenizer, p.answer, p, "answer", config.max_answer_tokens)
            for i, (_, p) in enumerate(pairs)
        ]
        rows = tuple(ScoredRow(task, head + tail, len(tail)) for (task, _), head, tail in zip(pairs, heads, tails))
        found = {i: z for i, z in zip(need, chosen_from) if pairs[i][1].answer is None}  # the answer's own logits
        given = [i for i in range(len(rows)) if i not in found]  # given answers: one teacher-forced pass
        found |= dict(zip(given, runner.originals([rows[i] for i in given])))
        logits = [found[i] for i in range(len(rows))]
        base = _base_sums(runner, rows, logits)
    greedy = tuple(_text(tokenizer, generated[i]) for i in range(len(rows))) if config.greedy_chars else None
    return Reference(rows, tuple(logits), base, greedy)


def _base_sums(runner: Runner, rows: Sequence[ScoredRow], logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The base model against each original (R, 5); rows with the same tokens run once."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.tokens, row.answer), []).append(i)
    keys = list(groups)
    runs = [(None, tokens[:-1]) for tokens, _ in keys]
    targets = [[(i, i) for i in groups[key]] for key in keys]
    return runner.compare(runs, [answer for _, answer in keys], targets, logits)


def _known(full: SharedSubspace, task_ids: Sequence[str] | None) -> list[str]:
    task_ids = list(full.task_ids if task_ids is None else task_ids)
    unknown = [t for t in task_ids if t not in full.tasks]
    if unknown or not task_ids:
        raise TaskError(
            f"unknown task {short_list([repr(t) for t in unknown])} to check; the decomposition holds: "
            f"{short_list([repr(t) for t in full.task_ids])}."
        )
    return task_ids


def _tokens(tokenizer, text: str, prompt: Prompt, what: str, limit: int | None = None) -> tuple[int, ...]:
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"][:limit])
    if not ids:
        raise PromptError(f"{prompt.origin or 'a prompt'}: the {what} {text[:40]!r} has no tokens; write some text.")
    return ids


def _text(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


# ---- variants against the reference --------------------------------------------------------------------
def measure_variants(
    base_model,
    tokenizer,
    full: SharedSubspace,
    ref: Reference,
    variants: dict[str, dict],
    config: BehaviourConfig = BehaviourConfig(),
    progress: Progress | None = None,
) -> dict[str, dict[str, TaskBehaviour]]:
    """Every variant (label -> task id -> a Task on ``full``'s basis, with ``full``'s k) of every reference task,
    against the original, one mixed-batch row per variant, task and prompt. Returns label -> task -> behaviour."""
    labels, R = list(variants), len(ref.rows)
    for label in labels:
        _check_variant(label, variants[label], ref, full)
    tasks = {
        f"{v}:{t}": replace(variants[label][t], id=f"{v}:{t}") for v, label in enumerate(labels) for t in ref.task_ids
    }
    slots = [(v, i) for v in range(len(labels)) for i in range(R)]  # slot j = v·R + i
    runs = [(f"{v}:{ref.rows[i].task}", ref.rows[i].inputs) for v, i in slots]
    with running(base_model, tokenizer, full, tasks, config, progress) as runner:
        sums = runner.compare(
            runs, [ref.rows[i].answer for _, i in slots], [[(i, j)] for j, (_, i) in enumerate(slots)], ref.logits
        )
        same = _greedy_same(runner, tokenizer, ref, slots) if ref.greedy is not None else None
    return {
        label: task_scores(ref, sums[v * R : (v + 1) * R], config, None if same is None else same[v * R : (v + 1) * R])
        for v, label in enumerate(labels)
    }


def _greedy_same(runner: Runner, tokenizer, ref: Reference, slots: list[tuple[int, int]]) -> list[bool]:
    """Whether each slot's greedy answer starts with the same ``greedy_chars`` characters as the original's."""
    n = runner.config.greedy_chars
    answers, _ = runner.greedy([(f"{v}:{ref.rows[i].task}", ref.rows[i].prompt) for v, i in slots])
    return [_text(tokenizer, a)[:n] == ref.greedy[i][:n] for a, (_, i) in zip(answers, slots)]


def task_scores(
    ref: Reference, sums: torch.Tensor, config: BehaviourConfig, same: Sequence[bool] | None = None
) -> dict[str, TaskBehaviour]:
    """Per task: its rows' ``row_sums`` (R, 5) added up and turned into measures."""
    found = {}
    for task in ref.task_ids:
        idx = [i for i, row in enumerate(ref.rows) if row.task == task]
        result = scores(task, sums[idx].sum(0), ref.base[idx].sum(0), config.no_effect_tol)
        found[task] = result if same is None else replace(result, greedy_same=sum(same[i] for i in idx) / len(idx))
    return found


def _check_variant(label: str, tasks: dict, ref: Reference, full: SharedSubspace) -> None:
    missing = [t for t in ref.task_ids if t not in tasks]
    if missing:
        raise TaskError(
            f"variant {label!r} lacks task {short_list([repr(t) for t in missing])}; give one per task checked."
        )
    for task_id in ref.task_ids:
        for name, sides in tasks[task_id].loadings.items():
            for side, L in sides.items():
                if L.shape[-1] != full.bases[name][side].k:
                    raise CompatibilityError(
                        f"variant {label!r}, task {task_id!r}: {name}.{side} has {L.shape[-1]} loadings but the full "
                        f"basis {full.bases[name][side].k}; pad truncated loadings with ``padded(task, full)``."
                    )


# ---- settings: k values and adaptive thresholds ------------------------------------------------------------
def setting_config(setting: int | CompressConfig, method: str) -> CompressConfig:
    """A k (or a CompressConfig) as a CompressConfig for the basis ``method``."""
    if not isinstance(setting, CompressConfig):
        return CompressConfig(setting, method)
    if setting.method != method:
        raise CompatibilityError(
            f"setting {setting_label(setting)} is for the {setting.method!r} basis but the decomposition is "
            f"{method!r}; measure it on SharedSubspace.decompose(..., method={setting.method!r})."
        )
    return setting


def setting_label(config: CompressConfig) -> str:
    return f"adaptive {config.variance_threshold:g}" if config.adaptive_k else f"k={config.num_components}"


def measure(
    base_model,
    tokenizer,
    full: SharedSubspace,
    ref: Reference,
    settings: Iterable[int | CompressConfig],
    config: BehaviourConfig = BehaviourConfig(),
    progress: Progress | None = None,
) -> BehaviourReport:
    """Every reference task at every setting (a k, or a CompressConfig such as an adaptive threshold) of ``full``.

    Settings that keep the same k in every layer side (k clipped where the data has fewer) are run once; one
    that keeps every direction of ``full`` is the originals themselves, scored from the reference with no run."""
    configs = [setting_config(s, full.method) for s in settings]
    if not configs:
        raise VLoRAError("no setting to measure; give one or more k (e.g. 1, 2, 4, 8) or CompressConfigs.")
    labels, cuts = _cuts(full, configs)
    whole = [label for label, cut in cuts.items() if _keeps_every_direction(cut, full)]
    variants = {
        label: {t: padded(cut.tasks[t], full) for t in ref.task_ids}
        for label, cut in cuts.items()
        if label not in whole
    }
    results = measure_variants(base_model, tokenizer, full, ref, variants, config, progress) if variants else {}
    results |= dict.fromkeys(whole, originals_scores(ref, config))
    measured = tuple(
        SettingBehaviour(setting_label(c), c, stored_bytes(cuts[label]), results[label])
        for c, label in zip(configs, labels)
    )
    return BehaviourReport(full.method, measured, task_scores(ref, ref.base, config))


def _keeps_every_direction(cut: SharedSubspace, full: SharedSubspace) -> bool:
    return all(b.k == full.bases[name][side].k for name, sides in cut.bases.items() for side, b in sides.items())


def originals_scores(ref: Reference, config: BehaviourConfig = BehaviourConfig()) -> dict[str, TaskBehaviour]:
    """Every reference task as its own original: each row's reference logits against themselves (KL 0, top-1
    agreement 1, effect retained 1, exactly; the greedy answers the same)."""
    sums = torch.stack([row_sums(z_o, z_o, *reference_stats(z_o)) for z_o in ref.logits])  # (R, 5)
    return task_scores(ref, sums, config, None if ref.greedy is None else [True] * len(ref.rows))


def _cuts(full: SharedSubspace, configs: Sequence[CompressConfig]) -> tuple[list[str], dict[str, SharedSubspace]]:
    """Each setting's variant label (settings keeping the same k everywhere share one) and each label's cut."""
    labels, cuts, seen = [], {}, {}
    for config in configs:
        cut = full.truncated(config)
        key = tuple((name, side, b.k) for name, sides in cut.bases.items() for side, b in sides.items())
        label = seen.setdefault(key, setting_label(config))
        cuts.setdefault(label, cut)
        labels.append(label)
    return labels, cuts


def evaluate(
    base_model,
    tokenizer,
    full: SharedSubspace,
    settings: Iterable[int | CompressConfig],
    prompts: Sequence[Prompt] = GENERIC_PROMPTS,
    config: BehaviourConfig = BehaviourConfig(),
    progress: Progress | None = None,
) -> BehaviourReport:
    """``reference`` then ``measure``: every task of ``full`` at every setting, on ``prompts``.

    Example:
        >>> full = SharedSubspace.decompose(adapters, method="rank")
        >>> report = evaluate(model, tokenizer, full, [1, 2, 4, 8, 16], read_prompts("prompts.jsonl"))
        >>> print(recommend(report).summary())
    """
    ref = reference(base_model, tokenizer, full, prompts, config, progress=progress)
    return measure(base_model, tokenizer, full, ref, settings, config, progress)


# ---- the recommendation ------------------------------------------------------------------------------
def recommend(
    report: BehaviourReport, min_effect: float = DEFAULT_MIN_EFFECT, min_agreement: float = DEFAULT_MIN_AGREEMENT
) -> Recommendation:
    """The smallest measured k, and the lowest adaptive threshold, at which every task keeps effect retained
    ≥ ``min_effect`` and top-1 agreement ≥ ``min_agreement`` (a task with no effect: agreement alone)."""
    for name, value in (("min_effect", min_effect), ("min_agreement", min_agreement)):
        if not 0.0 < value <= 1.0:
            raise VLoRAError(f"{name} must be in (0, 1], got {value!r}; for example {DEFAULT_MIN_EFFECT}.")
    fixed = sorted((s for s in report.settings if not s.config.adaptive_k), key=lambda s: s.config.num_components)
    adaptive = sorted((s for s in report.settings if s.config.adaptive_k), key=lambda s: s.config.variance_threshold)

    def first(settings: list[SettingBehaviour]) -> SettingBehaviour | None:
        return next((s for s in settings if s.margin(min_effect, min_agreement) >= 0), None)

    k = first(fixed)
    closest = None if k is not None or not fixed else max(fixed, key=lambda s: s.margin(min_effect, min_agreement))
    no_effect = tuple(t for t, b in report.base.items() if b.no_effect)
    return Recommendation(report.method, min_effect, min_agreement, k, first(adaptive), closest, no_effect)


def _size(setting: SettingBehaviour) -> str:
    size = float(setting.stored_bytes)
    for unit in ("B", "kB", "MB"):
        if size < 1000 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def check_ks(k_max: int) -> list[int]:
    """The k a behaviour check measures on a basis of ``k_max`` directions: 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (powers of two and the steps halfway between them) and ``k_max`` itself, where nothing is cut."""
    ks = {1, k_max} | {2**e for e in range(k_max.bit_length())} | {3 * 2**e for e in range(k_max.bit_length())}
    return sorted(k for k in ks if k <= k_max)


def effect_warnings(results: dict[str, TaskBehaviour], min_effect: float = DEFAULT_MIN_EFFECT) -> list[str]:
    """One sentence per task that does not keep its effect: below ``min_effect``, near zero (it acts about like
    the base model), or nothing to keep (the original changes nothing on these prompts). Empty: all is well."""
    found = []
    for task, b in results.items():
        if b.no_effect:
            found.append(
                f"{task!r}: the original adapter changes nothing on these prompts, so there is no effect to keep; "
                "check the adapter, or give prompts of its own kind."
            )
        elif b.effect_retained < NEAR_ZERO_EFFECT:
            found.append(
                f"{task!r}: effect retained {b.effect_retained:.3f}, near zero: it acts about like the base model "
                f"(top-1 agreement {b.agreement:.3f}); keep more directions (a larger k)."
            )
        elif b.effect_retained < min_effect:
            found.append(
                f"{task!r}: effect retained {b.effect_retained:.3f}, below {min_effect:g} (top-1 agreement "
                f"{b.agreement:.3f}); a larger k keeps more (`vlora eval` shows which k keeps enough)."
            )
    return found


# ---- two tasks on one prompt (the A/B test) ---------------------------------------------------------------
@dataclass(frozen=True)
class PairBehaviour:
    """B against A on one prompt, teacher-forced on one answer."""

    kl: float  # mean KL(A ‖ B) per position, nats
    agreement: float  # share of positions whose top-1 token is the same
    positions: int  # answer tokens scored


def compare_pair(
    base_model,
    tokenizer,
    subspace: SharedSubspace,
    a: str | None,
    b: str | None,
    prompt: str,
    answer: str,
    config: BehaviourConfig = BehaviourConfig(),
) -> PairBehaviour:
    """Tasks ``a`` and ``b`` of ``subspace`` (None: the base model) on ``prompt``, teacher-forced on ``answer``
    (say, A's own): one mixed batch of two rows. Raises ``PromptError`` for an empty prompt or answer."""
    given = Prompt(prompt, answer, origin="the A/B prompt")
    head = _tokens(tokenizer, chat_prompt(tokenizer, prompt) if config.chat else prompt, given, "prompt")
    tail = _tokens(tokenizer, answer, given, "answer", config.max_answer_tokens)
    row = ScoredRow(str(a), head + tail, len(tail))
    tasks = {t: subspace.task(t) for t in (a, b) if t is not None}
    with running(base_model, tokenizer, subspace, tasks, config) as runner:
        z_a, z_b = runner.logits([(a, row.inputs), (b, row.inputs)], [row.answer] * 2).float().split(row.answer)
    kl, agree, _, _, positions = row_sums(z_b, z_a, *reference_stats(z_a)).tolist()
    return PairBehaviour(kl / positions, agree / positions, int(positions))


# ---- one adapter set against another (export checks) -------------------------------------------------------
def compare_adapters(
    base_model,
    tokenizer,
    originals: dict,
    candidates: dict,
    prompts: Sequence[Prompt] = GENERIC_PROMPTS,
    config: BehaviourConfig = BehaviourConfig(),
    progress: Progress | None = None,
) -> dict[str, TaskBehaviour]:
    """Each candidate adapter (e.g. an exported folder read back with ``load_adapter``) against the original
    of the same task id (the exact ΔW: an input folder, or ``store.to_adapter(task)``), on ``prompts``.

    Both sets are decomposed together without truncation, so both hold their exact ΔW on one basis and every
    candidate is one mixed-batch row per prompt. An effect retained near 0 means the candidate acts like the
    base model; ``no_effect`` means the original itself does nothing.

    Args:
        originals, candidates: task id -> LoRAAdapter, the same ids on both sides; layers and ranks may differ
            (a merge, a rank cap): ``aligned`` pads them with zero directions, which change no ΔW.
        prompts: a whole prompt set (``io.prompts``): each task is checked on its own prompts if it has any, else
            on the shared ones; prompts of tasks not compared here (a store's other tasks) are left out.
    """
    ids = list(originals)
    missing = [t for t in ids if t not in candidates]
    if missing or not ids:
        raise TaskError(
            f"no candidate for task {short_list([repr(t) for t in missing])}; give one adapter per original."
        )
    adapters = aligned([originals[t] for t in ids] + [candidates[t] for t in ids])
    full = SharedSubspace.decompose(adapters, ids + [CANDIDATE + t for t in ids])
    asked = [p for p in prompts if p.task is None or p.task in originals]
    ref = reference(base_model, tokenizer, full, asked, config, task_ids=ids, progress=progress)
    variants = {"candidate": {t: full.tasks[CANDIDATE + t] for t in ids}}
    return measure_variants(base_model, tokenizer, full, ref, variants, config, progress)["candidate"]


def aligned(adapters: Sequence[LoRAAdapter]) -> list[LoRAAdapter]:
    """The adapters on one set of layers at one rank per layer, as a decomposition needs: each layer at the
    largest rank any of them has there, a missing layer as zeros. Zero directions (rows of A, columns of B)
    change no ΔW, so each adapter still stands for exactly its own; the scaling stays each adapter's own."""
    shapes: dict[str, tuple[int, int, int]] = {}  # layer -> (d_out, d_in, largest rank)
    for adapter in adapters:
        for name, layer in adapter.layers.items():
            d_out, d_in, r = shapes.get(name, (layer.B.shape[0], layer.A.shape[1], 0))
            shapes[name] = (d_out, d_in, max(r, layer.rank))
    return [_padded_to(adapter, shapes) for adapter in adapters]


def _padded_to(adapter: LoRAAdapter, shapes: dict[str, tuple[int, int, int]]) -> LoRAAdapter:
    layers = {}
    for name, (d_out, d_in, rank) in shapes.items():
        layer = adapter.layers.get(name)
        if layer is None:  # ΔW = 0 here: zero factors (scaling 1)
            layers[name] = LoRALayer(torch.zeros(rank, d_in), torch.zeros(d_out, rank), 1.0)
            continue
        extra = rank - layer.rank
        A = F.pad(layer.A, (0, 0, 0, extra))  # (rank, d_in)
        B = F.pad(layer.B, (0, extra))  # (d_out, rank)
        layers[name] = LoRALayer(A, B, layer.scaling)
    return LoRAAdapter(adapter.name, adapter.config, layers, {}, adapter.source)


# ---- a merge against the exact merge and against its parts ----------------------------------------------
@dataclass(frozen=True)
class MergeBehaviour:
    """What a merged adapter does, measured on prompts (``measure_merge``)."""

    exact: TaskBehaviour | None  # the merge as written against the exact merge (None: written exactly)
    parts: dict[str, TaskBehaviour]  # the merge against each part, on that part's prompts: how much of it is kept


def measure_merge(
    base_model,
    tokenizer,
    parts: dict[str, LoRAAdapter],
    merged: LoRAAdapter,
    exact: LoRAAdapter | None = None,
    prompts: Sequence[Prompt] = GENERIC_PROMPTS,
    config: BehaviourConfig = BehaviourConfig(),
    progress: Progress | None = None,
) -> MergeBehaviour:
    """The written merge against the exact one (its effect retained: what a rank cap costs) and against each
    part (each part's effect the merge keeps; a merge of unlike tasks keeps part of each).

    Args:
        parts: task id -> the adapter merged (the exact ΔW of each part).
        merged: the merge as written (``MergeResult.adapter``).
        exact: the merge without a rank cut (``merge.exact_merge``); None when ``merged`` is exact already.
        prompts: shared and per-part prompts; the exact comparison uses every prompt, as shared ones.
    """
    against_exact = None
    if exact is not None:
        shared = tuple(replace(p, task=None) for p in prompts)
        label = merged.name
        against_exact = compare_adapters(
            base_model, tokenizer, {label: exact}, {label: merged}, shared, config, progress
        )[label]
    kept = compare_adapters(base_model, tokenizer, parts, dict.fromkeys(parts, merged), prompts, config, progress)
    return MergeBehaviour(against_exact, kept)
