"""tutorial.ipynb runs top to bottom as a learner runs it, but in a temporary folder, so that nothing lands in the
repo; its own checks print what they claim; every exercise's check cell fails with a wrong answer."""
import ast
import builtins
import glob
import os
import re
import shutil

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")
# a wrong answer to each exercise, one a learner might write
WRONG = {
    1: "answer_1 = (6, 1, 3, 4, 5, 2)",  # the masks in a random order
    2: "def mask_A(n_clean, L):\n    q, k = torch.arange(L)[:, None], torch.arange(L)\n    return k <= q",  # B's
    3: "def z_row_sees_x(s, L):\n    return torch.arange(L) <= s",  # a mask that sees its own answer
    4: "def expected_terms(alpha_0, V):\n    return {'diffusion': math.log(V) / 2, 'sequential': math.log(V) / 2}",
    5: "def iw_estimate(logp, L):\n    return -logp.mean(0) / L",  # the K = 1 value
    6: "def expected_nfe(L, T):\n    return min(L, T)",
    7: "def cached_step(committed, k_clean, k_masks):\n"
       "    return committed, committed + k_clean + k_masks, k_clean + k_masks",  # commits the masks too
}


def exercises(nb):
    """{exercise number: {'SOLUTION': cell index, 'check': cell index}}"""
    found = {}
    for i, cell in enumerate(nb.cells):
        m = re.match(r"# (SOLUTION|check) \(exercise (\d+)\)", cell.source)
        if cell.cell_type == "code" and m:
            found.setdefault(int(m[2]), {})[m[1]] = i
    return found


def repo_files():
    """{path relative to the repo: modification time} of every file outside .git, caches and virtual envs."""
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".cache", ".ipynb_checkpoints"}
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, ROOT)] = os.stat(path).st_mtime_ns
    return files


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run cell by cell in a fresh folder (Tiny Shakespeare copied in when the repo holds it, as CI's
    does; else the notebook downloads it), the repo on the kernel's PYTHONPATH. Yields (notebook, client, folder,
    the repo's files before) with the kernel still up."""
    work = tmp_path_factory.mktemp("tutorial")
    text = os.path.join(ROOT, "data", "shakespeare", "input.txt")
    if os.path.exists(text):
        os.makedirs(work / "data" / "shakespeare")
        shutil.copy(text, work / "data" / "shakespeare")
    before = repo_files()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with client.setup_kernel(env=env):
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        yield nb, client, work, before


def printed(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_tutorial_runs_clean(executed):
    """Every cell runs, and the notebook's own checks print what it says they show: the masks the network was handed
    are the drawn ones, cached sampling gives the uncached logits and tokens, every exercise's check passes."""
    nb, _, work, _ = executed
    out = printed(nb)
    for check in ("the network was handed the drawn diffusion mask: True",
                  "the network was handed the drawn sequential mask: True", "same tokens: True",
                  *(f"exercise {n}: right" for n in WRONG)):
        assert check in out, check
    gap = float(re.search(r"max \|cached - uncached\| logit over all steps: (\S+)", out)[1])
    assert gap < 1e-4, gap
    built, repo = map(float, re.search(r"built here: (\S+)\s+model.diffusion_loss: (\S+)", out).groups())
    assert abs(built - repo) < 1e-5, (built, repo)
    built, repo = map(float, re.search(r"built here: (\S+)\s+model.sequential_nll: (\S+)", out).groups())
    assert abs(built - repo) < 1e-3, (built, repo)
    assert os.path.exists(work / "out-tutorial" / "ckpt.pt") and os.path.exists(work / "out-tutorial" / "run.html")


def test_tutorial_leaves_nothing_in_the_repo(executed):
    """The run wrote its data, checkpoint and page in its own folder: no file of the repo is new or changed."""
    assert repo_files() == executed[3]


def test_exercise_checks_fail_with_a_wrong_answer(executed):
    """Each exercise's check cell, run after a wrong answer, raises AssertionError; after the shipped SOLUTION it
    passes again (so the failure is the answer's, not the state's)."""
    nb, client, _, _ = executed
    cells = exercises(nb)
    assert sorted(cells) == sorted(WRONG) and all(len(c) == 2 for c in cells.values()), cells
    for n, c in cells.items():
        solution, check = (nbformat.v4.new_code_cell(nb.cells[c[k]].source) for k in ("SOLUTION", "check"))
        client.execute_cell(nbformat.v4.new_code_cell(WRONG[n]), c["SOLUTION"])
        with pytest.raises(CellExecutionError) as wrong:
            client.execute_cell(check, c["check"])
        assert wrong.value.ename == "AssertionError", (n, wrong.value.ename, wrong.value.evalue)
        client.execute_cell(solution, c["SOLUTION"])
        client.execute_cell(nbformat.v4.new_code_cell(nb.cells[c["check"]].source), c["check"])


def test_stored_notebook():
    """The committed notebook holds its outputs, without errors, in under 400 kB; it says how to open it, with what
    requirements-dev.txt installs; every repo function its text calls by name exists."""
    assert os.path.getsize(NOTEBOOK) < 400_000, os.path.getsize(NOTEBOOK)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "stored unexecuted"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], "stored with an error"
    assert "pip install -r requirements-dev.txt" in nb.cells[0].source
    assert "jupyter notebook tutorial.ipynb" in nb.cells[0].source
    assert "notebook" in open(os.path.join(ROOT, "requirements-dev.txt")).read().split()
    defined = set()
    for f in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(f, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
    text = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    called = set(re.findall(r"`(?:\w+\.)?(\w+)\(", text))  # `name(...)` or `module.name(...)` in backticks
    missing = called - defined - set(dir(builtins))
    assert len(called) > 5 and not missing, missing
