"""Step time of motg's GRPO trainer against TRL's GRPOTrainer, hard tokens, same model, batch and settings.

    .venv/bin/python tools/bench_grpo.py [--model tiny-1m] [--steps 6] [--rounds 2] [--threads 2]

Both trainers start from the same randomly initialised model of a `motg.base` preset, take the same prompts (the
task's own), roll out `prompts_per_step × num_generations` completions of at most `max_completion_length` tokens
at temperature 1, and do one on-policy update with the same loss (`dapo`, β = 0, AdamW, the same learning rate).
A step is timed from its start to the end of its optimizer step (rollouts, rewards, loss, backward, update),
without evaluation or checkpoints. The first step of each run is a warm-up and is dropped; the two trainers run
alternately for `--rounds` rounds so that a shared, drifting CPU load hits both alike. Tokens per second are
reported beside the step time because a random model's completions end (at EOS) at random lengths.

Four configurations: motg as configured by default (`log_entropy=False`), motg logging the rollouts' entropy
(TRL always computes the entropy, in its loss pass), TRL with its default gradient checkpointing, and TRL without
it. The ratio compares motg's default with the faster TRL configuration.

Writes results/bench/grpo.json (every step time, medians, the ratio, provenance) and results/bench/grpo.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reward_of(text: str) -> float:
    "A cheap reward both trainers use: the fraction of digits (varies across completions, so advantages are not 0)."
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def run_motg(args, work: Path, log_entropy: bool) -> dict:
    from motg.grpo import TrainConfig, train
    config = TrainConfig(task=args.task, model=args.model, mixer="hard", steps=args.steps,
                         prompts_per_step=args.prompts, num_generations=args.generations,
                         max_completion_length=args.max_completion_length, loss_type="dapo", beta=0.0,
                         learning_rate=1e-5, eval_size=0, save_steps=0, progress=False, seed=args.seed,
                         train_size=args.prompts * args.steps, log_entropy=log_entropy)
    out = work / f"motg-{time.time_ns()}"
    train(config, out, reward_fn=lambda completion, row: reward_of(completion))
    import json
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["step"] > 0]
    return {"step_time": [s["step_time"] for s in steps],
            "tokens": [s["completion_length"] * args.prompts * args.generations for s in steps]}


def run_trl(args, work: Path, gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from motg.base import load_model
    from motg.tasks import load_task

    model, tokenizer = load_model(args.model)
    model_dir = work / f"trl-model-{time.time_ns()}"
    model.save_pretrained(model_dir)  # TRL builds its reference model from a path
    rows = load_task(args.task, "train", args.prompts * args.steps, args.seed)
    dataset = Dataset.from_dict({"prompt": [row["prompt"] for row in rows]})

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.start = [], [], None

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    config = GRPOConfig(output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=args.prompts *
                        args.generations, num_generations=args.generations, gradient_accumulation_steps=1,
                        max_completion_length=args.max_completion_length, temperature=1.0, loss_type="dapo",
                        beta=0.0, learning_rate=1e-5, max_steps=args.steps, use_cpu=True, bf16=False,
                        report_to=[], save_strategy="no", logging_steps=1, seed=args.seed,
                        gradient_checkpointing=gradient_checkpointing, disable_tqdm=True, shuffle_dataset=False)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **_: [reward_of(c) for c in
                                                                                      completions],
                          args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step log lines are not part of the step
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return {"step_time": timer.times, "tokens": [n * args.prompts * args.generations for n in lengths]}


def summarise(runs: list[dict]) -> dict:
    times = [t for run in runs for t in run["step_time"][1:]]  # the first step of each run is a warm-up
    tokens = [n for run in runs for n in run["tokens"][1:]]
    return {"median_step_time_s": statistics.median(times), "mean_step_time_s": statistics.fmean(times),
            "tokens_per_step": statistics.fmean(tokens), "tokens_per_s": sum(tokens) / sum(times),
            "step_times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-1m")
    parser.add_argument("--task", default=None, help="a motg.tasks task (default: the first CPU-suite task)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable on a shared machine, where 2+ threads can spin for minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.task is None:
        from motg.tasks import CPU_SUITE
        args.task = CPU_SUITE[0]

    from motg.experiment import provenance, write_json
    start = time.time()
    results = {"motg": [], "motg_with_entropy": [], "trl": [], "trl_no_checkpointing": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for round_ in range(args.rounds):
            results["motg"].append(run_motg(args, work, log_entropy=False))
            results["motg_with_entropy"].append(run_motg(args, work, log_entropy=True))
            results["trl"].append(run_trl(args, work, gradient_checkpointing=True))
            results["trl_no_checkpointing"].append(run_trl(args, work, gradient_checkpointing=False))
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{name} {statistics.median(runs[-1]['step_time'][1:]):.3f}s" for name, runs in results.items()))
    summary = {name: summarise(runs) for name, runs in results.items()}
    best_trl = min(summary["trl"]["median_step_time_s"], summary["trl_no_checkpointing"]["median_step_time_s"])
    ratio = summary["motg"]["median_step_time_s"] / best_trl
    best_trl_rate = max(summary["trl"]["tokens_per_s"], summary["trl_no_checkpointing"]["tokens_per_s"])
    ratio_per_token = best_trl_rate / summary["motg"]["tokens_per_s"]  # time per completion token, motg / TRL
    ratio_vs_default = summary["motg"]["median_step_time_s"] / summary["trl"]["median_step_time_s"]
    record = {"what": "GRPO step time, motg vs TRL GRPOTrainer, hard tokens, same model/batch/loss",
              "settings": vars(args), "summary": summary,
              "ratio_motg_over_trl": ratio, "ratio_definition": "median motg step time / median step time of the "
              "faster TRL configuration (TRL's default gradient checkpointing on, or off)", "goal": "<= 1.0",
              "ratio_per_token": ratio_per_token, "ratio_per_token_definition": "time per completion token, motg / "
              "the faster TRL configuration (step times depend on the random completion lengths)",
              "ratio_vs_trl_defaults": ratio_vs_default,
              "provenance": provenance(vars(args), seeds={"seed": args.seed}, wall_time_s=time.time() - start)}
    out = Path(args.out)
    write_json(out / "grpo.json", record)
    rows = "\n".join(f"| {name} | {s['median_step_time_s']:.3f} | {s['tokens_per_step']:.0f} | {s['tokens_per_s']:.0f} |"
                     for name, s in summary.items())
    prov = record["provenance"]
    (out / "grpo.md").write_text(
        f"# GRPO step time: motg vs TRL {prov['packages']['trl']}\n\n"
        f"Model `{args.model}`, task `{args.task}`, {args.prompts} prompts × {args.generations} completions of at "
        f"most {args.max_completion_length} tokens, hard tokens at temperature 1, loss `dapo`, β = 0, one update "
        f"per step; {args.steps} steps × {args.rounds} rounds, the first step of each run dropped; "
        f"{args.threads} CPU threads.\n\n"
        f"`motg_with_entropy` logs the rollouts' next-token entropy (`log_entropy=True`); TRL computes its entropy "
        f"in the loss pass in both of its rows; `trl_no_checkpointing` turns TRL's default gradient checkpointing "
        f"off.\n\n"
        f"| trainer | median step time (s) | completion tokens per step | tokens/s |\n|---|---|---|---|\n{rows}\n\n"
        f"**Ratio motg / TRL (faster configuration): {ratio:.2f}× in step time** (goal ≤ 1.0×); "
        f"{ratio_per_token:.2f}× in time per completion token (completions end at EOS at random lengths, so the two "
        f"trainers do not generate the same number of tokens); {ratio_vs_default:.2f}× against TRL's defaults "
        f"(gradient checkpointing on).\n\n"
        f"Commit {prov['git']['commit']} (dirty: {prov['git']['dirty']}), torch {prov['packages']['torch']}, "
        f"transformers {prov['packages']['transformers']}, {prov['hardware']['platform']}, "
        f"{prov['hardware']['cpu_count']} CPUs; written {prov['written_at']}. Made by `tools/bench_grpo.py`.\n")
    print(f"motg / TRL: {ratio:.2f}x step time, {ratio_per_token:.2f}x per token, {ratio_vs_default:.2f}x vs TRL "
          f"defaults  ->  {out / 'grpo.md'}")


if __name__ == "__main__":
    main()
