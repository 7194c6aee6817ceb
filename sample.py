"""
Sample from a trained Eso-LM with the exact KV cache (paper Alg. 2, Fig. 2), or score a text with its exact
likelihood (Theorem 3.1). Right after `python train.py`:

    python sample.py --steps 32                       # from the checkpoint train.py wrote last
    python sample.py --start "ROMEO:" --alpha_0 0.25  # a prompt; a quarter of the tokens by diffusion
    python sample.py --length 512                     # past the block size: a sliding window
    python sample.py --infill "ROMEO: ____________ JULIET:"   # each '_' is one token to generate
    python sample.py --kv_cache=False                 # the uncached reference path: the same logits, up to rounding
    python sample.py --schedule=strided --steps 8     # the paper's improved sampler: far-apart tokens per step
    python sample.py --score "ROMEO: But soft!"       # nats, bits per byte, and each token's surprise
    python sample.py --trajectory=run.html            # a page that steps through the run, pass by pass

The file reads top-down: the schedule S (Alg. 2), the sampler loop (Fig. 2), generation past the block size,
scoring, the trajectory picture and page (its HTML and script: trajectory.html), then the command line. T is the
number of diffusion steps, L the length of a sequence, NFE the forward passes a run makes, σ (`order`) the order
its positions are revealed in.
"""
import contextlib
import glob
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import torch

from configurator import UserError, attention_backends, autocast_context, parse_args, pick_device, require, run_cli
from data import Tokenizer, load_checkpoint
from kvcache import KVCache
from model import (GPT, attention_mask, cast_matrices, few_rows_transposed, has_likelihood, likelihood_order, permute,
                   sampling_products, token_nll, unpermute)

GAP = "_"  # in --infill text, each '_' is one token to generate


# -----------------------------------------------------------------------------
# the schedule S = S_MDM ⊕ S_AR (Alg. 2)

