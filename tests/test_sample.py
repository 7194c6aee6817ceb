"""The sampler: exact KV cache, the schedule, prompts and infilling, the paper's L=8 walk-through."""
import copy
import json
import math
import re
import statistics

import pytest
import torch
import conftest
from conftest import causal_mask, tiny_model

from kvcache import KVCache
from model import attention_mask, cast_matrices
from sample import denoise, diffusion_counts, generate, new_cache, plan, sample_tokens

V = 11


def sharp_model(seed=0, block_size=24, denoiser="B"):
    """A random model with scaled-up weights: peaked, position-dependent predictions, so that sampling
    bugs change tokens."""
    model = tiny_model(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=32, seed=seed,
                       denoiser=denoiser)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


def sample_steps(model, template, kv_cache, seed=0, steps=6, alpha_0=0.5, num_samples=3, **kw):
    """generate(), and every step its callback saw (tensors cloned)."""
    steps_seen = []
    x, nfe = generate(model, template, num_samples, steps, alpha_0, kv_cache=kv_cache, seed=seed,
                      callback=lambda **s: steps_seen.append({k: (v.clone() if torch.is_tensor(v) else v)
                                                              for k, v in s.items() if k != "cache"}), **kw)
    return x, nfe, steps_seen


def masks(n, length=20):
    return torch.full((length,), V if n is None else n, dtype=torch.long)


def clean_then_masks(step):
    """The sequence fed at this step, as the uncached reference sees it: clean slots, then the masks."""
    x = step["x"][:, : step["end"]].clone()
    x[:, step["done"]:] = V
    return x


@torch.no_grad()
def test_cached_logits_equal_a_full_uncached_forward_at_every_step():
    """The cache is exact (Fig. 2): at every step, the cached logits of the masks equal those of a full causal
    forward over [clean tokens in σ order; current masks] up to float rounding, and both paths pick the same
    tokens (these draws have no near tie, which rounding could settle either way)."""
    model = sharp_model()
    template = masks(None)
    template[:4] = torch.tensor([1, 2, 3, 4])  # a prompt
    for alpha_0 in (1.0, 0.5, 0.0):
        x_c, nfe_c, cached = sample_steps(model, template, True, alpha_0=alpha_0)
        x_u, nfe_u, uncached = sample_steps(model, template, False, alpha_0=alpha_0)
        assert nfe_c == nfe_u == len(cached)
        for a, b in zip(cached, uncached):
            assert torch.allclose(a["logits"], b["logits"], atol=1e-4), (alpha_0, a["step"])
            full = model(clean_then_masks(a), a["order"][:, : a["end"]],
                         causal_mask(a["end"]))[:, a["done"]:]
            assert torch.allclose(a["logits"], full, atol=1e-4)
        assert torch.equal(x_c, x_u), "cached and uncached sampling must give the same tokens"


@torch.no_grad()
def test_a_bf16_cache_equals_a_full_forward_up_to_rounding():
    """Under bf16 autocast (CUDA's default) the cache holds bf16 K/V, and the cached, static-shape and full passes
    round differently, so a near tie may draw another token: what stays exact is that every step's logits equal a
    full bf16 forward's over the same tokens up to bf16 rounding (an atol of 0.1, about one unit in the last place
    of a logit near 10; a committed mask moves them by about 3)."""
    model = sharp_model()
    template = masks(None)
    template[:4] = torch.tensor([1, 2, 3, 4])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    for alpha_0 in (1.0, 0.5, 0.0):
        for static in (False, True):
            _, _, steps = sample_steps(model, template, True, alpha_0=alpha_0, ctx=ctx, static=static)
            for a in steps:
                with ctx:
                    full = model(clean_then_masks(a), a["order"][:, : a["end"]], causal_mask(a["end"]))
                assert torch.allclose(a["logits"], full[:, a["done"]:], atol=0.1), (alpha_0, static, a["step"])


