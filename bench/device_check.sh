#!/usr/bin/env bash
# The GPU checks of a lent machine in one call, in priority order, sized for a lease of 15 minutes
# of device time (a fresh machine takes 1-2 of them to start; one call may run 10). Run from the
# repository root on the lent machine, through the device tool, with timeout_s 600:
#
#     bash bench/device_check.sh            # every step
#     bash bench/device_check.sh 4 5        # only steps 4 and 5 (a second call on the warm machine)
#     bash bench/device_check.sh 6          # the opt-in step (not in the default run)
#
# Each step has its own time limit and files its results as it goes, so a step that runs long
# costs only its own slot and what finished before it still comes back. The steps:
#
#   1  the GPU, driver, python/torch/triton versions and which optional packages exist
#   2  the tests that exercise the GPU (tests.log): bf16 kernels against the reference, the fused
#      model path compiled for the GPU, BSA, attention backends, real CUDA-graph capture (whole
#      forward, denoise, unmerged-LoRA switches, a step-cached denoise in parts), pinned KV offload; in parallel (pytest-xdist,
#      on the machine's image) since Triton compiles each new kernel specialization once
#   3  bench/model.py at 480p (CFG batch 2) on 8 of the 48 blocks: the four columns (eager
#      reference, compiled reference, fused, fused + compile + CUDA graphs) and the same best
#      column on FP8 weights (--quantize fp8: FP8 vs bf16 forward time in one run). The ratios and the MFU
#      hardly depend on the depth (the embedders and the final layer are < 0.1% of the FLOPs), and 8
#      blocks compile in a sixth of the time of 48
#   4  the memory-bound kernels, one block, attention (each SDPA kernel forced in turn) and BSA at
#      the real shapes
#   5  bench/model.py at 720p, all 48 blocks, BSA on, the fused column: seconds per forward and the
#      peak memory that decides "fits in 80 GB" (filed as model:720p)
#   6  (opt-in, for time left over) step 3's run with attention="cudnn" (SDPA with cuDNN's kernel
#      first; filed as model:480p-cudnn), eager reference and fused + compile + graphs columns:
#      whether cuDNN's attention should become auto's choice where flash-attn is not installed
#   7  (opt-in) bench/quantize.py --real (FP8 vs bf16 GEMM TFLOP/s), bench/streaming.py (measured
#      host-to-device bandwidth, streamed vs resident forward) and bench/step_cache.py --real
#      (480p with and without the step cache), each time-limited
#
# Results: $OUT/steps.log (what ran, how long, the tables) and tests.log, and the suite's
# $OUT/<date>-<gpu>.json + .md holding every bench step; file them in the repository with
# `python bench/suite.py --merge <that json> --out-dir bench/results` (DEVELOPERS.md, runbook).
# Step limits in seconds come from the environment (LIMIT_TESTS, LIMIT_480P, LIMIT_KERNELS per
# bench, LIMIT_720P); the defaults add up to 570 s (100 + 190 + 4 x 45 + 100), leaving time to
# copy the results back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(pwd)/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The package is used from the checkout (not installed there); pytest-xdist workers need the path too.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
STEPS="${*:-1 2 3 4 5}"  # step 6 only when asked for
LOG="$OUT/steps.log"
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start )) s: $*" | tee -a "$LOG"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

if want 1; then
  step "1 environment"
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu available", torch.cuda.is_available())
for name in ("triton", "flash_attn_interface", "flash_attn", "nvtx", "xdist", "hypothesis",
             "pytest_benchmark", "safetensors", "diffusers", "transformers"):
    try:
        m = importlib.import_module(name)
        print(" ", name, getattr(m, "__version__", "present"))
    except Exception as e:  # noqa: BLE001
        print(" ", name, "missing:", type(e).__name__)
EOF
  } 2>&1 | tee -a "$LOG"
fi

if want 2; then
  step "2 GPU tests (limit ${LIMIT_TESTS:-100} s)"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  timeout "${LIMIT_TESTS:-100}" "$PY" -m pytest -q -p no:cacheprovider -rs "${xdist[@]}" \
    tests/test_layernorm_modulate.py tests/test_residual_layernorm_modulate.py tests/test_qk_rmsnorm_rope3d.py \
    tests/test_swiglu.py tests/test_block_sparse_attention.py tests/test_attention.py tests/test_compiled.py \
    tests/test_dit_triton.py tests/test_dit_bsa.py tests/test_dit_generic.py \
    "tests/test_step_cache.py::test_cuda_graph_parts_on_cuda" > "$OUT/tests.log" 2>&1
  echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))" | tee -a "$LOG"
fi

if want 3; then
  step "3 model 480p, 8 blocks, four columns + fp8 (limit ${LIMIT_480P:-240} s)"
  "$PY" bench/suite.py --only model --out-dir "$OUT" --timeout-s "${LIMIT_480P:-240}" \
    --args "model=--size 480p --depth 8 --repeats 2 --quantize fp8" 2>&1 | tee -a "$LOG" | tail -n 2
fi

if want 4; then
  step "4 kernels, block, attention, block_sparse_attention at the real shapes (limit ${LIMIT_KERNELS:-45} s each)"
  "$PY" bench/suite.py --only fused_kernels,block,attention,block_sparse_attention --out-dir "$OUT" --timeout-s "${LIMIT_KERNELS:-45}" \
    2>&1 | tee -a "$LOG" | tail -n 2
fi

if want 5; then
  step "5 model 720p, 48 blocks, BSA, fused (limit ${LIMIT_720P:-100} s)"
  "$PY" bench/suite.py --only model --tag 720p --out-dir "$OUT" --timeout-s "${LIMIT_720P:-100}" \
    --args "model=--size 720p --columns fused --repeats 1 --warmup 0" 2>&1 | tee -a "$LOG" | tail -n 2
fi

if want 6; then
  step "6 model 480p, 8 blocks, attention=cudnn (limit ${LIMIT_CUDNN:-150} s)"
  "$PY" bench/suite.py --only model --tag 480p-cudnn --out-dir "$OUT" --timeout-s "${LIMIT_CUDNN:-150}" \
    --args "model=--size 480p --depth 8 --repeats 2 --attention cudnn --columns eager_ref fused_compile_graphs" \
    2>&1 | tee -a "$LOG" | tail -n 2
fi

if want 7; then
  step "7 quantize, streaming, step cache at the real shapes (limit ${LIMIT_NEW:-90} s each)"
  "$PY" bench/suite.py --only quantize,streaming,step_cache --out-dir "$OUT" --timeout-s "${LIMIT_NEW:-90}" \
    --args "quantize=--real" --args "step_cache=--real" 2>&1 | tee -a "$LOG" | tail -n 2
fi

step "done (steps: $STEPS)"
ls -la "$OUT"
