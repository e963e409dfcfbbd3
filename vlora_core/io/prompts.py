"""Prompt files: the prompts a behaviour check runs, one JSON object per line.

    {"prompt": "How do I make a cup of tea?"}
    {"prompt": "The soup was cold.", "answer": "negative", "task": "sentiment"}

``prompt``  the user's text (non-empty); a chat model sees it as one user turn in its chat template
``answer``  optional reference answer, scored teacher-forced; without one, the original adapter answers
``task``    optional: the prompt belongs to that task only; without it, it is shared by every task

A task with prompts of its own is checked on those; every other task on the shared ones (a task's effect shows
on its own kind of input: a sentiment adapter on reviews, a style adapter on any question). Blank lines are
skipped; anything else that is not such an object is a ``PromptError`` naming the file, the line and the fix.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import VLoRAError

PROMPT_KEYS = ("prompt", "answer", "task")  # every key a line may have; "prompt" is required
EXAMPLE_LINE = '{"prompt": "How do I make a cup of tea?", "answer": "Boil water, then steep the tea."}'
MAX_PROMPT_CHARS = 20_000  # longer prompts or answers are refused: a behaviour check scores short turns


class PromptError(VLoRAError):
    """A prompt file cannot be read, or a prompt set does not fit the tasks it is meant for."""


@dataclass(frozen=True)
class Prompt:
    text: str  # the user's prompt
    answer: str | None = None  # reference answer; None: the original adapter's own greedy answer is scored
    task: str | None = None  # the one task it is for; None: shared by every task
    origin: str = ""  # "file, line n" (or "built-in"), for messages


# A small generic set for when no prompt file is given: everyday questions and instructions.
GENERIC_PROMPTS: tuple[Prompt, ...] = tuple(
    Prompt(text, origin=f"built-in prompt {i + 1}")
    for i, text in enumerate(
        [
            "What is the tallest mountain in the world?",
            "How do I make a cup of tea?",
            "Tell me something about the moon.",
            "What is a cat?",
            "Give me a tip for sleeping better.",
            "Why is the sky blue?",
            "Describe a rainy day in one sentence.",
            "What should I pack for a day at the beach?",
        ]
    )
)


# ---- reading and writing ----------------------------------------------------------------------------
def read_prompts(path: str | Path) -> tuple[Prompt, ...]:
    """Every prompt of a JSON-lines prompt file, in file order. Raises ``PromptError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: no such prompt file; write one JSON object per line, e.g. {EXAMPLE_LINE}") from None
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from None
    except OSError as err:
        raise PromptError(f"{path}: cannot be read ({err.strerror}); check the path and its permissions.") from None
    prompts = [parse_line(line, f"{path}, line {n}") for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise PromptError(f"{path}: holds no prompts; write one JSON object per line, e.g. {EXAMPLE_LINE}")
    return tuple(prompts)


def write_prompts(path: str | Path, prompts: Iterable[Prompt]) -> Path:
    """Write prompts as a JSON-lines file ``read_prompts`` reads back (keys left out when empty)."""
    path = Path(path)
    lines = [json.dumps(prompt_record(p), ensure_ascii=False) for p in prompts]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def prompt_record(prompt: Prompt) -> dict:
    """The JSON object of one line: ``prompt`` and, when set, ``answer`` and ``task``."""
    record = {"prompt": prompt.text, "answer": prompt.answer, "task": prompt.task}
    return {key: value for key, value in record.items() if value is not None}


def parse_line(line: str, origin: str) -> Prompt:
    """One line of a prompt file as a Prompt; ``origin`` ("file, line n") starts every message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptError(f"{origin}: not JSON ({err.msg}, column {err.colno}); {_shape_hint()}") from None
    return parse_record(record, origin)


def parse_record(record: object, origin: str) -> Prompt:
    """One prompt's object (a line's JSON, a table row) as a Prompt, checked as ``parse_line`` checks it."""
    if not isinstance(record, dict):
        raise PromptError(f"{origin}: a JSON {type(record).__name__}, not an object; {_shape_hint()}")
    unknown = [key for key in record if key not in PROMPT_KEYS]
    if unknown:
        raise PromptError(f"{origin}: unknown key {unknown[0]!r}{_did_you_mean(unknown[0])}; {_shape_hint()}")
    if "prompt" not in record:
        raise PromptError(f'{origin}: no "prompt"; {_shape_hint()}')
    return Prompt(
        _text(record, "prompt", origin),
        _text(record, "answer", origin, optional=True),
        _text(record, "task", origin, optional=True),
        origin,
    )


def _text(record: dict, key: str, origin: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PromptError(
            f'{origin}: "{key}" must be non-empty text, got {json.dumps(value)[:40]}; '
            + ("leave the key out if there is none." if optional else _shape_hint())
        )
    if len(value) > MAX_PROMPT_CHARS:
        raise PromptError(
            f'{origin}: "{key}" has {len(value)} characters (at most {MAX_PROMPT_CHARS}); a behaviour check scores '
            "short turns — cut it down."
        )
    return value


def _shape_hint() -> str:
    keys = ", ".join(f'"{k}"' for k in PROMPT_KEYS)
    return f"each line must be one object with the keys {keys} (only prompt is required), e.g. {EXAMPLE_LINE}"


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, PROMPT_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- as a table: one row per prompt (task, prompt, answer), blank for none ------------------------------------
TABLE_COLUMNS = ("task", "prompt", "answer")


def prompt_rows(prompts: Iterable[Prompt]) -> list[list[str]]:
    """Prompts as table rows: task ("" when shared), prompt, answer ("" when none)."""
    return [[p.task or "", p.text, p.answer or ""] for p in prompts]


def prompts_from_rows(rows: Iterable[Sequence[object]], origin: str = "prompt table") -> tuple[Prompt, ...]:
    """The prompts of table rows (task, prompt, answer), checked as a file's lines are: a blank task is shared by
    every task, a blank answer is none, a blank row is skipped. Raises ``PromptError`` naming the row."""
    found = []
    for n, row in enumerate(rows, 1):
        cells = dict(zip(TABLE_COLUMNS, ("" if cell is None else str(cell) for cell in row)))
        record = {key: value for key, value in cells.items() if value.strip() or key == "prompt"}
        if any(value.strip() for value in cells.values()):
            found.append(parse_record(record, f"{origin}, row {n}"))
    if not found:
        raise PromptError(f"{origin}: holds no prompts; type one per row (task blank: every task's) or upload a file.")
    return tuple(found)


# ---- which prompts a task gets ------------------------------------------------------------------------
def prompts_by_task(
    prompts: Sequence[Prompt], task_ids: Sequence[str], known: Sequence[str] | None = None
) -> dict[str, tuple[Prompt, ...]]:
    """Each task's prompts: its own if it has any, else the shared ones. Raises ``PromptError`` for a prompt
    naming a task outside ``known`` (default: ``task_ids``; e.g. every task of a store when only some are
    checked), or a task left with no prompt."""
    known = list(task_ids if known is None else known)
    for prompt in prompts:
        if prompt.task is not None and prompt.task not in known:
            raise PromptError(
                f"{prompt.origin or 'a prompt'}: task {prompt.task!r} is not among the tasks "
                f'({", ".join(map(repr, known))}); correct the task id, or drop "task" to share the prompt.'
            )
    shared = tuple(p for p in prompts if p.task is None)
    chosen = {t: tuple(p for p in prompts if p.task == t) or shared for t in task_ids}
    bare = [t for t, mine in chosen.items() if not mine]
    if bare:
        raise PromptError(
            f"no prompt for task {', '.join(map(repr, bare))}: the prompts name other tasks and none is shared; "
            'add lines without "task" (shared by every task) or lines with "task": ' + repr(bare[0]) + "."
        )
    return chosen
