"""The project's own consistency: exported modules match the notebooks, notebooks are clean, README is current."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _copy_project(dest: Path) -> Path:
    "Copy the files nbdev reads and writes into `dest` (a fresh tree, so the check never touches the checkout)."
    for name in ["settings.ini", "setup.py", "requirements.txt", "nbs", "motg"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


def _tree(path: Path, pattern: str) -> dict:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob(pattern))
            if ".ipynb_checkpoints" not in p.parts and "__pycache__" not in p.parts}


def test_nbdev_export_and_clean_leave_no_diff(tmp_path):
    work = _copy_project(tmp_path)
    for command in ["nbdev_export", "nbdev_clean"]:
        subprocess.run([str(BIN / command)], cwd=work, check=True, capture_output=True)
    assert _tree(work / "motg", "*.py") == _tree(ROOT / "motg", "*.py"), \
        "motg/ is out of date with nbs/: run nbdev_export and commit"
    assert _tree(work / "nbs", "*.ipynb") == _tree(ROOT / "nbs", "*.ipynb"), \
        "a notebook is not clean: run nbdev_clean and commit"


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    work = _copy_project(tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("steps = 1", metadata={"tags": ["parameters"]})])
    nbformat.write(nb, work / "nbs" / "tagged.ipynb")
    subprocess.run([str(BIN / "nbdev_clean"), "--fname", "nbs/tagged.ipynb"], cwd=work, check=True,
                   capture_output=True)
    cleaned = json.loads((work / "nbs" / "tagged.ipynb").read_text())
    assert cleaned["cells"][0]["metadata"] == {"tags": ["parameters"]}


def test_readme_is_generated_from_index():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_readme.py"), "--check"])
    assert result.returncode == 0, "README.md is out of date with nbs/index.ipynb: run `make readme`"


def test_library_imports_offline():
    import motg
    from motg.testing import tiny_lm
    model, tokenizer = tiny_lm()
    assert model.config.vocab_size == len(tokenizer)


def _files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if "__pycache__" not in p.parts}


EXPERIMENT_NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb")
                              if not p.name[:2].isdigit() and p.name != "index.ipynb")


@pytest.mark.parametrize("name", EXPERIMENT_NOTEBOOKS)
def test_nbdev_test_skips_the_experiment_notebooks(name):
    "train and reproduce write run folders: nbdev_test skips them (frontmatter skip_exec); papermill tests run them."
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    frontmatter = NBProcessor(ROOT / "nbs" / name, procs=FrontmatterProc, process=True).nb.frontmatter_
    assert frontmatter.get("skip_exec") is True, f"{name}: add a first raw cell '---\\nskip_exec: true\\n---'"


def test_nbdev_test_writes_nothing_into_the_project(tmp_path):
    "nbdev_test on an experiment notebook and on a library notebook, in a copy of the project: no file appears."
    work = _copy_project(tmp_path)
    before = _files(work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for notebook in ["nbs/train.ipynb", "nbs/02_testing.ipynb"]:
        result = subprocess.run([str(BIN / "nbdev_test"), "--path", notebook], cwd=work, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert _files(work) - before == set()
    assert not (work / "results").exists()


def test_generated_folders_are_ignored_by_git():
    "make docs writes _docs/, nbdev_docs _proc/, the smoke defaults of train.ipynb results/scratch/."
    for path in ["_docs/index.html", "_proc/index.ipynb", "results/scratch/train-20260101-000000/eval.json"]:
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
