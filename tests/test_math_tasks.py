"""motg.tasks on Soft Tokens' setting: math data sets from local files, Math-Verify scoring, hostile answers, formats."""
import json
import math
import threading
import time

import datasets
import pytest

from motg.tasks import (ANSWER_FORMATS, MATH_DATASETS, MATH_VERIFY_SECONDS, PROMPT_STYLE_SETTINGS, REWARD_SCHEMES,
                        SOFT_TOKENS_PROMPT, AnswerFormat, answer_format, extract_answer, format_prompt, last_boxed,
                        load_task, math_answer_safe, math_equal, reward, score, with_prompts)

GSM8K = [{"question": f"Ann has {i} pens and buys {1000 + i} more. How many pens does she have?",
          "answer": f"She has {i}+{1000 + i}=<<{i}+{1000 + i}={1000 + 2 * i}>>{1000 + 2 * i:,} pens.\n#### {1000 + 2 * i:,}"}
         for i in range(30)]
MATH = [{"problem": f"Simplify $\\frac{{{i}}}{{{2 * i}}}$.", "level": f"Level {1 + i % 5}",
         "type": "Algebra" if i % 2 else "Prealgebra",
         "solution": f"First $\\boxed{{1}}$ is wrong; in fact $\\frac{{{i}}}{{{2 * i}}} = \\boxed{{\\frac{{1}}{{2}}}}$."}
        for i in range(1, 21)]
MATH.append({"problem": "A problem whose solution has no box.", "level": "Level 1", "type": "Algebra",
             "solution": "The answer is 3."})
MATH500 = [{"problem": f"What is ${i}^2$?", "solution": f"It is $\\boxed{{{i * i}}}$.", "answer": str(i * i),
            "subject": "Number Theory", "level": 1 + i % 5, "unique_id": f"test/x/{i}.json"} for i in range(10)]
DEEPSCALER = [{"problem": f"Find {i} + {i}.", "answer": str(2 * i), "solution": f"${i}+{i}={2 * i}$"} for i in range(10)]


def write(folder, name, rows):
    "Rows written as JSONL (.jsonl), a JSON array (.json) or Parquet (.parquet), as the hub's files would be."
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def files(tmp_path):
    return {"gsm_jsonl": write(tmp_path, "gsm8k_test.jsonl", GSM8K), "gsm_parquet": write(tmp_path, "gsm8k_test.parquet", GSM8K),
            "math_jsonl": write(tmp_path, "math_train.jsonl", MATH), "math_parquet": write(tmp_path, "math_train.parquet", MATH),
            "math500": write(tmp_path, "math500.jsonl", MATH500), "deepscaler": write(tmp_path, "deepscaler.json", DEEPSCALER)}


def test_gsm8k_layout_loads_offline_from_jsonl_and_parquet_with_the_gold_parsed(offline, files):
    from_jsonl = load_task("gsm8k", "test", 30, seed=0, data_files=files["gsm_jsonl"])
    from_parquet = load_task("gsm8k", "test", 30, seed=0, data_files={"test": files["gsm_parquet"]})
    assert from_jsonl.to_list() == from_parquet.to_list()
    golds = {r["question"]: str(1000 + 2 * int(r["question"].split()[2])) for r in GSM8K}
    assert all(row["answer"] == golds[row["question"]] for row in from_jsonl)  # "#### 1,002" -> "1002"
    row = from_jsonl[0]
    assert set(row) >= {"task", "question", "answer", "prompt", "completion", "entry", "config"} and row["task"] == "gsm8k"
    assert row["prompt"] == SOFT_TOKENS_PROMPT.replace("QUESTION", row["question"])
    assert score(row["completion"], row) == 1.0


def test_math_layout_loads_offline_with_the_last_box_and_nested_braces(offline, files):
    for key in ("math_jsonl", "math_parquet"):
        rows = load_task("math", "train", 20, seed=0, data_files=files[key])
        assert set(rows["answer"]) == {"\\frac{1}{2}"}  # the last box, not the first; braces matched
        assert json.loads(rows.info.description)["dropped_without_gold"] == 1  # the record without a box
    with pytest.raises(ValueError, match=r"^size: math train has 20 rows with a gold answer, fewer than 21"):
        load_task("math", "train", 21, seed=0, data_files=files["math_jsonl"])
    test = load_task("math", "test", 10, seed=0, data_files=files["math500"])  # MATH-500's layout: its own answer column
    assert sorted(test["answer"], key=int) == [str(i * i) for i in range(10)]
    levels = load_task("math", "train", 4, seed=0, data_files=files["math_jsonl"], levels=[1, 2], subjects=["Algebra"])
    assert all(json.loads(e)["type"] == "Algebra" and json.loads(e)["level"] in ("Level 1", "Level 2") for e in levels["entry"])
    assert len(load_task("math", "test", 2, seed=0, data_files=files["math500"], levels=[2])) == 2


