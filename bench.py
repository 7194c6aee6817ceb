"""
Benchmarks that print tables (timings live here, never in tests); --json_out keeps every row, written as soon as
it is measured. Sampling follows the paper's latency protocol (Sec. 5.3, Table 11: batch 1, T = 10^6 so that
NFE ≈ L, nucleus off) on a fixed randomly initialised model (speed does not depend on the weights).
The modes (--what), and about how long each takes with its defaults on a 2-core laptop CPU:

  sample    Eso-LM (B) cached vs MDLM vs AR decoding, L = 256 and 1024, NFE ≈ L and T = 32 (3 min)
  train     one training iteration, batch 12 x 64: diffusion (α0=1), hybrid (α0=0.5), AR (3 min)
  frontier  the speed-quality frontier of trained checkpoints: --out_dirs=out-a,out-b --scorer=out-ar
            (under a minute for five char checkpoints)
  profile   where a cached sampling step's time goes, at the last of --lengths, and the step with its few-row
            products in the other layout (2 min); --compile=True adds the compiled static-shape step (with
            --rounds=7, 5 min)
  gpu       the GPU report (--device=cuda): sample.py's workload, a training iteration, Table 11 at 6 x 384 and
            12 x 768 (it stops when --budget_s, 6 min, would be passed)

Data preparation has no mode: BENCHMARKS.md times it with two shell commands, in a fresh process, on a
generated ~200 MB text.

The rows of a table take turns in interleaved rounds (`interleaved`), so that drift on a shared machine hits them
alike: a row is the median of its rounds, a ratio the median of the rounds' ratios, with their range.
MDLM is the baseline the paper compares with: the same network with no attention mask (bidirectional), a full
forward over all L tokens at every step, no cache. Its steps all cost the same, so only --mdlm_steps of them are
timed and the total is their mean times NFE (said so in the table).
The frontier samples from each trained checkpoint at several step counts and scores the samples with the AR
(α0 = 0) model: their NLL per token is a small "generative perplexity" (the paper uses GPT-2 Large), shown beside
their unigram entropy, so that repetitive text cannot look good.
"""
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from unittest import mock

import torch
from torch._dynamo.utils import counters

from configurator import attention_backends, autocast_context, parse_args, pick_device, require, run_cli
from data import atomic_write, load_checkpoint, tokenizer_of
from model import GPT, GPTConfig, cast_matrices, few_rows_transposed, iw_nll, nelbo, shape_checks
from sample import generate, plan, runner


@dataclass
class BenchConfig:
    what: str = "sample"  # sample, train, frontier, profile or gpu (--help says what each times)
    lengths: str = "256,1024"  # sequence lengths for --what=sample (profile: the last one)
    small_steps: int = 32  # the "small T" column
    sample_batch: int = 1  # --what=sample: sequences sampled at once (the paper's latency protocol: 1)
    mdlm_steps: int = 128  # --what=sample: time this many MDLM steps and scale to NFE (0: run them all)
    n_layer: int = 6  # the fixed model: nanoGPT's shakespeare_char size
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 65  # the char checkpoint's
    batch_size: int = 12  # --what=train
    block_size: int = 64  # --what=train
    iters: int = 20  # --what=train: timed iterations per row and round
    rounds: int = 3  # interleaved rounds; medians and ratio ranges printed (--what=gpu: 1)
    compile: bool = False  # torch.compile the model (sampling: CUDA graphs over static shapes)
    out_dirs: str = ""  # --what=frontier: comma-separated checkpoints to sample from
    scorer: str = ""  # --what=frontier: the α0=0 checkpoint that scores samples
    steps_list: str = "8,16,32,64,L"  # --what=frontier
    num_samples: int = 64  # --what=frontier
    schedules: str = "random,strided"  # --what=frontier: the sampler's position schedules
    device: str = "cpu"  # cuda for the GPU report
    seed: int = 1337
    json_out: str = ""  # also write the rows as JSON here, after every row
    budget_s: int = 360  # --what=gpu: time no more rows once the time spent and the last rows' pass this


# -----------------------------------------------------------------------------
# the timing harness, and what every mode samples with

