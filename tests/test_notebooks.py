"""Run every library notebook's inline tests with nbdev's runner, in-process, skipping `slow` and `gpu` cells.

Experiment notebooks (those without a `NN_` prefix, such as train.ipynb) run through papermill in
test_experiments.py and test_readme.py instead. A notebook's run leaves no file behind where it runs (`nbs/`) or
at the project's top level: `nbdev_test` can run any number of times and leave `git status` clean.
"""
from pathlib import Path

import pytest
import nbdev.test as nbdev_runner

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
LIBRARY_NOTEBOOKS = sorted(p for p in NBS.glob("[0-9][0-9]_*.ipynb"))


def _where_notebooks_write() -> set[str]:
    "Every file under nbs/ and every entry at the project's top level (caches excluded)."
    nbs = {p.relative_to(ROOT).as_posix() for p in NBS.rglob("*")
           if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)}
    return nbs | {p.name for p in ROOT.iterdir()}


@pytest.mark.parametrize("notebook", LIBRARY_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook(notebook, monkeypatch):
    monkeypatch.chdir(NBS)  # notebooks run from their own folder, as nbdev_test does
    before = _where_notebooks_write()
    ok, elapsed = nbdev_runner.test_nb(notebook, skip_flags=["slow", "gpu"], do_print=False, basepath=NBS)
    assert ok, f"{notebook.name}: an inline test failed (run `nbdev_test --path nbs/{notebook.name}` to see it)"
    left = _where_notebooks_write() - before
    assert not left, f"{notebook.name} left files behind: {sorted(left)} (write into a temporary folder instead)"
