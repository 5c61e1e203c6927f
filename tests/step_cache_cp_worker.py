"""One rank of tests/test_step_cache.py's context-parallel test (launched like torchrun: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Writes ``<out>/rank<r>.json``."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gloo_launch import worker_main  # noqa: E402

import longcat_native as lcn  # noqa: E402
from test_step_cache import RefPolicy, _cache, _inputs, _run  # noqa: E402


def run(rep, world):
    cp = lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference", cp_size=world)
    single = lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference")
    inputs = _inputs(T=2, H=8, W=8, m=1)
    base = _run(cp, inputs)
    out0 = _run(cp, inputs, lcn.StepCache(Fn_compute_blocks=1, residual_diff_threshold=0))
    rep["thr0_bit_identical"] = bool(torch.equal(base, out0))
    ref = RefPolicy(cp, Fn=1, Bn=1, thr=0.45)
    expected = _run(ref, inputs)
    cache = _cache(ref)
    out = _run(cp, inputs, cache)
    st = cache.stats
    rep["decisions"] = st["decisions"]
    rep["cached_steps"] = st["cached_steps"]
    rep["cached_equals_reference"] = bool(torch.equal(out, expected)) and \
        [d.startswith("cached") for d in st["decisions"]] == ref.decisions
    cache1 = _cache(ref)
    out1 = _run(single, inputs, cache1)
    rep["decisions_match_single"] = cache1.stats["decisions"] == st["decisions"]
    rep["single_rel_err"] = float((out - out1).abs().max() / out1.abs().max())


if __name__ == "__main__":
    worker_main(run, sys.argv[1])
