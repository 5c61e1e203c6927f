"""The tensor-level tasks: text-to-video, image-to-video, video continuation, long video and
480p -> 720p refinement, on umT5 embeddings and normalized VAE latents (latents out), built on
:func:`~longcat_native.pipelines.sampler.denoise`. They follow the official pipeline step for
step; where it decodes and re-encodes mid-task they stay in latent space (noted per function).
The options every task shares are :class:`SamplingOptions`; noise is drawn on the CPU, so a seed
gives the same latents on every device.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from .media import PIPELINES_EXTRA
from .sampler import DEFAULT_SHIFT, denoise
from .shapes import (BSA_LATENT_GRANULARITY, VAE_TIME_STRIDE, cond_latent_count, frames_to_latents,
                     latent_size)

__all__ = [
    "TASKS", "OFFICIAL_DEMO_NEGATIVE_PROMPT", "SamplingOptions", "LoRAAndBSAEnabled", "check_task_keywords",
    "find_lora_file", "make_noise", "generate", "generate_t2v", "generate_i2v", "generate_vc", "generate_long",
    "generate_refine", "upsample_latents", "model_patch", "model_channels", "model_device", "resolve_latent_size",
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


class LoRAAndBSAEnabled:
    """``with LoRAAndBSAEnabled(dit, lora="refinement_lora", bsa=True): ...``: the LoRA (loaded
    first if need be) and/or BSA are on for the ``with`` block only, through the model's own
    ``load_lora``/``enable_loras``/``enable_bsa``, and switched off again on exit
    (``disable_all_loras``/``disable_bsa``). The constructor checks everything (missing LoRA
    file, a model without those methods) before any work."""

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


# -- the options every task shares ---------------------------------------------------------------

@dataclass(frozen=True)
class SamplingOptions:
    """The keyword arguments every ``generate_*`` function takes besides its own (refinement takes
    all but ``guidance_scale`` and ``distill``: it runs without guidance on the base schedule).

    ``num_steps``, ``guidance_scale`` (CFG-zero; <= 1: none), ``distill`` (the 16-step distilled
    schedule), ``shift``: the schedule (:func:`~.sampler.denoise`). ``seed`` or a CPU
    ``generator``: the noise. ``lora`` (a key: loaded from the checkpoint's ``lora/`` folder, or
    ``lora_path``, with ``lora_kwargs`` for ``load_lora``) is on for the call only.
    ``output_type`` must be "latent" here (decoding: :class:`LongCatVideoPipeline`).
    ``progress`` prints a line per step; ``callback(i, t, latents)`` is called after each."""

    num_steps: int = 50
    guidance_scale: float = 4.0
    distill: bool = False
    shift: float = DEFAULT_SHIFT
    seed: Optional[int] = 0
    generator: Optional[torch.Generator] = None
    lora: Optional[str] = None
    lora_path: Optional[str] = None
    lora_kwargs: Optional[dict] = None
    output_type: str = "latent"
    progress: bool = True
    callback: Optional[Callable] = None

    @classmethod
    def take(cls, fn: str, kwargs: dict) -> "SamplingOptions":
        """``kwargs`` of the task function named ``fn`` -> the options; an argument it does not
        take is a TypeError naming it, as Python's own; ``output_type`` is checked."""
        _reject_unknown(fn, kwargs, _sampling_keywords(fn))
        opts = cls(**kwargs)
        _check_output_type(opts.output_type)
        return opts

    def as_kwargs(self, **changes) -> dict:
        """The options as keyword arguments for another task function (with ``changes``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes

    def rng(self) -> torch.Generator:
        return _generator(self.seed, self.generator)

    def lora_and_bsa(self, dit, bsa: bool = False) -> "LoRAAndBSAEnabled":
        return LoRAAndBSAEnabled(dit, self.lora, self.lora_path, bsa, self.lora_kwargs)

    def sample(self, dit, shape, text, noise: Optional[torch.Tensor] = None, **denoise_kwargs) -> torch.Tensor:
        """Noise of ``shape`` (unless given) denoised with ``text`` = (prompt_embeds, prompt_mask,
        negative_embeds, negative_mask), the LoRA on; ``denoise_kwargs`` go to :func:`denoise`."""
        extras = self.lora_and_bsa(dit)  # checked before the noise is drawn
        if noise is None:
            noise = make_noise(shape, generator=self.rng(), device=model_device(dit))
        with extras:
            return denoise(dit, noise, *text, num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                           distill=self.distill, shift=self.shift, progress=self.progress, callback=self.callback,
                           **denoise_kwargs)


_NOT_SHARED = {"generate_refine": ("guidance_scale", "distill")}


def _sampling_keywords(fn: str) -> set:
    return {f.name for f in dataclasses.fields(SamplingOptions)} - set(_NOT_SHARED.get(fn, ()))


def _reject_unknown(fn: str, kwargs: dict, allowed: set) -> None:
    for name in kwargs:
        if name not in allowed:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")


def check_task_keywords(fn: Callable, kwargs: dict) -> None:
    """The TypeError ``fn(..., **kwargs)`` would raise for an argument it does not take, raised
    now (a pipeline checks its pass-through arguments before encoding anything)."""
    own = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    _reject_unknown(fn.__name__, kwargs, own | _sampling_keywords(fn.__name__))


def _check_batch(name: str, lat: torch.Tensor, prompt_embeds: torch.Tensor) -> int:
    B = _batch(prompt_embeds)
    if lat.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {lat.shape[0]}, the prompts {B}")
    return B


# -- tasks ---------------------------------------------------------------------------------------

def generate_t2v(dit, prompt_embeds: torch.Tensor, prompt_mask=None, negative_embeds=None, negative_mask=None, *,
                 num_frames: int = 93, height: int = 480, width: int = 832,
                 latent: Optional[Tuple[int, int, int]] = None, noise: Optional[torch.Tensor] = None,
                 **sampling) -> torch.Tensor:
    """Text-to-video (official ``generate_t2v``): latents [B, 16, T, H, W] for ``num_frames`` x
    ``height`` x ``width`` (or ``latent=(T, H, W)``), from ``noise`` if given. ``sampling``:
    :class:`SamplingOptions`. The official settings: 50 steps, guidance 4 (base);
    ``distill=True``, 16 steps, guidance 1 with ``lora='cfg_step_lora'`` (distilled)."""
    s = SamplingOptions.take("generate_t2v", sampling)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
    T, H, W = resolve_latent_size(dit, latent, num_frames, height, width)
    shape = (_batch(prompt_embeds), model_channels(dit), T, H, W)
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")
    return s.sample(dit, shape, (prompt_embeds, prompt_mask, negative_embeds, negative_mask), noise=noise)


def generate_i2v(dit, image_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None,
                 negative_embeds=None, negative_mask=None, *, num_frames: int = 93, image=None,
                 **sampling) -> torch.Tensor:
    """Image-to-video (official ``generate_i2v``): the first latent frame is ``image_latents``
    [B or 1, 16, 1, H, W] (the VAE latent of the image), kept fixed with timestep 0; the other
    ``T - 1`` frames are generated. Returns [B, 16, T, H, W] with frame 0 equal to the image latent.
    ``sampling``: :class:`SamplingOptions`."""
    s = SamplingOptions.take("generate_i2v", sampling)
    _check_pixels(image=image)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
    image_latents = _check_cond("image_latents", image_latents, dit, frames=1)
    T = frames_to_latents(num_frames)
    if T < 2:
        raise ValueError(f"num_frames={num_frames} gives a single latent frame: nothing to generate after the image")
    B = _check_batch("image_latents", image_latents, prompt_embeds)
    shape = (B, model_channels(dit), T, image_latents.shape[3], image_latents.shape[4])
    return s.sample(dit, shape, (prompt_embeds, prompt_mask, negative_embeds, negative_mask),
                    cond_latents=image_latents)


def generate_vc(dit, video_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None,
                negative_embeds=None, negative_mask=None, *, num_frames: int = 93, num_cond_frames: int = 13,
                enhance_hf: Optional[bool] = None, use_kv_cache: bool = True, offload_kv_cache: bool = False,
                cfg_zero_cond_frames: bool = False, video=None, **sampling) -> torch.Tensor:
    """Video continuation (official ``generate_vc``). ``video_latents`` [B or 1, 16, Tv, H, W] are
    the latents of the video to continue; its last ``m = 1 + (num_cond_frames - 1) // 4`` latent
    frames (13 frames -> 4 latents, official default) condition a ``num_frames``-frame segment
    whose first m latent frames are those conditioning latents. Returns [B, 16, T, H, W].
    ``sampling``: :class:`SamplingOptions`.

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
    B = _check_batch("video_latents", video_latents, prompt_embeds)
    cond = video_latents[:, :, -m:]
    shape = (B, model_channels(dit), T, cond.shape[3], cond.shape[4])
    return s.sample(dit, shape, (prompt_embeds, prompt_mask, negative_embeds, negative_mask), cond_latents=cond,
                    enhance_hf=enhance_hf, use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache,
                    cfg_zero_cond_frames=cfg_zero_cond_frames)


