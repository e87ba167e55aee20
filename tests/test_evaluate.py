"""Integration tests of motg.evaluate and motg.analysis on the tiny model and real Reasoning-Gym rows (CPU, seconds)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from motg.analysis import diversity_records, markdown_table, profile, step_frame
from motg.evaluate import (GRID_COLUMNS, MODES, answer_context, answer_nll, evaluate, grid_columns, inference_grid,
                           ood_scores, pass_at_k, sample_records)
from motg.mixture import make_mixer
import motg.rollout
from motg.rollout import generate
from motg.tasks import load_task, score
from motg.testing import tiny_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


@pytest.fixture(scope="module")
def rows():
    return load_task("cpu", "test", 4, seed=0)  # a mix of the CPU suite's tasks


def test_pass_at_k_exact_values():
    # hand-computed: 1 - C(n-c,k)/C(n,k)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(6, 1, 3) == pytest.approx(1 - 10 / 20)
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 1, 32) == 1.0
    np.testing.assert_allclose(pass_at_k(np.array([4, 4, 4]), np.array([0, 2, 4]), 2), [0.0, 1 - 1 / 6, 1.0])
    with pytest.raises(ValueError, match="^k:"):
        pass_at_k(4, 1, 5)


def test_evaluate_is_fast_deterministic_and_tidy(tiny, rows):
    model, tokenizer = tiny
    settings = dict(n_samples=4, ks=(1, 2, 4), max_new_tokens=12, batch_size=8)
    first = evaluate(model, tokenizer, rows, "hard", seed=3, **settings)
    assert first == evaluate(model, tokenizer, rows, "hard", seed=3, **settings)
    frame = pd.DataFrame(first)
    assert set(frame["task"]) == {"all", *set(rows["task"])}  # per-task breakdown plus the pooled row
    assert {"decoding", "task", "metric", "k", "value", "n_problems", "n_samples", "mode", "eval_seed"} <= set(frame)
    overall = frame[frame.task == "all"].set_index(["decoding", "metric"])["value"]
    assert overall["sample", "pass@1"] <= overall["sample", "pass@2"] <= overall["sample", "pass@4"]
    assert 0 < overall["sample", "think_tokens"] <= overall["sample", "completion_tokens"] <= 12
    assert frame[frame.metric == "pass@1"]["n_problems"].max() == len(rows)


def test_sample_records_use_the_task_scorer_and_the_seed(tiny, rows):
    model, tokenizer = tiny
    a = sample_records(model, tokenizer, rows, "hard", n_samples=2, seed=0, max_new_tokens=12)
    b = sample_records(model, tokenizer, rows, "hard", n_samples=2, seed=1, max_new_tokens=12)
    assert [r["completion"] for r in a] != [r["completion"] for r in b]
    assert len(a) == 2 * len(rows) and [r["problem"] for r in a[:4]] == [0, 0, 1, 1]
    for record in a:
        assert record["score"] == score(record["completion"], rows[record["problem"]])
    # a completion holding the gold answer is correct under the task's own scorer
    gold = [{"problem": 0, "completion": rows[0]["completion"]}]
    assert score(gold[0]["completion"], rows[0]) == 1.0


def test_greedy_does_not_depend_on_the_seed(tiny, rows):
    model, tokenizer = tiny
    greedy = [sample_records(model, tokenizer, rows, "hard", greedy=True, seed=s, max_new_tokens=12) for s in (0, 1)]
    assert [r["completion"] for r in greedy[0]] == [r["completion"] for r in greedy[1]]


@pytest.mark.parametrize("mode", MODES)
def test_every_inference_mode_runs(tiny, rows, mode):
    model, tokenizer = tiny
    records = evaluate(model, tokenizer, rows, mode, n_samples=2, ks=(1, 2), max_new_tokens=8, seed=0)
    assert all(math.isfinite(r["value"]) for r in records)
    assert {r["metric"] for r in records} >= {"pass@1", "pass@2", "score", "think_tokens"}


def test_inference_grid_names_the_papers_columns(tiny, rows):
    model, tokenizer = tiny
    records = inference_grid(model, tokenizer, list(rows)[:2], n_samples=32, ks=(1, 32), max_new_tokens=6, seed=0,
                             batch_size=64, labels={"train_mixer": "hard"})
    settings = {r["setting"] for r in records if r["task"] == "all" and r["setting"]}
    assert settings == set(GRID_COLUMNS) == set(grid_columns(("hard", "fuzzy", "soft"), (1, 32)))
    table = markdown_table([r for r in records if r["setting"] and r["task"] == "all"], "train_mixer", "setting",
                           scale=100, column_order=GRID_COLUMNS)
    assert table.splitlines()[0] == "| train_mixer | " + " | ".join(GRID_COLUMNS) + " |"


@pytest.mark.parametrize("bad, word", [
    (dict(mode="beam"), "mode"), (dict(n_samples=4, ks=(1, 32)), "n_samples"), (dict(ks=(0,)), "ks"),
    (dict(n_samples=0, greedy=False), "n_samples"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-1), "seed"), (dict(batch_size=0), "batch_size"), (dict(temperature=0.0), "temperature"),
    (dict(rows=[]), "rows"), (dict(rows=[{"question": "1+1"}]), "rows")])
def test_evaluate_validation(tiny, rows, bad, word):
    model, tokenizer = tiny
    kwargs = {**dict(rows=rows, n_samples=2, ks=(1, 2), max_new_tokens=4), **bad}
    with pytest.raises(ValueError, match=f"^{word}"):
        evaluate(model, tokenizer, **kwargs)


def test_inference_grid_and_ood_validation(tiny, rows):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="^mixer_params"):
        inference_grid(model, tokenizer, rows, modes=("hard",), mixer_params={"soft": {"temperature": 0.5}})
    with pytest.raises(ValueError, match="^modes"):
        inference_grid(model, tokenizer, rows, modes=("hard", "argmax"))
    with pytest.raises(ValueError, match="^tasks"):
        ood_scores(model, tokenizer, "chain_sum")


def test_answer_nll_definition_on_task_rows(tiny, rows):
    model, tokenizer = tiny
    for row in rows:  # the trace context is exactly the gold completion up to the answer
        assert row["prompt"] + row["completion"] == answer_context(row, "trace") + row["answer"] + "</answer>"
    one_by_one = [answer_nll(model, tokenizer, [row]) for row in rows]
    batched = answer_nll(model, tokenizer, rows, reduction="none", batch_size=3)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5)
    assert all(0 < v < 10 for v in batched)


def test_ood_scores_by_task_name(tiny):
    model, tokenizer = tiny
    records = ood_scores(model, tokenizer, ["chain_sum", "leg_counting"], size=2, max_new_tokens=8,
                         labels={"when": "before"})
    assert [(r["task"], r["metric"]) for r in records] == [
        (t, m) for t in ["chain_sum", "leg_counting"] for m in ["accuracy", "score", "answer_nll"]]
    assert all(r["when"] == "before" and r["n_problems"] == 2 for r in records)


def test_answer_nll_falls_when_the_model_learns_the_answers(rows):
    # a few steps of supervised training on the gold completions must lower the answer NLL: the measure moves
    model, tokenizer = tiny_lm(seed=1)
    before = answer_nll(model, tokenizer, rows)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    texts = [row["prompt"] + "</think><answer>" + row["answer"] for row in rows]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([seq + [tokenizer.pad_token_id] * (width - len(seq)) for seq in encoded])
    attention = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in encoded])
    labels = ids.masked_fill(attention == 0, -100)
    for _ in range(40):
        loss = model(ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert answer_nll(model, tokenizer, rows) < before - 0.5


def test_analysis_tables_from_an_evaluation_rollout(tiny, rows):
    model, tokenizer = tiny
    G = 3
    prompts = [row["prompt"] for row in list(rows)[:2] for _ in range(G)]
    frames = []
    for name in ("hard", "dirichlet", "soft"):
        rollout = generate(model, tokenizer, prompts, make_mixer(name), 10, torch.Generator().manual_seed(0),
                           keep_hidden=True)
        frames.append(step_frame(rollout, group_size=G, model=model, labels={"mixer": name}))
        diversity = pd.DataFrame(diversity_records(rollout, group_size=G, model=model, labels={"mixer": name}))
        assert len(diversity) == 2 * 5  # 2 prompts × 5 metrics
    steps = pd.concat(frames)
    prof = profile(steps, value="entropy", by=["mixer"])
    assert set(prof["mixer"]) == {"hard", "dirichlet", "soft"} and (prof["n"] <= 2 * G).all()
    effective = steps.groupby("mixer")["effective_tokens"].mean()
    assert effective["hard"] == 1.0 and 1.0 < effective["dirichlet"] <= 2.0 and effective["soft"] > 2.0


def test_ood_scores_score_the_answer_after_the_prompt_style_asked_for(tiny):
    from motg.base import build_tokenizer
    from motg.tasks import with_prompts
    model, tokenizer = tiny
    chat_tokenizer = build_tokenizer()  # the tiny model's vocabulary, with a chat template
    chat_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    rows = load_task("cpu/chain_sum", "test", 3, seed=0)
    nll = lambda records: next(r["value"] for r in records if r["metric"] == "answer_nll")
    common = dict(max_new_tokens=2, batch_size=3)
    as_given = ood_scores(model, chat_tokenizer, {"chain_sum": rows}, **common)
    chat = ood_scores(model, chat_tokenizer, {"chain_sum": rows}, prompt_style="auto", **common)
    assert nll(as_given) == pytest.approx(answer_nll(model, tokenizer, rows))
    assert nll(chat) == pytest.approx(answer_nll(model, tokenizer, with_prompts(rows, "chat", chat_tokenizer)))
    assert nll(chat) != pytest.approx(nll(as_given))
    plain = ood_scores(model, tokenizer, {"chain_sum": rows}, prompt_style="auto", **common)  # no template: plain
    assert plain == ood_scores(model, tokenizer, {"chain_sum": rows}, **common)


def test_answer_nll_in_chunks_equals_the_full_logits(tiny, rows):
    """No [B, T, V] tensor: the answer positions' logits, `chunk` at a time, give the full-logits value."""
    model, tokenizer = tiny
    rows = list(rows)
    full = []
    for row in rows:  # by hand, from the full logits of one row at a time
        context = tokenizer(answer_context(row), add_special_tokens=False)["input_ids"]
        target = tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([context + target])).logits[0].float(), -1)
        full.append(-sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(target)) / len(target))
    for chunk in (1, 3, 10**6):
        chunked = answer_nll(model, tokenizer, rows, reduction="none", batch_size=3, chunk=chunk)
        np.testing.assert_allclose(chunked, full, atol=1e-5)
    with pytest.raises(ValueError, match="^chunk:"):
        answer_nll(model, tokenizer, rows, chunk=0)


