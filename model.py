"""
The Eso-LM network and method (Esoteric Language Models, arXiv 2506.01928), in one file.

The network is nanoGPT's pre-LayerNorm causal transformer. Changes the method needs:
  - rotary position embeddings at *explicit* positions `pos` (B, n): a token keeps the angle of its original
    place after the sequence is sorted into its denoising order σ; no learned positions;
  - the attention mask is an argument, so AR, diffusion and the hybrid differ only in the ordering and mask
    they pass in, and the three denoisers (Eso-LM (B), Eso-LM (A), MDLM) only in the mask (`attention_mask`);
  - one extra embedding row for the mask token `mask_id = vocab_size`, whose logit is pushed to -1e6 before
    any softmax ("zero masking"): the mask is never predicted;
  - `out` and `targets`: the last layer computes queries only for the rows that get an output, and lm_head
    runs only on the tokens that are scored (the masks: carry-over).
Changes that make small models train faster, from modded-nanoGPT: QK-norm, ReLU² MLPs, residual projections that
start at zero, and Muon for the blocks' matrices (configure_optimizers).

The second half is the method: orderings, masks, the hybrid NELBO (eq. 7) and the exact likelihood (Theorem 3.1).
Its noise is drawn on the host, so that every size a pass needs is known there: a training step never waits for
the GPU. The sampler lives in sample.py, the KV cache in kvcache.py.
"""
import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError, to_device


def dropout(config):
    return nn.Dropout(config.dropout) if config.dropout else nn.Identity()  # (an op call less per sampling step)


def rotary(x, cos, sin):
    """RoPE, rotate-half form, on q and k at once: x (2, B, nh, n, hd); cos, sin (B, 1, n, hd): [cos, cos] and
    [-sin, sin] at each token's own position, so that x·cos + (x with its halves swapped)·sin rotates every pair
    (x_i, x_{i+hd/2}) by its angle."""
    swapped = x.view(*x.shape[:-1], 2, -1).flip(-2).view(x.shape)
    return torch.addcmul(x * cos, swapped, sin)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = dropout(config)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, rope, attn_mask, cache, layer, out):
        B, n, C = x.size()  # n: the tokens fed
        hd = C // self.n_head
        # (3, B, nh, n, hd); contiguous first: SDPA's fused kernels need unit stride along hd, and a sampling
        # step's few-row product is a transposed view (Linear.transposed)
        qkv = self.c_attn(x).contiguous().view(B, n, 3, self.n_head, hd).permute(2, 0, 3, 1, 4)
        # QK-norm (q and k of unit length, attention scaled by √hd: attention over RMS-normalised q and k), then
        # RoPE, so that the cache holds rotated keys; in fp32 whatever autocast ran c_attn in
        qk = rotary(F.normalize(qkv[:2].float(), dim=-1), *rope)
        q, k, v = qk[0, :, :, out], qk[1], qkv[2]  # every fed token gives K/V; only `out` rows ask
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, keys, hd): the cache's slots [0, keys), these written in
        if attn_mask is not None:
            attn_mask = attn_mask[..., out, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=hd ** 0.5,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, -1, C)))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = dropout(config)

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

    def forward(self, x, rope, attn_mask, cache, layer, out):
        x = x[:, out] + self.attn(self.ln_1(x), rope, attn_mask, cache, layer, out)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65  # real tokens; the mask token is one more, id = vocab_size
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    denoiser: str = "B"  # the attention masks it is trained and sampled with: B, A or mdlm (attention_mask)

    @property
    def mask_id(self):
        return self.vocab_size