def test_bf16_weights_sample_as_autocast_over_fp32_weights():
    """sample.py casts the matrices to bf16 once (cast_matrices) instead of letting autocast cast the fp32 weights
    again at every step: every step's logits and every token are bit for bit autocast's, for all three denoisers,
    cached, uncached and static."""
    template = masks(None)
    template[:4] = torch.tensor([1, 2, 3, 4])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    for denoiser in ("B", "A", "mdlm"):
        model = sharp_model(denoiser=denoiser)
        cast = copy.deepcopy(model)
        cast_matrices(cast, torch.bfloat16)
        assert cast.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
        for alpha_0 in ((1.0,) if denoiser == "mdlm" else (1.0, 0.5, 0.0)):
            for kv, static in ((True, False), (False, False), (True, True)):
                a = sample_steps(model, template, kv, alpha_0=alpha_0, ctx=ctx, static=static)
                b = sample_steps(cast, template, kv, alpha_0=alpha_0, ctx=ctx, static=static)
                assert torch.equal(a[0], b[0]) and len(a[2]) == len(b[2]), (denoiser, alpha_0, kv, static)
                assert all(torch.equal(s["logits"], t["logits"]) for s, t in zip(a[2], b[2]))


def test_a_prompt_longer_than_the_block_is_cropped_as_the_windows_crop():
    """A prompt longer than the block is kept whole; the windows of prompt alone sample nothing (no pass, no
    random draw), so what follows is what the same seed samples from the first window that holds masks on."""
    model = sharp_model(block_size=8)
    prompt = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(0))
    template = torch.cat([prompt, masks(None, 9)])  # block 8, chunk 4: windows at 0, 4, 8 (the first with masks)
    x, nfe = generate(model, template, 2, 4, 0.5, seed=3)
    y, nfe_y = generate(model, template[8:], 2, 4, 0.5, seed=3)
    assert torch.equal(x[:, :13], prompt.expand(2, -1)) and torch.equal(x[:, 8:], y) and nfe == nfe_y
    x, _ = generate(model, template[:15], 2, 4, 0.5, seed=3)  # 2 masks: one window, [7, 15)
    assert torch.equal(x[:, 7:], generate(model, template[7:15], 2, 4, 0.5, seed=3)[0])


def test_schedule_counts_and_nfe():
    """Counts are non-empty and sum to at most the generated length; the rest is one token per step, left
    to right; NFE = non-empty diffusion steps + sequential tokens; α0 = 0 is L steps, α0 = 1 at most T."""
    for alpha_0, steps in ((1.0, 8), (0.5, 8), (0.25, 64), (1.0, 10 ** 6)):
        counts = diffusion_counts(100, steps, alpha_0, torch.Generator().manual_seed(0))
        assert all(c > 0 for c in counts) and len(counts) <= steps and sum(counts) <= 100
        order, chunks, _ = plan(torch.ones(100, dtype=torch.bool), 2, steps, alpha_0, torch.Generator().manual_seed(0))
        assert chunks == counts + [1] * (100 - sum(counts))
        assert not torch.equal(order[0], order[1]), "each sample draws its own order (the counts are shared)"
        assert torch.equal(order.sort(dim=1).values, torch.arange(100).expand(2, -1))
        tail = order[:, sum(counts):]
        assert torch.all(tail[:, 1:] > tail[:, :-1]), "the sequential positions go left to right"
        if alpha_0 == 1:
            assert sum(counts) == 100
    g = torch.Generator().manual_seed(1)
    assert plan(torch.ones(100, dtype=torch.bool), 2, 8, 0.0, g)[1] == [1] * 100, "α0 = 0: NFE = L"
    mean = sum(sum(diffusion_counts(100, 16, 0.5, g)) for _ in range(400)) / 400
    assert abs(mean - 50) < 1.5, f"the diffusion share is Binomial(L, α0): mean {mean}"
    per_step = torch.tensor([diffusion_counts(1000, 4, 0.5, g) for _ in range(100)]).float().mean(0)
    assert (per_step - 125).abs().max() < 5, f"Alg. 2: each of T steps takes L α0 / T tokens on average, {per_step}"
    # with T = 2^53 steps, two of 20,000 tokens share one with probability 2e-8 (fp32 draws would merge about 12)
    assert len(diffusion_counts(20_000, 2 ** 53 - 1, 1.0, g)) == 20_000, "T steps are equally likely, however many"


