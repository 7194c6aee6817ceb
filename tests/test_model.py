"""The method: orderings, masks, the hybrid NELBO and the exact likelihood."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import causal_mask, tiny_model

from model import (Linear, diffusion_mask, diffusion_loss, diffusion_order, invert, iw_nll, likelihood_order,
                   log_likelihood, nelbo, permute, rotary, sequential_loss, sequential_mask, sequential_nll,
                   sequential_order, stratified_times, unpermute)

# The paper's example, 1-based positions: x = (A,B,C,D,E,F), z_t = (A,M,C,M,M,F).
IS_MASK = torch.tensor([[False, True, False, True, True, False]])


def with_noise(order_fn, is_mask, noise):
    """An ordering of is_mask whose random keys are `noise` (torch.rand's draws, fixed)."""
    rand = torch.rand
    torch.rand = lambda *shape, **kw: noise
    try:
        return order_fn(is_mask)
    finally:
        torch.rand = rand


def add_masks(x, p_mask, mask_id):
    """q_t as the model draws it: each token masked with probability p_mask, from torch's CPU generator."""
    return torch.where(torch.rand(x.shape) < p_mask, mask_id, x)


def token_nll(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def mask_in_original_coordinates(mask, order):
    """Entry [p, q]: may the token at original position p attend to the one at q?"""
    inv = invert(order)[0]
    return mask[inv][:, inv]


def test_diffusion_order_reproduces_fig6():
    """Keys clean + 0.9 U, masks 1 + 0.9 U: the noise below sorts to σ = (3,1,6,4,5,2); its mask is Fig. 6."""
    noise = torch.tensor([[0.2, 0.3, 0.1, 0.1, 0.2, 0.3]])
    order = with_noise(diffusion_order, IS_MASK, noise)
    assert order.tolist() == [[2, 0, 5, 3, 4, 1]], order  # σ = (3,1,6,4,5,2), 0-based
    expected = torch.tensor([  # rows: queries at positions 1..6, columns: keys at 1..6
        [1, 0, 1, 0, 0, 0],  # A sees C (earlier in σ) and itself
        [1, 1, 1, 1, 1, 1],  # M2 is last: sees everything
        [0, 0, 1, 0, 0, 0],  # C is first: only itself
        [1, 0, 1, 1, 0, 1],  # M4 sees the clean A, C, F and itself
        [1, 0, 1, 1, 1, 1],  # M5 sees the clean tokens, M4 and itself
        [1, 0, 1, 0, 0, 1],  # F sees C, A and itself
    ], dtype=torch.bool)
    assert torch.equal(mask_in_original_coordinates(causal_mask(6), order), expected)


def test_eso_lm_a_and_mdlm_masks_on_the_paper_example():
    """Same σ = (3,1,6,4,5,2). Eso-LM (A): the clean A, C, F also see each other (prefix-LM in sorted form,
    Fig. 13); the masks are as in (B). MDLM: no mask at all, every position sees every other, masks included."""
    order = with_noise(diffusion_order, IS_MASK, torch.tensor([[0.2, 0.3, 0.1, 0.1, 0.2, 0.3]]))
    n_clean = (~IS_MASK).sum(1)
    expected = torch.tensor([
        [1, 0, 1, 0, 0, 1],  # A sees C and F as well now: the clean tokens are bidirectional
        [1, 1, 1, 1, 1, 1],  # M2 (last) sees everything
        [1, 0, 1, 0, 0, 1],  # C
        [1, 0, 1, 1, 0, 1],  # M4 sees the clean tokens and itself
        [1, 0, 1, 1, 1, 1],  # M5 sees the clean tokens, M4 and itself
        [1, 0, 1, 0, 0, 1],  # F
    ], dtype=torch.bool)
    a = diffusion_mask("A", n_clean, 6)
    assert a.shape == (1, 1, 6, 6) and torch.equal(mask_in_original_coordinates(a[0, 0], order), expected)
    assert diffusion_mask("mdlm", n_clean, 6) is None, "MDLM: SDPA's unmasked path, everything sees everything"
    assert torch.equal(diffusion_mask("B", n_clean, 6), causal_mask(6))
    # the sequential pass of (A): σ = (3,1,6,2,4,5); x rows A, C, F (slots 0-2) see each other, the masks' x
    # rows are causal; the z rows (M2, M4, M5) see x strictly before their slot, as in (B)
    seq = sequential_mask("A", torch.tensor([3]), 3, 6)[0, 0]
    assert torch.equal(seq[:3], sequential_mask("B", torch.tensor([3]), 3, 6)[0, 0, :3])
    x_rows = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                           [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(seq[3:, 3:], x_rows) and not seq[3:, :3].any()


def test_mdlm_sees_every_position():
    """MDLM's forward has no mask: it is permutation-equivariant (any σ gives the same logits, un-sorted), and the
    token first in σ, which under (B) sees only itself, changes its output when any other token changes."""
    model = tiny_model(vocab_size=5, seed=1, denoiser="mdlm")
    x = torch.randint(0, 5, (4, 8))
    zt = torch.where(torch.arange(8) % 2 == 0, model.config.mask_id, x)
    natural = torch.arange(8).expand(4, -1)
    with torch.no_grad():
        reference = model(zt, natural, None)
        for _ in range(3):
            order = diffusion_order(zt == model.config.mask_id)
            logits = model(permute(zt, order), order, None)
            assert torch.allclose(logits.gather(1, invert(order)[..., None].expand_as(logits)), reference, atol=1e-5)
        order = torch.tensor([1, 3, 5, 7, 0, 2, 4, 6]).expand(4, -1)  # clean tokens first, position 1 leading
        first = order[:, 0]
        other = zt.clone()
        other[:, 7] = (other[:, 7] + 1) % 5  # a clean token later in σ
        rows = torch.arange(4)
        assert not torch.allclose(model(other, natural, None)[rows, first], reference[rows, first])
        b = tiny_model(vocab_size=5, seed=1)  # the same weights under (B): the first token sees only itself
        b.load_state_dict(model.state_dict())
        before = b(permute(zt, order), order, causal_mask(8))[:, 0]
        assert torch.allclose(b(permute(other, order), order, causal_mask(8))[:, 0], before, atol=1e-6)


def test_diffusion_order_puts_clean_first_in_every_order():
    """Over random draws: clean tokens always first, and every order of each group appears."""
    torch.manual_seed(0)
    seen_clean, seen_masks = set(), set()
    for _ in range(300):
        order = diffusion_order(IS_MASK)[0].tolist()
        assert sorted(order[:3]) == [0, 2, 5] and sorted(order[3:]) == [1, 3, 4], order
        seen_clean.add(tuple(order[:3]))
        seen_masks.add(tuple(order[3:]))
    assert len(seen_clean) == 6 and len(seen_masks) == 6, "clean tokens and masks must both be shuffled"


def paper_sequential_mask(L):
    """The paper's 2L x 2L mask over z0 ⊕ x in sorted coordinates (BD3-LM's block mask, block size 1): z_i sees
    itself and x_j for j < i; x_i sees x_j for j <= i; x never sees z. The reference for the repo's packed mask."""
    ones = torch.ones(L, L, dtype=torch.bool)
    return torch.cat([torch.cat([torch.eye(L, dtype=torch.bool), ones.tril(-1)], 1),
                      torch.cat([torch.zeros(L, L, dtype=torch.bool), ones.tril()], 1)], 0)


def test_sequential_order_and_mask_reproduce_the_paper():
    """σ = (3,1,6,2,4,5): clean shuffled, masks in natural order; the 2L mask of the paper's figure; the repo's
    mask is that mask without the z rows (and columns) of the clean tokens A, C, F."""
    noise = torch.tensor([[0.2, 0.0, 0.1, 0.0, 0.0, 0.3]])
    order = with_noise(sequential_order, IS_MASK, noise)
    assert order.tolist() == [[2, 0, 5, 1, 3, 4]], order
    for _ in range(100):  # masks stay in natural order whatever the noise
        assert sequential_order(IS_MASK)[0, 3:].tolist() == [1, 3, 4]
    expected = torch.tensor([  # rows and columns: z1..z6 then x1..x6
        # z1 .. z6          x1 .. x6
        [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # z1 (clean, slot 2): itself, x3
        [0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1],  # z2 (mask, slot 4): itself, x3 x1 x6
        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # z3 (clean, slot 1): itself only
        [0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1],  # z4: itself, x3 x1 x6 x2
        [0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 1],  # z5: itself, x3 x1 x6 x2 x4
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0],  # z6 (clean, slot 3): itself, x3 x1
        [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0],  # x1: x3 x1 (causal in σ order, never z)
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1],  # x2
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # x3
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1],  # x4
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],  # x5
        [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1],  # x6
    ], dtype=torch.bool)
    inv = invert(order)[0]
    both = torch.cat([inv, inv + 6])
    assert torch.equal(paper_sequential_mask(6)[both][:, both], expected)
    packed = sequential_mask("B", torch.tensor([3]), 3, 6)[0, 0]  # z rows of M2, M4, M5 (slots 3, 4, 5), then x
    keep = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11])  # those rows and columns of the paper's, sorted coordinates
    assert torch.equal(packed, paper_sequential_mask(6)[keep][:, keep])


