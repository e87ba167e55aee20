"""Does GRPO training raise held-out accuracy over the warm-started base model? One run per mixer.

    .venv/bin/python tools/learning_grpo.py [--task chain_sum] [--mixers hard dirichlet] [--steps 100]

Each run starts from the same base model (`--model`, by default motg.base's warm-started default), trains
`--steps` steps of the `--preset` recipe with one thinking mixer on one CPU-suite task, and evaluates on the same
held-out test problems before training (step 0) and every `--eval-steps` steps, in the run's own decoding mode:
greedy accuracy (greedy thinking, greedy answer) and sampled accuracy (the mean over `--eval-samples` samples).

Writes <out>/<mixer>-<task>/ (a / in the task name becomes _) (config.json, metrics.jsonl, train_summary.json; the
weights and checkpoints stay on disk but are not meant to be committed) and <out>/summary.{json,md} with provenance.
The default <out> is results/scratch/learning (not committed); committed experiments live in
results/learning/<the question they answer>/, so give that folder as --out.
An existing run folder is resumed (a finished run is not trained again).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from motg.base import DEFAULT_MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cpu/chain_sum", help="a task, suite member (cpu/...) or mix of motg.tasks")
    parser.add_argument("--mixers", nargs="+", default=["hard", "dirichlet"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the preset's")
    parser.add_argument("--prompts-per-step", type=int, default=None, help="default: the preset's")
    parser.add_argument("--num-generations", type=int, default=None, help="default: the preset's")
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixer-params", default="{}",
                        help='JSON object of mixer parameters for every run, e.g. \'{"objective": "motg_paper"}\'')
    parser.add_argument("--out", default=str(ROOT / "results" / "scratch" / "learning"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        mixer_params = json.loads(args.mixer_params)
    except json.JSONDecodeError as error:
        parser.error(f"--mixer-params: not valid JSON ({error}); give an object such as '{{\"k\": 3}}'")
    if not isinstance(mixer_params, dict):
        parser.error(f"--mixer-params: must be a JSON object, got {args.mixer_params!r}")

    from motg.experiment import provenance, relative_to_root, write_json
    from motg.grpo import TrainConfig, train
    out = Path(args.out)
    start = time.time()
    runs = {}
    for mixer in args.mixers:
        overrides = dict(task=args.task, model=args.model, mixer=mixer, steps=args.steps,
                         max_completion_length=args.max_completion_length, eval_size=args.eval_size,
                         eval_steps=args.eval_steps, eval_num_samples=args.eval_samples, save_steps=args.eval_steps,
                         seed=args.seed, progress=True, log_entropy=True, mixer_params=mixer_params)
        for name in ["learning_rate", "prompts_per_step", "num_generations"]:
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        config = TrainConfig.from_preset(args.preset, **overrides)
        run_dir = out / f"{mixer}-{args.task.replace('/', '_')}"
        t0 = time.time()
        train(config, run_dir, resume=run_dir.exists())
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [{k: v for k, v in line.items() if k == "step" or k.startswith("eval_")}
                 for line in lines if any(k.startswith("eval_") for k in line)]
        runs[mixer] = {"run_dir": relative_to_root(run_dir), "config": config.to_dict(), "evals": evals,
                       "base": evals[0], "final": evals[-1], "wall_time_s": time.time() - t0,
                       "final_train_reward": lines[-1].get("reward_mean")}
        print(f"{mixer}: greedy {evals[0]['eval_greedy_accuracy']:.2f} -> {evals[-1]['eval_greedy_accuracy']:.2f}, "
              f"sampled {evals[0].get('eval_sample_accuracy', float('nan')):.3f} -> "
              f"{evals[-1].get('eval_sample_accuracy', float('nan')):.3f}", flush=True)

    record = {"what": "held-out accuracy before (step 0 = the base model) and after GRPO, per thinking mixer",
              "settings": vars(args), "runs": runs,
              "provenance": provenance(vars(args), seeds={"seed": args.seed}, wall_time_s=time.time() - start)}
    write_json(out / "summary.json", record)
    rows = []
    for mixer, run in runs.items():
        b, f = run["base"], run["final"]
        rows.append(f"| {mixer} | {b['eval_greedy_accuracy']:.2f} | {f['eval_greedy_accuracy']:.2f} | "
                    f"{b.get('eval_sample_accuracy', float('nan')):.3f} | "
                    f"{f.get('eval_sample_accuracy', float('nan')):.3f} | {run['wall_time_s'] / 60:.0f} |")
    curve = "\n".join(f"- {mixer}: " + ", ".join(f"step {e['step']}: {e['eval_greedy_accuracy']:.2f} / "
                                                 f"{e.get('eval_sample_accuracy', float('nan')):.3f}"
                                                 for e in run["evals"]) for mixer, run in runs.items())
    prov = record["provenance"]
    (out / "summary.md").write_text(
        f"# Does GRPO learn? `{args.task}`, {args.steps} steps, preset `{args.preset}`\n\n"
        f"Recipe: " + ", ".join(f"{k}={next(iter(runs.values()))['config'][k]}" for k in
                               ["prompts_per_step", "num_generations", "advantage", "loss_type", "beta",
                                "learning_rate", "optimizer", "max_grad_norm", "max_completion_length",
                                "reward_scheme"]) + " (full configs in summary.json).\n\n"
        f"Base model `{args.model}`; {args.eval_size} held-out test problems, evaluated in each run's own decoding "
        f"mode: greedy accuracy (greedy thinking and answer) and sampled accuracy (mean over {args.eval_samples} "
        f"samples per problem). Step 0 is the base model.\n\n"
        f"| mixer | greedy acc. base | greedy acc. after | sampled acc. base | sampled acc. after | minutes |\n"
        f"|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Greedy / sampled accuracy along training:\n\n{curve}\n\n"
        f"Commit {prov['git']['commit']} (dirty: {prov['git']['dirty']}), torch {prov['packages']['torch']}, "
        f"{prov['hardware']['cpu_count']} CPUs shared with other work, {args.threads} thread(s); "
        f"written {prov['written_at']}. Made by `tools/learning_grpo.py`.\n")
    print(f"-> {out / 'summary.md'}")


if __name__ == "__main__":
    main()
