"""Pixels in and out of the pipelines: images and videos read into ``[-1, 1]`` float tensors at a
target size (Lanczos; ``resize="stretch"``, the official preprocessing and the default, resizes as
is; ``"crop"`` covers the target and crops the centre, keeping the aspect ratio), the official
demos' uint8 frames, decoded frames written to ``.mp4`` (H.264). Pillow, imageio and imageio-ffmpeg are optional and
imported when first needed; a missing one is a :class:`MissingExtraError` naming the extra.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "PIPELINES_EXTRA", "MissingExtraError", "require", "missing_modules", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES",
    "load_image", "load_video", "read_video_frames", "write_video", "read_video_meta", "pixels_to_uint8",
    "resize_frames", "load_frames", "read_pixels", "pixel_hw", "frames_0_255", "truncate_to_uint8", "RESIZE_MODES",
]

PIPELINES_EXTRA = "pip install 'longcat-native[pipelines]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
RESIZE_MODES = ("stretch", "crop")  # the first is the default (official)
_RESAMPLE = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}

# What each optional import is for (the error says which extra provides it).
_PURPOSE = {
    "transformers": "the umT5 text encoder and tokenizer",
    "diffusers": "the Wan VAE",
    "ftfy": "prompt cleaning (as the official pipeline does it)",
    "PIL": "reading images (Pillow)",
    "imageio": "reading videos",
    "imageio_ffmpeg": "reading and writing .mp4 (imageio-ffmpeg)",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, purpose: Optional[str] = None):
    """Import ``module`` or raise :class:`MissingExtraError` naming ``longcat-native[pipelines]``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = purpose or _PURPOSE.get(module.split(".")[0], module)
        raise MissingExtraError(f"{what} needs the Python package {module.split('.')[0]!r}, which is not installed "
                                f"({e}); install the extra: {PIPELINES_EXTRA}") from None


def missing_modules(modules: Iterable[str]) -> List[str]:
    """The ``modules`` that cannot be imported, found without importing them (cheap, for checks
    made before any heavy work)."""
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


# -- resizing ------------------------------------------------------------------------------------

def _check_size(size) -> Tuple[int, int]:
    if size is None:
        return None
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in size):
        raise ValueError(f"size must be (height, width) in positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _resample(name: str):
    Image = require("PIL.Image", _PURPOSE["PIL"])
    if name not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {name!r}")
    return getattr(Image, _RESAMPLE[name])


def _resize_pil(img, size: Optional[Tuple[int, int]], resize: str, resample: str = "lanczos"):
    img = img.convert("RGB")
    if size is None or (img.height, img.width) == size:
        return img
    h, w = size
    if resize == "stretch":  # diffusers' VaeImageProcessor.resize, as the official pipeline
        return img.resize((w, h), resample=_resample(resample))
    # cover the target, then crop the centre: keeps the aspect ratio
    scale = max(h / img.height, w / img.width)
    sh, sw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
    img = img.resize((sw, sh), resample=_resample(resample))
    top, left = (sh - h) // 2, (sw - w) // 2
    return img.crop((left, top, left + w, top + h))


def resize_frames(frames: np.ndarray, size: Optional[Tuple[int, int]], resize: str = "stretch",
                  resample: str = "lanczos") -> np.ndarray:
    """uint8 frames [F, H, W, 3] -> uint8 frames [F, h, w, 3], each resized like a conditioning
    image (Pillow, ``resample`` "lanczos" as the official preprocessing; the official long-video
    demo resizes its segments back with "bicubic")."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    size = _check_size(size)
    if size is None or tuple(frames.shape[1:3]) == size:
        return frames
    Image = require("PIL.Image", _PURPOSE["PIL"])
    return np.stack([np.asarray(_resize_pil(Image.fromarray(f), size, resize, resample)) for f in frames])


def _to_unit(frames_u8: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1] with channels moved before H, W."""
    t = torch.from_numpy(np.require(frames_u8, requirements=["C", "W"])).float().div_(255.0).mul_(2.0).sub_(1.0)
    return t.movedim(-1, -3)


def _as_uint8_frames(frames, what: str) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{what} must be frames [F, H, W, 3] (RGB), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0:
            arr = np.round(arr * 255.0)  # [0, 1] floats, the official "np" output format
        elif not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{what}: pixel values must be uint8 or floats in [0, 1], got {arr.dtype} "
                             f"in [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    return arr[..., :3]


# -- reading -------------------------------------------------------------------------------------

def _check_file(path, suffixes, what: str) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist or is not a file")
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(p)!r}: unsupported file type {p.suffix!r}; use one of {', '.join(suffixes)}")
    return p


