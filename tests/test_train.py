"""train.py and data.py as a user runs them: checkpoints, resume, eval.json, and bad input."""
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, TEXT, TINY_TRAIN, cli, run

from configurator import UserError, parse_args, run_cli
from data import Tokenizer, eval_batches, get_batch, load_split, prepare, token_bytes
from model import few_rows_transposed
from sample import SampleConfig
from train import TrainConfig, default_out_dir


def test_char_dataset_layout(data_dir):
    """data/<name>_char reads data/<name>/input.txt: 90/10 split by characters, uint16, nanoGPT's meta.pkl; a
    folder nanoGPT prepared (its meta.pkl has no tokenizer and no stamp of the text) is read as it is."""
    meta = prepare("tiny_char", str(data_dir))
    train, val = load_split("tiny_char", "train", str(data_dir)), load_split("tiny_char", "val", str(data_dir))
    assert train.dtype == np.uint16 and len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    tok = Tokenizer(meta)
    assert meta["vocab_size"] == len(set(TEXT)) and tok.decode(train[:20].tolist()) == TEXT[:20]
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tok.encode("Zebra~")
    nanogpt = {k: meta[k] for k in ("vocab_size", "itos", "stoi")}
    (data_dir / "tiny_char" / "meta.pkl").write_bytes(pickle.dumps(nanogpt))
    (data_dir / "tiny" / "input.txt").write_text(TEXT + "Zebra~")  # (no stamp: not compared)
    assert prepare("tiny_char", str(data_dir)) == {"tokenizer": "char", **nanogpt}


def test_batches(data_dir):
    prepare("tiny_char", str(data_dir))
    val = load_split("tiny_char", "val", str(data_dir))
    x = get_batch(val, 5, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 16) and x.dtype == torch.long
    batches = list(eval_batches(val, 4, 16))
    assert all(b.shape == (4, 16) for b in batches) and len(batches) == len(val) // 16 // 4
    assert torch.equal(batches[0][1], torch.from_numpy(val[16:32].astype(np.int64))), "consecutive windows"
    spread = list(eval_batches(val, 4, 16, max_windows=8))
    n = len(val) // 16
    last = torch.from_numpy(val[(n - 1) * 16: n * 16].astype(np.int64))
    assert len(spread) == 2 and torch.equal(spread[-1][-1], last), "max_windows spreads its windows to the last one"


def test_train_writes_checkpoint_and_eval_json_then_resumes(data_dir, tmp_path):
    """ckpt.pt holds the weights of the best periodic val loss (what sample.py and --eval_only read) and the final
    eval measures them, saying which iteration they come from; last.pt holds the latest state, optimizer
    included, and --init_from=resume continues from it."""
    out = tmp_path / "out"
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4",
            "--eval_interval=2", "--alpha_0=0.5")
    assert r.returncode == 0, r.stderr
    assert "saving checkpoint" in r.stdout and "IW NLL, K=4" in r.stdout and "val IW NLL (K=1)" in r.stdout
    best, last = (torch.load(out / name, weights_only=True) for name in ("ckpt.pt", "last.pt"))
    assert last["iter_num"] == 4 and last["config"]["alpha_0"] == 0.5 and "optimizer" in last
    vals = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): .*val nelbo ([0-9.]+)", r.stdout)}
    assert best["iter_num"] == min((i for i in vals if i > 0), key=vals.get) and "optimizer" not in best
    metrics = json.loads((out / "eval.json").read_text())
    assert set(metrics) >= {"nelbo", "iw_nll_k1", "iw_nll_k4", "alpha_0", "iter", "trained_iters", "nelbo_bpb",
                            "iw_nll_k4_bpb"}
    assert metrics["bytes_per_token"] == 1 and abs(metrics["nelbo_bpb"] - metrics["nelbo"] / math.log(2)) < 1e-9, \
        "ASCII characters: one byte per token, bits per byte = nats / ln 2"
    assert metrics["iter"] == best["iter_num"] and metrics["trained_iters"] == 4
    assert f"weights of iter {best['iter_num']}" in r.stdout
    assert metrics["iw_nll_k4"] <= metrics["iw_nll_k1"] + 1e-3

    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
            "--eval_interval=2", "--init_from=resume", "--weight_decay=0.5", "--beta2=0.9")
    assert r.returncode == 0, r.stderr
    assert min(int(i) for i in re.findall(r"iter (\d+): loss", r.stdout)) == 5, "resumes after iteration 4"
    last = torch.load(out / "last.pt", weights_only=True)
    muon, adamw = (opt["param_groups"] for opt in last["optimizer"])  # the optimizers take the flags given again
    assert last["iter_num"] == 6 and muon[0]["weight_decay"] == adamw[0]["weight_decay"] == 0.5, (muon, adamw)
    assert adamw[0]["betas"] == adamw[1]["betas"] == (0.9, 0.9) and adamw[1]["weight_decay"] == 0
    r = cli("train.py", f"--out_dir={out}", "--device=cpu", "--init_from=resume")  # at max_iters: no step, saved as is
    again = torch.load(out / "last.pt", weights_only=True)
    settings = lambda groups: [{k: v for k, v in g.items() if k != "lr"} for g in groups]  # (lr: set at every step)
    assert r.returncode == 0 and [settings(o["param_groups"]) for o in again["optimizer"]] == \
        [settings(muon), settings(adamw)], r.stderr
    assert json.loads((out / "eval.json").read_text())["trained_iters"] == 6

    r = cli("train.py", f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_only=True", "--eval_windows=8",
            "--eval_k=4", "--device=cpu", "--batch_size=4")
    assert r.returncode == 0, r.stderr
    best = torch.load(out / "ckpt.pt", weights_only=True)
    assert "NELBO" in r.stderr + r.stdout and json.loads((out / "eval.json").read_text())["iter"] == best["iter_num"]


