"""
Datasets in nanoGPT's layout, built on first use:

    data/<name>/input.txt   raw text (Tiny Shakespeare is downloaded when missing)
    data/<name>/train.bin   uint16 tokens, first 90% of the text
    data/<name>/val.bin     uint16 tokens, last 10%
    data/<name>/meta.pkl    {'vocab_size', 'stoi', 'itos'} for characters (nanoGPT's meta.pkl), {'vocab_size',
                            'gpt2_ids'} for BPE; both with 'tokenizer' and 'source' (input.txt's size, time, SHA-256)

`--dataset=<name>` tokenises data/<name>/input.txt with GPT-2 BPE (tiktoken), as nanoGPT's `shakespeare`;
`--dataset=<name>_char` tokenises the same text by characters (reading data/<name>_char/input.txt instead
if that exists, as nanoGPT's `shakespeare_char` folder has one).

Checkpoints are files too: train.py writes them and every script reads them through load_checkpoint.
"""
import collections
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
from tqdm import tqdm

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
    with removed_on_error([tmp]):
        synced_write(tmp, write, mode)
        os.replace(tmp, path)


def synced_write(path, write, mode="wb"):
    """write(f) into `path`, on disk (fsync) when this returns."""
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def removed_on_error(paths):
    """If the block raises (Ctrl-C included), remove whichever of `paths` exist (files, and folders left empty),
    in order, then re-raise: a stopped write leaves no temporary file behind."""
    try:
        yield
    except BaseException:
        for path in paths:
            with contextlib.suppress(OSError):  # (gone already, or a folder that holds something: kept)
                (os.rmdir if os.path.isdir(path) else os.remove)(path)
        raise


def _download_shakespeare(path):
    made, folder = [], os.path.dirname(path)  # the folders made here, innermost first: a failed download removes them
    while folder and not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            text = r.read()
    except OSError as e:
        for folder in made:
            with contextlib.suppress(OSError):  # (another DDP rank's removal, or a file put there meanwhile)
                os.rmdir(folder)
        raise UserError(f"could not download Tiny Shakespeare ({getattr(e, 'reason', e)}); with no network, "
                        f"save {SHAKESPEARE_URL} as {path} by hand (mkdir -p {os.path.dirname(path)} first)")
    atomic_write(path, lambda f: f.write(text))


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its BPE files on first use
        raise UserError(f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}); connect to the "
                        "network once, or point TIKTOKEN_CACHE_DIR at a folder that holds them")


PIECE = 1 << 20  # characters of text handed to the encoder at a time: memory stays bounded whatever the file
SAFE_CUT = re.compile(r"(?=[\n ]\S)")  # before a line break or space that precedes a non-space: GPT-2's
# pre-tokenizer ends a token there whatever follows (a word takes its leading space, a run of whitespace ends
# before its last character), so pieces cut there encode exactly as the whole text does (tested)


def text_pieces(path, split, cut=SAFE_CUT):
    """Stream the text of `path` as (piece, is_val) pairs of about PIECE characters, cut where `cut` matches
    (None: anywhere) and exactly at character `split`, nanoGPT's train/val boundary. A text with no place to
    cut in 8 pieces' worth is cut anyway (then a token or two may differ from encoding it whole)."""
    done, buf = 0, ""  # characters yielded so far; text read but not yet yielded
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(PIECE)
            buf += block
            if done < split <= done + len(buf):
                yield buf[: split - done], False
                buf, done = buf[split - done:], split
            if not block:
                if buf:
                    yield buf, done >= split
                return
            if len(buf) >= PIECE:
                at = len(buf)  # cut=None: anywhere
                if cut is not None:  # the last safe place in the new block (none: read on, up to 8 pieces)
                    fresh = (m.start() for m in cut.finditer(buf, max(0, len(buf) - len(block) - 1)))
                    at = max(fresh, default=at if at >= 8 * PIECE else 0)
                if at:
                    yield buf[:at], done >= split
                    buf, done = buf[at:], done + at


def count_chars(path, chars=True):
    """(number of characters, set of characters or None) of a text file, read exactly as text_pieces reads it
    (UTF-8 with replacement characters, universal newlines)."""
    n, seen = 0, set()
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(4 * PIECE):
            n += len(block)
            if chars:
                seen.update(block)
    return n, (seen if chars else None)


