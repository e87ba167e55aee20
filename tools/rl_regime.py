"""Does hard-token GRPO raise held-out greedy accuracy from a mixed direct/trace base? Build, measure, train, compare.

    .venv/bin/python tools/rl_regime.py build  [--direct-fraction 0.6] [--steps 400] ...   # the mixed base, cached
    .venv/bin/python tools/rl_regime.py base   [--trace-only]                               # measure a base
    .venv/bin/python tools/rl_regime.py grpo   --task cpu/chain_sum --seed 0 [--steps 100]  # one GRPO run + eval
    .venv/bin/python tools/rl_regime.py report                                              # tables, paired CIs

The base (`motg.base.mixed_start`, the recipe of the model spec `tiny-1m-mixed`): from the default warm start (`load_model(DEFAULT_MODEL)`), `--steps` more SFT steps on
`--n-train` training problems of each task, each written `--copies` times, round(direct_fraction × copies) of them
answering directly (empty thinking: `</think><answer>X</answer>`) and the rest with the full trace: the same
probability for every problem, so there is no per-problem assignment to memorise. `--trace-only` builds the
control: the same steps and data size with every copy carrying the trace.

Every model is evaluated on the same `--n-eval` held-out test problems per task (`load_task(task, "test", n, 0)`,
whatever the training seed): greedy, forced-trace greedy (`</think>` masked at the first thinking step), and
`--samples` samples at temperature 1; a completion "traces" when its thinking block contains `=`.
Per-problem results go to <out>/<model>/problems.csv (the columns of `results/<profile>/data/problems.csv`).
"""
from __future__ import annotations

import argparse
import json
import math
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

OUT = ROOT / "results" / "learning" / "does-grpo-learn-from-a-mixed-direct-trace-base"
TASKS = ["cpu/chain_sum", "cpu/basic_arithmetic"]  # motg.base.MIXED_START_DEFAULTS["tasks"]: tiny-1m-mixed
PROBLEM_COLUMNS = ["run", "train_task", "train_mixer", "seed", "when", "inference", "decoding", "problem", "sample",
                   "correct"]


# ---------------------------------------------------------------- the mixed start: motg.base.mixed_start
def mixed_start(**settings) -> Path:
    "`motg.base.mixed_start` (the `tiny-1m-mixed` recipe with these settings), trained and cached on first use."
    from motg.base import mixed_start as build
    return build(progress=False, **settings)


# ---------------------------------------------------------------- evaluation on fixed problems
def eval_rows(tasks: list[str], n_eval: int) -> dict[str, list[dict]]:
    "The fixed held-out problems: the same for every seed, mixer and model."
    from motg.tasks import load_task
    return {name: list(load_task(name, "test", n_eval, 0)) for name in tasks}


def traces(text: str) -> bool:
    "Whether a completion's thinking block carries a trace (an `=`)."
    return "=" in text.split("</think>")[0]