def test_temperature_divides_the_logits():
    """Sampling at temperature τ draws exactly what sampling logits / τ at temperature 1 draws, with the same noise;
    τ = 0 is the argmax."""
    logits = torch.randn(3, 5, 9)
    for tau, top_p in ((0.5, 1.0), (2.0, 0.9)):
        draw = lambda lg, t: sample_tokens(lg, t, top_p, torch.Generator().manual_seed(3))
        assert torch.equal(draw(logits, tau), draw(logits / tau, 1.0))
        assert not torch.equal(draw(logits, tau), draw(logits, 1.0)), "a temperature changes the draws"
    assert torch.equal(sample_tokens(logits, 0.0, 1.0, torch.Generator()), logits[..., :-1].argmax(-1))


def test_nfe_counts_the_forward_passes():
    model = sharp_model()
    calls = []
    model.transformer.wte.register_forward_hook(lambda *a: calls.append(1))
    for alpha_0, steps in ((0.0, 4), (0.5, 4), (1.0, 4)):
        calls.clear()
        x, nfe = generate(model, masks(None), 2, steps, alpha_0)
        assert nfe == len(calls)
        if alpha_0 == 0:
            assert nfe == 20
        if alpha_0 == 1:
            assert nfe <= steps


def test_mask_token_never_emitted():
    model = sharp_model()
    with torch.no_grad():  # make the mask the model's favourite: it must still never be drawn
        model.lm_head.weight[V] += 5
    x, _ = generate(model, masks(None), 4, 5, 0.5, temperature=5.0, top_p=1.0)
    assert (x < V).all() and (x >= 0).all()
    logits = torch.zeros(1000, V + 1)
    assert (sample_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0)) < V).all()


def test_top_p_keeps_the_nucleus():
    """top_p keeps the smallest set reaching p: with probs (.5, .3, .15, .05) and p = .7, only two tokens."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-30]])).expand(4000, -1)  # last column: mask
    draws = sample_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4) / 4000.
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03, freq
    assert (sample_tokens(logits, 0.0, 0.7) == 0).all(), "temperature 0 is greedy"


def test_draws_follow_the_softmax_of_logits_over_temperature():
    """Without a nucleus, the tokens are drawn with probability softmax(logits / temperature): over 40,000 draws
    each frequency is within 0.01 (4 standard deviations) of it, for four tokens (with two, a Gumbel of the wrong
    sign still draws the right frequencies)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.cat([probs.log(), torch.tensor([0.0])]).expand(40_000, -1)  # last column: the mask, never drawn
    for temperature in (1.0, 0.5):
        draws = sample_tokens(logits, temperature, 1.0, torch.Generator().manual_seed(0))
        expected = (probs.log() / temperature).softmax(-1)
        assert (torch.bincount(draws, minlength=4) / 40_000 - expected).abs().max() < 0.01, temperature


def test_prompt_and_infill_tokens_come_back_unchanged():
    model = sharp_model()
    template = masks(None)
    given = torch.tensor([0, 1, 2, 7, 8, 15, 19])
    template[given] = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    for kv_cache in (True, False):
        x, _ = generate(model, template, 3, 4, 0.5, kv_cache=kv_cache)
        assert torch.equal(x[:, given], template[given].expand(3, -1))
        assert (x < V).all()


