"""Smoke test of bench/quantize.py at tiny size (the style of bench/test_bench_kernels.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quantize_script_smoke():
    argv = ["bench/quantize.py", "--size", "small", "--tokens", "32", "--repeats", "1", "--no-compile",
            "--deviation-hidden", "128"]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "quantize" and record["tokens"] == 32
    for g in ("attn_qkv", "attn_proj", "cross_attn_kv_linear", "ffn_w13", "ffn_w2"):
        for m in ("dense", "fp8", "fp8_weight_only", "int8_weight_only"):
            for k in (f"{g}_{m}_ms", f"{g}_{m}_tflops", f"{g}_{m}_vs_eager_speedup"):
                assert isinstance(record[k], float) and math.isfinite(record[k]) and record[k] > 0, k
    assert record["weight_gib_fp8"] <= 14.5 and record["fp8_weight_target_met"] is True
    assert record["weight_bytes_int8_weight_only"] == record["weight_bytes_fp8"] < record["weight_bytes_bf16"]
    assert 0 < record["deviation_int8_weight_only_rel_l2"] < record["deviation_fp8_weight_only_rel_l2"] < 0.1
    assert "13.6B model" in proc.stdout and "relative L2" in proc.stdout