@torch.no_grad()
def forced_prompts(model, tokenizer, rows: list[dict]) -> tuple[list[dict], list[str]]:
    "Rows whose prompts end with the greedy first thinking token other than `</think>`, and those tokens."
    from motg.rollout import tokenize_prompts
    end = tokenizer.convert_tokens_to_ids("</think>")
    ids, mask = tokenize_prompts(tokenizer, [r["prompt"] for r in rows], torch.device("cpu"))
    logits = model(input_ids=ids, attention_mask=mask,
                   position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
    logits[:, end] = -math.inf
    first = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return [{**r, "prompt": r["prompt"] + t} for r, t in zip(rows, first)], first


def measure(model, tokenizer, rows_by_task: dict[str, list[dict]], samples: int, max_new_tokens: int,
            seed: int = 0) -> tuple[dict, list[dict]]:
    "Greedy, forced-trace greedy and sampled accuracy (and how often each traces) per task; per-problem records."
    from motg.evaluate import sample_records
    summary, problems = {}, []
    for name, rows in rows_by_task.items():
        common = dict(max_new_tokens=max_new_tokens, seed=seed, batch_size=100)
        greedy = sample_records(model, tokenizer, rows, "hard", greedy=True, **common)
        forced_rows, first = forced_prompts(model, tokenizer, rows)
        forced = sample_records(model, tokenizer, forced_rows, "hard", greedy=True, **common)
        for record, token in zip(forced, first):
            record["completion"] = token + record["completion"]
        sampled = sample_records(model, tokenizer, rows, "hard", n_samples=samples, **common) if samples else []
        mean = lambda xs: sum(xs) / max(1, len(xs))
        summary[name] = {"greedy": mean([r["correct"] for r in greedy]),
                         "forced_trace_greedy": mean([r["correct"] for r in forced]),
                         "sampled": mean([r["correct"] for r in sampled]) if sampled else None,
                         "greedy_traces": mean([traces(r["completion"]) for r in greedy]),
                         "forced_traces": mean([traces(r["completion"]) for r in forced]),
                         "samples_trace": mean([traces(r["completion"]) for r in sampled]) if sampled else None,
                         "pass@8": (mean([any(r["correct"] for r in sampled if r["problem"] == p)
                                          for p in range(len(rows))]) if samples >= 8 else None),
                         "n_problems": len(rows)}
        for inference, decoding, records in [("hard", "greedy", greedy), ("forced_trace", "greedy", forced),
                                             ("hard", "sample", sampled)]:
            problems += [{"task": name, "inference": inference, "decoding": decoding, "problem": r["problem"],
                          "sample": r["sample"], "correct": int(r["correct"]), "traces": int(traces(r["completion"]))}
                         for r in records]
    return summary, problems


def write_problems(path: Path, records: list[dict], **labels) -> None:
    import csv
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, PROBLEM_COLUMNS + ["traces"])
        writer.writeheader()
        for r in records:
            row = {**labels, **r, "train_task": labels.get("train_task") or r["task"]}
            writer.writerow({k: row.get(k) for k in PROBLEM_COLUMNS + ["traces"]})


# ---------------------------------------------------------------- commands
def base_settings(args) -> dict:
    return dict(base=args.base, tasks=args.tasks, n_train=args.n_train,
                direct_fraction=0.0 if args.trace_only else args.direct_fraction, copies=args.copies,
                steps=args.sft_steps, learning_rate=args.sft_lr, batch_size=32, seed=0, num_threads=args.sft_threads)


def cmd_build(args) -> Path:
    from motg.experiment import relative_to_root
    t0 = time.time()
    folder = mixed_start(**base_settings(args))
    prov = json.loads((folder / "provenance.json").read_text())
    print(f"{relative_to_root(folder)}: {prov['wall_time_s']:.0f} s wall, {prov['cpu_time_s']:.0f} s CPU, "
          f"load {prov['load_average']} (this call {time.time() - t0:.0f} s)", flush=True)
    return folder


def cmd_base(args) -> dict:
    from motg.base import load_model
    from motg.experiment import provenance, relative_to_root, write_json
    torch.set_num_threads(args.threads)
    name = "trace-only-control" if args.trace_only else ("default-base" if args.default else "mixed-base")
    folder = None if args.default else cmd_build(args)
    model, tokenizer = load_model(args.base if args.default else str(folder), device="cpu")
    t0, c0, l0 = time.time(), time.process_time(), os.getloadavg()[0]
    summary, problems = measure(model, tokenizer, eval_rows(args.tasks, args.n_eval), args.samples,
                                args.max_new_tokens)
    out = Path(args.out) / "bases" / name
    write_problems(out / "problems.csv", problems, run=name, train_mixer="none", seed=0, when="before")
    record = {"model": name, "folder": relative_to_root(folder) if folder else args.base,
              "settings": None if args.default else base_settings(args), "summary": summary,
              "eval_wall_s": time.time() - t0, "eval_cpu_s": time.process_time() - c0,
              "build": (json.loads((folder / "provenance.json").read_text()) | {"train_log": None}) if folder else None,
              "provenance": provenance(vars(args), seeds={"eval_problems_seed": 0}, wall_time_s=time.time() - t0,
                                       load_average={"start": l0, "end": os.getloadavg()[0]})}
    write_json(out / "summary.json", record)
    print(json.dumps({name: summary}, indent=1), flush=True)
    return record


