"""longcat-native: a compiled, kernel-optimized inference runtime for the LongCat-Video DiT.

``import longcat_native as lcn; dit = lcn.LongCatDiT.from_pretrained(path)``. Importing never
queries CUDA and loads nothing heavy: each name below is imported on first use (PEP 562), so
``longcat-native --help`` does not pay for triton and ``torch._dynamo``. The fused kernels import
triton; to run them on a CPU (tests), set ``TRITON_INTERPRET=1`` before first using them.

Layers, each importing only the ones below it: :mod:`.kernels` (fused ops), :mod:`.runtime` (the
model: config, weights, network, attention, LoRA, compile and CUDA graphs, context parallelism,
memory tracing, profiling), :mod:`.pipelines` (sampler, tasks, ``LongCatVideoPipeline``),
:mod:`.benchmarking` (benchmark support) and :mod:`.cli`.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "LongCatDiT": ("longcat_native.runtime.dit", "LongCatDiT"),
    "LongCatConfig": ("longcat_native.runtime.config", "LongCatConfig"),
    "CheckpointError": ("longcat_native.runtime.weights", "CheckpointError"),
    "CUDAGraphRunner": ("longcat_native.runtime.compiled", "CUDAGraphRunner"),
    "compile": ("longcat_native.runtime.compiled", "compile_model"),  # torch.compile with per-device defaults
    "compile_model": ("longcat_native.runtime.compiled", "compile_model"),
    "block_sparse_attention": ("longcat_native.kernels.block_sparse_attention", "block_sparse_attention"),
    "LongCatVideoPipeline": ("longcat_native.pipelines.pipeline", "LongCatVideoPipeline"),
    "denoise": ("longcat_native.pipelines.sampler", "denoise"),
    "StepCache": ("longcat_native.runtime.step_cache", "StepCache"),
}

__all__ = ["LongCatDiT", "LongCatConfig", "LongCatVideoPipeline", "CheckpointError", "CUDAGraphRunner",
           "block_sparse_attention", "compile", "compile_model", "denoise", "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longcat_native' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