def test_the_final_eval_measures_the_best_weights(data_dir, tmp_path, monkeypatch):
    """A run whose best eval is not its last: the final eval (eval.json) measures ckpt.pt's weights, the same
    numbers --eval_only gives from ckpt.pt, not the weights the run ended with."""
    import train
    step = train.Trainer.step

    def ruined(self, it):  # every step after the first eval past iteration 0 ruins the weights (finitely)
        step(self, it)
        if it >= 1:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn_like(p))
    monkeypatch.setattr(train.Trainer, "step", ruined)
    out = tmp_path / "out"
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3",
            "--eval_interval=1")
    best = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert r.returncode == 0 and best == 1, (r.stderr, best)
    monkeypatch.setattr(train.Trainer, "step", step)
    final = json.loads((out / "eval.json").read_text())
    r = cli("train.py", f"--out_dir={out}", "--device=cpu", "--eval_only=True")
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "eval.json").read_text())
    assert final["iter"] == again["iter"] == best and abs(final["nelbo"] - again["nelbo"]) < 1e-6, (final, again)
    assert final["trained_iters"] == again["trained_iters"] == 3, "how far the run trained: last.pt's iteration"


def test_a_resumed_run_writes_where_it_read(data_dir, tmp_path):
    """--init_from=resume without --out_dir reads the default folder of the flags it is given and writes there,
    though the checkpoint's own flags (here another dataset) would name another folder."""
    folder = tmp_path / "out-shakespeare_char-alpha0.5"  # the default of train.py's defaults
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={folder}", "--max_iters=2",
            "--eval_interval=2")
    assert r.returncode == 0, r.stderr
    r = cli("train.py", "--init_from=resume", "--max_iters=4", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0 and f"saving checkpoint to {folder.name}" in r.stdout, r.stdout + r.stderr
    assert [p.name for p in tmp_path.glob("out-*")] == [folder.name]
    assert torch.load(folder / "last.pt", weights_only=True)["iter_num"] == 4
    names = {default_out_dir(TrainConfig(alpha_0=a, denoiser=d)) for a in (0, 0.5, 1, 0.9999999) for d in ("B", "A")}
    assert "out-shakespeare_char-A-alpha1" in names and len(names) == 8, "a folder per alpha_0 and denoiser"


def test_always_save_checkpoint_keeps_the_latest(data_dir, tmp_path):
    """--always_save_checkpoint=True (nanoGPT's flag): ckpt.pt follows every eval, best or not."""
    out = tmp_path / "out"
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3",
            "--eval_interval=1", "--learning_rate=0.5", "--always_save_checkpoint=True")
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 3


