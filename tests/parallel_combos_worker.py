"""One rank of tests/test_parallel_combos.py: the compositions of the parallel modes that the
per-mode tests do not run together, on 4 gloo ranks (the test starts 4 of these the way torchrun
would). Every scenario runs on every rank against a single-process model with the same weights
(and the official golden case where one exists); each rank writes ``<out>/rank<r>.json``, and a
rank that fails writes its traceback and exits at once, so its peers' next collective fails.

Scenarios (world 4):
  cfg_ring   cfg_parallel x ring 2: the guided sampling golden cases (t2v, i2v with a cond latent)
  shard_usp  shard_weights over 4 with ring 2 x Ulysses 2: a forward case, KV prefill, continuation
  dp_ring    dp 2 x ring 2: t2v with 3 videos (uneven: replica 0 takes 2)
  cfg_shard_cache  cfg_parallel x Ulysses 2, shard_weights over 4, a StepCache
  cli        ``generate --ring 2 --cfg-parallel --shard-weights`` (the embedded tiny default): the
             command's notes name the layout
"""

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from gloo_launch import worker_main  # noqa: E402
from parallel_modes_worker import _cache_model, _fixture, _golden, _step_cache, _t2v  # noqa: E402
from ring_worker import _errors, _forward  # noqa: E402


def run(rep, world, scenarios):
    assert world == 4, "the combinations need 4 ranks"
    cases, checks = rep["cases"], rep["checks"]
    single = _fixture()
    timings = rep["timings"]

    if "cfg_ring" in scenarios:
        t0 = time.perf_counter()
        dit = _fixture(cfg_parallel=True, ring_size=2)
        checks["cfg_ring_coords"] = dit.parallel.coords
        checks["cfg_ring_cp"] = [dit.cp.size, dit.cp.ring_size, dit.cp.ulysses_size]
        for name in ("sample_t2v_cfg", "sample_i2v_cfg"):
            cases[f"cfg2_ring2_{name}"] = _golden(dit, single, name)
        checks["cfg_ring_cfg_bytes"] = dit.parallel.comm_bytes.get("cfg", 0)
        del dit
        timings["cfg_ring"] = time.perf_counter() - t0

    if "shard_usp" in scenarios:
        from longcat_native.runtime import sharding

        t0 = time.perf_counter()
        dit = _fixture(shard_weights=True, ring_size=2, cp_size=2)
        checks["shard_usp_sharded"] = sharding.is_sharded(dit)
        checks["shard_usp_bytes"] = [sharding.local_weight_bytes(dit)["sharded"],
                                     sum(p.numel() * p.element_size() for p in single.blocks.parameters())]
        for name in ("t2v_mask", "kv_prefill", "kv_continue"):
            result, expected = _forward(dit, name)
            cases[f"shard4_ring2_ulysses2_{name}"] = _errors(result, expected, _forward(single, name)[0])
        del dit
        timings["shard_usp"] = time.perf_counter() - t0

    if "dp_ring" in scenarios:
        t0 = time.perf_counter()
        dit = _fixture(dp_size=2, ring_size=2)
        checks["dp_ring_coords"] = dit.parallel.coords
        cases["dp2_ring2_t2v_uneven"] = _t2v(dit, single, n_videos=3)
        del dit
        timings["dp_ring"] = time.perf_counter() - t0

    if "cfg_shard_cache" in scenarios:
        t0 = time.perf_counter()
        dit = _cache_model(cfg_parallel=True, cp_size=2, shard_weights=True)
        cases["cfg2_ulysses2_shard4_step_cache"], checks["cfg_shard_cache"] = _step_cache(dit, _cache_model())
        del dit
        timings["cfg_shard_cache"] = time.perf_counter() - t0

    if "cli" in scenarios:
        import contextlib
        import io

        import torch.distributed as dist

        from longcat_native.cli import main as cli_main

        t0 = time.perf_counter()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli_main(["generate", "--steps", "1", "--seed", "3", "--json", "--ring", "2", "--cfg-parallel",
                             "--shard-weights", "--out", os.path.join(os.environ["CLI_OUT"], "v.safetensors")])
        rep["cli"] = {"code": code, "stdout": buf.getvalue()}
        dist.barrier()
        timings["cli"] = time.perf_counter() - t0


if __name__ == "__main__":
    worker_main(run, sys.argv[1], sys.argv[2].split(","))
