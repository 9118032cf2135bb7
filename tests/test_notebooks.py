"""Every study notebook in notebooks/ runs top to bottom on the CPU without an error.

Each notebook ends by asserting that minipeft agrees with what it derived, so a passing run
checks the teaching text against the library. Executed with nbclient in a kernel of this very
interpreter (ipykernel's native "python3" spec), working directory notebooks/, one test per
notebook so a failure names its notebook. The per-cell timeout is generous for the 2-core CI
machine; every notebook is written to finish in about a minute there.

The static tests check what running cannot: each notebook cites real sections of the outline, checks its
claims with asserts and ends with a "minipeft agrees" section that asserts; notebooks/README.md lists
every notebook, and every heading its index of self-test questions and review card names exists.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# The sections of the study outline (大模型微调 (Fine-tuning)): 1-6, with 1.1-1.3, 2.1-2.3, 3.1-3.3, 4.1-4.2, 5.1-5.2.
OUTLINE_SECTIONS = {"1", "2", "3", "4", "5", "6", "1.1", "1.2", "1.3", "2.1", "2.2", "2.3", "3.1", "3.2", "3.3",
                    "4.1", "4.2", "5.1", "5.2"}


def _headings(nb) -> list[str]:
    return [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
            if line.startswith("## ")]


def test_notebooks_are_stored_without_outputs():
    """The committed files are clean: outputs are produced by running, never stored."""
    assert PATHS, f"no notebooks found in {NOTEBOOKS}"
    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {cell.get('id')}"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_cites_the_outline_and_asserts(path: Path):
    """The title cell names real outline sections; the code checks its claims (asserts, not only prints),
    and the "minipeft agrees" section ends in an assert, so a regression fails test_notebook_runs."""
    nb = nbformat.read(path, as_version=4)
    title = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and title.startswith("# " + path.name[:2]), path.name
    cited = set(re.findall(r"\b(\d\.\d)\b", title.splitlines()[1])) | set(re.findall(r"section (\d)\b", title))
    assert cited and cited <= OUTLINE_SECTIONS, (path.name, cited)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    asserts = sum(len(re.findall(r"^\s*assert\b|torch\.testing\.assert_close\(", src, re.M)) for src in code)
    assert asserts >= 8, (path.name, asserts)
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "minipeft agrees" in c.source)
    assert "assert" in nb.cells[i + 1].source, path.name


def test_readme_indexes_every_notebook_and_heading():
    """notebooks/README.md: a reading-order row per notebook, and each heading its index quotes
    (§N "text") is a heading of that notebook; the five self-test questions all have a cell."""
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    for path in PATHS:
        assert f"]({path.name})" in readme, path.name
    by_prefix = {p.name[:2]: p for p in PATHS}
    index = readme[readme.index("## Index"):]
    quoted = 0
    for row in (line for line in index.splitlines() if line.startswith("|") and "§" in line):
        cells = [c.strip() for c in row.strip("|").split("|")]
        for prefix, section, text in re.findall(r'(?:(\d\d) )?§(\d+) "([^"]+)"', cells[2]):
            path = by_prefix[prefix or cells[1][:2]]
            text = text.replace("… ", "")
            headings = [h.replace('"', "") for h in _headings(nbformat.read(path, as_version=4))]
            assert any(h.startswith(f"## {section}. ") and text in h for h in headings), (path.name, section, text)
            quoted += 1
    assert quoted >= 10
    all_headings = [h for p in PATHS for h in _headings(nbformat.read(p, as_version=4))]
    for n in range(1, 6):
        assert any(f"自测 {n} ·" in h for h in all_headings), n


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell and its traceback
