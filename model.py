"""
The Eso-LM network and method (Esoteric Language Models, arXiv 2506.01928), in one file.

The network is nanoGPT's pre-LayerNorm causal transformer. Changes the method needs:
  - rotary position embeddings at *explicit* positions `pos` (B, T): a token keeps the angle of its
    original place after the sequence is sorted into its denoising order; no learned positions;
  - the attention mask is an argument (a boolean tensor, True = may attend, or None = everything), so AR,
    diffusion and the hybrid differ only in the ordering and mask they pass in, and the three denoisers
    (Eso-LM (B), Eso-LM (A), MDLM) only in the mask (`attention_mask`);
  - one extra embedding row for the mask token `mask_id = vocab_size`, whose logit is pushed to -1e6
    before any softmax ("zero masking"): the mask is never predicted;
  - `out` and `targets`: the last layer computes queries only for the rows that get an output, and lm_head
    runs only on the tokens that are scored (the masks: carry-over), the rest only gives keys and values.
Changes that make small models train faster, from modded-nanoGPT:
  - q and k are normalised per head (QK-norm);
  - the MLP is Linear -> ReLU(x)² -> Linear;
  - every residual projection (c_proj) starts at zero, so each block starts as the identity;
  - the blocks' matrices are trained with Muon (configure_optimizers).
Linear, at the end of the network's half, is nn.Linear with a faster layout for sampling's few-row products on some
CPUs. The second half of the file is the method: orderings, masks, the hybrid NELBO (eq. 7) and the exact
likelihood (Theorem 3.1). The sampler lives in sample.py, the KV cache in kvcache.py.
"""
import contextlib
import functools
import math
import numbers
import os
import platform
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import require


def rotary(x, cos, sin):
    """RoPE, rotate-half form, on q and k at once: x (2, B, nh, T, hd); cos, sin (B, 1, T, hd): [cos, cos]
    and [-sin, sin] at each token's own position, so that x·cos + (x with its halves swapped)·sin rotates
    every pair (x_i, x_{i+hd/2}) by its angle."""
    swapped = x.view(*x.shape[:-1], 2, -1).flip(-2).view(x.shape)
    return torch.addcmul(x * cos, swapped, sin)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x, rope, attn_mask, cache=None, layer=0, rows=slice(None)):
        """rope: (cos, sin) at each token's position; attn_mask: (T, keys) or (B, 1, T, keys), additive (0 or
        -inf), or None: everything visible. rows: the queries to compute (the last layer needs only the rows
        that get logits); every row gives K/V."""
        B, T, C = x.size()
        hd = C // self.n_head
        # (3, B, nh, T, hd); contiguous first, as SDPA's fused kernels need unit stride along hd and a sampling
        # step's few-row product is a transposed view (Linear.transposed)
        qkv = self.c_attn(x).contiguous().view(B, T, 3, self.n_head, hd).permute(2, 0, 3, 1, 4)
        # QK-norm: q and k scaled to unit length per head, and attention scaled by √hd instead of 1/√hd, which
        # is attention over RMS-normalised q and k; then RoPE (so the cache holds rotated keys); both in fp32,
        # whatever autocast computed qkv in (bf16 would round the rotation)
        qk = qkv[:2].float()
        qk = rotary(qk / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(1e-12), *rope)  # F.normalize
        q, k, v = qk[0, :, :, rows], qk[1], qkv[2]  # (B, nh, rows or T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, keys, hd): slots [0, keys), these written in
        if attn_mask is not None and rows != slice(None):
            attn_mask = attn_mask[..., rows, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=hd ** 0.5,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, -1, C)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x):
        h = F.relu(self.c_fc(x))
        return self.dropout(self.c_proj(h * h))  # ReLU²


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, attn_mask, cache=None, layer=0, rows=slice(None)):
        y = self.attn(self.ln_1(x), rope, attn_mask, cache, layer, rows)
        x = (x if rows == slice(None) else x[:, rows]) + y
        return x + self.mlp(self.ln_2(x))


