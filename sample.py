"""
Sample from a trained Eso-LM with the exact KV cache (paper §5). Right after `python train.py`:

    python sample.py --steps 32                       # from the checkpoint train.py wrote last
    python sample.py --start "ROMEO:" --alpha_0 0.25  # a prompt; a quarter of the tokens by diffusion
    python sample.py --infill "ROMEO: ____________ JULIET:"   # each '_' is one token to generate
    python sample.py --kv_cache=False                 # the uncached reference path: the same tokens, slower
    python sample.py --schedule=strided --steps 8     # the paper's improved sampler: far-apart tokens per step

One loop serves both phases: a diffusion step reveals a chunk of tokens at once, a sequential step one.
Each step feeds [the tokens revealed at the previous step, now clean; the masks to reveal now] with their
original RoPE positions; the clean tokens' K/V join the cache, the masks' never do.
"""
import contextlib
import glob
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from configurator import UserError, autocast_context, parse_args, pick_device, run_cli
from data import Tokenizer, load_checkpoint
from kvcache import KVCache
from model import GPT, attention_mask, permute, unpermute, unwrap

GAP = "_"  # in --infill text, each '_' is one token to generate


# -----------------------------------------------------------------------------
# the schedule (§5.1, Alg. 2)

def diffusion_counts(n, steps, alpha_0, generator=None):
    """Tokens revealed per diffusion step, empty steps dropped. Alg. 2 draws, for t = 1, 1-1/T, ..., 1/T,
    n_t ~ Binomial(masks left, (α_s - α_t)/(1 - α_t)) with α_t = α0 (1 - t): a Binomial chain, i.e. a
    Multinomial(n; α0/T, ..., α0/T, 1 - α0). We draw that Multinomial one token at a time (a token is in
    diffusion step i when u ∈ [iα0/T, (i+1)α0/T), and left to the sequential phase when u >= α0):
    the same law, with no Python loop over T, so T = 10^6 costs nothing."""
    u = torch.rand(n, generator=generator)
    step = (u[u < alpha_0] / alpha_0 * steps).long().clamp(max=steps - 1)
    counts = torch.bincount(step, minlength=steps)
    return counts[counts > 0].tolist()


def plan(is_gen, num_samples, steps, alpha_0, generator=None, schedule="random"):
    """The unified schedule S = S_MDM ⊕ S_AR for a template whose positions `is_gen` (L,) are to be generated.
    Returns order (B, L): given tokens first (ascending), then the diffusion positions, then the sequential
    positions ascending; chunks: the tokens per step, shared by the batch (the cache is one rectangle), NFE =
    len(chunks); and
    how many of them (the last ones) are sequential steps.
    schedule='random' (Alg. 2): Binomial counts per step, diffusion positions in a random order per sample.
    schedule='strided' (the paper's "improved" sampler, Suppl. E.10, the code's subcontext ordering): step r of
    T' = min(steps, #generated) reveals every T'-th generated position from the r-th on, so that no step decodes
    neighbours at once; the rows come in a random order shared by the batch, and the first α0 T' rows, rounded
    up or down at random with the odds that make their expected number α0 T' (so every token is made by
    diffusion with probability α0), are diffusion steps; the rest goes left to right. Within a step the order is
    random per sample."""
    given = torch.nonzero(~is_gen).flatten()
    gen = torch.nonzero(is_gen).flatten()
    n = len(gen)
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
    """Nucleus sampling by float64 Gumbel-max (lower precision would skew the categorical draws towards the top
    tokens), on the generator's device (MPS has no float64).
    The mask token's column (the last) is dropped, so it can never be drawn. temperature=0 is greedy."""
    device = logits.device
    logits = logits[..., :-1].to(generator.device if generator else device, torch.float64)  # drop the mask
    if temperature == 0:
        return logits.argmax(-1).to(device)
    logits = logits / temperature
    if top_p < 1:  # keep the smallest set of tokens whose probability reaches top_p (at least the top one)
        probs, idx = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits - torch.log(-torch.log(u))).argmax(-1).to(device)


# -----------------------------------------------------------------------------
# the sampler loop (§5.3)

