"""
Sample from a trained Eso-LM with the exact KV cache (paper Alg. 2, Fig. 2), or score a text with its exact likelihood
(Theorem 3.1). Right after `python train.py`:

    python sample.py --steps 32                       # from the checkpoint train.py wrote last
    python sample.py --start "ROMEO:" --alpha_0 0.25  # a prompt; a quarter of the tokens by diffusion
    python sample.py --length 512                     # past the block size: chunk by chunk, a sliding window
    python sample.py --infill "ROMEO: ____________ JULIET:"   # each '_' is one token to generate
    python sample.py --kv_cache=False                 # the uncached reference path: the same logits, up to rounding
    python sample.py --schedule=strided --steps 8     # the paper's improved sampler: far-apart tokens per step
    python sample.py --score "ROMEO: But soft!"       # nats, bits per byte, and each token's surprise

One loop serves both phases: a diffusion step reveals a chunk of tokens at once, a sequential step one.
Each step feeds [the tokens revealed at the previous step, now clean; the masks to reveal now] with their
original RoPE positions; the clean tokens' K/V join the cache, the masks' never do.
"""
import contextlib
import glob
import math
import numbers
import os
import sys
import textwrap
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from configurator import UserError, attention_backends, autocast_context, parse_args, pick_device, require, run_cli
from data import Tokenizer, load_checkpoint
from kvcache import KVCache
from model import (GPT, attention_mask, few_rows_transposed, has_likelihood, likelihood_order, nelbo, permute,
                   sampling_products, token_nll, unpermute, unwrap)

GAP = "_"  # in --infill text, each '_' is one token to generate


# -----------------------------------------------------------------------------
# the schedule (Alg. 2)

