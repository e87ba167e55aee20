"""Execute tutorial notebooks in place so they keep their outputs (`make tutorials`; the Makefile then runs nbdev_clean).

Each notebook runs as `nbdev_test` runs it: in-process with execnb, from `nbs/`, with the cells flagged by
`settings.ini`'s `tst_flags` (`#| slow`, `#| gpu`) skipped, so the committed outputs are those of the test run.
Figures are stored as plain PNG (not retina) to keep the notebooks small. A notebook that fails is left as it was.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def skip_flags() -> set[str]:
    "The nbdev flags whose cells are not executed (settings.ini's tst_flags)."
    from nbdev.config import get_config
    return set(get_config(path=ROOT).tst_flags.split())


def skipped(cell, flags: set[str]) -> bool:
    "Whether nbdev_test would skip `cell`: markdown, `#| eval: false`, or a cell carrying one of `flags`."
    from nbdev.process import extract_directives
    if cell.cell_type != "code" or "nbdev_export" + "(" in cell.source:
        return True
    directives = extract_directives(cell, remove=False)
    return bool(flags & directives.keys()) or directives.get("eval:", [""])[0].lower() == "false"


def run(notebook: Path, flags: set[str]) -> float:
    "Execute `notebook` in place (outputs kept, flagged cells skipped); return the wall time in seconds."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    notebook = notebook.resolve()
    nb = read_nb(notebook)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None  # a skipped cell keeps no stale output
    start = time.time()
    with working_directory(notebook.parent):
        shell = CaptureShell(notebook, mpl_format="png")
        shell.run_all(nb, exc_stop=True, preproc=lambda cell: skipped(cell, flags))
    write_nb(nb, notebook)
    return time.time() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path, help="notebooks to execute in place (nbs/0*.ipynb)")
    args = parser.parse_args()
    missing = [str(p) for p in args.notebooks if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        sys.exit(f"notebooks: not notebook files: {missing}")
    if len(args.notebooks) > 1:  # one process per notebook, as nbdev_test runs them: no state carried over
        for notebook in args.notebooks:
            if subprocess.run([sys.executable, __file__, str(notebook)]).returncode:
                sys.exit(1)
        sys.exit(0)
    (notebook,), flags = args.notebooks, skip_flags()
    os.environ["IN_TEST"] = "1"  # as nbdev_test sets it
    print(f"{notebook}: executing (skipping cells flagged {sorted(flags)}) ...", flush=True)
    try:
        seconds = run(notebook, flags)
    except Exception as error:
        sys.exit(f"{notebook}: a cell failed, the notebook is unchanged ({type(error).__name__}: {error})")
    print(f"{notebook}: done in {seconds:.0f} s", flush=True)
