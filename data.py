"""
Datasets in nanoGPT's layout, built on first use:

    data/<name>/input.txt   raw text (Tiny Shakespeare is downloaded when missing)
    data/<name>/train.bin   uint16 tokens, first 90% of the text
    data/<name>/val.bin     uint16 tokens, last 10%
    data/<name>/meta.pkl    {'vocab_size', 'stoi', 'itos'} for characters (nanoGPT's meta.pkl), {'vocab_size',
                            'gpt2_ids'} for BPE; both with 'tokenizer' and 'sha256' (input.txt's)

`--dataset=<name>` tokenises data/<name>/input.txt with GPT-2 BPE (tiktoken), as nanoGPT's `shakespeare`;
`--dataset=<name>_char` tokenises the same text by characters (reading data/<name>_char/input.txt instead
if that exists, as nanoGPT's `shakespeare_char` folder has one).

Checkpoints are files too: train.py writes them and every script reads them through load_checkpoint.
"""
import contextlib
import hashlib
import itertools
import os
import pickle
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from configurator import UserError, to_device

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PIECE = 1 << 20  # characters of text encoded at a time: memory stays bounded whatever the file's size
SAFE_CUT = re.compile(r"(?=[\n ]\S)")  # before a line break or space that precedes a non-space: GPT-2's
# pre-tokenizer ends a token there whatever follows (a word takes its leading space, a run of whitespace ends
# before its last character), so pieces cut there encode exactly as the whole text does (tested)


@contextlib.contextmanager
def removed_on_error(*paths):
    """If the block raises (Ctrl-C included), remove whichever of `paths` exist (files, and folders left empty):
    a failed or stopped write leaves nothing behind."""
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):  # (not there, or a folder that holds something: kept)
                (os.rmdir if os.path.isdir(path) else os.remove)(path)
        raise


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside `path`, on disk, then rename it over `path`: a crash leaves the old
    file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with removed_on_error(tmp):
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its BPE files on first use
        raise UserError(f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}); connect to the "
                        "network once, or point TIKTOKEN_CACHE_DIR at a folder that holds them")


def prepare(dataset, data_dir="data"):
    """Build data/<dataset>/{train,val}.bin and meta.pkl if missing, or again if input.txt has changed since;
    return the meta dict. Not safe to run twice at once on one folder: under DDP, rank 0 prepares while the
    others wait at a barrier."""
    out, name = os.path.join(data_dir, dataset), dataset.removesuffix("_char")
    bins, meta_path = [os.path.join(out, f"{split}.bin") for split in ("train", "val")], os.path.join(out, "meta.pkl")
    src = os.path.join(out, "input.txt")
    if not os.path.exists(src):
        src = os.path.join(data_dir, name, "input.txt")
    try:
        if os.path.exists(meta_path):
            try:
                with open(meta_path, "rb") as f:
                    meta = {"tokenizer": "char", **pickle.load(f)}  # (nanoGPT's meta.pkl: characters)
            except Exception as e:
                raise UserError(f"{meta_path} cannot be read ({type(e).__name__}); delete it and the .bin files "
                                "beside it to prepare the dataset again")
            if all(map(os.path.exists, bins)) and not _changed(src, meta):
                return meta
        elif any(map(os.path.exists, bins)):
            raise UserError(f"{out} holds .bin files but no meta.pkl to say what their ids are (nanoGPT's GPT-2 "
                            "shakespeare?): move them away to prepare the dataset here")
        if not os.path.exists(src):
            if name != "shakespeare":
                raise UserError(f"dataset '{dataset}' needs its text at {src}")
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    text = r.read()
            except OSError as e:
                raise UserError(f"could not download Tiny Shakespeare ({getattr(e, 'reason', e)}); with no network, "
                                f"save {SHAKESPEARE_URL} as {src} by hand (mkdir -p {os.path.dirname(src)} first)")
            os.makedirs(os.path.dirname(src), exist_ok=True)
            atomic_write(src, lambda f: f.write(text))
        staged = [f"{path}.{os.getpid()}.tmp" for path in bins]
        os.makedirs(out, exist_ok=True)
        with removed_on_error(*staged, out):  # (out: only if that leaves it empty)
            # (stamped before it is read: a text edited while it is prepared is prepared again next time)
            meta = {"sha256": _sha256(src), **_encode(src, dataset.endswith("_char"), staged)}
            for tmp, path in zip(staged, bins):
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())  # on disk before it is renamed into place
                os.replace(tmp, path)
            atomic_write(meta_path, lambda f: pickle.dump(meta, f))  # last: the bins beside it are complete
        return meta
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise UserError(f"cannot prepare dataset '{dataset}': {e.strerror or e}{where}")


