"""
Datasets in nanoGPT's layout, built on first use:

    data/<name>/input.txt   raw text (Tiny Shakespeare is downloaded when missing)
    data/<name>/train.bin   uint16 tokens, first 90% of the text
    data/<name>/val.bin     uint16 tokens, last 10%
    data/<name>/meta.pkl    {'vocab_size', 'tokenizer', 'stoi', 'itos'} (nanoGPT's meta.pkl, plus 'tokenizer')

`--dataset=<name>` tokenises data/<name>/input.txt with GPT-2 BPE (tiktoken), as nanoGPT's `shakespeare`;
`--dataset=<name>_char` tokenises the same text by characters (reading data/<name>_char/input.txt instead
if that exists, as nanoGPT's `shakespeare_char` folder has one).
"""
import os
import pickle
import urllib.request

import numpy as np
import torch

from configurator import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def _input_path(dataset, data_dir):
    own = os.path.join(data_dir, dataset, "input.txt")
    if os.path.exists(own) or not dataset.endswith("_char"):
        return own
    return os.path.join(data_dir, dataset[: -len("_char")], "input.txt")


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file of this process beside `path`, then rename it over `path`: a crash
    leaves the old file or the new one, never half of one, and DDP ranks writing the same file cannot collide."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _download_shakespeare(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            text = r.read()
    except OSError as e:
        raise UserError(f"could not download Tiny Shakespeare ({getattr(e, 'reason', e)}); with no network, "
                        f"save {SHAKESPEARE_URL} as {path} by hand")
    atomic_write(path, lambda f: f.write(text))


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its BPE files on first use
        raise UserError(f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}); connect to the "
                        "network once, or point TIKTOKEN_CACHE_DIR at a folder that holds them")


def prepare(dataset, data_dir="data"):
    """Build data/<dataset>/{train,val}.bin and meta.pkl if missing; return the meta dict."""
    out = os.path.join(data_dir, dataset)
    meta_path = os.path.join(out, "meta.pkl")
    bins = [os.path.join(out, f"{s}.bin") for s in ("train", "val")]
    if not (os.path.exists(meta_path) and all(map(os.path.exists, bins))):
        src = _input_path(dataset, data_dir)
        if not os.path.exists(src):
            if os.path.basename(os.path.dirname(src)) != "shakespeare":
                raise UserError(f"dataset '{dataset}' needs its text at {src}")
            _download_shakespeare(src)
        with open(src, encoding="utf-8", errors="replace") as f:
            text = f.read()
        n = len(text)
        if n < 100:
            raise UserError(f"{src} holds {n} characters; a dataset needs at least a few thousand")
        if dataset.endswith("_char"):
            chars = sorted(set(text))
            meta = {"vocab_size": len(chars), "tokenizer": "char",
                    "stoi": {ch: i for i, ch in enumerate(chars)}, "itos": {i: ch for i, ch in enumerate(chars)}}
            encode = lambda s: [meta["stoi"][c] for c in s]
        else:
            enc = gpt2_encoding()
            meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}
            encode = enc.encode_ordinary
        os.makedirs(out, exist_ok=True)
        for path, part in zip(bins, (text[: int(n * 0.9)], text[int(n * 0.9):])):
            atomic_write(path, np.array(encode(part), dtype=np.uint16).tofile)
        atomic_write(meta_path, lambda f: pickle.dump(meta, f))
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)
    meta.setdefault("tokenizer", "char" if "stoi" in meta else "gpt2")  # a meta.pkl written by nanoGPT
    return meta


def load_split(dataset, split, data_dir="data"):
    """The tokens of one split as a read-only uint16 memmap."""
    return np.memmap(os.path.join(data_dir, dataset, f"{split}.bin"), dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, device="cpu", generator=None):
    """nanoGPT's sampler: `batch_size` random windows of `block_size` tokens, (B, T) int64 on `device`.
    There are no targets: every objective here predicts x itself (masked positions, or AR through z0 ⊕ x)."""
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    x = torch.from_numpy(np.stack([data[i: i + block_size].astype(np.int64) for i in ix.tolist()]))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def eval_batches(data, batch_size, block_size, device="cpu", max_windows=0):
    """Fixed non-overlapping windows of a split, in full batches: all of them, or `max_windows` spread
    evenly over the split. The same windows every time, so numbers compare across runs and α0."""
    n = len(data) // block_size
    keep = torch.arange(n) if not max_windows or max_windows >= n else torch.linspace(0, n - 1, max_windows).long()
    keep = keep[: len(keep) // batch_size * batch_size]
    windows = torch.from_numpy(data[: n * block_size].astype("int64")).view(n, block_size)[keep]
    for i in range(0, len(keep), batch_size):
        yield windows[i: i + batch_size].to(device)


class Tokenizer:
    """encode/decode for a meta dict: characters (with a clear error for unknown ones) or GPT-2 BPE."""

    def __init__(self, meta):
        self.meta = meta
        self.vocab_size = meta["vocab_size"]
        self.is_char = meta["tokenizer"] == "char"
        if not self.is_char:
            self.enc = gpt2_encoding()

    def encode(self, text):
        if not self.is_char:
            return self.enc.encode(text, allowed_special={"<|endoftext|>"})
        unknown = sorted(set(text) - set(self.meta["stoi"]))
        if unknown:
            raise UserError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
        return [self.meta["stoi"][c] for c in text]

    def decode(self, ids):
        if not self.is_char:
            return self.enc.decode(list(ids))
        return "".join(self.meta["itos"][i] for i in ids)
