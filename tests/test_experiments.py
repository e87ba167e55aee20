"""Integration: nbs/train.ipynb and nbs/reproduce.ipynb executed by papermill with the venv's kernel."""
import json
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
SMOKE = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())["defaults"]


def run_train(tmp_path: Path, **params) -> Path:
    out_dir = tmp_path / "run"
    pm.execute_notebook(str(NBS / "train.ipynb"), str(tmp_path / "executed.ipynb"), cwd=str(NBS),
                        parameters={**SMOKE, "out_dir": str(out_dir), **params}, progress_bar=False)
    return out_dir


@pytest.mark.parametrize("task", ["cpu/chain_sum", "gcd"], ids=["with-trace", "without-trace"])
def test_train_notebook_smoke(tmp_path, task):
    out_dir = run_train(tmp_path, task=task, mixer="dirichlet")
    evaluation = json.loads((out_dir / "eval.json").read_text())
    config = json.loads((out_dir / "config.json").read_text())
    assert config["task"] == task and config["mixer"] == "dirichlet"  # the override reached the run
    metrics = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward_mean" in m] == [1, 2]
    assert any(r["metric"] == "pass@1" for r in evaluation["records"])
    provenance = json.loads((out_dir / "provenance.json").read_text())
    assert provenance["git"]["commit"] and provenance["packages"]["torch"] and provenance["wall_time_s"] > 0
    assert (out_dir / "entropy.csv").exists() and (out_dir / "diversity.csv").exists()


def test_train_notebook_takes_the_final_evaluations_problems_seed_and_mixer_parameters(tmp_path):
    """eval_problems, eval_seed and eval_mixer_params (a profile's keys) pass train.ipynb's name check and reach
    problems.csv: that many distinct held-out problems, more than eval_size."""
    import pandas as pd
    out_dir = run_train(tmp_path, steps=1, eval_steps=0, eval_size=2, eval_problems=5, eval_seed=3,
                        eval_samples=0, analysis_prompts=0, eval_mixer_params={"hard": {"temperature": 0.9}})
    problems = pd.read_csv(out_dir / "problems.csv", dtype={"problem": str})
    assert problems["problem"].nunique() == 5 and set(problems["when"]) == {"before", "after"}
    assert (out_dir / "eval.json").exists()


