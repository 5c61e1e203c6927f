"""Shape arithmetic shared by the pipelines, the CLI and the memory estimates: the Wan VAE's
strides and tiles, the resolution buckets, video frames <-> latent frames, and the refinement's
padding. No torch."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

__all__ = ["VAE_TIME_STRIDE", "VAE_SPACE_STRIDE", "RESOLUTIONS", "BSA_LATENT_GRANULARITY", "frames_to_latents",
           "latent_size", "cond_latent_count", "refine_frame_padding", "pixel_size", "square_vae_tile"]

# Wan VAE compression: 4x in time (the first frame kept), 8x in space.
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
# The official buckets for a 16:9-ish video (480p base, 720p refinement; docs/model.md, workloads).
RESOLUTIONS = {"480p": (480, 832), "720p": (704, 1280)}
BSA_LATENT_GRANULARITY = 4  # the official refinement pads latent frame counts to multiples of 4


def frames_to_latents(num_frames: int) -> int:
    """Video frames (4k + 1) -> latent frames (k + 1)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 \
            or (num_frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"num_frames must be of the form 4k + 1 (1, 5, ..., 93), got {num_frames!r}")
    return (num_frames - 1) // VAE_TIME_STRIDE + 1


def latent_size(num_frames: int = 93, height: int = 480, width: int = 832, patch: Sequence[int] = (1, 2, 2)
                ) -> Tuple[int, int, int]:
    """(frames, height, width) in pixels -> latent (T, H, W). Height and width must be multiples of
    8 * the spatial patch (16), the frame count 4k + 1 (errors here, not the official rounding)."""
    T = frames_to_latents(num_frames)
    mult_h, mult_w = VAE_SPACE_STRIDE * patch[1], VAE_SPACE_STRIDE * patch[2]
    if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0 \
            or height % mult_h or width % mult_w:
        raise ValueError(f"height and width must be positive multiples of {mult_h} x {mult_w} pixels, "
                         f"got {height} x {width}")
    return T, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE


def cond_latent_count(num_cond_frames: int) -> int:
    if isinstance(num_cond_frames, bool) or not isinstance(num_cond_frames, int) or num_cond_frames < 1:
        raise ValueError(f"num_cond_frames must be a positive int, got {num_cond_frames!r}")
    return 1 + (num_cond_frames - 1) // VAE_TIME_STRIDE


def refine_frame_padding(num_frames: int, num_cond_frames: int = 0, spatial_refine_only: bool = False,
                         granularity: int = BSA_LATENT_GRANULARITY) -> dict:
    """The frame bookkeeping of the official pixel-space refinement of a stage-1 video of
    ``num_frames`` frames. The refined video has ``frames`` = 2 * num_frames (``num_frames`` with
    ``spatial_refine_only``). Its first ``num_cond_frames`` frames (conditioning, if any) get
    ``cond_added`` copies of the first frame in front, making ``cond_frames`` = 1 + 4 (m - 1) frames
    for m = ``cond_latents`` latents, a multiple of ``granularity``; the other frames get
    ``noise_added`` copies of the last frame at the back, making 4 n frames for n =
    ``noise_latents``, a multiple of ``granularity``. The VAE encodes ``encoded_frames`` of the
    padded frames into m + n latents, which decode to ``decoded_frames`` = 4 (m + n) - 3 frames;
    the refined video is decoded frames ``[cond_added, cond_added + frames)``."""
    for name, v, low in (("num_frames", num_frames, 1), ("num_cond_frames", num_cond_frames, 0),
                         ("granularity", granularity, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    frames = num_frames if spatial_refine_only else 2 * num_frames
    if num_cond_frames >= frames:
        raise ValueError(f"num_cond_frames={num_cond_frames} leaves nothing to refine in {frames} frames")
    m = added_c = 0
    if num_cond_frames:
        m = 1 + math.ceil((num_cond_frames - 1) / VAE_TIME_STRIDE)
        m = math.ceil(m / granularity) * granularity
        added_c = 1 + (m - 1) * VAE_TIME_STRIDE - num_cond_frames
    noise_frames = frames - num_cond_frames
    n = math.ceil(math.ceil(noise_frames / VAE_TIME_STRIDE) / granularity) * granularity
    return {"frames": frames, "cond_latents": m, "cond_added": added_c, "cond_frames": num_cond_frames + added_c,
            "noise_latents": n, "noise_added": n * VAE_TIME_STRIDE - noise_frames,
            "encoded_frames": 1 + VAE_TIME_STRIDE * (m + n - 1), "decoded_frames": VAE_TIME_STRIDE * (m + n) - 3}


def pixel_size(height: Optional[int] = None, width: Optional[int] = None, resolution: Optional[str] = None,
               default: str = "480p", patch: Sequence[int] = (1, 2, 2)) -> Tuple[int, int]:
    """(height, width) in pixels: the given ones, or the ``resolution`` bucket (480p = 480 x 832,
    720p = 704 x 1280); checked to be multiples of 8 * the patch (16)."""
    if height is not None or width is not None:
        if height is None or width is None:
            raise ValueError("give both height and width, or neither")
        h, w = height, width
    else:
        key = resolution or default
        if key not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {key!r} (or give height and width)")
        h, w = RESOLUTIONS[key]
    latent_size(1, h, w, patch)
    return h, w


def square_vae_tile(pixels: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """A square VAE tile of ``pixels`` pixels and its stride -> ``((n, n), (stride, stride))``:
    overlapping its neighbours by a quarter (diffusers' default proportion: 256 every 192)."""
    stride = max(8, (3 * pixels // 4) // 8 * 8)
    return (pixels, pixels), (stride, stride)