def encoded(pieces, encode, threads=1):
    """(uint16 token ids, is_val, characters) for each (piece, is_val), in order. With threads > 1 the pieces are
    encoded in a pool (tiktoken releases the GIL), a few ahead of the one handed back, so the encoding runs on
    every core while this thread converts and writes."""
    with ThreadPoolExecutor(threads) as pool:
        ahead = collections.deque()
        for piece, is_val in itertools.chain(pieces, [(None, None)]):
            if piece is not None:
                ahead.append((pool.submit(encode, piece), is_val, len(piece)))
            while ahead and (piece is None or len(ahead) > 2 * threads):
                ids, is_val_, n = ahead.popleft()
                yield np.asarray(ids.result(), dtype=np.uint16), is_val_, n


def prepare(dataset, data_dir="data"):
    """Build data/<dataset>/{train,val}.bin and meta.pkl if missing, or again if input.txt has changed since
    (_changed); return the meta dict. A file that cannot be read or written stops with one line."""
    try:
        return _prepare(dataset, data_dir)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise UserError(f"cannot prepare dataset '{dataset}': {e.strerror or e}{where}") from None


def _prepare(dataset, data_dir):
    """prepare(), whose OSErrors become one line. The text is streamed:
    memory stays bounded (a few pieces of PIECE characters) however large input.txt is. BPE datasets keep only
    the GPT-2 tokens that occur in the text, renumbered densely (meta['gpt2_ids'] maps them back): Tiny
    Shakespeare uses 11,706 of GPT-2's 50,257, so the output layer is 4x smaller and the token sequences are
    nanoGPT's, relabelled."""
    out = os.path.join(data_dir, dataset)
    meta_path = os.path.join(out, "meta.pkl")
    bins = [os.path.join(out, f"{s}.bin") for s in ("train", "val")]
    src = _input_path(dataset, data_dir)
    # bins with no meta.pkl are not overwritten (nanoGPT's GPT-2 shakespeare has them), unless a meta.pkl being
    # written beside them says that a preparation here (another DDP rank's, or one that was stopped) made them.
    # (bins checked first: a preparation writes that file before it renames its bins into place, and renames it to
    # meta.pkl last, so a bin seen here has one or the other beside it)
    finishing = lambda: any(f.startswith("meta.pkl.") and f.endswith(".tmp") for f in os.listdir(out))
    if any(map(os.path.exists, bins)) and not finishing() and not os.path.exists(meta_path):
        raise UserError(f"{out} holds .bin files but no meta.pkl to say what their ids are (nanoGPT's GPT-2 "
                        "shakespeare?): move them away to prepare the dataset here")
    changed = _changed(src, meta_path)
    if changed:
        tqdm.write(f"{src} has changed since {out} was prepared from it: preparing it again")
    if changed or not (os.path.exists(meta_path) and all(map(os.path.exists, bins))):
        if not os.path.exists(src):
            if os.path.basename(os.path.dirname(src)) != "shakespeare":
                raise UserError(f"dataset '{dataset}' needs its text at {src}")
            _download_shakespeare(src)
        source = _stamp(src)  # (before reading it: a text edited while it is prepared is prepared again next time)
        char_level = dataset.endswith("_char")
        n, chars = count_chars(src, chars=char_level)
        if n < 100:
            raise UserError(f"{src} holds {n} characters; a dataset needs at least 100 (and a few thousand to learn)")
        if char_level and len(chars) > 1 << 16:
            raise UserError(f"{src} holds {len(chars):,} distinct characters, more than the 65,536 ids a character "
                            f"dataset stores; use --dataset={dataset.removesuffix('_char')} (BPE)")
        bar = tqdm(total=n, unit="char", unit_scale=True, desc=f"preparing {dataset}", leave=False,
                   disable=n < 50_000_000)
        staged = [f"{b}.{os.getpid()}.staged" for b in bins]  # renamed into place once meta.pkl's tmp is written
        gpt2_bins = [f"{b}.gpt2.{os.getpid()}.staged" for b in bins]  # BPE: GPT-2 ids first, renumbered below
        meta_tmp = f"{meta_path}.{os.getpid()}.tmp"
        made = [] if os.path.lexists(out) else [out]  # (<name>_char/: a folder of its own, removed on failure)
        with removed_on_error(staged + gpt2_bins + [meta_tmp] + made):
            os.makedirs(out, exist_ok=True)
            meta = _encode(src, n, chars, char_level, staged, gpt2_bins, bar)
            meta["source"] = source
            bar.close()
            synced_write(meta_tmp, lambda f: pickle.dump(meta, f))
        for path, final in zip(staged + [meta_tmp], bins + [meta_path]):  # the bins first, meta.pkl last
            os.replace(path, final)
    meta = read_meta(meta_path)
    meta.setdefault("tokenizer", "char" if "stoi" in meta else "gpt2")  # a meta.pkl written by nanoGPT
    return meta