def clock(device):
    """time.perf_counter() once the chosen GPU is idle (a bare synchronize() would wait on the current one)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def interleaved(fns, rounds, device):
    """Each fn once per round, in turn, so that drift on a shared machine hits them alike: ({name: seconds per
    round}, {name: its last output})."""
    times, outs = {name: [] for name in fns}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock(device)
            outs[name] = fn()
            times[name].append(clock(device) - t0)
    return times, outs


def ratio(a, b, key):
    """The per-round ratios a / b: {key: their median, key_min, key_max}, and 'median x [min-max]'."""
    r = sorted(x / y for x, y in zip(a, b))
    m = statistics.median(r)
    return {key: m, f"{key}_min": r[0], f"{key}_max": r[-1]}, f"{m:.2f}x [{r[0]:.2f}-{r[-1]:.2f}]"


def compiled(model, training=False):
    """torch.compile as train.py (dynamic shapes) or sample.py (CUDA graphs) does, but a graph break or Dynamo's
    recompile limit is an error (fullgraph), never a silent fall back to eager."""
    return torch.compile(model, fullgraph=True, **dict(dynamic=True) if training else dict(mode="reduce-overhead"))


def fixed_model(cfg, device, L, denoiser="B"):
    """The fixed random model for sampling (seed 0: the same weights for every denoiser; bf16 matrices where
    autocast is bf16, as sample.py loads it) at block size L, and L masks."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(L, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, denoiser=denoiser)).to(device)
    if autocast_context(device, "auto")[1] == "bfloat16":
        cast_matrices(model, torch.bfloat16)
    return model.eval(), torch.full((L,), model.config.mask_id, device=device)


def sampler(net, template, batch, steps, alpha_0, cfg, device, top_p=1.0):
    """A generate() run -> its NFE; with --compile, sample.py --compile's static path (sample.runner), warmed up."""
    run = runner(net, template, batch, autocast_context(device, "auto")[0], cfg.compile, steps=steps, alpha_0=alpha_0,
                 top_p=top_p, seed=cfg.seed)
    return lambda: run()[1]


# -----------------------------------------------------------------------------
# sampling: Eso-LM (B) against MDLM and AR decoding

CACHED, MDLM, AR = "Eso-LM (B), KV cache", "MDLM, full forward every step", "AR decoding, same cache (α0=0)"


def bench_sample(cfg, device):
    """Eso-LM (B) with its KV cache, MDLM, and AR decoding through the same cache, at NFE ≈ L and at a small T,
    on the same fixed weights: for each L of --lengths and each T, the rows timed together."""
    print(f"sampling, batch {cfg.sample_batch}, {cfg.n_layer} x {cfg.n_embd}, {device}, {torch.get_num_threads()} "
          f"threads{', compiled' if cfg.compile else ''}, median of {cfg.rounds} rounds\n{'L':>5} {'sampler':<40} "
          f"{'NFE':>5} {'seconds':>8} {'ms/step':>8} {'tokens/s':>9}")
    for L in map(int, cfg.lengths.split(",")):
        (model, template), (mdlm, _) = fixed_model(cfg, device, L), fixed_model(cfg, device, L, "mdlm")
        if cfg.compile:
            torch._dynamo.reset()  # Dynamo's recompile limit counts across lengths and model instances
            model, mdlm = compiled(model), compiled(mdlm)
        else:
            generate(model, template[:64], 1, 10 ** 6, 1.0)  # warm-up: allocator, thread pool, caches
        for steps, label in ((10 ** 6, "NFE=L"), (cfg.small_steps, f"T={cfg.small_steps}")):
            yield sample_group(cfg, device, model, mdlm, template, steps, label)