def cmd_grpo(args) -> dict:
    from motg.base import load_model
    from motg.experiment import provenance, relative_to_root, write_json
    from motg.grpo import TrainConfig, train
    torch.set_num_threads(args.threads)
    folder = cmd_build(args)
    config = TrainConfig.from_preset(args.preset, task=args.task, model=str(folder), mixer="hard",
                                     mixer_params=json.loads(args.mixer_params), steps=args.steps,
                                     prompts_per_step=args.prompts, num_generations=args.generations,
                                     learning_rate=args.lr, max_completion_length=args.max_new_tokens,
                                     train_size=args.train_size, eval_size=0, save_steps=0, seed=args.seed,
                                     progress=False)
    name = f"hard-{args.task.split('/')[-1]}-seed{args.seed}"
    run_dir = Path(args.runs) / name
    t0, c0, l0 = time.time(), time.process_time(), os.getloadavg()[0]
    if args.eval_only:  # a finished run whose evaluation failed: its training time is the one it recorded
        trained = json.loads((run_dir / "train_summary.json").read_text())
        train_wall, train_cpu, l1 = trained["provenance"]["wall_time_s"], None, os.getloadavg()[0]
    else:
        train(config, run_dir, resume=run_dir.exists())
        train_wall, train_cpu, l1 = time.time() - t0, time.process_time() - c0, os.getloadavg()[0]
    model, tokenizer = load_model(str(run_dir / "model"), device="cpu")
    summary, problems = measure(model, tokenizer, eval_rows([args.task], args.n_eval), args.samples,
                                args.max_new_tokens)
    out = Path(args.out) / "runs" / name
    write_problems(out / "problems.csv", problems, run=name, train_task=args.task, train_mixer="hard",
                   seed=args.seed, when="after")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{k: line.get(k) for k in ("step", "reward_mean", "accuracy", "frac_reward_zero_std",
                                       "thinking_length", "completion_length")} for line in lines if "reward_mean" in line]
    record = {"run": name, "config": config.to_dict(), "base_folder": relative_to_root(folder), "summary": summary,
              "train_wall_s": train_wall, "train_cpu_s": train_cpu, "load_average": {"start": l0, "end": l1},
              "eval_wall_s": time.time() - t0 - train_wall, "curve": curve,
              "provenance": provenance(vars(args), seeds={"seed": args.seed, "eval_problems_seed": 0},
                                       wall_time_s=time.time() - t0)}
    write_json(out / "summary.json", record)
    (out / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    print(f"{name}: {json.dumps(summary)}; train {train_wall:.0f} s wall / {train_cpu or float('nan'):.0f} s CPU, "
          f"load {l0:.1f}->{l1:.1f}", flush=True)
    return record


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    "Mean and 95% t-interval of paired differences (the t quantile by its Cornish-Fisher expansion, 1e-4 at n=200)."
    n, z = len(diffs), 1.959964
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    v = n - 1
    t = z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
    half = t * sd / n ** 0.5
    return mean, mean - half, mean + half


def cmd_report(args) -> None:
    import pandas as pd
    out = Path(args.out)
    base = pd.read_csv(out / "bases" / "mixed-base" / "problems.csv")
    runs = [pd.read_csv(p) for p in sorted((out / "runs").glob("*/problems.csv"))]
    if not runs:
        print("no runs yet")
        return
    after = pd.concat(runs)
    rows, table = [], []
    for task, group in after.groupby("train_task"):
        before = base[(base.train_task == task) & (base.inference == "hard") & (base.decoding == "greedy")]
        before = before.set_index("problem")["correct"]
        g = group[(group.inference == "hard") & (group.decoding == "greedy")]
        per_seed = g.pivot_table(index="problem", columns="seed", values="correct")
        diffs = per_seed.sub(before, axis=0)
        mean, low, high = paired_ci(diffs.mean(axis=1).tolist())
        seeds = {int(s): paired_ci(diffs[s].tolist()) for s in per_seed.columns}
        summaries = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"hard-{task.split('/')[-1]}-*/summary.json"))]
        minutes = [s["train_wall_s"] / 60 for s in summaries]
        cpu_minutes = [s["train_cpu_s"] / 60 if s["train_cpu_s"] is not None else float("nan") for s in summaries]
        rows.append({"task": task, "problems": len(before), "seeds": sorted(int(s) for s in per_seed.columns),
                     "before": before.mean(), "after": per_seed.mean().mean(), "after_per_seed": per_seed.mean().to_dict(),
                     "difference": mean, "ci95": [low, high], "per_seed_ci95": seeds,
                     "train_minutes": minutes, "train_cpu_minutes": cpu_minutes,
                     "forced_trace_after": [s["summary"][task]["forced_trace_greedy"] for s in summaries],
                     "greedy_traces_after": [s["summary"][task]["greedy_traces"] for s in summaries],
                     "sampled_after": [s["summary"][task]["sampled"] for s in summaries]})
    from motg.experiment import write_json
    write_json(out / "paired_gain.json", rows)
    for r in rows:
        print(json.dumps(r, default=str))
    (out / "paired_gain.md").write_text(markdown(out, rows))