def test_deepscaler_layout_and_a_json_array_file(offline, files):
    rows = load_task("deepscaler", "train", 10, seed=3, data_files=files["deepscaler"])
    assert sorted(rows["answer"], key=int) == [str(2 * i) for i in range(10)]
    assert all(score(f"The final answer is: \\boxed{{{r['answer']}}}.", r) == 1.0 for r in rows)


def test_subsampling_is_seeded_and_prefix_stable(offline, files):
    a = load_task("gsm8k", "test", 10, seed=1, data_files=files["gsm_jsonl"])
    assert a.to_list() == load_task("gsm8k", "test", 10, seed=1, data_files=files["gsm_jsonl"]).to_list()
    assert load_task("gsm8k", "test", 4, seed=1, data_files=files["gsm_jsonl"])["question"] == a["question"][:4]
    assert load_task("gsm8k", "test", 10, seed=2, data_files=files["gsm_jsonl"])["question"] != a["question"]
    assert a["question"] != [r["question"] for r in GSM8K[:10]]  # shuffled, not the file's first rows


def test_offline_without_files_names_the_parameter_and_the_columns(offline):
    for name, columns in [("gsm8k", "['question', 'answer']"), ("math", "['problem', 'solution']"),
                          ("deepscaler", "['problem', 'answer']")]:
        with pytest.raises(ValueError, match=r"^data_files: the hub is offline") as error:
            load_task(name, "train", 5, seed=0)
        assert columns in str(error.value) and "JSON, JSONL or Parquet" in str(error.value)


@pytest.mark.parametrize("kwargs,parameter", [
    ({"data_files": {"train": "x.jsonl"}}, "data_files"),  # no test files in the dict
    ({"data_files": "does/not/exist.jsonl"}, "data_files"), ({"data_files": 5}, "data_files"),
    ({"data_files": []}, "data_files"), ({"levels": [1]}, "difficulty"),
])
def test_bad_math_parameters_raise_naming_the_parameter(offline, files, kwargs, parameter):
    with pytest.raises(ValueError, match=f"^{parameter}:"):
        load_task("gsm8k", "test", 5, seed=0, **kwargs)


def test_wrong_columns_and_file_kinds_are_refused(offline, files, tmp_path):
    with pytest.raises(ValueError, match=r"^data_files: gsm8k needs the columns \['question', 'answer'\]"):
        load_task("gsm8k", "test", 5, seed=0, data_files=files["math_jsonl"])
    (tmp_path / "rows.csv").write_text("question,answer\nq,#### 1\n")
    with pytest.raises(ValueError, match=r"^data_files: files of one kind"):
        load_task("gsm8k", "test", 1, seed=0, data_files=str(tmp_path / "rows.csv"))
    with pytest.raises(ValueError, match=r"^difficulty: levels must be"):
        load_task("math", "train", 1, seed=0, data_files=files["math_jsonl"], levels=[0])
    with pytest.raises(ValueError, match=r"^data_files: only the math data sets"):
        load_task("chain_sum", "train", 1, seed=0, data_files=files["gsm_jsonl"])


def test_the_hub_path_asks_for_the_canonical_ids_and_a_missing_split_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        layout = {"openai/gsm8k": GSM8K, "DigitalLearningGmbH/MATH-lighteval": MATH, "HuggingFaceH4/MATH-500": MATH500,
                  "agentica-org/DeepScaleR-Preview-Dataset": DEEPSCALER}[path]
        return datasets.Dataset.from_list(layout)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for name, split in [("gsm8k", "train"), ("gsm8k", "test"), ("math", "train"), ("math", "test"), ("deepscaler", "train")]:
        assert len(load_task(name, split, 3, seed=0)) == 3
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
                     ("DigitalLearningGmbH/MATH-lighteval", "default", "train"), ("HuggingFaceH4/MATH-500", None, "test"),
                     ("agentica-org/DeepScaleR-Preview-Dataset", None, "train")]
    with pytest.raises(ValueError, match=r"^split: deepscaler defines only \['train'\] on the hub, no 'test'"):
        load_task("deepscaler", "test", 3, seed=0)
    assert set(MATH_DATASETS) == {"gsm8k", "math", "deepscaler"}


