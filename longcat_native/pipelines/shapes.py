"""Shape arithmetic shared by the pipelines, the CLI and the memory estimates: the Wan VAE's
strides and tiles, the official aspect-ratio buckets (``utils/bukcet_config.py``) and their
lookup, video frames <-> latent frames, and the refinement's padding. No torch."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

__all__ = ["VAE_TIME_STRIDE", "VAE_SPACE_STRIDE", "RESOLUTIONS", "BSA_LATENT_GRANULARITY", "BUCKET_TABLES",
           "COND_SCALE_FACTOR", "REFINE_SCALE_FACTOR", "frames_to_latents", "latent_size", "cond_latent_count",
           "refine_frame_padding", "pixel_size", "square_vae_tile", "get_bucket_config", "closest_bucket",
           "bucket_size", "bucket_scale_factor"]

# Wan VAE compression: 4x in time (the first frame kept), 8x in space.
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
# The official buckets for a 16:9-ish video (480p base, 720p refinement; docs/model.md, workloads).
RESOLUTIONS = {"480p": (480, 832), "720p": (704, 1280)}
BSA_LATENT_GRANULARITY = 4  # the official refinement pads latent frame counts to multiples of 4

# The official aspect-ratio buckets (longcat_video/utils/bukcet_config.py): ratio key (height /
# width, two decimals, in the official insertion order) -> (height, width) in pixels. 480p tables
# are ASPECT_RATIO_627*, 720p ones ASPECT_RATIO_960*; the _F64/_F128/_F256 variants have sizes
# divisible by that spatial factor (refinement: 64 on one device).
BUCKET_TABLES = {
    "ASPECT_RATIO_627": {
        '0.26': (320, 1216), '0.31': (352, 1120), '0.38': (384, 1024), '0.43': (416, 960), '0.52': (448, 864),
        '0.58': (480, 832), '0.67': (512, 768), '0.74': (544, 736), '0.86': (576, 672), '0.95': (608, 640),
        '1.05': (640, 608), '1.17': (672, 576), '1.29': (704, 544), '1.35': (736, 544), '1.50': (768, 512),
        '1.67': (800, 480), '1.73': (832, 480), '2.00': (896, 448), '2.31': (960, 416), '2.58': (992, 384),
        '2.75': (1056, 384), '3.09': (1088, 352), '3.70': (1184, 320), '3.80': (1216, 320), '3.90': (1248, 320),
        '4.00': (1280, 320),
    },
    "ASPECT_RATIO_627_F64": {
        '0.26': (320, 1216), '0.38': (384, 1024), '0.50': (448, 896), '0.67': (512, 768), '0.82': (576, 704),
        '1.00': (640, 640), '1.22': (704, 576), '1.50': (768, 512), '1.86': (832, 448), '2.00': (896, 448),
        '2.50': (960, 384), '2.83': (1088, 384), '3.60': (1152, 320), '3.80': (1216, 320), '4.00': (1280, 320),
    },
    "ASPECT_RATIO_627_F128": {
        '0.25': (256, 1024), '0.38': (384, 1024), '0.43': (384, 896), '0.57': (512, 896), '0.67': (512, 768),
        '1.00': (640, 640), '1.50': (768, 512), '1.75': (896, 512), '2.33': (896, 384), '2.67': (1024, 384),
        '4.00': (1024, 256),
    },
    "ASPECT_RATIO_627_F256": {
        '0.25': (256, 1024), '0.33': (256, 768), '0.50': (256, 512), '0.67': (512, 768), '1.00': (512, 512),
        '1.50': (768, 512), '2.00': (512, 256), '3.00': (768, 256), '4.00': (1024, 256),
    },
    "ASPECT_RATIO_960": {
        '0.25': (480, 1920), '0.29': (512, 1792), '0.32': (544, 1696), '0.36': (576, 1600), '0.40': (608, 1504),
        '0.49': (672, 1376), '0.54': (704, 1312), '0.59': (736, 1248), '0.69': (800, 1152), '0.74': (832, 1120),
        '0.82': (864, 1056), '0.88': (896, 1024), '0.94': (928, 992), '1.00': (960, 960), '1.07': (992, 928),
        '1.14': (1024, 896), '1.22': (1056, 864), '1.31': (1088, 832), '1.35': (1120, 832), '1.44': (1152, 800),
        '1.70': (1248, 736), '2.00': (1344, 672), '2.05': (1376, 672), '2.47': (1504, 608), '2.53': (1536, 608),
        '2.83': (1632, 576), '3.06': (1664, 544), '3.12': (1696, 544), '3.62': (1856, 512), '3.93': (1888, 480),
        '4.00': (1920, 480),
    },
    "ASPECT_RATIO_960_F64": {
        '0.22': (448, 2048), '0.29': (512, 1792), '0.36': (576, 1600), '0.45': (640, 1408), '0.55': (704, 1280),
        '0.63': (768, 1216), '0.76': (832, 1088), '0.88': (896, 1024), '1.00': (960, 960), '1.14': (1024, 896),
        '1.31': (1088, 832), '1.50': (1152, 768), '1.58': (1216, 768), '1.82': (1280, 704), '1.91': (1344, 704),
        '2.20': (1408, 640), '2.30': (1472, 640), '2.67': (1536, 576), '2.89': (1664, 576), '3.62': (1856, 512),
        '3.75': (1920, 512),
    },
    "ASPECT_RATIO_960_F128": {
        '0.20': (384, 1920), '0.27': (512, 1920), '0.33': (512, 1536), '0.42': (640, 1536), '0.50': (640, 1280),
        '0.60': (768, 1280), '0.67': (768, 1152), '0.78': (896, 1152), '1.00': (1024, 1024), '1.29': (1152, 896),
        '1.50': (1152, 768), '1.67': (1280, 768), '2.00': (1280, 640), '2.40': (1536, 640), '3.00': (1536, 512),
        '3.75': (1920, 512), '5.00': (1920, 384),
    },
    "ASPECT_RATIO_960_F256": {
        '0.33': (512, 1536), '0.60': (768, 1280), '1.00': (1024, 1024), '1.67': (1280, 768), '3.00': (1536, 512),
    },
}
# resolution -> {scale_factor_spatial: table}, the official get_bucket_config
_BUCKET_CONFIG = {
    res: {16: base, 32: base, 64: base + "_F64", 128: base + "_F128", 256: base + "_F256"}
    for res, base in (("480p", "ASPECT_RATIO_627"), ("720p", "ASPECT_RATIO_960"))
}
# The official spatial factors: image-to-video / continuation take buckets divisible by
# vae_scale_factor_spatial (8) * patch (2) = 16, refinement by 16 * 4 = 64; both times the largest
# context-parallel split (cp_split_hw), e.g. 32 and 128 with cp_split_hw [1, 2].
COND_SCALE_FACTOR = 16
REFINE_SCALE_FACTOR = 64


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


# -- the official aspect-ratio buckets -------------------------------------------------------------

def bucket_scale_factor(refine: bool = False, cp_split_hw: Optional[Sequence[int]] = None) -> int:
    """The official ``scale_factor_spatial`` of a bucket lookup: 16 (image-to-video, continuation)
    or 64 (refinement), times ``max(cp_split_hw)``."""
    base = REFINE_SCALE_FACTOR if refine else COND_SCALE_FACTOR
    return base * (max(int(v) for v in cp_split_hw) if cp_split_hw else 1)


def get_bucket_config(resolution: str, scale_factor_spatial: int = COND_SCALE_FACTOR, buckets=None) -> dict:
    """The official ``get_bucket_config``: the table of ``resolution`` ("480p" or "720p") for
    ``scale_factor_spatial`` (16 or 32: the base table; 64, 128, 256: the _F tables). ``buckets``
    (``{resolution: {ratio_key: (height, width)}}``) replaces the official tables, whatever the
    factor (e.g. small tables for tests)."""
    if buckets is not None:
        if resolution not in buckets:
            raise ValueError(f"resolution {resolution!r} is not in the given bucket tables ({sorted(buckets)})")
        return buckets[resolution]
    if resolution not in _BUCKET_CONFIG:
        raise ValueError(f"resolution must be one of {sorted(_BUCKET_CONFIG)} (the official bucket tables), "
                         f"got {resolution!r}; or give height and width")
    names = _BUCKET_CONFIG[resolution]
    if scale_factor_spatial not in names:
        raise ValueError(f"the official buckets have tables for spatial factors {sorted(names)}, got "
                         f"{scale_factor_spatial}")
    return BUCKET_TABLES[names[scale_factor_spatial]]


def closest_bucket(height: int, width: int, table: dict) -> Tuple[int, int]:
    """The official ``get_condition_shape`` on a table: the entry whose ratio key is closest to
    ``height / width`` (on an exact tie the first in the table's order, as the official stable
    sort), as (height, width)."""
    if not (height > 0 and width > 0):
        raise ValueError(f"a condition of {height} x {width} pixels has no aspect ratio")
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))  # min keeps the first of equal keys
    h, w = table[key]
    return int(h), int(w)


def bucket_size(height: int, width: int, resolution: str = "480p", scale_factor_spatial: int = COND_SCALE_FACTOR,
                buckets=None) -> Tuple[int, int]:
    """(height, width) of the official bucket for an input of ``height`` x ``width`` pixels at
    ``resolution`` (:func:`get_bucket_config` then :func:`closest_bucket`); the input is then
    resized to it."""
    return closest_bucket(height, width, get_bucket_config(resolution, scale_factor_spatial, buckets))
