"""Benchmark the rollout loop: tokens/s of `motg.rollout.generate` with each mixer against `transformers`' own
sampling `generate`, measured side by side in one process (interleaved repetitions, order rotated, paired ratios).

    .venv/bin/python tools/bench_rollout.py --model tiny-1m [--batch 64] [--new-tokens 128] [--reps 5]
    .venv/bin/python tools/bench_rollout.py --model smollm2-135m --batch 8 --new-tokens 32 --reps 3
    add --compile to decode with generate(..., compile=True) (compiled during the warm-up, not timed)

Writes results/bench/rollout_<model>.json and rebuilds results/bench/rollout.md from every such file. Both sides
sample at temperature 1 with no top-k/top-p and stop a row at EOS (`transformers` keeps computing finished rows
until all have ended; `generate` drops them from its KV cache); tokens/s counts the tokens of each row up to and
including its EOS (or all `--new-tokens`), so both are credited for the same kind of work. `generate` thinks in
the mixer's mixture tokens until `</think>` (which the prompts leave open) and answers with ordinary tokens.
The goal (issue 12) is every mixer at >= 1.5x the reference.

With `--op-profile`, the tool instead profiles the decode step both sides run (the model's forward over one new
token with a KV cache, batch `--batch`, after a prompt) and writes results/bench/decode_profile_<model>.json: the
share of each operator in its time, and the bound this puts on any rollout loop that computes the same logits:
the matrix products with the weights (aten::mm, addmm, bmm) cannot be skipped, so no loop is faster than
total ÷ their time per step.

Two readings. Tokens/s credits each method with the tokens its rows wrote: for `hard` (the same distribution as
the reference) that is the user's speed-up; for a mixer it also moves with how long its rows run (a mixture changes
where EOS comes), so it is not a speed of the loop alone. Milliseconds per decode step (wall time / the longest
row's length: one forward per step on both sides) is the loop's own cost at this batch; its ratio to the
reference says how much the mixture step and the loop add or save per step.
"""
from __future__ import annotations

import argparse
import json
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