def new_cache(model, batch_size, L, device, ctx=contextlib.nullcontext(), static=False):
    """A KVCache for `model`, its K/V in the dtype the model makes them (autocast's, else fp32); None for MDLM,
    which never caches. A caller that samples more than once with static shapes hands the same one to every run."""
    config = unwrap(model).config
    dtype = ctx.fast_dtype if isinstance(ctx, torch.autocast) else torch.float32
    return None if config.denoiser == "mdlm" else KVCache.for_model(config, batch_size, L, device, dtype, static)


def denoise(model, x, order, chunks, temperature=1.0, top_p=0.9, kv_cache=True, generator=None,
            callback=None, ctx=contextlib.nullcontext(), progress=False, static=False, sequential=0, cache=None):
    """Fill the masks of x (B, L), original order, following `order` and `chunks` (see plan()); the last
    `sequential` chunks (of one token each) are the sequential phase. Each step feeds the tokens revealed at
    the previous step (now clean) and the masks to reveal now, with the mask of the model's denoiser
    (attention_mask in model.py):
      B     cached in both phases: each step feeds only what the cache lacks (§5.3);
      A     its clean tokens see each other, so a diffusion step changes all of their K/V: it feeds every clean
            token at every diffusion step, and caches from the sequential phase on (§3);
      mdlm  feeds all L tokens, masks still to come included, at every step, and never caches.
    kv_cache=False is the reference path: every step feeds every revealed token and the current masks from
    slot 0. Both paths draw the same noise, so they give the same tokens.
    static=True gives every step one of a few shapes, for CUDA graphs (torch.compile's reduce-overhead): the
    fed chunk is padded to a power of two with the slots that follow it (the causal mask hides them from the
    real tokens; their K/V land in slots nobody has committed) and cached steps attend to all L slots.
    cache: a KVCache to reuse (reset here), so that graphs captured in one call replay in the next.
    After each step, callback(step, start, done, end, x, order, logits, cache) sees it: slots [start, done)
    were fed clean, [done, end) as masks and now hold their samples; x is in σ order. The loop runs in
    inference mode: tensors a callback keeps are inference tensors (clone() them for autograd)."""
    config = unwrap(model).config
    if config.denoiser == "mdlm" and sequential:
        raise ValueError("MDLM has no sequential phase: sample it with alpha_0=1")
    B, L = x.shape
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.inference_mode(), sdpa_kernel(backends) if x.is_cuda else contextlib.nullcontext():
        # (on CUDA, letting SDPA pick its backend for a bf16 step with a boolean mask can cost tens of ms per new shape)
        x = permute(x, order).clone()  # kept in σ order for the whole run
        done = L - sum(chunks)  # slots [0, done) are clean: the given tokens
        seq_start = L - sequential  # A: from this slot on, the clean prefix is frozen
        cache = (cache or new_cache(model, B, L, x.device, ctx, static)) if kv_cache else None
        if cache is not None:
            assert cache.k[0].size(0) == B and cache.max_len == L, "the cache does not fit this run"
            cache.reset()
        slots = torch.arange(L, device=x.device)
        for step, k in enumerate(tqdm(chunks, disable=not progress, leave=False, desc="steps")):
            end = done + k
            cached = cache is not None and (config.denoiser == "B" or done >= seq_start)
            first = cache.committed if cached else 0  # cached: what the cache lacks; else everything
            n = (L if config.denoiser == "mdlm" else end) - first  # tokens to feed
            T = min(1 << (n - 1).bit_length(), L - first) if static else n  # static: a power of two
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
                callback(step=step, start=first, done=done, end=end, x=x, order=order, logits=logits, cache=cache)
            done = end
        x = unpermute(x, order)
    return x.clone()  # a normal tensor again, usable with autograd


