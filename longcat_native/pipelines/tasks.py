"""The tensor-level tasks: text-to-video, image-to-video, video continuation, long video and
480p -> 720p refinement, built on :func:`~longcat_native.pipelines.sampler.denoise`.

Two levels, one job each:

- The functions (``generate_t2v``, ``generate_i2v``, ``generate_vc``, ``generate_long``,
  ``generate_refine``, ``generate``) work on tensors only: precomputed umT5 embeddings + masks in,
  (normalized) VAE latents for conditioning, latents out. They need nothing but the DiT.
- :class:`LongCatVideoPipeline` holds the DiT with the umT5 text encoder and the Wan VAE
  (:mod:`~longcat_native.pipelines.components`, loaded by ``LongCatVideoPipeline.from_pretrained(root)``
  from an official checkpoint root; ``pip install 'longcat-native[pipelines]'``). It takes prompt
  strings and pixel images/videos, encodes them, calls the functions above, and decodes the result
  (``output_type`` "np", "pt", "video" or "latent"). The text encoder leaves the GPU once the
  prompts are encoded; the VAE decodes in tiles.

They follow the official ``LongCatVideoPipeline`` (``generate_t2v``, ``generate_i2v``,
``generate_vc``, ``generate_refine`` and ``run_demo_long_video.py``) step for step. Where the
official pipeline decodes and re-encodes in the middle of a task, the functions stay in latent
space (documented per function): video continuation and long video take the last
``num_cond_frames`` frames' latents (``1 + (num_cond_frames - 1) // 4``) directly, and
:func:`generate_refine` upsamples the stage-1 *latents* (trilinear, ``align_corners=True``).
``LongCatVideoPipeline.generate_refine`` on a stage-1 *video* does what the official pipeline
does: upsample the frames, pad them, encode them with the VAE.

Noise is drawn from a CPU ``torch.Generator`` (``seed`` or ``generator``) in float32 and moved to
the model's device, so a seed gives the same latents on every device.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .media import PIPELINES_EXTRA
from .sampler import DEFAULT_SHIFT, denoise
from .shapes import (BSA_LATENT_GRANULARITY, VAE_TIME_STRIDE, cond_latent_count, frames_to_latents,
                     latent_size)

__all__ = [
    "TASKS", "OFFICIAL_DEMO_NEGATIVE_PROMPT", "LoRAAndBSA", "make_noise", "generate", "generate_t2v", "generate_i2v",
    "generate_vc", "generate_long", "generate_refine", "upsample_latents",
]

TASKS = ("t2v", "i2v", "vc", "long", "refine")
# The official pipeline's default negative prompt is the empty string; its demo scripts pass this one.
OFFICIAL_DEMO_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


def model_patch(dit) -> Tuple[int, int, int]:
    cfg = getattr(dit, "config", None)
    return tuple(getattr(cfg, "patch_size", (1, 2, 2)))


def model_channels(dit) -> int:
    cfg = getattr(dit, "config", None)
    return int(getattr(cfg, "in_channels", 16))


def resolve_latent_size(dit, latent, num_frames, height, width) -> Tuple[int, int, int]:
    if latent is not None:
        if len(latent) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in latent):
            raise ValueError(f"latent_size must be three positive ints (T, H, W), got {latent!r}")
        T, H, W = latent
        _, ph, pw = model_patch(dit)
        if H % ph or W % pw:
            raise ValueError(f"latent H x W = {H} x {W} must be divisible by the patch size {ph} x {pw}")
        return T, H, W
    return latent_size(num_frames, height, width, model_patch(dit))


_USE_PIPELINE = ("LongCatVideoPipeline.from_pretrained(checkpoint_root) loads the umT5 text encoder and the Wan VAE "
                 f"and takes prompt strings, pixels and decoded output (`{PIPELINES_EXTRA}`)")


def _check_output_type(output_type: str) -> None:
    if output_type != "latent":
        raise ValueError(
            f"output_type={output_type!r}: the pipeline functions return latents (output_type='latent'); decoding "
            f"needs the Wan VAE: {_USE_PIPELINE}"
        )


def _check_text(prompt_embeds, negative_embeds, guidance_scale) -> None:
    for name, e in (("prompt_embeds", prompt_embeds), ("negative_embeds", negative_embeds)):
        if isinstance(e, str) or (isinstance(e, (list, tuple)) and e and isinstance(e[0], str)):
            raise ValueError(
                f"{name} is a prompt string; the pipeline functions take precomputed embeddings "
                f"[B, 1, L, caption_channels] and their mask. For prompt strings: {_USE_PIPELINE}"
            )
    if not isinstance(prompt_embeds, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a tensor [B, 1, L, C], got {type(prompt_embeds).__name__}")
    if float(guidance_scale) > 1 and negative_embeds is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_embeds (the official pipeline "
                         "encodes the negative prompt or the empty string); or use guidance_scale <= 1")


def _check_pixels(**pixel_inputs) -> None:
    for name, value in pixel_inputs.items():
        if value is not None:
            raise ValueError(
                f"{name}= takes pixels; the pipeline functions take normalized VAE latents. For pixels: {_USE_PIPELINE}"
            )


def _check_cond(name: str, lat, dit, frames: Optional[int] = None) -> torch.Tensor:
    if not isinstance(lat, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [B, C, T, H, W], got {type(lat).__name__}")
    if lat.dim() == 4 and frames == 1:
        lat = lat.unsqueeze(2)  # an image latent [B, C, H, W]
    if lat.dim() != 5:
        raise ValueError(f"{name} must be a 5-D tensor [B, C, T, H, W], got {tuple(lat.shape)}")
    C = model_channels(dit)
    if lat.shape[1] != C:
        raise ValueError(f"{name} has {lat.shape[1]} channels, the model takes {C}")
    if frames is not None and lat.shape[2] != frames:
        raise ValueError(f"{name} must have {frames} latent frame(s), got {lat.shape[2]} ({tuple(lat.shape)})")
    _, ph, pw = model_patch(dit)
    if lat.shape[3] % ph or lat.shape[4] % pw or min(lat.shape) == 0:
        raise ValueError(f"{name} {tuple(lat.shape)}: latent H and W must be non-zero multiples of {ph} x {pw}")
    if not lat.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {lat.dtype}")
    return lat


def _batch(prompt_embeds: torch.Tensor) -> int:
    return int(prompt_embeds.shape[0])


def make_noise(shape, seed: Optional[int] = 0, generator: Optional[torch.Generator] = None,
               device=None) -> torch.Tensor:
    """float32 standard normal noise drawn on the CPU (device-independent), moved to ``device``."""
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def _generator(seed, generator) -> torch.Generator:
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU, then moved)")
        return generator
    return torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))


def model_device(dit):
    return getattr(dit, "device", torch.device("cpu"))


# -- LoRA / BSA switching -----------------------------------------------------------------------

def find_lora_file(dit, key: str) -> Optional[Path]:
    ckpt = getattr(dit, "checkpoint_path", None)
    if not ckpt:
        return None
    for root in (Path(ckpt), Path(ckpt).parent):
        f = root / "lora" / f"{key}.safetensors"
        if f.is_file():
            return f
    return None


class LoRAAndBSA:
    """Enables a LoRA and/or BSA on the model for the duration of a ``with`` block, if asked, and
    only through the model's own ``load_lora``/``enable_loras``/``enable_bsa`` methods; what it
    enabled is switched off again on exit (``disable_all_loras``/``disable_bsa``)."""

    def __init__(self, dit, lora: Optional[str], lora_path=None, bsa: bool = False, lora_kwargs=None):
        self.dit, self.lora, self.lora_path, self.bsa = dit, lora, lora_path, bool(bsa)
        self.lora_kwargs = dict(lora_kwargs or {})
        self.check()

    def check(self) -> None:
        dit = self.dit
        if self.lora:
            if not hasattr(dit, "enable_loras"):
                raise NotImplementedError(f"lora={self.lora!r}: this model has no enable_loras()")
            if self.lora not in (getattr(dit, "lora_dict", None) or {}):
                path = self.lora_path or find_lora_file(dit, self.lora)
                if path is None:
                    raise ValueError(f"lora={self.lora!r} is not loaded and no lora/{self.lora}.safetensors was found "
                                     "next to the checkpoint; pass lora_path= or load it with dit.load_lora()")
                if not os.path.isfile(path):
                    raise ValueError(f"lora_path {path} is not a file")
                if not hasattr(dit, "load_lora"):
                    raise NotImplementedError(f"lora={self.lora!r}: this model has no load_lora()")
                self.lora_path = path
        if self.bsa and not hasattr(dit, "enable_bsa"):
            raise NotImplementedError("enable_bsa=True: this model has no enable_bsa()")

    def __enter__(self):
        dit = self.dit
        if self.lora:
            if self.lora not in (getattr(dit, "lora_dict", None) or {}):
                dit.load_lora(str(self.lora_path), self.lora, **self.lora_kwargs)
            dit.enable_loras([self.lora])
        if self.bsa:
            dit.enable_bsa()
        return self

    def __exit__(self, *exc):
        if self.bsa and hasattr(self.dit, "disable_bsa"):
            self.dit.disable_bsa()
        if self.lora and hasattr(self.dit, "disable_all_loras"):
            self.dit.disable_all_loras()
        return False


# -- pipelines -----------------------------------------------------------------------------------

def generate_t2v(
    dit,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    *,
    num_frames: int = 93,
    height: int = 480,
    width: int = 832,
    latent: Optional[Tuple[int, int, int]] = None,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    distill: bool = False,
    shift: float = DEFAULT_SHIFT,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    lora: Optional[str] = None,
    lora_path=None,
    lora_kwargs: Optional[dict] = None,
    output_type: str = "latent",
    progress: bool = True,
    callback: Optional[Callable] = None,
) -> torch.Tensor:
    """Text-to-video (official ``generate_t2v``): latents [B, 16, T, H, W] for ``num_frames`` x
    ``height`` x ``width`` (or ``latent=(T, H, W)``). The official settings: 50 steps, guidance 4
    (base); ``distill=True``, 16 steps, guidance 1 with ``lora='cfg_step_lora'`` (distilled)."""
    _check_output_type(output_type)
    _check_text(prompt_embeds, negative_embeds, guidance_scale)
    T, H, W = resolve_latent_size(dit, latent, num_frames, height, width)
    B = _batch(prompt_embeds)
    shape = (B, model_channels(dit), T, H, W)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")
    extras = LoRAAndBSA(dit, lora, lora_path, lora_kwargs=lora_kwargs)
    if noise is None:
        noise = make_noise(shape, generator=_generator(seed, generator), device=model_device(dit))
    with extras:
        return denoise(dit, noise, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                       num_steps=num_steps, guidance_scale=guidance_scale, distill=distill, shift=shift,
                       progress=progress, callback=callback)


def generate_i2v(
    dit,
    image_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    *,
    num_frames: int = 93,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    distill: bool = False,
    shift: float = DEFAULT_SHIFT,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    lora: Optional[str] = None,
    lora_path=None,
    lora_kwargs: Optional[dict] = None,
    image=None,
    output_type: str = "latent",
    progress: bool = True,
    callback: Optional[Callable] = None,
) -> torch.Tensor:
    """Image-to-video (official ``generate_i2v``): the first latent frame is ``image_latents``
    [B or 1, 16, 1, H, W] (the VAE latent of the image), kept fixed with timestep 0; the other
    ``T - 1`` frames are generated. Returns [B, 16, T, H, W] with frame 0 equal to the image latent."""
    _check_output_type(output_type)
    _check_pixels(image=image)
    _check_text(prompt_embeds, negative_embeds, guidance_scale)
    image_latents = _check_cond("image_latents", image_latents, dit, frames=1)
    T = frames_to_latents(num_frames)
    if T < 2:
        raise ValueError(f"num_frames={num_frames} gives a single latent frame: nothing to generate after the image")
    B = _batch(prompt_embeds)
    if image_latents.shape[0] not in (1, B):
        raise ValueError(f"image_latents has batch {image_latents.shape[0]}, the prompts {B}")
    shape = (B, model_channels(dit), T, image_latents.shape[3], image_latents.shape[4])
    extras = LoRAAndBSA(dit, lora, lora_path, lora_kwargs=lora_kwargs)
    noise = make_noise(shape, generator=_generator(seed, generator), device=model_device(dit))
    with extras:
        return denoise(dit, noise, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                       num_steps=num_steps, guidance_scale=guidance_scale, distill=distill, shift=shift,
                       cond_latents=image_latents, progress=progress, callback=callback)


def generate_vc(
    dit,
    video_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    *,
    num_frames: int = 93,
    num_cond_frames: int = 13,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    distill: bool = False,
    shift: float = DEFAULT_SHIFT,
    enhance_hf: Optional[bool] = None,
    use_kv_cache: bool = True,
    offload_kv_cache: bool = False,
    cfg_zero_cond_frames: bool = False,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    lora: Optional[str] = None,
    lora_path=None,
    lora_kwargs: Optional[dict] = None,
    video=None,
    output_type: str = "latent",
    progress: bool = True,
    callback: Optional[Callable] = None,
) -> torch.Tensor:
    """Video continuation (official ``generate_vc``). ``video_latents`` [B or 1, 16, Tv, H, W] are
    the latents of the video to continue; its last ``m = 1 + (num_cond_frames - 1) // 4`` latent
    frames (13 frames -> 4 latents, official default) condition a ``num_frames``-frame segment
    whose first m latent frames are those conditioning latents. Returns [B, 16, T, H, W].

    ``use_kv_cache`` (official default): the conditioning frames run once through the DiT and
    their per-block k/v are reused by every step (``kv_cache_dict``); ``use_kv_cache=False`` runs
    all frames each step (timestep 0 on the conditioning ones). With guidance the official
    no-cache path lets the conditioning frames' outputs into CFG-zero's scale while the cached path
    cannot; ``cfg_zero_cond_frames=False`` (default) leaves them out so both paths agree up to float
    rounding; ``True`` reproduces the official no-cache numbers. ``enhance_hf`` (default: on unless
    ``distill``, as officially) replaces the schedule's timesteps <= 500 by 10 uniform ones.

    Latent-space note: the official pipeline decodes, takes the last 13 *frames* and re-encodes
    them; here the last m latents are used directly.
    """
    _check_output_type(output_type)
    _check_pixels(video=video)
    _check_text(prompt_embeds, negative_embeds, guidance_scale)
    video_latents = _check_cond("video_latents", video_latents, dit)
    if enhance_hf is None:
        enhance_hf = not distill
    if enhance_hf and distill:
        raise ValueError("enhance_hf and distill cannot both be set (the official pipeline forbids it)")
    m = cond_latent_count(num_cond_frames)
    T = frames_to_latents(num_frames)
    if video_latents.shape[2] < m:
        raise ValueError(f"video_latents has {video_latents.shape[2]} latent frames; num_cond_frames="
                         f"{num_cond_frames} needs the last {m}")
    if T <= m:
        raise ValueError(f"num_frames={num_frames} ({T} latents) leaves nothing to generate after {m} "
                         f"conditioning latents (num_cond_frames={num_cond_frames})")
    B = _batch(prompt_embeds)
    if video_latents.shape[0] not in (1, B):
        raise ValueError(f"video_latents has batch {video_latents.shape[0]}, the prompts {B}")
    cond = video_latents[:, :, -m:]
    shape = (B, model_channels(dit), T, cond.shape[3], cond.shape[4])
    extras = LoRAAndBSA(dit, lora, lora_path, lora_kwargs=lora_kwargs)
    noise = make_noise(shape, generator=_generator(seed, generator), device=model_device(dit))
    with extras:
        return denoise(dit, noise, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                       num_steps=num_steps, guidance_scale=guidance_scale, distill=distill, shift=shift,
                       cond_latents=cond, enhance_hf=enhance_hf, use_kv_cache=use_kv_cache,
                       offload_kv_cache=offload_kv_cache, cfg_zero_cond_frames=cfg_zero_cond_frames,
                       progress=progress, callback=callback)


def generate_long(
    dit,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    *,
    num_segments: int = 1,
    num_frames: int = 93,
    num_cond_frames: int = 13,
    height: int = 480,
    width: int = 832,
    latent: Optional[Tuple[int, int, int]] = None,
    first_latents: Optional[torch.Tensor] = None,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    distill: bool = False,
    shift: float = DEFAULT_SHIFT,
    use_kv_cache: bool = True,
    offload_kv_cache: bool = False,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    lora: Optional[str] = None,
    lora_path=None,
    lora_kwargs: Optional[dict] = None,
    output_type: str = "latent",
    progress: bool = True,
    callback: Optional[Callable] = None,
) -> torch.Tensor:
    """Long video (official ``run_demo_long_video.py``): a text-to-video segment (or
    ``first_latents``), then ``num_segments`` continuation segments, each conditioned on the last
    ``num_cond_frames`` frames' latents of the previous one and contributing its T - m new
    latents. One generator feeds every segment. Each segment is ``num_frames`` frames (or
    ``latent=(T, H, W)``). Returns the concatenated latents [B, 16, T0 + num_segments * (T - m), H, W]
    (T0 = T, or the length of ``first_latents``).

    Latent-space note: the official demo decodes each segment, resizes it and re-encodes the last
    13 frames; here the last m latents are used directly. The official demo then refines the whole
    video segment by segment at 720p; run :func:`generate_refine` on the result for that."""
    _check_output_type(output_type)
    _check_text(prompt_embeds, negative_embeds, guidance_scale)
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    m = cond_latent_count(num_cond_frames)
    T, H, W = resolve_latent_size(dit, latent, num_frames, height, width)  # one segment's latents
    num_frames = (T - 1) * VAE_TIME_STRIDE + 1
    if T <= m:
        raise ValueError(f"segments of {T} latent frames leave nothing to generate after {m} "
                         f"conditioning latents (num_cond_frames={num_cond_frames})")
    if first_latents is not None:
        first_latents = _check_cond("first_latents", first_latents, dit)
        if first_latents.shape[2] < m:
            raise ValueError(f"first_latents has {first_latents.shape[2]} latent frames, fewer than the {m} "
                             "conditioning latents a continuation needs")
    gen = _generator(seed, generator)
    common = dict(num_steps=num_steps, guidance_scale=guidance_scale, distill=distill, shift=shift,
                  generator=gen, lora=lora, lora_path=lora_path, lora_kwargs=lora_kwargs, progress=progress,
                  callback=callback)
    if first_latents is None:
        video = generate_t2v(dit, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                             latent=(T, H, W), **common)
    else:
        video = first_latents.to(device=model_device(dit), dtype=torch.float32)
    for _ in range(num_segments):
        seg = generate_vc(dit, video, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                          num_frames=num_frames, num_cond_frames=num_cond_frames, use_kv_cache=use_kv_cache,
                          offload_kv_cache=offload_kv_cache, **common)
        if video.shape[0] != seg.shape[0]:
            video = video.expand(seg.shape[0], -1, -1, -1, -1)
        video = torch.cat([video, seg[:, :, m:]], dim=2)
    return video


def upsample_latents(latents: torch.Tensor, size: Tuple[int, int, int]) -> torch.Tensor:
    """Trilinear, ``align_corners=True`` resize of [B, C, T, H, W] latents to ``size`` (float32)."""
    return F.interpolate(latents.float(), size=tuple(size), mode="trilinear", align_corners=True)


def _pad_frames(x: torch.Tensor, multiple: int, front: bool) -> Tuple[torch.Tensor, int]:
    T = x.shape[2]
    pad = math.ceil(T / multiple) * multiple - T
    if pad == 0:
        return x, 0
    edge = x[:, :, :1] if front else x[:, :, -1:]
    rep = edge.expand(-1, -1, pad, -1, -1)
    return (torch.cat([rep, x], dim=2) if front else torch.cat([x, rep], dim=2)), pad


def generate_refine(
    dit,
    stage1_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    *,
    cond_latents: Optional[torch.Tensor] = None,
    size: Optional[Tuple[int, int]] = None,
    temporal_upsample: bool = False,
    num_steps: int = 50,
    t_thresh: float = 0.5,
    shift: float = DEFAULT_SHIFT,
    pad_frames: bool = True,
    granularity: int = BSA_LATENT_GRANULARITY,
    lora: Optional[str] = None,
    lora_path=None,
    lora_kwargs: Optional[dict] = None,
    enable_bsa: bool = False,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    stage1_video=None,
    output_type: str = "latent",
    progress: bool = True,
    callback: Optional[Callable] = None,
) -> torch.Tensor:
    """Refinement (official ``generate_refine``), on latents: upsample ``stage1_latents``
    [B, 16, T, H, W] to (T', H', W') (default ``size`` = (2H, 2W); ``temporal_upsample`` doubles
    the frame count as the official default does: T' = 2T - 1, the latents of 2x the frames),
    noise them to ``t_thresh`` (``(1 - t) x + t eps``) and denoise the truncated base schedule
    (t = 1000 t_thresh, then the ``num_steps``-step schedule's timesteps below it: 5 steps for the
    official 50 and 0.5) without guidance.

    ``cond_latents`` [B or 1, 16, m, H', W'] (already refined latents, as in the official long
    video refinement) replace the first m frames and keep timestep 0. With ``pad_frames`` the
    conditioning and the noisy frame counts are each padded up to multiples of ``granularity``
    (4, so BSA chunks tile): conditioning by repeating its first frame in front, noisy frames by
    repeating the last one at the back; the padding is cropped from the result, which is
    [B, 16, T', H', W'] (conditioning included).

    ``lora`` (e.g. ``'refinement_lora'``, loaded from the checkpoint's ``lora/`` folder if not
    already loaded) and ``enable_bsa`` switch those on for this call only (the official demo runs
    refinement with both), through the model's own methods; without them the model runs as is.
    ``lora_kwargs`` go to ``load_lora`` (``multiplier``, ``lora_network_dim``, ...); every
    pipeline takes ``lora``/``lora_path``/``lora_kwargs`` (e.g. ``'cfg_step_lora'`` with ``distill``).

    Latent-space note: the official pipeline upsamples the *decoded* stage-1 frames (bilinear,
    ``align_corners=True``, to the 720p bucket, e.g. 704 x 1280) and re-encodes them with the VAE;
    with no VAE here the latents themselves are interpolated, an approximation of that.
    """
    _check_output_type(output_type)
    _check_pixels(stage1_video=stage1_video)
    _check_text(prompt_embeds, None, 1.0)
    stage1_latents = _check_cond("stage1_latents", stage1_latents, dit)
    B = _batch(prompt_embeds)
    if stage1_latents.shape[0] not in (1, B):
        raise ValueError(f"stage1_latents has batch {stage1_latents.shape[0]}, the prompts {B}")
    _, _, T, H, W = stage1_latents.shape
    Hn, Wn = (2 * H, 2 * W) if size is None else tuple(size)
    _, ph, pw = model_patch(dit)
    if Hn <= 0 or Wn <= 0 or Hn % ph or Wn % pw:
        raise ValueError(f"refined latent size {Hn} x {Wn} must be positive multiples of the patch {ph} x {pw}")
    Tn = 2 * T - 1 if temporal_upsample else T
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be a positive int, got {granularity!r}")
    m = 0
    if cond_latents is not None:
        cond_latents = _check_cond("cond_latents", cond_latents, dit)
        m = cond_latents.shape[2]
        if cond_latents.shape[3:] != (Hn, Wn) or cond_latents.shape[0] not in (1, B):
            raise ValueError(f"cond_latents {tuple(cond_latents.shape)} must be [{B} or 1, C, m, {Hn}, {Wn}] "
                             "(latents at the refined size)")
        if m >= Tn:
            raise ValueError(f"cond_latents has {m} frames; the refined video has {Tn}: nothing to refine")
    extras = LoRAAndBSA(dit, lora, lora_path, enable_bsa, lora_kwargs)

    device = model_device(dit)
    gen = _generator(seed, generator)
    up = upsample_latents(stage1_latents.to(device), (Tn, Hn, Wn))
    if up.shape[0] != B:
        up = up.expand(B, -1, -1, -1, -1)
    noisy = up[:, :, m:]
    pad_back = pad_front = 0
    if pad_frames:
        noisy, pad_back = _pad_frames(noisy, granularity, front=False)
    eps = make_noise(noisy.shape, generator=gen, device=device)
    t = float(t_thresh)
    x = (1 - t) * noisy + t * eps
    cond = None
    if m:
        cond = cond_latents.to(device=device, dtype=torch.float32).expand(B, -1, -1, -1, -1)
        if pad_frames:
            cond, pad_front = _pad_frames(cond, granularity, front=True)
        x = torch.cat([cond, x], dim=2)
    with extras:
        out = denoise(dit, x, prompt_embeds, prompt_mask, num_steps=num_steps, guidance_scale=1.0,
                      shift=shift, t_thresh=t_thresh, cond_latents=cond, progress=progress, callback=callback)
    return out[:, :, pad_front: out.shape[2] - pad_back]


def generate(dit, task: str, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None, *,
             image_latents=None, video_latents=None, stage1_latents=None, **kwargs) -> torch.Tensor:
    """One entry for every task: ``task`` in t2v | i2v | vc | long | refine. Inputs a task does
    not take (an image for t2v, ...) are errors, raised before any model work."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    given = {"image_latents": image_latents, "video_latents": video_latents, "stage1_latents": stage1_latents}
    takes = {"t2v": set(), "long": set(), "i2v": {"image_latents"}, "vc": {"video_latents"},
             "refine": {"stage1_latents"}}[task]
    for name, value in given.items():
        if value is not None and name not in takes:
            raise ValueError(f"task {task!r} takes no {name}" + (" (text-to-video starts from noise; use task 'i2v' "
                                                                  "to condition on an image)" if task == "t2v" else ""))
    for name in takes:
        if given[name] is None:
            raise ValueError(f"task {task!r} needs {name}")
    for name in ("image", "video", "stage1_video"):
        if kwargs.get(name) is not None and task == "t2v":
            raise ValueError(f"task 't2v' takes no {name}")
    if task == "t2v":
        return generate_t2v(dit, prompt_embeds, prompt_mask, negative_embeds, negative_mask, **kwargs)
    if task == "i2v":
        return generate_i2v(dit, image_latents, prompt_embeds, prompt_mask, negative_embeds, negative_mask, **kwargs)
    if task == "vc":
        return generate_vc(dit, video_latents, prompt_embeds, prompt_mask, negative_embeds, negative_mask, **kwargs)
    if task == "long":
        return generate_long(dit, prompt_embeds, prompt_mask, negative_embeds, negative_mask, **kwargs)
    if negative_embeds is not None or negative_mask is not None:
        raise ValueError("task 'refine' runs without guidance and takes no negative prompt")
    return generate_refine(dit, stage1_latents, prompt_embeds, prompt_mask, **kwargs)