from motg.base import load_model  # noqa: E402
from motg.experiment import provenance, write_json  # noqa: E402
from motg.mixture import MIXERS, make_mixer  # noqa: E402
from motg.rollout import eos_token_ids, generate, tokenize_prompts  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_prompts(batch: int, chat: bool) -> list[str]:
    "Prompts of different lengths (left padding matters), ending where the thinking starts."
    questions = [f"Question {i}: what is {i} + {7 * i * i + 3}? Think first." for i in range(batch)]
    if chat:  # SmolLM2-Instruct's ChatML turn, opened for the assistant, thinking
        return [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>" for q in questions]
    return [f"{q}<think>" for q in questions]


def tokens_until_eos(new_tokens: torch.Tensor, eos: list[int]) -> int:
    "Tokens `[B, n]` each row wrote up to and including its first EOS (all n if none)."
    hit = torch.isin(new_tokens, torch.tensor(eos))
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], new_tokens.shape[1],
                                                                                 dtype=torch.long))
    return int(first.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "--preset", default="tiny-1m", help="a motg.base preset or smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="generate(..., compile=True)")
    parser.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated mixer names")
    parser.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--op-profile", action="store_true",
                        help="profile the decode step by operator instead (decode_profile_<model>.json)")
    args = parser.parse_args(argv)
    for name in ("batch", "new_tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    mixer_names = [m for m in args.mixers.split(",") if m]
    unknown = sorted(set(mixer_names) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {unknown}; allowed: {sorted(MIXERS)}")

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    prompts = make_prompts(args.batch, chat=args.model.startswith("smollm2"))
    ids, mask = tokenize_prompts(tokenizer, prompts)
    n = args.new_tokens
    eos = eos_token_ids(tokenizer, model)
    if args.op_profile:
        return profile_decode_step(model, ids, mask, args, argv)

    def run_hf(seed: int) -> tuple[int, int]:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=n, top_k=None,
                             top_p=None, temperature=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        return tokens_until_eos(out[:, ids.shape[1]:], eos), out.shape[1] - ids.shape[1]  # (tokens, decode steps)

    def run_mixer(name: str):
        def run(seed: int) -> tuple[int, int]:
            rollout = generate(model, tokenizer, prompts, make_mixer(name), n, torch.Generator().manual_seed(seed),
                               compile=args.compile)
            return int(rollout.sequence_mask.sum()), int(rollout.sequence_mask.sum(1).max())
        return run

    methods = {"transformers": run_hf, **{name: run_mixer(name) for name in mixer_names}}
    warm = time.time()
    for run in methods.values():  # warm-up (and compilation, with --compile)
        run(0)
    warm_up_s = time.time() - warm
    times = {name: [] for name in methods}
    tokens = {name: [] for name in methods}
    steps = {name: [] for name in methods}
    load_before = os.getloadavg()
    started = time.time()
    loads = []
    config = {"model": args.model, "batch": args.batch, "new_tokens": n, "reps": args.reps,
              "threads": args.threads, "compile": args.compile, "mixers": mixer_names,
              "prompts": f"make_prompts(batch, chat={args.model.startswith('smollm2')})",
              "reference": "model.generate(do_sample=True, top_k=None, top_p=None, temperature=1.0), stops at EOS"}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_compiled" if args.compile else ""
    record = {}
    for rep in range(args.reps):
        names = list(methods)
        names = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order: no method always first
        loads.append(os.getloadavg()[0])
        for name in names:
            t0 = time.perf_counter()
            done_tokens, done_steps = methods[name](rep + 1)
            tokens[name].append(done_tokens)
            steps[name].append(done_steps)
            times[name].append(time.perf_counter() - t0)
        # written after every repetition: a bench starved or stopped part way still leaves its numbers
        record = {"results": summarise(tokens, times, steps, mixer_names),
                  "provenance": provenance(config=config, seeds={"model": 0, "reps": list(range(1, rep + 2))},
                                           wall_time_s=time.time() - started, warm_up_s=warm_up_s,
                                           cpu_model=cpu_model(), reps_done=rep + 1,
                                           load_average_before=load_before, load_average_after=os.getloadavg(),
                                           load_average_per_rep=loads, torch_version=torch.__version__,
                                           command="python tools/bench_rollout.py " + " ".join(argv or sys.argv[1:]))}
        write_json(out_dir / f"rollout_{args.model}{suffix}.json", record)
        (out_dir / "rollout.md").write_text(render(out_dir))
        print(f"repetition {rep + 1}/{args.reps} written", flush=True)
    print(render(out_dir))
    return record


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")  # the products with the weights: every loop runs them


def profile_decode_step(model, ids: torch.Tensor, mask: torch.Tensor, args, argv) -> dict:
    "Operator shares of `--new-tokens` decode steps of `model` after the prompts; writes decode_profile_<model>.json."
    from torch.profiler import ProfilerActivity, profile
    started = time.time()

    def decode(steps: int):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache, step_mask, token = out.past_key_values, mask, out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
                out = model(input_ids=token, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    decode(4)  # warm-up
    t0 = time.perf_counter()
    decode(0)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(args.new_tokens)
    per_step_ms = 1000 * (time.perf_counter() - t0 - prefill_s) / args.new_tokens
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode(args.new_tokens)
    ops = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda x: -x[1])
    total = sum(t for _, t in ops)
    shares = {name: t / total for name, t in ops}
    matmul = sum(shares.get(name, 0.0) for name in MATMULS)
    record = {"results": {"ms_per_decode_step": per_step_ms, "op_shares": dict(list(shares.items())[:12]),
                          "matmul_share": matmul, "loop_speedup_bound": 1 / matmul if matmul else None},
              "provenance": provenance(config={"model": args.model, "batch": args.batch, "steps": args.new_tokens,
                                               "threads": args.threads},
                                       seeds={}, wall_time_s=time.time() - started, cpu_model=cpu_model(),
                                       load_average=os.getloadavg(), torch_version=torch.__version__,
                                       command="python tools/bench_rollout.py " + " ".join(argv or sys.argv[1:]))}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"decode_profile_{args.model}.json", record)
    (out_dir / "rollout.md").write_text(render(out_dir))
    print(render(out_dir))
    return record


def render_profiles(out_dir: Path) -> list[str]:
    "The decode-step profiles' section of rollout.md."
    paths = sorted(out_dir.glob("decode_profile_*.json"))
    if not paths:
        return []
    lines = ["## Where a decode step's time goes (`--op-profile`)", "",
             "The model's forward over one new token with a KV cache, as both `transformers` and motg run it, by "
             "operator (self CPU time). The products with the weights (aten::mm, addmm, bmm) are work any loop "
             "computing the same logits must do, so 1 ÷ their share bounds what a faster loop can gain at this "
             "batch and thread count: only fewer or cheaper steps (rows dropped when they end, a smaller dtype) "
             "go beyond it.", "",
             "| model | batch | threads | ms per step | matmul share | loop speed-up bound | top operators | load | command |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for path in paths:
        record = json.loads(path.read_text())
        config, results, prov = record["provenance"]["config"], record["results"], record["provenance"]
        top = ", ".join(f"{name} {100 * share:.0f}%" for name, share in list(results["op_shares"].items())[:4])
        bound = results["loop_speedup_bound"]
        lines.append(f"| {config['model']} | {config['batch']} | {config['threads']} | "
                     f"{results['ms_per_decode_step']:.1f} | {100 * results['matmul_share']:.0f}% | "
                     f"{f'{bound:.2f}×' if bound else '–'} | {top} | {prov['load_average'][0]:.1f} | "
                     f"`{prov['command']}` |")
    return lines + [""]


def summarise(tokens: dict, times: dict, steps: dict, mixer_names: list[str]) -> dict:
    "Per method: median/best tokens/s, ms per decode step, and each mixer's ratios to the reference (medians, paired)."
    def summary(name: str) -> dict:
        rates = [t / s for t, s in zip(tokens[name], times[name])]
        return {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                "tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates),
                "tokens": tokens[name], "times_s": times[name], "steps": steps[name],
                "ms_per_step": statistics.median(1000 * s / n for s, n in zip(times[name], steps[name]))}

    reference = summary("transformers")
    results = {"transformers": reference}
    for name in mixer_names:
        result = summary(name)
        result["ratio_vs_transformers"] = result["tokens_per_s"] / reference["tokens_per_s"]
        result["best_ratio_vs_transformers"] = result["best_tokens_per_s"] / reference["best_tokens_per_s"]
        # paired: each repetition against the reference run beside it, robust to load that drifts
        paired = [(t / s) / (rt / rs) for t, s, rt, rs in
                  zip(result["tokens"], result["times_s"], reference["tokens"], reference["times_s"])]
        result["paired_ratios"] = paired
        result["paired_ratio_median"] = statistics.median(paired)
        results[name] = result
    return results


def per_step(result: dict) -> str:
    return f"{result['ms_per_step']:.1f}" if "ms_per_step" in result else "–"


def step_ratio(result: dict, reference: dict) -> str:
    "A decode step's cost against the reference's (< 1: cheaper); '–' for records written before steps were counted."
    if "ms_per_step" not in result or "ms_per_step" not in reference:
        return "–"
    return f"{result['ms_per_step'] / reference['ms_per_step']:.2f}"


def render(out_dir: Path) -> str:
    "rollout.md from every rollout_*.json in `out_dir`."
    lines = ["# Rollout speed: `motg.rollout.generate` vs `transformers` `generate`", "",
             "Made by `tools/bench_rollout.py` (its docstring says what is counted). Goal (issue 12): every mixer "
             "≥ 1.5× the reference on CPU. × transformers: ratio of median tokens/s; paired ×: median over "
             "repetitions of the ratio to the reference run beside it (the number to read on a loaded machine); "
             "best ×: ratio of the best repetitions. Tokens: per repetition, summed over rows, up to and including "
             "EOS.", ""]
    for path in sorted(out_dir.glob("rollout_*.json")):
        record = json.loads(path.read_text())
        config, prov, results = record["provenance"]["config"], record["provenance"], record["results"]
        ref = results["transformers"]
        git = prov.get("git") or {}
        lines += [f"## {config['model']}{' (compile=True)' if config.get('compile') else ''}: {config['batch']} prompts × "
                  f"{config['new_tokens']} new tokens, {config['threads']} threads, "
                  f"{prov.get('reps_done', config['reps'])} of {config['reps']} repetitions", "",
                  f"Command: `{prov.get('command', '?')}`; git {git.get('commit', '?')}"
                  f"{' (dirty)' if git.get('dirty') else ''}; torch {prov.get('torch_version')}; {prov.get('cpu_model')}; "
                  f"load average {prov['load_average_before'][0]:.1f} before / {prov['load_average_after'][0]:.1f} "
                  f"after, per repetition {', '.join(f'{x:.1f}' for x in prov.get('load_average_per_rep', []))} "
                  f"(2 cores shared with other jobs); warm-up {prov.get('warm_up_s', 0):.0f} s; written "
                  f"{prov['written_at']}.", "",
                  "| method | median s | tokens (median) | tokens/s (median) | × transformers | paired × | best × | "
                  "ms per decode step | step cost ÷ reference |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| transformers `generate` | {ref['median_s']:.2f} | {statistics.median(ref['tokens']):.0f} | "
                  f"{ref['tokens_per_s']:.0f} | 1.00 | 1.00 | 1.00 | {per_step(ref)} | 1.00 |"]
        for name, r in results.items():
            if name == "transformers":
                continue
            lines.append(f"| `{name}` | {r['median_s']:.2f} | {statistics.median(r['tokens']):.0f} | "
                         f"{r['tokens_per_s']:.0f} | {r['ratio_vs_transformers']:.2f} | "
                         f"{r['paired_ratio_median']:.2f} | {r['best_ratio_vs_transformers']:.2f} | {per_step(r)} | "
                         f"{step_ratio(r, ref)} |")
        lines.append("")
    return "\n".join(lines + render_profiles(out_dir))


if __name__ == "__main__":
    main()