def diffusion_counts(n, steps, alpha_0, generator=None):
    """Tokens revealed per diffusion step, empty steps dropped. Alg. 2 draws, for t = 1, 1-1/T, ..., 1/T,
    n_t ~ Binomial(masks left, (α_s - α_t)/(1 - α_t)) with α_t = α0 (1 - t) (the schedule of diffusion_loss in
    model.py: a change to one is a change to both): a Binomial chain, i.e. a Multinomial(n; α0/T, ..., α0/T,
    1 - α0). We draw that Multinomial one token at a time (a token is in
    diffusion step i when u ∈ [iα0/T, (i+1)α0/T), and left to the sequential phase when u >= α0):
    the same law, with no Python loop over T, so T = 10^6 costs nothing. u is fp64: fp32 draws take only 2^24 values
    in [0, 1), which would leave some of T steps more likely than others, and most empty once T passes 2^24."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    step = (u[u < alpha_0] / alpha_0 * steps).long().clamp(max=steps - 1)
    return torch.unique_consecutive(step.sort().values, return_counts=True)[1].tolist()  # (no tensor of length T)


def plan(is_gen, num_samples, steps, alpha_0, generator=None, schedule="random"):
    """The unified schedule S = S_MDM ⊕ S_AR for a template whose positions `is_gen` (L,) are to be generated.
    Returns order (B, L): given tokens first (ascending), then the diffusion positions, then the sequential
    positions ascending; chunks: the tokens per step, shared by the batch (the cache is one rectangle), so that
    NFE = len(chunks); and how many of them (the last ones) are sequential steps.
    schedule='random' (Alg. 2): Binomial counts per step, diffusion positions in a random order per sample.
    schedule='strided' (the paper's "improved" sampler, Suppl. E.10, the code's subcontext ordering): step r of
    T' = min(steps, #generated) reveals every T'-th generated position from the r-th on, so that no step decodes
    neighbours at once; the rows come in a random order shared by the batch, and the first α0 T' rows, rounded
    up or down at random with the odds that make their expected number α0 T' (so every token is made by
    diffusion with probability α0), are diffusion steps; the rest goes left to right. Within a step the order is
    random per sample."""
    if is_gen.dtype != torch.bool or is_gen.dim() != 1:
        raise ValueError(f"is_gen must be a (L,) bool tensor, got {tuple(is_gen.shape)} {is_gen.dtype}")
    if not (isinstance(steps, numbers.Integral) and 1 <= steps < 2 ** 53):  # (diffusion_counts' fp64 u * steps)
        raise ValueError(f"steps={steps!r} must be an integer in [1, 2**53)")
    if schedule not in ("random", "strided"):
        raise ValueError(f"schedule={schedule!r} must be 'random' or 'strided'")
    given = torch.nonzero(~is_gen).flatten()
    gen = torch.nonzero(is_gen).flatten()
    n = len(gen)
    if n == 0:
        return given.expand(num_samples, -1), [], 0
    if schedule == "strided":
        rows = min(steps, n)
        step = torch.randperm(rows, generator=generator)[torch.arange(n) % rows]  # the step of each position
        n_diff = int(alpha_0 * rows + torch.rand((), generator=generator))  # randomised rounding of α0 T'
        in_diffusion = step < n_diff
        counts = torch.bincount(step[in_diffusion], minlength=n_diff).tolist()
        key = torch.where(in_diffusion, step + 0.5 * torch.rand(num_samples, n, generator=generator),
                          rows + torch.arange(n) / n)  # by step, randomly within one; then left to right
        order = torch.cat([given.expand(num_samples, -1), gen[key.argsort(dim=1)]], dim=1)
        return order, counts + [1] * (n - sum(counts)), n - sum(counts)
    counts = diffusion_counts(n, steps, alpha_0, generator)
    n_diff = sum(counts)
    shuffled = gen[torch.rand(num_samples, n, generator=generator).argsort(dim=1)]
    order = torch.cat([given.expand(num_samples, -1), shuffled[:, :n_diff],
                       shuffled[:, n_diff:].sort(dim=1).values], dim=1)
    return order, counts + [1] * (n - n_diff), n - n_diff


def sample_tokens(logits, temperature=1.0, top_p=0.9, generator=None):
    """Nucleus sampling by float64 Gumbel-max (lower precision skews the draws towards the top tokens), on the
    generator's device (MPS has no float64). The mask token's column (the last) is dropped, so it can never be
    drawn. temperature=0 is greedy, as is any below 1e-200, its limit (below about 1e-270, fp32 logits over it can
    overflow fp64)."""
    device = logits.device
    logits = logits[..., :-1].to(generator.device if generator else device, torch.float64)  # drop the mask
    if temperature < 1e-200:
        return logits.argmax(-1).to(device)
    logits = logits / temperature
    if top_p < 1:  # keep the smallest set of tokens whose probability reaches top_p (at least the top one)
        probs, idx = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits - torch.log(-torch.log(u))).argmax(-1).to(device)


# -----------------------------------------------------------------------------
# the sampler loop (Fig. 2: one KV cache for both phases)

def new_cache(model, batch_size, L, device, ctx=contextlib.nullcontext(), static=False):
    """A KVCache for `model`, its K/V in the dtype attention reads them in (autocast's, else fp32); None for MDLM,
    which never caches. A caller that samples more than once with static shapes hands the same one to every run."""
    config = unwrap(model).config
    on = isinstance(ctx, torch.autocast) and getattr(ctx, "_enabled", True)  # (an autocast may be switched off)
    dtype = ctx.fast_dtype if on else torch.float32
    return None if config.denoiser == "mdlm" else KVCache.for_model(config, batch_size, L, device, dtype, static)


def denoise(model, x, order, chunks, temperature=1.0, top_p=0.9, kv_cache=True, generator=None,
            callback=None, ctx=contextlib.nullcontext(), progress=False, static=False, sequential=0, cache=None):
    """Fill the masks of x (B, L), original order, following `order` and `chunks` (see plan()); the last
    `sequential` chunks (of one token each) are the sequential phase. Each step feeds the tokens revealed at
    the previous step (now clean) and the masks to reveal now, with the mask of the model's denoiser
    (attention_mask in model.py):
      B     cached in both phases: each step feeds only what the cache lacks (Fig. 2);
      A     its clean tokens see each other, so a diffusion step changes all of their K/V: it feeds every clean
            token at every diffusion step, and caches from the sequential phase on (Fig. 15);
      mdlm  feeds all L tokens, masks still to come included, at every step, and never caches.
    kv_cache=False is the reference path: every step feeds every revealed token and the current masks from
    slot 0. Both paths compute the same conditionals and draw the same noise, but multiply matrices of different
    shapes, which round differently: their logits agree up to float rounding (about 1e-5 in fp32, more under bf16
    autocast, whose cache is bf16), so they draw the same tokens except at a near tie, from which on that sample
    goes its own way.
    static=True gives every step one of a few shapes, for CUDA graphs (torch.compile's reduce-overhead): the
    fed chunk is padded to a power of two (at least 2, so that a run's first step needs no graph of its own)
    with the slots that follow it (the causal mask hides them from the real tokens; their K/V land in slots
    nobody has committed) and cached steps attend to all L slots.
    cache: a KVCache to reuse (reset here), so that graphs captured in one call replay in the next.
    After each step, callback(step, start, done, end, x, order, logits, cache, phase) sees it: slots [start, done)
    were fed clean, [done, end) as masks and now hold their samples; x is in σ order; phase is "diffusion" or
    "sequential" (a diffusion step may reveal one token too). The loop runs in
    inference mode: tensors a callback keeps are inference tensors (clone() them for autograd)."""
    config = unwrap(model).config
    if config.denoiser == "mdlm" and sequential:
        raise ValueError("MDLM has no sequential phase: sample it with alpha_0=1")
    B, L = x.shape
    with torch.inference_mode(), attention_backends(x.device), sampling_products():
        x = permute(x, order).clone()  # kept in σ order for the whole run
        done = L - sum(chunks)  # slots [0, done) are clean: the given tokens
        # A: its clean prefix sees itself both ways up to here; from this slot on (its sequential phase) tokens are
        # added causally, as in training's sequential pass, so the prefix's K/V stop changing and can be cached
        seq_start = L - sequential
        cache = (cache or new_cache(model, B, L, x.device, ctx, static)) if kv_cache else None
        if cache is not None:
            if cache.k[0].size(0) != B or cache.max_len != L:
                raise ValueError(f"the cache holds {cache.k[0].size(0)} rows of {cache.max_len} slots; this run "
                                 f"needs {B} of {L}")
            cache.reset()
        slots = torch.arange(L, device=x.device)
        for step, k in enumerate(tqdm(chunks, disable=not progress, leave=False, desc="steps")):
            # (B), cached, eager: feed slots [first, end) (the tokens revealed last step and the k masks to reveal
            # now) and read the cache's [0, end); the rest makes the same step for A, MDLM, uncached or static
            end = done + k
            cached = cache is not None and (config.denoiser == "B" or done >= seq_start)
            first = cache.committed if cached else 0  # cached: what the cache lacks; else everything
            n = (L if config.denoiser == "mdlm" else end) - first  # tokens to feed
            T = min(max(2, 1 << (n - 1).bit_length()), L - first) if static else n  # static: a power of two >= 2
            keys = (L if static else first + n) if cached else T
            if cached:
                cache.feed(T, keys)
            mask = attention_mask(config.denoiser, slots[first:first + T, None], slots[:keys], min(done, seq_start))
            rows = slice(done - first, end - first)  # the k masks to reveal
            with ctx:
                logits = model(x[:, first:first + T], order[:, first:first + T], mask, cache if cached else None,
                               out=slice(None) if static else rows)
            logits = logits[:, rows] if static else logits
            x[:, done:end] = sample_tokens(logits, temperature, top_p, generator)
            if cached:
                cache.commit(done - first)  # the clean tokens just fed, never the k masks: their slots are scratch
            if callback:
                callback(step=step, start=first, done=done, end=end, x=x, order=order, logits=logits, cache=cache,
                         phase="sequential" if step >= len(chunks) - sequential else "diffusion")
            done = end
        x = unpermute(x, order)
    return x.clone()  # a normal tensor again, usable with autograd


def windows(L, block_size, chunk):
    """The windows a text of L tokens is sampled and scored in: (start, new) for the window [start, start + W),
    W = min(L, block_size): its tokens from `new` on are its own, those in front of them the text so far, its
    prompt. The first window is [0, W); each further one moves on by `chunk` tokens (fewer at the end)."""
    if L > block_size and not 1 <= chunk < block_size:
        raise ValueError(f"chunk={chunk} must be in [1, block_size={block_size})")
    start, new = 0, 0
    while True:
        yield start, new
        end = start + block_size
        if end >= L:
            return
        start, new = start + min(chunk, L - end), end


def check_request(config, tokens, chunk, alpha_0):
    """What generate() and score() cannot do, as a UserError (a ValueError that the scripts print as one line):
    not a torch.long tensor, no tokens, more than one sequence, ids outside the vocabulary (the mask id aside), an
    impossible α0 (MDLM: any but 1), and past the block size, a chunk that would leave a window no text before it,
    or gaps to infill. Any other error keeps its traceback."""
    if not torch.is_tensor(tokens) or tokens.dtype != torch.long:
        raise UserError(f"expected a torch.long tensor of token ids, got a {type(tokens).__name__}"
                        + (f" of {tokens.dtype}" if hasattr(tokens, "dtype") else ""))
    if tokens.dim() != 1 or not len(tokens):
        raise UserError(f"expected one sequence of tokens (L,), got shape {tuple(tokens.shape)}")
    if not 0 <= int(tokens.min()) <= int(tokens.max()) <= config.mask_id:
        raise UserError(f"token ids must be in [0, {config.vocab_size}), or the mask id {config.mask_id}")
    if not 0 <= alpha_0 <= 1:
        raise UserError(f"alpha_0={alpha_0} must be in [0, 1]")
    if config.denoiser == "mdlm" and alpha_0 != 1:
        raise UserError(f"alpha_0={alpha_0}: MDLM is a pure diffusion model; use alpha_0=1")
    if len(tokens) > config.block_size:
        if not (isinstance(chunk, numbers.Integral) and 1 <= chunk < config.block_size):
            raise UserError(f"chunk={chunk} must be an integer in [1, block_size={config.block_size}): each window "
                            "keeps at least one token of the text before it")
        is_gen = (tokens == config.mask_id).int()
        if not torch.equal(is_gen, is_gen.cummax(0).values):
            raise UserError(f"a template longer than block_size={config.block_size} must be a prompt followed by "
                            "masks: infilling works within one block")


def generate(model, template, num_samples=1, steps=32, alpha_0=1.0, temperature=1.0, top_p=0.9,
             kv_cache=True, seed=1337, callback=None, ctx=contextlib.nullcontext(), progress=False,
             schedule="random", static=False, cache=None, chunk=0):
    """Sample num_samples sequences that agree with `template` (L,): its mask tokens are generated, every
    other token is kept. Returns (tokens (B, L), NFE). Up to the block size one run of the sampler fills it;
    a longer template (a prompt followed by masks) is filled window by window (windows()): the first block,
    then each further `chunk` tokens (default: half a block) with the last block_size - chunk tokens of the
    text so far as their prompt, a sliding window as nanoGPT crops its context. A prompt longer than the block
    is cropped alike: the first window starts block_size - chunk tokens before its end (or so that the window
    ends with the text). NFE counts the passes of every window; callback(offset=..., **step) sees each step,
    offset being its window's start in the text. The same seed gives the same samples. The samples of one call
    share the schedule's step sizes (and, strided, its rows: plan()), so each is a draw of the model's sampler,
    but they are not independent of each other: for statistics over samples, draw them with several seeds."""
    config = unwrap(model).config
    chunk = chunk or config.block_size // 2
    check_request(config, template, chunk, alpha_0)
    # (steps and schedule: plan(), before any window runs)
    require([(isinstance(num_samples, numbers.Integral) and num_samples >= 1,
              f"num_samples={num_samples!r} must be an integer >= 1"),
             (0 <= temperature < math.inf, f"temperature={temperature} must be finite and >= 0"),
             (0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]")], ValueError)
    device, W = template.device, min(len(template), config.block_size)
    gen_cpu = torch.Generator().manual_seed(seed)  # schedule and orderings: the same on every device
    gen_noise = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)  # no MPS float64
    cache = (cache or new_cache(model, num_samples, W, device, ctx, static)) if kv_cache else None
    x, nfe = template.expand(num_samples, -1).clone(), 0
    given = int((template != config.mask_id).int().cummin(0).values.sum())  # the prompt's length
    # a prompt longer than the block: the first window holds its last W - chunk tokens (all but the masks, if fewer)
    skip = min(given - (W - chunk), len(template) - W) if W < given < len(template) else 0
    for start, _ in windows(len(template) - skip, config.block_size, chunk):
        start += skip
        window = x[:, start:start + W]  # a view: denoise's tokens land in x
        order, chunks, sequential = plan(window[0].cpu() == config.mask_id, num_samples, steps, alpha_0, gen_cpu,
                                         schedule)
        step_callback = callback and (lambda **s: callback(offset=start, **s))
        window[:] = denoise(model, window, order.to(device), chunks, temperature, top_p, kv_cache, gen_noise,
                            step_callback, ctx, progress, static, sequential, cache)
        nfe += len(chunks)
    return x, nfe


@torch.no_grad()
def score(model, ids, alpha_0, K=16, chunk=0, seed=1337, ctx=contextlib.nullcontext()):
    """The log-likelihood of the token sequence `ids` (L,) under an Eso-LM (B) (Theorem 3.1): the importance-weighted
    estimate over K orderings σ ~ P^{α0} (eq. 22), log mean_k p(x | σ_k), in expectation a lower bound that
    rises to log p(x) as K grows; at α0 = 0 every ordering is left to right and it is the exact chain rule. A text
    longer than the block size is scored in the windows generate() samples a text of no prompt in: each window's
    own tokens conditioned on the text before them in the window, log p = Σ log p(window's tokens | its prompt).
    Returns (log-likelihood in nats, surprise (L,)): each token's -log p, averaged over the K orderings (for
    each ordering the tokens' -log p sum to its -log p(x | σ))."""
    config = unwrap(model).config
    chunk = chunk or config.block_size // 2
    check_request(config, ids, chunk, alpha_0)
    require([(isinstance(K, numbers.Integral) and K >= 1, f"K={K!r} must be an integer >= 1")], ValueError)
    K = 1 if alpha_0 == 0 else K
    gen = torch.Generator().manual_seed(seed)  # the orderings: the same on every device
    W, total, surprise = min(len(ids), config.block_size), 0.0, torch.zeros(len(ids), device=ids.device)
    for start, new in windows(len(ids), config.block_size, chunk):
        x = ids[start:start + W].expand(K, -1)
        order = likelihood_order(K, W, alpha_0, n_given=new - start, generator=gen).to(ids.device)
        with ctx:
            nll = token_nll(model, x, order, n_given=new - start).float()  # (K, W - n_given), in σ order
        total += (torch.logsumexp(-nll.sum(1), 0) - math.log(K)).item()
        per_position = torch.zeros(K, W, device=ids.device).scatter(1, order[:, new - start:], nll)
        surprise[new:start + W] = per_position.mean(0)[new - start:]
    return total, surprise


# -----------------------------------------------------------------------------
# the command line

@dataclass
class SampleConfig:
    out_dir: str = ""  # default: the newest out*/ckpt.pt in this folder (what train.py wrote last)
    steps: int = 32  # T, the diffusion steps (of each window); NFE <= T + the sequential tokens
    alpha_0: float = -1.0  # fraction of tokens by diffusion; default: the alpha_0 the checkpoint was trained with
    num_samples: int = 4
    length: int = 0  # tokens per sample, prompt included; default: the block size (--start), the text (--infill)
    chunk: int = 0  # past the block size, tokens added per window; default: half a block
    start: str = ""  # a prompt, or FILE:path
    infill: str = ""  # a text whose '_' characters are generated (one token each), within one block; or FILE:path
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    kv_cache: bool = True
    schedule: str = "random"  # random (Alg. 2) or strided (the paper's improved sampler, Suppl. E.10)
    compile: bool = False  # torch.compile + CUDA graphs over static shapes; default True on CUDA
    trajectory: str = ""  # write the first sample's denoising trajectory (its first window with masks) as an SVG
    score: str = ""  # score this text (or FILE:path) instead of sampling: its log-likelihood and token surprises
    score_k: int = 16  # orderings of the importance-weighted estimate (for A and MDLM: 2 score_k NELBO draws)
    score_svg: str = ""  # with --score: draw the text coloured by each token's surprise, as an SVG here


def validate(cfg):
    checks = [(1 <= cfg.steps < 2 ** 53, f"--steps={cfg.steps} must be in [1, 2**53)"),
              (cfg.alpha_0 == -1 or 0 <= cfg.alpha_0 <= 1, f"--alpha_0={cfg.alpha_0} must be in [0, 1]"),
              (0 < cfg.top_p <= 1, f"--top_p={cfg.top_p} must be in (0, 1]"),
              (cfg.temperature >= 0, f"--temperature={cfg.temperature} must be >= 0"),
              (1 <= cfg.num_samples < 2 ** 31, f"--num_samples={cfg.num_samples} must be in [1, 2**31)"),
              (0 <= cfg.length < 2 ** 31, f"--length={cfg.length} must be in [0, 2**31) (0: the block size)"),
              (cfg.chunk >= 0, f"--chunk={cfg.chunk} must be >= 0 (0: half the block size)"),
              (1 <= cfg.score_k < 2 ** 31, f"--score_k={cfg.score_k} must be in [1, 2**31)"),
              (cfg.schedule in ("random", "strided"), f"--schedule={cfg.schedule} must be random or strided"),
              (not cfg.score or not (cfg.start or cfg.infill), "--score scores a text on its own: leave out --start "
               "and --infill"),
              (cfg.score or not cfg.score_svg, "--score_svg draws a scored text: give --score too"),
              (not cfg.score or not cfg.trajectory, "--trajectory draws a sampling run: leave it out with --score "
               "(--score_svg draws the scores)")]
    for flag, path in (("trajectory", cfg.trajectory), ("score_svg", cfg.score_svg)):  # now, not after the sampling
        if path:
            checks += [(os.path.isdir(os.path.dirname(os.path.abspath(path))), f"--{flag}={path}: its folder does not "
                        "exist"), (not os.path.isdir(path), f"--{flag}={path} is a folder: give it a file name, e.g. "
                        f"{flag}.svg")]
    require(checks)
    check_environment()


def check_environment():
    """The environment's ESO_LM_FEW_ROWS (model.few_rows_transposed), checked before anything runs."""
    try:
        few_rows_transposed()
    except ValueError as e:
        raise UserError(str(e)) from e


def find_checkpoint():
    found = sorted(glob.glob("out*/ckpt.pt"), key=os.path.getmtime)
    if not found:
        raise UserError("no checkpoint found (out*/ckpt.pt here); train one with python train.py, or pass --out_dir")
    return os.path.dirname(found[-1])


def read_text(arg):
    if not arg.startswith("FILE:"):
        return arg
    try:
        with open(arg[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {arg[5:]}: {e.strerror}")
    except UnicodeDecodeError:
        raise UserError(f"{arg[5:]} is not UTF-8 text")


def write_text(path, flag, text):
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot write it: {e.strerror}")


def make_template(tok, mask_id, length, block_size, start="", infill=""):
    """The sequence to complete: given tokens, and mask_id where tokens are to be generated. --start gives a
    prefix (of any length), followed by masks up to `length` (default: the block size; more is sampled window by
    window); --infill gives text with '_' gaps, which is the whole sequence unless `length` asks for more (then
    masks continue it), within one block."""
    if start and infill:
        raise UserError("give --start or --infill, not both (a prompt is an infill text with no gaps)")
    ids = tok.encode(start) if start else []
    for i, piece in enumerate(infill.split(GAP) if infill else []):
        ids += ([mask_id] if i else []) + (tok.encode(piece) if piece else [])
    length = length or (len(ids) if infill else block_size)  # an infill text is the whole sequence
    what = "infill text" if infill else "prompt"
    if infill and len(ids) > block_size:  # (first: raising --length cannot fix this one)
        raise UserError(f"the infill text is {len(ids)} tokens, longer than the trained block size {block_size}; "
                        "shorten it")
    if len(ids) > length:
        raise UserError(f"the {what} is {len(ids)} tokens, longer than --length={length}; shorten it or raise --length")
    if infill and length > block_size:
        raise UserError(f"--infill works within one block ({block_size} tokens); --length={length} asks for more")
    if mask_id not in ids and len(ids) == length:
        raise UserError("nothing to generate: the infill text has no '_' gaps" if infill else
                        f"nothing to generate: the prompt is {len(ids)} tokens, as long as --length={length}; "
                        "raise --length")
    return torch.tensor(ids + [mask_id] * (length - len(ids)), dtype=torch.long)


def svg(title, rows, height, extra="", extra_width=0):
    """A white SVG of monospace text rows (each a list of (text, fill colour, background or None)) under a
    bold title, wide enough for the longest row, the title and `extra` (more SVG, extra_width pixels wide)."""
    esc = lambda t: t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    char = 8.4  # the width of one character at font-size 14
    width = max([len(title) * char, extra_width] + [sum(len(t) for t, _, _ in row) * char for row in rows]) + 24
    body = [f'<text x="8" y="18" font-weight="bold">{esc(title)}</text>']
    for i, row in enumerate(rows):
        x, y = 8.0, 40 + 18 * i
        for text, fill, background in row:
            if background:
                body.append(f'<rect x="{x:.1f}" y="{y - 13}" width="{len(text) * char:.1f}" height="17" '
                            f'fill="{background}"/>')
            body.append(f'<text x="{x:.1f}" y="{y}" fill="{fill}">{esc(text)}</text>')
            x += len(text) * char
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
            f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="14" xml:space="preserve">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}{extra}</svg>\n')


class Trajectory:
    """A generate() callback that records, after each step of the first window that has any (a window of prompt
    alone has none), every position of sample 0 as (text, state): state is 'mask', 'new' (revealed at this step)
    or 'old'."""

    def __init__(self, tok):
        self.tok, self.frames, self.offset = tok, [], None

    def __call__(self, done, end, x, order, offset=0, **_):
        self.offset = offset if self.offset is None else self.offset
        if offset != self.offset:
            return
        x0, pos = x[0].tolist(), order[0].tolist()
        frame = [None] * len(x0)
        for slot, p in enumerate(pos):
            state = "mask" if slot >= end else "new" if slot >= done else "old"
            frame[p] = ("_" if state == "mask" else self.tok.decode([x0[slot]]).replace("\n", "⏎"), state)
        self.frames.append(frame)

    def svg(self, title):
        """Monospace rows, one per step: masks grey, tokens revealed at that step red, earlier ones black."""
        colors = {"mask": "#bbbbbb", "new": "#d62728", "old": "#222222"}
        rows = [[(f"{i + 1:>3} ", "#888888", None)] + [(t, colors[s], None) for t, s in frame]
                for i, frame in enumerate(self.frames)]
        return svg(title, rows, 48 + 18 * len(rows))


def surprise_svg(pieces, surprise, title, scale):
    """The scored text, each token on a background from white (0 nats) to red (`scale` nats or more), line
    breaks kept, with a colour bar as the legend."""
    shade = lambda s: "#ff{0:02x}{0:02x}".format(round(255 * (1 - min(max(s / scale, 0), 1))))
    rows = [[]]
    for piece, s in zip(pieces, surprise.tolist()):
        for i, line in enumerate(piece.split("\n")):
            if i:
                rows[-1].append(("⏎", "#888888", shade(s)))
                rows.append([])
            if line:
                rows[-1].append((line, "#000000", shade(s)))
    y = 40 + 18 * len(rows) + 10
    bar = "".join(f'<rect x="{8 + 12 * i}" y="{y}" width="12" height="12" fill="{shade(scale * i / 19)}"/>'
                  for i in range(20))
    label = f"-log p of each token: 0 (white) to {scale:.2f} nats or more (red)"
    legend = f'{bar}<text x="{8 + 12 * 20 + 8}" y="{y + 11}" font-size="12">{label}</text>'
    return svg(title, rows, y + 24, legend, extra_width=12 * 20 + 8 + len(label) * 7.2)


def load(cfg):
    """The device, autocast context, model and tokenizer the flags ask for, and a line that says which checkpoint
    was loaded (printed once the request is known to be sound)."""
    device = pick_device(cfg.device)
    ctx, _ = autocast_context(device, cfg.dtype)
    out_dir = cfg.out_dir or find_checkpoint()
    ckpt = load_checkpoint(out_dir, device)
    model = GPT.from_checkpoint(ckpt, device).eval()
    if cfg.alpha_0 == -1:
        cfg.alpha_0 = ckpt["config"]["alpha_0"]
    loaded = (f"loaded {out_dir}/ckpt.pt (iter {ckpt['iter_num']}, denoiser {model.config.denoiser}, trained "
              f"with alpha_0={ckpt['config']['alpha_0']})")
    return device, ctx, model, Tokenizer(ckpt["meta"]), loaded


def compiled(model, run, cache):
    """torch.compile the model (CUDA graphs over static shapes on a GPU) and run the schedule twice, so that
    every step shape is compiled, warmed up and recorded before the timed run. If compiling fails, one line
    says so, and the model itself samples. Returns (network, static shapes?)."""
    print("compiling the model (torch.compile, CUDA graphs on a GPU): two warm-up runs meet every step shape",
          file=sys.stderr)
    net = torch.compile(model, mode="reduce-overhead")
    t0 = time.time()
    try:
        for _ in range(2):
            run(net, True, cache)
    except Exception as e:  # a compiler or a graph capture that fails never costs a run
        cause = getattr(e, "inner_exception", None) or e
        print(f"torch.compile failed ({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]}); sampling "
              "without it", file=sys.stderr)
        return model, False
    print(f"warm-up (compilation and graph capture): {time.time() - t0:.2f} s", file=sys.stderr)
    return net, True


def sample_main(cfg, device, ctx, model, tok, loaded):
    block_size = model.config.block_size
    template = make_template(tok, model.config.mask_id, cfg.length, block_size, read_text(cfg.start),
                             read_text(cfg.infill)).to(device)
    chunk = cfg.chunk or block_size // 2
    check_request(model.config, template, chunk, cfg.alpha_0)  # before anything is printed: an error is one line
    denoiser = model.config.denoiser
    cache_note = (f"kv_cache={cfg.kv_cache}" if denoiser == "B" or not cfg.kv_cache else
                  "no KV cache (MDLM caches nothing)" if denoiser == "mdlm" else
                  "kv_cache=True (denoiser A: from the sequential phase on)")
    windows_note = f", windows of {block_size} tokens moving by {chunk}" if len(template) > block_size else ""
    print(f"{loaded}; sampling with alpha_0={cfg.alpha_0}, steps={cfg.steps}, schedule={cfg.schedule}, "
          f"{cache_note}{windows_note}", file=sys.stderr)
    run = lambda net, static, cache, callback=None: generate(
        net, template, cfg.num_samples, cfg.steps, cfg.alpha_0, cfg.temperature, cfg.top_p, cfg.kv_cache, cfg.seed,
        callback, ctx, progress=sys.stderr.isatty(), schedule=cfg.schedule, static=static, cache=cache, chunk=chunk)
    net, static, cache = model, False, None
    if cfg.compile:  # one cache for the warm-up and the real run, so that the captured graphs keep its address
        cache = new_cache(model, cfg.num_samples, min(len(template), block_size), device, ctx, static=True)
        net, static = compiled(model, run, cache)
    trajectory = Trajectory(tok) if cfg.trajectory else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    x, nfe = run(net, static, cache if static else None, trajectory)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    for row in x.tolist():
        print(tok.decode(row))
        print("---------------")
    n_gen = int((template == model.config.mask_id).sum()) * cfg.num_samples
    print(f"NFE {nfe}, {n_gen} tokens generated, {dt:.2f} s, {n_gen / dt:.1f} tokens/s")
    if trajectory:
        title = f"Eso-LM, alpha_0={cfg.alpha_0}, T={cfg.steps}: {len(trajectory.frames)} steps, grey = mask, red = " \
                "revealed at that step"
        write_text(cfg.trajectory, "--trajectory", trajectory.svg(title))
        print(f"wrote the trajectory of sample 1 to {cfg.trajectory}", file=sys.stderr)


def score_main(cfg, device, ctx, model, tok, loaded):
    """--score: the text's log-likelihood (Eso-LM (B)) or NELBO (A, MDLM: a bound), in nats, nats per token and
    bits per UTF-8 byte, and (B) each token's surprise, printed and, with --score_svg, drawn."""
    text = read_text(cfg.score)
    ids = torch.tensor(tok.encode(text), dtype=torch.long, device=device)
    config = model.config
    if not ids.numel():
        raise UserError("--score needs a text of at least one token")
    if cfg.score_svg and not has_likelihood(config):
        raise UserError(f"--score_svg needs per-token likelihoods, which denoiser {config.denoiser} has not")
    if len(ids) > config.block_size and not has_likelihood(config):
        raise UserError(f"denoiser {config.denoiser} scores texts of up to {config.block_size} tokens (its NELBO "
                        f"has no window-by-window form here); this one has {len(ids)}")
    check_request(config, ids, cfg.chunk or config.block_size // 2, cfg.alpha_0)  # before anything is printed
    print(loaded, file=sys.stderr)
    t0 = time.time()
    if has_likelihood(config):
        logp, surprise = score(model, ids, cfg.alpha_0, cfg.score_k, cfg.chunk, cfg.seed, ctx)
        what = ("exact log-likelihood (alpha_0=0: the chain rule)" if cfg.alpha_0 == 0 else
                f"log-likelihood, importance-weighted over K={cfg.score_k} orderings (in expectation a lower bound; "
                "exact as K grows)")
        if len(ids) > config.block_size:
            what += ", window by window past the block size, each conditioned on the text before it"
    else:
        torch.manual_seed(cfg.seed)
        with torch.no_grad(), ctx:  # 2K draws of the bound's noise (split between its two terms for 0 < α0 < 1)
            logp = -nelbo(model, ids.expand(2 * cfg.score_k, -1), cfg.alpha_0)[0].item() * len(ids)
        surprise = None
        what = (f"minus the NELBO (eq. 7) over {2 * cfg.score_k} draws: in expectation a lower bound on the "
                f"log-likelihood, which denoiser {config.denoiser} has no one-pass form of")
    dt, n_bytes = time.time() - t0, len(text.encode("utf-8"))
    print(f"{len(ids)} tokens, {n_bytes} UTF-8 bytes, alpha_0={cfg.alpha_0}: {what}, {dt:.2f} s")
    print(f"  {logp:.3f} nats: {-logp / len(ids):.4f} nats/token, {-logp / math.log(2) / n_bytes:.4f} bits/byte, "
          f"perplexity {math.exp(-logp / len(ids)):.3f}")
    if surprise is None:
        return
    pieces = [tok.decode([t]) for t in ids.tolist()]
    cells = [f"{p.replace(chr(10), '⏎').replace(' ', '␣')}:{s:.2f}" for p, s in zip(pieces, surprise.tolist())]
    print("  surprise of each token, -log p in nats (mean over the orderings; ␣ a space, ⏎ a line break):")
    print(textwrap.fill(" ".join(cells), width=100, initial_indent="    ", subsequent_indent="    "))
    if cfg.score_svg:
        title = f"surprise of each token, alpha_0={cfg.alpha_0}: {-logp / len(ids):.3f} nats/token"
        write_text(cfg.score_svg, "--score_svg", surprise_svg(pieces, surprise, title, math.log(config.vocab_size)))
        print(f"wrote the surprise of each token to {cfg.score_svg}", file=sys.stderr)


def main(argv=None):
    cfg = SampleConfig()
    user_keys = parse_args(cfg, argv)
    validate(cfg)
    device, ctx, model, tok, loaded = load(cfg)
    if "compile" not in user_keys:
        cfg.compile = device.startswith("cuda")
    (score_main if cfg.score else sample_main)(cfg, device, ctx, model, tok, loaded)


if __name__ == "__main__":
    run_cli(main)
