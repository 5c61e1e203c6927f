"""The tensor-level tasks: text-to-video, image-to-video, video continuation, long video and
480p -> 720p refinement, on umT5 embeddings and normalized VAE latents (latents out), built on
:func:`~longcat_native.pipelines.sampler.denoise`. They follow the official pipeline step for
step and draw its random numbers in its order; where it decodes and re-encodes mid-task (long
video; refinement's stage-1 upsampling) these functions stay in latent space, a documented
variant (:class:`~longcat_native.pipelines.pipeline.LongCatVideoPipeline` does the official pixel
round trips). The options every task shares are :class:`SamplingOptions`; noise is drawn on the
CPU in float32, so a seed gives the same latents on every device.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .options import (USE_PIPELINE_HINT, SamplingOptions, model_channels, model_device, model_patch,
                      resolve_latent_size)
from .sampler import denoise
from .shapes import BSA_LATENT_GRANULARITY, VAE_TIME_STRIDE, cond_latent_count, frames_to_latents

__all__ = [
    "TASKS", "REFINE_RNGS", "OFFICIAL_DEMO_NEGATIVE_PROMPT", "generate", "generate_t2v", "generate_i2v", "generate_vc",
    "generate_long", "generate_refine", "upsample_latents", "repeat_for_videos",
]

TASKS = ("t2v", "i2v", "vc", "long", "refine")
# Where refinement's own draws come from (its stage-1 posterior sample and its t_thresh noise):
# "global" (official): torch's global CPU generator, as the official `retrieve_latents(...)`
# without a generator and `torch.randn_like`; "generator": the call's seed / generator.
REFINE_RNGS = ("global", "generator")
# The official pipeline's default negative prompt is the empty string; its demo scripts pass this one.
OFFICIAL_DEMO_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


def _check_text(prompt_embeds, negative_embeds, guidance_scale) -> None:
    for name, e in (("prompt_embeds", prompt_embeds), ("negative_embeds", negative_embeds)):
        if isinstance(e, str) or (isinstance(e, (list, tuple)) and e and isinstance(e[0], str)):
            raise ValueError(
                f"{name} is a prompt string; the pipeline functions take precomputed embeddings "
                f"[B, 1, L, caption_channels] and their mask. For prompt strings: {USE_PIPELINE_HINT}"
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
                f"{name}= takes pixels; the pipeline functions take normalized VAE latents. For pixels: {USE_PIPELINE_HINT}"
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


# -- LoRA / BSA switching -----------------------------------------------------------------------


# -- the options every task shares ---------------------------------------------------------------


def _check_batch(name: str, lat: torch.Tensor, prompt_embeds: torch.Tensor) -> int:
    B = _batch(prompt_embeds)
    if lat.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {lat.shape[0]}, the prompts {B}")
    return B


def repeat_for_videos(x: Optional[torch.Tensor], n: int, broadcast: bool = False) -> Optional[torch.Tensor]:
    """Each batch item ``n`` times, consecutively (the official ``num_videos_per_prompt``
    layout: prompt 0's videos, then prompt 1's); None passes, and with ``broadcast`` so does a
    batch-1 tensor (conditioning latents shared by every video)."""
    if x is None or n == 1 or (broadcast and x.shape[0] == 1):
        return x
    return x.repeat_interleave(n, dim=0)


def _videos_per_prompt(s: SamplingOptions, text, *conds):
    """The text (and the conditioning latents) repeated for ``num_videos_per_prompt``."""
    n = s.num_videos_per_prompt
    text = tuple(repeat_for_videos(t, n) for t in text)
    return (text,) + tuple(repeat_for_videos(c, n, broadcast=True) for c in conds)


def _check_latents(latents, shape) -> Optional[torch.Tensor]:
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be {tuple(shape)} (batch = prompts x num_videos_per_prompt), got {got}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    return latents


# -- tasks ---------------------------------------------------------------------------------------

def generate_t2v(dit, prompt_embeds: torch.Tensor, prompt_mask=None, negative_embeds=None, negative_mask=None, *,
                 num_frames: int = 93, height: int = 480, width: int = 832,
                 latent: Optional[Tuple[int, int, int]] = None, latents: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, **sampling) -> torch.Tensor:
    """Text-to-video (official ``generate_t2v``): latents [B, 16, T, H, W] for ``num_frames`` x
    ``height`` x ``width`` (or ``latent=(T, H, W)``), from ``latents`` (the initial noise, official
    name; ``noise`` is the same) or, by default, noise drawn from the generator. ``sampling``:
    :class:`SamplingOptions`. The official settings: 50 steps, guidance 4 (base);
    ``distill=True``, 16 steps, guidance 1 with ``lora='cfg_step_lora'`` (distilled)."""
    s = SamplingOptions.take("generate_t2v", sampling)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
    if noise is not None and latents is not None and noise is not latents:
        raise ValueError("give latents= or noise= (the same thing), not both")
    latents = noise if latents is None else latents
    T, H, W = resolve_latent_size(dit, latent, num_frames, height, width)
    text, = _videos_per_prompt(s, (prompt_embeds, prompt_mask, negative_embeds, negative_mask))
    shape = (_batch(text[0]), model_channels(dit), T, H, W)
    latents = _check_latents(latents, shape)
    return s.sample(dit, shape, text, noise=latents)


def generate_i2v(dit, image_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None,
                 negative_embeds=None, negative_mask=None, *, num_frames: int = 93,
                 latents: Optional[torch.Tensor] = None, image=None, **sampling) -> torch.Tensor:
    """Image-to-video (official ``generate_i2v``): the first latent frame is ``image_latents``
    [B or 1, 16, 1, H, W] (the normalized VAE latent of the image), kept fixed with timestep 0;
    the other ``T - 1`` frames are generated from ``latents`` (the initial noise of all T frames,
    official name) or noise drawn from the generator. With guidance, CFG-zero's scale covers all
    frames, the image's included, as officially. Returns [B, 16, T, H, W] with frame 0 equal to the
    image latent. ``sampling``: :class:`SamplingOptions`."""
    s = SamplingOptions.take("generate_i2v", sampling)
    _check_pixels(image=image)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
    image_latents = _check_cond("image_latents", image_latents, dit, frames=1)
    T = frames_to_latents(num_frames)
    if T < 2:
        raise ValueError(f"num_frames={num_frames} gives a single latent frame: nothing to generate after the image")
    _check_batch("image_latents", image_latents, prompt_embeds)
    text, image_latents = _videos_per_prompt(s, (prompt_embeds, prompt_mask, negative_embeds, negative_mask),
                                             image_latents)
    shape = (_batch(text[0]), model_channels(dit), T, image_latents.shape[3], image_latents.shape[4])
    return s.sample(dit, shape, text, noise=_check_latents(latents, shape), cond_latents=image_latents)


def generate_vc(dit, video_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None,
                negative_embeds=None, negative_mask=None, *, num_frames: int = 93, num_cond_frames: int = 13,
                enhance_hf: Optional[bool] = None, use_kv_cache: bool = True, offload_kv_cache: bool = False,
                cfg_zero_cond_frames: bool = True, latents: Optional[torch.Tensor] = None, video=None,
                **sampling) -> torch.Tensor:
    """Video continuation (official ``generate_vc``). ``video_latents`` [B or 1, 16, Tv, H, W] are
    the latents of the video to continue; its last ``m = 1 + (num_cond_frames - 1) // 4`` latent
    frames (13 frames -> 4 latents, official default) condition a ``num_frames``-frame segment
    whose first m latent frames are those conditioning latents; the others start from
    ``latents`` (the initial noise of all T frames, official name) or noise drawn from the
    generator. Returns [B, 16, T, H, W]. ``sampling``: :class:`SamplingOptions`.

    ``use_kv_cache`` (official default): the conditioning frames run once through the DiT and
    their per-block k/v are reused by every step (``kv_cache_dict``); ``use_kv_cache=False`` runs
    all frames each step (timestep 0 on the conditioning ones). Without the cache and with
    guidance, ``cfg_zero_cond_frames=True`` (default, official) takes CFG-zero's scale over all
    latent frames, the conditioning ones included; ``False`` leaves them out, which makes the
    no-cache path equal the cached one up to float rounding (not the official numbers).
    ``enhance_hf`` (default: on unless ``distill``, as officially) replaces the schedule's
    timesteps <= 500 by 10 uniform ones.

    Latent-space note: the official pipeline encodes the last 13 *frames* of a pixel video
    (:meth:`LongCatVideoPipeline.generate_vc`); here the last m latents of ``video_latents`` are
    used directly.
    """
    s = SamplingOptions.take("generate_vc", sampling)
    _check_pixels(video=video)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
    video_latents = _check_cond("video_latents", video_latents, dit)
    if enhance_hf is None:
        enhance_hf = not s.distill
    if enhance_hf and s.distill:
        raise ValueError("enhance_hf and distill cannot both be set (the official pipeline forbids it)")
    m = cond_latent_count(num_cond_frames)
    T = frames_to_latents(num_frames)
    if video_latents.shape[2] < m:
        raise ValueError(f"video_latents has {video_latents.shape[2]} latent frames; num_cond_frames="
                         f"{num_cond_frames} needs the last {m}")
    if T <= m:
        raise ValueError(f"num_frames={num_frames} ({T} latents) leaves nothing to generate after {m} "
                         f"conditioning latents (num_cond_frames={num_cond_frames})")
    _check_batch("video_latents", video_latents, prompt_embeds)
    text, cond = _videos_per_prompt(s, (prompt_embeds, prompt_mask, negative_embeds, negative_mask),
                                    video_latents[:, :, -m:])
    shape = (_batch(text[0]), model_channels(dit), T, cond.shape[3], cond.shape[4])
    return s.sample(dit, shape, text, noise=_check_latents(latents, shape), cond_latents=cond,
                    enhance_hf=enhance_hf, use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache,
                    cfg_zero_cond_frames=cfg_zero_cond_frames)


def _per_segment(name: str, value, n: int):
    """A tensor (or None) for every segment, or a list / tuple of n of them."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} segments (one per generated segment)")
        return list(value)
    return [value] * n