def _encode(src, char_level, paths):
    """Write the token ids of src's first 90% of characters to paths[0] and of the rest to paths[1], a piece at a
    time on every core; return the meta dict. BPE keeps only the GPT-2 tokens that occur, renumbered densely
    (meta['gpt2_ids'] maps them back): Tiny Shakespeare uses 11,706 of GPT-2's 50,257, so the output layer is
    4x smaller and the token sequences are nanoGPT's, relabelled."""
    with open(src, encoding="utf-8", errors="replace") as f:
        n, chars = 0, set()
        while block := f.read(PIECE):
            n += len(block)
            chars.update(block if char_level else "")
        if n < 100:
            raise UserError(f"{src} holds {n} characters; a dataset needs at least 100 (and a few thousand to learn)")
        stoi = {c: i for i, c in enumerate(sorted(chars))}
        encode = (lambda piece: [stoi[c] for c in piece]) if char_level else gpt2_encoding().encode_ordinary
        f.seek(0)
        used, split = np.zeros(1 << 16, bool), int(n * 0.9)  # (used: the GPT-2 ids that occur)
        for path, size in zip(paths, (split, n - split)):
            with open(path, "wb") as out:
                for ids in encoded(text_pieces(f, size), encode):
                    ids = np.asarray(ids, np.uint16)
                    ids.tofile(out)
                    used[ids] = True
    if char_level:
        return {"vocab_size": len(stoi), "tokenizer": "char", "stoi": stoi, "itos": dict(enumerate(stoi))}
    lut = (np.cumsum(used) - 1).astype(np.uint16)  # GPT-2 id -> its rank among those that occur
    for path in paths:
        ids = np.memmap(path, np.uint16, "r+")
        for i in range(0, len(ids), PIECE):
            ids[i: i + PIECE] = lut[ids[i: i + PIECE]]
    gpt2_ids = np.flatnonzero(used).tolist()
    return {"vocab_size": len(gpt2_ids), "tokenizer": "gpt2", "gpt2_ids": gpt2_ids}


def text_pieces(f, n):
    """The next n characters of the text file f in pieces of about PIECE, cut where SAFE_CUT matches (anywhere in
    a text with no such place in 8 pieces' worth: then a token or two may differ from encoding it whole)."""
    buf = ""
    while n > 0 and (block := f.read(min(n, PIECE))):
        n -= len(block)
        buf += block
        cut = max((m.start() for m in SAFE_CUT.finditer(buf)), default=0)
        if not cut and len(buf) >= 8 * PIECE:
            cut = len(buf)
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
    yield buf


def encoded(pieces, encode):
    """encode(piece) for each piece of the iterator `pieces`, in order, as many at a time as there are cores, in a
    thread pool (tiktoken releases the GIL): the encoding runs on every core."""
    threads = os.cpu_count()
    with ThreadPoolExecutor(threads) as pool:
        while batch := list(itertools.islice(pieces, threads)):
            yield from pool.map(encode, batch)


