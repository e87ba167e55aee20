"""The project's own consistency: exported modules match the notebooks, notebooks are clean, README is current."""
import json
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
