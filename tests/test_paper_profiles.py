"""The papers' profiles end to end on CPU stand-ins, as a GPU user would run them with local copies.

Each paper model is swapped for a random stand-in of its architecture and vocabulary (motg.testing, scaled to
2 layers x 96), saved as a local model folder; the math data sets are tiny JSONL files in the hub's layout written
here; every size is scaled down (one step, two prompts, two problems). The test writes the derived profile the
way a user would (`model:` a folder, `train_overrides.data_files`, `ood_data_files`) and runs its runs with the
experiment layer's own functions, in process: check_train_parameters, motg.grpo.train, evaluate_run. MoT-G's
`paper` profile runs as the README says, `make reproduce PROFILE=paper SET="model=<folder> ..."`, in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from motg.experiment import check_train_parameters, evaluate_run, expand_sweep, load_profile
from motg.grpo import PRESETS, train
from motg.testing import STAND_INS, save_stand_in

ROOT = Path(__file__).resolve().parent.parent
HUB_TO_STAND_IN = {spec["hub_id"]: name for name, spec in STAND_INS.items()}


def write_math_files(folder: Path) -> dict[str, dict[str, str]]:
    "GSM8K-layout and MATH-layout JSONL files, train and test: {task: {split: path}}."
    folder.mkdir(parents=True, exist_ok=True)
    layouts = {
        "gsm8k": lambda i: {"question": f"Tom has {i} apples and gets {i + 3} more. How many now?",
                            "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"},
        "math": lambda i: {"problem": f"Simplify $\\frac{{{i + 1}}}{{{2 * i + 2}}}$.", "level": "Level 1",
                           "type": "Algebra", "solution": "It is $\\boxed{\\frac{1}{2}}$."}}
    files = {}
    for task, row in layouts.items():
        files[task] = {}
        for split in ("train", "test"):
            path = folder / f"{task}-{split}.jsonl"
            path.write_text("".join(json.dumps(row(i)) + "\n" for i in range(6)))
            files[task][split] = str(path)
    return files


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    "Each paper model's hub id mapped to a saved stand-in folder (bf16, as on the hub)."
    folder = tmp_path_factory.mktemp("models")
    return {hub: str(save_stand_in(folder / name, name)) for hub, name in HUB_TO_STAND_IN.items()}


@pytest.fixture
def local_math(tmp_path) -> dict:
    "The math files, {task: {split: path}}: the runs read them through data_files and ood_data_files."
    return write_math_files(tmp_path / "data")


def scaled_down(profile: dict, experiment: str, mixers: list[str], stand_ins: dict, files: dict) -> dict:
    "One experiment of `profile` with one seed and `mixers`, local models and data, every size scaled down."
    spec = profile["experiments"][experiment]
    defaults = {**profile["defaults"], **spec.get("set", {})}
    overrides = dict(defaults["train_overrides"], device="cpu", progress=False, eval_batch_size=8)
    if defaults["task"] in files:
        overrides["data_files"] = files[defaults["task"]]
    ood_files = {task: files[task] for task in defaults["ood_tasks"] if task in files}
    if overrides.get("gradient_accumulation_steps", 1) > 1:
        overrides["gradient_accumulation_steps"] = 2  # of 2 prompts x 2 completions
    small = dict(model=stand_ins[defaults["model"]], steps=1, num_generations=2, prompts_per_step=2, train_size=4,
                 eval_size=2, eval_steps=0, eval_samples=2, eval_ks=[1, 2], ood_size=2, analysis_prompts=1,
                 max_completion_length=72 if defaults["prompt_style"] == "soft_tokens" else 12,
                 max_think_tokens=3 if defaults["max_think_tokens"] else None, train_overrides=overrides,
                 **({"eval_max_think_tokens": 4} if defaults.get("eval_max_think_tokens") else {}),
                 **({"ood_data_files": ood_files} if ood_files else {}))
    grid = {key: (mixers if key == "mixer" else values[:1]) for key, values in spec["grid"].items()}
    return {"name": profile["name"] + "-scaled", "defaults": {**defaults, **small}, "experiments": {experiment: {"grid": grid}}}


def run_profile(profile: dict, tmp_path: Path) -> list[tuple]:
    "Every run of `profile` as train.ipynb runs it: checked parameters, training, evaluation."
    path = tmp_path / "profile.yaml"  # the derived profile a user writes, read back as the sweep reads it
    path.write_text(yaml.safe_dump(profile))
    results = []
    for run in expand_sweep(load_profile(str(path))):
        params = {**run.params, "out_dir": str(tmp_path / "runs" / run.name), "overwrite": False, "resume": False}
        config, run_dir = check_train_parameters(params)
        train(config, run_dir)
        results.append((config, run_dir, evaluate_run(config, run_dir, params)))
    return results


def test_the_soft_tokens_profile_holds_the_papers_recipe_models_and_memory_settings():
    profile = load_profile("paper-soft-tokens")
    runs = expand_sweep(profile)
    by_model = {}
    for run in runs:
        by_model.setdefault(run.params["model"], set()).add(run.params["task"])
    assert by_model == {"meta-llama/Llama-3.2-3B-Instruct": {"gsm8k", "math"},
                        "meta-llama/Llama-3.1-8B-Instruct": {"gsm8k"}, "Qwen/Qwen2.5-3B-Instruct": {"math"}}
    assert len(runs) == 4 * 3 * 3  # (model, data set) pairs x hard/fuzzy/soft x 3 seeds; T3 shares T2's runs
    recipe = PRESETS["soft_tokens"]  # spec §2: RLOO, 2 x 32, no KL, sequence sum, cosine with 20 warm-up steps
    assert (recipe["advantage"], recipe["scale_rewards"], recipe["loss_type"], recipe["beta"], recipe["num_iterations"],
            recipe["lr_scheduler_type"], recipe["warmup_steps"], recipe["reward_scheme"]) == \
        ("rloo", "none", "sequence_sum", 0.0, 1, "cosine", 20, "soft_tokens")
    for run in runs:
        p, memory = run.params, run.params["train_overrides"]
        assert (p["preset"], p["prompt_style"], p["steps"], p["prompts_per_step"], p["num_generations"]) == \
            ("soft_tokens", "soft_tokens", 4000, 2, 32)
        assert p["learning_rate"] == {"meta-llama/Llama-3.2-3B-Instruct": 6e-6, "meta-llama/Llama-3.1-8B-Instruct": 3e-6,
                                      "Qwen/Qwen2.5-3B-Instruct": 8e-6}[p["model"]]
        assert p["max_think_tokens"] == {"gsm8k": 128, "math": 512}[p["task"]]
        assert p["eval_modes"] == ["hard", "fuzzy", "soft"] and p["eval_ks"] == [1, 32] and p["eval_samples"] == 32
        # results/bench/memory.md's settings: 3B full + checkpointing, 2 micro-batches; 8B LoRA + checkpointing
        eight_b = "8B" in p["model"]
        assert memory["gradient_checkpointing"] and memory.get("use_peft", False) == eight_b
        assert memory["gradient_accumulation_steps"] == (1 if eight_b else 2)
        assert not eight_b or (memory["lora_r"], memory["lora_target_modules"]) == (16, "all-linear")
    paper = expand_sweep(load_profile("paper"))  # MoT-G: Qwen2.5-1.5B, full, no checkpointing, 4 micro-batches
    assert {(r.params["train_overrides"]["use_peft"], r.params["train_overrides"]["gradient_checkpointing"],
             r.params["train_overrides"]["gradient_accumulation_steps"]) for r in paper} == {(False, False, 4)}


@pytest.mark.parametrize("experiment, mixers", [("T2", ["hard"]), ("T2-llama-8b-gsm8k", ["fuzzy"]),
                                                ("T2-qwen-3b-math", ["soft"])])
def test_the_soft_tokens_profile_runs_end_to_end_on_stand_ins(tmp_path, stand_ins, local_math, experiment, mixers):
    profile = scaled_down(load_profile("paper-soft-tokens"), experiment, mixers, stand_ins, local_math)
    results = run_profile(profile, tmp_path)
    assert sorted(config.mixer for config, _, _ in results) == sorted(mixers)
    for config, run_dir, evaluation in results:
        assert config.prompt_style == "soft_tokens" and Path(config.model).is_dir() and config.data_files
        assert config.use_peft == ("8b" in config.model)  # LoRA for the 8B model only
        trained = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert trained[1]["step"] == 1 and 0.0 <= trained[1]["reward_mean"] <= 1.0
        settings = {r["setting"] for r in evaluation["records"] if r.get("setting")}
        assert {"HG", "HS", "HS2", "FG", "FS", "FS2", "SG", "SS", "SS2"} <= settings  # the T2 grid, pass@1 and @2
        samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert samples and all(s["prompt"].startswith("A conversation between User and Assistant.") for s in samples)
        # the analysis decodes in the run's answer format: thinking stops (budget: 3 tokens), the answer is prefilled
        assert all("The final answer is: \\boxed{" in s["completion"] for s in samples)
        ood = {(r["task"], r["metric"]) for r in evaluation["ood"]}
        assert ood == {(task, metric) for task in config_ood(config) for metric in ("accuracy", "score", "answer_nll")}


def config_ood(config) -> list[str]:
    return ["math"] if config.task == "gsm8k" else ["gsm8k"]


# The README's override for a local model, scaled down with the same switch to one run of one step (SET collapses
# the seed, mixer and G grids): the documented way to try a paper profile before spending a GPU on it.
SCALED_DOWN = ("seed=420394 mixer=dirichlet num_generations=2 steps=1 prompts_per_step=2 train_size=4 eval_size=2 "
               "eval_steps=0 eval_samples=2 eval_ks=[1,2] analysis_prompts=1 max_completion_length=12 ood_size=2 "
               "train_overrides.gradient_accumulation_steps=2 train_overrides.device=cpu")


def make_reproduce(*variables: str) -> subprocess.CompletedProcess:
    "`make reproduce VARIABLE=value ...` with the Python running the tests (PY=..., so nothing is installed)."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["make", "--no-print-directory", "reproduce", f"PY={sys.executable}", *variables],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_make_reproduce_paper_runs_with_a_local_model_folder(tmp_path, stand_ins):
    "`make reproduce PROFILE=paper SET=\"model=<folder> ...\"`: Qwen2.5-1.5B's stand-in folder, chat prompts, the motg preset."
    folder, out = stand_ins["Qwen/Qwen2.5-1.5B-Instruct"], tmp_path / "results"
    done = make_reproduce("PROFILE=paper", "JOBS=1", f"RESULTS={out}", f"SET=model={folder} {SCALED_DOWN}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    overrides = json.loads((out / "manifest.json").read_text())["provenance"]["config"]["overrides"]
    assert overrides["model"] == folder and overrides["train_overrides.device"] == "cpu"
    run, = [p for p in (out / "runs").iterdir() if p.is_dir() and p.name != "base-evaluations"]
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["mixer"], config["prompt_style"], config["beta"], config["reward_scheme"],
            config["gradient_accumulation_steps"], config["learning_rate"]) == \
        (folder, "dirichlet", "chat", 0.1, "motg", 2, 5e-6)  # the profile's recipe, the overrides' sizes
    assert (out / "tables" / "T1_motg10.md").exists() and (out / "data" / "problems.csv").exists()


def test_make_reproduce_refuses_a_misspelt_override_before_any_work(tmp_path):
    done = make_reproduce("PROFILE=paper", f"RESULTS={tmp_path / 'never'}", "SET=modle=/models/qwen")
    assert done.returncode != 0 and "--set: 'modle' is not a parameter (did you mean 'model'?)" in done.stderr
    assert not (tmp_path / "never").exists()


def test_train_notebook_passes_data_files_to_the_run(tmp_path):
    "train.ipynb's `data_files` parameter reaches TrainConfig.data_files (here refused: chain_sum is not read from files)."
    import papermill as pm
    smoke = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())["defaults"]
    files = write_math_files(tmp_path / "data")
    with pytest.raises(pm.PapermillExecutionError) as error:
        pm.execute_notebook(str(ROOT / "nbs" / "train.ipynb"), str(tmp_path / "executed.ipynb"), cwd=str(ROOT / "nbs"),
                            parameters={**smoke, "out_dir": str(tmp_path / "run"), "data_files": files["gsm8k"]},
                            progress_bar=False)
    assert "data_files: only the math data sets" in str(error.value)
