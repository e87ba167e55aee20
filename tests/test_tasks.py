"""motg.tasks: disjoint and seeded splits, suites and mixes, trace correctness, scoring and reward robustness."""
import json
import math
import random
import re
import time

import pytest

from motg.base import DEFAULT_CHARSET, build_tokenizer
from motg.tasks import (CPU_SUITE, REWARD_SCHEMES, SUITES, TRACES, charset_of, extract_answer, format_completion,
                        format_prompt, load_task, motg_format_ok, reward, score, split_of, trace_answer,
                        trace_pass_rate)

ADVERSARIAL = [None, "", " ", "garbage", "<answer>", "</answer>", "</answer><answer>", "<answer></answer>",
               "</think></think><answer><answer></answer></answer>", "<answer>" * 1000,
               "<answer>\U0001F600 ∧ ¬P → Q ↔ \u200b</answer>", "<answer>\x00\ud800\uffff</answer>",
               "</think><answer>" * 50_000 + "x", "</think><answer>x</answer>" * 30_000 + "x", "x" * 10**6,
               "<answer>" + "1" * 10**6 + "</answer>", "<answer>" + "(" * 4000 + "</answer>",
               "</think>\n<answer>" + "(P ∧ " * 800 + "Q" + ")" * 800 + "</answer>", "<answer>NaN</answer>",
               "<answer>1e999999</answer>", "<answer>-0</answer>", 12345, b"<answer>1</answer>"]


@pytest.fixture(scope="module")
def cpu_test():
    return {task: load_task(f"cpu/{task}", "test", 1000, seed=0) for task in CPU_SUITE}


def test_trace_of_every_cpu_task_scores_on_at_least_99_percent(cpu_test):
    assert set(CPU_SUITE) <= set(TRACES) and len(CPU_SUITE) >= 4
    for task, rows in cpu_test.items():
        assert len(rows) == 1000 and set(rows["task"]) == {task}
        rate = trace_pass_rate(rows)  # the trace's own last result, never the gold answer, is scored
        assert rate >= 0.99, (task, rate)
        assert max(map(len, rows["trace"])) <= 100, task  # short: the tiny model's rollouts are ~128 tokens


def test_a_wrong_trace_fails_the_pass_rate(cpu_test):
    rows = [dict(row, trace=row["trace"] + "0=1\n") for row in cpu_test["chain_sum"].select(range(50))]
    assert trace_pass_rate(rows) < 0.2  # the check reads the trace, so a trace ending wrong is caught


def test_cpu_suite_fits_the_tiny_tokenizer(cpu_test):
    tokenizer = build_tokenizer()
    for task, rows in cpu_test.items():
        assert set(charset_of(rows)) <= set(DEFAULT_CHARSET), task
        ids = tokenizer(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]  # encodes without error
        assert tokenizer.decode(ids) == rows[0]["prompt"] + rows[0]["completion"]


def test_cpu_suite_drops_rather_than_alters_characters_outside_the_charset():
    rows = load_task("cpu/letter_counting", "train", 3000, seed=0)
    dropped = json.loads(rows.info.description)["dropped_for_charset"]["letter_counting"]
    assert dropped > 0  # the source text has "aërial": those items are dropped and counted, never rewritten
    assert set(charset_of(rows)) <= set(DEFAULT_CHARSET)
    raw = load_task("letter_counting", "train", 3000, seed=0, min_words=5, max_words=8)  # a bare task keeps them
    assert not set(charset_of(raw)) <= set(DEFAULT_CHARSET)


def test_train_and_test_share_no_question():
    for name, kwargs in [("cpu", {}), ("chain_sum", dict(max_terms=2, max_digits=1)), ("propositional_logic", {})]:
        train = load_task(name, "train", 1500, seed=0, **kwargs)
        tests = [load_task(name, "test", 300, seed=s, **kwargs) for s in (0, 1)]
        for test in tests:
            assert not set(train["question"]) & set(test["question"]), name
    # a tiny question space (200 distinct questions) is shared out, not duplicated across splits
    train = set(load_task("chain_sum", "train", 2000, seed=3, max_terms=2, max_digits=1)["question"])
    test = set(load_task("chain_sum", "test", 500, seed=3, max_terms=2, max_digits=1)["question"])
    assert not train & test and len(train | test) > 150
    assert {split_of(q) for q in test} == {"test"}