def diffusion_counts(n, T, alpha_0, generator=None):
    """Tokens revealed per diffusion step, empty steps dropped. Alg. 2 draws, for t = 1, 1-1/T, ..., 1/T,
    n_t ~ Binomial(masks left, (α_s - α_t)/(1 - α_t)) with α_t = α0 (1 - t) (model.diffusion_loss's schedule: a
    change to one is a change to both): a Binomial chain, i.e. a Multinomial(n; α0/T, ..., α0/T, 1 - α0). We draw
    that Multinomial one token at a time (a token is in step i when u ∈ [iα0/T, (i+1)α0/T), and left to the
    sequential phase when u >= α0): the same law, with no loop over T, so T = 10^6 costs nothing. u is fp64: fp32
    takes only 2^24 values, which would leave some of T steps likelier than others."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    step = (u[u < alpha_0] / alpha_0 * T).long().clamp(max=T - 1)
    return torch.unique(step, return_counts=True)[1].tolist()


def plan(is_gen, num_samples, T, alpha_0, generator=None, schedule="random"):
    """The schedule for a template whose positions `is_gen` (L,) are to be generated. Returns order (B, L): given
    tokens first (ascending), then the diffusion positions, then the sequential ones ascending; counts: the tokens
    revealed per step, shared by the batch (the cache is one rectangle), NFE = len(counts); and n_seq, how many of
    the steps (the last ones, one token each) are sequential.
    random (Alg. 2): Binomial counts, the diffusion positions in a random order per sample.
    strided (the paper's improved sampler, Suppl. E.10): the generated positions fall in T' = min(T, n) groups,
    every T'-th position from the r-th on, so that no step reveals neighbours; the groups come in a random order
    shared by the batch, the first α0 T' of them (rounded up or down at random, so that every token is made by
    diffusion with probability α0) are diffusion steps, and the rest goes left to right."""
    assert schedule in ("random", "strided")
    given, gen = torch.where(~is_gen)[0], torch.where(is_gen)[0]
    n = len(gen)
    if schedule == "strided":
        groups = min(T, n)
        group = torch.randperm(groups, generator=generator)[torch.arange(n) % groups]  # each position's step
        n_diff = int(alpha_0 * groups + torch.rand((), generator=generator))  # randomised rounding of α0 T'
        in_diffusion = group < n_diff
        counts = torch.bincount(group[in_diffusion], minlength=n_diff).tolist()
        key = torch.where(in_diffusion, group + 0.5 * torch.rand(num_samples, n, generator=generator),
                          groups + torch.arange(n) / n)  # by step, randomly within one; then left to right
        gen = gen[key.argsort(dim=1)]
    else:
        counts = diffusion_counts(n, T, alpha_0, generator)
        gen = gen[torch.rand(num_samples, n, generator=generator).argsort(dim=1)]
        gen[:, sum(counts):] = gen[:, sum(counts):].sort(dim=1).values  # the sequential part: left to right
    n_seq = n - sum(counts)
    return torch.cat([given.expand(num_samples, -1), gen], dim=1), counts + [1] * n_seq, n_seq


def sample_tokens(logits, temperature=1.0, top_p=0.9, generator=None):
    """Nucleus sampling by float64 Gumbel-max (lower precision skews the draws towards the top tokens), on the
    generator's device (MPS has no float64). The mask token's column (the last) is dropped: it is never drawn.
    temperature=0 is greedy."""
    logits, device = logits[..., :-1], logits.device
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(generator.device if generator else device, torch.float64) / temperature
    if top_p < 1:  # keep the smallest set of tokens whose probability reaches top_p (at least the top one)
        probs, idx = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), -math.inf)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits - torch.log(-torch.log(u))).argmax(-1).to(device)


# -----------------------------------------------------------------------------
# the sampler loop (Fig. 2: one KV cache for both phases)

def new_cache(model, batch_size, L, device, ctx=contextlib.nullcontext(), static=False):
    """A KVCache for `model`, in the dtype attention reads K/V in (autocast's, else fp32); None for MDLM, which
    never caches. A caller that samples more than once with static shapes hands the same one to every run."""
    config = model.config
    dtype = ctx.fast_dtype if isinstance(ctx, torch.autocast) and ctx._enabled else torch.float32
    return None if config.denoiser == "mdlm" else KVCache(config, batch_size, L, device, dtype, static)


def denoise(model, x, order, counts, n_seq, draw, cache=None, static=False, ctx=contextlib.nullcontext(),
            callback=None):
    """Fill the masks of x (B, L), original order, in the order `order` and step sizes `counts` of plan(); the last
    n_seq steps are the sequential phase; draw(logits) samples tokens. Each step is Eso-LM (B)'s cached step (Fig. 2):
      feed    the tokens the cache lacks (those revealed at the step before, now clean) and the masks to reveal
              now, each at its original position;
      attend  causally over the cache's committed slots and the fed tokens;
      sample  the masks' tokens;
      commit  the fed clean tokens' K/V to the cache, never a mask's (its slot is rewritten at the next step).
    The other paths are departures from it, each one line below:
      no cache  every step feeds every clean token from slot 0: the reference path, the same logits up to float
                rounding (different matrix shapes round differently), so the same tokens but at a near tie;
      A         its clean tokens see each other, so while they grow (the diffusion phase) a step re-feeds them
                all; from the sequential phase on the clean prefix is frozen and cached as B's (Fig. 15);
      MDLM      every step feeds all L slots, the masks to come included, and nothing is cached;
      static    the fed chunk is padded to a power of two (at least 2) with the slots after it and a cached step
                reads all L slots, so that CUDA graphs meet a few shapes (the causal mask hides the padding).
    After each step callback(step, phase, first, done, end, last, keys, x, order, mask, logits, cache) sees it:
    slots [first, last) were fed, [first, done) clean and [done, end) the masks revealed now; attention read slots
    [0, keys) (of the cache, when cache is not None) through mask (fed rows x keys, None: all); x is in σ order."""
    L = x.size(1)
    denoiser = model.config.denoiser
    done = L - sum(counts)  # slots [0, done) are clean: the given tokens
    seq_start = L - n_seq  # the sequential phase: from here on one token a step, left to right
    if cache is not None:
        cache.reset()
    slots = torch.arange(L, device=x.device)
    with torch.inference_mode(), attention_backends(x.device), sampling_products():
        x = permute(x, order)  # in σ order for the whole run (a gather: a new tensor)
        for step, k in enumerate(counts):
            end, sequential = done + k, done >= seq_start
            cached = cache is not None and (denoiser == "B" or sequential)  # A: cached once sequential
            # feed slots [first, last): the clean tokens the cache lacks, then the masks to reveal now
            first = cache.committed if cached else 0  # no cache: every clean token, from slot 0
            last = L if denoiser == "mdlm" else end  # MDLM: the masks to come as well
            if static:  # padded to a power of two with the slots after it
                last = min(L, first + max(2, 1 << (last - first - 1).bit_length()))
            keys = L if static and cached else last  # attention reads slots [0, keys)
            if cached:
                cache.feed(last - first, keys)
            # attend: causal over the sorted slots (A: its clean tokens also see each other; MDLM: None, all see all)
            mask = attention_mask(denoiser, slots[first:last, None], slots[:keys], min(done, seq_start))
            out = slice(done - first, end - first)  # the masks to reveal: the rows that get logits
            with ctx:
                logits = model(x[:, first:last], order[:, first:last], mask, cache if cached else None,
                               out=slice(None) if static else out)  # static: every row, one shape per chunk size
            logits = logits[:, out] if static else logits
            # sample the masks' tokens; commit the clean tokens just fed, never a mask
            x[:, done:end] = draw(logits)
            if cached:
                cache.commit(done - first)
            if callback:  # (logits cloned: under CUDA graphs the next replay overwrites them)
                callback(step=step, phase="sequential" if sequential else "diffusion", first=first,
                         done=done, end=end, last=last, keys=keys, x=x, order=order, mask=mask,
                         logits=logits.clone(), cache=cache if cached else None)
            done = end
        x = unpermute(x, order)
    return x.clone()  # a normal tensor again, usable with autograd


def windows(L, block_size, chunk):
    """The windows a text of L tokens is sampled and scored in: (start, new) for the window [start, start + W),
    W = min(L, block_size); its tokens from `new` on are its own, those before them the text so far, its prompt.
    The first window is [0, W); each further one moves on by `chunk` tokens (fewer at the end)."""
    start = new = 0
    while True:
        yield start, new
        if start + block_size >= L:
            return
        start, new = start + min(chunk, L - start - block_size), start + block_size


def generate(model, template, num_samples=1, steps=32, alpha_0=1.0, temperature=1.0, top_p=0.9, kv_cache=True,
             seed=1337, callback=None, ctx=contextlib.nullcontext(), schedule="random", static=False, cache=None,
             chunk=0):
    """Sample num_samples sequences that agree with `template` (L,): its mask tokens are generated, every other
    token is kept. Returns (tokens (B, L), NFE). Up to the block size, one run of the sampler fills it; a longer
    template (a prompt followed by masks) is filled window by window (windows()): the first block, then each
    further `chunk` tokens (default: half a block) with the last block_size - chunk tokens of the text so far as
    their prompt, a sliding window as nanoGPT crops its context (a window of prompt alone samples nothing).
    callback(offset=..., **step) sees each step of each window, offset being the window's start in the text. The
    samples of one call share the schedule's step sizes: for statistics over samples, use several seeds.
    cache: a KVCache to reuse (static shapes: graphs captured in one call replay in the next)."""
    config = model.config
    assert config.denoiser != "mdlm" or alpha_0 == 1, "MDLM is a pure diffusion model: sample it with alpha_0=1"
    chunk = chunk or config.block_size // 2
    L, W, device = len(template), min(len(template), config.block_size), template.device
    is_gen = (template == config.mask_id).cpu()
    if L > W and not torch.equal(is_gen, is_gen.cummax(0).values):
        raise ValueError(f"a template longer than block_size={config.block_size} must be a prompt followed by masks: "
                         "infilling works within one block")
    gen_cpu = torch.Generator().manual_seed(seed)  # the schedule and orderings: the same on every device
    gen_noise = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)  # MPS: no fp64
    draw = lambda logits: sample_tokens(logits, temperature, top_p, gen_noise)
    cache = (cache or new_cache(model, num_samples, W, device, ctx, static)) if kv_cache else None
    x, nfe = template.repeat(num_samples, 1), 0
    for start, _ in windows(L, config.block_size, chunk):  # (a window of prompt alone makes no pass)
        window = x[:, start:start + W]  # a view: denoise's tokens land in x
        order, counts, n_seq = plan(window[0].cpu() == config.mask_id, num_samples, steps, alpha_0, gen_cpu,
                                    schedule)
        step_callback = callback and (lambda **s: callback(offset=start, **s))
        window[:] = denoise(model, window, order.to(device), counts, n_seq, draw, cache, static, ctx, step_callback)
        nfe += len(counts)
    return x, nfe


def runner(net, template, num_samples, ctx=contextlib.nullcontext(), static=False, **kw):
    """generate(net, template, num_samples, **kw) as a function of its callback. With static shapes (CUDA graphs:
    net compiled in reduce-overhead mode), one cache serves every run, so that a replayed graph finds it where it
    was captured, and two runs here compile, warm up and record every step shape before a run that counts."""
    L = min(len(template), net.config.block_size)
    cache = new_cache(net, num_samples, L, template.device, ctx, static) if static else None
    run = lambda callback=None: generate(net, template, num_samples, callback=callback, ctx=ctx, static=static,
                                         cache=cache, **kw)
    for _ in range(2 if static else 0):
        run()
    return run


@torch.no_grad()
def score(model, ids, alpha_0, K=16, chunk=0, seed=1337, ctx=contextlib.nullcontext()):
    """The log-likelihood of the tokens `ids` (L,) under an Eso-LM (B) (Theorem 3.1): the importance-weighted
    estimate over K orderings σ ~ P^{α0} (eq. 22), log mean_k p(x | σ_k), in expectation a lower bound that rises to
    log p(x) as K grows; at α0 = 0 every ordering is left to right and it is the exact chain rule. A text longer
    than the block is scored in generate()'s windows: each window's own tokens conditioned on the text before them
    in the window. Returns (log-likelihood in nats, surprise (L,)): each token's -log p, averaged over the K
    orderings (for each ordering they sum to its -log p(x | σ))."""
    config = model.config
    chunk, K = chunk or config.block_size // 2, 1 if alpha_0 == 0 else K
    gen = torch.Generator().manual_seed(seed)  # the orderings: the same on every device
    W, total, surprise = min(len(ids), config.block_size), 0.0, []  # surprise: each window's own tokens
    for start, new in windows(len(ids), config.block_size, chunk):
        n_given = new - start
        order = likelihood_order(K, W, alpha_0, n_given, gen)
        with ctx:
            nll = token_nll(model, ids[start:start + W].expand(K, -1), order, n_given).float()  # (K, W - n_given)
        total += (torch.logsumexp(-nll.sum(1), 0) - math.log(K)).item()
        per_position = nll.new_zeros(K, W).scatter(1, order[:, n_given:].to(nll.device), nll)
        surprise.append(per_position.mean(0)[n_given:])
    return total, torch.cat(surprise)


# -----------------------------------------------------------------------------
# pictures: the denoising trajectory, the surprise of each token

def svg(title, rows):
    """A white SVG of monospace text rows (each a list of (text, colour, background or None)) under a bold title."""
    char = 8.4  # the width of one character at font-size 14
    body, width = [f'<text x="8" y="18" font-weight="bold">{escape(title)}</text>'], len(title) * char
    for i, row in enumerate(rows):
        x, y = 8.0, 40 + 18 * i
        for text, fill, background in row:
            if background:
                body.append(f'<rect x="{x:.1f}" y="{y - 13}" width="{len(text) * char:.1f}" height="17" '
                            f'fill="{background}"/>')
            body.append(f'<text x="{x:.1f}" y="{y}" fill="{fill}">{escape(text)}</text>')
            x += len(text) * char
        width = max(width, x - 8)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 24:.0f}" height="{48 + 18 * len(rows)}" '
            f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="14" xml:space="preserve">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n')


class Trajectory:
    """A generate() callback that records every pass of the first sample: denoise()'s slots (offset, step, phase,
    first, done, end, last, keys), σ, each position's text (in the window's original order) with its state:
    'mask', 'new' (revealed by this pass) or 'old', each revealed token's probability, the attention mask's rows
    as strings of 0/1 (None: all see all) and the cache's committed slots after the pass (None: no cache)."""

    def __init__(self, tok):
        self.tok, self.passes = tok, []

    def __call__(self, x, order, mask, logits, cache, **s):
        done, end, sigma = s["done"], s["end"], order[0].tolist()
        frame = [None] * len(sigma)  # (text, state) of each position of the window, in its original order
        for slot, (p, t) in enumerate(zip(sigma, x[0].tolist())):
            state = "mask" if slot >= end else "new" if slot >= done else "old"
            frame[p] = (GAP if state == "mask" else self.tok.decode([t]).replace("\n", "⏎"), state)
        probs = logits[0].float().softmax(-1).gather(1, x[0, done:end, None])[:, 0]
        self.passes.append(dict(s, frame=frame, order=sigma, p=probs.tolist(),
                                mask=None if mask is None else ["".join(map(str, r)) for r in mask.int().tolist()],
                                committed=cache and cache.committed))

    def svg(self, title):
        """A row per pass of the first window that has any: masks grey, tokens revealed by that pass red, earlier
        ones black; each row says its phase (d: diffusion, s: sequential)."""
        colors = {"mask": "#bbbbbb", "new": "#d62728", "old": "#222222"}
        first = [p for p in self.passes if p["offset"] == self.passes[0]["offset"]]
        rows = [[(f"{i + 1:>3} {p['phase'][0]} ", "#888888", None)] + [(t, colors[s], None) for t, s in p["frame"]]
                for i, p in enumerate(first)]
        return svg(f"{title}: a row per forward pass (d diffusion, s sequential), grey = mask, red = revealed by "
                   "that pass", rows)

    def html(self, title):
        """A page that steps through every pass: trajectory.html, its placeholder replaced by this record ('<'
        escaped, so that no token's text can end the script)."""
        run = json.dumps(dict(title=title, passes=self.passes), separators=(",", ":")).replace("<", "\\u003c")
        return Path(__file__).with_name("trajectory.html").read_text(encoding="utf-8").replace("RUN_JSON", run)


