"""The sampler: exact KV cache, the schedule, prompts and infilling, the paper's L=8 walk-through."""
import json

import torch
import conftest
from conftest import tiny_model

from kvcache import KVCache
from model import causal_mask
from sample import denoise, diffusion_counts, generate, plan, sample_tokens

V = 11


def sharp_model(seed=0, block_size=24):
    """A random model with scaled-up weights: peaked, position-dependent predictions, so that sampling
    bugs change tokens."""
    model = tiny_model(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=32, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


def run(model, template, kv_cache, seed=0, steps=6, alpha_0=0.5, num_samples=3, **kw):
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
    """Pitfall 20: at every step, the cached logits of the masks equal those of a full causal forward over
    [clean tokens in σ order; current masks], and both paths pick the same tokens."""
    model = sharp_model()
    template = masks(None)
    template[:4] = torch.tensor([1, 2, 3, 4])  # a prompt
    for alpha_0 in (1.0, 0.5, 0.0):
        x_c, nfe_c, cached = run(model, template, True, alpha_0=alpha_0)
        x_u, nfe_u, uncached = run(model, template, False, alpha_0=alpha_0)
        assert nfe_c == nfe_u == len(cached)
        for a, b in zip(cached, uncached):
            assert torch.allclose(a["logits"], b["logits"], atol=1e-4), (alpha_0, a["step"])
            full = model(clean_then_masks(a), a["order"][:, : a["end"]],
                         causal_mask(a["end"]))[:, a["done"]:]
            assert torch.allclose(a["logits"], full, atol=1e-4)
        assert torch.equal(x_c, x_u), "cached and uncached sampling must give the same tokens"


def test_schedule_counts_and_nfe():
    """Counts are non-empty and sum to at most the generated length; the rest is one token per step, left
    to right; NFE = non-empty diffusion steps + sequential tokens; α0 = 0 is L steps, α0 = 1 at most T."""
    for alpha_0, steps in ((1.0, 8), (0.5, 8), (0.25, 64), (1.0, 10 ** 6)):
        counts = diffusion_counts(100, steps, alpha_0, torch.Generator().manual_seed(0))
        assert all(c > 0 for c in counts) and len(counts) <= steps and sum(counts) <= 100
        order, chunks = plan(torch.ones(100, dtype=torch.bool), 2, steps, alpha_0, torch.Generator().manual_seed(0))
        assert chunks == counts + [1] * (100 - sum(counts))
        assert torch.equal(order.sort(dim=1).values, torch.arange(100).expand(2, -1))
        tail = order[:, sum(counts):]
        assert torch.all(tail[:, 1:] > tail[:, :-1]), "the sequential positions go left to right"
        if alpha_0 == 1:
            assert sum(counts) == 100
    g = torch.Generator().manual_seed(1)
    assert plan(torch.ones(100, dtype=torch.bool), 2, 8, 0.0, g)[1] == [1] * 100, "α0 = 0: NFE = L"
    mean = sum(sum(diffusion_counts(100, 16, 0.5, g)) for _ in range(400)) / 400
    assert abs(mean - 50) < 1.5, f"the diffusion share is Binomial(L, α0): mean {mean}"


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


def test_paper_walkthrough_l8():
    """Suppl. B.5 / §5.3: counts (2,1,2), diffusion positions (3,1,6,4,7), AR positions (2,5,8): 6 NFEs,
    and at each step exactly these tokens are fed and committed (positions 1-based)."""
    model = sharp_model(block_size=8)
    order = torch.tensor([[3, 1, 6, 4, 7, 2, 5, 8]]) - 1
    chunks = [2, 1, 2, 1, 1, 1]
    log = []

    def callback(step, start, done, end, x, order, logits, cache, **_):
        fed = (order[0, start:end] + 1).tolist()
        log.append((fed, done - start, cache.committed))

    x = denoise(model, torch.full((1, 8), V), order, chunks, callback=callback)
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

    def callback(start, done, end, x, order, cache, **_):
        ptrs.append((cache.k.data_ptr(), tuple(cache.k.shape)))
        prefixes.append((cache.committed, x[:, : cache.committed].clone(), order[:, : cache.committed].clone(),
                         cache.k[:, :, :, : cache.committed].clone()))

    generate(model, masks(None), 2, 5, 0.5, callback=callback)
    assert len(set(ptrs)) == 1 and ptrs[0][1] == (2, 2, 2, 20, 16)
    for n, x, order, k in prefixes[1:]:
        ref = KVCache.for_model(model.config, 2, 20)
        model(x, order, causal_mask(n), ref)
        assert torch.allclose(ref.k[:, :, :, :n], k, atol=1e-5), "a committed slot differs from clean K"
        assert (x < V).all(), "a committed slot holds a mask token"


def test_bench_tables(tmp_path):
    """bench.py's sampling and linear tables on a tiny model (timings are printed, never asserted): every
    sampler row is there, AR decoding makes exactly L forward passes, and T = 4 at most 4."""
    out = tmp_path / "rows.json"
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--device=cpu", f"--json_out={out}"]
    r = conftest.run("bench.py", "--lengths=16,32", "--small_steps=4", *tiny)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    schedules = ["NFE=L"] * 3 + ["T=4"] * 2
    assert [(row["L"], row["schedule"]) for row in rows] == [(L, s) for L in (16, 32) for s in schedules]
    assert all(row["nfe"] == row["L"] for row in rows if row["sampler"].startswith("AR"))
    assert all(row["nfe"] <= 4 for row in rows if row["schedule"] == "T=4")
    assert r.stdout.count("cached is") == 4
    r = conftest.run("bench.py", "--what=linear", "--iters=1", *tiny)
    assert r.returncode == 0, r.stderr
    assert [row["rows"] for row in json.loads(out.read_text())] == [1, 2, 4, 8, 16]