def test_deterministic_by_seed_and_prefix_stable():
    a, b = load_task("cpu", "train", 40, seed=7), load_task("cpu", "train", 40, seed=7)
    assert a.to_list() == b.to_list()
    assert load_task("cpu", "train", 40, seed=8)["question"] != a["question"]
    small = load_task("leg_counting", "test", 10, seed=2)["question"]
    assert load_task("leg_counting", "test", 30, seed=2)["question"][:10] == small
    # Reasoning-Gym seeds s and s+1 share items shifted by one; the hashed pool seed avoids that
    s0 = load_task("chain_sum", "train", 50, seed=0)["question"]
    s1 = load_task("chain_sum", "train", 50, seed=1)["question"]
    assert len(set(s0) & set(s1)) < 5


def test_rows_have_the_documented_fields():
    row = load_task("cpu/chain_sum", "train", 1, seed=0)[0]
    assert set(row) >= {"task", "question", "answer", "entry", "prompt", "trace", "completion", "config"}
    assert row["prompt"] == format_prompt(row["question"]) == row["question"] + "\n<think>"
    assert row["completion"] == format_completion(row["trace"], row["answer"])
    assert row["completion"] == row["trace"] + "</think><answer>" + row["answer"] + "</answer>"
    assert json.loads(row["entry"])["question"] == row["question"]
    assert json.loads(row["config"]) == SUITES["cpu"]["chain_sum"]["config"]


def test_a_task_without_a_trace_generator_loads_with_an_empty_trace():
    rows = load_task("spell_backward", "test", 5, seed=0)
    assert set(rows["trace"]) == {""} and all(c.startswith("</think><answer>") for c in rows["completion"])
    assert all(score(row["completion"], row) == 1.0 for row in rows)


def test_mix_by_dict_and_string_and_suite():
    by_string = load_task("chain_sum:2,leg_counting:1", "train", 60, seed=0)
    by_dict = load_task({"chain_sum": 2, "leg_counting": 1}, "train", 60, seed=0)
    assert by_string.to_list() == by_dict.to_list()
    assert sorted(by_string["task"]) == ["chain_sum"] * 40 + ["leg_counting"] * 20
    assert by_string["task"][:20] != sorted(by_string["task"])[:20]  # interleaved, not in blocks
    cpu = load_task("cpu", "test", 10, seed=0)
    assert sorted(set(cpu["task"])) == sorted(CPU_SUITE)
    override = load_task("cpu", "test", 8, seed=0, chain_sum={"max_terms": 2, "max_digits": 1})
    sums = [json.loads(r["entry"]) for r in override if r["task"] == "chain_sum"]
    assert sums and all(e["metadata"]["num_terms"] == 2 and e["metadata"]["num_digits"] == 1 for e in sums)


def test_propositional_logic_has_a_gold_answer_and_scores():
    rows = load_task("propositional_logic", "test", 50, seed=0)
    assert all(rows["answer"])  # Reasoning-Gym's answer is None; the gold comes from metadata
    scores = [score(row["completion"], row) for row in rows]
    assert sum(s == 1.0 for s in scores) >= 48  # Reasoning-Gym's own example answer is occasionally rejected
    assert score("</think><answer>P ∨ ¬P</answer>", rows[0]) < 1.0
    assert 0.0 <= reward("</think><answer>(((</answer>", rows[0], "motg") <= 3.75


def test_gold_answers_of_the_motg_suites_score_one():
    rows = load_task("motg12", "test", 24, seed=0)
    assert sorted(set(rows["task"])) == sorted(SUITES["motg12"])
    for row in rows:
        assert score(row["completion"], row) == 1.0, (row["task"], row["answer"])
    graph = load_task("graph_color", "test", 3, seed=0)  # another task whose Reasoning-Gym answer is None
    assert all(score(row["completion"], row) == 1.0 for row in graph)