def generate(model, template, num_samples=1, steps=32, alpha_0=1.0, temperature=1.0, top_p=0.9,
             kv_cache=True, seed=1337, callback=None, ctx=contextlib.nullcontext(), progress=False,
             schedule="random", static=False, cache=None):
    """Sample num_samples sequences that agree with `template` (L,): its mask tokens are generated, every
    other token is kept. Returns (tokens (B, L), NFE). The same seed gives the same samples (across
    processes, see model.Linear)."""
    config = unwrap(model).config
    if template.dim() != 1 or len(template) > config.block_size:
        raise ValueError(f"the template must be one sequence of at most block_size={config.block_size} tokens, "
                         f"got shape {tuple(template.shape)}")
    if not 0 <= alpha_0 <= 1 or steps < 1 or schedule not in ("random", "strided") or num_samples < 1:
        raise ValueError(f"alpha_0={alpha_0} must be in [0, 1], steps={steps} and num_samples={num_samples} at "
                         f"least 1, schedule={schedule!r} 'random' or 'strided'")
    mask_id = config.mask_id
    device = template.device
    gen_cpu = torch.Generator().manual_seed(seed)  # schedule and orderings: the same on every device
    noise_device = "cpu" if device.type == "mps" else device  # MPS has no float64
    gen_noise = torch.Generator(device=noise_device).manual_seed(seed)
    order, chunks, sequential = plan((template == mask_id).cpu(), num_samples, steps, alpha_0, gen_cpu, schedule)
    x = template.expand(num_samples, -1)
    x = denoise(model, x, order.to(device), chunks, temperature, top_p, kv_cache, gen_noise, callback, ctx,
                progress, static, sequential, cache)
    return x, len(chunks)


# -----------------------------------------------------------------------------
# the command line

@dataclass
class SampleConfig:
    out_dir: str = ""  # default: the newest out*/ckpt.pt in this folder (what train.py wrote last)
    steps: int = 32  # T, the diffusion steps; NFE <= T + the sequential tokens
    alpha_0: float = -1.0  # fraction of tokens by diffusion; default: the alpha_0 the checkpoint was trained with
    num_samples: int = 4
    length: int = 0  # tokens per sample, prompt included; default: the block size (--start), the text (--infill)
    start: str = ""  # a prompt, or FILE:path
    infill: str = ""  # a text whose '_' characters are generated (one token each); or FILE:path
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    kv_cache: bool = True
    schedule: str = "random"  # random (Alg. 2) or strided (the paper's improved sampler, Suppl. E.10)
    compile: bool = False  # torch.compile + CUDA graphs over static shapes; default True on CUDA
    trajectory: str = ""  # write the first sample's denoising trajectory as an SVG strip of frames here


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


def make_template(tok, mask_id, length, block_size, start="", infill=""):
    """The sequence to complete: given tokens, and mask_id where tokens are to be generated. --start gives a
    prefix, followed by masks up to `length` (default: the block size); --infill gives text with '_' gaps,
    which is the whole sequence unless `length` asks for more (then masks continue it)."""
    if start and infill:
        raise UserError("give --start or --infill, not both (a prompt is an infill text with no gaps)")
    ids = tok.encode(start) if start else []
    for i, piece in enumerate(infill.split(GAP) if infill else []):
        ids += ([mask_id] if i else []) + (tok.encode(piece) if piece else [])
    length = length or (len(ids) if infill else block_size)  # an infill text is the whole sequence
    if len(ids) > length:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than --length={length}; shorten it or raise --length")
    if len(ids) > block_size:
        raise UserError(f"the infill text is {len(ids)} tokens, above the trained block size {block_size}")
    if mask_id not in ids and len(ids) == length:
        raise UserError("nothing to generate: the text fills --length and has no '_' gaps")
    return torch.tensor(ids + [mask_id] * (length - len(ids)), dtype=torch.long)


class Trajectory:
    """A generate() callback that records, after each step, every position of sample 0 as (text, state):
    state is 'mask', 'new' (revealed at this step) or 'old'."""

    def __init__(self, tok):
        self.tok, self.frames = tok, []

    def __call__(self, done, end, x, order, **_):
        x0, pos = x[0].tolist(), order[0].tolist()
        frame = [None] * len(x0)
        for slot, p in enumerate(pos):
            state = "mask" if slot >= end else "new" if slot >= done else "old"
            frame[p] = ("_" if state == "mask" else self.tok.decode([x0[slot]]).replace("\n", "⏎"), state)
        self.frames.append(frame)

    def svg(self, title):
        """Monospace rows, one per step: masks grey, tokens revealed at that step red, earlier ones black."""
        colors = {"mask": "#bbbbbb", "new": "#d62728", "old": "#222222"}
        esc = lambda t: t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        width = max(sum(len(t) for t, _ in f) for f in self.frames) * 8.4 + 60
        rows = [f'<text x="8" y="18" font-weight="bold">{esc(title)}</text>']
        for i, frame in enumerate(self.frames):
            spans = "".join(f'<tspan fill="{colors[s]}">{esc(t)}</tspan>' for t, s in frame)
            rows.append(f'<text x="8" y="{40 + 16 * i}"><tspan fill="#888888">{i + 1:>3} </tspan>{spans}</text>')
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{48 + 16 * len(self.frames)}" '
                f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="14" xml:space="preserve">'
                f'<rect width="100%" height="100%" fill="white"/>{"".join(rows)}</svg>\n')