def generate_long(dit, prompt_embeds: torch.Tensor, prompt_mask=None, negative_embeds=None, negative_mask=None, *,
                  num_segments: int = 1, num_frames: int = 93, num_cond_frames: int = 13, height: int = 480,
                  width: int = 832, latent: Optional[Tuple[int, int, int]] = None,
                  first_latents: Optional[torch.Tensor] = None, use_kv_cache: bool = True,
                  offload_kv_cache: bool = False, **sampling) -> torch.Tensor:
    """Long video (official ``run_demo_long_video.py``): a text-to-video segment (or
    ``first_latents``), then ``num_segments`` continuation segments, each conditioned on the last
    ``num_cond_frames`` frames' latents of the previous one and contributing its T - m new
    latents. One generator feeds every segment. Each segment is ``num_frames`` frames (or
    ``latent=(T, H, W)``). Returns the concatenated latents [B, 16, T0 + num_segments * (T - m), H, W]
    (T0 = T, or the length of ``first_latents``). ``sampling``: :class:`SamplingOptions`.

    Latent-space note: the official demo decodes each segment, resizes it and re-encodes the last
    13 frames; here the last m latents are used directly. The official demo then refines the whole
    video segment by segment at 720p; run :func:`generate_refine` on the result for that."""
    s = SamplingOptions.take("generate_long", sampling)
    _check_text(prompt_embeds, negative_embeds, s.guidance_scale)
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
    common = s.as_kwargs(generator=s.rng())
    text = (prompt_embeds, prompt_mask, negative_embeds, negative_mask)
    if first_latents is None:
        video = generate_t2v(dit, *text, latent=(T, H, W), **common)
    else:
        video = first_latents.to(device=model_device(dit), dtype=torch.float32)
    for _ in range(num_segments):
        seg = generate_vc(dit, video, *text, num_frames=num_frames, num_cond_frames=num_cond_frames,
                          use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache, **common)
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