def shape_checks(c):
    """(ok, one-line message) pairs for the network's sizes, of a GPTConfig or of a script's flags (the same names)."""
    return [(min(c.block_size, c.n_layer, c.n_head, c.n_embd) >= 1, f"block_size={c.block_size}, n_layer={c.n_layer}, "
             f"n_head={c.n_head} and n_embd={c.n_embd} must be positive"),
            (c.n_head < 1 or c.n_embd % c.n_head == 0 and c.n_embd // c.n_head % 2 == 0,
             f"n_embd={c.n_embd} must be n_head={c.n_head} times an even head size (RoPE)")]


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65  # real tokens; the mask token is one more, id = vocab_size
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    denoiser: str = "B"  # which attention masks it is trained and sampled with: B, A or mdlm (attention_mask)

    def __post_init__(self):
        require([*shape_checks(self), (self.vocab_size >= 1, f"vocab_size={self.vocab_size} must be positive"),
                 (self.denoiser in DENOISERS, f"denoiser={self.denoiser!r} must be one of {', '.join(DENOISERS)}")],
                ValueError)

    @property
    def mask_id(self):
        return self.vocab_size


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size + 1, config.n_embd),  # + the mask token
            drop=nn.Dropout(config.dropout) if config.dropout else nn.Identity(),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size + 1, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        hd = config.n_embd // config.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)  # (block_size, hd/2)
        cos, sin = angles.cos(), angles.sin()  # rotary's tables: [cos, cos] and [-sin, sin] at every position
        self.register_buffer("rope_cos", torch.cat([cos, cos], 1), persistent=False)  # (block_size, hd)
        self.register_buffer("rope_sin", torch.cat([-sin, sin], 1), persistent=False)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # residual projections start at zero: blocks start as identity
            if pn.endswith("c_proj.weight"):
                torch.nn.init.zeros_(p)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, attn_mask, cache=None, out=slice(None), targets=None):
        """
        idx, pos: (B, T) token ids and their original positions, in the order the tokens are processed.
        attn_mask: (T, S) or (B, 1, T, S) bool, True where query t may attend to key s (with a cache, S is the
        slots it reads: cache.keys), or None: every token sees every other.
        cache: a KVCache (kvcache.py) that every layer writes the fed tokens' K/V to and reads slots [0, cache.keys)
        from (with static shapes all of them: the mask hides those not filled yet), or None.
        out: the rows that get an output (a slice); the last layer computes only those queries.
        Returns fp32 logits (B, len(out), vocab_size + 1) with the mask token's logit at -1e6 or, given targets
        (B, len(out)), the per-token NLL (B, len(out)): computed only where targets >= 0, 0 elsewhere (nanoGPT's
        ignore_index=-1). The carry-over loss scores masked tokens only, so clean tokens never reach lm_head.
        """
        rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, hd)
        if attn_mask is not None:  # additive, once for every layer (SDPA would convert a boolean mask in each),
            dev = idx.device.type  # in the dtype autocast hands SDPA
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=idx.device).masked_fill_(~attn_mask, -math.inf)
        x = self.transformer.drop(self.transformer.wte(idx))
        last = len(self.transformer.h) - 1
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, attn_mask, cache, layer, out if layer == last else slice(None))
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.head(x)
        if torch.compiler.is_compiling():  # every row: a data-dependent gather would break the graph and sync
            return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten(), ignore_index=-1,
                                   reduction="none").view(targets.shape)
        keep = targets >= 0  # eagerly, lm_head only where it is scored (with a BPE vocabulary, much of its cost)
        nll = torch.zeros(targets.shape, device=x.device)
        nll[keep] = F.cross_entropy(self.head(x[keep]), targets[keep], reduction="none")
        return nll

    def head(self, x):
        logits = self.lm_head(x).float()  # softmax and CE in fp32, whatever autocast ran the network in
        logits[..., self.config.mask_id] = -1e6  # zero masking; -1e6, not -inf, stays NaN-free in bf16
        return logits

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="muon"):
        """A list of optimizers. muon: torch.optim.Muon on the matrices of the blocks (modded-nanogpt, nanochat),
        with Moonshot's RMS matching so that it takes AdamW's learning rate and weight decay, and AdamW on the
        embedding (tied to the head) and the gains. adamw: AdamW on everything, decay on the matrices (nanoGPT)."""
        hidden = [p for n, p in self.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")]
        fused = device_type in ("cuda", "cpu")  # one kernel per step instead of a Python loop over parameters
        adamw = lambda params: torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=learning_rate, betas=betas,
            fused=fused)
        if optimizer == "muon":
            muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
            return [muon, adamw([p for p in self.parameters() if all(p is not q for q in hidden)])]
        return [adamw(list(self.parameters()))]

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """The network a checkpoint of train.py holds (data.load_checkpoint reads one)."""
        model = cls(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device)