def test_modes_follow_the_mixer_registry():
    from motg.experiment import EVAL_MODES
    from motg.mixture import MIXERS
    assert MODES == tuple(MIXERS) == EVAL_MODES


def test_problem_ids_are_stable_and_shared_across_prompt_styles(tiny, rows):
    from motg.evaluate import problem_id
    model, tokenizer = tiny
    records = sample_records(model, tokenizer, rows, max_new_tokens=2)
    assert [r["problem_id"] for r in records] == [problem_id(row) for row in rows]
    assert len({r["problem_id"] for r in records}) == len(rows)
    row = dict(list(rows)[0])
    assert problem_id({**row, "prompt": "another style"}) == problem_id(row)
    assert problem_id({**row, "question": row["question"] + " "}) != problem_id(row)


def test_compare_arms_pairs_problems_and_seeds_per_task():
    """Two tasks, two seeds, four problems: the difference per task, never pooled, with the design's CI."""
    from motg.analysis import compare_arms, paired_ci
    rng = np.random.default_rng(0)
    rows = []
    for task, gain in [("a", 0.5), ("b", 0.0)]:
        for seed in (0, 1):
            for problem in range(4):
                before = int(rng.random() < 0.3)
                after = int(rng.random() < 0.3 + gain)
                for when, correct in [("before", before), ("after", after)]:
                    rows.append({"run": f"{task}{seed}", "train_task": task, "train_mixer": "hard", "seed": seed,
                                 "when": when, "inference": "hard", "decoding": "greedy", "problem": f"p{problem}",
                                 "sample": 0, "correct": bool(correct)})
    frame = pd.DataFrame(rows)
    records = {r["train_task"]: r for r in compare_arms(frame, {"when": "after"}, {"when": "before"})}
    for task in ("a", "b"):
        part = frame[frame.train_task == task].pivot_table(index=["seed", "problem"], columns="when", values="correct")
        d = (part["after"] - part["before"]).to_numpy().reshape(2, 4)
        expected = paired_ci(d)
        assert records[task]["estimate"] == pytest.approx(d.mean())
        assert (records[task]["low"], records[task]["high"]) == pytest.approx((expected["low"], expected["high"]))
        assert records[task]["n_seeds"] == 2 and records[task]["n_problems"] == 4


