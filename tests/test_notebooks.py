"""Every study notebook in notebooks/ runs top to bottom on the CPU without an error.

Each notebook ends by asserting that minipeft agrees with what it derived, so a passing run
checks the teaching text against the library. Executed with nbclient in a kernel of this very
interpreter (ipykernel's native "python3" spec), working directory notebooks/, one test per
notebook so a failure names its notebook. The per-cell timeout is generous for the 2-core CI
machine; every notebook is written to finish in about a minute there.
"""
from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_are_stored_without_outputs():
    """The committed files are clean: outputs are produced by running, never stored."""
    assert PATHS, f"no notebooks found in {NOTEBOOKS}"
    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {cell.get('id')}"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell and its traceback