def test_sequential_mask_rows_per_sample():
    """Each row of a batch has its own clean prefix: z row r is the mask at slot n_clean + r; it sees itself and
    x_j for j < n_clean + r (strict); x rows are causal; x never sees z."""
    mask = sequential_mask("B", torch.tensor([1, 3]), 3, 4)[:, 0]  # 3 masks; 1 mask and 2 padded z rows
    for b, n_clean in enumerate((1, 3)):
        for r in range(3):
            assert mask[b, r, :3].tolist() == [i == r for i in range(3)]
            assert mask[b, r, 3:].tolist() == [j < n_clean + r for j in range(4)], (b, r)
        assert torch.equal(mask[b, 3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril()) and not mask[b, 3:, :3].any()


@pytest.mark.parametrize("denoiser", ["B", "A"])
def test_dropping_the_clean_z_rows_leaves_the_loss_unchanged(denoiser):
    """The sequential pass runs [masks of z0 ; x] instead of the paper's z0 ⊕ x (2L slots): the same draws give
    the same per-token NLL and the same gradients as the paper's full 2L pass (fp32), for several masking rates
    and with z0 all masks (the likelihood pass); for (A) that pass's clean x tokens also see each other."""
    model = tiny_model(vocab_size=7, block_size=12, seed=2, denoiser=denoiser).train()
    mask_id = model.config.mask_id
    x = torch.randint(0, 7, (9, 12))
    for p_mask in (0.25, 0.5, 0.75, 1.0):
        torch.manual_seed(0)
        z0 = add_masks(x, p_mask, mask_id)
        order = sequential_order(z0 == mask_id)
        model.zero_grad()
        nll = sequential_nll(model, x, z0 == mask_id, order)
        nll.sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        idx = torch.cat([permute(z0, order), permute(x, order)], dim=1)
        mask = paper_sequential_mask(12).expand(9, 1, 24, 24).clone()
        if denoiser == "A":  # the clean prefix of x, written out: slots below n_clean see each other
            clean = torch.arange(12) < (z0 != mask_id).sum(1)[:, None]  # (9, 12)
            mask[:, 0, 12:, 12:] |= clean[:, :, None] & clean[:, None, :]
        logits = model(idx, torch.cat([order, order], dim=1), mask, out=slice(0, 12))
        ref = token_nll(logits, permute(x, order)) * permute(z0 == mask_id, order)
        ref.sum().backward()
        n_masks = (z0 == mask_id).sum(1)
        for b in range(9):  # z row r of the packed pass is slot n_clean + r; rows past the last mask score 0
            assert torch.allclose(nll[b, : n_masks[b]], ref[b, 12 - n_masks[b]:], atol=1e-5), (p_mask, b)
            assert nll[b, n_masks[b]:].eq(0).all()
        assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, model.parameters())), p_mask