@pytest.mark.parametrize("flag, message", [
    ("--alpha_0=1.5", "--alpha_0=1.5 must be in [0, 1]"),
    ("--no_such_flag=1", "unknown flag --no_such_flag; the flags are: dataset, "),
    ("--max_itres=5", "unknown flag --max_itres; did you mean --max_iters?"),
    ("--dataset=../data/tiny_char", "must be the name of a folder in --data_dir"),
    ("--batch_size=abc", "--batch_size expects int"),
    ("--compile=maybe", "--compile expects bool, got 'maybe'"),
    ("--block_size=100000", "holds fewer than --batch_size=4 windows of --block_size=100000"),
    ("--loss_type=mse", "--loss_type=mse must be one of elbo, low_var"),
    ("--dataset=nothing_here", "needs its text at"),
    ("--init_from=resume", "no checkpoint at "),
    ("--eval_windows=2", "--eval_windows=2 must be 0 (all) or at least --batch_size=4"),
    ("--block_size=150", "holds fewer than --batch_size=4 windows of --block_size=150"),
    ("--beta2=1.5", "--beta2=1.5 must be in [0, 1)"),
    ("--weight_decay=-1", "--weight_decay=-1.0 must be >= 0"),
    ("--learning_rate=-1", "--learning_rate=-1.0 must be positive"),
    ("--eval_k=0", "--eval_k=0 must be positive"),
    ("--device=cpu:0", "--device=cpu:0 is not a device of this machine: it has cpu"),
    ("--backend=foo", "--backend=foo must be one of auto, nccl"),
    ("--n_head=0", "--n_head=0 must be positive"),
    ("--n_embd=18", "--n_embd=18 must be --n_head=2 times an even head size"),
    ("--lr_decay_iters=-5", "--lr_decay_iters=-5 must be >= 0"),
    ("--out_dir=" + os.path.join(ROOT, "README.md", "o"), "cannot create --out_dir="),
])
def test_bad_input_is_one_line(data_dir, tmp_path, flag, message):
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", flag)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_is_one_line_and_loses_nothing(data_dir, tmp_path):
    """A data folder that is a file, an input.txt that is a folder, a meta.pkl that is not one, a .bin cut short:
    one line each. .bin files without a meta.pkl (nanoGPT's GPT-2 shakespeare has them) are refused, not
    overwritten."""
    one_line = lambda *flags: cli("train.py", *TINY_TRAIN, f"--out_dir={tmp_path / 'o'}", "--max_iters=1", *flags)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d" / "tiny" / "input.txt").mkdir(parents=True)

    def fails(message, *flags):
        r = one_line(*flags)
        assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and message in r.stderr, (flags, r.stderr)
    fails("dataset 'tiny' needs its text at", "--data_dir=" + str(tmp_path / "afile"), "--dataset=tiny")
    fails("cannot prepare dataset 'tiny': Is a directory", "--data_dir=" + str(tmp_path / "d"), "--dataset=tiny")
    assert cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=0",
               "--eval_iters=1").returncode == 0  # prepares data_dir/tiny_char
    prepared = data_dir / "tiny_char"
    val = (prepared / "val.bin").read_bytes()
    (prepared / "val.bin").write_bytes(val[:-1])
    fails("val.bin is cut short (an odd number of bytes, not uint16 tokens); delete it", f"--data_dir={data_dir}")
    meta = (prepared / "meta.pkl").read_bytes()
    (prepared / "meta.pkl").write_bytes(b"junk")
    fails("meta.pkl cannot be read (UnpicklingError); delete it and the .bin files", f"--data_dir={data_dir}")
    (prepared / "meta.pkl").unlink()
    fails("holds .bin files but no meta.pkl", f"--data_dir={data_dir}")
    assert (prepared / "val.bin").read_bytes() == val[:-1], "bins of unknown ids are never overwritten"
    (prepared / "meta.pkl").write_bytes(meta)
    (prepared / "val.bin").unlink()  # as the cut-short message says: prepared again
    assert cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o1'}", "--max_iters=0",
               "--eval_iters=1").returncode == 0 and (prepared / "val.bin").read_bytes() == val


