"""
Benchmarks that print tables (timings live here, never in tests). On a CPU, batch size 1 for sampling as in
the paper's latency protocol (§5.6), a fixed randomly initialised model (speed does not depend on weights):

    python bench.py                      # sampling: cached Eso-LM vs uncached vs AR decoding, L = 256, 1024
    python bench.py --what=train         # one training iteration: hybrid (α0=.5) vs diffusion (α0=1) vs AR
    python bench.py --what=frontier --out_dirs=out-a,out-b --scorer=out-ar   # speed-quality frontier
    python bench.py --what=linear        # why model.Linear exists: few-row products, F.linear vs (W xᵀ)ᵀ

The frontier samples from each trained checkpoint at several step counts, then scores the samples with the
AR (α0=0) model: its mean NLL per token is a small "generative perplexity" (the paper uses GPT-2 Large),
shown next to the samples' unigram entropy so that repetitive text cannot look good.
"""
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configurator import UserError, parse_args, run_cli
from data import get_batch, load_split
from model import GPT, GPTConfig, Linear, iw_nll, nelbo
from sample import generate
from train import autocast_context, load_checkpoint, model_from_checkpoint, pick_device


@dataclass
class BenchConfig:
    what: str = "sample"  # sample, train, frontier or linear
    lengths: str = "256,1024"  # sequence lengths for --what=sample
    small_steps: int = 32  # the "small T" column
    n_layer: int = 6  # the fixed model: nanoGPT's shakespeare_char size
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 65
    batch_size: int = 12  # --what=train
    block_size: int = 64  # --what=train
    iters: int = 20  # --what=train: timed iterations per row and round
    rounds: int = 5  # --what=train: interleaved rounds; medians and the ratios' range are printed
    compile: bool = False  # --what=train: torch.compile the model
    out_dirs: str = ""  # --what=frontier: comma-separated checkpoints to sample from
    scorer: str = ""  # --what=frontier: the α0=0 checkpoint that scores samples
    steps_list: str = "8,16,32,64,L"  # --what=frontier
    num_samples: int = 64  # --what=frontier
    device: str = "cpu"
    seed: int = 1337
    json_out: str = ""  # also write the rows as JSON here


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def bench_sample(cfg, device):
    rows = []
    print(f"sampling, batch 1, {cfg.n_layer} layers x {cfg.n_embd} wide, {device}, {torch.get_num_threads()} threads")
    print(f"{'L':>5} {'sampler':<36} {'NFE':>5} {'seconds':>8} {'tokens/s':>9}")
    for L in map(int, cfg.lengths.split(",")):
        torch.manual_seed(0)
        model = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device).eval()
        template = torch.full((L,), model.config.mask_id, device=device)
        generate(model, template[:64], 1, 10 ** 6, 1.0)  # warm-up: allocator, thread pool, caches
        for steps, label in ((10 ** 6, "NFE=L"), (cfg.small_steps, f"T={cfg.small_steps}")):
            res = {}
            for name, alpha_0, kv in (("Eso-LM cached", 1.0, True), ("Eso-LM uncached (MDLM cost)", 1.0, False),
                                      ("AR, same cache (α0=0)", 0.0, True)):
                if name.startswith("AR") and label != "NFE=L":
                    continue
                dt, (_, nfe) = timed(lambda: generate(model, template, 1, steps, alpha_0, kv_cache=kv, seed=cfg.seed),
                                     device)
                res[name] = dt
                rows.append(dict(L=L, schedule=label, sampler=name, nfe=nfe, seconds=dt, tokens_per_s=L / dt))
                print(f"{L:>5} {name + ', ' + label:<36} {nfe:>5} {dt:>8.2f} {L / dt:>9.1f}", flush=True)
            ratio = res["Eso-LM uncached (MDLM cost)"] / res["Eso-LM cached"]
            extra = f", cached / AR {res['Eso-LM cached'] / res['AR, same cache (α0=0)']:.2f}x" if label == "NFE=L" else ""
            print(f"{'':>5} -> {label}: cached is {ratio:.1f}x faster than uncached{extra}")
    return rows