# --- the answer format: Soft Tokens' end of thinking, prefill and boxed answers --------------------------------


def test_soft_tokens_rows_decode_with_the_prefill_and_score_the_boxed_answer():
    """A scripted model ends its thinking with "The final answer is:" and writes "5}.": the answer phase starts
    with the forced ` \\boxed{`, and Math-Verify scores the boxed 5 against the gold 5 (and 4 as wrong)."""
    from test_rollout import byte_bpe_tokenizer, encode, scripted_lm
    bpe = byte_bpe_tokenizer()
    prompts = ["Q: 2 + 3? A:", "Q: 2 + 3 + 0? A:"]
    rows = [{"task": "gsm8k", "question": "2 + 3", "answer": "5", "entry": "{}", "prompt": p} for p in prompts]
    thinking, prefill = encode(bpe, " 2 + 3 = 5. The final answer is:"), encode(bpe, " \\boxed{")
    answers = ["5}.", "4}."]
    scripts = [thinking + [0] * len(prefill) + encode(bpe, a) + [bpe.eos_token_id] for a in answers]  # forced steps: any token
    model = scripted_lm(bpe, prompts, scripts)
    records = sample_records(model, bpe, rows, "hard", greedy=True, max_new_tokens=200, answer_format="soft_tokens")
    assert [r["completion"] for r in records] == [" 2 + 3 = 5. The final answer is: \\boxed{5}.",
                                                  " 2 + 3 = 5. The final answer is: \\boxed{4}."]
    assert [r["correct"] for r in records] == [True, False]
    motg_records = sample_records(model, bpe, rows, "hard", greedy=True, max_new_tokens=200, answer_format="motg")
    assert all("\\boxed{" not in r["completion"][:len(" 2 + 3 = 5. The final answer is: ")]  # no prefill: the
               for r in motg_records)  # script's own tokens follow the text, and MoT-G's tag never came