def markdown(out: Path, rows: list[dict]) -> str:
    "The tables of the README: the bases before RL, and the paired gains of GRPO."
    bases = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "bases").glob("*/summary.json"))}
    f = lambda x: "–" if x is None else f"{x:.3f}"
    lines = ["| base model | task | greedy | forced-trace greedy | forced − greedy | greedy traces | sampled | samples trace |",
             "|---|---|---|---|---|---|---|---|"]
    for name, base in bases.items():
        for task, s in base["summary"].items():
            lines.append(f"| {name} | {task} | {f(s['greedy'])} | {f(s['forced_trace_greedy'])} | "
                         f"{f(s['forced_trace_greedy'] - s['greedy'])} | {f(s['greedy_traces'])} | {f(s['sampled'])} | "
                         f"{f(s['samples_trace'])} |")
    lines += ["", "| task | problems | seeds | greedy before | greedy after (per seed) | paired difference | 95% CI | "
              "per-seed 95% CIs | forced-trace greedy after | greedy traces after | minutes per run (wall / CPU) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{v:.3f}" for v in r["after_per_seed"].values())
        cis = "; ".join(f"seed {s}: [{c[1]:+.3f}, {c[2]:+.3f}]" for s, c in r["per_seed_ci95"].items())
        minutes = ", ".join(f"{w:.1f} / {c:.1f}" for w, c in zip(r["train_minutes"], r["train_cpu_minutes"]))
        lines.append(f"| {r['task']} | {r['problems']} | {r['seeds']} | {r['before']:.3f} | {r['after']:.3f} ({per_seed}) | "
                     f"**{r['difference']:+.3f}** | [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {cis} | "
                     f"{', '.join(f(x) for x in r['forced_trace_after'])} | "
                     f"{', '.join(f(x) for x in r['greedy_traces_after'])} | {minutes} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "base", "grpo", "report"])
    parser.add_argument("--base", default="tiny-1m-warm")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--direct-fraction", type=float, default=0.6)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--trace-only", action="store_true", help="the control: direct_fraction 0")
    parser.add_argument("--eval-only", action="store_true", help="grpo: evaluate a finished run without training")
    parser.add_argument("--default", action="store_true", help="base: measure the default base itself")
    parser.add_argument("--task", default="cpu/chain_sum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--mixer-params", default="{}")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of GRPO and evaluation")
    parser.add_argument("--sft-threads", type=int, default=2, help="threads of the SFT stage (in the model's cache key)")
    parser.add_argument("--runs", default=str(ROOT / "data" / "rl_regime_runs"), help="GRPO run folders (weights)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    {"build": cmd_build, "base": cmd_base, "grpo": cmd_grpo, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