def generate_long(dit, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None, *,
                  num_segments: Optional[int] = None, num_frames: int = 93, num_cond_frames: int = 13,
                  height: int = 480, width: int = 832, latent: Optional[Tuple[int, int, int]] = None,
                  first_latents: Optional[torch.Tensor] = None, use_kv_cache: bool = True,
                  offload_kv_cache: bool = False, enhance_hf: Optional[bool] = None,
                  cfg_zero_cond_frames: bool = True, latents: Optional[torch.Tensor] = None,
                  **sampling) -> torch.Tensor:
    """Long video chained in latent space (the ``chain="latent"`` variant of the official
    ``run_demo_long_video.py``): a text-to-video segment (or ``first_latents``), then
    ``num_segments`` continuation segments, each conditioned on the last ``num_cond_frames``
    frames' latents of the previous one and contributing its T - m new latents. One generator
    feeds every segment, in order. Each segment is ``num_frames`` frames (or ``latent=(T, H, W)``).
    Returns the concatenated latents [B, 16, T0 + num_segments * (T - m), H, W] (T0 = T, or the
    length of ``first_latents``). ``latents``: the first (text-to-video) segment's initial noise.
    ``sampling``: :class:`SamplingOptions`.

    Interactive long video (official ``run_demo_interactive_video.py``): ``prompt_embeds`` (and
    ``prompt_mask``, ``negative_embeds``, ``negative_mask`` if they differ per segment) may be
    lists, one entry per generated segment (the text-to-video one first, unless
    ``first_latents`` is given); ``num_segments`` then follows from their length.

    Latent-space note: the official demo decodes each segment to uint8 frames and re-encodes the
    last 13 of them (:meth:`LongCatVideoPipeline.generate_long`, its default ``chain="pixels"``);
    here the last m latents are used directly: faster, not the official numbers."""
    s = SamplingOptions.take("generate_long", sampling)
    lists = [v for v in (prompt_embeds, prompt_mask, negative_embeds, negative_mask) if isinstance(v, (list, tuple))]
    first = 0 if first_latents is not None else 1
    if lists:
        n_gen = len(lists[0])
        if num_segments is not None and num_segments + first != n_gen:
            raise ValueError(f"num_segments={num_segments} but {n_gen} per-segment prompts (one per generated "
                             f"segment{', the text-to-video one first' if first else ''})")
        num_segments = n_gen - first
    elif num_segments is None:
        num_segments = 1
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
    n_gen = num_segments + first
    texts = list(zip(*(_per_segment(name, v, n_gen) for name, v in (
        ("prompt_embeds", prompt_embeds), ("prompt_mask", prompt_mask), ("negative_embeds", negative_embeds),
        ("negative_mask", negative_mask)))))
    for text in texts:
        _check_text(text[0], text[2], s.guidance_scale)
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
        if latents is not None:
            raise ValueError("latents= is the text-to-video segment's noise; with first_latents there is none")
    # The prompts repeated once for num_videos_per_prompt; every segment then runs at that batch.
    texts = [_videos_per_prompt(s, text)[0] for text in texts]
    common = s.as_kwargs(generator=s.rng(), num_videos_per_prompt=1)
    if first_latents is None:
        video = generate_t2v(dit, *texts[0], latent=(T, H, W), latents=latents, **common)
    else:
        video = repeat_for_videos(first_latents.to(device=model_device(dit), dtype=torch.float32),
                                  s.num_videos_per_prompt, broadcast=True)
    for text in texts[first:]:
        seg = generate_vc(dit, video, *text, num_frames=num_frames, num_cond_frames=num_cond_frames,
                          use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache, enhance_hf=enhance_hf,
                          cfg_zero_cond_frames=cfg_zero_cond_frames, **common)
        if video.shape[0] != seg.shape[0]:
            video = video.expand(seg.shape[0], -1, -1, -1, -1)
        video = torch.cat([video, seg[:, :, m:]], dim=2)
    return video