def test_the_answer_format_follows_the_prompt_style_or_the_rows_prompts(monkeypatch):
    from motg.evaluate import resolve_answer_format
    from motg.tasks import format_prompt
    row = {"task": "gsm8k", "question": "1 + 1?", "answer": "2", "entry": "{}"}
    soft_rows = [{**row, "prompt": format_prompt("1 + 1?", "soft_tokens")}]
    plain_rows = [{**row, "prompt": format_prompt("1 + 1?", "plain")}]
    assert resolve_answer_format(soft_rows) == "soft_tokens" and resolve_answer_format(plain_rows) == "motg"
    assert resolve_answer_format(plain_rows, prompt_style="soft_tokens") == "soft_tokens"
    assert resolve_answer_format(soft_rows, prompt_style="plain") == "motg"
    assert resolve_answer_format(soft_rows, answer_format="motg") == "motg"
    with pytest.raises(ValueError, match="^rows:"):
        resolve_answer_format(soft_rows + plain_rows)
    with pytest.raises(ValueError, match="^answer_format:"):
        resolve_answer_format(plain_rows, answer_format="xml")
    calls = []  # evaluate passes the format's tag, prefills and limits to every generate call
    real = motg.rollout.generate

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(motg.rollout, "generate", recording)
    model, tokenizer = __import__("motg.testing", fromlist=["stand_in"]).stand_in("qwen2.5-1.5b")
    records = evaluate(model, tokenizer, soft_rows, "soft", n_samples=2, ks=(1, 2), max_new_tokens=60,
                       max_think_tokens=3)
    assert len(calls) == 2 and all(c["think_end_text"] == "The final answer is:" and c["answer_prefix"] == " \\boxed{"
                                   and c["max_think_tokens"] == 3 for c in calls)
    assert {r["metric"] for r in records} >= {"pass@1", "pass@2"}


def test_ood_scores_of_soft_tokens_rows_score_the_answer_after_the_box(tiny):
    "Rows in Soft Tokens' template: the NLL context ends with ' The final answer is: \\boxed{', not '</think><answer>'."
    from motg.tasks import format_prompt
    model, tokenizer = tiny
    rows = [{"task": "gsm8k", "question": f"{i} + 1?", "answer": str(i + 1), "entry": "{}",
             "prompt": format_prompt(f"{i} + 1?", "soft_tokens")} for i in range(2)]
    ood = ood_scores(model, tokenizer, {"gsm8k": rows}, max_new_tokens=72)
    nll = next(r["value"] for r in ood if r["metric"] == "answer_nll")
    assert nll == pytest.approx(answer_nll(model, tokenizer, rows, answer_format="soft_tokens"))
    assert nll != pytest.approx(answer_nll(model, tokenizer, rows, answer_format="motg"))
    assert answer_context(rows[0], answer_format="soft_tokens").endswith("Assistant: The final answer is: \\boxed{")
