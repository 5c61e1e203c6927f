"""longcat-native: a compiled, kernel-optimized inference runtime for the LongCat-Video DiT.

``import longcat_native as lcn; dit = lcn.LongCatDiT.from_pretrained(path)``. Importing never
queries CUDA. It does import triton (a dependency): to run the fused kernels on a CPU (tests),
set ``TRITON_INTERPRET=1`` before the import.
"""

from .kernels.block_sparse_attention import block_sparse_attention
from .runtime.compiled import CUDAGraphRunner, compile_model
from .runtime.config import LongCatConfig
from .runtime.dit import LongCatDiT
from .runtime.pipelines import LongCatVideoPipeline
from .runtime.sampler import denoise
from .runtime.weights import CheckpointError

compile = compile_model  # lcn.compile(dit): torch.compile with per-device defaults, recompiles reported

__version__ = "0.1.0"

__all__ = ["LongCatDiT", "LongCatConfig", "LongCatVideoPipeline", "CheckpointError", "CUDAGraphRunner",
           "block_sparse_attention", "compile", "compile_model", "denoise", "__version__"]