@pytest.mark.parametrize("scheme", sorted(REWARD_SCHEMES))
def test_reward_never_raises_and_is_fast(scheme):
    rows = [load_task("cpu/chain_sum", "test", 1, seed=0)[0], load_task("propositional_logic", "test", 1, seed=0)[0],
            load_task("prime_factorization", "test", 1, seed=0)[0]]
    start = time.time()
    for row in rows:
        for text in ADVERSARIAL:
            value = reward(text, row, scheme)
            assert isinstance(value, float) and math.isfinite(value), (scheme, str(text)[:40])
            assert 0.0 <= score(text, row) <= 1.0
    assert time.time() - start < 10


def test_reward_values_per_scheme():
    row = load_task("cpu/basic_arithmetic", "test", 1, seed=0)[0]
    good = row["completion"]
    wrong = "1\n</think><answer>123456789</answer>"
    assert reward(good, row, "correctness") == 1.0 and reward(wrong, row, "correctness") == 0.0
    assert reward(good, row, "default") == pytest.approx(1.1) and reward(wrong, row, "default") == pytest.approx(0.1)
    assert reward("</think>3", row, "default") == 0.0
    assert [reward(t, row, "soft_tokens") for t in (good, wrong, "no tags", "<answer> </answer>")] == [1, 0.1, 0, 0]
    # MoT-G: 2 x score, the regex term only when </think> is on the first line, xml terms need newlines
    assert reward("x</think><answer>" + row["answer"] + "</answer>", row, "motg") == 2.5
    words = " ".join(["w"] * 250)
    text = f"{words}\n</think>\n<answer>\n{row['answer']}\n</answer>\n"
    assert reward(text, row, "motg") == pytest.approx(2.0 + 0.5 + 0.75)  # word count + xml, no format (multi-line)
    assert reward(text, row, "motg", word_range=None) == pytest.approx(2.0 + 0.75)
    assert reward(text, row, "motg", dotall=True) == pytest.approx(3.75)  # the maximum
    assert reward(text, row, "motg_short") == pytest.approx(2.0 + 0.5 + 0.75)


def test_config_errors_raise():
    row = load_task("cpu/chain_sum", "test", 1, seed=0)[0]
    with pytest.raises(ValueError, match="scheme"):
        reward("x", row, "nope")
    with pytest.raises(ValueError, match="options"):
        reward("x", row, "motg", word_rnage=(1, 2))
    with pytest.raises(ValueError, match="row"):
        reward("x", {"question": "q"}, "default")


@pytest.mark.parametrize("args,kwargs,parameter", [
    (("nope", "train", 5, 0), {}, "name"), ((42, "train", 5, 0), {}, "name"), ((["a"], "train", 5, 0), {}, "name"),
    (("chain_sum", "validation", 5, 0), {}, "split"), (("chain_sum", "train", 0, 0), {}, "size"),
    (("chain_sum", "train", -3, 0), {}, "size"), (("chain_sum", "train", 2.5, 0), {}, "size"),
    (("chain_sum", "train", 5, "0"), {}, "seed"), (("cpu", "train", 5, 0), {"chain_sum": {"seed": 1}}, "difficulty"),
    (("chain_sum", "train", 5, 0), {"max_trems": 3}, "difficulty"),
    (("chain_sum", "train", 5, 0), {"min_digits": 3, "max_digits": 1}, "difficulty"),
    (("motg10", "train", 5, 0), {"acre": 3}, "difficulty"), (("cpu", "train", 5, 0), {"acre": {}}, "difficulty"),
    (("chain_sum:2,nope:1", "train", 5, 0), {}, "name"), (("chain_sum:0", "train", 5, 0), {}, "name"),
    (("chain_sum:1,chain_sum:2", "train", 5, 0), {}, "name"), (({}, "train", 5, 0), {}, "name"),
    (({"chain_sum": float("nan")}, "train", 5, 0), {}, "name"), (("cpu/acre", "train", 5, 0), {}, "name"),
])
def test_bad_parameters_raise_naming_the_parameter(args, kwargs, parameter):
    with pytest.raises(ValueError, match=f"^{parameter}:"):
        load_task(*args, **kwargs)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        load_task("chain_summ", "train", 5, 0)
    assert "chain_sum" in str(error.value) and "motg10" in str(error.value) and "cpu" in str(error.value)