@pytest.mark.parametrize("denoiser", ["B", "A", "mdlm"])
def test_diffusion_loss_equals_the_full_pass(denoiser):
    """The diffusion pass computes last-layer queries and logits only from the first mask slot on (carry-over):
    the same draws give the loss of a full pass with logits at every slot, masked to the masks, weighted by
    α0 / (1 - α_t) (or 1: low_var), normalised by all tokens, with the denoiser's mask written out: (B) causal,
    (A) causal and the clean tokens see each other, MDLM everything."""
    model = tiny_model(vocab_size=7, block_size=12, seed=2, denoiser=denoiser)
    x = torch.randint(0, 7, (8, 12))
    runs = ((0.5, False), (0.25, True), (1.0, False), (1.0, True))
    for alpha_0, low_var in runs if denoiser != "mdlm" else runs[2:]:
        torch.manual_seed(0)
        loss = diffusion_loss(model, x, alpha_0, low_var=low_var)
        torch.manual_seed(0)
        t = stratified_times(8)
        alpha_t = alpha_0 * (1 - t)
        zt = add_masks(x, (1 - alpha_t)[:, None], model.config.mask_id)
        order = diffusion_order(zt == model.config.mask_id)
        clean = torch.arange(12) < (zt != model.config.mask_id).sum(1)[:, None]  # (8, 12): the sorted clean prefix
        mask = {"B": causal_mask(12), "A": (causal_mask(12) | (clean[:, :, None] & clean[:, None, :]))[:, None],
                "mdlm": torch.ones(12, 12, dtype=torch.bool)}[denoiser]
        nll = token_nll(model(permute(zt, order), order, mask), permute(x, order))
        w = torch.ones_like(t) if low_var else alpha_0 / (1 - alpha_t)
        ref = (w[:, None] * nll * permute(zt == model.config.mask_id, order)).sum() / x.numel()
        assert torch.allclose(loss, ref, atol=1e-6), (alpha_0, loss, ref)


