"""The GPU path, vouched for on the CPU: bf16 autocast, torch.compile of training and of the static-shape sampler
(graph counts with cheap backends, Inductor's own code for the cache writes), a compiler that fails."""
import re

import torch
import torch._dynamo
from conftest import TINY_TRAIN, cli, tiny_model
from torch._dynamo.utils import counters

import bench
from sample import generate, new_cache

REAL_COMPILE = torch.compile


def with_backend(backend):
    """torch.compile as the repo calls it, on another backend (mode, e.g. reduce-overhead, belongs to Inductor)."""
    return lambda model, mode=None, **kw: REAL_COMPILE(model, backend=backend, **kw)


def graphs():
    return counters["stats"]["unique_graphs"]


def test_bf16_paths_run_on_cpu(data_dir, tmp_path):
    """What CUDA's default dtype adds, on the CPU: training under bf16 autocast, and sampling with a bf16 KV cache,
    cached and uncached."""
    out = tmp_path / "o"
    r = cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
            "--eval_interval=2", "--dtype=bfloat16")
    assert r.returncode == 0 and "(bfloat16)" in r.stdout, r.stderr[-2000:]
    for kv in ("True", "False"):
        s = cli("sample.py", f"--out_dir={out}", "--dtype=bfloat16", f"--kv_cache={kv}", "--steps=4", "--device=cpu")
        assert s.returncode == 0 and s.stdout.count("---------------") == 4 and "_" not in s.stdout, s.stderr


def test_compiled_training_compiles_two_graphs(data_dir, tmp_path, monkeypatch):
    """50 compiled iterations at α0 = 0.5 (aot_eager: AOTAutograd's tracing without Inductor's codegen) compile
    GPT.forward twice: the diffusion pass, and the sequential pass once for all lengths m; the run ends where
    an eager run ends."""
    monkeypatch.setattr(torch, "compile", with_backend("aot_eager"))
    torch._dynamo.reset()
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--max_iters=50", "--eval_interval=50", "--alpha_0=0.5",
              "--log_interval=50"]
    before = graphs()
    r = cli("train.py", *common, f"--out_dir={tmp_path / 'compiled'}", "--compile=True")
    assert r.returncode == 0, r.stderr[-2000:]
    assert graphs() - before == 2, f"{graphs() - before} graphs compiled"
    e = cli("train.py", *common, f"--out_dir={tmp_path / 'eager'}")
    loss = lambda out: float(re.search(r"iter 50: loss ([0-9.]+)", out)[1])
    assert abs(loss(r.stdout) - loss(e.stdout)) < 1e-3, (r.stdout, e.stdout)


def test_gpu_report_never_hits_the_recompile_limit(monkeypatch, capsys):
    """bench.py --what=gpu's call pattern (every latency row, sample.py's defaults, training), compiled with the
    eager backend on tiny sizes, Dynamo failing on a recompile-limit hit (as the report has it): every part runs
    compiled and says how many graphs it compiled; MDLM's rows are timed on part of their steps and say so; a
    spent budget lists the parts not timed."""
    monkeypatch.setattr(torch, "compile", with_backend("eager"))
    monkeypatch.setattr(bench, "GPU_LATENCY", [((1, 2, 16), 16, 1, 8), ((1, 2, 16), 32, 1, 8), ((1, 2, 16), 16, 4, 4)])
    monkeypatch.setattr(bench, "GPU_SAMPLE_DEFAULTS", dict(L=16, size=(1, 2, 16), num_samples=4, steps=4, alpha_0=0.5))
    monkeypatch.setattr(bench, "GPU_TRAIN", dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16))
    rows = bench.bench_gpu(bench.BenchConfig(iters=1, rounds=1, small_steps=4, compile=True), "cpu")
    out = capsys.readouterr().out
    assert "not timed" not in out, out
    tables = [r["table"] for r in rows]
    assert tables.count("latency") == 10 and tables.count("throughput") == 5 and tables.count("train") == 3, tables
    assert "sample.py defaults" in tables and all(r["compiled"] and r["graphs"] >= 1 for r in rows), rows
    assert all(r["nfe"] == r["L"] for r in rows if r.get("sampler", "").startswith("AR"))
    assert out.count("compiled: ") == 5 and "(8 steps timed)" in out
    rows = bench.bench_gpu(bench.BenchConfig(iters=1, rounds=1, small_steps=4, compile=True, budget_s=-1), "cpu")
    assert [r.get("timed") for r in rows] == [False] * 5, "past the budget, every part left is listed as not timed"