def shape_checks(c):
    """(ok, one-line message) pairs for the network's sizes, of a GPTConfig or of a script's flags (same names)."""
    return [(min(c.block_size, c.n_layer, c.n_head, c.n_embd) >= 1,
             "--block_size, --n_layer, --n_head and --n_embd must be positive"),
            (c.n_head >= 1 and c.n_embd % (2 * c.n_head) == 0,  # (n_head >= 1 first: % divides by it)
             f"--n_embd={c.n_embd} must be --n_head={c.n_head} times an even head size (RoPE)")]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size + 1, config.n_embd),  # + the mask token
            drop=dropout(config),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size + 1, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        hd = config.n_embd // config.n_head
        angles = torch.outer(torch.arange(config.block_size).float(), 10000 ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("rope_cos", angles.cos().repeat(1, 2), persistent=False)  # (block_size, hd)
        self.register_buffer("rope_sin", torch.cat([-angles.sin(), angles.sin()], 1), persistent=False)
        # residual projections start at zero, so that every block starts as the identity; norms keep gains of one
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "bias")):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, attn_mask, cache=None, out=slice(None), targets=None):
        """
        idx, pos: (B, n) token ids and their original positions, in the order the tokens are processed.
        attn_mask: (n, keys) or (B, 1, n, keys) bool, True where a token may attend to a key, or None: every token
        sees every other. With a cache (kvcache.py), every layer writes the fed tokens' K/V into it and reads its
        slots [0, keys), and keys counts those slots.
        out: the rows that get an output (a slice); the last layer computes only those queries.
        Returns fp32 logits (B, len(out), vocab_size + 1), the mask token's at -1e6, or, given targets = (rows,
        ids): the NLL of the flattened outputs' `rows` (B·len(out) of them) against their tokens `ids`, lm_head
        run on those rows alone (the carry-over loss scores only masks).
        """
        rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, n, hd)
        if attn_mask is not None:  # additive, built once for every layer, in the dtype autocast hands SDPA
            dev = idx.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
            attn_mask = torch.where(attn_mask, 0.0, -math.inf).to(dtype)
        x = self.transformer.drop(self.transformer.wte(idx))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, attn_mask, cache, layer, out if layer == self.config.n_layer - 1 else slice(None))
        x = self.transformer.ln_f(x)
        if targets is not None:
            rows, ids = targets
            x = x.flatten(0, 1)[rows]
        logits = self.lm_head(x).float()  # softmax and CE in fp32, whatever autocast ran the network in
        logits[..., self.config.mask_id] = -1e6  # zero masking; -1e6, not -inf, stays NaN-free in bf16
        return logits if targets is None else F.cross_entropy(logits, ids, reduction="none")

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """torch.optim.Muon on the blocks' matrices (modded-nanogpt, nanochat), with Moonshot's RMS matching so that
        it takes AdamW's learning rate and weight decay, and AdamW on the rest: the embedding (tied to the head),
        decayed, and the gains, not decayed."""
        muon, decay, no_decay = [], [], []
        for name, p in self.named_parameters():
            (no_decay if p.dim() < 2 else muon if name.startswith("transformer.h.") else decay).append(p)
        return [torch.optim.Muon(muon, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))]

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """The network a checkpoint of train.py holds (data.load_checkpoint reads one)."""
        model = cls(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device)


def cast_matrices(model, dtype):
    """Cast every matrix product's weight to autocast's dtype once, for sampling, rather than at every step (a
    CUDA graph replays the casts too). autocast rounds fp32 weights to `dtype` the same way, and runs the
    embedding and the norms in fp32, which keep their fp32 weights (the embedding untied from the head), so the
    logits are bit for bit those of autocast over fp32 weights."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)


# -----------------------------------------------------------------------------
# Linear: nn.Linear, but for how a sampling step on the CPU multiplies its 2 to 8 rows

class Linear(nn.Linear):
    """nn.Linear, except for few rows (2 to 8: batch × tokens fed, as in a cached sequential step) on the CPU
    while sampling. How fast BLAS multiplies so few rows depends on the machine: on an AMD EPYC, MKL computes
    x Wᵀ several times slower than (W xᵀ)ᵀ (`python bench.py --what=profile` times a step in each). The two round
    differently, so which one runs is a fixed property of the machine, never a timing (a busy machine would flip
    it): (W xᵀ)ᵀ on an AMD CPU with MKL, F.linear elsewhere; ESO_LM_FEW_ROWS=linear or transposed overrides it.
    Training and eval always run F.linear."""
    transpose_few_rows = False  # set while the sampler runs (sampling_products)

    def forward(self, x):
        if Linear.transpose_few_rows and x.device.type == "cpu" and 2 <= x.numel() // x.size(-1) <= 8:
            return self.transposed(x)
        return super().forward(x)

    def transposed(self, x):
        """F.linear as (W xᵀ)ᵀ, a transposed view. MKL is fast here only on a contiguous x read as xᵀ; addmm
        puts the bias in, so that under autocast the result has F.linear's dtype."""
        xt = x.contiguous().view(-1, x.size(-1)).t()
        y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
        return y.t().view(*x.shape[:-1], -1)


