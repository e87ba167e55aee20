"""Benchmark the rollout loop: tokens/s of `motg.rollout.generate` with each mixer against `transformers`' own
sampling `generate`, measured side by side in one process (interleaved repetitions, medians).

    .venv/bin/python tools/bench_rollout.py [--preset tiny-5m] [--batch 64] [--new-tokens 128] [--reps 7]

Writes results/bench/rollout.json and results/bench/rollout.md. The reference is
`model.generate(do_sample=True, max_new_tokens=N)` at temperature 1 with no top-k/top-p filtering and EOS disabled,
so it always runs N steps; `generate` runs N steps too unless every sequence has stopped at EOS (the steps it ran
are recorded). Tokens/s counts batch × steps for both. The goal is every mixer at >= 0.95x the reference.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from motg.base import build_model, build_tokenizer  # noqa: E402
from motg.experiment import provenance, write_json  # noqa: E402
from motg.mixture import MIXERS, make_mixer  # noqa: E402
from motg.rollout import generate, tokenize_prompts  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_prompts(batch: int) -> list[str]:
    "Prompts of different lengths (left padding matters), ending where the thinking starts."
    return [f"Question {i}: what is {i} + {7 * i * i + 3}? Think first.<think>" for i in range(batch)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-5m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixer names")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "rollout"))
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each repetition, wait (up to 10 min) until the 1-minute load average is below this")
    args = parser.parse_args(argv)
    for name in ("batch", "new_tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    mixer_names = [m for m in args.mixers.split(",") if m]
    unknown = sorted(set(mixer_names) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; allowed: {sorted(MIXERS)}")

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(args.preset, tokenizer, seed=0)
    prompts = make_prompts(args.batch)
    ids, mask = tokenize_prompts(tokenizer, prompts)
    n = args.new_tokens
    model.generation_config.eos_token_id = None  # the reference runs all n steps
    eos_for_rollout = tokenizer.eos_token_id  # generate still stops at the tokenizer's EOS (if all stop)

    def run_hf(seed: int) -> int:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, top_k=None,
                             top_p=None, temperature=1.0)
        return out.shape[1] - ids.shape[1]

    def run_mixer(name: str):
        def run(seed: int) -> int:
            rollout = generate(model, tokenizer, prompts, make_mixer(name), n, torch.Generator().manual_seed(seed))
            return rollout.mixtures.shape[1]
        return run

    methods = {"transformers": run_hf, **{name: run_mixer(name) for name in mixer_names}}
    for run in methods.values():  # warm-up
        run(0)
    times = {name: [] for name in methods}
    steps = {name: [] for name in methods}
    load_before = os.getloadavg()
    started = time.time()
    waited = 0.0
    for rep in range(args.reps):
        deadline = time.time() + 600
        while args.max_load is not None and os.getloadavg()[0] > args.max_load and time.time() < deadline:
            time.sleep(5)  # the machine is shared: other jobs' threads make every timing meaningless
            waited += 5
        names = list(methods)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order: no method always first
        for name in names:
            t0 = time.perf_counter()
            steps[name].append(methods[name](rep + 1))
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()

    def summary(name: str) -> dict:
        tokens = [args.batch * s for s in steps[name]]
        rates = [t / s for t, s in zip(tokens, times[name])]
        return {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                "tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates),
                "ms_per_step": 1000 * statistics.median(s / st for s, st in zip(times[name], steps[name])),
                "steps": steps[name], "times_s": times[name]}

    reference = summary("transformers")
    results = {"transformers": reference}
    for name in mixer_names:
        result = summary(name)
        result["ratio_vs_transformers"] = result["tokens_per_s"] / reference["tokens_per_s"]
        result["best_ratio_vs_transformers"] = result["best_tokens_per_s"] / reference["best_tokens_per_s"]
        # paired: each repetition against the reference run next to it, robust to load that drifts
        result["paired_ratio_median"] = statistics.median(
            (args.batch * s / t) / (args.batch * rs / rt) for s, t, rs, rt in
            zip(result["steps"], result["times_s"], reference["steps"], reference["times_s"]))
        results[name] = result

    config = {"preset": args.preset, "batch": args.batch, "new_tokens": n, "reps": args.reps,
              "threads": args.threads, "mixers": mixer_names, "prompts": "make_prompts(batch)",
              "reference": "model.generate(do_sample=True, top_k=None, top_p=None, temperature=1.0), EOS disabled",
              "eos_id_for_generate": eos_for_rollout}
    record = {"results": results,
              "provenance": provenance(config=config, seeds={"model": 0, "reps": list(range(1, args.reps + 1))},
                                       wall_time_s=time.time() - started, cpu_model=cpu_model(),
                                       load_average_before=load_before, load_average_after=load_after,
                                       waited_for_quiet_s=waited,
                                       torch_version=torch.__version__)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), record)

    git = record["provenance"]["git"] or {}
    lines = [f"# Rollout speed: `motg.rollout.generate` vs `transformers` `generate`", "",
             f"{args.preset}, {args.batch} prompts × {n} new tokens, sampling, {args.threads} CPU threads, "
             f"{args.reps} interleaved repetitions (order rotated). Goal: every mixer ≥ 0.95× the reference.", "",
             "× transformers: ratio of median tokens/s; paired ×: median over repetitions of the ratio to the "
             "reference run beside it; best ×: ratio of the best repetitions (least disturbed by other jobs).", "",
             "| method | median s | best s | tokens/s (median) | ms/step | × transformers | paired × | best × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| transformers `generate` | {reference['median_s']:.3f} | {reference['min_s']:.3f} | "
             f"{reference['tokens_per_s']:.0f} | {reference['ms_per_step']:.2f} | 1.00 | 1.00 | 1.00 |"]
    for name in mixer_names:
        r = results[name]
        lines.append(f"| `{name}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['ms_per_step']:.2f} | {r['ratio_vs_transformers']:.2f} | {r['paired_ratio_median']:.2f} | "
                     f"{r['best_ratio_vs_transformers']:.2f} |")
    lines += ["", f"Provenance: git {git.get('commit', '?')}{' (dirty)' if git.get('dirty') else ''}, "
              f"torch {torch.__version__}, {cpu_model()}, load average {load_before[0]:.2f} before / "
              f"{load_after[0]:.2f} after (2 cores shared with other jobs), written {record['provenance']['written_at']}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
