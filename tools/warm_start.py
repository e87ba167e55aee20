"""Build the project's default base model (the supervised warm start) and measure it: results/base/.

    .venv/bin/python tools/warm_start.py [--preset tiny-1m] [--steps N] [--n-train N] [--learning-rate LR]
                                         [--batch-size B] [--seed S] [--n-eval 100] [--threads 2] [--out results/base]

Defaults are `motg.base.WARM_START_DEFAULTS` and the preset of `motg.base.DEFAULT_MODEL`, so a plain run builds
(or finds in the cache, data/models/) exactly the model `load_model(DEFAULT_MODEL)` loads. It then decodes
`--n-eval` held-out problems per task (`load_task(name, "test", ...)`) greedily with the project's rollout engine
(`motg.evaluate.sample_records`, hard tokens, greedy thinking and answer) and scores them with `motg.tasks.score`.

Writes to --out: warm_start.json (settings, model folder, warm-start wall time, per-task accuracy and score,
the CPU load seen, provenance), warm_start.md (the same as a table), samples.jsonl (every greedy completion),
and figures/warm_start_loss.png, figures/warm_start_accuracy.png. The warm start's wall time is the training
time recorded when the model was built; a cached model's run reports that time, not a new one.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from motg.base import (DEFAULT_MODEL, WARM_SUFFIX, WARM_START_DEFAULTS, _short, _task_names,  # noqa: E402
                       load_model, torch_threads, warm_start)

TARGET = (0.10, 0.90)  # every task's greedy accuracy should lie in this band: learnt, with room for RL


def parse_args(argv=None) -> argparse.Namespace:
    d = WARM_START_DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_MODEL[: -len(WARM_SUFFIX)])
    parser.add_argument("--tasks", default=d["tasks"], help="a suite name or comma-separated task names")
    parser.add_argument("--n-train", type=int, default=d["n_train"], help="training problems per task")
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                        default=d.get("group_by_length", False), help="batches of similar length (less padding)")
    parser.add_argument("--difficulty", type=json.loads, default=d.get("difficulty"),
                        help='overrides of the suite\'s settings, JSON: {"chain_sum": {"max_terms": 2}}')
    parser.add_argument("--n-eval", type=int, default=100, help="held-out problems per task")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="decoding budget; 0: 1.5 × the longest gold completion of the held-out set + 16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/base")
    parser.add_argument("--force", action="store_true", help="retrain even if the cache has this model")
    return parser.parse_args(argv)


def settings_of(args) -> dict:
    "The warm_start keyword arguments of a command line."
    tasks = args.tasks if "," not in args.tasks else args.tasks.split(",")
    settings = dict(tasks=tasks, n_train=args.n_train, steps=args.steps, learning_rate=args.learning_rate,
                    batch_size=args.batch_size, seed=args.seed)
    return settings | ({"difficulty": args.difficulty} if args.difficulty else {}) \
        | ({"group_by_length": True} if args.group_by_length else {})  # warm_start's defaults stay implicit


def evaluate_greedy(model, tokenizer, task_names: list[str], n_eval: int, seed: int, max_new_tokens: int,
                    difficulty: dict | None = None):
    "Greedy completions of `n_eval` held-out problems per task: (records, accuracy, mean score, budget used)."
    from motg.evaluate import sample_records
    from motg.tasks import load_task
    difficulty = difficulty or {}
    rows = [row for name in task_names
            for row in load_task(name, "test", n_eval, seed, **difficulty.get(_short(name), {}))]
    task_names = [_short(name) for name in task_names]
    if not max_new_tokens:
        longest = max(len(tokenizer(row["completion"])["input_ids"]) for row in rows)
        max_new_tokens = int(1.5 * longest) + 16
    records = sample_records(model, tokenizer, rows, "hard", n_samples=1, greedy=True, answer="greedy",
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=100)
    for record, row in zip(records, rows):
        record |= {"question": row["question"], "gold": row["answer"]}
    accuracy = {name: sum(r["correct"] for r in records if r["task"] == name) / n_eval for name in task_names}
    score = {name: sum(r["score"] for r in records if r["task"] == name) / n_eval for name in task_names}
    return records, accuracy, score, max_new_tokens


def plot(summary: dict, train_log: list[dict], figures: Path) -> list[str]:
    "The training-loss curve and the per-task accuracy bars, as PNG files; returns their paths."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in train_log if "loss" in h]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [h["loss"] for h in train_log if "loss" in h])
    ax.set(xlabel="SFT step", ylabel="completion loss (nats/token)", yscale="log",
           title=f"Warm start of {summary['preset']}")
    fig.tight_layout()
    loss_path = figures / "warm_start_loss.png"
    fig.savefig(loss_path, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(summary["accuracy"])
    ax.bar(names, [summary["accuracy"][n] for n in names], color="tab:blue", label="accuracy (exact)")
    ax.scatter(names, [summary["score"][n] for n in names], color="black", zorder=3, label="mean score")
    for bound in TARGET:
        ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
    ax.set(ylim=(0, 1), ylabel="held-out greedy accuracy",
           title=f"{summary['spec']}: {summary['n_eval']} problems per task")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8)
    fig.tight_layout()
    accuracy_path = figures / "warm_start_accuracy.png"
    fig.savefig(accuracy_path, dpi=120)
    plt.close(fig)
    return [str(loss_path.relative_to(ROOT)) if loss_path.is_relative_to(ROOT) else str(loss_path),
            str(accuracy_path.relative_to(ROOT)) if accuracy_path.is_relative_to(ROOT) else str(accuracy_path)]


def load_text(load: dict | None) -> str:
    "The machine's 1-minute load average at the start and end of training, as words."
    if not load:
        return "not recorded"
    return f"{load['start']:.1f} at the start, {load['end']:.1f} at the end (1-minute averages, 2 cores)"


def markdown(summary: dict) -> str:
    "The summary as a short markdown report."
    lines = [f"# Warm start: `{summary['spec']}`", "",
             f"Preset `{summary['preset']}` ({summary['parameters']:,} parameters), fine-tuned with TRL's SFTTrainer "
             f"on {summary['settings']['n_train']} problems per task ({summary['epochs']:.2f} epochs), "
             f"settings `{json.dumps(summary['settings'])}`.", "",
             f"- warm-start wall time: **{summary['warm_start_wall_time_s']:.0f} s** on {summary['threads']} CPU "
             f"threads (load average while training: {summary['load_while_training']}); "
             f"the machine is shared, so this is an upper bound of the quiet-machine time; "
             f"CPU time of the training process: {summary['warm_start_cpu_time_s'] or float('nan'):.0f} s",
             f"- final training loss (completion tokens): {summary['final_train_loss']:.3f}",
             f"- evaluation: greedy, {summary['n_eval']} held-out problems per task, at most "
             f"{summary['max_new_tokens']} new tokens, {summary['eval_wall_time_s']:.0f} s", "",
             "| task | accuracy | mean score | in [10%, 90%] |", "|---|---|---|---|"]
    for name, accuracy in summary["accuracy"].items():
        inside = TARGET[0] <= accuracy <= TARGET[1]
        lines.append(f"| {name} | {accuracy:.2f} | {summary['score'][name]:.2f} | {'yes' if inside else 'NO'} |")
    lines += ["", f"Model folder: `{summary['model_folder']}` (data/ is not committed; `load_model"
              f"({summary['spec']!r})` rebuilds it). Written by `tools/warm_start.py` at "
              f"{summary['provenance']['written_at']}, git {summary['provenance']['git']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from motg.experiment import provenance, write_json
    out = Path(args.out)
    out = out if out.is_absolute() else ROOT / out
    settings = settings_of(args)
    spec = f"{args.preset}{WARM_SUFFIX}"
    is_default = args.preset == DEFAULT_MODEL[: -len(WARM_SUFFIX)] and settings == WARM_START_DEFAULTS
    start = time.time()
    folder = warm_start(args.preset, **settings, num_threads=args.threads, force=args.force)
    build_time = time.time() - start
    cache_hit = (folder / "provenance.json").stat().st_mtime < start  # written by an earlier run
    built = json.loads((folder / "provenance.json").read_text())
    model, tokenizer = load_model(str(folder), device="cpu")
    start = time.time()
    with torch_threads(args.threads):
        records, accuracy, score, max_new_tokens = evaluate_greedy(model, tokenizer, _task_names(settings["tasks"]),
                                                                   args.n_eval, args.seed, args.max_new_tokens,
                                                                   args.difficulty)
    eval_time = time.time() - start
    train_losses = [h["loss"] for h in built["train_log"] if "loss" in h]
    summary = {
        "spec": spec if is_default else f"warm_start({args.preset!r}, **settings)",
        "is_default_model": is_default, "preset": args.preset, "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "warm_start_wall_time_s": built["wall_time_s"], "warm_start_cpu_time_s": built.get("cpu_time_s"),
        "cache_hit": cache_hit,
        "threads": built.get("num_threads"), "eval_threads": args.threads, "epochs": built["epochs"],
        "final_train_loss": train_losses[-1],
        "load_while_training": load_text(built.get("load_average")),
        "n_eval": args.n_eval, "max_new_tokens": max_new_tokens, "eval_wall_time_s": eval_time,
        "accuracy": accuracy, "score": score,
        "accuracy_in_target": {name: TARGET[0] <= a <= TARGET[1] for name, a in accuracy.items()},
        "mean_completion_tokens": {name: sum(r["completion_tokens"] for r in records if r["task"] == name)
                                   / args.n_eval for name in accuracy},
        "warm_start_provenance": {k: built[k] for k in ("git", "packages", "hardware", "written_at")},
    }
    summary["provenance"] = provenance(config={"argv": sys.argv[1:] if argv is None else argv, **vars(args)},
                                       seeds={"seed": args.seed}, wall_time_s=build_time + eval_time)
    summary["figures"] = plot(summary, built["train_log"], out / "figures")
    write_json(out / "warm_start.json", summary)
    (out / "warm_start.md").write_text(markdown(summary))
    with open(out / "samples.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
