"""Integration tests of motg.grpo: parity with TRL's GRPO loss, training, resume after SIGKILL, two processes,
and the run-folder and error rules. CPU, the tiny-test model, seconds each."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from motg.grpo import TIMING_METRICS, TrainConfig, grpo_loss, train
from motg.mixture import Mixture, make_mixer
from motg.rollout import Rollout, sequence_logps, tokenize_prompts
from motg.testing import tiny_lm

ROOT = Path(__file__).resolve().parent.parent
TASK = "cpu/chain_sum"


def text_reward(completion: str, row: dict) -> float:
    """A stand-in reward for a random model, which never answers a task correctly (so the task's reward is 0 for
    every completion and there is nothing to learn): a deterministic function of the text that differs between
    completions, for every mixer (a Dirichlet rollout of a random model mixes the same two tokens throughout)."""
    return (sum(map(ord, completion)) % 10) / 10


# --- Hard-token parity with TRL 1.16.0 -------------------------------------------------------------------------

def trl_trainer(model_dir: str, tokenizer, **grpo_config):
    "A TRL GRPOTrainer on a saved tiny model (TRL builds its reference model from the path, so it must be on disk)."
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=2, use_cpu=True,
                      report_to=[], save_strategy="no", bf16=False, **grpo_config)
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="]})
    return GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                       train_dataset=dataset, processing_class=tokenizer)


@pytest.fixture(scope="module")
def parity_batch(tmp_path_factory):
    "A fixed batch: 4 prompts of different lengths (left-padded), completions of lengths 7, 4 (EOS), 1 and 6."
    model, tokenizer = tiny_lm(seed=0)
    reference, _ = tiny_lm(seed=1)  # a different reference model, so the KL term is not zero
    model_dir = tmp_path_factory.mktemp("trl_model")
    model.save_pretrained(model_dir)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["12+3=<think>", "7*8<think>", "a<think>", "99-1=<think>"])
    generator = torch.Generator().manual_seed(0)
    T = 7
    completion_ids = torch.randint(10, len(tokenizer), (4, T), generator=generator)
    completion_mask = torch.arange(T) < torch.tensor([[7], [4], [1], [6]])
    completion_ids[1, 3] = tokenizer.eos_token_id
    completion_ids[~completion_mask] = tokenizer.pad_token_id
    noise = 0.5 * torch.randn(4, T, generator=generator)  # makes the batch off-policy, so clipping fires
    return dict(model=model, reference=reference, tokenizer=tokenizer, model_dir=str(model_dir), T=T,
                prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.5, 0.3, -1.2]), noise=noise)


@pytest.mark.parametrize("loss_type,bias_correction,off_policy", [
    ("grpo", False, True), ("grpo", True, False), ("bnpo", True, True), ("dr_grpo", False, True),
    ("dapo", True, True), ("dapo", False, False)])
def test_hard_token_loss_and_gradients_match_trl(parity_batch, loss_type, bias_correction, off_policy):
    b = parity_batch
    T, temperature, beta, epsilon, epsilon_high = b["T"], 0.9, 0.1, 0.2, 0.28
    # TRL: its own trainer, reference model and loss code on the batch
    trainer = trl_trainer(b["model_dir"], b["tokenizer"], beta=beta, loss_type=loss_type, temperature=temperature,
                          epsilon=epsilon, epsilon_high=epsilon_high, max_completion_length=T,
                          use_bias_correction_kl=bias_correction)
    trainer.ref_model.load_state_dict(b["reference"].state_dict())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; one micro-batch here
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attention = torch.cat([b["prompt_mask"], b["completion_mask"]], 1).long()
    with torch.no_grad():
        trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attention, T)
        trl_current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T)
    inputs = dict(prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"].long(), completion_ids=b["completion_ids"],
                  completion_mask=b["completion_mask"].long(), advantages=b["advantages"],
                  num_items_in_batch=b["completion_mask"].sum(), ref_per_token_logps=trl_ref)
    old = trl_current + b["noise"] if off_policy else None
    if old is not None:
        inputs["old_per_token_logps"] = old
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # motg: the same actions as a rollout (the first 3 steps thinking in the hard mixer, the rest answer tokens,
    # both at TRL's temperature), teacher-forced log-probs through the mixer, and grpo_loss
    model = copy.deepcopy(b["model"])
    mixer = make_mixer("hard", temperature=temperature)
    mask = b["completion_mask"]
    rollout = Rollout(b["prompt_ids"], b["prompt_mask"], Mixture.from_tokens(b["completion_ids"]), mask, mask,
                      mask & (torch.arange(T) < 3), torch.zeros(4, T), [""] * 4, mixer, temperature)
    logps = sequence_logps(model, rollout, mixer)
    with torch.no_grad():
        ref = sequence_logps(b["reference"], rollout, mixer)
    assert torch.allclose(ref * mask, trl_ref * mask, atol=1e-5)
    loss, metrics = grpo_loss(logps, old, ref, b["advantages"], mask, beta, epsilon, epsilon_high, loss_type,
                              max_completion_length=T, num_items_in_batch=mask.sum(),
                              use_bias_correction_kl=bias_correction)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) < 1e-5, (loss.item(), trl_loss.item())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, trl_grads[name], atol=1e-5, rtol=0), name
    assert max(p.grad.abs().max() for p in model.parameters()) > 1e-3  # a real gradient, not zeros on both sides
    assert abs(metrics["kl"].item() - trl_metrics["kl"]) < 1e-6
    assert abs(metrics["clip_ratio"].item() - trl_metrics["clip_ratio/region_mean"]) < 1e-6
    assert (metrics["clip_ratio"] > 0) == off_policy  # clipping fires exactly when the batch is off-policy


# --- The trainer ---------------------------------------------------------------------------------------------------

def tiny_config(**overrides) -> TrainConfig:
    "A run of a few seconds: the tiny-test model, 2 prompts × 4 completions of at most 16 tokens."
    base = dict(task=TASK, model="tiny-test", mixer="hard", steps=3, prompts_per_step=2, num_generations=4,
                max_completion_length=16, train_size=16, eval_size=4, eval_steps=0, save_steps=1,
                learning_rate=1e-2, progress=False)
    return TrainConfig(**{**base, **overrides})


def read_metrics(run_dir: Path) -> list[dict]:
    "metrics.jsonl without the timing fields (which differ between any two runs)."
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_METRICS} for line in lines]


def final_state(run_dir: Path) -> dict:
    return torch.load(sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=True)


@pytest.mark.parametrize("mixer", ["hard", "dirichlet"])
def test_training_loss_is_finite_and_parameters_change(tmp_path, mixer):
    from motg.base import load_model
    config = tiny_config(mixer=mixer, beta=0.05, num_iterations=2, gradient_accumulation_steps=2, log_entropy=True)
    summary = train(config, tmp_path / "run", reward_fn=text_reward)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics[1:])
    assert any(m["grad_norm"] > 0 for m in metrics[1:])  # some group had different rewards
    assert all(0 < m["entropy"] <= math.log(len(load_model("tiny-test")[1])) + 1e-4 for m in metrics[1:])
    initial, _ = load_model("tiny-test")
    trained = final_state(tmp_path / "run")["model"]
    changed = [name for name, p in initial.state_dict().items() if not torch.equal(p, trained[name])]
    assert changed, "no parameter changed"
    assert "eval_greedy_accuracy" in summary["final"] and (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("overrides,word", [
    (dict(mixer="nope"), "mixer"), (dict(mixer="soft_thinking"), "mixer"), (dict(steps=0), "steps"),
    (dict(num_generations=1), "num_generations"), (dict(beta=-0.1), "beta"), (dict(epsilon=-0.2), "epsilon"),
    (dict(learning_rate=0.0), "learning_rate"), (dict(loss_type="ppo"), "loss_type"),
    (dict(scale_rewards="always"), "scale_rewards"), (dict(advantage="ppo"), "advantage"),
    (dict(mixed_precision="fp16"), "mixed_precision"), (dict(torch_dtype="int8"), "torch_dtype"),
    (dict(lora_r=8), "lora_r"), (dict(lora_alpha=8, lora_target_modules=["q_proj"]), "lora_alpha, lora_target_modules"),
    (dict(generation_batch_size=3), "generation_batch_size"), (dict(gradient_checkpointing="yes"), "gradient_checkpointing")])
def test_bad_config_raises_before_any_folder_is_created(tmp_path, overrides, word):
    with pytest.raises(ValueError, match=f"^{word}"):
        tiny_config(**overrides)
    config = tiny_config()
    for name, value in overrides.items():  # a field assigned after construction is caught by train itself
        setattr(config, name, value)
    with pytest.raises(ValueError, match=f"^{word}"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_split_over_processes_raises_before_any_folder(tmp_path):
    config = tiny_config(prompts_per_step=1, num_generations=3)
    config.gradient_accumulation_steps = 2  # 3 sequences cannot make 2 micro-batches
    with pytest.raises(ValueError, match="^gradient_accumulation_steps"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_generation_batch_that_does_not_split_into_micro_batches_raises_before_any_folder(tmp_path):
    config = tiny_config(generation_batch_size=2, gradient_accumulation_steps=2)  # micro-batches of 4 sequences
    with pytest.raises(ValueError, match="^generation_batch_size: must divide the 8 sequences per process and be a "
                                         "multiple of the micro-batch"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="^out_dir"):
        train(tiny_config(), run)
    assert (run / "notes.txt").read_text() == "keep me" and sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    train(tiny_config(steps=1), run, overwrite=True)  # only when asked
    assert not (run / "notes.txt").exists() and (run / "metrics.jsonl").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []
    per_step = 2 * 4  # prompts_per_step × num_generations rewards per step

    def reward_broken_at_step_3(completion, row):
        calls.append(1)  # a reward that goes NaN from the third step on (a bug in a user's reward, say)
        return math.nan if len(calls) > 2 * per_step else text_reward(completion, row)

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"^step 3: non-finite loss.*step-000002"):
        train(tiny_config(steps=5), run, reward_fn=reward_broken_at_step_3)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # the last good one, intact
    assert final_state(run)["step"] == 2 and [m["step"] for m in read_metrics(run)] == [0, 1, 2]


# --- Resume after SIGKILL, and two processes: subprocesses -----------------------------------------------------

RUN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)  # the same arithmetic in every run (thread count changes reduction order)
    from motg.grpo import TrainConfig, train

    def text_reward(completion, row):  # a stand-in reward with a signal for a random model, as in test_grpo.py
        return (sum(map(ord, completion)) % 10) / 10

    train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], resume=sys.argv[3] == "resume", reward_fn=text_reward)
""")


