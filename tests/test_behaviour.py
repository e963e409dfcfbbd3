"""Behaviour measure: lossless is exact, effect falls with k, a do-nothing adapter is flagged, the recommendation
is the smallest k meeting the thresholds, mixed batches equal one row at a time, prompt files fail by line."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import TARGETS, byte_tokenizer, tiny_llama, tiny_llama_config, write_adapter
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from vlora_core import CompressConfig, SharedSubspace, VLoRAModel, load_adapter
from vlora_core.behaviour import (
    BehaviourConfig,
    TaskBehaviour,
    check_ks,
    compare_adapters,
    compare_pair,
    effect_warnings,
    evaluate,
    measure,
    measure_variants,
    recommend,
    reference,
    reference_stats,
    row_sums,
    running,
    stored_bytes,
    task_scores,
)
from vlora_core.errors import CompatibilityError, VLoRAError
from vlora_core.io.prompts import (
    GENERIC_PROMPTS,
    Prompt,
    PromptError,
    prompt_rows,
    prompts_by_task,
    prompts_from_rows,
    read_prompts,
    write_prompts,
)

PROMPTS = (
    Prompt("hello there", answer=" general kenobi"),
    Prompt("the cat sat on"),
    Prompt("one two three"),
    Prompt("a b c d e f", task="b"),  # task b is checked on this one alone
)
CONFIG = BehaviourConfig(answer_tokens=6, batch_rows=5)  # several batches of mixed lengths
# the same prompts behind a shared opening (as a chat template's system turn): run once per task, then each row
PREFIXED = tuple(Prompt("Answer in your own way: " + p.text, p.answer, p.task) for p in PROMPTS)


# ---- fixtures: a tiny Llama with a byte tokenizer, adapters written by peft ------------------------------
@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    config = tiny_llama_config()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("behaviour")
    return [load_adapter(write_adapter(root / name, seed)) for seed, name in enumerate("abc")]


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    """An adapter as peft initialises it: B all zeros, so ΔW = 0."""
    path = tmp_path_factory.mktemp("zero") / "zero"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    get_peft_model(tiny_llama(0), config).save_pretrained(str(path))
    return load_adapter(path)


def write_spectral_adapter(path, sign: float, spectrum=(2.0, 0.7, 0.25, 0.08)):
    """ΔW = sign · U diag(spectrum) Vᵀ at every targeted layer, the same U, V for every adapter (fixed seeds):
    the rank basis then holds the pieces in order of size, and a smaller k drops a larger piece."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(0), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, d_in), (d_out, r)
                V = torch.linalg.qr(torch.randn(A.shape[1], 4, generator=generator))[0]
                U = torch.linalg.qr(torch.randn(B.shape[0], 4, generator=generator))[0]
                A.copy_(torch.diag(torch.tensor(spectrum)) @ V.T)
                B.copy_(sign * U)
    model.save_pretrained(str(path))
    return load_adapter(path)


def k_max(full: SharedSubspace) -> int:
    return max(b.k for sides in full.bases.values() for b in sides.values())


# ---- the measures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["flat", "rank"])
def test_lossless_setting_is_exact(tiny, adapters, method):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method=method)
    config = BehaviourConfig(answer_tokens=6, batch_rows=5, greedy_chars=4)
    report = evaluate(model, tokenizer, full, [k_max(full)], PROMPTS, config)
    for result in report.settings[0].tasks.values():  # every direction kept: the originals, scored with no run
        assert result.kl == 0.0 and result.agreement == 1.0 and result.greedy_same == 1.0
        assert result.effect_retained == 1.0 and not result.no_effect and result.positions > 0
    assert all(b.effect_retained == pytest.approx(0.0, abs=1e-6) for b in report.base.values())  # base: nothing kept
    ref = reference(model, tokenizer, full, PROMPTS, config)
    variants = {"again": {t: replace(full.tasks[t], id=t) for t in full.task_ids}}  # the originals run once more
    for task, result in measure_variants(model, tokenizer, full, ref, variants, config)["again"].items():
        assert result.kl <= 1e-6 and result.agreement == 1.0 and result.greedy_same == 1.0, task
        assert result.effect_retained >= 0.999 and result.positions == report.settings[0].tasks[task].positions
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # the base model is given back