def test_rotary_positions_are_relative():
    """RoPE rotates q and k by the angles of their positions, so attention sees position differences only: moving
    every token by the same offset leaves (B)'s logits unchanged (another order of the same positions does not),
    and the rotation keeps every vector's length."""
    model = tiny_model(vocab_size=7, block_size=24, seed=1)
    x = torch.randint(0, 7, (3, 10))
    pos = torch.rand(3, 10).argsort(dim=1)
    logits = model(x, pos, causal_mask(10))
    assert torch.allclose(logits, model(x, pos + 9, causal_mask(10)), atol=1e-5)
    assert not torch.allclose(logits, model(x, pos.flip(1), causal_mask(10)), atol=1e-3)
    q = torch.randn(2, 3, 2, 10, 8)  # (q and k, B, heads, T, head size)
    rotated = rotary(q, model.rope_cos[pos][:, None], model.rope_sin[pos][:, None])
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_permutations_round_trip():
    x = torch.randint(0, 100, (5, 11))
    order = torch.rand(5, 11).argsort(dim=1)
    assert torch.equal(unpermute(permute(x, order), order), x)
    assert torch.equal(invert(invert(order)), order)
    assert torch.equal(permute(torch.arange(11).expand(5, -1), order), order), "slot j holds position order[j]"


def test_likelihood_order():
    """P_L^{α0}: α0=0 is left to right, α0=1 a permutation; the non-diffusion tail is always ascending."""
    torch.manual_seed(0)
    assert torch.equal(likelihood_order(3, 7, 0.0), torch.arange(7).expand(3, -1))
    for alpha_0 in (0.3, 0.7, 1.0):
        order = likelihood_order(200, 7, alpha_0)
        assert torch.equal(order.sort(dim=1).values, torch.arange(7).expand(200, -1))
    tails = likelihood_order(500, 7, 0.5)
    frac = []
    for row in tails.tolist():  # find where the ascending tail starts: the diffusion set C is before it
        n = 7
        while n > 0 and (n == 7 or row[n - 1] < row[n]):
            n -= 1
        frac.append(n)
    assert 2.0 < sum(frac) / len(frac) < 3.5  # about α0 L = 3.5, minus the chance that C's last looks ascending