def load_image(image, size: Optional[Tuple[int, int]] = None, resize: str = "stretch") -> torch.Tensor:
    """An image -> float32 [1, 3, H, W] in [-1, 1], resized to ``size`` = (H, W) if given.

    ``image``: a file path (png/jpg/webp/bmp), a PIL image, uint8 [H, W, 3] array, or a float
    tensor [3, H, W] / [1, 3, H, W] already in [-1, 1] (then only checked; it must already have
    ``size``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    size = _check_size(size)
    if isinstance(image, torch.Tensor):
        t = image.unsqueeze(0) if image.dim() == 3 else image
        if t.dim() != 4 or t.shape[:2] != (1, 3) or not t.is_floating_point():
            raise ValueError(f"an image tensor must be float [1, 3, H, W] in [-1, 1], got {tuple(image.shape)} "
                             f"{image.dtype}")
        if size is not None and tuple(t.shape[2:]) != size:
            raise ValueError(f"image tensor is {tuple(t.shape[2:])}, expected {size}: resize it, or pass a file/PIL image")
        return t.float()
    if isinstance(image, (str, os.PathLike)):
        p = _check_file(image, IMAGE_SUFFIXES, "image")
        Image = require("PIL.Image", _PURPOSE["PIL"])
        try:
            with Image.open(p) as f:
                pil = f.convert("RGB")
        except OSError as e:
            raise ValueError(f"image {str(p)!r}: not a readable image ({e})") from None
    elif hasattr(image, "convert") and hasattr(image, "size"):
        pil = image
    else:
        Image = require("PIL.Image", _PURPOSE["PIL"])
        pil = Image.fromarray(_as_uint8_frames(image, "image")[0])
    arr = np.asarray(_resize_pil(pil, size, resize))
    return _to_unit(arr)[None]


def read_video_meta(path) -> dict:
    """``{"fps", "size": (H, W)}`` of a video file, from its header (no decoding)."""
    p = _check_file(path, VIDEO_SUFFIXES, "video")
    iio = require("imageio.v3", _PURPOSE["imageio"])
    try:
        meta = iio.immeta(p)
        props = iio.improps(p)
    except Exception as e:  # a corrupt or foreign file: name it
        raise ValueError(f"video {str(p)!r}: not a readable video ({e})") from None
    shape = props.shape  # [F, H, W, C] (F may be unknown for streams: -1/inf)
    return {"fps": meta.get("fps"), "size": (int(shape[-3]), int(shape[-2]))}


def read_video_frames(path) -> Tuple[np.ndarray, Optional[float]]:
    """All frames of a video file as uint8 [F, H, W, 3], and its frame rate (None if unknown)."""
    p = _check_file(path, VIDEO_SUFFIXES, "video")
    iio = require("imageio.v3", _PURPOSE["imageio"])
    if p.suffix.lower() != ".gif":
        require("imageio_ffmpeg", _PURPOSE["imageio_ffmpeg"])
    try:
        frames = iio.imread(p, index=None)
        fps = iio.immeta(p).get("fps")
    except Exception as e:
        raise ValueError(f"video {str(p)!r}: not a readable video ({e})") from None
    frames = _as_uint8_frames(frames, f"video {str(p)!r}")
    if frames.shape[0] == 0:
        raise ValueError(f"video {str(p)!r} has no frames")
    return frames, (float(fps) if fps else None)


def load_video(video, size: Optional[Tuple[int, int]] = None, resize: str = "stretch",
               last_frames: Optional[int] = None) -> torch.Tensor:
    """A video -> float32 [1, 3, F, H, W] in [-1, 1], each frame resized to ``size`` if given.

    ``video``: a file path, a list of PIL images or uint8 [H, W, 3] arrays, a uint8 array
    [F, H, W, 3], or a float tensor [3, F, H, W] / [1, 3, F, H, W] in [-1, 1] (checked only).
    ``last_frames`` keeps only the last n frames (video continuation conditions on those), and
    is an error when the video is shorter."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    size = _check_size(size)
    if last_frames is not None and (isinstance(last_frames, bool) or not isinstance(last_frames, int)
                                    or last_frames < 1):
        raise ValueError(f"last_frames must be a positive int, got {last_frames!r}")
    if isinstance(video, torch.Tensor):
        t = video.unsqueeze(0) if video.dim() == 4 else video
        if t.dim() != 5 or t.shape[:2] != (1, 3) or not t.is_floating_point():
            raise ValueError(f"a video tensor must be float [1, 3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        if size is not None and tuple(t.shape[3:]) != size:
            raise ValueError(f"video tensor is {tuple(t.shape[3:])}, expected {size}")
        frames_t = t.float()
        n = frames_t.shape[2]
    else:
        if isinstance(video, (str, os.PathLike)):
            frames, _ = read_video_frames(video)
        elif isinstance(video, (list, tuple)):
            if not video:
                raise ValueError("video is an empty list of frames")
            frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else _as_uint8_frames(f, "frame")[0]
                               for f in video])
        else:
            frames = _as_uint8_frames(video, "video")
        n = frames.shape[0]
        if last_frames is not None and n >= last_frames:
            frames = frames[-last_frames:]
        frames_t = None
    if last_frames is not None and n < last_frames:
        raise ValueError(f"the video has {n} frames; {last_frames} conditioning frames were asked for")
    if frames_t is not None:
        return frames_t[:, :, -last_frames:] if last_frames is not None else frames_t
    frames = resize_frames(frames, size, resize)
    return _to_unit(frames).movedim(0, 1)[None]  # [F, 3, H, W] -> [1, 3, F, H, W]


