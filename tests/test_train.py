"""train.py and data.py as a user runs them: checkpoints, resume, eval.json, and bad input."""
import json

import numpy as np
import pytest
import torch
from conftest import TEXT, TINY_TRAIN, run

from data import Tokenizer, eval_batches, get_batch, load_split, prepare


def test_char_dataset_layout(data_dir):
    """data/<name>_char reads data/<name>/input.txt: 90/10 split by characters, uint16, nanoGPT's meta.pkl."""
    meta = prepare("tiny_char", str(data_dir))
    train, val = load_split("tiny_char", "train", str(data_dir)), load_split("tiny_char", "val", str(data_dir))
    assert train.dtype == np.uint16 and len(train) == int(len(TEXT) * 0.9) and len(train) + len(val) == len(TEXT)
    tok = Tokenizer(meta)
    assert meta["vocab_size"] == len(set(TEXT)) and tok.decode(train[:20].tolist()) == TEXT[:20]
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tok.encode("Zebra~")


def test_batches(data_dir):
    prepare("tiny_char", str(data_dir))
    val = load_split("tiny_char", "val", str(data_dir))
    x = get_batch(val, 5, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 16) and x.dtype == torch.long
    batches = list(eval_batches(val, 4, 16))
    assert all(b.shape == (4, 16) for b in batches) and len(batches) == len(val) // 16 // 4
    assert torch.equal(batches[0][1], torch.from_numpy(val[16:32].astype(np.int64))), "consecutive windows"
    spread = list(eval_batches(val, 4, 16, max_windows=8))
    assert len(spread) == 2


def test_train_writes_checkpoint_and_eval_json_then_resumes(data_dir, tmp_path):
    out = tmp_path / "out"
    r = run("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4",
            "--eval_interval=2", "--alpha_0=0.5")
    assert r.returncode == 0, r.stderr
    assert "saving checkpoint" in r.stdout + r.stderr and "exact NLL, K=4" in r.stdout + r.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and ckpt["config"]["alpha_0"] == 0.5 and "optimizer" in ckpt
    metrics = json.loads((out / "eval.json").read_text())
    assert set(metrics) >= {"nelbo", "nll_k1", "nll_k4", "alpha_0", "iter"} and metrics["iter"] == 4
    assert metrics["nll_k4"] <= metrics["nll_k1"] + 1e-3

    r = run("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
            "--eval_interval=2", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 6
    assert json.loads((out / "eval.json").read_text())["iter"] == 6

    r = run("train.py", f"--out_dir={out}", f"--data_dir={data_dir}", "--eval_only=True", "--eval_windows=8",
            "--eval_k=4", "--device=cpu", "--batch_size=4")
    assert r.returncode == 0, r.stderr
    assert "NELBO" in r.stderr + r.stdout and json.loads((out / "eval.json").read_text())["iter"] == 6


@pytest.mark.parametrize("flag, message", [
    ("--alpha_0=1.5", "--alpha_0=1.5 must be in [0, 1]"),
    ("--no_such_flag=1", "unknown flag --no_such_flag"),
    ("--batch_size=abc", "--batch_size expects int"),
    ("--compile=maybe", "--compile expects True or False"),
    ("--block_size=100000", "--block_size=100000 is longer than the val split"),
    ("--loss_type=mse", "--loss_type=mse must be elbo or low_var"),
    ("--dataset=nothing_here", "needs its text at"),
    ("--init_from=resume", "no checkpoint at"),
    ("--eval_windows=2", "--eval_windows=2 must be 0 (all) or at least --batch_size=4"),
    ("--block_size=150", "holds fewer than --batch_size=4 windows of 150"),
])
def test_bad_input_is_one_line(data_dir, tmp_path, flag, message):
    r = run("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=1", flag)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_both_flag_forms(data_dir, tmp_path):
    """--key value works like --key=value."""
    r = run("train.py", *TINY_TRAIN, "--data_dir", data_dir, "--out_dir", tmp_path / "o", "--max_iters", "0",
            "--alpha_0", "1", "--eval_k", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["alpha_0"] == 1.0


def test_sample_cli(data_dir, tmp_path):
    """sample.py finds the newest out*/ckpt.pt, prints samples and one NFE line; errors are one line."""
    r = run("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", "--out_dir=out-tiny", "--max_iters=2",
            "--eval_interval=2", "--alpha_0=0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("sample.py", "--steps", "4", "--num_samples=2", "--start=First", "--device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "loaded out-tiny/ckpt.pt" in r.stderr and r.stdout.count("---------------") == 2
    assert r.stdout.startswith("First") and "NFE" in r.stdout.splitlines()[-1]
    r = run("sample.py", "--infill=First __ Citizen", "--kv_cache=False", "--num_samples=1", "--device=cpu",
            cwd=tmp_path)
    line = r.stdout.split("\n")[0]
    assert r.returncode == 0 and line[:6] == "First " and line[8:16] == " Citizen" and "_" not in line, r.stdout
    assert "2 tokens generated" in r.stdout, "an infill text is the whole sequence: only its gaps are generated"
    for flag, message in [("--steps=0", "--steps=0 must be at least 1"), ("--length=999", "above the trained block"),
                          ("--start=" + "a" * 40, "longer than --length"), ("--start=~~", "not in this model's vocab"),
                          ("--top_p=0", "--top_p=0.0 must be in (0, 1]"), ("--alpha_0=-0.5", "must be in [0, 1]"),
                          ("--out_dir=nowhere", "no checkpoint at nowhere/ckpt.pt"),
                          ("--start=First Citizen:\nB", "nothing to generate"),
                          ("--infill=" + "First _" * 4, "above the trained block size")]:
        r = run("sample.py", flag, "--device=cpu", cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, (flag, r.stderr)


def test_bpe_dataset(data_dir):
    """--dataset=<name> is GPT-2 BPE (nanoGPT's 'shakespeare'); tiktoken needs its files once (CI seeds them)."""
    meta = prepare("tiny", str(data_dir))
    tok = Tokenizer(meta)
    train, val = load_split("tiny", "train", str(data_dir)), load_split("tiny", "val", str(data_dir))
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert tok.decode(list(train) + list(val)) == TEXT[: int(len(TEXT) * 0.9)] + TEXT[int(len(TEXT) * 0.9):]