def test_effect_retained_falls_as_k_falls(tiny, tmp_path):
    model, tokenizer = tiny
    pair = [write_spectral_adapter(tmp_path / "up", 1.0), write_spectral_adapter(tmp_path / "down", -0.5)]
    full = SharedSubspace.decompose(pair, ["up", "down"], method="rank")
    assert k_max(full) == 4
    report = evaluate(model, tokenizer, full, [4, 3, 2, 1], [Prompt("the cat sat on"), Prompt("hello")], CONFIG)
    for task in ("up", "down"):
        effects = [s.tasks[task].effect_retained for s in report.settings]  # k = 4, 3, 2, 1
        assert effects[0] >= 0.999
        assert all(later <= earlier + 1e-6 for earlier, later in zip(effects, effects[1:])), effects
        assert effects[-1] < 0.9  # k = 1 drops pieces that matter


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_zero_delta_task_is_flagged_not_a_crash(tiny, adapters, zero, method):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters[:2] + [zero], ["a", "b", "zero"], method=method)
    report = evaluate(model, tokenizer, full, [1, k_max(full)], PROMPTS, CONFIG)
    assert report.base["zero"].no_effect and not report.base["a"].no_effect
    for setting in report.settings:
        result = setting.tasks["zero"]
        assert result.no_effect and math.isnan(result.effect_retained)
        assert 0.0 <= result.agreement <= 1.0 and math.isfinite(result.kl)
    recommendation = recommend(report)
    assert recommendation.no_effect == ("zero",)
    assert "'zero'" in recommendation.summary() or "zero" in recommendation.summary()


# ---- the recommendation ----------------------------------------------------------------------------------
def brute_force_k(report, min_effect: float, min_agreement: float) -> int | None:
    """The smallest fixed k whose every task meets both thresholds, by a plain loop."""
    for setting in sorted(report.settings, key=lambda s: s.config.num_components):
        if setting.config.adaptive_k:
            continue
        ok = [
            t.agreement >= min_agreement and (t.no_effect or t.effect_retained >= min_effect)
            for t in setting.tasks.values()
        ]
        if all(ok):
            return setting.config.num_components
    return None


@pytest.fixture(scope="module")
def sweep(tiny, adapters):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method="rank")
    adaptive = [CompressConfig(method="rank", adaptive_k=True, variance_threshold=t) for t in (0.5, 0.9, 1.0)]
    return full, evaluate(model, tokenizer, full, [*range(1, k_max(full) + 1), *adaptive], PROMPTS, CONFIG)


@pytest.mark.parametrize("at", [0, 3, 6, 9, 11])
def test_recommendation_is_the_smallest_k_meeting_the_thresholds(sweep, at):
    full, report = sweep
    fixed = [s for s in report.settings if not s.config.adaptive_k]
    # thresholds that the k at index `at` just meets (the worst task's values there), so smaller k may or may not
    min_effect = max(1e-6, min(t.effect_retained for t in fixed[at].tasks.values()))
    min_agreement = max(1e-6, min(t.agreement for t in fixed[at].tasks.values()))
    recommendation = recommend(report, min_effect, min_agreement)
    expected = brute_force_k(report, min_effect, min_agreement)
    if expected is None:  # a floor of 1e-6 above the worst task there (agreement 0): no k meets it
        assert recommendation.k is None and recommendation.closest is not None
        return
    assert recommendation.k.config.num_components == expected
    if fixed[at].margin(min_effect, min_agreement) >= 0:  # the k at `at` meets them itself: the answer is no larger
        assert expected <= fixed[at].config.num_components
    assert recommendation.k.stored_bytes == stored_bytes(full.truncated(expected))
    assert recommendation.adaptive is not None  # threshold 1.0 keeps every direction: lossless
    assert f"k={expected}" in recommendation.summary()


