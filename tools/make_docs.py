"""Render the notebooks, as committed (with their outputs), to HTML pages with an index (`make docs`).

nbdev_docs needs Quarto; this needs only nbconvert. Each notebook of `nbs/` becomes `<out>/<name>.html` (not
executed again: `make tutorials` regenerates the outputs); `index.html` is `nbs/index.ipynb` (the README) followed by
a table of every page with the notebook's title and summary. Images that markdown cells link to are embedded, so
the folder can be opened or copied anywhere. The default folder, `_docs/`, is ignored by git.
"""
import argparse
import html
import re
import shutil
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"


def notebooks(folder: Path = NBS) -> list[Path]:
    "The notebooks to render: index first, then the rest by name (nbdev's rule: names starting `_` or `.` are skipped)."
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    return sorted(found, key=lambda p: p.name != "index.ipynb")


def title_and_summary(nb) -> tuple[str, str]:
    "The `# Title` and `> summary` of a notebook's first markdown cell (empty strings where absent)."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            title = re.search(r"^#\s+(.+?)\s*$", cell.source, re.MULTILINE)
            summary = re.search(r"^>\s+(.+?)\s*$", cell.source, re.MULTILINE)
            return (title.group(1) if title else "", summary.group(1) if summary else "")
    return "", ""


def render(path: Path) -> str:
    "One notebook as a standalone HTML page; markdown images resolved against the folder README links are written for."
    from nbconvert import HTMLExporter
    nb = nbformat.read(path, as_version=4)
    nb.cells = [cell for cell in nb.cells if cell.cell_type != "raw"]  # nbdev frontmatter, not for readers
    base = ROOT if path.name == "index.ipynb" else path.parent  # index.ipynb is the README: links from the root
    exporter = HTMLExporter(embed_images=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(base), "name": path.stem}})
    return body


def index_table(pages: list[tuple[str, str, str]]) -> str:
    "An HTML table linking every page: (file, title, summary)."
    rows = "\n".join(f'<tr><td><a href="{html.escape(file)}">{html.escape(Path(file).stem)}</a></td>'
                     f"<td>{html.escape(title)}</td><td>{html.escape(summary)}</td></tr>" for file, title, summary in pages)
    return ('<section style="max-width:1000px;margin:2em auto;font-family:sans-serif" id="motg-pages">'
            "<h2>Notebooks</h2><table><thead><tr><th>page</th><th>title</th><th>summary</th></tr></thead>"
            f"<tbody>\n{rows}\n</tbody></table></section>")


def build(out: Path, sources: list[Path]) -> list[Path]:
    "Write one page per notebook and `index.html` into `out` (replaced whole); return the files written."
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pages, written = [], []
    for path in sources:
        title, summary = title_and_summary(nbformat.read(path, as_version=4))
        name = "index.html" if path.name == "index.ipynb" else f"{path.stem}.html"
        (tmp / name).write_text(render(path), encoding="utf-8")
        written.append(out / name)
        if name != "index.html":
            pages.append((name, title, summary))
    index = tmp / "index.html"
    page = index.read_text(encoding="utf-8") if index.exists() else "<html><body></body></html>"
    index.write_text(page.replace("</body>", index_table(pages) + "\n</body>", 1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return written if (out / "index.html") in written else [out / "index.html", *written]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "_docs", help="the folder to write (replaced whole)")
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to render (default: every notebook of nbs/)")
    args = parser.parse_args()
    sources = args.notebooks or notebooks()
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        sys.exit(f"notebooks: no such files: {missing}")
    files = build(args.out, sources)
    print(f"{len(files)} pages in {args.out}; open {args.out / 'index.html'}")