def test_train_notebook_rejects_a_bad_parameter_before_any_work(tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as error:
        run_train(tmp_path, mixer="nope")
    assert "mixer:" in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("bad, word", [({"steps": 0}, "steps"), ({"task": "no_such_task"}, "task"),
                                       ({"eval_ks": [1, 64]}, "eval_ks"), ({"mixer": "soft_thinking"}, "mixer"),
                                       ({"eval_modes": ["greedy"]}, "eval_modes"), ({"model": "gpt-9"}, "model"),
                                       ({"preset": "nope"}, "preset"), ({"num_generations": 1}, "num_generations"),
                                       ({"beta": -1.0}, "beta"), ({"learning_rate": 0.0}, "learning_rate"),
                                       ({"eval_samples": -1}, "eval_samples"), ({"ood_tasks": "gcd"}, "ood_tasks"),
                                       ({"ood_size": True}, "ood_size")])
def test_check_train_parameters_names_the_bad_one(tmp_path, bad, word):
    """The notebook's first cell (motg.experiment.check_train_parameters), called directly: same check, no kernel."""
    from motg.experiment import check_train_parameters
    params = {**SMOKE, "out_dir": str(tmp_path / "run"), "overwrite": False, "resume": False, **bad}
    with pytest.raises(ValueError) as error:
        check_train_parameters(params)
    assert str(error.value).startswith(f"{word}:"), error.value
    assert not (tmp_path / "run").exists()


def test_train_notebook_never_overwrites_a_run(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(pm.PapermillExecutionError) as error:
        run_train(tmp_path)
    assert "out_dir:" in str(error.value)
    assert (out_dir / "metrics.jsonl").read_text() == "precious\n"


def test_reproduce_notebook_smoke_profile_builds_every_item_and_resumes(tmp_path):
    def reproduce():
        pm.execute_notebook(str(NBS / "reproduce.ipynb"), str(tmp_path / "reproduce.ipynb"), cwd=str(NBS),
                            parameters={"profile": "smoke", "results_dir": str(tmp_path / "results"), "jobs": 2,
                                        "threads": 1}, progress_bar=False)
        return json.loads((tmp_path / "results" / "manifest.json").read_text())
    manifest = reproduce()
    assert {item["id"] for item in manifest["items"]} == {"T1", "T2", "T3", "F1", "F2", "F3", "R-new-seed", "A-lr"}
    for item in manifest["items"]:
        assert (ROOT / item["file"]).exists() or Path(item["file"]).exists(), item
        assert item["runs"] and item["mirrors"]
    import pandas as pd
    from motg.analysis import PROBLEM_COLUMNS
    problems = pd.read_csv(tmp_path / "results" / "data" / "problems.csv")
    assert list(problems.columns) == list(PROBLEM_COLUMNS) and set(problems["when"]) == {"before", "after"}
    per_run = problems.groupby("run")["problem"].apply(frozenset)
    assert per_run.nunique() == 1 and len(per_run.iloc[0]) == SMOKE["eval_size"]  # the same problems in every run
    tables = {Path(item["file"]).name for item in manifest["items"] if item["kind"] == "table"}
    assert "T1_cpu_chain_sum.md" in tables and "T2_grid_cpu_chain_sum.md" in tables  # one table per task
    t1 = (tmp_path / "results" / "tables" / "T1_cpu_chain_sum.md").read_text()
    assert "inconclusive" in t1 and "zero-var %" in t1 and "cpu/chain_sum" in t1.splitlines()[0]
    replication = (tmp_path / "results" / "tables" / "R-new-seed_cpu_chain_sum.md").read_text()
    assert "inside T1's CI" in replication and "new: 1 seed (1)" in replication
    ablation = (tmp_path / "results" / "tables" / "A-lr_cpu_chain_sum.md").read_text()
    assert "hard: learning_rate=0.001" in ablation and "dirichlet: learning_rate=0.0001" in ablation  # per mixer
    import csv
    reproduce()  # a second call runs nothing: every run is complete
    with open(tmp_path / "results" / "sweep_status.csv") as f:
        assert {row["status"] for row in csv.DictReader(f)} == {"complete"}


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if not loop.last %}<|end|>\n{% endif %}{% endfor %}")  # every character is in the tiny vocabulary


def test_reproduce_notebook_builds_a_t2_table_per_experiment_and_model(tmp_path):
    """`T2-<name>` experiments are T2 tables too, one per (model, data set) pair, named and labelled by model."""
    import pandas as pd
    small = {**SMOKE, "steps": 1, "eval_steps": 0, "eval_modes": ["hard"], "analysis_prompts": 0}
    grid = {"task": ["cpu/chain_sum"], "mixer": ["hard"], "seed": [0]}
    profile = {"name": "two-models", "defaults": small,
               "experiments": {"T2": {"grid": grid}, "T2-tiny-1m": {"set": {"model": "tiny-1m"}, "grid": grid}}}
    (tmp_path / "two-models.yaml").write_text(yaml.safe_dump(profile))
    pm.execute_notebook(str(NBS / "reproduce.ipynb"), str(tmp_path / "reproduce.ipynb"), cwd=str(NBS),
                        parameters={"profile": str(tmp_path / "two-models.yaml"),
                                    "results_dir": str(tmp_path / "results"), "jobs": 2, "threads": 1},
                        progress_bar=False)
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    tables = {item["id"]: item for item in manifest["items"] if item["kind"] == "table"}
    assert set(tables) == {"T2", "T2-tiny-1m"}
    assert Path(tables["T2"]["file"]).name == "T2_grid_tiny-test_cpu_chain_sum.md"
    assert Path(tables["T2-tiny-1m"]["file"]).name == "T2-tiny-1m_grid_tiny-1m_cpu_chain_sum.md"
    assert "tiny-1m trained on cpu/chain_sum" in tables["T2-tiny-1m"]["caption"]
    assert len(tables["T2-tiny-1m"]["runs"]) == 1
    data = pd.read_csv(tmp_path / "results" / "tables" / "T2-tiny-1m_grid_tiny-1m_cpu_chain_sum.csv")
    assert set(data["model"]) == {"tiny-1m"} and {"HG", "HS"} <= set(data["column"])


def test_check_train_parameters_resolves_and_checks_the_prompt_style(tmp_path):
    from motg.experiment import check_train_parameters
    from motg.testing import tiny_lm
    params = {**SMOKE, "out_dir": str(tmp_path / "run"), "overwrite": False, "resume": False}
    assert "prompt_style" not in params and check_train_parameters(params)[0].prompt_style == "plain"  # auto
    for where in [{"prompt_style": "chat"}, {"train_overrides": {"prompt_style": "chat"}}]:
        with pytest.raises(ValueError, match=r"^prompt_style: 'chat' needs a model whose tokenizer has a chat"):
            check_train_parameters({**params, **where})
    with pytest.raises(ValueError, match=r"^prompt_style: must be one of \['auto', 'plain', 'chat'"):
        check_train_parameters({**params, "prompt_style": "xml"})
    model, tokenizer = tiny_lm()
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "chat-model")
    tokenizer.save_pretrained(tmp_path / "chat-model")
    chat = {**params, "model": str(tmp_path / "chat-model")}
    assert check_train_parameters(chat)[0].prompt_style == "chat"
    assert check_train_parameters({**chat, "prompt_style": "plain"})[0].prompt_style == "plain"
    assert not (tmp_path / "run").exists()


