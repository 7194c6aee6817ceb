"""tutorial.ipynb runs top to bottom, in the repo root, as a student would run it."""
import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_tutorial_runs_clean():
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