def test_extract_answer():
    assert extract_answer("a</think><answer> 4\n2 </answer>") == "42"
    assert extract_answer("<answer>1</answer><answer>2") == "2"
    assert extract_answer("</answer><answer>") == "" and extract_answer("none") is None and extract_answer(None) is None


def test_motg_format_scan_matches_the_paper_regex():
    pieces = ["</think>", "<answer>", "</answer>", "\n", " ", "a", "\r", "\u2003", "\x1f", "<", "/"]
    rng = random.Random(1)
    for dotall in (False, True):
        regex = re.compile(r".*</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL if dotall else 0)
        for _ in range(20_000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
            assert motg_format_ok(text, dotall) == bool(regex.match(text)), (text, dotall)


def test_chat_prompt_opens_the_thinking_phase():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                               "{% if not loop.last %}[end]{% endif %}{% endfor %}")
    prompt = format_prompt("Q?", style="chat", tokenizer=tokenizer)
    assert prompt.startswith("[system]You will be given a reasoning question")
    assert prompt.endswith("[user]Q?[end][assistant]<think>")
    with pytest.raises(ValueError, match="tokenizer"):
        format_prompt("Q?", style="chat")
    with pytest.raises(ValueError, match="style"):
        format_prompt("Q?", style="xml")


def test_trace_answer_reads_the_last_result():
    assert trace_answer("3+4=7\n7-2=5\n") == "5" and trace_answer("") is None


def test_with_prompts_keeps_plain_prompts_byte_for_byte_and_builds_chat_ones(cpu_test):
    from datasets import Dataset
    from motg.tasks import SYSTEM_PROMPT, resolve_prompt_style, with_prompts
    plain_tokenizer, chat_tokenizer = build_tokenizer(), build_tokenizer()
    chat_tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                    "{% if not loop.last %}[end]{% endif %}{% endfor %}")
    for task, rows in cpu_test.items():
        rows = rows.select(range(50))
        assert rows["prompt"] == [q + "\n<think>" for q in rows["question"]], task  # load_task's plain prompts
        for style, tokenizer in [("auto", plain_tokenizer), ("plain", plain_tokenizer), ("plain", chat_tokenizer)]:
            same = with_prompts(rows, style, tokenizer)
            assert isinstance(same, Dataset) and same["prompt"] == rows["prompt"], (task, style)
            assert same.to_list() == rows.to_list() and same.info.description == rows.info.description
        chat = with_prompts(list(rows), "auto", chat_tokenizer)
        assert isinstance(chat, list) and [r["question"] for r in chat] == rows["question"]
        for row in chat:
            assert row["prompt"] == f"[system]{SYSTEM_PROMPT}[end][user]{row['question']}[end][assistant]<think>"
            ids = chat_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]  # encodable, no unknowns
            assert chat_tokenizer.decode(ids) == row["prompt"]
    assert resolve_prompt_style("auto", None) == "plain"
    with pytest.raises(ValueError, match=r"^prompt_style: 'chat' needs a tokenizer with a chat template"):
        with_prompts(cpu_test["chain_sum"], "chat", plain_tokenizer)
    with pytest.raises(ValueError, match=r"^prompt_style: must be one of \['auto', 'plain', 'chat', 'soft_tokens'\]"):
        with_prompts(cpu_test["chain_sum"], "Chat", chat_tokenizer)
    with pytest.raises(ValueError, match="^rows"):
        with_prompts(["not a row"], "plain")