@contextlib.contextmanager
def sampling_products():
    """While the sampler runs, Linear takes (W xᵀ)ᵀ for few rows if this machine calls for it (a flag set here,
    not a test inside forward, so that a compiled step takes the layout an eager one takes)."""
    before, Linear.transpose_few_rows = Linear.transpose_few_rows, few_rows_transposed()
    try:
        yield
    finally:
        Linear.transpose_few_rows = before


@functools.cache
def few_rows_transposed():
    """ESO_LM_FEW_ROWS if set, else: is the CPU an AMD one and the BLAS MKL?"""
    amd_mkl = cpu_vendor() == "AuthenticAMD" and torch.backends.mkl.is_available()
    choice = os.environ.get("ESO_LM_FEW_ROWS") or ("transposed" if amd_mkl else "linear")
    if choice not in ("linear", "transposed"):
        raise UserError(f"ESO_LM_FEW_ROWS={choice!r} must be 'linear' or 'transposed'")
    return choice == "transposed"


def cpu_vendor():
    """'AuthenticAMD', 'GenuineIntel', ... from Linux's /proc/cpuinfo, or ''."""
    with contextlib.suppress(OSError):
        return next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")), "")
    return ""


# -----------------------------------------------------------------------------
# Orderings and attention masks (paper Suppl. B; Figs. 6, 9, 13)
# An ordering `order` (B, L) lists original positions in processing order: order[b, j] is the position of the
# token processed j-th, so permute(x, order)[b, j] = x[b, order[b, j]], and that token's RoPE position is
# order[b, j], not j. Sorted, every sequence is [clean tokens ; masks].

def permute(x, order):
    return torch.gather(x, 1, order)


def invert(order):
    return order.argsort(dim=1)  # the inverse permutation: invert(order)[b, p] is the slot of position p


def unpermute(x_sorted, order):
    return torch.gather(x_sorted, 1, invert(order))


def diffusion_order(is_mask):
    """Diffusion phase: clean tokens first in a random order, then the masks in a random order."""
    return (is_mask + 0.9 * torch.rand(is_mask.shape)).argsort(dim=1)  # keys: clean in [0, .9), masks in [1, 1.9)


def sequential_order(is_mask):
    """Sequential phase: clean tokens first in a random order (the order a diffusion phase leaves them in the
    cache), then the masks left to right (they are filled left to right)."""
    L = is_mask.size(1)
    keys = torch.where(is_mask, 1 + torch.arange(L) / L, 0.9 * torch.rand(is_mask.shape))  # masks: [1, 2), ascending
    return keys.argsort(dim=1)


def likelihood_order(B, L, alpha_0, n_given=0, generator=None):
    """σ ~ P_L^{α0} (eq. 22): each position joins the diffusion set C with probability α0; C first in a random
    order, the rest ascending. With n_given, positions [0, n_given) are a given context (a prompt), placed first in
    ascending order, as the sampler places a prompt, and σ orders the rest."""
    u, i = torch.rand(B, L, generator=generator), torch.arange(L)
    key = torch.where(u < alpha_0, 0.9 * u, 1 + i / L)  # C by u: a uniform random order; then the rest ascending
    return torch.where(i < n_given, i / L - 2, key).argsort(dim=1)


DENOISERS = ("B", "A", "mdlm")


def attention_mask(denoiser, q, k, n_clean):
    """May the token at sorted slot q attend to the one at slot k? q (..., n, 1), k (..., keys): slots in the
    denoising order; n_clean (broadcastable): how many clean tokens lead it. The three denoisers differ here
    and nowhere else in the network:
      B    Eso-LM (B), the paper's flagship: causal over the sorted order (Fig. 6), so the K/V of a clean token
           never change and both phases can be cached;
      A    Eso-LM (A): causal, and the clean tokens also see each other (a prefix-LM mask, Fig. 13), so a
           diffusion step changes every clean token's K/V: only the sequential phase caches;
      mdlm MDLM: everything sees everything, masks included (bidirectional): None, SDPA's unmasked path.
    """
    if denoiser == "mdlm":
        return None
    causal = k <= q
    return causal | ((q < n_clean) & (k < n_clean)) if denoiser == "A" else causal


