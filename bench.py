"""
Benchmarks that print tables (timings live here, never in tests). Sampling follows the paper's latency protocol
(Sec. 5.3, Table 11: batch 1, T = 10^6 so that NFE ≈ L, nucleus off) on a fixed randomly initialised model
(speed does not depend on the weights):

    python bench.py                      # sampling: Eso-LM (B) cached vs MDLM vs AR decoding, L = 256, 1024
    python bench.py --what=train         # one training iteration: hybrid (α0=.5) vs diffusion (α0=1) vs AR
    python bench.py --what=frontier --out_dirs=out-a,out-b --scorer=out-ar   # speed-quality frontier
    python bench.py --what=prepare       # data.prepare on a generated ~200 MB text: MB/s and peak memory
    python bench.py --what=linear        # few-row products, F.linear vs (W xᵀ)ᵀ, and the layout sampling picks
    python bench.py --what=profile --lengths=1024   # where a cached sampling step's time goes (torch.profiler)
    python bench.py --what=profile --lengths=1024 --compile=True   # ... and the compiled static step beside it
    python bench.py --what=gpu           # the whole GPU report: Table 11's protocol, throughput, training

MDLM is the baseline the paper compares with: the same network with no attention mask (bidirectional), a full
forward over all L tokens at every step, no cache. Every one of its steps costs the same, so only --mdlm_steps
of them (128; 0: all) are timed and the total is their mean times NFE (said so in the table).
The frontier samples from each trained checkpoint at several step counts, then scores the samples with the
AR (α0=0) model: its mean NLL per token is a small "generative perplexity" (the paper uses GPT-2 Large),
shown next to the samples' unigram entropy so that repetitive text cannot look good.
"""
import json
import os
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from configurator import UserError, attention_backends, autocast_context, parse_args, pick_device, require, run_cli
from data import atomic_write, get_batch, load_checkpoint, load_split, prepare, tokenizer_of
from model import GPT, GPTConfig, Linear, few_rows_transposed, iw_nll, nelbo, sampling_products, shape_checks, unwrap
from sample import generate, new_cache, plan


@dataclass
class BenchConfig:
    what: str = "sample"  # sample, train, frontier, prepare, linear, profile or gpu
    lengths: str = "256,1024"  # sequence lengths for --what=sample (linear and profile: the last one)
    small_steps: int = 32  # the "small T" column
    sample_batch: int = 1  # --what=sample: sequences sampled at once (the paper's latency protocol: 1)
    mdlm_steps: int = 128  # --what=sample: time this many MDLM steps and scale to NFE (0: run them all)
    n_layer: int = 6  # the fixed model: nanoGPT's shakespeare_char size
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 65
    batch_size: int = 12  # --what=train
    block_size: int = 64  # --what=train
    iters: int = 20  # --what=train and linear: timed iterations per row (and round)
    rounds: int = 3  # --what=sample, train, linear, profile: interleaved rounds; medians and ratio ranges printed
    compile: bool = False  # torch.compile the model (sampling: CUDA graphs over static shapes)
    optimizer: str = "muon"  # --what=train: the recipe's (muon) or adamw
    out_dirs: str = ""  # --what=frontier: comma-separated checkpoints to sample from
    scorer: str = ""  # --what=frontier: the α0=0 checkpoint that scores samples
    steps_list: str = "8,16,32,64,L"  # --what=frontier
    num_samples: int = 64  # --what=frontier
    schedules: str = "random,strided"  # --what=frontier: the sampler's position schedules
    prepare_mb: int = 200  # --what=prepare: size of the generated text
    device: str = "cpu"  # cuda for the GPU report
    seed: int = 1337
    json_out: str = ""  # also write the rows as JSON here
    budget_s: int = 360  # --what=gpu: start no part of the report after this many seconds


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def sample_run(model, template, batch, steps, alpha_0, cfg, device, kv_cache=True):
    """(seconds, NFE) of one generate() call; with cfg.compile the static path, after two warm-up runs of the
    same schedule, so that every step shape is compiled, warmed up and recorded as a CUDA graph before the
    timed run (none of which is counted)."""
    ctx = autocast_context(device, "auto")[0]
    cache = new_cache(model, batch, len(template), device, ctx, static=True) if cfg.compile and kv_cache else None
    run = lambda: generate(model, template, batch, steps, alpha_0, top_p=1.0, kv_cache=kv_cache, seed=cfg.seed,
                           ctx=ctx, static=cfg.compile, cache=cache)
    for _ in range(2 if cfg.compile else 0):
        run()
    dt, (_, nfe) = timed(run, device)
    return dt, nfe