def _encode(src, n, chars, char_level, staged, gpt2_bins, bar):
    """Encode src's n characters into the token files `staged` (train, val); return the meta dict."""
    if char_level:
        chars = sorted(chars)
        meta = {"vocab_size": len(chars), "tokenizer": "char",
                "stoi": {ch: i for i, ch in enumerate(chars)}, "itos": {i: ch for i, ch in enumerate(chars)}}
        ords = [ord(c) for c in chars]
        lut, known = np.zeros(max(ords) + 1, dtype=np.uint16), np.zeros(max(ords) + 1, dtype=bool)
        lut[ords], known[ords] = np.arange(len(chars)), True

        def encode(piece):
            codes = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
            if len(codes) and (codes.max() >= len(lut) or not known[codes].all()):  # not there when counted
                raise UserError(f"{src} changed while it was being prepared; prepare it again (run again)")
            return lut[codes]
        write_bins(staged, encoded(text_pieces(src, int(n * 0.9), cut=None), encode), bar)
    else:
        enc = gpt2_encoding()
        counts = write_bins(gpt2_bins, encoded(text_pieces(src, int(n * 0.9)), enc.encode_ordinary,
                                               os.cpu_count() or 1), bar)
        used = np.flatnonzero(counts)
        lut = np.zeros(enc.n_vocab, dtype=np.uint16)
        lut[used] = np.arange(len(used))
        for gpt2_path, path in zip(gpt2_bins, staged):
            ids = np.memmap(gpt2_path, dtype=np.uint16, mode="r")
            pieces = (lut[ids[i: i + PIECE]].tobytes() for i in range(0, len(ids), PIECE))
            synced_write(path, lambda f: f.writelines(pieces))
            del ids
            os.remove(gpt2_path)
        meta = {"vocab_size": len(used), "tokenizer": "gpt2", "gpt2_ids": used.tolist()}
    return meta


def read_meta(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); delete it and the .bin files beside it to "
                        "prepare the dataset again")


def _stamp(path):
    """What the bins were made from: the text's size, modification time and SHA-256."""
    st, sha = os.stat(path), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha.hexdigest()}