def _sha256(path):
    """The text's SHA-256: what the bins were made from."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return sha.hexdigest()


def _changed(src, meta):
    """Has input.txt changed since its bins were written (its hash says)? Bins without their text, or without a
    hash (nanoGPT's), are taken as they are."""
    changed = "sha256" in meta and os.path.exists(src) and _sha256(src) != meta["sha256"]
    if changed:
        print(f"{src} has changed since it was prepared: preparing it again")
    return changed


def load_split(dataset, split, data_dir="data"):
    """The tokens of one split as a read-only uint16 memmap."""
    path = os.path.join(data_dir, dataset, f"{split}.bin")
    if os.path.getsize(path) % 2:
        raise UserError(f"{path} is cut short (an odd number of bytes, not uint16 tokens); delete it to prepare "
                        "the dataset again")
    return np.memmap(path, np.uint16, "r")


def get_batch(data, batch_size, block_size, device="cpu", generator=None):
    """nanoGPT's sampler: `batch_size` random windows of `block_size` tokens, (B, T) int64 on `device`.
    There are no targets: every objective here predicts x itself (masked positions, or AR through z0 ⊕ x)."""
    ix = torch.randint(len(data) - block_size + 1, (batch_size,), generator=generator)
    return to_device(torch.from_numpy(np.stack([data[i: i + block_size].astype(np.int64) for i in ix])), device)


def eval_batches(data, batch_size, block_size, device="cpu", max_windows=0):
    """Fixed non-overlapping windows of a split, in full batches: all of them, or `max_windows` spread
    evenly over the split. The same windows every time, so numbers compare across runs and α0."""
    n = len(data) // block_size
    keep = torch.arange(n) if not max_windows or max_windows >= n else torch.linspace(0, n - 1, max_windows).long()
    windows = torch.from_numpy(data[: n * block_size].astype(np.int64)).view(n, block_size)[keep]
    for x in windows.split(batch_size)[: len(keep) // batch_size]:  # full batches only
        yield to_device(x, device)


def tokenizer_of(meta):
    """What makes two metas (prepare's, or a checkpoint's copy of one) the same tokenizer: its kind and its
    vocabulary, in id order."""
    return meta["tokenizer"], meta.get("gpt2_ids") or [meta["itos"][i] for i in range(meta["vocab_size"])]


class Tokenizer:
    """encode/decode for a meta dict: characters, or GPT-2 BPE renumbered to the dataset's compact vocabulary
    (meta['gpt2_ids']). Text the model has no token for is a UserError that names it."""

    def __init__(self, meta):
        kind, self.itos = tokenizer_of(meta)  # id -> character, or GPT-2 id
        self.is_char = kind == "char"
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if not self.is_char:
            self.enc = gpt2_encoding()

    def encode(self, text):
        """As prepare() encoded the training text, where a literal "<|endoftext|>" is text."""
        tokens = text if self.is_char else self.enc.encode_ordinary(text)
        unknown = [t if self.is_char else self.enc.decode([t]) for t in dict.fromkeys(tokens) if t not in self.stoi]
        if unknown:
            raise UserError(f"the text has {'characters' if self.is_char else 'GPT-2 tokens'} not in this model's "
                            f"vocabulary: {', '.join(map(repr, unknown))}")
        return [self.stoi[t] for t in tokens]

    def decode(self, ids):
        tokens = [self.itos[i] for i in ids]
        return "".join(tokens) if self.is_char else self.enc.decode(tokens)


def token_bytes(meta):
    """The UTF-8 length of every token id of a dataset's vocabulary, (vocab_size,) int64: a text's bytes are the sum
    over its tokens (characters, or GPT-2's byte-level BPE), so a likelihood can be put in bits per byte."""
    tok = Tokenizer(meta)
    return torch.tensor([len(t.encode() if tok.is_char else tok.enc.decode_single_token_bytes(t)) for t in tok.itos])


CHECKPOINT_FORMAT = "eso-lm/2"


def load_checkpoint(out_dir, device="cpu", name="ckpt.pt"):
    """Load out_dir/ckpt.pt (the best-val weights) or another file there, or raise a UserError saying what is
    wrong with it. GPT.from_checkpoint builds the network it holds."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(out_dir, "last.pt")):
            raise UserError(f"no checkpoint at {path}: the run there stopped before its first eval; resume it "
                            f"(python train.py --init_from=resume --out_dir={out_dir})")
        raise UserError(f"no checkpoint at {path}; train one first (python train.py --out_dir={out_dir})")
    try:
        ckpt = torch.load(path, map_location=device)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or "
                        "foreign: delete it and train again")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an Eso-LM checkpoint of this version of the repo; train again")
    return ckpt


def save_checkpoint(ckpt, out_dir, name="ckpt.pt"):
    """Write out_dir/<name> atomically: a crash leaves the previous complete file in place."""
    atomic_write(os.path.join(out_dir, name), lambda f: torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, f))