def mdlm_run(model, template, batch, steps, cfg, device):
    """MDLM's (seconds, NFE): all steps, or --mdlm_steps of them scaled to NFE (every step is a full forward
    over all L tokens, so they all cost the same). NFE is that of the schedule generate() draws for this seed
    (one window: its first plan), as empty steps are dropped."""
    L = len(template)
    is_gen = template.cpu() == unwrap(model).config.mask_id
    nfe = len(plan(is_gen, batch, steps, 1.0, torch.Generator().manual_seed(cfg.seed))[1])
    if not cfg.mdlm_steps or cfg.mdlm_steps >= nfe:
        return (*sample_run(model, template, batch, steps, 1.0, cfg, device, kv_cache=False), "")
    part = template.clone()
    part[: L - cfg.mdlm_steps] = 0  # all but mdlm_steps positions given: the same full forwards, fewer of them
    dt, n = sample_run(model, part, batch, 10 ** 6, 1.0, cfg, device, kv_cache=False)
    return dt / n * nfe, nfe, f" ({n} steps timed)"


def bench_sample(cfg, device):
    """Eso-LM (B) with its KV cache, MDLM, and AR decoding through the same cache, at NFE ≈ L and at a small T.
    The samplers take turns for --rounds rounds, so that drift on a shared machine hits them alike: each row is
    the median of its rounds, and the speed-up over MDLM the median of the rounds' ratios, with their range."""
    rows = []
    dtype = autocast_context(device, "auto")[1]
    print(f"sampling, batch {cfg.sample_batch}, {cfg.n_layer} layers x {cfg.n_embd} wide, {device} {dtype}"
          f"{', compiled' if cfg.compile else ''}{' (CUDA graphs)' if cfg.compile and 'cuda' in device else ''}, "
          f"{torch.get_num_threads()} threads, median of "
          f"{cfg.rounds} interleaved rounds")
    print(f"{'L':>5} {'sampler':<40} {'NFE':>5} {'seconds':>8} {'ms/step':>8} {'tokens/s':>9}")
    cached, mdlm_name = "Eso-LM (B), KV cache", "MDLM, full forward every step"
    ar_name = "AR decoding, same cache (α0=0)"
    for L in map(int, cfg.lengths.split(",")):
        torch.manual_seed(0)
        model = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device).eval()
        mdlm = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, denoiser="mdlm")).to(device)
        mdlm.load_state_dict(model.state_dict())
        template = torch.full((L,), model.config.mask_id, device=device)
        if cfg.compile:  # (sample_run warms up each compiled schedule itself)
            model, mdlm = (torch.compile(m.eval(), mode="reduce-overhead") for m in (model, mdlm))
        else:
            generate(model, template[:64], 1, 10 ** 6, 1.0)  # warm-up: allocator, thread pool, caches
        B = cfg.sample_batch
        for steps, label in ((10 ** 6, "NFE=L"), (cfg.small_steps, f"T={cfg.small_steps}")):
            runs = {cached: lambda: (*sample_run(model, template, B, steps, 1.0, cfg, device), ""),
                    mdlm_name: lambda: mdlm_run(mdlm, template, B, steps, cfg, device)}
            if label == "NFE=L":
                runs[ar_name] = lambda: (*sample_run(model, template, B, steps, 0.0, cfg, device), "")
            times, info = {name: [] for name in runs}, {}
            for _ in range(cfg.rounds):
                for name, fn in runs.items():
                    dt, *info[name] = fn()  # (NFE, note) are the same every round
                    times[name].append(dt)
            for name, dts in times.items():
                (nfe, note), dt = info[name], statistics.median(dts)
                rows.append(dict(L=L, batch=B, n_layer=cfg.n_layer, n_embd=cfg.n_embd, schedule=label, sampler=name,
                                 nfe=nfe, seconds=dt, seconds_rounds=dts, ms_per_step=dt / nfe * 1000,
                                 tokens_per_s=B * L / dt, extrapolated=bool(note)))
                print(f"{L:>5} {name + ', ' + label:<40} {nfe:>5} {dt:>8.2f} {dt / nfe * 1000:>8.3f} "
                      f"{B * L / dt:>9.1f}{note}", flush=True)
            ratios = sorted(m / c for m, c in zip(times[mdlm_name], times[cached]))
            cached_row = rows[-len(runs)]  # the first of these rows
            cached_row.update(speedup=statistics.median(ratios), speedup_min=ratios[0], speedup_max=ratios[-1])
            per_ar = sorted(c / a for c, a in zip(times[cached], times.get(ar_name, [])))  # per round, as above
            extra = (f", cached / AR {statistics.median(per_ar):.2f} [{per_ar[0]:.2f}-{per_ar[-1]:.2f}]"
                     if per_ar else "")
            speedup = statistics.median(ratios)
            how = f"{speedup:.1f}x faster than MDLM" if speedup >= 1 else f"slower than MDLM, {speedup:.2f}x its speed"
            print(f"{'':>5} -> {label}: Eso-LM (B) cached is {how} [{ratios[0]:.1f}-{ratios[-1]:.1f}]{extra}")
    return rows


