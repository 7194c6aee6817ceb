"""Every command README.md and BENCHMARKS.md show runs as written, with tiny sizes where their flags allow."""
import os
import re
import shlex
import subprocess
import sys

import torch
from conftest import ROOT, TEXT, cli

import bench

TINY = {
    "train.py": ["--device=cpu", "--max_iters=2", "--eval_interval=2", "--n_layer=1", "--n_head=2", "--n_embd=16",
                 "--batch_size=4", "--eval_iters=1", "--eval_windows=8", "--eval_k=2", "--log_interval=1",
                 "--warmup_iters=0"],
    "sample.py": ["--device=cpu", "--num_samples=1"],
    "bench.py": ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--lengths=16", "--iters=1", "--rounds=1",
                 "--mdlm_steps=4", "--small_steps=4", "--num_samples=2", "--steps_list=4,L"],
}


def readme_commands():
    """The python and torchrun commands of README.md, then BENCHMARKS.md, in their code blocks and inline code, in
    order."""
    text = "".join(open(os.path.join(ROOT, f), encoding="utf-8").read() for f in ("README.md", "BENCHMARKS.md"))
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    inline = [span.replace("\n", " ") for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", text,
                                                                                              flags=re.S))]
    commands = [shlex.split(c, comments=True) for c in lines + inline if c.startswith(("python ", "torchrun "))]
    return [c for c in commands if c[:2] != ["python", "-m"]]  # (the test command is this suite)


def test_every_readme_command_runs(tmp_path, monkeypatch):
    commands = readme_commands()
    assert len(commands) >= 25 and any(c[0] == "torchrun" for c in commands)
    os.makedirs(tmp_path / "data" / "shakespeare")
    os.makedirs(tmp_path / "assets")
    text = TEXT * 3 + open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()  # every character it quotes
    (tmp_path / "data" / "shakespeare" / "input.txt").write_text(text)
    tiny = dict(n_layer=1, n_head=2, n_embd=16, lengths="16", batch_size=4, block_size=16)  # the GPU report, tiny
    monkeypatch.setattr(bench, "GPU_PARTS", [(t, f, dict(flags, **tiny)) for t, f, flags in bench.GPU_PARTS[:3]])
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    trains = [c for c in commands if c[:2] == ["python", "train.py"] and "--eval_only=True" not in c]
    for command in trains + [c for c in commands if c not in trains]:
        if command[1] == "-c":  # a Python one-liner (BENCHMARKS.md's data preparation), on a small text
            assert "choices" not in command[2] or "k=7_200_000" in command[2], "the big text's size, made small here"
            r = subprocess.run([sys.executable, "-c", command[2].replace("k=7_200_000", "k=2000")], cwd=tmp_path,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
            assert r.returncode == 0, (command, r.stderr[-2000:])
            continue
        if command[0] == "torchrun":
            script = command.index("train.py")
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:script],
                                os.path.join(ROOT, "train.py"), *command[script + 1:], *TINY["train.py"]],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0 and "gradient_accumulation_steps=2" in r.stdout, r.stdout + r.stderr[-3000:]
            continue
        script = command[1]
        r = cli(script, *command[2:], *TINY[script], cwd=tmp_path)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