def load_frames(video) -> np.ndarray:
    """A video or an image (file path, list of PIL images or uint8 arrays, one PIL image, uint8
    array [F, H, W, 3] or [H, W, 3]) -> its uint8 frames [F, H, W, 3] (F = 1 for an image),
    unresized."""
    if isinstance(video, (str, os.PathLike)):
        if Path(os.fspath(video)).suffix.lower() in IMAGE_SUFFIXES:
            p = _check_file(video, IMAGE_SUFFIXES, "image")
            Image = require("PIL.Image", _PURPOSE["PIL"])
            try:
                with Image.open(p) as f:
                    return np.asarray(f.convert("RGB"))[None]
            except OSError as e:
                raise ValueError(f"image {str(p)!r}: not a readable image ({e})") from None
        return read_video_frames(video)[0]
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("video is an empty list of frames")
        return np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else _as_uint8_frames(f, "frame")[0]
                         for f in video])
    if hasattr(video, "convert") and hasattr(video, "size"):  # one PIL image
        return np.asarray(video.convert("RGB"))[None]
    return _as_uint8_frames(video, "video")


def read_pixels(x, what: str):
    """A pipeline's image / video input -> uint8 frames [F, H, W, 3] (:func:`load_frames`), or a
    float tensor in [-1, 1] as is; ``what`` names the argument in the error for None."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    if x is None:
        raise ValueError(f"{what} is None")
    return load_frames(x)


def pixel_hw(x) -> Tuple[int, int]:
    """(height, width) of an input :func:`read_pixels` returned (uint8 frames or a float tensor)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[-2]), int(x.shape[-1])
    return int(x.shape[-3]), int(x.shape[-2])