def surprise_svg(pieces, surprise, title, scale):
    """The scored text, each token on a background from white (0 nats) to red (`scale` nats or more), line breaks
    kept, and a row of shades as the legend."""
    shade = lambda s: "#ff{0:02x}{0:02x}".format(round(255 * (1 - min(s / scale, 1))))
    rows = [[]]
    for piece, s in zip(pieces, surprise.tolist()):
        for i, line in enumerate(piece.split("\n")):
            if i:
                rows[-1].append(("⏎", "#888888", shade(s)))
                rows.append([])
            if line:
                rows[-1].append((line, "#000000", shade(s)))
    legend = [(f" {scale * i / 4:.1f} ", "#000000", shade(scale * i / 4)) for i in range(5)]
    return svg(title, rows + [[], [("-log p of each token, in nats:", "#000000", None)] + legend])


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
    trajectory: str = ""  # run.html: a page that steps through sample 1's passes; x.svg: its first window, a row a pass
    score: str = ""  # score this text (or FILE:path) instead of sampling: its log-likelihood and token surprises
    score_k: int = 16  # orderings of the importance-weighted estimate
    score_svg: str = ""  # with --score: draw the text coloured by each token's surprise, as an SVG here


def validate(cfg):
    """The flags and the environment, before anything is loaded; each wrong one is one line."""
    require([(cfg.steps >= 1, f"--steps={cfg.steps} must be >= 1"),
             (cfg.alpha_0 == -1 or 0 <= cfg.alpha_0 <= 1, f"--alpha_0={cfg.alpha_0} must be in [0, 1]"),
             (0 < cfg.top_p <= 1, f"--top_p={cfg.top_p} must be in (0, 1]"),
             (cfg.temperature >= 0, f"--temperature={cfg.temperature} must be >= 0"),
             (min(cfg.num_samples, cfg.score_k) >= 1, "--num_samples and --score_k must be >= 1"),
             (min(cfg.length, cfg.chunk) >= 0, "--length and --chunk must be >= 0 (0: their default)"),
             (cfg.schedule in ("random", "strided"), f"--schedule={cfg.schedule} must be random or strided"),
             (not cfg.score or not (cfg.start or cfg.infill or cfg.trajectory), "--score scores a text on its own: "
              "leave out --start, --infill and --trajectory"),
             (cfg.score or not cfg.score_svg, "--score_svg draws a scored text: give --score too")] +
            [(not path or os.path.isdir(os.path.dirname(path) or ".") and not os.path.isdir(path),
              f"--{flag}={path} must name a file in a folder that exists")  # now, not after the sampling
             for flag, path in (("trajectory", cfg.trajectory), ("score_svg", cfg.score_svg))] +
            [(not cfg.trajectory or cfg.trajectory.endswith((".html", ".svg")),
              f"--trajectory={cfg.trajectory} must end in .html (a page) or .svg (a picture)"),
             (cfg.out_dir or glob.glob("out*/ckpt.pt"), "no checkpoint found (out*/ckpt.pt here); train one with "
              "python train.py, or pass --out_dir")])
    few_rows_transposed()  # ESO_LM_FEW_ROWS