def run_script(tmp_path: Path, config: TrainConfig, run_dir: Path, mode: str = "fresh", launcher=(), wait=True):
    script = tmp_path / "run_train.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    command = [*launcher, str(script), json.dumps(config.to_dict()), str(run_dir), mode]
    if not launcher:
        command = [sys.executable, *command]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    return process


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    config = tiny_config(steps=6, beta=0.05, eval_steps=3)
    run_script(tmp_path, config, tmp_path / "straight")

    process = run_script(tmp_path, config, tmp_path / "killed", wait=False)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (checkpoints / "step-000002").exists():  # kill once a checkpoint exists, mid-training
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (checkpoints / "step-000006").exists()  # it really died before the end
    run_script(tmp_path, config, tmp_path / "killed", mode="resume")

    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert straight["step"] == resumed["step"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name  # bitwise
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "killed")


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # The same global batch: 2 prompts × 4 completions, split into 2 micro-batches of 4, either on 2 processes
    # (gloo, one micro-batch each) or on one process accumulating both.
    # The same generation batches (4 sequences each) on both, so both draw the same completions.
    single = tiny_config(steps=3, beta=0.05, gradient_accumulation_steps=2, generation_batch_size=4)
    double = tiny_config(steps=3, beta=0.05, gradient_accumulation_steps=1, generation_batch_size=4)
    run_script(tmp_path, single, tmp_path / "single")
    # `accelerate launch --cpu` starts a single process unless MPI is installed; `--multi_gpu` starts 2 processes
    # through torchrun, and the trainer's Accelerator(cpu=True) then joins them over gloo (MULTI_CPU).
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_script(tmp_path, double, tmp_path / "double", launcher=launcher)

    one, two = final_state(tmp_path / "single"), final_state(tmp_path / "double")
    assert two["num_processes"] == 2
    for name, value in one["model"].items():
        assert torch.allclose(value, two["model"][name], atol=1e-5, rtol=1e-4), name
    for a, b in zip(read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


# --- Prompt format: plain for the character tokenizer, the chat template for a chat model -------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if not loop.last %}<|end|>\n{% endif %}{% endfor %}")  # every character is in the tiny vocabulary


def save_chat_model(folder: Path):
    "The tiny-test model saved with its character tokenizer given a chat template: a chat model, offline."
    model, tokenizer = tiny_lm()
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def record_generate(monkeypatch) -> list[list[str]]:
    "The prompts of every motg.rollout.generate call, in order (train and evaluation import it when called)."
    import motg.rollout
    real, calls = motg.rollout.generate, []

    def generate(model, tokenizer, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(motg.rollout, "generate", generate)
    return calls


@pytest.mark.parametrize("prompt_style", ["auto", "chat"])
def test_a_chat_model_trains_and_is_evaluated_on_its_chat_template(tmp_path, monkeypatch, prompt_style):
    from motg.base import load_tokenizer
    from motg.tasks import SYSTEM_PROMPT, format_prompt, load_task
    save_chat_model(tmp_path / "chat-model")
    tokenizer = load_tokenizer(tmp_path / "chat-model")
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the template survived saving and loading
    calls = record_generate(monkeypatch)
    train(tiny_config(model=str(tmp_path / "chat-model"), prompt_style=prompt_style, steps=1), tmp_path / "run",
          reward_fn=text_reward)
    chat = lambda question: format_prompt(question, "chat", tokenizer)
    train_questions = load_task(TASK, "train", 16, 0)["question"]
    test_prompts = [chat(q) for q in load_task(TASK, "test", 4, 0)["question"]]
    # evaluation before training, the step's rollouts (2 prompts x 4), evaluation after: all chat prompts
    assert calls == [test_prompts, [chat(train_questions[i // 4]) for i in range(8)], test_prompts]
    first = calls[1][0]
    assert first.startswith("<|system|>\n" + SYSTEM_PROMPT) and first.endswith("<|end|>\n<|assistant|>\n<think>")
    ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == first and ids[-1] == tokenizer.convert_tokens_to_ids("<think>")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prompt_style"] == "chat"


def test_plain_prompts_are_the_rows_own_byte_for_byte(tmp_path, monkeypatch):
    from motg.tasks import load_task
    calls = record_generate(monkeypatch)
    train(tiny_config(steps=1), tmp_path / "run", reward_fn=text_reward)  # prompt_style "auto", no chat template
    rows = load_task(TASK, "train", 16, 0)
    assert calls[1] == [rows[i // 4]["prompt"] for i in range(8)]
    assert calls[1][0] == rows[0]["question"] + "\n<think>"
    assert calls[0] == load_task(TASK, "test", 4, 0)["prompt"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prompt_style"] == "plain"


def test_chat_prompts_without_a_chat_template_fail_before_any_work(tmp_path, monkeypatch):
    import motg.base

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(motg.base, "load_model", no_model)
    for model in ["tiny-test", "tiny-1m-warm"]:
        with pytest.raises(ValueError, match=r"^prompt_style: 'chat' needs a model whose tokenizer has a chat"):
            train(tiny_config(model=model, prompt_style="chat"), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"^prompt_style: must be one of \['auto', 'plain', 'chat'"):
        tiny_config(prompt_style="xml")


def test_resume_checks_the_prompt_style_and_reads_older_runs_as_plain(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(steps=1)
    train(config, run, reward_fn=text_reward)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "prompt_style": "chat"}))
    with pytest.raises(ValueError, match=r"^resume: .*prompt_style: 'chat' there, 'plain' now"):
        train(config, run, resume=True)
    del saved["prompt_style"]  # a run written before the setting existed had plain prompts
    (run / "config.json").write_text(json.dumps(saved))
    assert train(config, run, resume=True, reward_fn=text_reward)["out_dir"] == str(run)


# --- Precision, memory, LoRA ----------------------------------------------------------------------------------------

def save_bf16_model(folder: Path) -> Path:
    "The tiny-test model saved in bf16, as the papers' models are on the hub."
    model, tokenizer = tiny_lm()
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mixed_precision", ["auto", "bf16"])
def test_from_a_bf16_checkpoint_two_steps_at_5e_6_change_most_weights(tmp_path, mixed_precision):
    from safetensors.torch import load_file
    folder = save_bf16_model(tmp_path / "bf16-model")
    config = tiny_config(model=str(folder), steps=2, learning_rate=5e-6, eval_size=0, mixed_precision=mixed_precision)
    train(config, tmp_path / "run", reward_fn=text_reward)
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert {v.dtype for v in before.values()} == {torch.bfloat16} and {v.dtype for v in after.values()} == {torch.float32}
    changed = sum((after[k] != before[k].float()).sum().item() for k in before) / sum(v.numel() for v in before.values())
    assert changed >= 0.9, changed
    state = final_state(tmp_path / "run")  # the checkpoint keeps the fp32 master weights and fp32 AdamW moments
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in state["optimizer"]["state"].values())


def test_resume_refuses_a_checkpoint_holding_a_pickled_object(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(steps=1), run, reward_fn=text_reward)
    marker = tmp_path / "code-ran"

    class Trap:  # unpickling it would run code (create `marker`)
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / "train_summary.json").unlink()  # as if killed after the last checkpoint: resuming loads it
    state_file = run / "checkpoints" / "step-000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "note": Trap()}, state_file)
    with pytest.raises(ValueError, match="^checkpoint: .*refusing to unpickle"):
        train(tiny_config(steps=1), run, resume=True, reward_fn=text_reward)
    assert not marker.exists()


def test_gradient_checkpointing_fires_in_training_and_gives_the_same_update(tmp_path, monkeypatch):
    import transformers.modeling_utils
    real, calls = transformers.modeling_utils.checkpoint, []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    states = {}
    for on in [False, True]:
        calls.clear()
        config = tiny_config(steps=1, optimizer="sgd", learning_rate=0.5, beta=0.05, eval_size=0,
                             gradient_accumulation_steps=2, gradient_checkpointing=on)
        train(config, tmp_path / f"run-{on}", reward_fn=text_reward)
        # tiny-test has 2 layers: checkpointed in each of the 2 micro-batches' forward passes, never in rollouts
        assert len(calls) == (2 * 2 if on else 0), (on, len(calls))
        states[on] = final_state(tmp_path / f"run-{on}")["model"]
    initial, _ = tiny_lm()
    assert any(not torch.equal(states[True][k], v) for k, v in initial.state_dict().items())
    for name, value in states[False].items():
        assert torch.allclose(value, states[True][name], atol=1e-6, rtol=1e-5), name


def test_lora_trains_only_the_adapters_and_the_saved_run_loads(tmp_path):
    from peft import PeftModel
    from motg.base import load_model
    config = tiny_config(steps=2, beta=0.05, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         lora_target_modules=["q_proj", "v_proj", "down_proj"], gradient_checkpointing=True)
    summary = train(config, tmp_path / "run", reward_fn=text_reward)
    metrics = read_metrics(tmp_path / "run")
    assert all(math.isfinite(m["loss"]) for m in metrics[1:]) and metrics[-1]["kl"] > 0  # the reference differs
    state = final_state(tmp_path / "run")["model"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)  # the checkpoint: adapters only
    assert any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # B starts at 0: it trained
    base, _ = load_model("tiny-test")
    merged, _ = load_model(str(tmp_path / "run" / "model"))  # the run's model loads as any model
    moved = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in moved)
    adapted = PeftModel.from_pretrained(load_model("tiny-test")[0], tmp_path / "run" / "adapter")
    for name, p in adapted.named_parameters():  # the base weights under the adapters are the initial ones
        if "lora_" not in name:
            assert torch.equal(p, base.state_dict()[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
    assert "eval_greedy_accuracy" in summary["final"]


def test_lora_run_resumes_bitwise(tmp_path):
    import shutil
    config = tiny_config(steps=3, beta=0.05, use_peft=True, lora_r=4, lora_dropout=0.0, save_total_limit=3)
    train(config, tmp_path / "straight", reward_fn=text_reward)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000003")  # as if killed during step 3
    train(config, tmp_path / "resumed", resume=True, reward_fn=text_reward)
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 3 and straight["model"].keys() == resumed["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "resumed")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_one_step_is_the_same_for_every_micro_batch_size(tmp_path, loss_type):
    # All 8 sequences generated in one call; back-propagated in 1, 2 or 4 micro-batches. Plain SGD, so the update
    # is the gradient itself (AdamW's first step would hide its size).
    runs = {}
    for accumulation in [1, 2, 4]:
        config = tiny_config(steps=1, optimizer="sgd", learning_rate=0.5, beta=0.05, loss_type=loss_type,
                             eval_size=0, gradient_accumulation_steps=accumulation)
        train(config, tmp_path / f"run-{accumulation}", reward_fn=text_reward)
        runs[accumulation] = (final_state(tmp_path / f"run-{accumulation}")["model"],
                              read_metrics(tmp_path / f"run-{accumulation}")[-1])
    (one, first), initial = runs[1], tiny_lm()[0].state_dict()
    assert first["grad_norm"] > 0 and any(not torch.equal(one[k], v) for k, v in initial.items())
    for accumulation in [2, 4]:
        state, metrics = runs[accumulation]
        for name, value in one.items():
            assert torch.allclose(value, state[name], atol=1e-6, rtol=1e-5), (accumulation, name)
        for key in ["loss", "grad_norm", "kl", "reward_mean"]:
            assert metrics[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), (accumulation, key)


class LargestVocabTensor(torch.utils._python_dispatch.TorchDispatchMode):
    "Records the shape of every tensor an op returns whose last dimension is the vocabulary."

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.shapes = vocab_size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab_size:
                self.shapes.append(tuple(t.shape))
        return out


def test_no_batch_by_steps_by_vocab_tensor_in_the_loss_or_evaluation():
    from motg.grpo import evaluate_accuracy
    from motg.tasks import load_task
    model, tokenizer = tiny_lm(seed=0)
    V, B, T, chunk = len(tokenizer), 3, 150, 64  # sequence_logps' default chunk: 64 steps
    assert model.config.hidden_size != V
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["12+3=<think>", "7*8<think>", "a<think>"])
    ids = torch.randint(10, V, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.bool)
    mixer = make_mixer("hard")
    rollout = Rollout(prompt_ids, prompt_mask, Mixture.from_tokens(ids), mask, mask, mask & (torch.arange(T) < 100),
                      torch.zeros(B, T), [""] * B, mixer, 1.0)
    with LargestVocabTensor(V) as recorder:
        logps = sequence_logps(model, rollout, mixer)
        loss, _ = grpo_loss(logps, None, logps.detach() - 0.1, torch.randn(B), mask, beta=0.1)
        loss.backward()
    steps_seen = [shape[-2] for shape in recorder.shapes if len(shape) >= 3]
    assert steps_seen and max(steps_seen) <= chunk < T  # logits exist only in chunks of steps
    config = tiny_config(eval_batch_size=4, max_completion_length=100)
    rows = list(load_task(TASK, "test", 4, 0))
    with LargestVocabTensor(V) as recorder:
        evaluate_accuracy(model, tokenizer, rows, mixer, config)
    assert recorder.shapes and all(len(s) == 2 or s[-2] == 1 for s in recorder.shapes)  # one step at a time


# --- Soft Tokens' answer format, its math data sets, σ at resume ------------------------------------------------

def write_gsm8k(folder: Path, n: int = 6) -> dict:
    "GSM8K-layout JSONL files (question, answer ending in '#### n'): {'train': path, 'test': path}."
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        rows = [{"question": f"Ann has {i} pens and buys {i + 2} more. How many pens?",
                 "answer": f"She has {i} + {i + 2} = {2 * i + 2} pens.\n#### {2 * i + 2}"} for i in range(n)]
        paths[split] = str(folder / f"gsm8k-{split}.jsonl")
        Path(paths[split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def test_a_soft_tokens_run_prefills_the_box_and_rewards_the_boxed_answer(tmp_path, monkeypatch):
    """A run in Soft Tokens' format on local GSM8K files with a Qwen2-shaped stand-in: every generate call (rollouts
    and in-loop evaluation) gets its end of thinking and prefills, the 4-token budget forces "The final answer is:
    \\boxed{", and the soft_tokens reward reads the box with Math-Verify (100/10/0 as 1/0.1/0)."""
    import types
    import motg.rollout
    from motg.grpo import step_rewards
    from motg.tasks import load_task
    from motg.testing import save_stand_in
    real, calls = motg.rollout.generate, []

    def generate(*args, **kwargs):
        rollout = real(*args, **kwargs)
        calls.append((kwargs, rollout.text))
        return rollout
    monkeypatch.setattr(motg.rollout, "generate", generate)
    files = write_gsm8k(tmp_path / "data")
    config = tiny_config(model=str(save_stand_in(tmp_path / "qwen", "qwen2.5-1.5b")), task="gsm8k", data_files=files,
                         prompt_style="soft_tokens", reward_scheme="soft_tokens", advantage="rloo",
                         loss_type="sequence_sum", max_completion_length=80, max_think_tokens=4, steps=1,
                         num_generations=2, train_size=4, eval_size=2)
    train(config, tmp_path / "run")
    assert len(calls) == 3  # evaluation, rollouts, evaluation
    for kwargs, texts in calls:
        assert (kwargs["think_end_text"], kwargs["answer_prefix"], kwargs["budget_prefix"], kwargs["max_think_tokens"]) \
            == ("The final answer is:", " \\boxed{", "The final answer is: \\boxed{", 4)
        assert kwargs["max_new_tokens"] < 80  # budget + prefill + 32 answer tokens
        assert all("The final answer is: \\boxed{" in text for text in texts), texts
    step = read_metrics(tmp_path / "run")[1]
    assert step["reward_mean"] == pytest.approx(0.1)  # a random model: a non-empty box, never the right number
    rows = list(load_task("gsm8k", "train", 2, 0, data_files=files))
    setup = types.SimpleNamespace(config=config, accelerator=types.SimpleNamespace(device="cpu", num_processes=1))
    texts = [f"So. The final answer is: \\boxed{{{rows[0]['answer']}}}.", "The final answer is: \\boxed{-1}."]
    rewards, correct = step_rewards(setup, texts, rows)
    assert rewards.tolist() == pytest.approx([1.0, 0.1]) and correct.tolist() == [1.0, 0.0]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_files"] == files


def test_sigma_of_soft_tokens_comes_from_the_base_model_also_after_resume(tmp_path):
    "σ = 0.33·RMS(E) of the base model: fixed when the run is set up, kept in each checkpoint, restored on resume."
    from motg.base import load_model
    from motg.grpo import load_checkpoint, setup_training
    from motg.mixture import noise_scale
    config = tiny_config(mixer="soft", steps=2, save_total_limit=2, eval_size=0, learning_rate=5e-2)
    train(config, tmp_path / "run", reward_fn=text_reward)
    base_sigma = noise_scale(load_model("tiny-test")[0].get_input_embeddings().weight)
    trained_sigma = noise_scale(load_model(str(tmp_path / "run" / "model"))[0].get_input_embeddings().weight)
    assert trained_sigma != pytest.approx(base_sigma, rel=1e-6)  # training moved E: the two readings differ
    assert final_state(tmp_path / "run")["mixer_sigma"] == pytest.approx(base_sigma, rel=1e-6)
    setup = setup_training(config, tmp_path / "run", resume=True)  # as a resumed run: base E first, then the checkpoint
    assert setup.mixer.sigma == pytest.approx(base_sigma, rel=1e-6)
    load_checkpoint(setup, tmp_path / "run" / "checkpoints" / "step-000001")
    assert setup.mixer.sigma == pytest.approx(base_sigma, rel=1e-6)
