"""Smoke test of bench/step_cache.py (the final JSON line), like bench/test_bench_kernels.py."""

import json
import os
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def test_step_cache_script_smoke():
    proc = subprocess.run([sys.executable, "bench/step_cache.py", "--steps", "6", "--thresholds", "0.6", "--repeats", "1",
                           "--depth", "4", "--latent", "2", "8", "8"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["bench"] == "step_cache"
    for k in ("best_speedup_x", "uncached_s", "cached_s"):
        assert rec[k] > 0
    assert 0 <= rec["best_saved_fraction"] < 1 and rec["best_latents_rel_l2"] >= 0
    assert len(rec["rows"]) == 1