def read_text(arg):
    """A flag's text, or the file it names (FILE:path)."""
    if not arg.startswith("FILE:"):
        return arg
    try:
        return Path(arg[5:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {arg[5:]} as UTF-8 text ({type(e).__name__})")


def write_text(path, text, what):
    Path(path).write_text(text, encoding="utf-8")
    print(f"wrote {what} to {path}", file=sys.stderr)


def make_template(tok, mask_id, length, block_size, start="", infill=""):
    """The sequence to complete: given tokens, and mask_id where tokens are to be generated. --start gives a prefix
    (of any length) followed by masks up to `length` (default: the block size; more is sampled window by window);
    --infill gives a text with '_' gaps, the whole sequence unless `length` asks for more, within one block."""
    ids = tok.encode(start)
    for piece in infill.split(GAP):
        ids += tok.encode(piece) + [mask_id]
    ids.pop()  # (no gap after the last piece)
    length = length or (len(ids) if infill else block_size)
    what = "infill text" if infill else "prompt"
    require([(not (start and infill), "give --start or --infill, not both (a prompt is an infill text with no gaps)"),
             (not infill or max(len(ids), length) <= block_size,
              f"--infill works within one block ({block_size} tokens): the text is {len(ids)}, --length={length}"),
             (len(ids) <= length, f"the {what} is {len(ids)} tokens, longer than --length={length}"),
             (mask_id in ids or len(ids) < length, f"nothing to generate: the {what} has no gaps and fills "
              f"--length={length}")])
    return torch.tensor(ids + [mask_id] * (length - len(ids)))


def sample_main(cfg, device, ctx, model, tok, loaded):
    config = model.config
    template = make_template(tok, config.mask_id, cfg.length, config.block_size, read_text(cfg.start),
                             read_text(cfg.infill)).to(device)
    print(f"{loaded}; sampling with alpha_0={cfg.alpha_0}, T={cfg.steps}, schedule={cfg.schedule}, "
          f"kv_cache={cfg.kv_cache and config.denoiser != 'mdlm'}", file=sys.stderr)
    kw = dict(steps=cfg.steps, alpha_0=cfg.alpha_0, temperature=cfg.temperature, top_p=cfg.top_p,
              kv_cache=cfg.kv_cache, seed=cfg.seed, schedule=cfg.schedule, chunk=cfg.chunk)
    if cfg.compile:
        print("compiling the model (torch.compile, CUDA graphs on a GPU; --compile=False samples without): two "
              "warm-up runs", file=sys.stderr)
    net = torch.compile(model, mode="reduce-overhead") if cfg.compile else model
    run = runner(net, template, cfg.num_samples, ctx, cfg.compile, **kw)
    trajectory = Trajectory(tok) if cfg.trajectory else None
    sync = lambda: torch.cuda.synchronize(device) if device.startswith("cuda") else None
    sync()
    t0 = time.time()
    x, nfe = run(trajectory)
    sync()
    dt = time.time() - t0
    for row in x.tolist():
        print(tok.decode(row) + "\n---------------")
    n_gen = int((template == config.mask_id).sum()) * cfg.num_samples
    print(f"NFE {nfe}, {n_gen} tokens generated, {dt:.2f} s, {n_gen / dt:.1f} tokens/s")
    if trajectory:
        title = f"Eso-LM ({config.denoiser}), alpha_0={cfg.alpha_0}, T={cfg.steps}"
        write_text(cfg.trajectory, (trajectory.html if cfg.trajectory.endswith(".html") else trajectory.svg)(title),
                   "the trajectory of sample 1")


def score_main(cfg, device, ctx, model, tok, loaded):
    """--score: the text's log-likelihood in nats, nats per token and bits per UTF-8 byte, and each token's
    surprise, printed and, with --score_svg, drawn."""
    text, config = read_text(cfg.score), model.config
    ids = torch.tensor(tok.encode(text), device=device)
    L, n_bytes = len(ids), len(text.encode())
    require([(L >= 1, "--score needs a text of at least one token"),
             (has_likelihood(config), f"denoiser {config.denoiser} has no one-pass likelihood to score a text with; its "
              "NELBO on the val split is in eval.json (python train.py --eval_only=True --out_dir=...)")])
    print(loaded, file=sys.stderr)
    t0 = time.time()
    logp, surprise = score(model, ids, cfg.alpha_0, cfg.score_k, cfg.chunk, cfg.seed, ctx)
    what = ("exact log-likelihood (alpha_0=0: the chain rule)" if cfg.alpha_0 == 0 else
            f"log-likelihood, importance-weighted over K={cfg.score_k} orderings (in expectation a lower bound, exact "
            "as K grows)")
    print(f"{L} tokens, {n_bytes} UTF-8 bytes, alpha_0={cfg.alpha_0}: {what}, {time.time() - t0:.2f} s")
    print(f"  {logp:.3f} nats: {-logp / L:.4f} nats/token, {-logp / math.log(2) / n_bytes:.4f} bits/byte, "
          f"perplexity {math.exp(-logp / L):.3f}")
    pieces = [tok.decode([t]) for t in ids.tolist()]
    cells = [f"{p.replace(chr(10), '⏎').replace(' ', '␣')}:{s:.2f}" for p, s in zip(pieces, surprise.tolist())]
    print("  surprise of each token, -log p in nats (mean over the orderings; ␣ a space, ⏎ a line break):")
    print(textwrap.fill(" ".join(cells), width=100, initial_indent="    ", subsequent_indent="    "))
    if cfg.score_svg:
        title = f"surprise of each token, alpha_0={cfg.alpha_0}: {-logp / L:.3f} nats/token"
        write_text(cfg.score_svg, surprise_svg(pieces, surprise, title, math.log(config.vocab_size)), "the surprise")


def main(argv=None):
    cfg = SampleConfig()
    user_keys = parse_args(cfg, argv)
    validate(cfg)
    device = pick_device(cfg.device)
    ctx, dtype = autocast_context(device, cfg.dtype)
    out_dir = cfg.out_dir or os.path.dirname(max(glob.glob("out*/ckpt.pt"), key=os.path.getmtime))  # the newest
    ckpt = load_checkpoint(out_dir, device)
    model = GPT.from_checkpoint(ckpt, device).eval()
    if dtype == "bfloat16":
        cast_matrices(model, torch.bfloat16)
    trained, config = ckpt["config"]["alpha_0"], model.config
    cfg.alpha_0 = trained if cfg.alpha_0 == -1 else cfg.alpha_0
    cfg.compile = cfg.compile if "compile" in user_keys else device.startswith("cuda")
    require([(config.denoiser != "mdlm" or cfg.alpha_0 == 1, f"--alpha_0={cfg.alpha_0}: MDLM is a pure diffusion "
              "model; use --alpha_0=1"),
             (cfg.chunk < config.block_size, f"--chunk={cfg.chunk} must be below block_size={config.block_size}: "
              "each window keeps some text")])
    # printed by sample_main and score_main once they have checked the text they are given
    loaded = f"loaded {out_dir}/ckpt.pt (iter {ckpt['iter_num']}, denoiser {config.denoiser}, alpha_0={trained})"
    (score_main if cfg.score else sample_main)(cfg, device, ctx, model, Tokenizer(ckpt["meta"]), loaded)


if __name__ == "__main__":
    run_cli(main)