def test_evaluate_run_prompts_a_chat_model_as_training_did(tmp_path, monkeypatch):
    import shutil
    import motg.rollout
    from motg.experiment import check_train_parameters, evaluate_run
    from motg.tasks import format_prompt, load_task
    from motg.testing import tiny_lm
    model, tokenizer = tiny_lm()
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "chat-model")
    tokenizer.save_pretrained(tmp_path / "chat-model")
    params = {**SMOKE, "model": str(tmp_path / "chat-model"), "out_dir": str(tmp_path / "run"), "overwrite": False,
              "resume": False, "eval_modes": ["soft"], "ood_tasks": ["cpu/leg_counting"], "ood_size": 2,
              "max_completion_length": 4}
    config, run_dir = check_train_parameters(params)
    shutil.copytree(tmp_path / "chat-model", run_dir / "model")  # stands in for the trained model
    real, prompts = motg.rollout.generate, set()

    def generate(model, tokenizer, batch, *args, **kwargs):
        prompts.update(batch)
        return real(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(motg.rollout, "generate", generate)
    evaluate_run(config, run_dir, params)
    chat = lambda question: format_prompt(question, "chat", tokenizer)
    test = {chat(q) for q in load_task(config.task, "test", config.eval_size, config.seed)["question"]}
    ood = {chat(q) for q in load_task("cpu/leg_counting", "test", 2, config.seed)["question"]}
    assert prompts == test | ood  # the training mixer, the grid, the analyses and the OOD tasks: chat prompts only
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(sample["prompt"] in test for sample in samples)


def test_sweep_reruns_a_run_whose_base_model_changed_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A warm-started spec names a recipe: when the folder it resolves to changes, completed runs are redone."""
    import motg.experiment as ex
    from motg.runs import write_json

    def fake_run(params, folder):  # stands in for papermill: a complete run that started from today's base model
        folder.mkdir(parents=True)
        (folder / "problems.csv").write_text("problem\n" + "\n".join(ex.held_out_ids(params)) + "\n")
        write_json(folder / "eval.json", {"records": [], "provenance": {"base_model_folder": f"data/{today[0]}"}})
    today = ["tiny-1m-new"]
    monkeypatch.setattr(ex, "run_train_notebook", fake_run)
    monkeypatch.setattr(ex, "current_base_model", lambda spec: today[0] if spec == "tiny-1m-warm" else None)
    held_out = {"task": "cpu/chain_sum", "eval_size": 3}
    runs = [ex.RunSpec("a", {"model": "tiny-1m-warm", **held_out}), ex.RunSpec("b", {"model": "some/folder", **held_out})]
    runs_dir = tmp_path / "results" / "profile" / "runs"  # beside no other results folder: nothing to copy
    assert [s["status"] for s in ex.run_sweep(runs, runs_dir, progress=False)] == ["ran", "ran"]
    assert [s["status"] for s in ex.run_sweep(runs, runs_dir, progress=False)] == ["complete", "complete"]
    today[0] = "tiny-1m-newer"  # the warm-start recipe changed
    statuses = ex.run_sweep(runs, runs_dir, progress=False)
    assert [s["status"] for s in statuses] == ["ran", "complete"]
    assert "tiny-1m-new is now tiny-1m-newer" in statuses[0]["note"]
    kept = runs_dir.with_name("runs-stale") / "a.tiny-1m-new" / "eval.json"
    assert json.loads(kept.read_text())["provenance"]["base_model_folder"] == "data/tiny-1m-new"  # nothing lost
    assert ex.recorded_base_model(runs_dir / "a") == "tiny-1m-newer"


def test_sweep_evaluates_again_a_run_whose_held_out_problems_changed_and_keeps_its_training(tmp_path):
    """A complete run evaluated on other problems than its parameters give now (here: one id altered, as when the
    held-out rows became distinct problems) is evaluated again by the next sweep: its training is not redone, its
    old evaluation is moved aside, and `pending_runs` counts it until then."""
    import pandas as pd
    import motg.experiment as ex
    runs = [ex.RunSpec("a", {**SMOKE, "eval_steps": 0, "analysis_prompts": 0})]
    runs_dir = tmp_path / "results" / "profile" / "runs"  # beside no other results folder: nothing to copy
    assert [s["status"] for s in ex.run_sweep(runs, runs_dir, progress=False)] == ["ran"]
    run = runs_dir / "a"
    assert ex.evaluation_is_current(run, runs[0].params) and ex.pending_runs(runs, runs_dir) == []
    training = {name: (run / name).read_bytes() for name in ["metrics.jsonl", "train_summary.json",
                                                             "model/model.safetensors"]}
    problems = pd.read_csv(run / "problems.csv", dtype={"problem": str})
    altered = problems.assign(problem=problems["problem"].replace(problems["problem"].iloc[0], "not-held-out-now"))
    altered.to_csv(run / "problems.csv", index=False)
    assert not ex.evaluation_is_current(run, runs[0].params) and ex.pending_runs(runs, runs_dir) == runs
    statuses = ex.run_sweep(runs, runs_dir, progress=False)
    assert statuses[0]["status"] == "ran" and "held-out problems changed" in statuses[0]["note"]
    assert ex.evaluation_is_current(run, runs[0].params) and (run / "eval.json").exists()
    assert all((run / name).read_bytes() == data for name, data in training.items())  # the training is kept
    kept = runs_dir.with_name("runs-stale") / "a.evaluation"
    assert "not-held-out-now" in (kept / "problems.csv").read_text() and (kept / "eval.json").exists()
    assert not (kept / "model").exists() and [s["status"] for s in ex.run_sweep(runs, runs_dir, progress=False)] \
        == ["complete"]


def test_sweep_copies_a_run_completed_in_another_results_folder(tmp_path, monkeypatch):
    """A run of the same configuration (name and recorded parameters) complete in a results folder beside this one
    is copied, not run again; `reuse=False` runs it; another configuration under the same name is never copied."""
    import motg.experiment as ex
    from motg.runs import write_json
    calls = []

    def fake_run(params, folder):  # stands in for papermill: a complete run that records its parameters
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "problems.csv").write_text("problem\n" + "\n".join(ex.held_out_ids(params)) + "\n")
        write_json(folder / "eval.json", {"records": [], "provenance": {"notebook_parameters": params}})
    monkeypatch.setattr(ex, "run_train_notebook", fake_run)
    monkeypatch.setattr(ex, "current_base_model", lambda spec: None)
    run = ex.RunSpec("a", {"model": "tiny-test", "task": "cpu/chain_sum", "eval_size": 3, "seed": 0})
    first, second, third = (tmp_path / "results" / name / "runs" for name in ["one", "two", "three"])
    assert [s["status"] for s in ex.run_sweep([run], first, progress=False)] == ["ran"]
    assert ex.pending_runs([run], second) == [] and ex.pending_runs([run], second, reuse=False) == [run]
    statuses = ex.run_sweep([run], second, progress=False)
    assert statuses[0]["status"] == "copied" and "one/runs/a" in statuses[0]["note"] and len(calls) == 1
    assert (second / "a" / "eval.json").read_text() == (first / "a" / "eval.json").read_text()
    assert ex.identical_run(ex.RunSpec("a", {**run.params, "seed": 1}), third, None) is None  # other parameters
    assert [s["status"] for s in ex.run_sweep([run], third, progress=False, reuse=False)] == ["ran"] and len(calls) == 2


def test_current_base_model_names_the_warm_folder_without_building_it():
    from motg.base import WARM_START_DEFAULTS, warm_start
    from motg.experiment import current_base_model
    name = current_base_model("tiny-1m-warm")
    assert name == warm_start("tiny-1m", **WARM_START_DEFAULTS, build=False).name and name.startswith("tiny-1m-")
    assert current_base_model("tiny-1m") is None and current_base_model("no such model") is None


def test_evaluate_run_pairs_problems_and_fixes_sigma_from_the_base_model(tmp_path, monkeypatch):
    """problems.csv: base and trained model on the same fixed problems; soft's σ from the base model's E."""
    import shutil
    import pandas as pd
    import torch
    import motg.rollout
    from motg.experiment import check_train_parameters, evaluate_run
    from motg.mixture import noise_scale
    from motg.testing import tiny_lm
    base, tokenizer = tiny_lm()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    trained, _ = tiny_lm()
    with torch.no_grad():
        trained.get_input_embeddings().weight.mul_(3.0)  # training moved E: its own σ would be 3x the base's
    sigmas = []
    real = motg.rollout.generate

    calls = []

    def generate(model, tokenizer, prompts, mixer, *args, **kwargs):
        calls.append(mixer.name)
        if mixer.name in ("soft", "fuzzy"):
            sigmas.append(mixer.sigma)
        return real(model, tokenizer, prompts, mixer, *args, **kwargs)

    monkeypatch.setattr(motg.rollout, "generate", generate)
    ids, calls_per_run, before = {}, [], {}
    for seed in (0, 1):
        calls.clear()
        params = {**SMOKE, "model": str(tmp_path / "base"), "mixer": "dirichlet", "seed": seed, "eval_modes": ["soft"],
                  "eval_samples": 2, "eval_problems": 3, "max_completion_length": 4, "analysis_prompts": 1,
                  "out_dir": str(tmp_path / f"run{seed}"), "overwrite": False, "resume": False}
        config, run_dir = check_train_parameters(params)
        trained.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        evaluate_run(config, run_dir, params)
        problems = pd.read_csv(run_dir / "problems.csv")
        assert set(problems["inference"]) == {"dirichlet", "hard", "soft"} and set(problems["when"]) == {"before", "after"}
        assert problems.groupby(["when", "inference", "decoding"]).size().to_dict()[("after", "soft", "sample")] == 3 * 2
        assert (problems["seed"] == seed).all() and (problems["run"] == run_dir.name).all()
        ids[seed] = set(problems["problem"])
        calls_per_run.append(len(calls))
        before[seed] = problems[problems.when == "before"].drop(columns=["run", "seed"]).reset_index(drop=True)
    assert calls_per_run[1] < calls_per_run[0]  # the second run read the base model's decodes from the cache
    assert list((tmp_path / "base-evaluations").glob("*.csv")) and before[0].equals(before[1])
    assert ids[0] == ids[1] and len(ids[0]) == 3  # the held-out problems do not depend on the training seed
    expected = noise_scale(base.get_input_embeddings().weight)
    assert sigmas and all(s == pytest.approx(expected) for s in sigmas)  # before and after: the base model's σ


def test_run_train_notebook_resumes_a_failed_run_in_place(tmp_path):
    """A failing run keeps its folder and error; the next attempt resumes it (resume=True), never starts over."""
    import nbformat
    from motg.experiment import RunFailed, run_train_notebook
    notebook = tmp_path / "stand_in.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("out_dir = ''\nresume = False", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import json, pathlib\nrun = pathlib.Path(out_dir)\n"
                                  "(run / 'attempts').open('a').write(str(resume) + '\\n')\n"
                                  "if not resume: raise RuntimeError('killed at the analysis')\n"
                                  "(run / 'eval.json').write_text('{}')")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), notebook)
    run = tmp_path / "runs" / "a"
    with pytest.raises(RunFailed, match="killed at the analysis"):
        run_train_notebook({}, run, notebook=notebook)
    assert "killed at the analysis" in (run / "error.log").read_text() and (run / "failed.ipynb").exists()
    run_train_notebook({}, run, notebook=notebook)
    assert (run / "attempts").read_text().split() == ["False", "True"] and (run / "train.ipynb").exists()
    assert sorted(p.name for p in run.parent.iterdir()) == ["a"]  # no .incomplete-* copy, nothing retrained
    run_train_notebook({}, run, notebook=notebook)  # complete: skipped
    assert (run / "attempts").read_text().split() == ["False", "True"]