def test_stratified_times():
    """One time in each eighth of [EPS_T, 1]."""
    torch.manual_seed(0)
    t = stratified_times(8)
    assert torch.all((t >= 1e-3) & (t <= 1)) and torch.equal(((t - 1e-3) / (1 - 1e-3) * 8).floor(), torch.arange(8.))


def conditionals_one_at_a_time(model, x, order):
    """log p(x | σ) from L separate forwards: [x_σ(<l) ; M at σ(l)], causal, read the last logit."""
    total = torch.zeros(x.size(0))
    mask_id = model.config.mask_id
    for l in range(x.size(1)):
        idx = torch.cat([permute(x, order[:, :l]), torch.full_like(x[:, :1], mask_id)], dim=1)
        logits = model(idx, order[:, : l + 1], causal_mask(l + 1), out=slice(-1, None))
        total += logits[:, 0].log_softmax(-1).gather(1, permute(x, order[:, l: l + 1]))[:, 0]
    return total


def test_likelihood_is_a_distribution_and_matches_one_token_at_a_time():
    """For a fixed σ, Σ_x p(x | σ) = 1 over all 3^4 sequences; one pass = the product of L conditionals."""
    model = tiny_model(vocab_size=3, block_size=4)
    xs = torch.tensor(list(itertools.product(range(3), repeat=4)))
    order = torch.tensor([2, 0, 3, 1]).expand(len(xs), -1)
    with torch.no_grad():
        logp = log_likelihood(model, xs, order)
        assert abs(logp.double().exp().sum().item() - 1) < 1e-5, logp.exp().sum()
        assert torch.allclose(logp, conditionals_one_at_a_time(model, xs, order), atol=1e-5)


def test_alpha0_zero_is_left_to_right_ar():
    """α0 = 0: the NELBO is exactly the mean AR NLL, -log p(x_l | x_<l), on the same network."""
    model = tiny_model(vocab_size=5)
    x = torch.randint(0, 5, (6, 8))
    with torch.no_grad():
        loss, terms = nelbo(model, x, alpha_0=0.0)
        ar = -conditionals_one_at_a_time(model, x, torch.arange(8).expand(6, -1)).sum() / x.numel()
        assert set(terms) == {"sequential"}
        assert torch.allclose(loss, ar, atol=1e-6), (loss, ar)
        assert torch.allclose(iw_nll(model, x, 0.0, K=3).mean(), ar, atol=1e-6), "K orderings of AR are one"


def uniform_model(vocab_size):
    model = tiny_model(vocab_size=vocab_size, block_size=16)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0 but the mask's: p = 1/V everywhere
    return model


def test_alpha0_one_has_no_sequential_term():
    """α0 = 1: the whole batch is diffusion, nothing of length 2L is ever run. At t = 1 every token is masked
    and its weight α0 / (1 - α_t) is 1, so under a uniform model the NELBO is exactly log V."""
    model = uniform_model(5)
    lengths = []
    model.transformer.wte.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    x = torch.randint(0, 5, (6, 16))
    loss, terms = nelbo(model, x, alpha_0=1.0, batch_split=0.5, t=torch.ones(6))
    assert set(terms) == {"diffusion"} and lengths == [16]
    assert abs(loss.item() - math.log(5)) < 1e-5, (loss.item(), math.log(5))