GPU_LATENCY = [((6, 6, 384), 1024, 1, 128), ((12, 12, 768), 2048, 1, 128), ((12, 12, 768), 8192, 1, 128),
               ((6, 6, 384), 1024, 64, 64)]  # (layers, heads, width), L, batch, MDLM steps timed (each costs the same)
GPU_SAMPLE_DEFAULTS = dict(L=256, size=(6, 6, 384), num_samples=4, steps=32, alpha_0=0.5)  # sample.py's defaults
GPU_TRAIN = dict(batch_size=64, block_size=256, n_layer=6, n_head=6, n_embd=384)  # the GPU preset


def bench_gpu(cfg, device):
    """One command, the whole GPU report: the paper's latency protocol (Table 11: batch 1, NFE ≈ L) at its model
    size (12 x 768) for L = 2048 and 8192 and at 6 x 384 for L = 1024; one batch-64 throughput row; the default
    `sample.py --steps 32` workload (4 samples of 256 tokens); one training iteration at the GPU preset. On CUDA
    everything is compiled (CUDA graphs for sampling), as train.py and sample.py do by default. Each part starts
    with a fresh torch.compile (Dynamo's recompile limit counts across model instances), a silent fall back to
    eager is an error, and each part says how many graphs it compiled; past --budget_s seconds, the parts left
    are listed as not timed."""
    import torch._dynamo
    if not device.startswith("cuda"):
        print(f"note: --what=gpu is meant for a CUDA GPU; running it on {device}")
    compiled = cfg.compile or device.startswith("cuda")
    d, t_start, rows = GPU_SAMPLE_DEFAULTS, time.perf_counter(), []
    parts = [(f"latency, {n_layer} x {n_embd}, L={L}, batch {batch}",
              lambda n_layer=n_layer, n_head=n_head, n_embd=n_embd, L=L, batch=batch, steps=steps: [
                  dict(r, table="latency" if batch == 1 else "throughput") for r in bench_sample(replace(
                      cfg, n_layer=n_layer, n_head=n_head, n_embd=n_embd, lengths=str(L), sample_batch=batch,
                      mdlm_steps=steps, compile=compiled, rounds=1), device)])
             for (n_layer, n_head, n_embd), L, batch, steps in GPU_LATENCY]
    parts.append((f"the default `python sample.py --steps {d['steps']}` workload: {d['num_samples']} samples of "
                  f"{d['L']} tokens, {d['size'][0]} x {d['size'][2]}, alpha_0={d['alpha_0']}",
                  lambda: sample_defaults(cfg, device, compiled)))
    parts.append(("training", lambda: [dict(r, table="train") for r in
                                       bench_train(replace(cfg, **GPU_TRAIN, compile=compiled), device)]))
    for name, part in parts:
        if time.perf_counter() - t_start > cfg.budget_s:
            print(f"\n{name}: not timed (the {cfg.budget_s} s budget is spent)")
            rows.append(dict(table=name, timed=False, reason="budget"))
            continue
        print(f"\n{name}")
        torch._dynamo.reset()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never eager while labelled compiled
                part_rows = part()
        except Exception as e:
            print(f"  not timed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            rows.append(dict(table=name, timed=False, reason=f"{type(e).__name__}: {e}"[:500]))
            continue
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        print(f"  {'compiled: ' + str(graphs) + ' graphs' if compiled else 'not compiled'}")
        rows += [dict(r, compiled=compiled, graphs=graphs) for r in part_rows]
    print(f"\nthe whole report took {time.perf_counter() - t_start:.0f} s")
    return rows


def sample_defaults(cfg, device, compiled):
    d = GPU_SAMPLE_DEFAULTS
    torch.manual_seed(0)
    model = GPT(GPTConfig(d["L"], cfg.vocab_size, *d["size"])).to(device).eval()
    template = torch.full((d["L"],), model.config.mask_id, device=device)
    net = torch.compile(model, mode="reduce-overhead") if compiled else model
    t0 = time.perf_counter()
    dt, nfe = sample_run(net, template, d["num_samples"], d["steps"], d["alpha_0"], replace(cfg, compile=compiled),
                         device)
    print(f"  NFE {nfe}: {dt:.3f} s of sampling ({time.perf_counter() - t0 - dt:.1f} s of warm-up before it)")
    return [dict(table="sample.py defaults", nfe=nfe, seconds=dt)]


def bench_train(cfg, device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device)
    opts = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.split(":")[0], cfg.optimizer)
    net = torch.compile(model) if cfg.compile else model
    ctx, dtype = autocast_context(device, "auto")
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    print(f"one training iteration (forward, backward, {cfg.optimizer}), batch {cfg.batch_size} x {cfg.block_size}, "
          f"{cfg.n_layer} layers x {cfg.n_embd} wide, {device} {dtype}{', compiled' if cfg.compile else ''}; "
          f"median of {cfg.rounds} interleaved rounds of {cfg.iters} iterations, ratio range in brackets")
    names = {1.0: "diffusion, α0=1", 0.5: "hybrid, α0=0.5", 0.0: "AR, α0=0"}

    def step(alpha_0):
        with ctx, attention_backends(device):
            loss, _ = nelbo(net, x, alpha_0)
        loss.backward()
        for opt in opts:
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
    scorer = GPT.from_checkpoint(scorer_ckpt, device).eval()
    ckpts = {out_dir: load_checkpoint(out_dir, device) for out_dir in cfg.out_dirs.split(",")}
    for out_dir, ckpt in ckpts.items():  # a scorer reads the samples' token ids as its own, within its block
        if tokenizer_of(ckpt["meta"]) != tokenizer_of(scorer_ckpt["meta"]):
            raise UserError(f"{out_dir} and the scorer {cfg.scorer} have different tokenizers; score with an "
                            "alpha_0=0 model of the same dataset")
        if ckpt["model_args"]["block_size"] > scorer.config.block_size:
            raise UserError(f"{out_dir} samples {ckpt['model_args']['block_size']} tokens, more than the scorer's "
                            f"block size {scorer.config.block_size}")
    scfg = scorer_ckpt["config"]
    if tokenizer_of(prepare(scfg["dataset"], scfg["data_dir"])) != tokenizer_of(scorer_ckpt["meta"]):
        raise UserError(f"the scorer {cfg.scorer} was trained with another tokenizer than {scfg['data_dir']}/"
                        f"{scfg['dataset']}/meta.pkl (its input.txt has changed since?): its val text cannot be scored")
    val = load_split(scfg["dataset"], "val", scfg["data_dir"])
    real = get_batch(val, cfg.num_samples, scorer.config.block_size, device, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        real_nll = iw_nll(scorer, real, 0.0).mean().item()
    real_ent = sum(unigram_entropy(r) for r in real.cpu()) / len(real)
    rows = [dict(out_dir="val text", denoiser=None, alpha_0=None, schedule=None, steps=None, nfe=None, seconds=None,
                 seconds_uncached=None, same_tokens=None, gen_nll=real_nll, entropy=real_ent)]
    print(f"reference, {cfg.num_samples} windows of real val text: NLL {real_nll:.3f}, entropy {real_ent:.3f}")
    print(f"{cfg.num_samples} samples each; seconds cached and uncached; gen NLL: nats/token under {cfg.scorer}")
    print(f"{'checkpoint':<40} {'schedule':>8} {'T':>5} {'NFE':>5} {'cached':>8} {'uncached':>9} {'gen NLL':>8} "
          f"{'entropy':>8}")
    for out_dir, ckpt in ckpts.items():
        model = GPT.from_checkpoint(ckpt, device).eval()
        L, alpha_0 = model.config.block_size, ckpt["config"]["alpha_0"]
        template = torch.full((L,), model.config.mask_id, device=device)
        for schedule in cfg.schedules.split(","):
            if alpha_0 == 0 and schedule != "random":  # AR: one schedule only, left to right
                continue
            for steps in dict.fromkeys(L if s == "L" else int(s) for s in cfg.steps_list.split(",")):  # T = L once
                run = lambda kv: generate(model, template, cfg.num_samples, steps, alpha_0, kv_cache=kv,
                                          seed=cfg.seed, schedule=schedule)
                dt, (x, nfe) = timed(lambda: run(True), device)
                dt_u, (x_u, _) = timed(lambda: run(False), device)
                with torch.no_grad():
                    gen_nll = iw_nll(scorer, x, 0.0).mean().item()
                ent = sum(unigram_entropy(r) for r in x.cpu()) / len(x)
                rows.append(dict(out_dir=out_dir, denoiser=model.config.denoiser, alpha_0=alpha_0, schedule=schedule,
                                 steps=steps, nfe=nfe, seconds=dt, seconds_uncached=dt_u,
                                 same_tokens=bool(torch.equal(x, x_u)), gen_nll=gen_nll, entropy=ent))
                print(f"{out_dir:<40} {schedule:>8} {steps:>5} {nfe:>5} {dt:>8.2f} {dt_u:>9.2f} {gen_nll:>8.3f} "
                      f"{ent:>8.3f}", flush=True)
    return rows


def bench_prepare(cfg, device):
    """data.prepare on a generated text of ~prepare_mb MB (Tiny Shakespeare's lines, shuffled), in a fresh
    process: MB/s and its peak memory; beside it, tiktoken's own batch encoder on the same text, in memory and
    cut into the same pieces, on all cores (the speed to compare with)."""
    import random
    import subprocess
    import sys
    import tempfile
    prepare("shakespeare")  # the lines to shuffle (downloaded if missing)
    lines = open(os.path.join("data", "shakespeare", "input.txt"), encoding="utf-8").read().splitlines(keepends=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "big"))
        path = os.path.join(tmp, "big", "input.txt")
        rng, size = random.Random(cfg.seed), 0
        with open(path, "w", encoding="utf-8") as f:
            while size < cfg.prepare_mb * 1e6:
                chunk = "".join(rng.choices(lines, k=10000))
                f.write(chunk)
                size += len(chunk.encode())
        mb = size / 1e6
        code = {"prepare": f"import time, data; t0 = time.perf_counter(); data.prepare('big', {tmp!r}); "
                           "print(time.perf_counter() - t0)",
                "tiktoken": f"import os, time, data; text = open({path!r}, encoding='utf-8').read(); "
                            "enc = data.gpt2_encoding(); pieces = [text[i: i + data.PIECE] for i in "
                            "range(0, len(text), data.PIECE)]; t0 = time.perf_counter(); "
                            "enc.encode_ordinary_batch(pieces, num_threads=os.cpu_count()); "
                            "print(time.perf_counter() - t0)"}
        rows = []
        print(f"a {mb:.0f} MB text (Tiny Shakespeare's lines, shuffled), {os.cpu_count()} cores")
        for name, src in code.items():
            out = subprocess.run([sys.executable, "-c", f"{src}\nimport resource; print(resource.getrusage("
                                  "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
            if out.returncode:
                raise UserError(f"{name} failed: {out.stderr.strip().splitlines()[-1]}")
            peak = int(out.stdout.split()[-1]) / 1024  # ru_maxrss is in KB on Linux
            dt = float(out.stdout.split()[0])
            rows.append(dict(what=name, mb=mb, seconds=dt, mb_per_s=mb / dt, peak_mb=peak))
            label = ("data.prepare: read, count, encode, renumber, write" if name == "prepare" else
                     "tiktoken encode_ordinary_batch alone (text already in memory)")
            print(f"  {label:<66} {dt:7.1f} s {mb / dt:7.1f} MB/s, peak memory {peak:7.0f} MB", flush=True)
        print(f"  -> prepare reaches {rows[0]['mb_per_s'] / rows[1]['mb_per_s']:.0%} of tiktoken's MB/s")
    return rows


# ops that make a view, allocate, or pass their input through: no kernel runs (on a GPU, none is launched)
NO_KERNEL = frozenset(f"aten::{op}" for op in (
    "view as_strided transpose t permute slice select expand expand_as unsqueeze squeeze alias reshape _unsafe_view "
    "flatten narrow resolve_conj resolve_neg empty empty_like empty_strided resize_ as_strided_ lift_fresh detach "
    "contiguous to dropout result_type").split())


def kernels(events):
    """How many of the profiled events ran a kernel: an aten op outside NO_KERNEL, or one of Inductor's fused C++
    kernels, that calls none itself (aten::layer_norm calls native_layer_norm, which is counted once)."""
    def runs(e):
        return (e.name.startswith("aten::") and e.name not in NO_KERNEL) or "cpp_fused" in e.name

    def calls_one(e):  # (at any depth)
        return any(runs(c) or calls_one(c) for c in e.cpu_children)
    return sum(runs(e) and not calls_one(e) for e in events)


def bench_profile(cfg, device):
    """Where the time of a cached sampling step goes (Eso-LM (B), batch 1, NFE ≈ L, L the last of --lengths):
    under torch.profiler, the op calls per step (nested ones counted), how many of them run a kernel, and ms per
    step by op (CPU-side: on a GPU that is launch overhead); then, unprofiled, in --rounds interleaved rounds: the
    step, its weight products alone (the same Linear modules, rows and layout: the step's floor), and AR decoding
    through the same cache; with --compile=True also the static-shape step of sample.py --compile=True, eager and
    compiled (on the CPU, its op calls and kernels counted as the eager step's)."""
    L = int(cfg.lengths.split(",")[-1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device).eval()
    template = torch.full((L,), model.config.mask_id, device=device)
    step = lambda alpha_0=1.0: generate(model, template, 1, 10 ** 6, alpha_0, top_p=1.0)[1]
    generate(model, template[:64], 1, 10 ** 6, 1.0)  # warm-up, as bench_sample
    with torch.profiler.profile() as prof:
        nfe = step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    per_step = {e.key: e.self_cpu_time_total / 1000 / nfe for e in ops}  # ms per step
    group = lambda key: ("matrix products" if key in ("aten::mm", "aten::addmm", "aten::bmm") else
                         "attention" if "scaled_dot_product" in key else "everything else")
    groups = {}
    for key, ms in per_step.items():
        groups[group(key)] = groups.get(group(key), 0) + ms
    calls, launched = len(prof.events()) / nfe, kernels(prof.events()) / nfe
    mm_calls = sum(e.count for e in ops if group(e.key) == "matrix products") / nfe
    print(f"one cached sampling step, L={L}, NFE={nfe}, {cfg.n_layer} x {cfg.n_embd}, {device}, "
          f"{torch.get_num_threads()} threads: {calls:.0f} op calls (nested ones counted), {launched:.0f} of which run "
          f"a kernel (the rest make views or allocate); under torch.profiler {sum(per_step.values()):.2f} ms, of which")
    for name, ms in groups.items():
        print(f"  {name:<20} {ms:7.3f} ms")
    print(f"  {'op':<52} {'ms/step':>8} {'calls/step':>10}")
    for e in ops[:12]:
        print(f"  {e.key[:52]:<52} {per_step[e.key]:8.3f} {e.count / nfe:10.1f}")
    # a step's products: every layer's c_attn on the 2 fed tokens, the rest on 2 rows, but the last layer's, which
    # computes only the mask's row, as does lm_head
    h = model.transformer.h
    lins = [(lin, 1 if i == len(h) - 1 and lin is not blk.attn.c_attn else 2) for i, blk in enumerate(h)
            for lin in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)] + [(model.lm_head, 1)]
    xs = [torch.randn(1, rows, lin.in_features, device=device) for lin, rows in lins]

    def products(n=100):
        with torch.inference_mode(), sampling_products():  # in the layout the sampler uses
            for _ in range(n):
                for (lin, _), x in zip(lins, xs):
                    lin(x)
        return n
    runs = {"step": step, "products alone": products, "AR step": lambda: step(0.0)}
    if cfg.compile:  # the GPU path's step (static shapes, as sample.py --compile=True), eager and compiled
        static_run, net, compiled_counts = compiled_static_step(model, template, device)
        runs.update({"static step, eager": lambda: static_run(model), "static step, compiled": lambda: static_run(net)})
    ms = {name: [] for name in runs}
    for _ in range(cfg.rounds):
        for name, fn in runs.items():
            dt, n = timed(fn, device)
            ms[name].append(dt / n * 1000)
    ratio = lambda a, b: sorted(x / y for x, y in zip(ms[a], ms[b]))  # per round: drift hits both alike
    said = lambda r: f"{statistics.median(r):.2f}x [{r[0]:.2f}-{r[-1]:.2f}]"
    floor, ar = ratio("step", "products alone"), ratio("step", "AR step")
    print(f"unprofiled, median of {cfg.rounds} interleaved rounds: " +
          ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in ms.items()) +
          f"; the step is {said(floor)} its products alone and {said(ar)} an AR step")
    row = dict(L=L, nfe=nfe, op_calls_per_step=calls, kernels_per_step=launched, products_per_step=mm_calls,
               **{f"{k} ms": v for k, v in groups.items()}, **{f"{k} ms rounds": v for k, v in ms.items()},
               step_over_products=statistics.median(floor), step_over_ar=statistics.median(ar))
    if cfg.compile:
        compiled, static = ratio("static step, compiled", "step"), ratio("static step, eager", "step")
        print(f"the compiled static step is {said(compiled)} the eager step; run eagerly, the static step (a padded "
              f"chunk, all {L} cache slots read) is {said(static)} it")
        row.update(compiled_over_eager=statistics.median(compiled), static_over_eager=statistics.median(static))
        row.update(compiled_counts)
    return [row]


def compiled_static_step(model, template, device):
    """The static-shape sampling step of sample.py --compile=True: (run(net) -> NFE, the compiled net, and on the
    CPU its op calls and kernels per step, counted as bench_profile counts the eager step's)."""
    cache = new_cache(model, 1, len(template), device, static=True)
    static_run = lambda net: generate(net, template, 1, 10 ** 6, 1.0, top_p=1.0, static=True, cache=cache)[1]
    net = torch.compile(model, mode="reduce-overhead")
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):  # C++ kernels seen by the profiler
        for _ in range(2):  # as sample.py: every step shape compiled and warmed up before anything is timed
            static_run(net)
    if device != "cpu":  # (on a GPU the profiler would see one CUDA graph replay per step)
        return static_run, net, {}
    with torch.profiler.profile() as prof:
        steps = static_run(net)
    fused = sum("cpp_fused" in e.name for e in prof.events()) / steps
    counts = dict(compiled_op_calls_per_step=len(prof.events()) / steps,
                  compiled_kernels_per_step=kernels(prof.events()) / steps)
    print(f"the compiled static step: {counts['compiled_op_calls_per_step']:.0f} op calls, "
          f"{counts['compiled_kernels_per_step']:.0f} of which run a kernel ({fused:.0f} of Inductor's fused C++ "
          "kernels, the rest products, attention and sampling)")
    return static_run, net, counts