def main(argv=None):
    cfg = SampleConfig()
    user_keys = parse_args(cfg, argv)
    checks = [(cfg.steps >= 1, f"--steps={cfg.steps} must be at least 1"),
              (cfg.alpha_0 == -1 or 0 <= cfg.alpha_0 <= 1, f"--alpha_0={cfg.alpha_0} must be in [0, 1]"),
              (0 < cfg.top_p <= 1, f"--top_p={cfg.top_p} must be in (0, 1]"),
              (cfg.temperature >= 0, f"--temperature={cfg.temperature} must be >= 0"),
              (cfg.num_samples >= 1, f"--num_samples={cfg.num_samples} must be at least 1"),
              (cfg.length >= 0, f"--length={cfg.length} must be positive"),
              (cfg.schedule in ("random", "strided"), f"--schedule={cfg.schedule} must be random or strided")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    device = pick_device(cfg.device)
    if "compile" not in user_keys:
        cfg.compile = device.startswith("cuda")
    ctx, _ = autocast_context(device, cfg.dtype)
    out_dir = cfg.out_dir or find_checkpoint()
    ckpt = load_checkpoint(out_dir, device)
    model = GPT.from_checkpoint(ckpt, device).eval()
    block_size, denoiser = model.config.block_size, model.config.denoiser
    alpha_0 = ckpt["config"]["alpha_0"] if cfg.alpha_0 == -1 else cfg.alpha_0
    if cfg.length > block_size:
        raise UserError(f"--length={cfg.length} is above the trained block size {block_size}")
    if denoiser == "mdlm" and alpha_0 != 1:
        raise UserError(f"--alpha_0={alpha_0}: an MDLM checkpoint has no sequential phase; use --alpha_0=1")
    tok = Tokenizer(ckpt["meta"])
    template = make_template(tok, model.config.mask_id, cfg.length, block_size, read_text(cfg.start),
                             read_text(cfg.infill)).to(device)
    print(f"loaded {out_dir}/ckpt.pt (iter {ckpt['iter_num']}, denoiser {denoiser}, trained with alpha_0="
          f"{ckpt['config']['alpha_0']}); sampling with alpha_0={alpha_0}, steps={cfg.steps}, "
          f"schedule={cfg.schedule}, kv_cache={cfg.kv_cache}", file=sys.stderr)
    # compiled: one cache for the warm-up and the real run, so that the captured graphs keep its address
    cache = new_cache(model, cfg.num_samples, len(template), device, ctx, static=True) if cfg.compile else None
    sample = lambda callback=None: generate(
        net, template, cfg.num_samples, cfg.steps, alpha_0, cfg.temperature, cfg.top_p, cfg.kv_cache, cfg.seed,
        callback, ctx, progress=sys.stderr.isatty(), schedule=cfg.schedule, static=cfg.compile, cache=cache)
    net = model
    if cfg.compile:  # one graph per step shape; a warm-up run with the same seed meets every shape once
        print("compiling the model (torch.compile, CUDA graphs on a GPU): a warm-up run meets every step shape",
              file=sys.stderr)
        net = torch.compile(model, mode="reduce-overhead")
        t0 = time.time()
        sample()
        print(f"warm-up (compilation and graph capture): {time.time() - t0:.2f} s", file=sys.stderr)
    trajectory = Trajectory(tok) if cfg.trajectory else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    x, nfe = sample(trajectory)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    for row in x.tolist():
        print(tok.decode(row))
        print("---------------")
    n_gen = int((template == model.config.mask_id).sum()) * cfg.num_samples
    print(f"NFE {nfe}, {n_gen} tokens generated, {dt:.2f} s, {n_gen / dt:.1f} tokens/s")
    if trajectory:
        with open(cfg.trajectory, "w", encoding="utf-8") as f:
            f.write(trajectory.svg(f"Eso-LM, alpha_0={alpha_0}, T={cfg.steps}: {nfe} steps, grey = mask, "
                                   "red = revealed at that step"))
        print(f"wrote the trajectory of sample 1 to {cfg.trajectory}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