def test_seeds():
    model = sharp_model()
    a, _ = generate(model, masks(None), 3, 4, 0.5, seed=1)
    b, _ = generate(model, masks(None), 3, 4, 0.5, seed=1)
    c, _ = generate(model, masks(None), 3, 4, 0.5, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    off = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)  # an autocast switched off is no autocast
    assert torch.equal(generate(model, masks(None), 3, 4, 0.5, seed=1, ctx=off)[0], a)


def test_paper_walkthrough_l8():
    """Suppl. B.5: counts (2,1,2), diffusion positions (3,1,6,4,7), AR positions (2,5,8): 6 NFEs,
    and at each step exactly these tokens are fed and committed (positions 1-based); the callback names each
    step's phase."""
    model = sharp_model(block_size=8)
    order = torch.tensor([[3, 1, 6, 4, 7, 2, 5, 8]]) - 1
    chunks = [2, 1, 2, 1, 1, 1]
    log = []

    phases = []

    def callback(step, first, done, end, x, order, logits, cache, phase, **_):
        fed = (order[0, first:end] + 1).tolist()
        log.append((fed, done - first, cache.committed))
        phases.append(phase)

    draw = lambda logits: sample_tokens(logits, 1.0, 0.9, torch.Generator())
    x = denoise(model, torch.full((1, 8), V), order, chunks, 3, draw, new_cache(model, 1, 8, "cpu"), callback=callback)
    assert phases == ["diffusion"] * 3 + ["sequential"] * 3, phases
    assert log == [
        ([3, 1], 0, 0),           # step 1: M@3, M@1; nothing clean, nothing committed
        ([3, 1, 6], 2, 2),        # step 2: x3, x1 (clean now) and M@6; commit x3, x1
        ([6, 4, 7], 1, 3),        # step 3: x6, M@4, M@7; commit x6
        ([4, 7, 2], 2, 5),        # step 4: x4, x7, M@2 (the sequential phase starts)
        ([2, 5], 1, 6),           # step 5: x2, M@5
        ([5, 8], 1, 7),           # step 6: x5, M@8; x8 is never cached
    ], log
    assert (x < V).all()


@torch.no_grad()
def test_cache_is_preallocated_and_never_commits_masks():
    """Buffers are allocated once (O(L) per layer); after every step, the committed slots hold exactly the
    K/V of clean tokens: recomputing them from the clean prefix gives the same values."""
    model = sharp_model()
    ptrs = []
    prefixes = []

    def callback(x, order, cache, **_):
        ptrs.append(tuple((b.data_ptr(), tuple(b.shape)) for b in cache.k + cache.v))
        prefixes.append((cache.committed, x[:, : cache.committed].clone(), order[:, : cache.committed].clone(),
                         torch.stack(cache.k)[:, :, :, : cache.committed],
                         torch.stack(cache.v)[:, :, :, : cache.committed]))

    generate(model, masks(None), 2, 5, 0.5, callback=callback)
    assert len(set(ptrs)) == 1 and len(ptrs[0]) == 4 and all(shape == (2, 2, 20, 16) for _, shape in ptrs[0]), \
        "one K and one V buffer per layer, allocated once"
    for n, x, order, k, v in prefixes[1:]:
        ref = KVCache(model.config, 2, 20)
        ref.feed(n, n)
        model(x, order, causal_mask(n), ref)
        assert torch.allclose(torch.stack(ref.k)[:, :, :, :n], k, atol=1e-5), "a committed slot differs from clean K"
        assert torch.allclose(torch.stack(ref.v)[:, :, :, :n], v, atol=1e-5), "a committed slot differs from clean V"
        assert (x < V).all(), "a committed slot holds a mask token"