def bench_linear(cfg, device):
    """The products of one cached sampling step (a few rows through every weight matrix of the fixed model) as
    F.linear and as (W xᵀ)ᵀ, which round differently and whose speed at 2 to 8 rows depends on the machine; the
    layout model.Linear takes on this machine when sampling; then a whole cached sampling step at L (the last of
    --lengths) with every such product in each layout."""
    import model as model_module
    torch.manual_seed(0)
    C = cfg.n_embd
    lins = [Linear(i, o, bias=False).to(device) for _ in range(cfg.n_layer) for o, i in
            ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C))]  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    mb = sum(lin.weight.numel() * lin.weight.element_size() for lin in lins) / 1e6
    ways = {"F.linear": lambda lin, x: F.linear(x, lin.weight), "(W xT)T": lambda lin, x: lin.transposed(x)}
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
    choice = model_module.few_rows_transposed()
    print(f"this machine (CPU {model_module.cpu_vendor() or 'unknown'}, MKL {torch.backends.mkl.is_available()}): "
          f"sampling computes 2 to 8 rows as {'(W xT)T' if choice else 'F.linear'}; ESO_LM_FEW_ROWS overrides it")
    L = int(cfg.lengths.split(",")[-1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device).eval()
    template = torch.full((L,), model.config.mask_id, device=device)
    generate(model, template, 1, 10 ** 6, 1.0)  # warm-up
    ms = {"F.linear": [], "(W xT)T": []}
    try:
        for _ in range(cfg.rounds):
            for name, transposed in zip(ms, (False, True)):
                model_module.few_rows_transposed = lambda: transposed  # what sampling_products asks
                dt, (_, nfe) = timed(lambda: generate(model, template, 1, 10 ** 6, 1.0, top_p=1.0), device)
                ms[name].append(dt / nfe * 1000)
    finally:
        model_module.few_rows_transposed = few_rows_transposed
    print(f"a cached sampling step, L={L}, every few-row product in one layout, {cfg.rounds} interleaved rounds: "
          + ", ".join(f"{name} {statistics.median(v):.2f} ms [{min(v):.2f}-{max(v):.2f}]" for name, v in ms.items()))
    rows.append(dict(rows="this machine", transposed=choice))
    rows += [dict(rows="sampling step", L=L, layout=name, ms_per_step=v) for name, v in ms.items()]
    return rows


def validate(cfg, benches):
    """The flags' values, checked before anything is timed, each wrong one as one line."""
    numbers = lambda text, extra=(): all(s.strip() in extra or (s.strip().isdigit() and int(s) >= 1)
                                         for s in text.split(","))
    checks = [(cfg.what in benches, f"--what={cfg.what} must be one of {', '.join(benches)}"),
              (numbers(cfg.lengths), f"--lengths={cfg.lengths} must be positive integers separated by commas"),
              (numbers(cfg.steps_list, ("L",)), f"--steps_list={cfg.steps_list} must be positive integers or L, "
               "separated by commas"),
              (min(cfg.rounds, cfg.iters, cfg.small_steps, cfg.sample_batch, cfg.num_samples, cfg.prepare_mb) >= 1
               and max(cfg.sample_batch, cfg.num_samples) < 2 ** 31, "--rounds, --iters, --small_steps, "
               "--sample_batch, --num_samples and --prepare_mb must be positive (--sample_batch and --num_samples "
               "below 2**31)"),
              (cfg.mdlm_steps >= 0, f"--mdlm_steps={cfg.mdlm_steps} must be >= 0 (0: all of them)"),
              *shape_checks(cfg), (cfg.vocab_size >= 1 and cfg.batch_size >= 1,
                                   "--vocab_size and --batch_size must be positive"),
              (set(cfg.schedules.split(",")) <= {"random", "strided"}, f"--schedules={cfg.schedules} must be random, "
               "strided or both, separated by a comma"),
              (not cfg.json_out or os.path.isdir(os.path.dirname(os.path.abspath(cfg.json_out)))
               and not os.path.isdir(cfg.json_out), f"--json_out={cfg.json_out} must name a file in a folder that "
               "exists")]
    require(checks)
    few_rows_transposed()


def main(argv=None):
    cfg = BenchConfig()
    parse_args(cfg, argv)
    benches = {"sample": bench_sample, "train": bench_train, "frontier": bench_frontier, "linear": bench_linear,
               "prepare": bench_prepare, "gpu": bench_gpu, "profile": bench_profile}
    validate(cfg, benches)
    device = pick_device(cfg.device)
    rows = benches[cfg.what](cfg, device)
    if cfg.json_out:
        atomic_write(cfg.json_out, lambda f: json.dump(rows, f, indent=1), "w")


if __name__ == "__main__":
    run_cli(main)