def test_nelbo_of_a_uniform_model_is_log_v():
    """Closed form: a model that predicts 1/V everywhere has NELBO = log V for every α0 in expectation:
    the weight α0/(1-α_t) exactly undoes the 1-α_t masking rate, and the halves are normalised separately."""
    model = uniform_model(7)
    torch.manual_seed(0)
    x = torch.randint(0, 7, (4000, 16))
    with torch.no_grad():
        for alpha_0 in (0.0, 0.25, 0.5, 1.0):
            loss, _ = nelbo(model, x, alpha_0)
            assert abs(loss.item() / math.log(7) - 1) < 0.03, (alpha_0, loss.item(), math.log(7))
        low_var, _ = nelbo(model, x, 1.0, loss_type="low_var")
        assert abs(low_var.item() / math.log(7) - 0.5) < 0.03, "low_var weighs masks by 1: E[#masks]/L = 1/2"


def test_iw_nll_decreases_with_k():
    """L^K <= L^1 on average (Burda et al.), on a fixed random model whose weights are scaled up so that its
    conditionals, and so log p(x | σ), depend strongly on the ordering."""
    model = tiny_model(vocab_size=5, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    torch.manual_seed(0)
    x = torch.randint(0, 5, (2000, 8))
    with torch.no_grad():
        k1, k4, k16 = (iw_nll(model, x, 0.5, K=k).mean().item() for k in (1, 4, 16))
    assert k16 < k4 < k1, (k1, k4, k16)


def test_first_mask_of_the_diffusion_pass_is_the_likelihood_conditional():
    """In the diffusion pass the first mask after the clean prefix sees exactly that prefix and itself, as
    slot l of the one-pass likelihood does: the two give the same log-probability. (Later masks also see the
    masks before them in σ, Fig. 6, which the likelihood pass never shows; so E[L^1] and the NELBO, equal by
    Lemma B.3 for the model it considers, can differ for this network unless it ignores those masks.)"""
    model = tiny_model(vocab_size=5, seed=1)
    torch.manual_seed(0)
    x = torch.randint(0, 5, (16, 8))
    zt = torch.where(torch.arange(8) % 3 == 1, model.config.mask_id, x)  # 5 clean, 3 masked per row
    order = diffusion_order(zt == model.config.mask_id)
    with torch.no_grad():
        logits = model(permute(zt, order), order, causal_mask(8))
        first_mask = logits[:, 5].log_softmax(-1).gather(1, permute(x, order)[:, 5:6])[:, 0]
        z0_all_masks = torch.ones(x.shape, dtype=torch.bool)
        assert torch.allclose(first_mask, -sequential_nll(model, x, z0_all_masks, order)[:, 5], atol=1e-6)


def test_the_hybrid_nelbo_is_its_two_terms_on_the_split_batch():
    """Eq. 7 with κ = 0.25 on 8 rows is the MDM term of the first 2 rows plus the AR term of the other 6, from the
    same draws; at α0 = 0, 0.5 and 1 the loss has finite gradients for every parameter."""
    model = tiny_model(vocab_size=5).train()
    x = torch.randint(0, 5, (8, 8))
    torch.manual_seed(0)
    loss, terms = nelbo(model, x, 0.5, batch_split=0.25)
    torch.manual_seed(0)
    mdm, ar = diffusion_loss(model, x[:2], 0.5), sequential_loss(model, x[2:], 0.5)
    assert torch.equal(terms["diffusion"], mdm) and torch.equal(terms["sequential"], ar) and torch.equal(loss, mdm + ar)
    for alpha_0 in (0.0, 0.5, 1.0):
        model.zero_grad()
        loss, _ = nelbo(model, x, alpha_0)
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tiny_model_overfits_one_batch():
    """300 Adam steps on two sequences: the AR-only model reaches the mixture's floor, log(2)/L per token,
    and the hybrid's exact NLL falls below half its start."""
    torch.manual_seed(0)
    x = torch.randint(0, 5, (2, 8)).repeat(4, 1)
    for alpha_0, target in ((0.0, 0.12), (0.5, None)):
        model = tiny_model(vocab_size=5, n_embd=32).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        with torch.no_grad():
            first = iw_nll(model, x, alpha_0, K=4).mean().item()
        for _ in range(300):
            loss, _ = nelbo(model, x, alpha_0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = iw_nll(model.eval(), x, alpha_0, K=4).mean().item()
        assert final < (target or 0.5 * first), (alpha_0, first, final, math.log(2) / 8)


def test_few_row_layout_is_f_linear_and_runs_only_when_sampling(monkeypatch):
    """(W xᵀ)ᵀ computes F.linear (values, shape, and under bf16 autocast with a bias, its dtype) for contiguous
    and transposed inputs; Linear takes it only for 2 to 8 rows, while the sampler runs
    (sampling_products), and only on a machine that calls for it: training and eval always run F.linear."""
    import model
    from model import sampling_products
    torch.manual_seed(0)
    calls = []
    for bias in (False, True):
        lin = Linear(24, 40, bias=bias)
        lin.transposed = (lambda f: lambda x: calls.append(x.numel() // 24) or f(x))(lin.transposed)
        for x in (torch.randn(1, 2, 24), torch.randn(24, 3).t(), torch.randn(8, 24), torch.randn(1, 1, 24),
                  torch.randn(3, 3, 24)):
            y = Linear.transposed(lin, x)
            assert y.shape == (*x.shape[:-1], 40)
            assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-6)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert Linear.transposed(lin, x).dtype == F.linear(x, lin.weight, lin.bias).dtype
            for machine_calls_for_it in (True, False):
                monkeypatch.setattr(model, "few_rows_transposed", lambda: machine_calls_for_it)
                lin(x)  # training: never
                with torch.inference_mode():
                    lin(x)  # eval, or anything but the sampler: never
                with sampling_products():
                    lin(x)  # sampling: on such a machine, 2 to 8 rows
                assert not Linear.transpose_few_rows
    assert calls == [2, 3, 8] * 2, calls


def test_few_row_layout_is_a_property_of_the_machine(monkeypatch):
    """No timing decides the layout (a busy machine would flip it, and the two round differently): (W xᵀ)ᵀ on an
    AMD CPU with MKL, F.linear on any other CPU or BLAS, ESO_LM_FEW_ROWS overriding both; a bad value is a
    ValueError that names it."""
    import model
    cases = [("AuthenticAMD", True, "", True), ("GenuineIntel", True, "", False), ("", True, "", False),
             ("AuthenticAMD", False, "", False), ("GenuineIntel", True, "transposed", True),
             ("AuthenticAMD", True, "linear", False)]
    try:
        for vendor, mkl, env, transposed in cases:
            monkeypatch.setattr(model, "cpu_vendor", lambda: vendor)
            monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
            monkeypatch.setenv("ESO_LM_FEW_ROWS", env)
            model.few_rows_transposed.cache_clear()
            assert model.few_rows_transposed() is transposed, (vendor, mkl, env)
        monkeypatch.setenv("ESO_LM_FEW_ROWS", "fast")
        model.few_rows_transposed.cache_clear()
        with pytest.raises(ValueError, match="ESO_LM_FEW_ROWS='fast' must be"):
            model.few_rows_transposed()
    finally:
        monkeypatch.undo()
        model.few_rows_transposed.cache_clear()
    if os.path.exists("/proc/cpuinfo"):  # the real vendor: this machine's vendor_id line
        vendor = model.cpu_vendor()
        assert vendor and f"vendor_id\t: {vendor}" in open("/proc/cpuinfo").read(), vendor


def test_what_would_be_silently_wrong_is_refused():
    """A likelihood asked of a denoiser that has no one-pass form, MDLM asked for a sequential term, an unknown
    loss type or a hybrid batch with an empty half: refused, not answered with a wrong number."""
    mdlm, b = tiny_model(vocab_size=5, denoiser="mdlm"), tiny_model(vocab_size=5)
    x = torch.randint(0, 5, (4, 8))
    with pytest.raises(ValueError, match="denoiser mdlm has no one-pass likelihood"):
        log_likelihood(mdlm, x, torch.arange(8).expand(4, -1))
    for call in (lambda: nelbo(mdlm, x, 0.5), lambda: nelbo(b, x, 0.5, loss_type="mse"),
                 lambda: nelbo(b, x[:1], 0.5)):
        with pytest.raises(AssertionError):
            call()