@pytest.mark.parametrize("gold,answer", [
    ("\\frac{1}{2}", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac12"), ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "\\tfrac{1}{2}"), ("1200", "1,200"), ("1200", "1200.0"), ("18", "\\$18"), ("\\sqrt{2}", "2^{1/2}"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("x^2+2x+1", "(x+1)^2"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("2^{10}", "1024"), ("3\\sqrt{2}", "\\sqrt{18}"),
])
def test_equivalent_answers_are_equal(gold, answer):
    assert math_equal(gold, answer), (gold, answer)


@pytest.mark.parametrize("gold,answer", [
    ("\\frac{1}{2}", "1/3"), ("72", "73"), ("72", "7.2"), ("x^2+1", "x^2-1"), ("1200", "120"), ("\\frac{1}{2}", ""),
    ("\\frac{1}{2}", "\\frac{1}{2"), ("\\frac{1}{2}", None), ("3", "x"),
])
def test_wrong_answers_are_not(gold, answer):
    assert not math_equal(gold, answer), (gold, answer)


def test_soft_tokens_reward_is_100_10_0_by_math_verify(offline, files):
    row = load_task("math", "train", 1, seed=0, data_files=files["math_jsonl"])[0]
    texts = ["x. The final answer is: \\boxed{0.5}.", "<answer>1/2</answer>", "The final answer is: \\boxed{\\dfrac12}",
             "The final answer is: \\boxed{2}.", "The final answer is: 0.5", "<answer></answer>"]
    assert [reward(t, row, "soft_tokens") for t in texts] == [1.0, 1.0, 1.0, 0.1, 0.0, 0.0]
    assert [score(t, row) for t in texts] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


HOSTILE = [None, "", "\\boxed{", "\\boxed{" * 20_000, "}" * 10_000 + "\\boxed{1}", "\\boxed{\\boxed{\\boxed{0.5}}}",
           "\\boxed{" + "{" * 5000 + "1", "\\boxed{" + "(" * 500 + "1" + ")" * 500 + "}", "<answer>" + "(" * 300 + "</answer>",
           "\\boxed{" + "1" * 100_000 + "}", "\\boxed{10**100000}", "\\boxed{10^{100000}}", "\\boxed{9^9^9^9}",
           "\\boxed{9^{9^{9^{9}}}}", "\\boxed{2^{2^{100}}}", "\\boxed{(10^{10})!}", "\\boxed{10!!!}", "\\boxed{999999!}",
           "\\boxed{\\binom{10^{9}}{10^{5}}}", "\\boxed{\\prod_{i=1}^{10^{6}} i}", "\\boxed{(x+y+z+w)^{32}}",
           "\\boxed{\\cos(999^{999})}", "\\boxed{\\lfloor e^{e^{e^{5}}} \\rfloor}", "\\boxed{\\Gamma(99999999)}",
           "\\boxed{\\sin(\\cos(\\tan(\\sin(\\cos(1)))))}", "\\boxed{\\left\\lfloor(1+\\sqrt{2})^{999}\\right\\rfloor}",
           "\\boxed{" + "\\frac{1}{" * 4 + "2" + "}" * 4 + "}", "\\boxed{" + "a" * 128 + "}", "\\boxed{\x00\ud800\uffff}",
           "junk " * 2000 + "\\boxed{1/2", "The final answer is: \\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 60 + "}",
           "\\boxed{\\begin{pmatrix}x&y\\\\z&w\\end{pmatrix}^{24}}", "<answer>\\boxed{1e999999}</answer>", 12345]


def _score_all(rows, texts, seconds):
    "Every reward scheme of every text for every row, each reward timed; returns the slowest time."
    slowest = 0.0
    for row in rows:
        for text in texts:
            for scheme in REWARD_SCHEMES:
                start = time.monotonic()
                value = reward(text, row, scheme)
                elapsed = time.monotonic() - start
                assert isinstance(value, float) and math.isfinite(value), (scheme, repr(text)[:60])
                assert elapsed < seconds, (scheme, repr(text)[:60], elapsed)
                slowest = max(slowest, elapsed)
    return slowest


