"""The GPU path, vouched for on the CPU: bf16 autocast, torch.compile of training and of the static-shape sampler
(graph counts with cheap backends, Inductor's own code for the cache writes), a compiler that fails, and the GPU
report's bookkeeping (what ran compiled, its budget, a stop midway)."""
import json
import re
import time

import pytest
import torch
import torch._dynamo
from conftest import TINY_TRAIN, cli, tiny_model
from torch._dynamo.utils import counters

import bench
import sample
from sample import SampleConfig, generate, new_cache

REAL_COMPILE = torch.compile


def with_backend(backend, keep_fullgraph=True):
    """torch.compile as the repo calls it, on another backend (mode, e.g. reduce-overhead, belongs to Inductor);
    fullgraph=False drops the caller's fullgraph, as a compiler that falls back silently would."""
    return lambda model, mode=None, fullgraph=False, **kw: REAL_COMPILE(
        model, backend=backend, fullgraph=fullgraph and keep_fullgraph, **kw)


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


TINY = dict(n_layer=1, n_head=2, n_embd=16)
TINY_PARTS = [("sample.py defaults", bench.sample_py, dict(TINY, lengths="16", sample_batch=4, small_steps=4)),
              ("train", bench.bench_train, dict(TINY, batch_size=4, block_size=16)),
              ("latency", bench.bench_sample, dict(TINY, lengths="16", sample_batch=1, mdlm_steps=8)),
              ("throughput", bench.bench_sample, dict(TINY, lengths="32", sample_batch=4, mdlm_steps=4))]


def gpu_report(tmp_path, *flags, parts=TINY_PARTS):
    """bench.py --what=gpu on tiny parts, compiled (as on CUDA): (exit code, stdout, the rows of its JSON)."""
    out = tmp_path / "gpu.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "GPU_PARTS", parts)
        r = cli("bench.py", "--what=gpu", "--compile=True", "--iters=1", "--small_steps=4", f"--json_out={out}", *flags)
    torch._dynamo.reset()  # (code that failed to compile is skipped from then on: not in the next test)
    return r.returncode, r.stdout + r.stderr, json.loads(out.read_text()) if out.exists() else []


def test_gpu_report_says_what_ran_compiled(tmp_path, monkeypatch):
    """bench.py --what=gpu's call pattern (sample.py's workload, training, every latency row), compiled with the
    eager backend on tiny sizes: every row was timed compiled (graphs, no graph break) without hitting Dynamo's
    recompile limit, which fullgraph makes an error; MDLM's rows are timed on part of their steps and say so;
    sample.py's part samples as sample.py does; a spent budget lists every part as stopped."""
    monkeypatch.setattr(torch, "compile", with_backend("eager"))
    calls = []
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: calls.append((a, kw)) or generate(*a, **kw))
    code, out, rows = gpu_report(tmp_path)
    assert code == 0 and "not timed" not in out, out
    tables = [r["table"] for r in rows]
    assert tables == ["sample.py defaults"] + ["train"] * 3 + ["latency"] * 5 + ["throughput"] * 5, tables
    assert all(r["timed"] and r["compiled"] and r["graphs"] >= 1 and r["graph_breaks"] == 0 for r in rows), rows
    assert all(r["nfe"] == r["L"] for r in rows if r.get("sampler", "").startswith("AR"))
    assert out.count("-> compiled: ") == 6 and "(8 steps timed)" in out, out
    (_, template, num_samples), kw = calls[0]  # sample.py's defaults (alpha_0: the checkpoint's)
    d, flags = SampleConfig(), bench.GPU_PARTS[0][2]
    assert (flags["sample_batch"], flags["small_steps"], flags["lengths"]) == (d.num_samples, d.steps, "256")
    assert (num_samples, kw["steps"], kw["alpha_0"], kw["top_p"], kw["seed"], kw["static"]) == (4, 4, 0.5, d.top_p,
                                                                                            d.seed, True)
    assert d.temperature == 1 and d.kv_cache and not {"temperature", "kv_cache"} & set(kw), kw
    assert template.tolist() == [65] * 16, "the char checkpoint's vocabulary (--vocab_size): 65 tokens and the mask"
    code, out, rows = gpu_report(tmp_path, "--budget_s=0")  # the first rows run, then the parts say they stopped
    assert code == 0 and [(r["timed"], r.get("rows_timed")) for r in rows] == [(True, None), (False, 1)] + [
        (False, 0)] * 3, rows