def upsample_latents(latents: torch.Tensor, size: Tuple[int, int, int]) -> torch.Tensor:
    """Trilinear, ``align_corners=True`` resize of [B, C, T, H, W] latents to ``size`` (float32;
    a no-op when the size is already that)."""
    if tuple(latents.shape[2:]) == tuple(size):
        return latents.float()
    return F.interpolate(latents.float(), size=tuple(size), mode="trilinear", align_corners=True)


def _pad_frames(x: torch.Tensor, multiple: int, front: bool) -> Tuple[torch.Tensor, int]:
    T = x.shape[2]
    pad = math.ceil(T / multiple) * multiple - T
    if pad == 0:
        return x, 0
    edge = x[:, :, :1] if front else x[:, :, -1:]
    rep = edge.expand(-1, -1, pad, -1, -1)
    return (torch.cat([rep, x], dim=2) if front else torch.cat([x, rep], dim=2)), pad


def check_refine_rng(refine_rng: str) -> str:
    if refine_rng not in REFINE_RNGS:
        raise ValueError(f"refine_rng must be one of {REFINE_RNGS}, got {refine_rng!r}")
    return refine_rng


def refine_noise(shape, refine_rng: str, generator: torch.Generator, device=None) -> torch.Tensor:
    """Refinement's own standard normal draw of ``shape`` (float32, on the CPU, then moved): from
    torch's global CPU generator (``refine_rng="global"``, official) or ``generator``."""
    gen = None if check_refine_rng(refine_rng) == "global" else generator
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device)


