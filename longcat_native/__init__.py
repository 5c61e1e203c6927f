"""longcat-native: a compiled, kernel-optimized inference runtime for the LongCat-Video DiT.

``import longcat_native as lcn; dit = lcn.LongCatDiT.from_pretrained(path)``. Nothing here
touches CUDA or imports triton at import time.
"""

from .kernels.block_sparse_attention import block_sparse_attention
from .runtime.config import LongCatConfig
from .runtime.dit import LongCatDiT
from .runtime.sampler import denoise
from .runtime.weights import CheckpointError

__version__ = "0.1.0"

__all__ = ["LongCatDiT", "LongCatConfig", "CheckpointError", "block_sparse_attention", "denoise", "__version__"]