def diffusion_mask(denoiser, n_clean, L):
    """The MDM pass's mask over z_t sorted: (L, L) for B, (B, 1, L, L) for A (each row its own clean prefix)."""
    slots = torch.arange(L, device=n_clean.device)
    return attention_mask(denoiser, slots[:, None], slots, n_clean[:, None, None, None])


def sequential_mask(denoiser, n_clean, m, L):
    """The AR pass's mask over [z: the first m masks of z0 ; x], both in σ order, (B, 1, m + L, m + L). It is
    BD3-LM's block mask with block size 1 (Fig. 9) without the paper's z rows of *clean* tokens: nothing attends
    to those, and the x copy holds the same tokens at the same slots, so they would be computed and thrown away.
    z row r is the mask at slot s = n_clean + r: it sees itself and x_j for j < s (strict: x_s is its answer).
    x_j sees x as the denoiser's clean tokens see each other (B: causal). x never sees z."""
    B, dev = n_clean.size(0), n_clean.device
    slot = n_clean[:, None, None] + torch.arange(m, device=dev)[:, None]  # (B, m, 1)
    j = torch.arange(L, device=dev)
    z_rows = torch.cat([torch.eye(m, dtype=torch.bool, device=dev).expand(B, m, m), j < slot], dim=2)
    x_rows = F.pad(attention_mask(denoiser, j[:, None], j, n_clean[:, None, None]), (m, 0)).expand(B, L, m + L)
    return torch.cat([z_rows, x_rows], dim=1)[:, None]


# -----------------------------------------------------------------------------
# The hybrid NELBO (eq. 7) and the exact likelihood (Theorem 3.1). All in nats.

# diffusion times live in [EPS_T, 1], so that the weight α0/(1-α_t) stays below 1/EPS_T; the MDM term is then
# the mean of eq. 7's integrand over [EPS_T, 1], within ~EPS_T (0.1%) of its integral over [0, 1]
EPS_T = 1e-3


def stratified_times(n):
    """Low-discrepancy t (Suppl. C.1): t_i = (u + i) / n for rows i < n sharing one u ~ U[0, 1), mapped into
    [EPS_T, 1]. On the host; train.py draws them for the global batch and hands each micro-step its slice."""
    t = (torch.rand(()) + torch.arange(n)) / n
    return EPS_T + (1 - EPS_T) * t