def generate_refine(dit, stage1_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None, *,
                    cond_latents: Optional[torch.Tensor] = None, size: Optional[Tuple[int, int]] = None,
                    temporal_upsample: bool = False, t_thresh: float = 0.5, pad_frames: bool = True,
                    granularity: int = BSA_LATENT_GRANULARITY, enable_bsa: bool = False,
                    refine_rng: str = "global", latents: Optional[torch.Tensor] = None, stage1_video=None,
                    **sampling) -> torch.Tensor:
    """Refinement (official ``generate_refine``), on latents: ``stage1_latents`` [B or 1, 16, T,
    H, W] resized to (T', H', W') (``size`` = (H', W') latents, default (2H, 2W);
    ``temporal_upsample`` doubles the frame count as the official default does: T' = 2T - 1;
    trilinear, ``align_corners=True``; nothing is resized when the latents already have that
    size), noised to ``t_thresh``: ``(1 - t) x + t eps`` with ``eps`` drawn over all the
    (padded) latent frames, then denoised on the truncated base schedule (t = 1000 t_thresh, then
    the ``num_steps``-step schedule's timesteps below it: 5 steps for the official 50 and 0.5)
    without guidance.

    ``eps`` comes from torch's global CPU generator by default (``refine_rng="global"``, as the
    official ``torch.randn_like``: seed it with ``torch.manual_seed`` to reproduce a run), or
    from the call's ``seed`` / ``generator`` with ``refine_rng="generator"`` (not the official
    stream). ``latents`` (official argument) is ignored with a warning, as the official
    refinement overwrites it with the noised stage-1 latents.

    ``cond_latents`` [B or 1, 16, m, H', W'] (already refined, normalized latents of the
    conditioning frames) replace the first m frames and keep timestep 0. With ``pad_frames`` the
    conditioning and the noisy frame counts are each padded up to multiples of ``granularity``
    (4, so BSA chunks tile): conditioning by repeating its first frame in front, noisy frames by
    repeating the last one at the back; the padding is cropped from the result, which is
    [B, 16, T', H', W'] (conditioning included). With ``pad_frames=False`` (the official pixel
    path, whose latents are padded before encoding: :meth:`LongCatVideoPipeline.generate_refine`)
    the first m of the T' stage-1 latents are the conditioning's place and the result has all T'.

    ``lora`` (e.g. ``'refinement_lora'``, loaded from the checkpoint's ``lora/`` folder if not
    already loaded) and ``enable_bsa`` switch those on for this call only (the official demo runs
    refinement with both), through the model's own methods; without them the model runs as is.
    ``lora_kwargs`` go to ``load_lora`` (``multiplier``, ``lora_network_dim``, ...).
    ``sampling``: :class:`SamplingOptions` but ``guidance_scale`` and ``distill``.

    Latent-space note: the official pipeline upsamples the *decoded* stage-1 frames (bilinear,
    ``align_corners=True``, to the 720p bucket, e.g. 704 x 1280) and re-encodes them with the VAE
    (:meth:`LongCatVideoPipeline.generate_refine`); interpolating stage-1 latents here is an
    approximation of that.
    """
    s = SamplingOptions.take("generate_refine", sampling)
    _check_pixels(stage1_video=stage1_video)
    _check_text(prompt_embeds, None, 1.0)
    check_refine_rng(refine_rng)
    if latents is not None:
        warnings.warn("generate_refine: latents= is ignored (the official refinement overwrites it with the noised "
                      "stage-1 latents)", stacklevel=2)
    stage1_latents = _check_cond("stage1_latents", stage1_latents, dit)
    _check_batch("stage1_latents", stage1_latents, prompt_embeds)
    text, stage1_latents, cond_latents = _videos_per_prompt(s, (prompt_embeds, prompt_mask), stage1_latents,
                                                            cond_latents)
    B = _batch(text[0])
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
    extras = s.lora_and_bsa(dit, enable_bsa)
    schedule = s.schedule(t_thresh=t_thresh, distill=False)

    device = model_device(dit)
    up = upsample_latents(stage1_latents.to(device), (Tn, Hn, Wn))
    if up.shape[0] != B:
        up = up.expand(B, -1, -1, -1, -1)
    noisy = up[:, :, m:]
    pad_back = pad_front = 0
    cond = None
    if m:
        cond = cond_latents.to(device=device, dtype=torch.float32).expand(B, -1, -1, -1, -1)
    if pad_frames:
        noisy, pad_back = _pad_frames(noisy, granularity, front=False)
        if m:
            cond, pad_front = _pad_frames(cond, granularity, front=True)
    full = noisy if cond is None else torch.cat([cond, noisy], dim=2)  # the conditioning place is overwritten
    # One draw over every latent frame, conditioning and padding included (the official
    # `torch.randn_like(latent_up)`); the conditioning frames' share is discarded.
    eps = refine_noise(full.shape, refine_rng, s.rng(), device)
    t = float(t_thresh)
    x = (1 - t) * full + t * eps
    with extras:
        out = denoise(dit, x, *text, guidance_scale=1.0, schedule=schedule, cond_latents=cond, progress=s.progress,
                      cache=s.cache,
                      callback=s.callback)
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