@pytest.mark.parametrize("flags, message", [
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 must be --n_head=4 times an even head size (RoPE)"),
    (["--what=train", "--block_size=0"], "--block_size, --n_layer, --n_head and --n_embd must be positive"),
    (["--n_head=0"], "--block_size, --n_layer, --n_head and --n_embd must be positive"),  # (not a division by 0)
    (["--vocab_size=0"], "--rounds, --iters, --small_steps, --sample_batch, --num_samples, --vocab_size and "
     "--batch_size must be positive, --mdlm_steps >= 0"),
    (["--mdlm_steps=-1"], "--rounds, --iters, --small_steps, --sample_batch, --num_samples, --vocab_size and "
     "--batch_size must be positive, --mdlm_steps >= 0"),
    (["--lengths=16,x"], "--lengths and --steps_list must be positive integers separated by commas (--steps_list: "
                          "or L)"),
    (["--what=frontier"], "--what=frontier needs --out_dirs=dir1,dir2 and --scorer=<the α0=0 checkpoint dir>"),
    (["--what=gpus"], "--what=gpus must be one of sample, train, frontier, profile, gpu"),
])
def test_bench_refuses_an_impossible_model_in_one_line(flags, message):
    r = conftest.cli("bench.py", "--lengths=16", "--rounds=1", *flags)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {message}", r.stderr


def test_bench_tables(tmp_path):
    """bench.py's sampling and profile tables on a tiny model (timings are printed, never asserted):
    every sampler row is there with its three rounds, AR decoding makes exactly L forward passes, T = 4 at most
    4, and a cached step runs each weight matrix once (4 per layer and the output layer), as its profile counts."""
    out = tmp_path / "rows.json"
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--device=cpu", f"--json_out={out}"]
    r = conftest.run("bench.py", "--lengths=16,32", "--small_steps=4", "--mdlm_steps=2", *tiny)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    schedules = ["NFE=L"] * 3 + ["T=4"] * 2
    assert [(row["L"], row["schedule"]) for row in rows] == [(L, s) for L in (16, 32) for s in schedules]
    assert all(row["nfe"] == row["L"] for row in rows if row["sampler"].startswith("AR"))
    assert all(row["nfe"] <= 4 for row in rows if row["schedule"] == "T=4")
    assert r.stdout.count("cached over MDLM") == 4
    assert len(re.findall(r"cached / AR [0-9.]+x \[[0-9.]+-[0-9.]+\]", r.stdout)) == 2, "per round, with the range"
    for cached, mdlm in zip(rows, rows[1:]):  # MDLM timed on 2 steps, its NFE that of the schedule drawn (α0 = 1 both)
        if cached["sampler"].startswith("Eso-LM"):
            assert mdlm["extrapolated"] and mdlm["nfe"] == cached["nfe"], (cached, mdlm)
    for cached, mdlm in zip(rows, rows[1:]):  # the speed-up over MDLM: the median of the rounds' ratios, their range
        if cached["sampler"].startswith("Eso-LM"):
            assert mdlm["sampler"].startswith("MDLM") and len(cached["seconds_rounds"]) == 3
            ratios = sorted(m / c for m, c in zip(mdlm["seconds_rounds"], cached["seconds_rounds"]))
            assert (cached["speedup"], cached["speedup_min"], cached["speedup_max"]) == \
                (statistics.median(ratios), ratios[0], ratios[-1])
    r = conftest.run("bench.py", "--what=profile", "--lengths=32", *tiny)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())
    assert row["nfe"] == 32 and row["products_per_step"] == 4 * 1 + 1, "each step: every weight matrix once"
    assert row["matrix products ms"] > 0 and row["op_calls_per_step"] > 4 * 1 + 1
    other = "F.linear" if row["layout"] == "(W xT)T" else "(W xT)T"
    assert len(row[f"step, {other} ms rounds"]) == 3, "the step is also timed with its products in the other layout"


