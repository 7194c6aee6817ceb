"""What long training runs go through: DDP, SIGKILL while checkpointing, Ctrl-C, NaNs, reproducibility."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, cli, run


def losses(output):
    """{iteration: loss} from the 'iter N: loss X' lines."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+): loss ([0-9.]+)", output)}


def start(*args, cwd=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tensors(obj, path=""):
    """{path: tensor} of every tensor in a nested dict/list (a checkpoint, an optimizer's state_dict)."""
    if torch.is_tensor(obj):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{path}/{key}").items()}


def assert_same_state(a, b):
    """Every tensor of two checkpoint files (weights, optimizer state) equal, bit for bit."""
    ta, tb = tensors(torch.load(a, weights_only=True)), tensors(torch.load(b, weights_only=True))
    assert ta.keys() == tb.keys() and len(ta) >= 9
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_two_processes_give_the_same_bits(data_dir, tmp_path):
    """Same flags and seed, two processes: every tensor of both checkpoints (weights and optimizer state) is
    equal, and a batch-1 sampling run (whose few-row products take this machine's layout) prints the same text;
    another seed another text."""
    for name in ("a", "b"):
        r = run("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / name}", "--max_iters=5",
                "--eval_interval=5", "--alpha_0=0.5")
        assert r.returncode == 0, r.stderr
    for ckpt in ("ckpt.pt", "last.pt"):
        assert_same_state(tmp_path / "a" / ckpt, tmp_path / "b" / ckpt)
    s1, s2, s3 = (run("sample.py", f"--out_dir={tmp_path / 'a'}", "--steps=4", "--num_samples=1", "--device=cpu",
                      f"--seed={s}") for s in (1, 1, 2))
    assert s1.returncode == 0, s1.stderr
    assert s1.stdout.split("NFE")[0] == s2.stdout.split("NFE")[0] != s3.stdout.split("NFE")[0]


def test_resume_continues_the_state_exactly(data_dir, tmp_path):
    """A run stopped at iteration 3 and resumed to 6, with 2 micro-batches per iteration, ends in the very state
    (weights and optimizer) of a run straight to 6: the data, the noise and the optimizer carry over, and so do
    the flags (the data folder included): the resumed run is given only its device, out_dir and max_iters."""
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--eval_interval=3", "--gradient_accumulation_steps=2",
              "--alpha_0=0.5", "--lr_decay_iters=6", "--loss_type=low_var", "--learning_rate=3e-3", "--seed=7",
              "--batch_split=0.25"]  # lr_decay_iters: the schedule of the whole run, whatever max_iters says
    assert cli("train.py", *common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=6").returncode == 0
    assert cli("train.py", *common, f"--out_dir={tmp_path / 'resumed'}", "--max_iters=3").returncode == 0
    r = cli("train.py", "--device=cpu", f"--out_dir={tmp_path / 'resumed'}", "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0 and min(losses(r.stdout)) == 4, r.stderr
    assert_same_state(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_ddp_two_processes_match_one_process_and_resume_exactly(data_dir, tmp_path):
    """torchrun with 2 CPU ranks, typed as on a GPU (no --backend: it follows the device, gloo here), 2
    micro-batches each, equals one process with 4: same data, same noise, stratified t over the global batch,
    averaged gradients. Rank 0 alone prepares the data (the first run finds none), the others wait for it.
    Stopped at iteration 2 and resumed to 4, it ends in the straight DDP run's state, bit for bit."""
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--eval_interval=2", "--gradient_accumulation_steps=4",
              "--alpha_0=0.5", "--lr_decay_iters=4"]
    ddp = torchrun(*common, f"--out_dir={tmp_path / 'ddp'}", "--max_iters=4")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = cli("train.py", *common, f"--out_dir={tmp_path / 'single'}", "--max_iters=4")
    assert single.returncode == 0, single.stderr
    saves = single.stdout.count("saving checkpoint")
    assert saves >= 1 and ddp.stdout.count("saving checkpoint") + ddp.stderr.count("saving checkpoint") == saves, \
        "rank 0 alone saves"
    a, b = losses(single.stdout), losses(ddp.stdout)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    wa = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert torchrun(*common, f"--out_dir={tmp_path / 'resumed'}", "--max_iters=2").returncode == 0
    r = torchrun(*common, f"--out_dir={tmp_path / 'resumed'}", "--max_iters=4", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_state(tmp_path / "ddp" / "last.pt", tmp_path / "resumed" / "last.pt")


def test_sigkill_while_checkpointing_leaves_complete_checkpoints(data_dir, tmp_path):
    """SIGKILL at arbitrary moments of a run that evaluates and saves every iteration: ckpt.pt (the best weights)
    and last.pt (the state to resume from) always load, and resuming from last.pt ends in the very state of an
    uninterrupted run (both checkpoints, every tensor)."""
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--max_iters=60", "--eval_interval=1"]
    ref = run("train.py", *common, f"--out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0
    out = tmp_path / "killed"
    for delay in (0.0, 0.15, 0.4):
        p = start(*common, f"--out_dir={out}", *(["--init_from=resume"] if (out / "last.pt").exists() else []))
        while not (out / "last.pt").exists() and p.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        best, last = (torch.load(out / name, weights_only=True) for name in ("ckpt.pt", "last.pt"))
        assert best["format"] == last["format"] == "eso-lm/2" and 0 <= last["iter_num"] < 60
        assert best["iter_num"] <= last["iter_num"] + 1 and "optimizer" in last
    it = last["iter_num"]
    resumed = run("train.py", *common, f"--out_dir={out}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert min(losses(resumed.stdout)) == it + 1
    for name in ("ckpt.pt", "last.pt"):
        assert_same_state(out / name, tmp_path / "ref" / name)


def test_ctrl_c_saves_and_stops_cleanly(data_dir, tmp_path):
    out = tmp_path / "o"
    p = start(*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=2")
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate(timeout=30)[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    output, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in output, output[-2000:]
    it = int(re.search(r"interrupted at iter (\d+)", output)[1])
    assert it > 0 and torch.load(out / "last.pt", weights_only=True)["iter_num"] == it


def test_a_new_run_stopped_before_its_first_eval_keeps_another_runs_files(data_dir, tmp_path, monkeypatch):
    """A new run into a folder that holds another run's checkpoints says so in one line at its start (the
    iteration and val loss they hold); stopped (Ctrl-C) after 4 iterations and before its first eval past
    iteration 0, it saves nothing: ckpt.pt, last.pt and eval.json stay byte for byte. Stopped after that eval, it
    has replaced both checkpoints, and eval.json, which described the weights replaced, is gone; resumed, its
    final eval reports its own weights."""
    import train
    out = tmp_path / "o"
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}"]
    first = cli("train.py", *common, "--max_iters=2", "--eval_interval=2", "--seed=5")
    assert first.returncode == 0, first.stderr
    files = lambda: [(out / name).read_bytes() for name in ("ckpt.pt", "last.pt", "eval.json")]
    other = files()
    step = train.Trainer.step

    def interrupted(self, it):  # Ctrl-C during iteration 3
        if it == 3:
            signal.raise_signal(signal.SIGINT)
        return step(self, it)
    monkeypatch.setattr(train.Trainer, "step", interrupted)
    r = cli("train.py", *common, "--max_iters=1000", "--eval_interval=1000")
    assert r.returncode == 130 and "interrupted at iter 4; nothing saved" in r.stdout, r.stdout + r.stderr
    val = re.search(r"step 2: .*val nelbo ([0-9.]+)", first.stdout)[1]
    assert r.stdout.startswith(f"{out} holds another run (trained to iter 2, best val nelbo {val}); this run "
                               "replaces its checkpoints from its first eval on\n"), r.stdout
    assert files() == other, "the other run's files are left alone"
    r = cli("train.py", *common, "--max_iters=1000", "--eval_interval=2")
    assert r.returncode == 130 and "interrupted at iter 4; resume with" in r.stdout, r.stdout + r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["iter_num"] == 4 and not (out / "eval.json").exists()
    assert (out / "ckpt.pt").read_bytes() != other[0]
    new = tmp_path / "new"  # into an empty folder: last.pt alone, which sample.py says to resume
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={new}", "--eval_interval=1000")
    assert r.returncode == 130 and os.listdir(new) == ["last.pt"], r.stdout
    r = cli("sample.py", f"--out_dir={new}", "--device=cpu")
    assert r.returncode == 1 and "stopped before its first eval; resume it (python train.py --init_from=resume " \
        f"--out_dir={new})" in r.stderr, r.stderr
    monkeypatch.setattr(train.Trainer, "step", step)
    r = cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--device=cpu", "--init_from=resume",
            "--max_iters=2")
    assert r.returncode == 0 and "final eval of the weights of iter" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "eval.json").read_text())["iter"] == torch.load(out / "ckpt.pt")["iter_num"] >= 2


def test_ctrl_c_in_an_eval_or_while_sampling_is_one_line(data_dir, tmp_path, monkeypatch):
    """Ctrl-C in train.py's final eval says that the checkpoints are saved and how to evaluate them again, and
    while it sets up, that nothing is saved, each in one line; while sampling, it is one line and exit code 130,
    no traceback."""
    import sample
    import train

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    out = tmp_path / "o"
    monkeypatch.setattr(train.Trainer, "final_eval", ctrl_c)
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2")
    assert r.returncode == 130 and r.stdout.splitlines()[-1] == ("interrupted in the eval; the checkpoints are "
                                                                 f"saved, and --eval_only=True --out_dir={out} "
                                                                 "evaluates them again"), r.stdout
    monkeypatch.setattr(train.Trainer, "load_data", ctrl_c)  # (a dataset being prepared)
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}")
    assert r.returncode == 130 and r.stdout == "interrupted while setting up (data, model, compiler): nothing saved\n" \
        and not r.stderr, (r.stdout, r.stderr)
    monkeypatch.setattr(sample, "denoise", ctrl_c)
    r = cli("sample.py", f"--out_dir={out}", "--device=cpu")
    assert r.returncode == 130 and r.stderr.splitlines()[-1] == "interrupted" and "Traceback" not in r.stderr


def test_non_finite_loss_stops_without_saving(data_dir, tmp_path):
    """A good run saves; resumed with an absurd learning rate it diverges, stops with the iteration in one
    line, and the checkpoint on disk is still the good one, byte for byte; so does a new run from scratch into
    the same out_dir that diverges (nothing is saved at iteration 0, as in nanoGPT)."""
    out = tmp_path / "o"
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=1"]
    assert cli("train.py", *common, "--max_iters=2").returncode == 0
    good = [(out / name).read_bytes() for name in ("ckpt.pt", "last.pt")]
    r = cli("train.py", *common, "--max_iters=50", "--init_from=resume", "--learning_rate=1e30", "--grad_clip=0")
    assert r.returncode == 1 and re.search(r"not finite at iter \d+; stopped without saving", r.stderr), r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert [(out / name).read_bytes() for name in ("ckpt.pt", "last.pt")] == good
    r = cli("train.py", *common, "--max_iters=50", "--learning_rate=1e30", "--grad_clip=0")  # from scratch, same dir
    assert r.returncode == 1 and re.search(r"not finite at iter 1; stopped without saving", r.stderr), r.stderr
    assert [(out / name).read_bytes() for name in ("ckpt.pt", "last.pt")] == good, "nothing is saved at iteration 0"


def test_an_untrained_model_never_replaces_a_runs_files(data_dir, tmp_path, monkeypatch):
    """--max_iters=0 evaluates the untrained model: into an empty out_dir it saves it (a random model to time
    sampling with); into one with another run's checkpoints it stops in one line before anything, and the files
    stay; a run stopped (Ctrl-C) before it begins saves nothing either."""
    import train
    out = tmp_path / "o"
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2"]
    assert cli("train.py", *common, "--max_iters=2").returncode == 0
    files = lambda: [(out / name).read_bytes() for name in ("ckpt.pt", "last.pt", "eval.json")]
    trained = files()
    r = cli("train.py", *common, "--max_iters=0")
    assert r.returncode == 1 and f"--max_iters=0 would replace the checkpoints in {out} by an untrained model" in \
        r.stderr and r.stderr.count("\n") == 1 and files() == trained, r.stdout + r.stderr
    fresh = cli("train.py", *common, "--max_iters=0", f"--out_dir={tmp_path / 'new'}")
    assert fresh.returncode == 0 and "final eval of the weights of iter 0 (ckpt.pt)" in fresh.stdout, fresh.stdout
    assert (tmp_path / "new" / "ckpt.pt").exists()
    loop = train.Trainer.loop

    def interrupted(self, stop):  # Ctrl-C once the signal handlers are in place, before iteration 0
        signal.raise_signal(signal.SIGINT)
        return loop(self, stop)
    monkeypatch.setattr(train.Trainer, "loop", interrupted)
    r = cli("train.py", *common, "--max_iters=1000")
    assert r.returncode == 130 and "interrupted at iter 0; nothing saved" in r.stdout and files() == trained, \
        r.stdout + r.stderr


def test_no_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    import data

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    try:
        data.prepare("shakespeare_char", str(tmp_path / "new" / "data"))
    except data.UserError as e:
        assert "could not download Tiny Shakespeare (no network)" in str(e)
        assert str(tmp_path / "new" / "data" / "shakespeare" / "input.txt") in str(e)
    else:
        raise AssertionError("prepare() should fail offline")
    assert os.listdir(tmp_path) == [], "no partial download, and no folder made for it, is left behind"


def test_empty_or_tiny_input(tmp_path):
    for text, message in (("", "holds 0 characters"), ("x" * 50, "holds 50 characters"),
                          ("abcdefgh" * 40, "holds fewer than --batch_size=12 windows of --block_size=64")):
        (tmp_path / "data" / "e").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "e" / "input.txt").write_text(text)
        r = cli("train.py", "--dataset=e_char", f"--data_dir={tmp_path / 'data'}", "--device=cpu",
                f"--out_dir={tmp_path / 'o'}")
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_bad_checkpoints_are_reported_and_left_alone(data_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for name, payload in (("truncated", None), ("foreign", {"model": {}})):
        path = out / "ckpt.pt"
        if payload is None:
            torch.save({"format": "eso-lm/2", "model": {"w": torch.zeros(1000)}}, path)
            path.write_bytes(path.read_bytes()[:300])
        else:
            torch.save(payload, path)
        before = path.read_bytes()
        for script, args in (("sample.py", ["--device=cpu"]),
                             ("train.py", [*TINY_TRAIN, f"--data_dir={data_dir}", "--eval_only=True"])):
            r = cli(script, f"--out_dir={out}", *args)
            expected = "is not a readable checkpoint" if name == "truncated" else "is not an Eso-LM checkpoint"
            assert r.returncode == 1 and expected in r.stderr and r.stderr.count("\n") == 1, (name, script, r.stderr)
        assert path.read_bytes() == before, "a failed load must not touch the file"


def test_cuda_without_a_gpu(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the message is for machines without a CUDA GPU")
    out = tmp_path / "o"
    assert cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
               "--eval_interval=2").returncode == 0
    for script, arg in (("train.py", f"--data_dir={data_dir}"), ("sample.py", f"--out_dir={out}")):
        r = cli(script, "--device=cuda", arg)
        assert r.returncode == 1 and "--device=cuda is not a device of this machine" in r.stderr, r.stderr


def test_ctrl_c_under_ddp_stops_every_rank_and_saves(data_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the ranks agree on the iteration to stop at
    (an all-reduce of the flag), rank 0 saves it, and no worker dies mid-step. (torchrun itself then
    reports the signal with a traceback of its own, as it does for any script.)"""
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}",
                          "--max_iters=100000", "--eval_interval=2",
                          "--gradient_accumulation_steps=2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate(timeout=30)[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    output, _ = p.communicate(timeout=120)
    stopped = re.search(r"interrupted at iter (\d+)", output)
    assert stopped, output[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["iter_num"] == int(stopped[1]) > 0
    assert "train.py" not in output.split("interrupted at iter")[1], "a worker raised after the stop"
