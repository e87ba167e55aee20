"""The shape of motg/: its modules import each other without a cycle, and no function or export cell is long."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "motg"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "_modidx.py"})
MAX_LINES = 60  # STYLE.md: an export cell or a function reads on one screen


def motg_imports(path: Path) -> set[str]:
    "The motg modules `path` imports, at module level or inside a function (`from .x`, `from motg.x`, `import motg.x`)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .mixture import Mixer
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import mixture
                found |= {alias.name for alias in node.names}
            elif node.module and node.module.startswith("motg."):
                found.add(node.module.split(".")[1])
            elif node.module == "motg":  # from motg import mixture
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("motg.")}
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    "Each module of motg/ and the motg modules it imports."
    names = {p.stem for p in MODULES}
    return {p.stem: motg_imports(p) & names for p in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One cycle of `graph` as a path that returns to its start (`[a, b, a]`), or None when it has none."
    state, stack = {}, []  # state: 1 while on the current path, 2 once every path from it is explored

    def visit(node):
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_motg_imports_reads_every_form(tmp_path):
    source = tmp_path / "grpo.py"
    source.write_text("from .mixture import Mixer\nimport motg.tasks\n"
                      "def f():\n    from motg.runs import write_json\n    from . import base\n")
    assert motg_imports(source) == {"mixture", "tasks", "runs", "base"}


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "runs" in graph and not graph["runs"] - {"mixture"}, f"motg.runs must stay at the bottom: {graph['runs']}"
    cycle = find_cycle(graph)
    assert cycle is None, "motg modules import each other in a circle: " + " -> ".join(cycle)


def long_functions(path: Path) -> list[str]:
    "`module.function (N lines)` for each function or method of `path` longer than `MAX_LINES`."
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                out.append(f"{path.stem}.{node.name} (line {node.lineno}, {lines} lines)")
    return out


def export_cells(path: Path) -> list[tuple[str, int]]:
    "`(marker, lines)` for each export cell of a generated module, split at nbdev's `# %% ../nbs/...` markers."
    cells, marker, body = [], None, []
    for line in path.read_text().splitlines() + ["# %% end"]:
        if line.startswith("# %% "):
            while body and not body[-1].strip():
                body.pop()
            if marker and marker.startswith("# %% ../nbs/"):  # not "# %% auto" (nbdev's __all__)
                cells.append((marker, len(body)))
            marker, body = line, []
        elif marker:
            body.append(line)
    return cells


def test_export_cells_are_split_at_the_markers(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""doc"""\n\n# %% ../nbs/m.ipynb #a1\nimport os\n\n# %% auto #0\n__all__ = []\n\n'
                      "# %% ../nbs/m.ipynb #b2\ndef f():\n    return 1\n\n\n")
    assert export_cells(source) == [("# %% ../nbs/m.ipynb #a1", 1), ("# %% ../nbs/m.ipynb #b2", 2)]


def test_no_long_function_or_export_cell():
    too_long = [f for path in MODULES for f in long_functions(path)]
    too_long += [f"{path.stem}: export cell {marker.split()[2].removeprefix('../')} {marker.split()[3]} ({lines} lines)"
                 for path in MODULES for marker, lines in export_cells(path) if lines > MAX_LINES]
    assert not too_long, f"longer than {MAX_LINES} lines (cut into named steps):\n" + "\n".join(too_long)


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_every_module_is_generated_with_markers(path):
    # a module without markers would pass the cell check unmeasured
    assert export_cells(path), f"{path.name}: no '# %% ../nbs/' markers; is it generated by nbdev_export?"