def test_learning_rate_seeds_and_eval_metrics_in_closed_form():
    """get_lr: linear warmup to the rate, cosine decay to min_lr at lr_decay_iters, min_lr after (nanoGPT's
    values); every micro-batch of every iteration gets its own seed; the eval NELBO weighs by the ELBO whatever
    the training loss; bits per byte divide nats per token by ln 2 and the bytes per token."""
    from conftest import tiny_model
    from train import evaluate, get_lr, micro_seed
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=14, max_iters=20)
    expected = {0: 1 / 5, 3: 4 / 5, 4: 1.0, 9: 0.1 + 0.5 * 0.9, 14: 0.1, 15: 0.1}
    assert all(math.isclose(get_lr(it, cfg), lr) for it, lr in expected.items()), [get_lr(it, cfg) for it in expected]
    seeds = {micro_seed(cfg.seed, it, g) for it in range(30) for g in range(10007)}
    assert len(seeds) == 30 * 10007
    model = tiny_model(vocab_size=7, block_size=12, seed=2)
    x = torch.randint(0, 7, (8, 12), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(alpha_0=0.5, block_size=12)
    elbo = evaluate(model, [x], cfg, contextlib.nullcontext(), torch.full((8,), 2), ks=(1, 4))
    cfg.loss_type = "low_var"
    assert evaluate(model, [x], cfg, contextlib.nullcontext(), torch.full((8,), 2), ks=(1, 4)) == elbo
    assert elbo["bytes_per_token"] == 2
    assert all(math.isclose(elbo[f"{k}_bpb"], elbo[k] / 2 / math.log(2)) for k in ("nelbo", "iw_nll_k1", "iw_nll_k4"))


def test_a_training_step_never_waits_for_the_device(data_dir, tmp_path, monkeypatch):
    """A step of an iteration that logs nothing reads nothing from the device: no .item(), int(), .tolist() or
    .cpu() of a device tensor (the loss and the gradient norm stay there until a log line or an eval reads them).
    It runs through with the model, its optimizers and the batches on PyTorch's "meta" device, where every such
    read raises; with a host read put back (the loss's .item()), the same step fails."""
    import train
    monkeypatch.setattr(train, "pick_device", lambda name: "meta")
    # autocast knows no meta device: it is off there
    monkeypatch.setattr(train, "autocast_context", lambda device, dtype: (contextlib.nullcontext(), "float32"))
    autocast = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *d: False if d and str(d[0]) == "meta" else autocast(*d))
    cfg = TrainConfig()
    keys = parse_args(cfg, [*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--alpha_0=0.5",
                            "--gradient_accumulation_steps=2"])
    run = train.Trainer(cfg, keys)
    for it in (1, 2):  # (the optimizers' moments are made at the first step)
        run.step(it)
    assert {p.device.type for p in run.model.parameters()} == {"meta"} and len(run.pending) == 2
    with pytest.raises(RuntimeError, match="meta"):
        run.read_losses(3)  # a log line's read: on a real device, the one wait
    nelbo = train.nelbo

    def with_a_host_read(*args):
        loss, terms = nelbo(*args)
        loss.item()
        return loss, terms
    monkeypatch.setattr(train, "nelbo", with_a_host_read)
    with pytest.raises(RuntimeError, match="meta"):
        run.step(3)


def test_help_lists_every_flag_with_its_comment():
    """--help prints each flag of the script's config, its default, and what its field's comment says of it."""
    for script, config in (("sample.py", SampleConfig), ("train.py", TrainConfig)):
        r = cli(script, "--help")
        lines = r.stdout.splitlines()[1:]
        assert r.returncode == 0 and [line.split("=")[0].strip() for line in lines] == \
            [f"--{f.name}" for f in dataclasses.fields(config)], r.stdout
    assert "--alpha_0=-1.0  # fraction of tokens by diffusion; default: the alpha_0 the checkpoint" in \
        cli("sample.py", "--help").stdout
    r = cli("train.py", "--eval_only", "--help")  # --help where a flag's value would be: the help all the same
    assert r.returncode == 0 and r.stdout.startswith("flags (default)"), r.stdout + r.stderr


