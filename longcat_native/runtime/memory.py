"""Memory of the LongCatDiT and of whole runs: the fused forward traced at real shapes
(``trace_forward_memory``, ``activation_bytes``), an estimate of a generation run's peak
(``run_memory_estimate``) and a run's measured peaks per stage (``StageMemory``).

The tracer itself (``MemoryTracer``, ``trace_memory``, ``storage_bytes``) is runtime/tracing.py,
below the model (weight streaming uses it), re-exported here; this module is above the model.
Design notes: docs/design/memory.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..kernels._common import allocator_bytes
from .dit import LongCatDiT
from .tracing import (LiveTensor, MemoryTrace, MemoryTracer, model_activation_bytes, storage_bytes, trace_memory,
                      trace_model_forward)

__all__ = ["MemoryTracer", "MemoryTrace", "LiveTensor", "trace_memory", "trace_forward_memory", "allocator_bytes",
           "storage_bytes", "activation_bytes", "run_memory_estimate", "StageMemory", "UMT5_XXL_ENCODER_PARAMS",
           "WAN_VAE_PARAMS", "GPU_BUDGET_BYTES"]


def trace_forward_memory(config="longcat-video", **options) -> Dict[str, Any]:
    """Peak memory of one forward of ``LongCatDiT``'s fused path (what ``kernels="auto"`` runs on
    CUDA), traced on fake tensors: :func:`runtime.tracing.trace_model_forward` for ``LongCatDiT``.
    ``options``: ``batch``, ``latent`` (T, H, W), ``text_len``, ``bsa``, ``dtype``, ``kv_frames``,
    ``config_overrides``, ``ffn_chunk_tokens``, ``quantize``, ``step_cache``; returns bytes
    ``weights``, ``inputs``, ``activation_peak``, ``step_cache_bytes``, ``peak`` and the trace."""
    return trace_model_forward(LongCatDiT, config, **options)


def activation_bytes(cfg, latent, batch: int, dtype, kv_frames: int = 0, bsa: bool = False,
                     text_len: int = 512, quantize: Optional[str] = None) -> Dict[str, Any]:
    """Peak activation memory of one forward of ``LongCatDiT``'s fused path at ``latent`` (T, H, W):
    :func:`runtime.tracing.model_activation_bytes` for ``LongCatDiT`` (weights and inputs not
    counted; ``kv_cache_bytes`` for ``kv_frames`` > 0)."""
    return model_activation_bytes(LongCatDiT, cfg, latent, batch, dtype, kv_frames=kv_frames, bsa=bsa,
                                  text_len=text_len, quantize=quantize)


# -- estimates and measurements of whole generation runs ------------------------------------------

# Sizes of the official components the run estimates assume (not read from any file).
UMT5_XXL_ENCODER_PARAMS = 5.68e9  # umT5-XXL encoder: d_model 4096, 24 layers, d_ff 10240, 256k vocabulary
WAN_VAE_PARAMS = 127e6            # Wan2.1 VAE (encoder + decoder)
GPU_BUDGET_BYTES = 48 * 1024 ** 3  # the 48 GB cards users report running out of memory on


def run_memory_estimate(cfg, parameters: int, latent, decoded_frames: int, size, *, dtype_bytes: int = 2,
                        bsa: bool = False, vae_tile: int = 256, vae_tile_stride: int = 192,
                        text_encoder_params: float = UMT5_XXL_ENCODER_PARAMS, vae_params: float = WAN_VAE_PARAMS,
                        vae_tile_workspace_bytes: int = 512 * 1024 ** 2, overhead_bytes: int = 1024 ** 3,
                        budget_bytes: int = GPU_BUDGET_BYTES) -> Dict[str, Any]:
    """An ESTIMATE of the peak GPU memory of a generation run without guidance (batch 1) that
    denoises ``latent`` = (T, H, W) and decodes ``decoded_frames`` frames of ``size`` = (height,
    width) pixels. The shapes come from the caller (``pipelines.plan.refine_memory_estimate``).

    Assumptions:
    - The stages run one after the other and the peak is the largest: text encoding (the umT5
      encoder alone on the GPU, moved off before the DiT is loaded), denoising, VAE decoding.
      The DiT's weights (``parameters`` x ``dtype_bytes``) stay resident from loading to the end;
      a LoRA is merged into them (its exact-restore copies live in host memory), adding nothing.
    - Denoising activations are traced, not assumed: :func:`activation_bytes` at ``latent``
      (batch 1, ``bsa``, its selection scratch included); latents: four float32 copies.
    - VAE decoding in tiles of ``vae_tile`` pixels every ``vae_tile_stride``: the tiles' outputs
      (the decoded video x (tile / stride)^2 for the overlaps) plus the blended video, in the
      DiT's dtype, plus ``vae_tile_workspace_bytes`` for one tile's decoder activations.
    - ``overhead_bytes`` for the CUDA context and the caching allocator's slack.
    """
    T, H, W = latent
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]  # bf16 and fp16 hold the same
    act = activation_bytes(cfg, (T, H, W), 1, dtype, bsa=bsa)
    weights = int(parameters * dtype_bytes)
    latents = 4 * cfg.in_channels * T * H * W * 4
    denoise = weights + act["peak_activation_bytes"] + latents + overhead_bytes
    decoded = 3 * decoded_frames * size[0] * size[1] * dtype_bytes
    overlap = (vae_tile / vae_tile_stride) ** 2 if max(size) > vae_tile else 1.0
    vae_decode = (weights + int(vae_params * dtype_bytes) + int(decoded * (1 + overlap)) + vae_tile_workspace_bytes
                  + overhead_bytes)
    text = int(text_encoder_params * dtype_bytes) + overhead_bytes
    stages = {"text_encode": text, "denoise": denoise, "vae_decode": vae_decode}
    peak = max(stages.values())
    return {
        "estimate": True, "size": list(size), "latent_thw": [T, H, W], "tokens": act["tokens"],
        "dit_weight_bytes": weights, "activation_bytes": act["peak_activation_bytes"],
        "activation_peak_op": act["peak_op"], "latent_bytes": latents,
        "vae_decode_bytes": vae_decode - weights - overhead_bytes, "overhead_bytes": overhead_bytes,
        "stages": stages, "peak_bytes": peak, "budget_bytes": budget_bytes, "fits": peak <= budget_bytes,
        "text_encode_with_dit_resident_bytes": text + weights,
    }


class StageMemory:
    """Peak memory and time per stage of a run, MEASURED. On CUDA: ``torch.cuda.max_memory_allocated``,
    reset at the start of each stage (tensors allocated by PyTorch on that GPU; the CUDA context
    and the caching allocator's slack come on top). Elsewhere: the process's peak resident set
    size (``resource.getrusage``) at the end of each stage: HOST memory, a high-water mark over
    the whole process so far that cannot be reset, so it never decreases from stage to stage."""

    def __init__(self, device):
        self.device, self.rows = device, []
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "host_peak_rss"
        self.label = (f"peak GPU memory allocated by PyTorch on {device}, per stage" if self.kind == "cuda_max_allocated"
                      else "HOST memory: peak resident set size of the process so far (not GPU memory; "
                           "a process-wide high-water mark, not resettable per stage)")

    def _peak(self) -> int:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux

    def stage(self, name: str):
        """``with mem.stage("denoise"): ...`` records one row."""
        import contextlib
        import time

        @contextlib.contextmanager
        def run():
            if self.kind == "cuda_max_allocated":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            yield
            self.rows.append({"stage": name, "peak_bytes": self._peak(), "seconds": time.perf_counter() - start})

        return run()

    def summary(self) -> Dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "stages": self.rows,
                "peak_bytes": max((r["peak_bytes"] for r in self.rows), default=None)}