def unwrap(model):
    """The GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


# -----------------------------------------------------------------------------
# Linear, the blocks' nn.Linear: the same, but for how a sampling step on the CPU multiplies its 2 to 8 rows


class Linear(nn.Linear):
    """nn.Linear, except for few rows (2 to 8: batch × tokens fed) on the CPU while sampling, as in a cached
    sequential step, which feeds 2 tokens. How fast BLAS multiplies so few rows depends on the machine: on an AMD
    EPYC, MKL computes F.linear (x Wᵀ) several times slower than (W xᵀ)ᵀ (`python bench.py --what=linear`
    measures both on yours). The two round differently, so which one runs is a fixed property of the machine,
    never a timing, which a busy machine would flip: (W xᵀ)ᵀ on an AMD CPU with MKL, F.linear elsewhere; the
    environment variable ESO_LM_FEW_ROWS=linear or transposed overrides it (few_rows_transposed). Every process
    of a machine samples the same tokens from the same seed. Training and eval always run F.linear."""
    transpose_few_rows = False  # True while the sampler runs on a machine where (W xᵀ)ᵀ pays (sampling_products)

    def forward(self, x):
        if Linear.transpose_few_rows and x.device.type == "cpu" and 2 <= x.numel() // x.size(-1) <= 8:
            return self.transposed(x)
        return super().forward(x)

    def transposed(self, x):
        """F.linear as (W xᵀ)ᵀ, returned as a transposed view (no copy). MKL is fast here only with a contiguous
        x read as xᵀ, so an x that is such a view itself (ReLU² keeps the layout of c_fc's output) is copied
        first. addmm puts the bias in, so that under autocast it has F.linear's dtype."""
        xt = x.contiguous().view(-1, x.size(-1)).transpose(0, 1)
        y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
        return y.transpose(0, 1).view(*x.shape[:-1], -1)


@contextlib.contextmanager
def sampling_products():
    """While the sampler runs, Linear computes few-row products as (W xᵀ)ᵀ if this machine calls for it (a flag
    set here rather than a test inside forward, so that a compiled step takes the layout an eager one takes)."""
    before, Linear.transpose_few_rows = Linear.transpose_few_rows, few_rows_transposed()
    try:
        yield
    finally:
        Linear.transpose_few_rows = before


@functools.cache
def few_rows_transposed():
    """Does sampling on this machine compute few-row products as (W xᵀ)ᵀ? ESO_LM_FEW_ROWS if set, else: is the
    CPU an AMD one and the BLAS MKL?"""
    choice = os.environ.get("ESO_LM_FEW_ROWS", "")
    if choice not in ("", "linear", "transposed"):
        raise ValueError(f"ESO_LM_FEW_ROWS={choice!r} must be 'linear' or 'transposed'")
    return choice == "transposed" if choice else torch.backends.mkl.is_available() and cpu_vendor() == "AuthenticAMD"


def cpu_vendor():
    """The CPU's vendor id ('AuthenticAMD', 'GenuineIntel', ...) from /proc/cpuinfo or the platform, or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in platform.processor()), "")


# -----------------------------------------------------------------------------
# Orderings and attention masks (paper Suppl. B; Figs. 6, 9, 13)
# An ordering `order` (B, L) lists original positions in processing order: order[b, j] is the position
# of the token processed j-th, so permute(x, order)[b, j] = x[b, order[b, j]], and that token's RoPE
# position is order[b, j], not j. Sorted, every sequence is [clean tokens ; masks].

def permute(x, order):
    return torch.gather(x, 1, order)


def invert(order):
    inv = torch.empty_like(order)
    return inv.scatter_(1, order, torch.arange(order.size(1), device=order.device).expand_as(order))


def unpermute(x_sorted, order):
    return torch.gather(x_sorted, 1, invert(order))


def diffusion_order(is_mask, noise=None):
    """Diffusion phase: clean tokens first in random order, then the masks in random order."""
    noise = torch.rand(is_mask.shape, device=is_mask.device) if noise is None else noise
    return (is_mask.float() + 0.9 * noise).argsort(dim=1)  # keys: clean in [0, .9), masks in [1, 1.9)


def sequential_order(is_mask, noise=None):
    """Sequential phase: clean tokens first in random order (the order a diffusion phase leaves them in the
    cache), then the masks left to right (they are filled left to right)."""
    noise = torch.rand(is_mask.shape, device=is_mask.device) if noise is None else noise
    L = is_mask.size(1)
    natural = 1 + torch.arange(L, device=is_mask.device) / L  # masks: keys in [1, 2), ascending
    return torch.where(is_mask, natural, 0.9 * noise).argsort(dim=1)


def likelihood_order(B, L, alpha_0, device=None, n_given=0, generator=None):
    """σ ~ P_L^{α0} (eq. 22): each position joins the diffusion set C with probability α0; C first in random
    order, the rest ascending. With n_given, positions [0, n_given) are a given context (a prompt), placed first
    in ascending order, as the sampler places a prompt, and σ orders the rest."""
    u = torch.rand(B, L, device=device, generator=generator)
    i = torch.arange(L, device=device)
    key = torch.where(u < alpha_0, 0.9 * u, 1 + i / L)  # C by u: a uniform random order; then the rest ascending
    return torch.where(i < n_given, i / L - 2, key).argsort(dim=1)


DENOISERS = ("B", "A", "mdlm")


def attention_mask(denoiser, q, k, n_clean=0):
    """May the token at sorted slot q attend to the one at slot k? q (..., Tq, 1), k (..., Tk): slots in the
    denoising order; n_clean (broadcastable): how many clean tokens lead it. The three denoisers differ here
    and nowhere else in the network:
      B    Eso-LM (B), the paper's flagship: causal over the sorted order (Fig. 6), so the K/V of a clean token
           never change and both phases can be cached;
      A    Eso-LM (A): causal, and the clean tokens also see each other (a prefix-LM mask, Fig. 13, code's
           `mixed2`), so a diffusion step changes every clean token's K/V: only the sequential phase caches;
      mdlm MDLM: everything sees everything, masks included (bidirectional): returns None, SDPA's unmasked path.
    """
    if denoiser == "mdlm":
        return None
    causal = k <= q
    return causal | ((q < n_clean) & (k < n_clean)) if denoiser == "A" else causal


def diffusion_mask(denoiser, n_clean, L):
    """The MDM pass's mask over z_t sorted: (L, L) for B, (B, 1, L, L) for A (each row has its own clean
    prefix), None for MDLM."""
    slots = torch.arange(L, device=n_clean.device)
    return attention_mask(denoiser, slots[:, None], slots, n_clean[:, None, None, None])


def sequential_mask(denoiser, n_clean, m, L):
    """The AR pass's mask over [z: the first m masks of z0 ; x], both in σ order, (B, 1, m + L, m + L).
    It is BD3-LM's block mask with block size 1 (Fig. 9) without the paper's z rows of *clean* tokens: nothing
    attends to those, and the x copy already holds the same tokens at the same slots, so they would only be
    computed and thrown away (about a fifth of the pass at α0 = 0.5, the z rows being padded to the row with
    the most masks). z row r is the mask at slot s = n_clean + r:
    it sees itself and x_j for j < s (strict: x_s is its answer). x_j sees x as the denoiser's clean tokens see each
    other (B: causal). x never sees z."""
    B, dev = n_clean.size(0), n_clean.device
    slot = n_clean[:, None, None] + torch.arange(m, device=dev)[:, None]  # (B, m, 1)
    j = torch.arange(L, device=dev)
    z_rows = torch.cat([torch.eye(m, dtype=torch.bool, device=dev).expand(B, m, m), (j < slot)], dim=2)
    x_x = attention_mask(denoiser, j[:, None], j, n_clean[:, None, None]).expand(B, L, L)
    x_rows = torch.cat([torch.zeros(B, L, m, dtype=torch.bool, device=dev), x_x], dim=2)
    return torch.cat([z_rows, x_rows], dim=1)[:, None]


# -----------------------------------------------------------------------------
# The hybrid NELBO (eq. 7) and the exact likelihood (Theorem 3.1). All in nats.

# diffusion times live in [EPS_T, 1], so that the weight α0/(1-α_t) stays below 1/EPS_T; the MDM term is then the
# mean of eq. 7's integrand over [EPS_T, 1], not its integral over [0, 1]: they differ by at most ~EPS_T (0.1%) of it
EPS_T = 1e-3


def add_masks(x, p_mask, mask_id):
    """q_t: mask each token independently with probability p_mask (broadcast to x). p_mask=1 masks all."""
    return torch.where(torch.rand(x.shape, device=x.device) < p_mask, mask_id, x)


def stratified_times(n, device=None, u=None, offset=0, total=None):
    """Low-discrepancy t (Suppl. C.1): t_i = (u + i) / total for rows i = offset .. offset+n-1 of a global
    batch of `total` rows sharing one u, mapped into [EPS_T, 1]. DDP ranks and micro-steps pass their slice."""
    total = n if total is None else total
    u = torch.rand(()) if u is None else torch.as_tensor(u)
    t = (u + torch.arange(offset, offset + n)) / total
    return (EPS_T + (1 - EPS_T) * t).to(device)


def diffusion_loss(model, x, alpha_0, t=None, low_var=False):
    """MDM term of eq. 7, per token: w(t) * [-log p(x_l | z_t)] summed over the masked positions of z_t and
    divided by all tokens of x, with α_t = α0 (1 - t) and w = α0 / (1 - α_t); low_var sets w = 1 (training only)."""
    n, L = x.shape
    config = unwrap(model).config
    t = stratified_times(n, x.device) if t is None else t
    alpha_t = alpha_0 * (1 - t)  # the linear schedule; the sampler's diffusion_counts (sample.py) assumes it too
    zt = add_masks(x, (1 - alpha_t)[:, None], config.mask_id)
    is_mask = zt == config.mask_id
    order = diffusion_order(is_mask)
    n_clean = L - is_mask.sum(1)
    targets = torch.where(permute(is_mask, order), permute(x, order), -1)  # carry-over: masks only
    # masks sit at the end of every row, so earlier slots need no last-layer query; compiled, every row is
    # computed, so that the graph has one shape whatever the draw
    out = slice(0 if hasattr(model, "_orig_mod") else int(n_clean.min()), L)
    mask = diffusion_mask(config.denoiser, n_clean, L)
    nll = model(permute(zt, order), order, mask, out=out, targets=targets[:, out])
    weight = torch.ones_like(t) if low_var else alpha_0 / (1 - alpha_t)
    return (weight[:, None] * nll).sum() / x.numel()


def sequential_nll(model, x, z0, order):
    """-log x_θ(z0 ⊙ x^{<l})[x_l] for every mask of z0, from ONE pass over [masks of z0 ; x] (both in σ order,
    the same RoPE positions: x is not given positions L..2L-1) through sequential_mask. `order` must put z0's
    clean tokens first (training's sequential_order then puts the masks left to right; the likelihood, in σ's
    order). Returns (B, m): [b, r] is the NLL of row b's r-th mask in σ order, 0 past its last mask. m changes
    from draw to draw: for a compiled model it is marked dynamic, so that this pass is compiled once, for all m."""
    B, L = x.shape
    config = unwrap(model).config
    n_clean = L - (z0 == config.mask_id).sum(1)
    m = int((L - n_clean).max())  # the most masks of any row
    slot = n_clean[:, None] + torch.arange(m, device=x.device)  # (B, m): the sorted slot of each z row
    xs = permute(x, order)
    targets = torch.where(slot < L, xs.gather(1, slot.clamp(max=L - 1)), -1)
    idx = torch.cat([torch.full_like(slot, config.mask_id), xs], dim=1)
    pos = torch.cat([order.gather(1, slot.clamp(max=L - 1)), order], dim=1)
    mask = sequential_mask(config.denoiser, n_clean, m, L)
    if hasattr(model, "_orig_mod"):  # compiled
        for tensor, dims in ((idx, (1,)), (pos, (1,)), (targets, (1,)), (mask, (2, 3))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return model(idx, pos, mask, out=slice(0, m), targets=targets)


def sequential_loss(model, x, alpha_0):
    """AR term of eq. 7, per token: z0 ~ q_0 masks each token with probability 1 - α0; the loss is
    -log p(x_l | clean part of z0, x_{<l}) summed over the masked l."""
    mask_id = unwrap(model).config.mask_id
    z0 = add_masks(x, 1 - alpha_0, mask_id)
    return sequential_nll(model, x, z0, sequential_order(z0 == mask_id)).sum() / x.numel()


def diffusion_rows(B, alpha_0, batch_split):
    """How many of B rows get the MDM term (the paper's batch split κ): all at α0 = 1, none at α0 = 0, else
    int(κ B)."""
    return B if alpha_0 == 1 else 0 if alpha_0 == 0 else int(batch_split * B)


def nelbo(model, x, alpha_0, batch_split=0.5, loss_type="elbo", t=None):
    """Hybrid NELBO, nats per token (eq. 7). Rows [:split] get the MDM term, rows [split:] the AR term, each
    half normalised by its own token count and then added (averaging over both halves' tokens would halve each
    term). `t`: the diffusion rows' times (default: stratified over them). Returns (loss, dict of the terms)."""
    config = unwrap(model).config
    check_tokens(x, config)
    if not 0 <= alpha_0 <= 1:
        raise ValueError(f"alpha_0={alpha_0} must be in [0, 1]")
    if config.denoiser == "mdlm" and alpha_0 != 1:
        raise ValueError(f"alpha_0={alpha_0}: MDLM is a pure diffusion model and has no sequential term; use alpha_0=1")
    if loss_type not in ("elbo", "low_var"):
        raise ValueError(f"loss_type={loss_type!r} must be 'elbo' or 'low_var'")
    B = x.size(0)
    split = diffusion_rows(B, alpha_0, batch_split)
    if 0 < alpha_0 < 1 and not 0 < split < B:
        raise ValueError(f"batch_split={batch_split} of a batch of {B} leaves one half of the loss empty")
    if t is not None and split and tuple(t.shape) != (split,):
        raise ValueError(f"t {tuple(t.shape)} must hold one time per diffusion row: ({split},)")
    terms = {}
    if split > 0:
        terms["diffusion"] = diffusion_loss(model, x[:split], alpha_0, t, low_var=loss_type == "low_var")
    if split < B:
        terms["sequential"] = sequential_loss(model, x[split:], alpha_0)
    return sum(terms.values()), terms


def check_tokens(x, config):
    """A ValueError that names the problem, for token batches the network cannot take (RoPE has block_size
    positions; the mask token is not data)."""
    if x.dim() != 2 or x.dtype != torch.long or not x.numel():
        raise ValueError(f"expected a non-empty (batch, length) torch.long tensor of token ids, got shape "
                         f"{tuple(x.shape)} {x.dtype}")
    if x.size(1) > config.block_size:
        raise ValueError(f"sequences of {x.size(1)} tokens are longer than the block size {config.block_size}")
    lo, hi = torch.aminmax(x)
    if not 0 <= int(lo) <= int(hi) < config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got {int(lo)}..{int(hi)}")


def has_likelihood(config):
    """Only B has a one-pass likelihood: A's clean tokens see each other, so each of its conditionals needs
    its own pass over a different clean set, and MDLM's as well (L passes per ordering, not one)."""
    return config.denoiser == "B"


def token_nll(model, x, order, n_given=0):
    """-log p(x_σ(l) | x_σ(<l)) for the slots l >= n_given of σ, (B, L - n_given), in σ order, from one forward
    pass (Fig. 10): the sequential pass with z0 masked at those slots, so slot l sees exactly x_σ(<l) and its
    own mask. The first n_given slots of σ are a given context: conditioned on, not scored."""
    config = unwrap(model).config
    if not has_likelihood(config):
        raise ValueError(f"denoiser {config.denoiser} has no one-pass likelihood; report its NELBO")
    check_tokens(x, config)
    z0 = x.scatter(1, order[:, n_given:], config.mask_id)
    return sequential_nll(model, x, z0, order)


def log_likelihood(model, x, order):
    """log p(x | σ) = Σ_l log p(x_σ(l) | x_σ(<l)) for each row, in one forward pass. order (B, L): each row
    a permutation of the positions."""
    if (order.shape != x.shape or order.dim() != 2 or order.dtype != torch.long or
            not torch.equal(order.sort(dim=1).values, torch.arange(x.size(1), device=x.device).expand_as(order))):
        raise ValueError(f"order {tuple(order.shape)} {order.dtype} must be a (B, L) torch.long tensor, a permutation "
                         f"of the positions per row, for x {tuple(x.shape)}")
    return -token_nll(model, x, order).sum(dim=1)


def iw_nll(model, x, alpha_0, K=1):
    """Importance-weighted NLL per token (Theorem 3.1, Suppl. B.2-B.3): -log mean_k p(x | σ_k), σ_k ~ P_L^{α0}.
    Its expectation is an upper bound on -log p(x) that falls towards it as K grows; one draw may land on either
    side."""
    if not 0 <= alpha_0 <= 1:
        raise ValueError(f"alpha_0={alpha_0} must be in [0, 1]")
    if not (isinstance(K, numbers.Integral) and K >= 1):
        raise ValueError(f"K={K!r} must be an integer >= 1")
    check_tokens(x, unwrap(model).config)
    B, L = x.shape
    orders = (likelihood_order(B, L, alpha_0, x.device) for _ in range(K))  # permutations: log_likelihood unchecked
    logp = torch.stack([-token_nll(model, x, order).sum(dim=1) for order in orders])
    return -(logp.logsumexp(dim=0) - math.log(K)) / L  # (B,)
