"""Generate README.md from nbs/index.ipynb (Quarto cannot be installed here, so nbdev_readme is not used).

Markdown cells are copied as they are; code cells become ```python blocks, except cells whose first line is a
`#| hide` directive. A test checks that README.md is what this script would write.
"""
import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file. -->\n\n"


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "The README text for the index notebook."
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for cell in nb.cells:
        source = cell.source.strip()
        if not source:
            continue
        if cell.cell_type == "markdown":
            parts.append(source)
        elif cell.cell_type == "code" and not source.startswith("#| hide"):
            body = "\n".join(l for l in source.splitlines() if not l.startswith("#|"))
            parts.append(f"```python\n{body}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args()
    text, readme = render(), ROOT / "README.md"
    if args.check:
        sys.exit(0 if readme.exists() and readme.read_text() == text else 1)
    readme.write_text(text)