def sample_group(cfg, device, model, mdlm, template, steps, label):
    """Eso-LM (B) cached, MDLM and, at NFE = L, AR decoding, in --rounds interleaved rounds. MDLM's NFE is that of
    the schedule generate() draws for this seed; past --mdlm_steps, only that many positions are masked (the same
    full forwards, fewer of them) and its time is scaled to NFE."""
    B, L = cfg.sample_batch, len(template)
    nfe = len(plan(torch.ones(L, dtype=torch.bool), B, steps, 1.0, torch.Generator().manual_seed(cfg.seed))[1])
    k = cfg.mdlm_steps if cfg.mdlm_steps < nfe else 0  # 0: all of them
    part = template.clone()
    part[: L - k if k else 0] = 0  # all but k positions given: k of the same full forwards
    runs = {CACHED: sampler(model, template, B, steps, 1.0, cfg, device),
            MDLM: sampler(mdlm, part, B, 10 ** 6 if k else steps, 1.0, cfg, device)}
    if label == "NFE=L":
        runs[AR] = sampler(model, template, B, steps, 0.0, cfg, device)
    times, nfes = interleaved(runs, cfg.rounds, device)
    if k:
        times[MDLM], nfes[MDLM] = [t / nfes[MDLM] * nfe for t in times[MDLM]], nfe
    rows = []
    for name, dts in times.items():
        dt, n, note = statistics.median(dts), nfes[name], f" ({k} steps timed)" if name == MDLM and k else ""
        print(f"{L:>5} {name + ', ' + label:<40} {n:>5} {dt:>8.2f} {dt / n * 1000:>8.3f} {B * L / dt:>9.1f}{note}",
              flush=True)
        rows.append(dict(L=L, batch=B, n_layer=cfg.n_layer, n_embd=cfg.n_embd, schedule=label, sampler=name, nfe=n,
                         seconds=dt, seconds_rounds=dts, ms_per_step=dt / n * 1000, tokens_per_s=B * L / dt,
                         extrapolated=bool(note)))
    speedup, text = ratio(times[MDLM], times[CACHED], "speedup")
    rows[0].update(speedup)
    ar = f", cached / AR {ratio(times[CACHED], times[AR], '')[1]}" if AR in times else ""
    print(f"{'':>5} -> {label}: Eso-LM (B) cached over MDLM {text}{ar}")
    return rows


# -----------------------------------------------------------------------------
# training, the frontier