def test_hostile_completions_never_raise_and_take_bounded_time(offline, files):
    rows = [load_task("math", "train", 1, seed=0, data_files=files["math_jsonl"])[0]]
    _score_all(rows, HOSTILE, seconds=10 * MATH_VERIFY_SECONDS)  # generous: the budget is CPU time, per answer


def test_hostile_completions_are_bounded_off_the_main_thread_too(offline, files):
    rows = [load_task("gsm8k", "test", 1, seed=0, data_files=files["gsm_jsonl"])[0]]  # another gold: nothing cached
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(slowest=_score_all(rows, HOSTILE, 10 * MATH_VERIFY_SECONDS)))
    worker.start()
    worker.join(timeout=600)
    assert not worker.is_alive() and "slowest" in outcome  # an AssertionError in the thread leaves no "slowest"


def test_the_static_guard_refuses_blowups_and_keeps_ordinary_answers():
    for answer in ["72", "\\frac{\\sqrt{3}}{2}", "(-\\infty,-2)\\cup(2,\\infty)", "2^{100}", "x^2-3x+2", "4!", "1\\!000",
                   "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\end{pmatrix}", "\\text{(C)}", "10^{-3}", "3\\sqrt{2}"]:
        assert math_answer_safe(answer), answer
    for answer in ["9^{9^{9}}", "2^999^999^999", "10!!", "1000!", "\\sum_{i=1}^{9} i", "(x+1)^{99}", "{1", "1" * 129,
                   "\\exp(10)", "\\operatorname{lcm}(2,3)", "((((((1))))))"]:
        assert not math_answer_safe(answer), answer


def test_extract_answer_reads_boxes_and_tags():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}" and last_boxed("none") is None
    assert extract_answer("The final answer is: \\boxed{\\{1, 2\\}}.") == "\\{1, 2\\}"
    assert extract_answer("<answer>\\boxed{5}</answer>") == "5" and extract_answer("\\boxed{5}<answer>6</answer>") == "6"
    assert extract_answer("The final answer is: \\boxed{4") == "4" and extract_answer("\\boxed{}") == ""


def test_each_papers_format_is_named_data():
    assert set(ANSWER_FORMATS) == {"motg", "soft_tokens"} and "soft_tokens" in PROMPT_STYLE_SETTINGS
    assert ANSWER_FORMATS["motg"] == AnswerFormat(name="motg", think_end="</think>", answer_prefill_early="",
                                                  answer_prefill_budget=None, answer_tokens=None)
    assert ANSWER_FORMATS["soft_tokens"] == AnswerFormat(
        name="soft_tokens", think_end="The final answer is:", answer_prefill_early=" \\boxed{",
        answer_prefill_budget="The final answer is: \\boxed{", answer_tokens=32)
    assert answer_format("soft_tokens") is ANSWER_FORMATS["soft_tokens"] and answer_format("chat").name == "motg"
    with pytest.raises(Exception):
        ANSWER_FORMATS["motg"].think_end = "x"  # frozen
    prompt = format_prompt("What is 2+2?", "soft_tokens")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question, and the Assistant "
                             "solves it. The assistant first shows the complete reasoning process step by step, then "
                             "provides the final answer in \\boxed{}. The assistant must always follow the format: "
                             "'User: [question] Assistant: [detailed reasoning] The final answer is: \\boxed{[answer]}.' ")
    assert prompt.endswith("User: What is 2+2? Assistant:")


def test_gsm_symbolic_is_the_cpu_stand_in_in_soft_tokens_format():
    rows = load_task("gsm_symbolic", "test", 3, seed=0)
    for row in rows:
        assert row["prompt"] == format_prompt(row["question"], "soft_tokens")
        assert row["completion"] == f"The final answer is: \\boxed{{{row['answer']}}}."
        assert score(row["completion"], row) == 1.0 and reward(row["completion"], row, "soft_tokens") == 1.0
        assert score(f"<answer>{row['answer']}.0</answer>", row) == 1.0  # Math-Verify: equal by value
        assert reward("The final answer is: \\boxed{-1}.", row, "soft_tokens") == pytest.approx(0.1)
    plain = with_prompts(rows, "plain")  # the same problems in MoT-G's format, and back
    assert plain[0]["prompt"] == rows[0]["question"] + "\n<think>"
    assert with_prompts(plain, "soft_tokens").to_list() == rows.to_list()