@torch.no_grad()
def test_static_shapes_give_the_same_logits_and_tokens():
    """The static path (CUDA graphs) pads each step's chunk to a power of two with the slots after it and, when
    cached, attends to all L slots: for each denoiser, at every step its fp32 logits equal the exact-shape
    path's, with and without the cache, and the tokens are identical. The shapes it feeds come from a few powers
    of two (and the chunks that end exactly at L)."""
    template = masks(None, length=37)
    template[:5] = torch.tensor([1, 2, 3, 4, 5])
    settings = {"B": ((1.0, 5), (0.5, 6), (0.0, 3), (1.0, 10 ** 6)), "A": ((1.0, 5), (0.5, 6), (0.0, 3)),
                "mdlm": ((1.0, 5), (1.0, 10 ** 6))}
    for denoiser, runs in settings.items():
        model = sharp_model(block_size=40, denoiser=denoiser)
        shapes = []
        model.transformer.wte.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape[1]))
        for alpha_0, steps in runs:
            for kv_cache in (True, False):
                x_d, _, dyn = sample_steps(model, template, kv_cache, alpha_0=alpha_0, steps=steps)
                shapes.clear()
                x_s, _, sta = sample_steps(model, template, kv_cache, alpha_0=alpha_0, steps=steps, static=True)
                for a, b in zip(dyn, sta):
                    assert torch.allclose(a["logits"], b["logits"], atol=1e-4), (denoiser, alpha_0, kv_cache, a["step"])
                assert len(dyn) == len(sta) and torch.equal(x_d, x_s), (denoiser, alpha_0, kv_cache)
                assert all(T & (T - 1) == 0 or s["first"] + T == 37 for T, s in zip(shapes, sta)), shapes


@torch.no_grad()
def test_eso_lm_a_caches_only_its_sequential_phase():
    """Eso-LM (A): its clean tokens see each other, so every diffusion step feeds all of them from slot 0 and
    nothing is cached; from the first sequential step on, the clean prefix is frozen and the cache is exact.
    At every step the cached run's logits equal the uncached run's and a full forward with (A)'s prefix mask
    over [clean tokens ; current masks]; the tokens are identical."""
    model = sharp_model(denoiser="A")
    template = masks(None)
    template[:3] = torch.tensor([1, 2, 3])
    for alpha_0 in (0.5, 1.0, 0.0):
        seq_start = 20 - plan(template == V, 3, 6, alpha_0, torch.Generator().manual_seed(0))[2]
        x_c, _, cached = sample_steps(model, template, True, alpha_0=alpha_0)
        x_u, _, uncached = sample_steps(model, template, False, alpha_0=alpha_0)
        assert torch.equal(x_c, x_u), alpha_0
        for a, b in zip(cached, uncached):
            assert a["first"] == 0 or a["done"] > seq_start, "a diffusion step must feed every clean token"
            assert torch.allclose(a["logits"], b["logits"], atol=1e-4), (alpha_0, a["step"])
            slots = torch.arange(a["end"])
            mask = attention_mask("A", slots[:, None], slots, min(a["done"], seq_start))
            full = model(clean_then_masks(a), a["order"][:, : a["end"]], mask)[:, a["done"]:]
            assert torch.allclose(a["logits"], full, atol=1e-4), (alpha_0, a["step"])
        if alpha_0 < 1:
            assert any(a["first"] > 0 for a in cached), "the sequential phase must use the cache"


@torch.no_grad()
def test_mdlm_sampler_feeds_all_tokens_every_step():
    """MDLM: every step is a full forward over all L tokens, the masks still to come included, with no mask
    and no cache; NFE <= T; a sequential phase (α0 < 1) is refused."""
    model = sharp_model(denoiser="mdlm")
    x, nfe, steps = sample_steps(model, masks(None), True, alpha_0=1.0, steps=5)
    assert nfe <= 5 and (x < V).all()
    for s in steps:
        assert s["first"] == 0, "MDLM feeds everything, every step"
        z = s["x"].clone()
        z[:, s["done"]:] = V  # everything not revealed before this step is a mask
        full = model(z, s["order"], None)[:, s["done"]: s["end"]]
        assert torch.allclose(s["logits"], full, atol=1e-4)
    for seed in range(4):  # refused before anything runs, whatever the schedule would have drawn
        with pytest.raises(AssertionError, match="MDLM is a pure diffusion model"):
            generate(model, masks(None, 2), 1, 4, 0.5, seed=seed)