def frames_0_255(video) -> torch.Tensor:
    """A video -> float32 [F, 3, H, W] with values 0..255, as the official refinement reads its
    stage-1 frames (``torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2)``). A float tensor
    [1, 3, F, H, W] or [3, F, H, W] in [-1, 1] is mapped back with ``(x + 1) * 127.5``."""
    if isinstance(video, torch.Tensor) and video.is_floating_point():
        t = video.unsqueeze(0) if video.dim() == 4 else video
        if t.dim() != 5 or t.shape[:2] != (1, 3):
            raise ValueError(f"a video tensor must be float [1, 3, F, H, W] in [-1, 1], got {tuple(video.shape)}")
        return ((t[0].float() + 1) * 127.5).movedim(1, 0).contiguous()
    return torch.from_numpy(np.ascontiguousarray(load_frames(video))).permute(0, 3, 1, 2).float()


def truncate_to_uint8(frames) -> np.ndarray:
    """Float frames in [0, 1] (the official ``output_type="np"``) -> uint8 the way the official
    demos keep them: ``(x * 255).astype(np.uint8)`` (truncation, not rounding)."""
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    return (arr * 255).astype(np.uint8)


# -- writing -------------------------------------------------------------------------------------

def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3] (rounded)."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be a tensor [B, 3, F, H, W], got "
                         f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
    unit = (pixels.detach().float().cpu() / 2 + 0.5).clamp_(0, 1)
    return unit.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().numpy()


def write_video(path, frames, fps: float = 15.0, crf: int = 18) -> str:
    """Write uint8 frames [F, H, W, 3] (or float frames in [0, 1], or pixels [1, 3, F, H, W] in
    [-1, 1]) to an H.264 ``.mp4`` with imageio-ffmpeg. H and W must be even (yuv420p); nothing is
    resized. ``crf``: constant quality (the official demos use 18 at 480p, 10 for refinement).

    The video is encoded into a temporary file next to ``path`` and renamed over it only when
    ffmpeg finished a well-formed file (runtime/files.py): an interrupted or failed encode raises
    and leaves a previous file at ``path`` byte-identical."""
    from ..runtime.files import atomic_output, check_mp4

    p = Path(os.fspath(path)).expanduser()
    if p.suffix.lower() != ".mp4":
        raise ValueError(f"write_video writes .mp4 files, got {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"write_video: {str(p)!r} is a folder; name an .mp4 file")
    if isinstance(frames, torch.Tensor) and frames.dim() == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"write_video writes one video; got a batch of {frames.shape[0]}")
        frames = pixels_to_uint8(frames)[0]
    frames = _as_uint8_frames(frames.cpu().numpy() if isinstance(frames, torch.Tensor) else frames, "frames")
    F, H, W, _ = frames.shape
    if F == 0:
        raise ValueError("write_video: no frames to write")
    if H % 2 or W % 2:
        raise ValueError(f"frames are {H} x {W}: H.264 in yuv420p needs even height and width")
    if isinstance(fps, bool) or not (isinstance(fps, (int, float)) and 0 < fps < float("inf")):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be a number in [0, 51] (H.264 constant quality), got {crf!r}")
    ffmpeg = require("imageio_ffmpeg", _PURPOSE["imageio_ffmpeg"])
    with atomic_output(p, validate=check_mp4, make_parent=True) as tmp:
        writer = ffmpeg.write_frames(tmp, (W, H), fps=float(fps), codec="libx264", pix_fmt_in="rgb24",
                                     pix_fmt_out="yuv420p", macro_block_size=1, output_params=["-crf", str(int(crf))],
                                     ffmpeg_log_level="error")
        writer.send(None)  # start the ffmpeg process
        try:
            for f in frames:
                writer.send(np.ascontiguousarray(f))
        finally:
            writer.close()  # on an error too: ffmpeg stops; the temporary file is then removed
    return str(p)
