"""Shared fixtures: tiny fp32 models on the CPU and a tiny dataset the tests write themselves."""
import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 30


def causal_mask(T):
    """(T, T) bool, True on and below the diagonal: Eso-LM (B)'s mask over a whole sorted sequence."""
    return torch.ones(T, T, dtype=torch.bool).tril()


def tiny_model(vocab_size=5, block_size=8, n_layer=2, n_head=2, n_embd=16, seed=0, denoiser="B"):
    """A random fp32 model. Its residual projections get random weights too (they start at zero in
    training), so that its predictions depend on the context, as a trained model's do."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, denoiser=denoiser)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def data_dir(tmp_path):
    """A data/ folder with data/tiny/input.txt; --dataset=tiny_char reads it by characters."""
    os.makedirs(tmp_path / "data" / "tiny")
    (tmp_path / "data" / "tiny" / "input.txt").write_text(TEXT)
    return tmp_path / "data"


def run(script, *args, cwd=None, timeout=300, **kwargs):
    """Run one of the repo's scripts as a user would, in a new process; returns the CompletedProcess. kwargs go to
    subprocess.run (env, encoding)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def cli(script, *args, cwd=None):
    """Run a script's main() in this process, as its command line does (run_cli: a UserError is one line on
    stderr and exit code 1), without the seconds a new Python process costs. Returns a CompletedProcess."""
    import importlib
    from configurator import run_cli
    main = importlib.import_module(script.removesuffix(".py")).main
    out, err, code = io.StringIO(), io.StringIO(), 0
    old = os.getcwd()
    try:
        os.chdir(cwd or old)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(lambda: main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


TINY_TRAIN = ["--dataset=tiny_char", "--device=cpu", "--batch_size=4", "--block_size=16", "--n_layer=1",
              "--n_head=2", "--n_embd=16", "--eval_iters=1", "--eval_windows=8", "--eval_k=4", "--log_interval=1",
              "--warmup_iters=0"]
