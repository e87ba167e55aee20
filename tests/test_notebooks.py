"""Run every library notebook's inline tests with nbdev's runner, in-process, skipping `slow` and `gpu` cells.

Experiment notebooks (those without a `NN_` prefix, such as train.ipynb) run through papermill in
test_experiments.py instead.
"""
from pathlib import Path

import pytest
import nbdev.test as nbdev_runner

NBS = Path(__file__).resolve().parent.parent / "nbs"
LIBRARY_NOTEBOOKS = sorted(p for p in NBS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", LIBRARY_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook(notebook, monkeypatch):
    monkeypatch.chdir(NBS)  # notebooks run from their own folder, as nbdev_test does
    ok, elapsed = nbdev_runner.test_nb(notebook, skip_flags=["slow", "gpu"], do_print=False, basepath=NBS)
    assert ok, f"{notebook.name}: an inline test failed (run `nbdev_test --path nbs/{notebook.name}` to see it)"