def test_gpu_report_keeps_what_it_measured(tmp_path, monkeypatch):
    """Stopped midway, the report leaves a valid JSON of every row finished: by its budget (a part whose next rows
    would overrun it stops; the rest is listed as not timed), or by Ctrl-C (exit code 130). (A kill leaves the last
    file written whole: atomic_write.)"""
    monkeypatch.setattr(torch, "compile", with_backend("eager"))
    real = bench.sample_group
    monkeypatch.setattr(bench, "sample_group", lambda *a: time.sleep(1) or real(*a))  # every group takes 1 s
    code, out, rows = gpu_report(tmp_path, "--budget_s=1", parts=TINY_PARTS[2:])
    assert code == 0 and [(r["table"], r["timed"]) for r in rows] == [("latency", True)] * 3 + [
        ("latency", False), ("throughput", False)], rows
    assert [r["rows_timed"] for r in rows[3:]] == [3, 0] and "budget" in rows[3]["reason"], rows[3:]
    groups = []

    def interrupted(*a):
        groups.append(a)
        if len(groups) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the latency part's second group
        return real(*a)
    monkeypatch.setattr(bench, "sample_group", interrupted)
    code, out, rows = gpu_report(tmp_path)
    assert code == 130 and [r["table"] for r in rows] == ["sample.py defaults"] + ["train"] * 3 + ["latency"] * 3


def breaking_attention(*args, **kwargs):
    torch._dynamo.graph_break()
    return F_SDPA(*args, **kwargs)


F_SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.mark.parametrize("fullgraph", [True, False])
def test_gpu_report_never_calls_a_broken_graph_compiled(tmp_path, monkeypatch, fullgraph):
    """A graph break in the model's forward: fullgraph (as bench compiles) makes it an error, and each part ends in
    a row that says so; a compiler that ignores fullgraph runs it in pieces, and every row says it was not
    compiled, with its graph breaks counted."""
    monkeypatch.setattr(torch, "compile", with_backend("eager", fullgraph))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", breaking_attention)
    code, out, rows = gpu_report(tmp_path, parts=TINY_PARTS[:2])
    assert code == 0 and not any(r.get("compiled") for r in rows), rows
    if fullgraph:
        assert [(r["timed"], r["rows_timed"]) for r in rows] == [(False, 0)] * 2, rows
        assert all("graph_break()" in r["reason"] for r in rows), rows
    else:
        assert len(rows) == 4 and all(r["timed"] and r["graph_breaks"] >= 1 for r in rows), rows


def broken_backend(graph, example_inputs):
    """A compiler backend that fails, as a broken compiler would: Dynamo raises BackendCompilerFailed."""
    raise RuntimeError("the compiler failed\nwith a long story")


@pytest.mark.parametrize("suppress_errors", [False, True])
def test_gpu_report_never_calls_a_failed_compile_compiled(tmp_path, monkeypatch, suppress_errors):
    """A compiler that fails: each part of the report ends in a row that says why; with Dynamo told to fall back
    to eager instead (suppress_errors, which fullgraph overrides), every row is timed and says not compiled."""
    monkeypatch.setattr(torch, "compile", with_backend(broken_backend, not suppress_errors))
    with torch._dynamo.config.patch(suppress_errors=suppress_errors):
        code, out, rows = gpu_report(tmp_path, parts=TINY_PARTS[:2])
    assert code == 0 and not any(r.get("compiled") for r in rows), rows
    if suppress_errors:
        assert len(rows) == 4 and all(r["timed"] and r["graphs"] == 0 for r in rows), rows
    else:
        assert [(r["timed"], r["reason"]) for r in rows] == [(False, "RuntimeError: the compiler failed")] * 2, rows
        assert out.count("not timed after 0 rows: RuntimeError: the compiler failed") == 2, out


def test_the_chosen_gpu_is_synchronised(monkeypatch):
    """The timing harness drains the device it times (cuda:1 here), not the current one (run on the CPU: the
    synchronize calls are recorded, no GPU needed)."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    times, outs = bench.interleaved({"a": lambda: 1, "b": lambda: 2}, 2, "cuda:1")
    assert synced == ["cuda:1"] * 8 and outs == {"a": 1, "b": 2} and [len(t) for t in times.values()] == [2, 2]


def test_a_failing_compiler_stops_a_run_before_it_saves(data_dir, tmp_path, monkeypatch):
    """If compiling raises, train.py stops at its first step with the compiler's error, before anything is saved
    (--compile=False runs without it)."""
    monkeypatch.setattr(torch, "compile", with_backend(broken_backend))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="the compiler failed"):
        cli("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=3",
            "--compile=True")
    assert not (tmp_path / "o" / "last.pt").exists()


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


def test_profile_counts_what_a_compiled_step_saves():
    """bench.py --what=profile --compile=True on a tiny model: a cached step runs each weight matrix once (4 per
    layer and the output layer), and the compiled static step, in which Inductor fuses the elementwise ops, makes
    fewer op calls than the eager step."""
    torch._dynamo.reset()
    cfg = bench.BenchConfig(what="profile", lengths="16", n_layer=1, n_head=2, n_embd=16, rounds=1, compile=True)
    ((row,),) = bench.bench_profile(cfg, "cpu")
    assert row["products_per_step"] == 5 and row["op_calls_per_step"] > row["compiled_op_calls_per_step"] > 5, row
