"""longcat-native: a compiled, kernel-optimized inference runtime for the LongCat-Video DiT.

``import longcat_native as lcn; dit = lcn.LongCatDiT.from_pretrained(path)``. Nothing here
touches CUDA or imports triton at import time.
"""

from .runtime.config import LongCatConfig
from .runtime.dit import LongCatDiT
from .runtime.weights import CheckpointError

__version__ = "0.1.0"

__all__ = ["LongCatDiT", "LongCatConfig", "CheckpointError", "__version__"]
