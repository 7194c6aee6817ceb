"""tutorial.ipynb runs top to bottom, in the repo root, as a student would run it, and its exercises name code
that exists."""
import ast
import glob
import keyword
import os
import re

import nbformat
from conftest import ROOT
from nbclient import NotebookClient


def test_tutorial_runs_clean():
    """Every cell runs, and the notebook's own checks print what it says they show: the masks the network was
    handed are the drawn ones, and cached sampling gives the uncached logits and tokens."""
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for check in ("sequential pass used the drawn mask: True", "diffusion pass used the causal mask:  True",
                  "same tokens: True"):
        assert check in printed, check
    gap = float(re.search(r"max \|cached - uncached\| logit over all steps: (\S+)", printed)[1])
    assert gap < 1e-4, gap


def test_exercises_name_code_that_exists():
    """Every name an exercise quotes (in backticks) is in the repo's code, and the code an exercise says to
    change is in the file it names, verbatim."""
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    (exercises,) = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    defined = set()  # every name the code uses or defines: variables, attributes, functions, arguments
    for f in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(f, encoding="utf-8").read())):
            defined.update(getattr(node, key) for key in ("id", "attr", "name", "arg")
                           if isinstance(getattr(node, key, None), str))
    quoted = re.findall(r"`([^`]+)`", exercises)
    names = {n for q in quoted for n in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", q.removesuffix(".py"))
             if not keyword.iskeyword(n)}
    missing = [n for n in names if n not in defined and not os.path.exists(os.path.join(ROOT, n + ".py"))]
    assert len(names) > 10 and not missing, missing
    for file, snippet in re.findall(r"in `([\w.]+\.py)`, change `([^`]+)`", exercises):
        assert snippet in open(os.path.join(ROOT, file), encoding="utf-8").read(), (file, snippet)
    assert re.findall(r"in `([\w.]+\.py)`, change `([^`]+)`", exercises), "the edit exercise is found"
