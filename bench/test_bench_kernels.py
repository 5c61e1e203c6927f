"""CPU-sized benchmark suite (pytest-benchmark) and smoke tests of the benchmark scripts.

    python -m pytest -q bench                          # timings of each fused op and its reference
    python -m pytest -q bench --benchmark-disable      # run each benchmarked call once (a smoke test)

Sizes are tiny: on CPU the fused ops run under the triton interpreter (bench/conftest.py sets
TRITON_INTERPRET=1 when there is no CUDA), so these timings check plumbing, not performance.
The smoke tests run ``bench/fused_kernels.py`` and ``bench/block.py`` as subprocesses and check the
final JSON line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from longcat_native.benchmarking.harness import DispatchCounter, count_ops, load_ops, tensor_bytes

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

REF_OPS, FUSED_OPS, _ = load_ops()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tiny shapes: batch 1, grid 2 x 2 x 4 = 16 tokens, C 128, 4 heads of 32, FFN 256.
B, GRID, C, H, FFN = 1, (2, 2, 4), 128, 4, 256
N = GRID[0] * GRID[1] * GRID[2]
D = C // H


def _inputs():
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s, dt=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=DEVICE, dtype=dt)

    x, y = rnd(B, N, C), rnd(B, N, C)
    mod = rnd(B, GRID[0], 6 * C, dt=torch.float32, scale=0.1).chunk(6, dim=-1)
    w, b = rnd(C, scale=0.1) + 1, rnd(C, scale=0.1)
    q, k, _ = rnd(B, N, 3 * C).view(B, N, 3, H, D).unbind(2)
    qw, kw = rnd(D, scale=0.1) + 1, rnd(D, scale=0.1) + 1
    ab = rnd(B, N, 2 * FFN)
    return {
        "layernorm_modulate": ("layernorm_modulate", (x, mod[0], mod[1]), {}),
        "layernorm_affine": ("layernorm_modulate", (x,), dict(weight=w, bias=b)),
        "residual_layernorm_modulate": ("residual_layernorm_modulate", (x, y, mod[2], mod[0], mod[1]), {}),
        "qk_rmsnorm_rope3d": ("qk_rmsnorm_rope3d", (q, k, qw, kw, GRID), dict(return_k_unroped=True)),
        "swiglu": ("swiglu", (ab,), {}),
    }


CASES = _inputs()


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_benchmark(benchmark, case, path):
    op_name, args, kwargs = CASES[case]
    fn = getattr(FUSED_OPS if path == "fused" else REF_OPS, op_name)
    benchmark.group = case
    benchmark.extra_info.update(tokens=N, hidden=C, dtype="bfloat16", device=DEVICE)
    with torch.no_grad():
        out = benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=3, iterations=1, warmup_rounds=1)
    ref = getattr(REF_OPS, op_name)(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert torch.allclose(o.float(), r.float(), atol=0.1, rtol=0.05)


def test_fused_ops_count_one_launch_each():
    """A fused custom op is one launch; its bytes are inputs + outputs (the counting model)."""
    for case, (op_name, args, kwargs) in CASES.items():
        c = count_ops(lambda: getattr(FUSED_OPS, op_name)(*args, **kwargs))
        assert c.launches == 1, (case, dict(c.by_op))
        out = getattr(FUSED_OPS, op_name)(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        flat_in = [t for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) for t in [a]]
        expected = sum(tensor_bytes(t) for t in flat_in) + sum(o.numel() * o.element_size() for o in outs)
        assert c.bytes == expected, case


def test_dispatch_counter_model():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with torch.no_grad(), DispatchCounter() as c:
        y = x.view(8, 4).t()  # views: not counted
        z = x @ w  # GEMM: a launch, no bytes
        u = torch.relu(x) + 1  # 2 launches: relu (read 128 B + write 128 B), add (256 B)
        x.add_(1.0)  # in place: read + write 128 B each
    assert y.shape == (4, 8) and z.shape == (4, 8) and u.shape == (4, 8)
    assert c.launches == 4
    assert c.launches_by_category["gemm"] == 1
    assert c.bytes == 256 + 256 + 256


def _run_script(*argv, timeout=240):
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1]), proc.stdout


def _check_positive(record, keys):
    missing = [k for k in keys if k not in record]
    assert not missing, f"missing keys {missing}"
    for k in keys:
        v = record[k]
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (k, v)
        assert math.isfinite(v) and v > 0, (k, v)


def test_kernels_script_smoke():
    record, _ = _run_script("bench/fused_kernels.py", "--size", "small", "--repeats", "1")
    assert record["bench"] == "fused_kernels"
    assert isinstance(record["device"], str) and record["device"]
    keys = ["copy_bandwidth_gbps"]
    for k in ("layernorm_modulate", "layernorm_affine", "residual_layernorm_modulate", "qk_rmsnorm_rope3d",
              "swiglu"):
        keys += [f"{k}_us", f"{k}_gbps", f"{k}_pct_of_copy_bw", f"{k}_eager_us", f"{k}_vs_eager_speedup"]
        # The torch.compile column is a number, or null with the reason in compile_error.
        if record.get(f"{k}_vs_compile_speedup") is None:
            assert "compile_error" in record, k
        else:
            keys += [f"{k}_compile_us", f"{k}_vs_compile_speedup"]
    _check_positive(record, keys)


def test_block_script_smoke():
    record, stdout = _run_script("bench/block.py", "--size", "small", "--repeats", "1")
    assert record["bench"] == "block"
    keys = ["reference_ms", "fused_ms", "reference_tflops", "fused_tflops", "flops_per_block",
            "reference_bytes_per_block", "fused_bytes_per_block", "fused_vs_reference_bytes_ratio",
            "launches_per_block_reference", "launches_per_block_fused", "fused_vs_eager_speedup"]
    if record.get("compile_ms") is None:
        assert "compile_error" in record
    else:
        keys += ["compile_ms", "compile_tflops", "fused_vs_compile_speedup"]
    _check_positive(record, keys)
    assert isinstance(record["bytes_target_met"], bool) and isinstance(record["launches_target_met"], bool)
    assert record["fused_bytes_per_block"] < record["reference_bytes_per_block"]
    assert record["launches_per_block_fused"] < record["launches_per_block_reference"]
    assert "target fused bytes" in stdout


def test_block_count_only_real_size():
    """Real-width 480p counts with fake tensors (no data, no kernels run): the fused path must move
    fewer bytes and launch fewer ops than the reference; the numbers are reported, not asserted
    against the targets (bench/block.py prints whether those are met)."""
    record, _ = _run_script("bench/block.py", "--count-only", "--size", "480p")
    assert record["count_only"] is True and record["tokens"] == 37440 and record["hidden_size"] == 4096
    _check_positive(record, ["reference_bytes_per_block", "fused_bytes_per_block", "fused_vs_reference_bytes_ratio",
                             "launches_per_block_reference", "launches_per_block_fused", "flops_per_block"])
    assert record["fused_vs_reference_bytes_ratio"] < 1
    assert record["launches_per_block_fused"] < record["launches_per_block_reference"]


def test_attention_script_smoke():
    record, stdout = _run_script("bench/attention.py", "--size", "small", "--repeats", "1", "--warmup", "0")
    assert record["bench"] == "attention" and record["tokens"] == 256 and record["text_tokens"] == 512
    assert record["auto_backend"] in record["backends"] and "sdpa" in record["backends"]
    keys = ["matmul_peak_tflops", "valid_text_tokens"]
    for b in record["backends"]:
        for case in ("self", "cross", "cross_varlen"):
            keys += [f"{b}_{case}_ms", f"{b}_{case}_tflops", f"{b}_{case}_pct_of_peak"]
    _check_positive(record, keys)
    assert record["sdpa_self_max_abs_diff"] < 1e-3  # vs the reference backend, float32 on CPU
    if DEVICE == "cpu":
        assert record["self_target_met"] is None and "n/a" in stdout
    else:
        assert isinstance(record["self_target_met"], bool)


def test_attention_bench_flash_rows_with_a_fake_flash_attn(monkeypatch, capsys):
    """The flash2 rows of bench/attention.py, on CPU, with a fake ``flash_attn`` (float64 math)."""
    import importlib.util
    import types

    from longcat_native.runtime import attention as attn_mod

    def dense(q, k, v, softmax_scale=None, causal=False, **kw):
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()).to(q.dtype)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, **kw):
        seg_q = torch.searchsorted(cu_q[1:].long(), torch.arange(q.shape[0], device=q.device), right=True)
        seg_k = torch.searchsorted(cu_k[1:].long(), torch.arange(k.shape[0], device=q.device), right=True)
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * softmax_scale
        s = s.masked_fill(~(seg_q[:, None] == seg_k[None, :])[None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        return torch.einsum("hqk,khd->qhd", p, v.double()).to(q.dtype)

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func, fake.flash_attn_varlen_func = dense, varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setattr(attn_mod, "_device_capability", lambda device: (9, 0))  # the CPU passes for a GPU
    attn_mod._flash_module.cache_clear()
    try:
        spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(BENCH_DIR, "attention.py"))
        bench_attention = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_attention)
        assert bench_attention.main(["--size", "small", "--tokens", "48", "--heads", "2", "--batch", "2",
                                     "--dtype", "float16", "--repeats", "1", "--warmup", "0", "--mm-size", "256",
                                     "--backends", "flash2,sdpa,reference"]) == 0
    finally:
        attn_mod._flash_module.cache_clear()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["backends"] == ["flash2", "sdpa", "reference"] and record["auto_backend"] == "flash2"
    for case in ("self", "cross", "cross_varlen"):
        assert record[f"flash2_{case}_tflops"] > 0
        assert record[f"flash2_{case}_max_abs_diff"] < 2e-3  # fp16 output vs the float32 oracle


def test_lora_script_smoke():
    record, stdout = _run_script("bench/lora.py", "--size", "small", "--repeats", "1")
    assert record["bench"] == "lora"
    _check_positive(record, ["load_ms", "first_merge_ms", "merge_ms", "restore_ms", "switch_ms", "merge_two_ms",
                             "unmerged_enable_ms", "unmerged_disable_ms", "base_step_ms", "merged_step_ms",
                             "unmerged_step_ms", "lora_params", "touched_params", "base_copy_bytes"])
    assert math.isfinite(record["unmerged_vs_merged_step_overhead"])
    assert record["merged_vs_unmerged_max_rel_diff"] < 0.05  # bf16 merged vs unmerged agree
    assert record["lora_modules"] == 2 * 8 and "unmerged vs merged per-step overhead" in stdout


def test_block_sparse_attention_script_smoke():
    record, stdout = _run_script("bench/block_sparse_attention.py", "--size", "small", "--repeats", "1",
                                 "--warmup", "0")
    assert record["bench"] == "block_sparse_attention" and record["tokens"] == 512 and record["chunk_tokens"] == 16
    keys = ["dense_ms", "dense_tflops", "dense_flops"]
    for s in ("s0875", "s09375"):
        keys += [f"{s}_select_ms", f"{s}_sparse_ms", f"{s}_sparse_tflops",
                 f"{s}_computed_fraction", f"{s}_flop_reduction", f"{s}_speedup_vs_dense"]
    _check_positive(record, keys)
    assert record["s0875_flop_reduction"] == 8 and record["s09375_flop_reduction"] == 16
    for s in ("s0875", "s09375"):  # the small shape is checked against the float32 oracle
        assert record[f"{s}_max_rel_err_vs_reference"] < (1e-4 if record["dtype"] == "float32" else 1e-2)
    assert "FLOP reduction" in stdout


def test_model_script_smoke(tmp_path):
    """bench/model.py on the tiny config (CPU) or a shallow real config (CUDA): every column runs or
    reports its error, the full results land in --out-dir (tmp_path, not bench/results)."""
    argv = ["bench/model.py", "--size", "small", "--repeats", "1", "--save", "--out-dir", str(tmp_path)]
    if torch.cuda.is_available():
        argv = ["bench/model.py", "--size", "480p", "--depth", "2", "--repeats", "1", "--out-dir", str(tmp_path)]
    record, stdout = _run_script(*argv)
    assert record["bench"] == "model"
    size = argv[2]
    _check_positive(record, ["matmul_peak_tflops", f"{size}_eager_ref_s", f"{size}_eager_ref_mfu",
                             f"{size}_fused_s", f"{size}_fused_compile_graphs_s"])
    assert "eager_ref" in stdout and "fused_compile_graphs" in stdout
    saved = list(tmp_path.glob("model_*.json"))
    assert len(saved) == 1
    full = json.loads(saved[0].read_text())
    assert set(full["sizes"][size]["columns"]) == {"eager_ref", "compile_ref", "fused", "fused_compile_graphs"}
    assert full["sizes"][size]["regional_compile"] is False
    assert record[f"{size}_attention"] == full["sizes"][size]["attention"] != "reference"
    record, stdout = _run_script(*argv, "--regional", "--columns", "fused_compile_graphs", "--attention", "reference")
    assert record[f"{size}_regional_compile"] is True and record[f"{size}_fused_compile_graphs_s"] > 0
    assert record[f"{size}_attention"] == "reference"
    assert "regional compile" in stdout


def test_parallel_script_smoke():
    record, stdout = _run_script("bench/parallel.py", "--repeats", "1")
    assert record["bench"] == "parallel" and record["world_size"] == 1
    # 480p, 4 ranks: 4 * (2 * 37,440 / 4 * 4096) bf16 elements, 3/4 of them leave the rank.
    assert record["480p_cp4_comm_mb_per_block_per_rank"] == pytest.approx(4 * 2 * 37440 / 4 * 4096 * 2 * 0.75 / 1e6,
                                                                          rel=1e-5)
    assert record["720p_cp8_comm_mb_per_block_per_rank"] > 0 and record["single_rank_forward_ms"] > 0
    assert "comm MB/block/rank" in stdout and "torchrun" in stdout


def test_suite_runs_benches_and_merges_results(tmp_path):
    """bench/suite.py files each bench's record; a second subset merges into the same day's file."""
    record, stdout = _run_script("bench/suite.py", "--only", "parallel", "--save", "--out-dir", str(tmp_path),
                                 "--args", "parallel=--no-measure")
    assert record["bench"] == "suite" and record["benches_failed"] == [] and record["benches_run"] == 1
    path = record["results_path"]
    assert path.endswith("-cpu.json") and os.path.exists(path) and os.path.exists(path[:-5] + ".md")
    record, _ = _run_script("bench/suite.py", "--only", "lora", "--save", "--out-dir", str(tmp_path),
                            "--args", "lora=--size small --repeats 1")
    merged = json.loads(open(record["results_path"]).read())
    assert set(merged["benches"]) == {"parallel", "lora"}
    assert merged["benches"]["parallel"]["record"]["480p_cp4_comm_mb_per_block_per_rank"] > 0
    md = open(record["results_path"][:-5] + ".md").read()
    assert "## lora: ok" in md and "## parallel: ok" in md and "`480p_cp4_comm_mb_per_block_per_rank`" in md
    other = tmp_path / "other"
    record, _ = _run_script("bench/suite.py", "--only", "parallel", "--save", "--out-dir", str(other),
                            "--args", "parallel=--no-measure")
    proc = subprocess.run([sys.executable, "bench/suite.py", "--merge", record["results_path"], "--out-dir",
                           str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(open(path).read())["benches"]) == {"parallel", "lora"}
    # A tagged run of a bench already in the file is filed beside it, not over it.
    record, _ = _run_script("bench/suite.py", "--only", "parallel", "--tag", "again", "--save", "--out-dir",
                            str(tmp_path), "--args", "parallel=--no-measure")
    assert record["benches_failed"] == []
    assert set(json.loads(open(path).read())["benches"]) == {"parallel", "lora", "parallel:again"}
    assert "## parallel:again: ok" in open(path[:-5] + ".md").read()


def test_device_check_script(tmp_path):
    """bench/device_check.sh (the one prepared call of a GPU lease): its shell parses, step 1 runs
    anywhere, and every bench command line in it parses with today's options, so a lease is not
    spent finding a renamed flag."""
    import re
    import shlex

    script = os.path.join(BENCH_DIR, "device_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    log = open(tmp_path / "steps.log").read()
    assert "torch " + torch.__version__ in log and "done (steps: 1)" in log

    import argparse

    from longcat_native.benchmarking import model

    text = open(script).read()
    test_files = re.findall(r"tests/test_\w+\.py", text)
    assert len(test_files) >= 10 and all(os.path.exists(os.path.join(REPO_ROOT, f)) for f in test_files), test_files
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    suite_lines = re.findall(r'"\$PY" bench/suite\.py (.*?)(?: 2>&1|$)', joined, flags=re.M)
    assert len(suite_lines) == 5, suite_lines
    from suite import BENCHES

    import importlib.util

    for line in suite_lines:
        argv = shlex.split(re.sub(r"\$\{LIMIT_\w+:-\d+\}", "1", line.replace('"$OUT"', "out")))
        only = argv[argv.index("--only") + 1].split(",")
        assert set(only) <= set(BENCHES), only
        for spec in [argv[i + 1] for i, a in enumerate(argv) if a == "--args"]:
            name, _, rest = spec.partition("=")
            assert name in only, (name, only)
            if name == "model":
                p = argparse.ArgumentParser()
                model.add_arguments(p)
                p.parse_args(rest.split())  # exits (fails the test) on an unknown option
                continue
            spec_ = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
            mod = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(mod)
            mod.parse_args(rest.split())  # the script's own parser; exits on an unknown option


def test_parallel_per_mode_table_and_counted_bytes(tmp_path):
    """The per-mode table's JSON keys, and a 2-rank gloo launch of --count: every layout's counted
    bytes per step (collectives seen by the dispatch mode, Parallel.comm_bytes) equal the formula."""
    import os
    import subprocess
    import sys

    record, stdout = _run_script("bench/parallel.py", "--no-measure", "--shard-ranks", "2", "--mode-sizes", "480p")
    assert "per mode, 480p" in stdout and "refused: 1560 tokens per frame" in stdout
    assert record["480p_ulysses4_ulysses_mib_per_step_per_rank"] > 0
    assert record["480p_cfg2_cfg_mib_per_step_per_rank"] > 0
    assert record["480p_shard4_dp4_weights_gib_per_rank"] < record["480p_single_weights_gib_per_rank"] / 3
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "bench/parallel.py",
                        "--count"], env=env, capture_output=True, text=True, timeout=120)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    rec = json.loads(line)
    assert p.returncode == 0 and rec["count_matches_formula"] is True, p.stdout[-3000:] + p.stderr[-3000:]
    assert rec["count_ring2_counted_bytes_per_step"] == rec["count_ring2_computed_bytes_per_step"] > 0
    assert rec["count_shard2_dp2_counted_bytes_per_step"] > 0