def broken_backend(graph, example_inputs):
    """A compiler backend that fails, as a broken compiler would: Dynamo raises BackendCompilerFailed."""
    raise RuntimeError("the compiler failed\nwith a long story")


def test_a_failing_compiler_never_costs_a_run(data_dir, tmp_path, monkeypatch):
    """If compiling raises, train.py and sample.py say so in one line and go on without it: the checkpoint and
    the samples are those of a run that never compiled."""
    common = [*TINY_TRAIN, f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=3"]
    eager = cli("train.py", *common, f"--out_dir={tmp_path / 'eager'}")
    monkeypatch.setattr(torch, "compile", with_backend(broken_backend))
    r = cli("train.py", *common, f"--out_dir={tmp_path / 'failed'}", "--compile=True")
    assert r.returncode == 0 and r.stdout.count("torch.compile failed (RuntimeError: the compiler failed)") == 1, \
        r.stdout + r.stderr
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("eager", "failed"))
    assert eager.returncode == 0 and all(torch.equal(a[k], b[k]) for k in a)
    s = cli("sample.py", f"--out_dir={tmp_path / 'failed'}", "--steps=4", "--device=cpu", "--compile=True")
    assert s.returncode == 0 and "torch.compile failed (RuntimeError: the compiler failed); sampling without it" \
        in s.stderr, s.stderr
    e = cli("sample.py", f"--out_dir={tmp_path / 'failed'}", "--steps=4", "--device=cpu")
    assert s.stdout.split("NFE")[0] == e.stdout.split("NFE")[0]


@torch.no_grad()
def test_inductor_compiles_the_static_sampler_with_in_place_cache_writes():
    """Inductor, as on a GPU (reduce-overhead: CUDA graphs there, plain C++ kernels here), compiles the static-shape
    sampler of (B): the tokens are the eager sampler's, and the compiled steps allocate no buffer the size of a
    layer's K/V cache, i.e. they write each layer's buffer in place instead of copying it and writing it back."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    model = tiny_model(vocab_size=11, block_size=40, n_layer=2, n_head=2, n_embd=32)
    template = torch.full((40,), 11)
    template[:3] = torch.tensor([1, 2, 3])
    cache = new_cache(model, 1, 40, "cpu", static=True)
    net = REAL_COMPILE(model, mode="reduce-overhead")
    (x, _), code = run_and_get_code(lambda: generate(net, template, 1, 10 ** 6, 0.5, static=True, cache=cache))
    assert torch.equal(x, generate(model, template, 1, 10 ** 6, 0.5)[0]), "compiled and eager samples differ"
    code = "\n".join(code)
    assert code.count("empty_strided_cpu((") > 10 and code.count("empty_strided_cpu((1, 2, 40, 16)") == 0, \
        "a compiled step copies a layer's cache"


def test_profile_counts_the_kernels_a_compiled_step_runs():
    """bench.py --what=profile --compile=True on a tiny model: kernels() counts the ops that run a kernel (a view or
    an allocation is none; a wrapper that calls one is counted once), and the compiled static step, in which
    Inductor fuses the elementwise ops, runs fewer of them than the eager step, with the same matrix products."""
    x = torch.randn(4, 6)
    with torch.profiler.profile() as prof:
        x.t().contiguous()  # a copy: 1
        torch.nn.functional.layer_norm(x, (6,))  # layer_norm -> native_layer_norm: 1
        x.view(24)[2:].unsqueeze(0)  # views: 0
        x.to(torch.float32)  # already fp32: 0
        x @ x.t()  # mm: 1
    assert bench.kernels(prof.events()) == 3, [e.name for e in prof.events()]
    torch._dynamo.reset()
    cfg = bench.BenchConfig(what="profile", lengths="16", n_layer=1, n_head=2, n_embd=16, rounds=1, compile=True)
    (row,) = bench.bench_profile(cfg, "cpu")
    assert row["products_per_step"] == 5 and row["op_calls_per_step"] > row["compiled_op_calls_per_step"]
    assert row["kernels_per_step"] > row["compiled_kernels_per_step"] > 5, row
