"""The whole DiT, one forward, four ways: eager reference, compiled reference, fused, and fused +
torch.compile + CUDA graphs (the logic lives in ``longcat_native/runtime/benchmark.py``, shared
with ``longcat-native bench``; read its docstring for the FLOP formulas and columns).

    python bench/model.py                       # GPU: the real 13.6B config, 480p (CFG batch 2) and 720p (BSA)
    python bench/model.py --size 480p --depth 8 # a quick GPU run on 8 of the 48 blocks
    python bench/model.py                       # CPU: the tiny preset at a small latent (a smoke run)

Prints a table per size, writes the full results JSON under ``bench/results/`` (on CUDA, or with
``--save``; ``--out-dir`` elsewhere) and ends with one JSON line ``{"bench": "model", ...}``.
"""

from __future__ import annotations

import os
import sys

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)


def main(argv=None) -> int:
    import argparse

    from _harness import emit_json, ensure_repo_on_path, setup_triton_env

    setup_triton_env()  # before longcat_native imports triton
    ensure_repo_on_path()
    from longcat_native.runtime import benchmark

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(p)
    args = p.parse_args(argv)
    return benchmark.run_from_args(args, default_out_dir=os.path.join(_BENCH_DIR, "results"), emit=emit_json)


if __name__ == "__main__":
    sys.exit(main())