def test_both_flag_forms(data_dir, tmp_path):
    """--key value works like --key=value."""
    r = cli("train.py", *TINY_TRAIN, "--data_dir", data_dir, "--out_dir", tmp_path / "o", "--max_iters", "0",
            "--alpha_0", "1", "--eval_k", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["alpha_0"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--eval_only", "--max_iters", "5"], "--eval_only needs a value, e.g. --eval_only=..., before --max_iters"),
    (["--eval_only"], "--eval_only needs a value"),
    (["--learning_rate=[1]"], "--learning_rate expects float, got '[1]'"),
    (["CONFIG"], "unknown key wandb_log in config file CONFIG; the flags are"),
])
def test_bad_flags_name_the_problem(tmp_path, argv, message):
    """A flag with no value before the next flag, a value not of the flag's type, a config file's unknown key."""
    config = tmp_path / "config.py"
    config.write_text("batch_size = 4\nwandb_log = False\n")  # (nanoGPT's config files log to wandb)
    assert "dataset" in parse_args(TrainConfig(), ["--dataset", "--odd-name"]), "a value may start with --"
    with pytest.raises(UserError, match=re.escape("--out_dir needs a value, e.g. --out_dir=..., before --devcie=cpu")):
        parse_args(TrainConfig(), ["--out_dir", "--devcie=cpu"])  # unless it names a flag, or nearly does
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    with pytest.raises(UserError) as e:
        parse_args(TrainConfig(), argv)
    assert message.replace("CONFIG", str(config)) in str(e.value), e.value


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # (the CPU build's torch.autocast, for "cuda")
def test_bf16_only_where_the_chosen_gpu_has_it_and_host_copies_go_pinned(monkeypatch):
    """--dtype=auto is bf16 on a CUDA GPU of compute capability 8.0 or more (bf16 in hardware), asked of the chosen
    device, not the current one, and fp32 on older GPUs (which only emulate bf16) and off CUDA. to_device copies a
    host tensor to a CUDA device through pinned memory, without waiting (non_blocking), and plainly elsewhere."""
    from configurator import autocast_context, to_device
    asked = []
    for capability, dtype in (((7, 5), "float32"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability)
        assert autocast_context("cuda:1", "auto")[1] == dtype, capability
    assert asked == ["cuda:1"] * 3 and autocast_context("cpu", "auto")[1] == "float32"

    class Host:
        def pin_memory(self):
            calls.append("pinned")
            return self

        def to(self, device, non_blocking=False):
            calls.append((device, non_blocking))
    for device, expected in (("cuda:1", ["pinned", ("cuda:1", True)]), ("cpu", [("cpu", False)])):
        calls = []
        to_device(Host(), device)
        assert calls == expected, (device, calls)


def test_sample_cli(data_dir, tmp_path, monkeypatch, capsys):
    """sample.py finds the newest out*/ckpt.pt, prints samples and one NFE line; errors are one line."""
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", "--out_dir=out-tiny", "--max_iters=2",
            "--eval_interval=2", "--alpha_0=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("sample.py", "--steps", "4", "--num_samples=2", "--start=First", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "loaded out-tiny/ckpt.pt" in r.stderr and r.stdout.count("---------------") == 2
    assert r.stdout.startswith("First") and "NFE" in r.stdout.splitlines()[-1]
    r = cli("sample.py", "--infill=First __ Citizen", "--kv_cache=False", "--num_samples=1", "--device=cpu",
            cwd=tmp_path)
    line = r.stdout.split("\n")[0]
    assert r.returncode == 0 and line[:6] == "First " and line[8:16] == " Citizen" and "_" not in line, r.stdout
    assert "2 tokens generated" in r.stdout, "an infill text is the whole sequence: only its gaps are generated"
    (tmp_path / "latin1.txt").write_bytes("Citizen caf\xe9".encode("latin-1"))
    for flag, message in [("--steps=0", "--steps=0 must be >= 1"),
                          (("--length=99", "--chunk=16"), "--chunk=16 must be below block_size=16"),
                          (("--infill=First _", "--length=99"), "--infill works within one block"),
                          (("--start=First", "--length=3"), "the prompt is 5 tokens, longer than --length=3"),
                          ("--start=~~", "not in this model's vocab"),
                          ("--length=-1", "--length and --chunk must be >= 0"),
                          ("--trajectory=nowhere/t.svg", "--trajectory=nowhere/t.svg must name a file in a folder"),
                          ("--trajectory=out-tiny", "--trajectory=out-tiny must name a file in a folder that exists"),
                          ("--max_new_tokens=9", "unknown flag --max_new_tokens; did you mean --length?"),
                          ("--top_p=0", "--top_p=0.0 must be in (0, 1]"), ("--alpha_0=-0.5", "must be in [0, 1]"),
                          ("--out_dir=nowhere", "no checkpoint at nowhere/ckpt.pt"),
                          ("--start=First Citizen:\nB", "nothing to generate: the prompt has no gaps and fills"),
                          (("--score=First", "--trajectory=t.svg"), "--score scores a text on its own"),
                          ("--infill=" + "First _" * 4, "--infill works within one block (16 tokens): the text is 28"),
                          ("--score=FILE:latin1.txt", "cannot read latin1.txt as UTF-8 text (UnicodeDecodeError)"),
                          (("--chunk=16", "--score=" + "First " * 9), "--chunk=16 must be below block_size=16"),
                          ((), "ESO_LM_FEW_ROWS='bogus' must be 'linear' or 'transposed'")]:
        with monkeypatch.context() as env:
            if flag == ():  # no flag: the environment is wrong (read afresh, and forgotten after)
                env.setenv("ESO_LM_FEW_ROWS", "bogus")
                few_rows_transposed.cache_clear()
            r = cli("sample.py", *((flag,) if isinstance(flag, str) else flag), "--device=cpu", cwd=tmp_path)
        few_rows_transposed.cache_clear()
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, (flag, r.stderr)
    r = cli("sample.py", "--start=" + "a" * 40, "--length=50", "--num_samples=1", "--device=cpu", "--steps=4",
            "--trajectory=t.svg", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("a" * 40) and "10 tokens generated" in r.stdout, r.stdout
    assert re.search(r">  1 d <", (tmp_path / "t.svg").read_text()), "the window with masks is drawn, a row per pass"
    # more memory than any address space holds (2**58 bytes: no machine tries, whatever its overcommit), and sizes
    # whose product overflows int64
    r = cli("sample.py", f"--length={2 ** 24}", f"--num_samples={2 ** 31 - 1}", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: out of memory; use a smaller"), r.stderr
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: torch.empty(2 ** 40, 2 ** 30))
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: out of memory; use a smaller")
    # a console that cannot show ␣ (the surprise listing's space) shows '?'
    r = run("sample.py", "--score=First Citizen", "--device=cpu", cwd=tmp_path,
            env={**os.environ, "PYTHONIOENCODING": "cp1252"}, encoding="cp1252")
    assert r.returncode == 0 and "(mean over the orderings; ? a space" in r.stdout, r.stderr


def test_bpe_dataset(data_dir):
    """--dataset=<name> is GPT-2 BPE (nanoGPT's 'shakespeare') over a compact vocabulary: the GPT-2 tokens that
    occur in the text, renumbered densely. The token sequences are GPT-2's (mapped back, they equal tiktoken's
    encoding of each split), encode -> decode is the identity, a prompt that needs a token the model never
    had is one clear error naming it, and a literal "<|endoftext|>" is text to prepare and to a prompt alike.
    (tiktoken needs its files once: CI seeds them.)"""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    meta = prepare("tiny", str(data_dir))
    tok = Tokenizer(meta)
    train, val = load_split("tiny", "train", str(data_dir)), load_split("tiny", "val", str(data_dir))
    split = int(len(TEXT) * 0.9)
    gpt2 = np.array(meta["gpt2_ids"])
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == len(set(enc.encode_ordinary(TEXT[:split])) |
                                                                     set(enc.encode_ordinary(TEXT[split:])))
    assert gpt2[train].tolist() == enc.encode_ordinary(TEXT[:split])
    assert gpt2[val].tolist() == enc.encode_ordinary(TEXT[split:])
    assert train.max() < meta["vocab_size"] and (np.diff(gpt2) > 0).all()
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.decode(list(train) + list(val)) == TEXT
    nbytes = token_bytes(meta)
    assert int(nbytes[torch.from_numpy(train.astype("int64"))].sum()) == len(TEXT[:split].encode()), "bits per byte"
    with pytest.raises(ValueError, match="GPT-2 tokens not in this model's vocabulary: ' z', 'ebra'"):
        tok.encode("First Citizen: zebra")
    # documents joined by "<|endoftext|>", as nanoGPT's corpora are: prepare and a prompt encode it alike, as text
    (data_dir / "eot").mkdir()
    text = "<|endoftext|>".join([TEXT[:400]] * 5)
    (data_dir / "eot" / "input.txt").write_text(text)
    eot = Tokenizer(prepare("eot", str(data_dir)))
    assert eot.encode(text[:int(len(text) * 0.9)]) == load_split("eot", "train", str(data_dir)).tolist()


def test_prepare_streams_in_pieces(data_dir, monkeypatch):
    """prepare() encodes the text piece by piece (bounded memory), cutting only between a line break and a line
    start, where GPT-2's pre-tokenizer always splits: with tiny pieces (many cuts) it writes exactly the bins of
    the whole text, for BPE and for characters."""
    import data
    whole = {name: (prepare(name, str(data_dir)),
                    [load_split(name, s, str(data_dir)).tolist() for s in ("train", "val")])
             for name in ("tiny", "tiny_char")}
    text = TEXT.replace("\n\n", "\n\n\n    ") + "x" * 500  # runs of line breaks, indents, a long line
    (data_dir / "tiny" / "input.txt").write_text(text)
    for name in ("tiny", "tiny_char"):
        for f in (data_dir / name).glob("*.bin"):
            f.unlink()
    monkeypatch.setattr(data, "PIECE", 97)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    meta = prepare("tiny", str(data_dir))
    gpt2 = np.array(meta["gpt2_ids"])
    split = int(len(text) * 0.9)
    assert gpt2[load_split("tiny", "train", str(data_dir))].tolist() == enc.encode_ordinary(text[:split])
    assert gpt2[load_split("tiny", "val", str(data_dir))].tolist() == enc.encode_ordinary(text[split:])
    meta = prepare("tiny_char", str(data_dir))
    chars = "".join(meta["itos"][i] for s in ("train", "val")
                    for i in load_split("tiny_char", s, str(data_dir)).tolist())
    assert chars == text and len(load_split("tiny_char", "train", str(data_dir))) == split
    assert not list(data_dir.glob("**/*.tmp")) + list(data_dir.glob("**/*.staged")), "no temporary file is left"
    long_line = data_dir / "long.txt"
    long_line.write_text("y" * 5000)  # nowhere to cut: pieces stay bounded all the same
    with open(long_line) as f:
        pieces = list(data.text_pieces(f, 4500))
    assert "".join(pieces) == "y" * 4500 and max(map(len, pieces)) <= 8 * 97
    assert whole["tiny"][0]["vocab_size"] > 0


def test_a_stopped_preparation_leaves_nothing_behind(data_dir, monkeypatch):
    """Ctrl-C while a dataset is encoded (both tokenizers), or while BPE's ids are renumbered, removes every file
    the preparation had begun, and the folder if it made it: the folder holds what it held before (tiny_char/: it
    is not there), and the next prepare() works."""
    import data
    encoded = data.encoded

    def stop_after_one_piece(*args, **kwargs):
        yield next(encoded(*args, **kwargs))
        raise KeyboardInterrupt

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    for name, module, attr, stop in (("tiny_char", data, "encoded", stop_after_one_piece),
                                     ("tiny", data, "encoded", stop_after_one_piece),
                                     ("tiny", data.np, "memmap", ctrl_c)):  # (BPE's renumbering reads a memmap)
        listing = lambda: sorted(p.name for p in (data_dir / name).glob("*")) if (data_dir / name).exists() else None
        before = listing()
        with monkeypatch.context() as m:
            m.setattr(module, attr, stop)
            with pytest.raises(KeyboardInterrupt):
                prepare(name, str(data_dir))
        assert listing() == before, (name, attr)
    (data_dir / "tiny_char").write_text("a file, not the folder")  # not made by prepare(): kept
    with pytest.raises(ValueError, match="cannot prepare dataset 'tiny_char'"):
        prepare("tiny_char", str(data_dir))
    assert (data_dir / "tiny_char").read_text() == "a file, not the folder"
    assert prepare("tiny", str(data_dir))["tokenizer"] == "gpt2"
    assert sorted(p.name for p in (data_dir / "tiny").glob("*")) == ["input.txt", "meta.pkl", "train.bin", "val.bin"]


def test_a_changed_text_is_prepared_again_and_a_checkpoint_keeps_its_tokenizer(data_dir, tmp_path):
    """An input.txt edited after it was prepared is prepared again, one only touched is not; a run resumed from a
    checkpoint whose tokenizer the new text no longer has stops in one line (its data folder is the checkpoint's)."""
    out = tmp_path / "o"
    assert cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1").returncode == 0
    assert "Z" not in prepare("tiny_char", str(data_dir))["stoi"]
    text, train_bin = data_dir / "tiny" / "input.txt", data_dir / "tiny_char" / "train.bin"
    written = train_bin.stat().st_mtime_ns
    os.utime(text, ns=(text.stat().st_atime_ns, text.stat().st_mtime_ns + 10 ** 9))  # touched (a copy, a checkout)
    assert "Z" not in prepare("tiny_char", str(data_dir))["stoi"] and train_bin.stat().st_mtime_ns == written, \
        "the same text (its hash) is not prepared again"
    text.write_text(TEXT + "Zebra!\n")
    r = cli("train.py", "--init_from=resume", f"--out_dir={out}", "--device=cpu", "--max_iters=2")
    assert r.returncode == 1 and "trained with another tokenizer" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "has changed since" in r.stdout and "Z" in prepare("tiny_char", str(data_dir))["stoi"]


def test_prepare_reads_any_bytes_as_it_counts_them(tmp_path):
    """Windows line endings, a stray Latin-1 byte and a file cut inside a UTF-8 character: the text is read with
    universal newlines and replacement characters, counted the same way, split 90/10 by those characters,
    and decodes back to exactly that text (for characters and for BPE)."""
    raw = ("First Citizen:\r\nBefore we proceed any further, hear me speak caf\u00e9.\r\n\r\n".encode() +
           b"All:\r\nSpeak, speak \xa0 now.\r\n") * 40 + "\u00e9".encode()[:1]
    (tmp_path / "crlf").mkdir()
    (tmp_path / "crlf" / "input.txt").write_bytes(raw)
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    for name in ("crlf_char", "crlf"):
        tok = Tokenizer(prepare(name, str(tmp_path)))
        train, val = (load_split(name, s, str(tmp_path)).tolist() for s in ("train", "val"))
        assert tok.decode(train) == text[: int(len(text) * 0.9)] and tok.decode(val) == text[int(len(text) * 0.9):]


def test_long_samples_and_scores_from_the_command_line(data_dir, tmp_path):
    """sample.py --length past the block size prints samples of exactly that length; --score prints the text's
    log-likelihood in nats, nats per token and bits per byte, and each token's surprise, and --score_svg draws
    them with a legend; a character the model never had is one line naming it; an MDLM checkpoint, which has no
    one-pass likelihood, is refused in one line."""
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", "--out_dir=out-tiny", "--max_iters=2",
            "--eval_interval=2", "--alpha_0=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("sample.py", "--length=45", "--start=First", "--num_samples=2", "--steps=4", "--device=cpu", cwd=tmp_path)
    samples = r.stdout.split("---------------\n")[:2]
    assert r.returncode == 0 and [len(s) for s in samples] == [46, 46] and samples[0].startswith("First"), r.stdout
    svg = tmp_path / "s.svg"
    text = "First Citizen:\nSpeak, speak."  # 28 characters, all ASCII
    r = cli("sample.py", f"--score={text}", "--score_k=4", f"--score_svg={svg}", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    head = r.stdout.splitlines()
    assert head[0].startswith("28 tokens, 28 UTF-8 bytes") and "importance-weighted over K=4" in head[0], head
    nats, per_token, bpb = re.search(r"(-[0-9.]+) nats: ([0-9.]+) nats/token, ([0-9.]+) bits/byte", head[1]).groups()
    assert abs(-float(nats) / 28 - float(per_token)) < 1e-3 and abs(float(per_token) / math.log(2) - float(bpb)) < 1e-3
    assert len(re.findall(r":[0-9]+\.[0-9]{2}\b", r.stdout)) == 28 and "-log p of each token" in svg.read_text()
    r = cli("sample.py", "--score=First ~", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 1 and "'~'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", "--out_dir=mdlm", "--max_iters=1", "--alpha_0=1",
            "--denoiser=mdlm", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("sample.py", "--score=First Citizen", "--out_dir=mdlm", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 1 and "denoiser mdlm has no one-pass likelihood" in r.stderr and not r.stdout, r.stderr
