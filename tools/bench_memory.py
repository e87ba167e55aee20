"""Peak memory of one GRPO update on a random stand-in model: plain, gradient checkpointing, LoRA, both; and the
arithmetic that puts each paper model and recipe on one 80 GB GPU.

    .venv/bin/python tools/bench_memory.py [--hidden 512] [--layers 8] [--sequences 8] [--steps 256]

What is measured (CPU, no GPU needed). Each setting runs in its own fresh process: a Qwen2-architecture model
with random weights and Qwen2.5's vocabulary (151,936, tied embeddings) is saved in bf16 and loaded as the
trainer loads it (`motg.grpo.load_policy`: fp32 master weights, LoRA and checkpointing as configured; β = 0.1,
so without LoRA a frozen bf16 reference copy exists), with the trainer's optimizer (AdamW). Then the process's
peak resident memory is reset (`/proc/self/clear_refs`) and one update runs as the trainer runs it: teacher-forced
log-probabilities of a rollout of `--sequences` × `--steps` hard tokens (`motg.rollout.sequence_logps`, chunked),
the reference log-probabilities, the loss, backward, AdamW step. Reported: the peak resident memory of the
update above the resident memory before it (`VmHWM` − `VmRSS`: activations, gradients, AdamW's moments, which
are created at the first step, and transient buffers), and the activation memory that persists from the forward
pass to backward: the bytes of the tensors autograd saves (`torch.autograd.graph.saved_tensors_hooks`, weights
left out), and under checkpointing the inputs each checkpointed layer keeps (forward pre-hooks on the layers).

The arithmetic (the second table) uses exact parameter counts and the activation memory per token measured in
issue 12 with the real architectures (2.9 MiB/token for Qwen2.5-1.5B, 6.5 MiB/token for Llama-3.1-8B; the two 3B
models are interpolated linearly in layers × hidden size), scaled by the stand-in's measured reduction from
gradient checkpointing.

Writes results/bench/memory.json and results/bench/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MiB, GB = 2 ** 20, 1e9
HEADROOM = 0.9  # plan to 90% of the GPU's 80 GB (allocator fragmentation, the estimates' error), plus 2 GB of CUDA context
SETTINGS = {"plain": {}, "checkpointing": dict(gradient_checkpointing=True),
            "lora": dict(use_peft=True, lora_target_modules="all-linear"),
            "lora + checkpointing": dict(use_peft=True, lora_target_modules="all-linear", gradient_checkpointing=True)}


def proc_status(key: str) -> int:
    "A `/proc/self/status` memory field, in bytes."
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def save_stand_in(folder: Path, args) -> None:
    "A random Qwen2 model with Qwen2.5's vocabulary, saved in bf16 with the character tokenizer (ids < 151,936)."
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from motg.base import build_tokenizer
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def measure(folder: str, setting: str, args) -> dict:
    "One update in this process (run in a fresh process per setting)."
    import torch
    torch.set_num_threads(args.threads)
    from motg.grpo import TrainConfig, build_optimizer, grpo_loss, load_policy
    from motg.mixture import Mixture, make_mixer
    from motg.rollout import Rollout, sequence_logps, tokenize_prompts
    config = TrainConfig(model=folder, beta=0.1, **SETTINGS[setting])
    policy, reference, tokenizer = load_policy(config, "cpu", "no")
    optimizer, _ = build_optimizer(config, policy, 1)
    B, T = args.sequences, args.steps
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["What is 12 + 30 + 7?\n<think>"] * B)
    ids = torch.randint(10, len(tokenizer), (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.bool)
    mixer = make_mixer("hard")
    rollout = Rollout(prompt_ids, prompt_mask, Mixture.from_tokens(ids), mask, mask, mask, torch.zeros(B, T),
                      [""] * B, mixer, 1.0)
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in policy.parameters()}

    def pack(t):  # activations only: a weight saved for backward is not new memory
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_layer_inputs(module, args, kwargs):  # under checkpointing each layer keeps its inputs until backward
        if torch.is_grad_enabled():
            for t in [*args, *kwargs.values(), *kwargs.get("position_embeddings", ())]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    if config.gradient_checkpointing:
        from transformers.modeling_layers import GradientCheckpointingLayer
        for module in policy.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.register_forward_pre_hook(keep_layer_inputs, with_kwargs=True)

    rss_before = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    t0 = time.perf_counter()
    policy.eval()
    with torch.no_grad():
        if reference is not None:
            ref = sequence_logps(reference, rollout, mixer)
        else:
            with policy.model.disable_adapter():
                ref = sequence_logps(policy, rollout, mixer)
    policy.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = sequence_logps(policy, rollout, mixer)
        loss, _ = grpo_loss(logps, None, ref, torch.randn(B), mask, beta=0.1, loss_type="dapo")
    saved_bytes = sum(saved.values())
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = proc_status("VmHWM")
    params = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"setting": setting, "update_peak_bytes": peak - rss_before, "saved_for_backward_bytes": saved_bytes,
            "tokens": B * (T + prompt_ids.shape[1]), "parameters": params, "trainable_parameters": trainable,
            "reference_copy": reference is not None, "seconds": seconds}


# --- The arithmetic ---------------------------------------------------------------------------------------------

PAPER_MODELS = {  # parameters; layers, hidden size (for the interpolation); vocabulary; KV bytes per token (bf16)
    "Qwen2.5-1.5B-Instruct": dict(params=1.544e9, layers=28, hidden=1536, vocab=151936, kv_heads=2, lora=18.5e6),
    "Qwen2.5-3B": dict(params=3.086e9, layers=36, hidden=2048, vocab=151936, kv_heads=2, lora=29.9e6),
    "Llama-3.2-3B": dict(params=3.213e9, layers=28, hidden=3072, vocab=128256, kv_heads=8, lora=24.3e6),
    "Llama-3.1-8B": dict(params=8.030e9, layers=32, hidden=4096, vocab=128256, kv_heads=8, lora=42.0e6),
}
MEASURED_MIB_PER_TOKEN = {"Qwen2.5-1.5B-Instruct": 2.9, "Llama-3.1-8B": 6.5}  # issue 12, real architectures
RECIPES = [  # model, recipe, sequences per step, completion tokens, prompt tokens (about), β
    ("Qwen2.5-1.5B-Instruct", "MoT-G (4 prompts × 10, 1024 completion tokens, β = 0.1)", 40, 1024, 256, 0.1),
    ("Llama-3.2-3B", "Soft Tokens (2 prompts × 32, 512 CoT + 32 answer tokens)", 64, 544, 256, 0.0),
    ("Qwen2.5-3B", "Soft Tokens (2 prompts × 32, 512 CoT + 32 answer tokens)", 64, 544, 256, 0.0),
    ("Llama-3.1-8B", "Soft Tokens (2 prompts × 32, 512 CoT + 32 answer tokens)", 64, 544, 256, 0.0),
]


def mib_per_token(name: str) -> float:
    "Measured (issue 12) or interpolated linearly in layers × hidden between the two measured models."
    if name in MEASURED_MIB_PER_TOKEN:
        return MEASURED_MIB_PER_TOKEN[name]
    (a, ma), (b, mb) = [(PAPER_MODELS[n]["layers"] * PAPER_MODELS[n]["hidden"], m)
                        for n, m in MEASURED_MIB_PER_TOKEN.items()]
    x = PAPER_MODELS[name]["layers"] * PAPER_MODELS[name]["hidden"]
    return ma + (mb - ma) * (x - a) / (b - a)


def plan(name: str, recipe: str, sequences: int, completion: int, prompt: int, beta: float,
         ratios: dict[str, float]) -> list[dict]:
    "Memory of each setting for one model and recipe, with the largest micro-batch (a divisor of the batch) that fits."
    m = PAPER_MODELS[name]
    P, L = m["params"], prompt + completion
    rows = []
    for lora in [False, True]:
        for checkpointing in [False, True]:
            static = (2 * P + 16 * m["lora"]) if lora else 16 * P  # bf16 base + fp32 adapters/grads/AdamW, or all fp32
            reference = 2 * P if (beta > 0 and not lora) else 0  # a bf16 copy; LoRA disables its adapters instead
            # the stand-in's activations relative to plain; with checkpointing plus one layer's activations
            # (1/L of the un-checkpointed setting's) while that layer is recomputed in backward
            setting = ("lora" if lora else "") + (" + " if lora and checkpointing else "") + (
                "checkpointing" if checkpointing else "") or "plain"
            factor = ratios[setting] + (ratios["lora" if lora else "plain"] / m["layers"] if checkpointing else 0)
            per_token = mib_per_token(name) * MiB * factor
            logits = 3 * 64 * m["vocab"] * 4  # one 64-step chunk: fp32 logits, log-softmax and their gradient, per sequence
            kv = sequences * L * 2 * m["layers"] * m["kv_heads"] * 128 * 2  # the rollout's KV cache (bf16), all sequences
            fits = [mb for mb in range(sequences, 0, -1) if sequences % mb == 0 and
                    static + reference + mb * (L * per_token + logits) + 2 * GB <= HEADROOM * 80 * GB]
            best = fits[0] if fits else None
            rows.append({"model": name, "recipe": recipe, "lora": lora, "checkpointing": checkpointing,
                         "weights_grads_adamw_gb": static / GB, "reference_gb": reference / GB,
                         "activations_per_sequence_gb": (L * per_token + logits) / GB, "rollout_kv_cache_gb": kv / GB,
                         "micro_batch": best, "gradient_accumulation_steps": sequences // best if best else None,
                         "peak_gb": max(static + reference + (best or 1) * (L * per_token + logits),
                                        static + reference + kv) / GB})
    return rows


def choose(rows: list[dict]) -> dict:
    "The profile's setting: full fine-tuning where it fits (the papers' own), else LoRA; checkpointing where without it the micro-batch would be below 8."
    for lora in [False, True]:
        plain = next((r for r in rows if r["lora"] == lora and not r["checkpointing"] and r["micro_batch"]), None)
        checkpointed = next((r for r in rows if r["lora"] == lora and r["checkpointing"] and r["micro_batch"]), None)
        if plain and plain["micro_batch"] >= 8:
            return plain
        if checkpointed or plain:
            return max([r for r in (plain, checkpointed) if r], key=lambda r: r["micro_batch"])
    raise ValueError(f"no setting fits: {rows[0]['model']}")


def measure_all(args) -> list[dict]:
    "Each setting measured in its own fresh process."
    folder = Path(tempfile.mkdtemp()) / "stand-in"
    save_stand_in(folder, args)
    measured = []
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--measure", str(folder), setting, "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--sequences", str(args.sequences), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
        measured.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(measured[-1], flush=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="redo the arithmetic and the report from the measurements in results/bench/memory.json")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args)))
        return
    import torch
    import transformers
    from motg.experiment import provenance
    out_dir = ROOT / "results" / "bench"
    if args.report_only:
        old = json.loads((out_dir / "memory.json").read_text())
        for key, value in old["stand_in"].items():
            setattr(args, key, value)
        measured = old["measured"]
    else:
        measured = measure_all(args)
    by = {r["setting"]: r for r in measured}

    ratios = {setting: by[setting]["saved_for_backward_bytes"] / by["plain"]["saved_for_backward_bytes"]
              for setting in SETTINGS}
    plans = [plan(*recipe, ratios=ratios) for recipe in RECIPES]
    chosen = [choose(rows) for rows in plans]
    record = {"stand_in": {"hidden": args.hidden, "layers": args.layers,
                           "sequences": args.sequences, "steps": args.steps}, "measured": measured,
              "activation_ratios": ratios, "plans": plans, "chosen": chosen,
              "provenance": old["provenance"] if args.report_only else provenance(
                  {"args": vars(args)}, seeds={"seed": 0}, torch=torch.__version__,
                  transformers=transformers.__version__, python=platform.python_version())}
    (out_dir / "memory.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "memory.md").write_text(report(record, args))
    print((out_dir / "memory.md").read_text())


def report(record: dict, args) -> str:
    s, lines = {**record["stand_in"], "vocab": 151936}, []
    add = lines.append
    add("# Memory of one GRPO step: measured on a stand-in, and the arithmetic for the papers' models\n")
    add(f"Stand-in: a random Qwen2 model, hidden {s['hidden']}, {s['layers']} layers, Qwen2.5's vocabulary "
        f"({s['vocab']:,}, tied), saved in bf16 and loaded as `motg.grpo.load_policy` loads it (fp32 master "
        f"weights; β = 0.1, so without LoRA a bf16 reference copy). One update (reference log-probs, teacher-forced "
        f"log-probs of {s['sequences']} sequences × {s['steps']} hard tokens, loss, backward, AdamW step) in a fresh "
        f"process per setting, CPU, fp32 compute. *Update peak*: the process's peak resident memory during the "
        f"update above its resident memory before it (activations, gradients, AdamW's moments, transient buffers). "
        f"*Saved for backward*: the activations kept from forward to backward (tensors autograd saves, weights "
        f"left out; under checkpointing, the layers' inputs the checkpoints keep). LoRA: `lora_target_modules='all-linear'`, r = 16.\n")
    add("| setting | trainable parameters | reference copy | update peak (MiB) | saved for backward (MiB) | saved per token (KiB) | time (s) |")
    add("|---|---|---|---|---|---|---|")
    for r in record["measured"]:
        add(f"| {r['setting']} | {r['trainable_parameters']:,} of {r['parameters']:,} | {'yes' if r['reference_copy'] else 'no'} | "
            f"{r['update_peak_bytes'] / MiB:.0f} | {r['saved_for_backward_bytes'] / MiB:.0f} | "
            f"{r['saved_for_backward_bytes'] / r['tokens'] / 1024:.1f} | {r['seconds']:.1f} |")
    r = record["activation_ratios"]
    add(f"\nActivations kept until backward, relative to plain: checkpointing {r['checkpointing']:.3f}, LoRA "
        f"{r['lora']:.3f} (every adapted linear layer also keeps its dropped-out, fp32 input: `lora_dropout` 0.05, "
        f"TRL's default), LoRA + checkpointing {r['lora + checkpointing']:.3f}. With checkpointing the layer being "
        f"recomputed in backward holds its own activations meanwhile, so below a model of L layers is taken to "
        f"need the ratio + 1/L of the un-checkpointed setting's activations. The update peak on CPU also holds "
        f"gradients and AdamW's moments (created at the first step; 12 B per trainable parameter) and transients; "
        f"with a bf16 base (LoRA) CPU matmuls convert weights to fp32 on the fly (the 151,936 × {s['hidden']} head "
        f"alone is {151936 * s['hidden'] * 4 / MiB:.0f} MiB per conversion), which a GPU does not, so for LoRA the "
        f"saved-for-backward column is the one that carries over.\n")
    add("## The papers' models on one 80 GB GPU\n")
    add("Bytes: full fine-tuning keeps fp32 weights, gradients and AdamW's two moments (16 B/parameter) and, with "
        "β > 0, a bf16 reference copy (2 B/parameter); LoRA keeps the bf16 base (2 B/parameter) and 16 B per adapter "
        "parameter (all-linear, r = 16), and its reference is the base with adapters disabled. Activations: issue 12's "
        "measurement with the real architectures (2.9 MiB/token Qwen2.5-1.5B, 6.5 MiB/token Llama-3.1-8B; the 3B "
        "models interpolated in layers × hidden), times the setting's ratio above, plus one 64-step logits "
        "chunk (fp32 logits, log-softmax, gradient) per sequence; 2 GB for the CUDA context. The micro-batch is the "
        "largest divisor of the step's sequences that fits in 90% of 80 GB (headroom for fragmentation and for the "
        "estimates' error). Prompts are taken as 256 tokens. The rollout's KV cache "
        "(bf16, every sequence of the step at once) is needed during generation, when no activations are held; the peak is the larger of the two phases.\n")
    add("| model | recipe | LoRA | checkpointing | weights+grads+AdamW (GB) | reference (GB) | activations per sequence (GB) | micro-batch | peak (GB) | rollout KV cache (GB) |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for rows in record["plans"]:
        for r in rows:
            add(f"| {r['model']} | {r['recipe']} | {'yes' if r['lora'] else 'no'} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{r['weights_grads_adamw_gb']:.1f} | {r['reference_gb']:.1f} | {r['activations_per_sequence_gb']:.2f} | "
                f"{r['micro_batch'] or 'does not fit'} | {r['peak_gb']:.1f} | {r['rollout_kv_cache_gb']:.1f} |")
    add("\n## Settings for the profiles\n")
    add("Full fine-tuning where it fits (both papers trained every weight), else LoRA; gradient checkpointing when "
        "without it the micro-batch would be below 8 sequences.\n")
    add("| model | recipe | use_peft | gradient_checkpointing | gradient_accumulation_steps (micro-batch) | peak (GB) |")
    add("|---|---|---|---|---|---|")
    for r in record["chosen"]:
        add(f"| {r['model']} | {r['recipe']} | {r['lora']} | {r['checkpointing']} | "
            f"{r['gradient_accumulation_steps']} ({r['micro_batch']}) | {r['peak_gb']:.1f} |")
    p = record["provenance"]
    add(f"\nCommit {p['git'].get('commit', '?')} (dirty: {p['git'].get('dirty', '?')}), torch {p['torch']}, "
        f"transformers {p['transformers']}, {p['hardware']['platform']}, {p['hardware']['cpu_count']} CPUs; written "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}. Made by `tools/bench_memory.py` "
        f"(`--hidden {args.hidden} --layers {args.layers} --sequences {args.sequences} --steps {args.steps}`).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
