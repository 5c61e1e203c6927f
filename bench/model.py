"""The whole DiT, one forward, four ways: eager reference, compiled reference, fused, and fused +
torch.compile + CUDA graphs (the logic lives in ``longcat_native/benchmarking/model.py``, shared with
``longcat-native bench``; the FLOP formulas and columns: docs/design/benchmarks.md).

    python bench/model.py                       # GPU: the real 13.6B config, 480p (CFG batch 2) and 720p (BSA)
    python bench/model.py --size 480p --depth 8 # a quick GPU run on 8 of the 48 blocks
    python bench/model.py                       # CPU: the tiny preset at a small latent (a smoke run)

Prints a table per size, writes the full results JSON under ``bench/results/`` (on CUDA, or with
``--save``; ``--out-dir`` elsewhere) and ends with one JSON line ``{"bench": "model", ...}``.
"""

from __future__ import annotations

import os
import sys

from longcat_native.benchmarking.harness import setup_triton_env


def main(argv=None) -> int:
    setup_triton_env()  # before longcat_native imports triton
    from longcat_native.benchmarking import model

    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    return model.main(argv, default_out_dir=results, prog=None, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