def diffusion_loss(model, x, alpha_0, t=None, low_var=False):
    """MDM term of eq. 7, per token: w(t) · [-log p(x_l | z_t)] summed over the masked positions of z_t and divided
    by all tokens of x, with α_t = α0 (1 - t) and w = α0 / (1 - α_t); low_var sets w = 1 (training only)."""
    n, L = x.shape
    config = model.config
    t = stratified_times(n) if t is None else t
    alpha_t = alpha_0 * (1 - t)  # the linear schedule; the sampler's diffusion_counts (sample.py) assumes it too
    is_mask = torch.rand(n, L) < (1 - alpha_t)[:, None]  # z_t ~ q_t
    order = diffusion_order(is_mask)
    rows = permute(is_mask, order).flatten().nonzero()[:, 0]  # carry-over: only the masks are scored
    weight = torch.ones(n) if low_var else alpha_0 / (1 - alpha_t)
    n_clean, order, rows, weight = (to_device(v, x.device) for v in (L - is_mask.sum(1), order, rows, weight[rows // L]))
    xs = permute(x, order)
    zt = torch.where(torch.arange(L, device=x.device) < n_clean[:, None], xs, config.mask_id)  # [clean ; masks]
    nll = model(zt, order, diffusion_mask(config.denoiser, n_clean, L), targets=(rows, xs.flatten()[rows]))
    return (weight * nll).sum() / x.numel()


def sequential_nll(model, x, is_mask, order):
    """-log x_θ(z0 ⊙ x^{<l})[x_l] for every mask of z0, from ONE pass over [masks of z0 ; x], both in σ order at the
    same RoPE positions (x is not given positions L..2L-1), through sequential_mask. is_mask (B, L): z0's masks;
    `order` puts z0's clean tokens first (both on the host). Returns (B, m), m the most masks of any row: [b, r] is
    the NLL of row b's r-th mask in σ order, 0 past its last mask."""
    B, L = x.shape
    config = model.config
    n_clean = L - is_mask.sum(1)
    m = L - int(n_clean.min())
    slot = n_clean[:, None] + torch.arange(m)  # (B, m): the sorted slot of each z row, >= L past a row's masks
    rows = (slot < L).flatten().nonzero()[:, 0]
    slot = slot.clamp(max=L - 1)
    pos = torch.cat([order.gather(1, slot), order], dim=1)
    n_clean, slot, pos, rows, order = (to_device(v, x.device) for v in (n_clean, slot, pos, rows, order))
    xs = permute(x, order)
    idx = torch.cat([torch.full_like(slot, config.mask_id), xs], dim=1)
    nll = model(idx, pos, sequential_mask(config.denoiser, n_clean, m, L), out=slice(0, m),
                targets=(rows, xs.gather(1, slot).flatten()[rows]))
    return nll.new_zeros(B * m).index_put((rows,), nll).view(B, m)


def sequential_loss(model, x, alpha_0):
    """AR term of eq. 7, per token: z0 ~ q_0 masks each token with probability 1 - α0; the loss is
    -log p(x_l | clean part of z0, x_{<l}) summed over the masked l."""
    is_mask = torch.rand(x.shape) < 1 - alpha_0
    return sequential_nll(model, x, is_mask, sequential_order(is_mask)).sum() / x.numel()


def diffusion_rows(B, alpha_0, batch_split):
    """How many of B rows get the MDM term (the batch split κ): all at α0 = 1, none at α0 = 0, else int(κ B)."""
    return B if alpha_0 == 1 else 0 if alpha_0 == 0 else int(batch_split * B)


def nelbo(model, x, alpha_0, batch_split=0.5, loss_type="elbo", t=None):
    """Hybrid NELBO, nats per token (eq. 7). Rows [:split] get the MDM term, rows [split:] the AR term, each half
    normalised by its own token count and then added (averaging over both halves' tokens would halve each term).
    t: the diffusion rows' times (default: stratified over them). Returns (loss, dict of the terms)."""
    split = diffusion_rows(len(x), alpha_0, batch_split)
    assert model.config.denoiser != "mdlm" or alpha_0 == 1, "MDLM is a pure diffusion model: alpha_0 must be 1"
    assert loss_type in ("elbo", "low_var") and (alpha_0 in (0, 1) or 0 < split < len(x)), "an empty half"
    terms = {}
    if split:
        terms["diffusion"] = diffusion_loss(model, x[:split], alpha_0, t, low_var=loss_type == "low_var")
    if split < len(x):
        terms["sequential"] = sequential_loss(model, x[split:], alpha_0)
    return sum(terms.values()), terms


def has_likelihood(config):
    """Only B has a one-pass likelihood: A's clean tokens see each other, so each of its conditionals needs a pass
    of its own over a different clean set, and MDLM's as well (L passes per ordering, not one)."""
    return config.denoiser == "B"


def token_nll(model, x, order, n_given=0):
    """-log p(x_σ(l) | x_σ(<l)) for the slots l >= n_given of σ, (B, L - n_given) in σ order, from one forward pass
    (Fig. 10): the sequential pass with z0 masked at those slots, so slot l sees exactly x_σ(<l) and its own mask.
    The first n_given slots of σ are a given context: conditioned on, not scored. order: on the host."""
    if not has_likelihood(model.config):
        raise ValueError(f"denoiser {model.config.denoiser} has no one-pass likelihood; report its NELBO")
    return sequential_nll(model, x, invert(order) >= n_given, order)  # z0: the positions σ puts after the context


def log_likelihood(model, x, order):
    """log p(x | σ) = Σ_l log p(x_σ(l) | x_σ(<l)) for each row, in one forward pass; order (B, L), on the host, a
    permutation of the positions per row."""
    return -token_nll(model, x, order).sum(dim=1)


def iw_nll(model, x, alpha_0, K=1):
    """Importance-weighted NLL per token (Theorem 3.1, Suppl. B.2-B.3): -log mean_k p(x | σ_k), σ_k ~ P_L^{α0}.
    Its expectation is an upper bound on -log p(x) that falls towards it as K grows; one draw may land on either
    side."""
    B, L = x.shape
    logp = torch.stack([log_likelihood(model, x, likelihood_order(B, L, alpha_0)) for _ in range(K)])
    return -(logp.logsumexp(dim=0) - math.log(K)) / L  # (B,)