@torch.no_grad()
def test_strided_schedule():
    """schedule='strided' (the paper's improved sampler): at α0 = 1, T' = min(T, n) steps, step r reveals the
    generated positions of one residue class mod T' (far apart), in a row order shared by the batch; at α0 = .5,
    α0 T' = 4 such steps, then the rest left to right. The cache gives the same tokens as the uncached path."""
    is_gen = torch.ones(24, dtype=torch.bool)
    is_gen[:4] = False  # a prompt: generated positions are 4..23
    order, chunks, n_seq = plan(is_gen, 3, 5, 1.0, torch.Generator().manual_seed(0), "strided")
    assert chunks == [4, 4, 4, 4, 4] and n_seq == 0
    done = 4
    for k in chunks:
        step = order[:, done: done + k]
        assert (step.sort(dim=1).values.diff(dim=1) == 5).all(), "one residue class: positions 5 apart"
        assert torch.equal(step.sort(dim=1).values, step[:1].sort(dim=1).values.expand(3, -1)), "shared rows"
        done += k
    order, chunks, n_seq = plan(is_gen, 2, 8, 0.5, torch.Generator().manual_seed(0), "strided")
    assert sorted(chunks[:4]) == [2, 2, 3, 3]
    assert n_seq == 20 - sum(chunks[:4]) and chunks[4:] == [1] * n_seq
    tail = order[:, 4 + sum(chunks[:4]):]
    assert (tail.diff(dim=1) > 0).all(), "the sequential part goes left to right"
    model = sharp_model()
    template = masks(None)
    for alpha_0 in (1.0, 0.5):
        x_c, _, _ = sample_steps(model, template, True, alpha_0=alpha_0, steps=4, schedule="strided")
        x_u, _, _ = sample_steps(model, template, False, alpha_0=alpha_0, steps=4, schedule="strided")
        assert torch.equal(x_c, x_u)


def test_strided_schedule_honours_alpha_0():
    """The strided sampler rounds α0 T' (T' rows of positions) up or down at random, so that over many draws the
    fraction of tokens made by diffusion is α0 for every T, also where α0 T' is not a whole number (T = 1, 3)."""
    gen = torch.Generator().manual_seed(0)
    is_gen = torch.ones(20, dtype=torch.bool)
    for alpha_0 in (0.3, 0.99):
        for steps in (1, 3, 4, 7):
            fractions = [1 - plan(is_gen, 1, steps, alpha_0, gen, "strided")[2] / 20 for _ in range(2000)]
            mean = sum(fractions) / len(fractions)
            assert abs(mean - alpha_0) < 0.035, (alpha_0, steps, mean)


def test_generate_refuses_what_it_cannot_do():
    """An infill template longer than the block size (windows can only continue a prompt) and an unknown schedule
    are refused, not sampled into something else."""
    model = sharp_model(block_size=24)
    infill = masks(None, length=30)
    infill[:3] = torch.tensor([1, 2, 3])
    infill[20] = 4  # a given token after masks: infilling
    with pytest.raises(ValueError, match="must be a prompt followed by masks"):
        generate(model, infill, 1, 4, 0.5)
    with pytest.raises(AssertionError):
        generate(model, masks(None), 1, 4, 0.5, schedule="zigzag")