def bench_train(cfg, device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.split(":")[0])
    net = torch.compile(model) if cfg.compile else model
    ctx, dtype = autocast_context(device, "auto")
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    print(f"one training iteration (forward, backward, AdamW), batch {cfg.batch_size} x {cfg.block_size}, "
          f"{cfg.n_layer} layers x {cfg.n_embd} wide, {device} {dtype}{', compiled' if cfg.compile else ''}; "
          f"median of {cfg.rounds} interleaved rounds of {cfg.iters} iterations, ratio range in brackets")
    names = {1.0: "diffusion, α0=1", 0.5: "hybrid, α0=0.5", 0.0: "AR, α0=0"}

    def step(alpha_0):
        with ctx:
            loss, _ = nelbo(net, x, alpha_0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for alpha_0 in names:  # warm-up (and compilation)
        for _ in range(3 if not cfg.compile else 10):
            step(alpha_0)
    ms = {a: [] for a in names}
    for _ in range(cfg.rounds):  # interleaved: drift on a shared machine hits every row alike
        for alpha_0 in names:
            dt, _ = timed(lambda: [step(alpha_0) for _ in range(cfg.iters)], device)
            ms[alpha_0].append(dt / cfg.iters * 1000)
    rows = []
    for alpha_0, name in names.items():
        ratios = sorted(a / b for a, b in zip(ms[alpha_0], ms[1.0]))
        med = statistics.median(ms[alpha_0])
        rows.append(dict(alpha_0=alpha_0, ms=med, ratio=statistics.median(ratios), ratio_min=ratios[0],
                         ratio_max=ratios[-1]))
        print(f"  {name:<16} {med:8.1f} ms   {rows[-1]['ratio']:.2f}x the diffusion iteration "
              f"[{ratios[0]:.2f}-{ratios[-1]:.2f}]", flush=True)
    return rows


def unigram_entropy(row):
    counts = torch.bincount(row).float()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def bench_frontier(cfg, device):
    if not cfg.out_dirs or not cfg.scorer:
        raise UserError("--what=frontier needs --out_dirs=dir1,dir2 and --scorer=<the α0=0 checkpoint dir>")
    scorer_ckpt = load_checkpoint(cfg.scorer, device)
    if scorer_ckpt["config"]["alpha_0"] != 0:
        raise UserError(f"--scorer={cfg.scorer} was trained with alpha_0={scorer_ckpt['config']['alpha_0']}; "
                        "the scorer must be an AR model (alpha_0=0)")
    scorer = model_from_checkpoint(scorer_ckpt, device).eval()
    scfg = scorer_ckpt["config"]
    val = load_split(scfg["dataset"], "val", scfg["data_dir"])
    real = get_batch(val, cfg.num_samples, scorer.config.block_size, device, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        real_nll = iw_nll(scorer, real, 0.0).mean().item()
    real_ent = sum(unigram_entropy(r) for r in real.cpu()) / len(real)
    rows = [dict(out_dir="val text", alpha_0=None, steps=None, nfe=None, seconds=None, seconds_uncached=None,
                 same_tokens=None, gen_nll=real_nll, entropy=real_ent)]
    print(f"reference, {cfg.num_samples} windows of real val text: NLL {real_nll:.3f}, entropy {real_ent:.3f}")
    print(f"{cfg.num_samples} samples each; seconds cached and uncached; gen NLL: nats/token under {cfg.scorer}")
    print(f"{'checkpoint':<34} {'T':>5} {'NFE':>5} {'cached':>8} {'uncached':>9} {'gen NLL':>8} {'entropy':>8}")
    for out_dir in cfg.out_dirs.split(","):
        ckpt = load_checkpoint(out_dir, device)
        model = model_from_checkpoint(ckpt, device).eval()
        L, alpha_0 = model.config.block_size, ckpt["config"]["alpha_0"]
        template = torch.full((L,), model.config.mask_id, device=device)
        for steps in dict.fromkeys(L if s == "L" else int(s) for s in cfg.steps_list.split(",")):  # T = L once
            dt, (x, nfe) = timed(lambda: generate(model, template, cfg.num_samples, steps, alpha_0, seed=cfg.seed),
                                 device)
            dt_u, (x_u, _) = timed(lambda: generate(model, template, cfg.num_samples, steps, alpha_0, kv_cache=False,
                                                    seed=cfg.seed), device)
            with torch.no_grad():
                gen_nll = iw_nll(scorer, x, 0.0).mean().item()
            ent = sum(unigram_entropy(r) for r in x.cpu()) / len(x)
            rows.append(dict(out_dir=out_dir, alpha_0=alpha_0, steps=steps, nfe=nfe, seconds=dt, seconds_uncached=dt_u,
                             same_tokens=bool(torch.equal(x, x_u)), gen_nll=gen_nll, entropy=ent))
            print(f"{out_dir:<34} {steps:>5} {nfe:>5} {dt:>8.2f} {dt_u:>9.2f} {gen_nll:>8.3f} {ent:>8.3f}", flush=True)
    return rows


def bench_linear(cfg, device):
    """The products of one cached sampling step (a few rows through every weight matrix of the fixed model),
    three ways: F.linear; model.Linear, i.e. (W xᵀ)ᵀ on contiguous x; and the raw (W xᵀ)ᵀ of a transposed x,
    which is what the MLP's second product received before Linear made its output contiguous."""
    torch.manual_seed(0)
    C = cfg.n_embd
    lins = [Linear(i, o, bias=False).to(device) for _ in range(cfg.n_layer) for o, i in
            ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C))]  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    mb = sum(lin.weight.numel() * lin.weight.element_size() for lin in lins) / 1e6
    ways = {"F.linear": lambda lin, x: F.linear(x, lin.weight), "model.Linear": lambda lin, x: lin(x),
            "(W xT)T, x transposed": lambda lin, x: lin.weight @ x.t().contiguous().t().t()}
    print(f"few-row products through all {len(lins)} weight matrices ({mb:.1f} MB) of a {cfg.n_layer} x {C} "
          f"model, {device}, {torch.get_num_threads()} threads; ms per pass and GB/s of weights read")
    print(f"{'rows':>4} " + " ".join(f"{w:>26}" for w in ways))
    rows = []
    with torch.inference_mode():
        for n in (1, 2, 4, 8, 16):
            xs = {i: torch.randn(n, i, device=device) for i in (C, 4 * C)}
            res = {}
            for name, fn in ways.items():
                run = lambda: [fn(lin, xs[lin.in_features]) for lin in lins]
                run()
                dt, _ = timed(lambda: [run() for _ in range(cfg.iters)], device)
                res[name] = dt / cfg.iters
            rows.append(dict(rows=n, **{k: v * 1000 for k, v in res.items()}))
            print(f"{n:>4} " + " ".join(f"{t * 1000:>12.2f} ms {mb / 1000 / t:>7.1f} GB/s" for t in res.values()),
                  flush=True)
    return rows


def main(argv=None):
    cfg = BenchConfig()
    parse_args(cfg, argv)
    device = pick_device(cfg.device)
    benches = {"sample": bench_sample, "train": bench_train, "frontier": bench_frontier, "linear": bench_linear}
    if cfg.what not in benches:
        raise UserError(f"--what={cfg.what} must be one of {', '.join(benches)}")
    rows = benches[cfg.what](cfg, device)
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