def _changed(src, meta_path):
    """Has input.txt changed since its bins were written? Its size and time say it has not, without reading it; if
    they differ (a copy, a checkout), its hash decides, and a text that is the same gets the new time in the meta
    when the folder is writable. Bins without their text, or without a stamp (nanoGPT's), are taken as they are."""
    if not (os.path.exists(src) and os.path.exists(meta_path)):
        return False
    meta = read_meta(meta_path)
    old, st = meta.get("source"), os.stat(src)
    if old is None or (old["size"], old["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        return False
    new = _stamp(src)
    if new["sha256"] != old.get("sha256"):
        return True
    try:
        atomic_write(meta_path, lambda f: pickle.dump({**meta, "source": new}, f))
    except OSError:  # a read-only data folder: the hash is read again next time
        pass
    return False


def tokenizer_of(meta):
    """What makes two metas (prepare's, or a checkpoint's copy of one) the same tokenizer: its kind and its
    vocabulary, in id order."""
    vocab = [meta["itos"][i] for i in range(meta["vocab_size"])] if "itos" in meta else meta.get("gpt2_ids")
    return meta["tokenizer"], meta["vocab_size"], vocab


def write_bins(paths, tokens, bar):
    """Write (ids, is_val, characters) token arrays, train to paths[0] and val to paths[1] (staging files, renamed
    into place by the caller). Returns how often every token id occurs."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    files = [open(p, "wb") for p in paths]
    try:
        for ids, is_val, n in tokens:
            files[is_val].write(ids.tobytes())
            counts += np.bincount(ids, minlength=1 << 16)
            bar.update(n)
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    return counts


def load_split(dataset, split, data_dir="data"):
    """The tokens of one split as a read-only uint16 memmap."""
    path = os.path.join(data_dir, dataset, f"{split}.bin")
    if os.path.getsize(path) % 2:
        raise UserError(f"{path} is cut short (an odd number of bytes, not uint16 tokens); delete it to prepare "
                        "the dataset again")
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, device="cpu", generator=None):
    """nanoGPT's sampler: `batch_size` random windows of `block_size` tokens, (B, T) int64 on `device`.
    There are no targets: every objective here predicts x itself (masked positions, or AR through z0 ⊕ x)."""
    if not 1 <= block_size <= len(data) or batch_size < 1:
        raise ValueError(f"{batch_size} windows of {block_size} tokens: need batch_size >= 1 and a block_size in "
                         f"[1, {len(data)}], the tokens there are")
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


def token_bytes(meta):
    """The UTF-8 length of every token id of a dataset's vocabulary, (vocab_size,) int64: a text's bytes are the sum
    over its tokens (characters, or GPT-2's byte-level BPE), so a likelihood can be put in bits per byte."""
    if meta["tokenizer"] == "char":
        lengths = [len(meta["itos"][i].encode("utf-8")) for i in range(meta["vocab_size"])]
    else:
        enc = gpt2_encoding()
        ids = meta.get("gpt2_ids") or range(enc.n_vocab)
        lengths = [len(enc.decode_single_token_bytes(i)) for i in ids]
        lengths += [0] * (meta["vocab_size"] - len(lengths))  # a padded vocabulary's unused ids
    return torch.tensor(lengths)


class Tokenizer:
    """encode/decode for a meta dict: characters, or GPT-2 BPE, renumbered to the dataset's compact vocabulary
    when meta['gpt2_ids'] is there (a meta.pkl without it, e.g. nanoGPT's, means raw GPT-2 ids). Text the
    model has no token for is a UserError that names it."""

    def __init__(self, meta):
        self.meta = meta
        self.vocab_size = meta["vocab_size"]
        self.is_char = meta["tokenizer"] == "char"
        if not self.is_char:
            self.enc = gpt2_encoding()
            self.gpt2_ids = meta.get("gpt2_ids")  # compact id -> GPT-2 id
            self.compact = None if self.gpt2_ids is None else {g: i for i, g in enumerate(self.gpt2_ids)}

    def encode(self, text):
        if self.is_char:
            unknown = sorted(set(text) - set(self.meta["stoi"]))
            if unknown:
                raise UserError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
            return [self.meta["stoi"][c] for c in text]
        # as prepare() encoded the training text, where a literal "<|endoftext|>" is text; raw GPT-2 ids (a nanoGPT
        # meta.pkl) as nanoGPT's sample.py encodes, where it is the end-of-text token
        ids = (self.enc.encode_ordinary(text) if self.compact is not None else
               self.enc.encode(text, allowed_special={"<|endoftext|>"}))
        if self.compact is None:
            return ids
        unknown = [g for g in dict.fromkeys(ids) if g not in self.compact]
        if unknown:
            pieces = ", ".join(repr(self.enc.decode([g])) for g in unknown[:5])
            raise UserError(f"the text needs GPT-2 tokens this model never saw in training: {pieces}"
                            f"{' ...' if len(unknown) > 5 else ''}; rephrase it")
        return [self.compact[g] for g in ids]

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        n = len(self.meta["itos"]) if self.is_char else len(self.gpt2_ids or ()) or self.enc.n_vocab  # with text
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise UserError(f"ids {bad[:5]} have no text: the vocabulary's are [0, {n})"
                            + (f"; {self.vocab_size} is the mask token" if self.vocab_size in bad else ""))
        if self.is_char:
            return "".join(self.meta["itos"][i] for i in ids)
        return self.enc.decode([self.gpt2_ids[i] for i in ids] if self.gpt2_ids is not None else ids)


CHECKPOINT_FORMAT = "eso-lm/2"


def load_checkpoint(out_dir, device="cpu", name="ckpt.pt"):
    """Load out_dir/ckpt.pt (the best-val weights) or another file there, or raise a UserError saying what is
    wrong with it. GPT.from_checkpoint builds the network it holds."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        if name == "ckpt.pt" and os.path.exists(os.path.join(out_dir, "last.pt")):
            raise UserError(f"no checkpoint at {path}: the run there stopped before its first eval; resume it "
                            f"(python train.py --init_from=resume --out_dir={out_dir})")
        raise UserError(f"no checkpoint at {path}; train one first (python train.py --out_dir={out_dir})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated or "
                        "foreign: delete it and train again")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an Eso-LM checkpoint of this version of the repo; train again")
    return ckpt


def save_checkpoint(ckpt, out_dir, name="ckpt.pt"):
    """Write out_dir/<name> atomically: a crash leaves the previous complete file in place."""
    atomic_write(os.path.join(out_dir, name), lambda f: torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, f))