def test_recommendation_says_when_no_k_meets_it(tiny, adapters):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method="rank")
    report = evaluate(model, tokenizer, full, [1], PROMPTS, CONFIG)
    recommendation = recommend(report, 0.9999, 0.9999)
    assert recommendation.k is None and recommendation.closest.label == "k=1"
    assert "none of the k measured" in recommendation.summary()
    with pytest.raises(VLoRAError, match="min_effect must be in"):
        recommend(report, 1.5)


def test_settings_with_the_same_ks_share_a_run_and_bytes_follow_k(tiny, adapters):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method="flat")  # k ≤ N − 1 = 2
    report = evaluate(model, tokenizer, full, [1, 2, 5], PROMPTS, CONFIG)
    k1, k2, k5 = report.settings
    assert k2.tasks == {t: r for t, r in k5.tasks.items()}  # k=5 is clipped to 2: the same numbers
    assert k1.stored_bytes < k2.stored_bytes == k5.stored_bytes == stored_bytes(full)
    with pytest.raises(CompatibilityError, match="method='rank'"):
        evaluate(model, tokenizer, full, [CompressConfig(2, method="rank")], PROMPTS, CONFIG)


# ---- the batched computation against one row at a time --------------------------------------------------
def one_row_logits(model, task_subspace, task, tokens):
    """Logits (T, V) of one unpadded row: the base model (task None) or a VLoRAModel with set_task."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if task is None:
            return model(ids).logits[0]
        wrapped = VLoRAModel(model, task_subspace)
        try:
            wrapped.set_task(task)
            return wrapped(ids).logits[0]
        finally:
            wrapped.unload()


@pytest.fixture(scope="module")
def head_adapters(tiny, tmp_path_factory):
    """Adapters on q_proj and the LM head itself (of the byte tokenizer's vocabulary), written by peft."""
    model, _ = tiny
    root, found = tmp_path_factory.mktemp("head"), []
    for seed, name in enumerate("abc"):
        config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False, task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        peft_model.save_pretrained(str(root / name))
        found.append(load_adapter(root / name))
    return found


@pytest.mark.parametrize(
    ("method", "k", "prompts", "head"),
    [
        ("flat", 1, PROMPTS, False),
        ("rank", 3, PROMPTS, False),
        ("rank", 2, PREFIXED, False),
        ("rank", 2, PROMPTS, True),
    ],
)
def test_batched_equals_naive_per_row(tiny, adapters, head_adapters, method, k, prompts, head):
    """One unpadded row at a time, log-softmaxes in full, against the mixed batches; with an adapted LM head
    (the head then runs each row's task on the full positions, not the scored ones picked out)."""
    model, tokenizer = tiny
    full = SharedSubspace.decompose(head_adapters if head else adapters, ["a", "b", "c"], method=method)
    assert ("lm_head" in full.shapes) == head
    ref = reference(model, tokenizer, full, prompts, CONFIG)
    report = measure(model, tokenizer, full, ref, [k], CONFIG)
    cut = full.truncated(k)
    for task in ref.task_ids:
        kl = agree = gap = effect = positions = 0.0
        for row in (r for r in ref.rows if r.task == task):
            at = slice(len(row.tokens) - row.answer - 1, len(row.tokens) - 1)  # positions predicting the answer
            z_b, z_o, z_c = (
                one_row_logits(model, s, t, row.tokens)[at] for s, t in ((None, None), (full, task), (cut, task))
            )
            p, q = z_o.log_softmax(-1), z_c.log_softmax(-1)
            kl += (p.exp() * (p - q)).sum().item()
            agree += (z_o.argmax(-1) == z_c.argmax(-1)).sum().item()
            gap += (z_c - z_o).square().sum().item()
            effect += (z_o - z_b).square().sum().item()
            positions += row.answer
        got = report.settings[0].tasks[task]
        assert got.positions == positions
        assert got.kl == pytest.approx(kl / positions, abs=1e-5)
        assert got.agreement == agree / positions
        assert got.effect_retained == pytest.approx(1 - math.sqrt(gap / effect), abs=1e-5)


def log_softmax_kl(z: torch.Tensor, z_o: torch.Tensor) -> torch.Tensor:
    """KL(softmax z_o ‖ softmax z) summed over positions, in float64 from log-softmaxes."""
    p, q = z_o.double().log_softmax(-1), z.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum()


def peaks(z: torch.Tensor, at: int, height: float = 200.0) -> torch.Tensor:
    return z.index_add(1, torch.tensor([at]), torch.full((len(z), 1), height))


Z = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 3
ROW_CASES = [  # (name, z, z_o)
    ("the same logits", Z, Z),
    ("shifted by a constant", Z + 7.5, Z),
    ("a small change", Z + 0.01 * Z.roll(1, -1), Z),
    ("unrelated", Z.roll(5, -1), Z),
    ("peaks on different tokens", peaks(Z, 1), peaks(Z, 0)),  # Σ p·exp(d − m) underflows in fp32
]


@pytest.mark.parametrize(("name", "z", "z_o"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_row_sums_match_log_softmaxes_in_float64(name, z, z_o):
    kl, agree, gap_sq, norm_sq, positions = row_sums(z, z_o, *reference_stats(z_o)).tolist()
    expected = log_softmax_kl(z, z_o).item()
    assert kl == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    assert agree == (z.argmax(-1) == z_o.argmax(-1)).sum().item() and positions == len(z)
    assert gap_sq == pytest.approx((z - z_o).double().square().sum().item(), rel=1e-5)
    assert norm_sq == pytest.approx(z.double().square().sum().item(), rel=1e-5)
    if name == "the same logits":
        assert kl == 0.0 and gap_sq == 0.0  # exactly: no rounding noise from two log-sum-exps


@pytest.mark.parametrize("method", ["flat", "rank"])
def test_a_shared_opening_runs_once_per_task_with_the_same_numbers(tiny, adapters, method):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method=method)
    with running(model, tokenizer, full, full.tasks, CONFIG) as runner:
        rows = [("a", (5, 6, 7, 8, 9)), ("b", (5, 6, 7, 1)), ("a", (5, 6, 2, 3))]
        prefix = runner.shared_prefix(rows, [4, 3, 3])  # rows use outputs from positions 4, 3 and 3 on
        assert prefix.tokens == (5, 6) and prefix.tasks == {"a": 0, "b": 1}  # 2 of the 3 rows' tokens, 2 tasks
        assert prefix.layers[0][0].shape[:3:2] == (2, 2)  # keys (tasks, heads, tokens, head_dim)
        assert runner.shared_prefix(rows, [1, 3, 3]).tokens == (5,)  # never up to a used position
        assert runner.shared_prefix(rows[:2], [4, 3]) is None  # a task per row: nothing saved
    config = BehaviourConfig(answer_tokens=6, batch_rows=5, greedy_chars=5)
    shared, plain = (
        evaluate(model, tokenizer, full, [1, 2], PREFIXED, replace(config, share_prefix=on)) for on in (True, False)
    )
    for ours, theirs in zip(shared.settings, plain.settings):
        for task, result in ours.tasks.items():
            other = theirs.tasks[task]
            assert result.positions == other.positions and result.greedy_same == other.greedy_same
            assert result.agreement == other.agreement
            assert result.kl == pytest.approx(other.kl, rel=1e-4, abs=1e-7)
            assert result.effect_retained == pytest.approx(other.effect_retained, abs=1e-5)


def test_generated_answers_are_the_originals_greedy_continuation(tiny, adapters):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method="rank")
    ref = reference(model, tokenizer, full, PROMPTS, CONFIG, task_ids=["a"])
    row = ref.rows[1]  # "the cat sat on": no answer given, so the original answered it
    wrapped = VLoRAModel(model, full)
    try:
        wrapped.set_task("a")
        with torch.no_grad():
            out = wrapped.generate(torch.tensor([row.prompt]), max_new_tokens=CONFIG.answer_tokens, do_sample=False)
    finally:
        wrapped.unload()
    assert tuple(out[0, len(row.prompt) :].tolist())[: row.answer] == row.tokens[len(row.prompt) :]
    assert ref.task_ids == ["a"]
    with running(model, tokenizer, full, full.tasks, CONFIG) as runner:  # the logits it answered from, as scored
        forced = runner.originals(ref.rows)
    answered = [i for i, p in enumerate(p for p in PROMPTS if p.task is None) if p.answer is None]  # rows 1, 2
    assert len(answered) == 2 and all(len(ref.logits[i]) == ref.rows[i].answer for i in answered)
    for i in range(len(ref.rows)):
        torch.testing.assert_close(ref.logits[i], forced[i], rtol=1e-5, atol=1e-5)


# ---- checking an export: one adapter set against another ----------------------------------------------
def test_compare_adapters_sees_a_faithful_and_an_empty_export(tiny, adapters, zero):
    model, tokenizer = tiny
    originals = {"a": adapters[0], "b": adapters[1]}
    candidates = {"a": adapters[0], "b": zero}  # "b" exported as nothing
    results = compare_adapters(model, tokenizer, originals, candidates, PROMPTS, CONFIG)
    assert results["a"].effect_retained >= 0.999 and results["a"].agreement == 1.0
    assert results["b"].effect_retained == pytest.approx(0.0, abs=1e-3)


def test_compare_adapters_scores_each_task_on_its_own_else_the_shared_prompts(tiny, adapters):
    """The whole prompt set goes in: "b" has a prompt of its own, "a" only the shared one, and the prompt of
    "c", a task not compared, is left out (not an unknown-task error)."""
    model, tokenizer = tiny
    shared, own_b = Prompt("hello there", " general kenobi"), Prompt("a b c", " xyz", task="b")
    prompts = [shared, own_b, Prompt("one two", " three four five", task="c")]
    originals = {"a": adapters[0], "b": adapters[1]}
    candidates = {"a": adapters[1], "b": adapters[0]}  # swapped: both far from their originals
    results = compare_adapters(model, tokenizer, originals, candidates, prompts, CONFIG)
    assert results["a"].positions == len(" general kenobi") and results["b"].positions == len(" xyz")
    alone = [
        compare_adapters(model, tokenizer, {t: originals[t]}, {t: candidates[t]}, [p], CONFIG)[t]
        for t, p in (("a", shared), ("b", own_b))
    ]
    for task, one in zip("ab", alone):
        assert results[task].kl == pytest.approx(one.kl, rel=1e-5) and results[task].agreement == one.agreement
        assert results[task].effect_retained == pytest.approx(one.effect_retained, abs=1e-6)
        assert one.effect_retained < 0.9


# ---- prompt files ----------------------------------------------------------------------------------------
BAD_LINES = [
    ('{"prompt": "hi", }', "not JSON"),
    ('["hi"]', "not an object"),
    ('{"answer": "no prompt"}', 'no "prompt"'),
    ('{"prompt": "hi", "anwser": "x"}', "did you mean 'answer'"),
    ('{"prompt": ""}', '"prompt" must be non-empty text'),
    ('{"prompt": "hi", "answer": 3}', "leave the key out"),
    ('{"prompt": "hi", "task": null, "answer": "  "}', '"answer" must be non-empty text'),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_prompt_line_is_named_with_the_fix(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(PromptError) as err:
        read_prompts(path)
    assert f"{path}, line 3:" in str(err.value) and message in str(err.value)
    assert '"prompt"' in str(err.value) or "leave the key out" in str(err.value)  # the message says what to write


def test_prompt_files_round_trip_and_fail_as_files(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [*PROMPTS, Prompt("ünïcode ✓", answer="ja")])
    back = read_prompts(path)
    assert [(p.text, p.answer, p.task) for p in back] == [(p.text, p.answer, p.task) for p in [*PROMPTS, back[-1]]]
    assert back[-1].text == "ünïcode ✓" and back[1].origin == f"{path}, line 2"
    assert json.loads(path.read_text().splitlines()[1]) == {"prompt": "the cat sat on"}
    with pytest.raises(PromptError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(PromptError, match="holds no prompts"):
        read_prompts(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompts(tmp_path / "latin1.jsonl")


def test_prompts_by_task_own_else_shared_and_unknown_tasks_named(tmp_path):
    chosen = prompts_by_task(PROMPTS, ["a", "b"])
    assert [p.text for p in chosen["b"]] == ["a b c d e f"] and len(chosen["a"]) == 3
    assert prompts_by_task(GENERIC_PROMPTS, ["x"])["x"] == GENERIC_PROMPTS
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": "hi", "task": "sentimnt"}\n')
    with pytest.raises(PromptError, match=rf"{path}, line 2: task 'sentimnt' is not among the tasks"):
        prompts_by_task(read_prompts(path), ["sentiment"])
    with pytest.raises(PromptError, match="no prompt for task 'a'"):
        prompts_by_task([Prompt("x", task="b")], ["a", "b"])


def test_prompt_table_rows_round_trip_and_fail_by_row():
    rows = prompt_rows(PROMPTS)
    assert rows[0] == ["", "hello there", " general kenobi"] and rows[3] == ["b", "a b c d e f", ""]
    back = prompts_from_rows([*rows, ["", "", ""], [None, None, None]])  # blank rows are skipped
    assert [(p.text, p.answer, p.task) for p in back] == [(p.text, p.answer, p.task) for p in PROMPTS]
    assert back[1].origin == "prompt table, row 2"
    with pytest.raises(PromptError, match=r'prompt table, row 2: "prompt" must be non-empty text'):
        prompts_from_rows([["", "fine", ""], ["sentiment", "  ", "positive"]])
    with pytest.raises(PromptError, match="holds no prompts"):
        prompts_from_rows([["", " ", ""]])


# ---- what the workbench and the export check use ----------------------------------------------------------
@pytest.mark.parametrize(
    ("k_max", "expected"),
    [(1, [1]), (4, [1, 2, 3, 4]), (5, [1, 2, 3, 4, 5]), (40, [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40])],
)
def test_check_ks_doubles_with_halfway_steps_up_to_lossless(k_max, expected):
    assert check_ks(k_max) == expected


def test_effect_warnings_name_low_near_zero_and_nothing_to_keep():
    def result(effect, agreement=0.9, no_effect=False):
        return TaskBehaviour("t", 0.1, agreement, effect, no_effect, 10)

    results = {"fine": result(0.97), "low": result(0.8), "gone": result(0.02), "idle": result(math.nan, 1, True)}
    low, gone, idle = effect_warnings(results)  # in task order; "fine" says nothing
    assert low.startswith("'low': effect retained 0.800, below 0.95") and "larger k" in low
    assert gone.startswith("'gone': effect retained 0.020, near zero") and "base model" in gone
    assert idle.startswith("'idle': the original adapter changes nothing")
    assert effect_warnings(results, min_effect=0.75) == [gone, idle]
    assert effect_warnings({"fine": result(0.97)}) == []


def test_compare_pair_is_exact_for_a_task_against_itself_and_sees_the_base(tiny, adapters):
    model, tokenizer = tiny
    full = SharedSubspace.decompose(adapters, ["a", "b", "c"], method="rank")
    same = compare_pair(model, tokenizer, full, "a", "a", "the cat sat on", " the mat")
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.agreement == 1.0 and same.positions == len(" the mat")
    other = compare_pair(model, tokenizer, full, "a", None, "the cat sat on", " the mat")  # against the base
    ref = reference(model, tokenizer, full, [Prompt("the cat sat on", " the mat")], CONFIG, task_ids=["a"])
    base = task_scores(ref, ref.base, CONFIG)["a"]  # the base model against the original, the same positions
    assert other.kl == pytest.approx(base.kl, rel=1e-4) and other.agreement == base.agreement
    with pytest.raises(PromptError, match="the answer '' has no tokens"):
        compare_pair(model, tokenizer, full, "a", "b", "hi", "")