def bench_train(cfg, device):
    """One training iteration (forward, backward, Muon) at α0 = 1, 0.5, 0: --rounds interleaved rounds of --iters
    iterations, after one untimed round (compilation, allocator, caches)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd)).to(device)
    opts = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.split(":")[0])
    net, (ctx, dtype) = compiled(model, True) if cfg.compile else model, autocast_context(device, "auto")
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    print(f"one training iteration, batch {cfg.batch_size} x {cfg.block_size}, {cfg.n_layer} x {cfg.n_embd}, "
          f"{device} {dtype}{', compiled' if cfg.compile else ''}; median of {cfg.rounds} rounds of {cfg.iters}")

    def iterations(alpha_0):
        for _ in range(cfg.iters):
            with ctx, attention_backends(device):
                nelbo(net, x, alpha_0)[0].backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
    fns = {alpha_0: functools.partial(iterations, alpha_0) for alpha_0 in (1.0, 0.5, 0.0)}  # diffusion, hybrid, AR
    interleaved(fns, 1, device)
    times, rows = interleaved(fns, cfg.rounds, device)[0], []
    for alpha_0, ts in times.items():
        ms = statistics.median(ts) / cfg.iters * 1000
        r, text = ratio(ts, times[1.0], "ratio")
        print(f"  α0={alpha_0}: {ms:8.1f} ms, {text} the diffusion (α0=1) iteration")
        rows.append(dict(alpha_0=alpha_0, ms=ms, **r))
    yield rows


def bench_frontier(cfg, device):
    """Samples of each checkpoint at each schedule and T, scored by the α0 = 0 checkpoint (which reads their token
    ids as its own: the tokenizers must match), beside their unigram entropy (low for repetitive text)."""
    sckpt, ckpts = load_checkpoint(cfg.scorer, device), {d: load_checkpoint(d, device) for d in cfg.out_dirs.split(",")}
    require([(tokenizer_of(c["meta"]) == tokenizer_of(sckpt["meta"]), f"{d} and the scorer {cfg.scorer} have "
              "different tokenizers") for d, c in ckpts.items()])
    scorer = GPT.from_checkpoint(sckpt, device).eval()

    @torch.no_grad()
    def quality(x):  # NLL per token under the scorer, and the mean entropy of each row's token frequencies
        ps = [c[c > 0] / c.sum() for c in (torch.bincount(row).float() for row in x.cpu())]
        return dict(gen_nll=iw_nll(scorer, x, 0.0).mean().item(),
                    entropy=statistics.mean(-(p * p.log()).sum().item() for p in ps))
    print(f"{cfg.num_samples} samples each; gen NLL: nats/token under {cfg.scorer}\n{'checkpoint':<40} "
          f"{'schedule':>8} {'T':>5} {'NFE':>5} {'seconds':>8} {'gen NLL':>8} {'entropy':>8}")
    for out_dir, ckpt in ckpts.items():
        model = GPT.from_checkpoint(ckpt, device).eval()
        L, alpha_0 = model.config.block_size, ckpt["config"]["alpha_0"]
        template = torch.full((L,), model.config.mask_id, device=device)
        for schedule in [s for s in cfg.schedules.split(",") if alpha_0 or s == "random"]:  # AR: left to right
            for steps in dict.fromkeys(L if s == "L" else int(s) for s in cfg.steps_list.split(",")):  # T = L once
                t0 = clock(device)
                x, nfe = generate(model, template, cfg.num_samples, steps, alpha_0, seed=cfg.seed, schedule=schedule)
                row = dict(out_dir=out_dir, denoiser=model.config.denoiser, alpha_0=alpha_0, schedule=schedule,
                           steps=steps, nfe=nfe, seconds=clock(device) - t0, **quality(x))
                print(f"{out_dir:<40} {schedule:>8} {steps:>5} {nfe:>5} {row['seconds']:>8.2f} {row['gen_nll']:>8.3f} "
                      f"{row['entropy']:>8.3f}")
                yield [row]


# -----------------------------------------------------------------------------
# where a cached sampling step's time goes

def profiled(run):
    """run() (-> NFE) under torch.profiler: (op calls per step, nested ones counted; the profile; NFE)."""
    with torch.profiler.profile() as prof:
        nfe = run()
    return len(prof.events()) / nfe, prof, nfe


def bench_profile(cfg, device):
    """Where the time of a cached sampling step goes (Eso-LM (B), batch 1, NFE ≈ L, L the last of --lengths):
    under torch.profiler, the op calls per step (nested ones counted, views included: each costs a dispatch on the host), the weight
    products per step (each matrix once: no logits computed and thrown away) and ms per step by kind of op; then,
    unprofiled, in --rounds interleaved rounds: the step, AR decoding through the same cache, and the step with its
    few-row products in the other layout (model.Linear: the two round differently, and which is faster depends on
    the machine; the sampler's is a property of the machine, never a timing); with --compile=True also the
    static-shape step of sample.py --compile=True, compiled (on the CPU, its op calls counted too)."""
    L = int(cfg.lengths.split(",")[-1])
    model, template = fixed_model(cfg, device, L)

    def step(net, alpha_0, static):  # a timed run at NFE ≈ L, in eager shapes or sample.py --compile's static ones
        return sampler(net, template, 1, 10 ** 6, alpha_0, replace(cfg, compile=static), device)
    runs = {"step": step(model, 1.0, False), "AR step": step(model, 0.0, False)}
    layout, other = ("(W xT)T", "F.linear")[::1 if few_rows_transposed() else -1]
    runs[f"step, {other}"] = mock.patch("model.few_rows_transposed", lambda: layout == "F.linear")(runs["step"])
    runs["step"]()  # warm-up
    calls, prof, nfe = profiled(runs["step"])
    groups, products = {}, 0
    for e in prof.key_averages():
        group = ("matrix products" if e.key in ("aten::mm", "aten::addmm") else
                 "attention" if "scaled_dot_product" in e.key else "everything else")
        groups[group] = groups.get(group, 0) + e.self_cpu_time_total / 1000 / nfe  # ms per step
        products += e.count / nfe if group == "matrix products" else 0
    row = dict(L=L, nfe=nfe, op_calls_per_step=calls, products_per_step=products, layout=layout,
               **{f"{k} ms": v for k, v in groups.items()})
    print(f"one cached sampling step, L={L}, NFE={nfe}, {cfg.n_layer} x {cfg.n_embd}, {device}, "
          f"{torch.get_num_threads()} threads: {calls:.0f} op calls (nested ones counted), {products:.0f} weight "
          f"products, 2 to 8 rows as {layout} (ESO_LM_FEW_ROWS overrides it); profiled, " +
          ", ".join(f"{k} {v:.3f} ms" for k, v in groups.items()))
    if cfg.compile:  # the GPU path's step (static shapes, as sample.py --compile=True), compiled
        runs["static step, compiled"] = step(compiled(model), 1.0, True)
        if device == "cpu":  # (on a GPU the profiler would see one CUDA graph replay per step)
            row["compiled_op_calls_per_step"] = profiled(runs["static step, compiled"])[0]
            print(f"the compiled static step: {row['compiled_op_calls_per_step']:.0f} op calls")
    times, nfes = interleaved(runs, cfg.rounds, device)
    ms = {k: [t / nfes[k] * 1000 for t in ts] for k, ts in times.items()}
    print(f"unprofiled, ms per step, median of {cfg.rounds} rounds: " + ", ".join(
        f"{k} {statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]" for k, v in ms.items()))
    for name, base in (("step", "AR step"), (f"step, {other}", "step"), ("static step, compiled", "step")):
        if name in ms:
            r, text = ratio(ms[name], ms[base], f"{name} / {base}")
            print(f"  {name} / {base}: {text}")
            row.update(r)
    row.update({f"{k} ms rounds": v for k, v in ms.items()})
    yield [row]


# -----------------------------------------------------------------------------
# the GPU report

def sample_py(cfg, device):
    """What `python sample.py --steps 32` runs on the char checkpoint: --sample_batch samples of L (--lengths)
    tokens in --small_steps steps, α0 = 0.5, top_p 0.9, temperature 1, KV cache, static and compiled on CUDA as
    sample.py does (after its two warm-up runs)."""
    model, template = fixed_model(cfg, device, int(cfg.lengths))
    run = sampler(compiled(model) if cfg.compile else model, template, cfg.sample_batch, cfg.small_steps, 0.5, cfg,
                  device, top_p=0.9)
    t0 = clock(device)
    nfe = run()
    row = dict(nfe=nfe, seconds=clock(device) - t0)
    print(f"NFE {nfe}: {row['seconds']:.3f} s")
    yield [row]


SIZE, BIG = dict(n_layer=6, n_head=6, n_embd=384), dict(n_layer=12, n_head=12, n_embd=768)  # the char model, GPT-2's
GPU_PARTS = [  # (table, mode, its flags), the cheap and most used first
    ("sample.py defaults", sample_py, dict(SIZE, lengths="256", sample_batch=4, small_steps=32)),
    ("train", bench_train, dict(SIZE, batch_size=64, block_size=256)),  # train.py's GPU preset
    ("latency", bench_sample, dict(SIZE, lengths="1024", sample_batch=1, mdlm_steps=128)),
    ("throughput", bench_sample, dict(SIZE, lengths="1024", sample_batch=64, mdlm_steps=64)),
    ("latency", bench_sample, dict(BIG, lengths="2048", sample_batch=1, mdlm_steps=128)),
    ("latency", bench_sample, dict(BIG, lengths="8192", sample_batch=1, mdlm_steps=128))]


def compile_counts():
    """Dynamo's and Inductor's running totals (on a CPU, which has no CUDA graphs, every Inductor graph is a
    skip)."""
    return dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def bench_gpu(cfg, device):
    """One command, the whole GPU report (GPU_PARTS): sample.py's default workload, a training iteration of the
    GPU preset, then the paper's latency protocol (Table 11: batch 1, NFE ≈ L) at 6 x 384 and, last, at its model
    size, 12 x 768. On CUDA all is compiled as train.py and sample.py do by default (CUDA graphs for sampling),
    each part afresh; a CUDA-graph skip is an error (main). Each row records what ran since its part began
    (compile_counts; compiled: asked for, and no graph break). The rows timed together next start only while the
    time spent and that of the last ones fit in --budget_s; a failure ends its part; a row with timed=False says
    why a part stopped after rows_timed rows (what is left of it, if anything, is not timed)."""
    want, t0, stop = cfg.compile or device.startswith("cuda"), time.perf_counter(), ""
    for table, bench, flags in GPU_PARTS:
        print(f"\n{table}, {flags}")
        torch._dynamo.reset()  # Dynamo's recompile limit counts across model instances
        before, done, why, t1 = compile_counts(), 0, stop, time.perf_counter()
        try:
            for rows in [] if stop else bench(replace(cfg, compile=want, rounds=1, **flags), device):
                ran = {k: v - before[k] for k, v in compile_counts().items()}
                ran["compiled"] = want and ran["graphs"] > 0 and not ran["graph_breaks"]
                print(f"-> {'compiled' if ran['compiled'] else 'not compiled'}: {ran['graphs']} graphs, "
                      f"{ran['graph_breaks']} graph breaks, {ran['cudagraph_skips']} CUDA-graph skips")
                done += len(rows)
                yield [dict(r, table=table, **flags, timed=True, **ran) for r in rows]
                now = time.perf_counter()
                spent, last, t1 = now - t0, now - t1, now
                if spent + last > cfg.budget_s:
                    stop = why = f"{spent:.0f} s spent of the {cfg.budget_s} s budget"
                    break
        except Exception as e:  # the rows done are kept; why: the compiler's own error, if it is one
            e = getattr(e, "inner_exception", None) or e
            why = f"{type(e).__name__}: {str(e).strip().partition(chr(10))[0]}"
        if why:
            print(f"not timed after {done} rows: {why}")
            yield [dict(table=table, **flags, timed=False, rows_timed=done, reason=why)]
    print(f"\nthe whole report took {time.perf_counter() - t0:.0f} s")


# -----------------------------------------------------------------------------

BENCHES = dict(sample=bench_sample, train=bench_train, frontier=bench_frontier, profile=bench_profile, gpu=bench_gpu)


def validate(cfg):
    """The flags, checked before anything runs, each wrong one as one line that names it."""
    ints = lambda text, extra=(): all(s in extra or s.isdigit() and int(s) > 0 for s in text.split(","))
    require([(cfg.what in BENCHES, f"--what={cfg.what} must be one of {', '.join(BENCHES)}"),
             (ints(cfg.lengths) and ints(cfg.steps_list, ("L",)), "--lengths and --steps_list must be positive "
              "integers separated by commas (--steps_list: or L)"),
             (min(cfg.rounds, cfg.iters, cfg.small_steps, cfg.sample_batch, cfg.num_samples, cfg.vocab_size,
                  cfg.batch_size, cfg.mdlm_steps + 1) > 0, "--rounds, --iters, --small_steps, --sample_batch, "
              "--num_samples, --vocab_size and --batch_size must be positive, --mdlm_steps >= 0"),
             *shape_checks(cfg),
             (cfg.what != "frontier" or cfg.out_dirs and cfg.scorer, "--what=frontier needs --out_dirs=dir1,dir2 and "
              "--scorer=<the α0=0 checkpoint dir>"),
             (not cfg.json_out or os.path.isdir(os.path.dirname(os.path.abspath(cfg.json_out))),
              f"--json_out={cfg.json_out} must name a file in a folder that exists")])
    few_rows_transposed()  # ESO_LM_FEW_ROWS


def main(argv=None):
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        print(__doc__)
    cfg, rows = BenchConfig(), []
    parse_args(cfg, argv)
    validate(cfg)
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):  # a CUDA-graph skip is an error
        for unit in BENCHES[cfg.what](cfg, pick_device(cfg.device)):  # the rows timed together
            rows += unit
            if cfg.json_out:  # after every unit: a stop, a failure or Ctrl-C keeps every row measured
                atomic_write(cfg.json_out, lambda f: json.dump(rows, f, indent=1), "w")


if __name__ == "__main__":
    run_cli(main)