@torch.no_grad()
def test_generation_past_the_block_size():
    """A prompt and masks longer than the block: the first block is sampled, then each further chunk with the
    text's own tail as its prompt (the window's given tokens are the text so far, at the window's positions);
    the output has exactly the asked length, the prompt comes back unchanged, NFE counts every window's passes,
    and the cache gives the uncached path's logits at every step of every window."""
    model = sharp_model(block_size=24)
    calls = []
    model.transformer.wte.register_forward_hook(lambda *a: calls.append(1))
    template = masks(None, length=70)
    template[:3] = torch.tensor([1, 2, 3])
    for chunk in (0, 5):
        steps, out = {}, {}
        for kv_cache in (True, False):
            calls.clear()
            x, nfe, steps[kv_cache] = sample_steps(model, template, kv_cache, alpha_0=0.5, steps=6, num_samples=2,
                                                   chunk=chunk)
            assert x.shape == (2, 70) and (x < V).all() and torch.equal(x[:, :3], template[:3].expand(2, -1))
            assert nfe == len(calls) == len(steps[kv_cache])
            out[kv_cache] = x
        assert torch.equal(out[True], out[False]) and len(steps[True]) == len(steps[False])
        assert all(torch.allclose(a["logits"], b["logits"], atol=1e-4) for a, b in zip(steps[True], steps[False]))
        offsets = sorted({s["offset"] for s in steps[True]})
        k = chunk or 12  # half a block by default
        assert offsets == [min(k * i, 70 - 24) for i in range(len(offsets))] and offsets[-1] == 70 - 24, offsets
        for s in steps[True]:
            if s["step"] == 0 and s["offset"]:  # a window's given slots: the text before its new tokens
                previous = offsets[offsets.index(s["offset"]) - 1]
                assert s["done"] == previous + 24 - s["offset"] > 0, "a window's prompt is the text before it"
                given = s["order"][:, : s["done"]] + s["offset"]
                assert torch.equal(s["x"][:, : s["done"]], x.gather(1, given)), "a window's prompt is not the text"


def test_score_is_a_distribution_and_the_one_pass_likelihood():
    """score() at α0 = 0 is the exact chain rule: exp(score) sums to 1 over all V^L sequences, also past the
    block size (L = 5, block 4: the second window is conditioned on the first). At α0 = 0.5 with K = 1 it is the
    one-pass log p(x | σ) of the ordering it draws, and its token surprises sum to -log p; with K = 16 it is
    log mean_k p(x | σ_k) over the orderings it draws, and the surprises sum to the mean of -log p(x | σ_k)."""
    import itertools
    import pytest
    from model import likelihood_order, log_likelihood
    from sample import score
    model = tiny_model(vocab_size=3, block_size=4, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    total = sum(math.exp(score(model, torch.tensor(s), 0.0, chunk=2)[0]) for s in itertools.product(range(3), repeat=5))
    assert abs(total - 1) < 1e-4, total
    x = torch.tensor([[2, 0, 1, 1, 2]])  # windows [0, 4) and [1, 5): log p(x_0..3) + log p(x_4 | x_1..3)
    ascending = lambda n: torch.arange(n)[None]
    chain = (log_likelihood(model, x[:, :4], ascending(4)) + log_likelihood(model, x[:, 1:], ascending(4))
             - log_likelihood(model, x[:, 1:4], ascending(3))).item()
    assert abs(score(model, x[0], 0.0, chunk=2)[0] - chain) < 1e-5, "the second window is conditioned on the first"
    ids = torch.tensor([2, 0, 1, 1])
    order = likelihood_order(1, 4, 0.5, generator=torch.Generator().manual_seed(7))
    logp, surprise = score(model, ids, 0.5, K=1, seed=7)
    assert abs(logp - log_likelihood(model, ids[None], order).item()) < 1e-5
    assert abs(surprise.sum().item() + logp) < 1e-5
    logp16, surprise16 = score(model, ids, 0.5, K=16, seed=7)
    logp_k = log_likelihood(model, ids.expand(16, -1), likelihood_order(16, 4, 0.5, generator=torch.Generator()
                                                                         .manual_seed(7)))
    assert abs(logp16 - (logp_k.logsumexp(0) - math.log(16)).item()) < 1e-5
    assert abs(surprise16.sum().item() + logp_k.mean().item()) < 1e-5
    with pytest.raises(ValueError, match="no one-pass likelihood"):
        score(tiny_model(vocab_size=3, block_size=4, denoiser="A"), ids, 0.5)