def generate_refine(dit, stage1_latents: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask=None, *,
                    cond_latents: Optional[torch.Tensor] = None, size: Optional[Tuple[int, int]] = None,
                    temporal_upsample: bool = False, t_thresh: float = 0.5, pad_frames: bool = True,
                    granularity: int = BSA_LATENT_GRANULARITY, enable_bsa: bool = False, stage1_video=None,
                    **sampling) -> torch.Tensor:
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
    ``lora_kwargs`` go to ``load_lora`` (``multiplier``, ``lora_network_dim``, ...).
    ``sampling``: :class:`SamplingOptions` but ``guidance_scale`` and ``distill``.

    Latent-space note: the official pipeline upsamples the *decoded* stage-1 frames (bilinear,
    ``align_corners=True``, to the 720p bucket, e.g. 704 x 1280) and re-encodes them with the VAE;
    with no VAE here the latents themselves are interpolated, an approximation of that.
    """
    s = SamplingOptions.take("generate_refine", sampling)
    _check_pixels(stage1_video=stage1_video)
    _check_text(prompt_embeds, None, 1.0)
    stage1_latents = _check_cond("stage1_latents", stage1_latents, dit)
    B = _check_batch("stage1_latents", stage1_latents, prompt_embeds)
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

    device = model_device(dit)
    gen = s.rng()
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
        out = denoise(dit, x, prompt_embeds, prompt_mask, num_steps=s.num_steps, guidance_scale=1.0,
                      shift=s.shift, t_thresh=t_thresh, cond_latents=cond, progress=s.progress, callback=s.callback)
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
