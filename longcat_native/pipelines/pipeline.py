"""``LongCatVideoPipeline``: the DiT with the umT5 text encoder, the Wan VAE and the scheduler
settings of an official checkpoint root: prompt strings and pixels in, decoded video out, the
official way by default (same seed, same random draws in the same order, same video as the
official ``LongCatVideoPipeline`` in float32). The tensor-level work is in
:mod:`~longcat_native.pipelines.tasks`.

Design notes: docs/design/pipelines.md.

Here: one method per official call (its argument list and its pixel-side steps: buckets,
posterior draws in the official order, decoding) and the building blocks they share (prompt,
image, video and refinement-input encoding, decoding). The class's other parts:
:mod:`.loading` (:class:`~.loading.PipelineComponents`: ``from_pretrained``, the memory plan,
model and sequential offload) and :mod:`.long_video` (:class:`~.long_video.LongVideoDemos`: the
long-video and refinement-window demo loops, which call these methods).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .loading import PipelineComponents
from .long_video import CHAINS, LongVideoDemos
from .media import pixel_hw, read_pixels
from .shapes import (BSA_LATENT_GRANULARITY, VAE_SPACE_STRIDE, bucket_scale_factor, bucket_size, cond_latent_count,
                     frames_to_latents, latent_size, pixel_size, refine_frame_padding)
from . import options as O
from . import tasks as T

__all__ = ["OUTPUT_TYPES", "CHAINS", "encode_prompts", "LongCatVideoPipeline"]

# "latent": [B, 16, T, H, W] float32; decoded (needs the VAE): "np" float32 [B, F, H, W, 3] in [0, 1]
# (the official default), "pt" float32 tensor [B, F, 3, H, W] in [0, 1], "video" uint8 [B, F, H, W, 3]
# (the official demos' (x * 255).astype(uint8) of "np").
OUTPUT_TYPES = ("latent", "np", "pt", "video")


def encode_prompts(text_encoder, prompt, negative_prompt=None, guidance_scale: float = 4.0, *, dtype=None,
                   device=None, offload: bool = True, num_videos_per_prompt: int = 1,
                   max_sequence_length: Optional[int] = None):
    """Prompt string(s) -> (prompt_embeds [B * n, 1, L, C], prompt_mask [B * n, L],
    negative_embeds, negative_mask) with a :class:`~longcat_native.pipelines.components.TextEncoder`,
    in ``dtype`` on ``device`` (n = ``num_videos_per_prompt``: each prompt's rows repeated n
    times, consecutively, as officially; L = ``max_sequence_length``, default 512). As
    officially, the negative prompt ("" when None or empty; one string for all prompts, or one
    per prompt) is encoded only when ``guidance_scale > 1``; otherwise it is ignored and the
    negatives are None. ``offload`` moves the encoder to host memory once done."""
    from .components import prompt_list

    prompts = prompt_list(prompt)
    n = num_videos_per_prompt
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_videos_per_prompt must be a positive int, got {n!r}")
    guided = float(guidance_scale) > 1
    negs = None
    if guided:
        neg = negative_prompt or ""
        negs = [neg] * len(prompts) if isinstance(neg, str) else prompt_list(neg, "negative_prompt")
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    try:
        pe, pm = text_encoder.encode(prompts, dtype, max_sequence_length)
        ne = nm = None
        if guided:
            ne, nm = text_encoder.encode(negs, dtype, max_sequence_length)
    finally:
        if offload:
            text_encoder.offload()
    return tuple(None if t is None else T.repeat_for_videos(t, n).to(device) for t in (pe, pm, ne, nm))


class LongCatVideoPipeline(LongVideoDemos, PipelineComponents):
    """The DiT with the umT5 text encoder, the Wan VAE and the checkpoint's scheduler settings:
    prompt strings and pixels in, decoded video out (``output_type``: "np" (default, as
    officially), "pt", "video" or "latent").

    ``pipe = LongCatVideoPipeline.from_pretrained("weights/LongCat-Video")`` loads them from an
    official root. Every ``generate_*`` method takes the official arguments under their official
    names (``num_inference_steps`` or ``num_steps``, ``use_distill`` or ``distill``,
    ``guidance_scale``, ``num_videos_per_prompt``, ``generator`` or ``seed``, ``latents``,
    ``max_sequence_length``, ``output_type``) and does what the official method does, in its
    order: encode the prompts (the negative one only with ``guidance_scale > 1``, else it is
    ignored; the official default negative prompt is "", the demos'
    :data:`~longcat_native.pipelines.tasks.OFFICIAL_DEMO_NEGATIVE_PROMPT`), pick the size from the
    official aspect-ratio buckets, draw the noise, encode the conditioning pixels and sample the
    VAE posterior with the same generator, denoise (:mod:`~longcat_native.pipelines.tasks`) and
    decode without tiling.

    Options that change the numbers (each says what): ``vae_sample=False`` (the posterior mean
    instead of a sample), ``resize="crop"`` (cover and crop instead of the official stretch),
    ``height``/``width`` (a size instead of the bucket), ``cfg_zero_cond_frames=False``
    (continuation without the KV cache), ``refine_rng="generator"`` (refinement's own draws from
    the generator instead of torch's global RNG), ``chain="latent"`` (long video), VAE tiling
    (``from_pretrained(vae_tiling=True)``: changes pixels at tile seams).
    """

    # -- building blocks --------------------------------------------------------------------------

    def _check(self, output_type: str, task=None, kwargs: Optional[dict] = None) -> None:
        """The checks that need no model work: the output type, and for a call of the task function
        ``task`` with ``kwargs``, their names and the LoRA/BSA they switch on (so a typo or a
        missing LoRA file fails before the prompts are encoded)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent":
            self._need("vae", f"output_type={output_type!r}")
        if task is not None:
            O.check_task_keywords(task, kwargs)
            O.LoRAAndBSAEnabled(self.dit, kwargs.get("lora"), kwargs.get("lora_path"), kwargs.get("enable_bsa", False),
                                kwargs.get("lora_kwargs"))

    def _sampling(self, kwargs: dict) -> Tuple[torch.Generator, dict]:
        """The call's generator (``generator``, or one seeded with ``seed``, default 0) and its
        task keyword arguments with that generator and the checkpoint's scheduler settings."""
        kw = O.official_aliases(kwargs)
        self._check_cache_in_plan(kw.get("cache"))
        gen = O.call_generator(kw.pop("seed", 0), kw.pop("generator", None))
        for name, value in self.scheduler.sampling_kwargs().items():
            kw.setdefault(name, value)
        return gen, dict(kw, generator=gen)

    def _cond_size(self, hw: Tuple[int, int], resolution: str, height, width, refine: bool = False):
        """The size conditioning pixels are resized to: ``height`` x ``width`` when given, else the
        official bucket of the input's aspect ratio (16 px multiples, refinement 64, times the
        context-parallel split)."""
        if height is not None or width is not None:
            return pixel_size(height, width, patch=O.model_patch(self.dit))
        factor = bucket_scale_factor(refine, getattr(self.dit, "cp_split_hw", None))
        size = bucket_size(hw[0], hw[1], resolution, factor, self.buckets)
        latent_size(1, *size, O.model_patch(self.dit))
        return size

    def encode_prompt(self, prompt, negative_prompt=None, guidance_scale: float = 4.0, offload: bool = True, *,
                      num_videos_per_prompt: int = 1, max_sequence_length: Optional[int] = None):
        """:func:`encode_prompts` with this pipeline's text encoder, in the DiT's dtype on its device."""
        te = self._need("text_encoder", "a prompt string")
        with self._dit_offloaded():
            return encode_prompts(te, prompt, negative_prompt, guidance_scale, dtype=getattr(self.dit, "dtype", None),
                                  device=self._device(), offload=offload, num_videos_per_prompt=num_videos_per_prompt,
                                  max_sequence_length=max_sequence_length)

    def encode_image(self, image, size: Tuple[int, int], resize: str = "stretch", *, generator=None,
                     sample: bool = False, repeat: int = 1) -> torch.Tensor:
        """An image (path, PIL, uint8 array, or [1, 3, H, W] in [-1, 1]) -> normalized latents
        [repeat, 16, 1, H/8, W/8] of it resized to ``size``, on the DiT's device: the posterior
        mean, or with ``sample`` a posterior sample per item from ``generator``
        (:meth:`VideoVAE.encode`)."""
        from .media import load_image

        vae = self._need("vae", "a pixel image")
        px = load_image(image, size, resize).unsqueeze(2)
        return self._vae(vae.encode, px, generator=generator, sample=sample, repeat=repeat).to(self._device())

    def encode_video(self, video, size: Tuple[int, int], last_frames: Optional[int] = None,
                     resize: str = "stretch", *, generator=None, sample: bool = False, repeat: int = 1) -> torch.Tensor:
        """A video (path, frames, or [1, 3, F, H, W] in [-1, 1]) -> normalized latents of its last
        ``last_frames`` frames (all by default; 4k + 1 of them) resized to ``size`` (mean, or a
        posterior sample per item with ``sample``)."""
        from .media import load_video

        vae = self._need("vae", "a pixel video")
        if last_frames is not None:
            frames_to_latents(last_frames)
        px = load_video(video, size, resize, last_frames=last_frames)
        return self._vae(vae.encode, px, generator=generator, sample=sample, repeat=repeat).to(self._device())

    def encode_refine_input(self, stage1_video, size: Tuple[int, int], *, image=None, video=None,
                            num_cond_frames: Optional[int] = None, spatial_refine_only: bool = False,
                            resize: str = "stretch", granularity: int = BSA_LATENT_GRANULARITY,
                            vae_sample: bool = True, refine_rng: str = "global", generator=None, repeat: int = 1):
        """The official refinement's inputs from a decoded stage-1 video (path, uint8 frames, or
        [1, 3, F, H, W] in [-1, 1]), the official arithmetic: its 0..255 frames resized to ``size``
        (bilinear, ``align_corners=True``), / 255, doubled in time unless ``spatial_refine_only``
        (trilinear, ``align_corners=True``), * 2 - 1, padded (:func:`refine_frame_padding`) and
        encoded, the posterior sampled from torch's global CPU generator (``refine_rng="global"``,
        official) or ``generator`` -> ``(latents [1, 16, m + n, h, w], cond_latents [repeat, 16, m,
        h, w] or None, padding)``. Conditioning: ``image`` (one frame) or the last
        ``num_cond_frames`` frames of ``video``, resized with ``resize``, padded in front and
        encoded, the posterior sampled from ``generator`` (one sample per item). ``vae_sample=False``
        takes posterior means instead. Pass the results to :func:`generate_refine` with ``size`` =
        (h, w), ``temporal_upsample=False, pad_frames=False``."""
        from .media import frames_0_255, load_image, load_video

        vae = self._need("vae", "refinement from a pixel video")
        T.check_refine_rng(refine_rng)
        num_cond_frames = _refine_cond_frames(image, video, num_cond_frames)
        stage1 = frames_0_255(stage1_video)  # [F, 3, H1, W1], 0..255
        pad = refine_frame_padding(stage1.shape[0], num_cond_frames, spatial_refine_only, granularity)
        dtype = getattr(self.dit, "dtype", torch.float32)
        stage1 = stage1.to(device=self._device(), dtype=dtype)
        down = F.interpolate(stage1, size=tuple(size), mode="bilinear", align_corners=True)
        down = down.permute(1, 0, 2, 3).unsqueeze(0) / 255.0  # [1, 3, F, H, W]
        up = F.interpolate(down, size=(pad["frames"],) + tuple(size), mode="trilinear", align_corners=True) * 2 - 1
        del down, stage1
        up = torch.cat([up[:, :, :1].repeat(1, 1, pad["cond_added"], 1, 1), up,
                        up[:, :, -1:].repeat(1, 1, pad["noise_added"], 1, 1)], dim=2)
        # Without conditioning the padded video has 4n frames; the Wan VAE encodes 1 + 4(n - 1) of
        # them (the official call passes all and the encoder ignores the last 3 padding frames).
        stage1_gen = None if refine_rng == "global" else generator
        latents = self._vae(vae.encode, up[:, :, :pad["encoded_frames"]], generator=stage1_gen, sample=vae_sample)
        del up
        cond = None
        if num_cond_frames:
            if image is not None:
                px = load_image(image, size, resize).unsqueeze(2)
            else:
                px = load_video(video, size, resize, last_frames=num_cond_frames)
            px = torch.cat([px[:, :, :1].repeat(1, 1, pad["cond_added"], 1, 1), px], dim=2)
            cond = self._vae(vae.encode, px, generator=generator, sample=vae_sample, repeat=repeat).to(self._device())
        return latents.to(self._device()), cond, pad

    def decode(self, latents: torch.Tensor, output_type: str = "np", frames: Optional[Tuple[int, int]] = None):
        """Latents [B, 16, T, H, W] -> frames in ``output_type`` ("latent" returns them as is);
        ``frames`` = (start, stop) keeps only those decoded frames."""
        self._check(output_type)
        if output_type == "latent":
            return latents
        from ..runtime.compiled import release_graphs

        release_graphs(self.dit)  # the denoising graphs' memory goes to the decode instead
        pixels = self._vae(self.vae.decode, latents)
        if frames is not None:
            pixels = pixels[:, :, frames[0]: frames[1]]
        return _postprocess(pixels, output_type)

    # -- the official calls, up to the latents ------------------------------------------------------

    def _t2v_latents(self, prompt, negative_prompt, num_frames, height, width, latent, guidance_scale,
                     num_videos_per_prompt, max_sequence_length, kwargs):
        O.resolve_latent_size(self.dit, latent, num_frames, height, width)
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale, num_videos_per_prompt=num_videos_per_prompt,
                                  max_sequence_length=max_sequence_length)
        _, kw = self._sampling(kwargs)
        return T.generate_t2v(self.dit, *text, num_frames=num_frames, height=height, width=width, latent=latent,
                              guidance_scale=guidance_scale, **kw)

    def _cond_latents(self, pixels, shape_fn, text, gen, latents, vae_sample):
        """The official ``prepare_latents`` order: the noise of all frames first (unless
        ``latents`` is given), then the conditioning posterior, both from ``gen``."""
        B = text[0].shape[0]
        if latents is None:
            latents = O.make_noise(shape_fn(B), generator=gen, device=self._device())
        cond = self._vae(self.vae.encode, pixels, generator=gen, sample=vae_sample, repeat=B).to(self._device())
        return latents, cond

    def _i2v_latents(self, image, prompt, negative_prompt, num_frames, resolution, height, width, resize,
                     guidance_scale, num_videos_per_prompt, max_sequence_length, vae_sample, kwargs):
        from .media import load_image

        self._need("vae", "image-to-video from pixels")
        src = read_pixels(image, "image")
        if not isinstance(src, torch.Tensor):
            src = src[0]
        size = self._cond_size(pixel_hw(src), resolution, height, width)
        nT = frames_to_latents(num_frames)
        if nT < 2:
            raise ValueError(f"num_frames={num_frames} gives a single latent frame: nothing to generate after the "
                             "image")
        pixels = load_image(src, size, resize).unsqueeze(2)
        text, noise, cond, kw = self._prompt_and_cond(pixels, nT, size, prompt, negative_prompt, guidance_scale,
                                                      num_videos_per_prompt, max_sequence_length, vae_sample, kwargs)
        return T.generate_i2v(self.dit, cond, *text, num_frames=num_frames, guidance_scale=guidance_scale,
                              latents=noise, **kw)

    def _prompt_and_cond(self, pixels, nT, size, prompt, negative_prompt, guidance_scale, num_videos_per_prompt,
                         max_sequence_length, vae_sample, kwargs):
        """i2v / vc: the prompts encoded, then the noise of all ``nT`` latent frames and the
        conditioning pixels' latents, drawn in the official order -> (text, noise, cond, kwargs)."""
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale, num_videos_per_prompt=num_videos_per_prompt,
                                  max_sequence_length=max_sequence_length)
        gen, kw = self._sampling(kwargs)
        shape = lambda B: (B, O.model_channels(self.dit), nT, size[0] // VAE_SPACE_STRIDE,  # noqa: E731
                           size[1] // VAE_SPACE_STRIDE)
        noise, cond = self._cond_latents(pixels, shape, text, gen, kw.pop("latents", None), vae_sample)
        return text, noise, cond, kw

    def _vc_latents(self, video, prompt, negative_prompt, num_frames, num_cond_frames, resolution, height, width,
                    resize, guidance_scale, num_videos_per_prompt, max_sequence_length, vae_sample, kwargs):
        from .media import load_video

        self._need("vae", "video continuation from pixels")
        src = read_pixels(video, "video")
        size = self._cond_size(pixel_hw(src), resolution, height, width)
        frames_to_latents(num_cond_frames)
        nT = frames_to_latents(num_frames)
        if nT <= cond_latent_count(num_cond_frames):
            raise ValueError(f"num_frames={num_frames} leaves nothing to generate after "
                             f"num_cond_frames={num_cond_frames}")
        pixels = load_video(src, size, resize, last_frames=num_cond_frames)
        text, noise, cond, kw = self._prompt_and_cond(pixels, nT, size, prompt, negative_prompt, guidance_scale,
                                                      num_videos_per_prompt, max_sequence_length, vae_sample, kwargs)
        return T.generate_vc(self.dit, cond, *text, num_frames=num_frames, num_cond_frames=num_cond_frames,
                             guidance_scale=guidance_scale, latents=noise, **kw)

    def _refine_latents(self, stage1_video, prompt, *, image=None, video=None, num_cond_frames=None,
                        resolution="720p", height=None, width=None, spatial_refine_only=False, resize="stretch",
                        granularity=BSA_LATENT_GRANULARITY, vae_sample=True, refine_rng="global",
                        num_videos_per_prompt=1, max_sequence_length=None, **kwargs):
        """-> (latents, (first, stop) of the refined frames among the decoded ones)."""
        self._need("vae", "refinement from a pixel video")
        for bad in ("size", "temporal_upsample", "pad_frames", "cond_latents"):
            if bad in kwargs:
                raise ValueError(f"{bad}= is set by the pixel path here (see encode_refine_input)")
        T.check_refine_rng(refine_rng)
        num_cond_frames = _refine_cond_frames(image, video, num_cond_frames)
        stage1 = read_pixels(stage1_video, "stage1_video")
        n_frames = stage1.shape[-3] if isinstance(stage1, torch.Tensor) else stage1.shape[0]
        refine_frame_padding(n_frames, num_cond_frames, spatial_refine_only, granularity)
        hw = pixel_hw(stage1)
        size = self._cond_size(hw, resolution, height, width, refine=True)
        text = self.encode_prompt(prompt, guidance_scale=1.0, num_videos_per_prompt=num_videos_per_prompt,
                                  max_sequence_length=max_sequence_length)
        gen, kw = self._sampling(kwargs)
        latents, cond, pad = self.encode_refine_input(
            stage1, size, image=image, video=video, num_cond_frames=num_cond_frames,
            spatial_refine_only=spatial_refine_only, resize=resize, granularity=granularity, vae_sample=vae_sample,
            refine_rng=refine_rng, generator=gen, repeat=text[0].shape[0])
        lat = T.generate_refine(self.dit, latents, text[0], text[1], cond_latents=cond, size=latents.shape[3:],
                                temporal_upsample=False, pad_frames=False, refine_rng=refine_rng, **kw)
        return lat, (pad["cond_added"], pad["cond_added"] + pad["frames"])

    # -- tasks ------------------------------------------------------------------------------------

    def generate_t2v(self, prompt, negative_prompt=None, *, num_frames: int = 93, height: int = 480,
                     width: int = 832, latent: Optional[Tuple[int, int, int]] = None, guidance_scale: float = 4.0,
                     num_videos_per_prompt: int = 1, max_sequence_length: Optional[int] = None,
                     output_type: str = "np", **kwargs):
        """Text-to-video (official ``generate_t2v``; :func:`generate_t2v`) from prompt strings;
        ``latents`` (official): the initial noise instead of the generator's."""
        self._check(output_type, T.generate_t2v, kwargs)
        lat = self._t2v_latents(prompt, negative_prompt, num_frames, height, width, latent, guidance_scale,
                                num_videos_per_prompt, max_sequence_length, kwargs)
        return self.decode(lat, output_type)

    def generate_i2v(self, image, prompt, negative_prompt=None, *, num_frames: int = 93,
                     resolution: str = "480p", height: Optional[int] = None, width: Optional[int] = None,
                     resize: str = "stretch", guidance_scale: float = 4.0, num_videos_per_prompt: int = 1,
                     max_sequence_length: Optional[int] = None, vae_sample: bool = True, output_type: str = "np",
                     **kwargs):
        """Image-to-video (official ``generate_i2v``; :func:`generate_i2v`): ``image`` is resized
        (Lanczos, stretched: ``resize="stretch"``, official; ``"crop"`` covers and crops instead) to
        the ``resolution`` bucket closest to its aspect ratio (official tables; or ``height`` x
        ``width``), the noise of all frames is drawn, then the image is encoded and its VAE
        posterior sampled with the same generator (``vae_sample=False``: the posterior mean, not
        the official numbers); its latent is the first latent frame."""
        self._check(output_type, T.generate_i2v, kwargs)
        lat = self._i2v_latents(image, prompt, negative_prompt, num_frames, resolution, height, width, resize,
                                guidance_scale, num_videos_per_prompt, max_sequence_length, vae_sample, kwargs)
        return self.decode(lat, output_type)

    def generate_vc(self, video, prompt, negative_prompt=None, *, num_frames: int = 93, num_cond_frames: int = 13,
                    resolution: str = "480p", height: Optional[int] = None, width: Optional[int] = None,
                    resize: str = "stretch", guidance_scale: float = 4.0, num_videos_per_prompt: int = 1,
                    max_sequence_length: Optional[int] = None, vae_sample: bool = True, output_type: str = "np",
                    **kwargs):
        """Video continuation (official ``generate_vc``; :func:`generate_vc`): ``video``'s frames
        are resized like an image-to-video image (bucket of the first frame's aspect ratio), the
        noise of all ``num_frames`` frames is drawn, then its last ``num_cond_frames`` frames (4k + 1
        of them; 13 officially) are encoded and their posterior sampled with the same generator;
        they condition a ``num_frames`` segment, returned with its conditioning frames (as
        officially). ``use_kv_cache`` (default), ``offload_kv_cache``, ``enhance_hf`` (default on
        unless distilled) and ``cfg_zero_cond_frames`` (default True: official) as there."""
        self._check(output_type, T.generate_vc, kwargs)
        lat = self._vc_latents(video, prompt, negative_prompt, num_frames, num_cond_frames, resolution, height, width,
                               resize, guidance_scale, num_videos_per_prompt, max_sequence_length, vae_sample, kwargs)
        return self.decode(lat, output_type)

    def generate_refine(self, stage1_video, prompt, *, image=None, video=None, num_cond_frames: Optional[int] = None,
                        resolution: str = "720p", height: Optional[int] = None, width: Optional[int] = None,
                        spatial_refine_only: bool = False, resize: str = "stretch",
                        granularity: int = BSA_LATENT_GRANULARITY, vae_sample: bool = True,
                        refine_rng: str = "global", num_videos_per_prompt: int = 1,
                        max_sequence_length: Optional[int] = None, output_type: str = "np", **kwargs):
        """Refinement of a decoded stage-1 video (official ``generate_refine``): the target size is
        the 720p bucket (spatial factor 64) closest to the stage-1 frames' aspect ratio (or
        ``height`` x ``width``); the frames are upsampled, doubled in time unless
        ``spatial_refine_only``, padded and encoded (:meth:`encode_refine_input`: the stage-1
        posterior sampled from torch's global CPU generator, as officially), noised to
        ``t_thresh`` (:func:`generate_refine`: noise from the global generator too;
        ``refine_rng="generator"`` takes both from the call's generator instead, not the official
        stream), conditioned on ``image`` or the last ``num_cond_frames`` frames of ``video``
        (posterior sampled from the generator), denoised without guidance (``lora`` and
        ``enable_bsa`` as there, e.g. ``lora='refinement_lora', enable_bsa=True`` as the official
        demo runs it) and decoded, cropped to the refined frames (``output_type="latent"``: the
        padded latents). Seed torch's global generator (``torch.manual_seed``) to reproduce a
        run. For stage-1 *latents*, call :func:`generate_refine` and :meth:`decode`."""
        self._check(output_type, T.generate_refine, kwargs)
        lat, crop = self._refine_latents(
            stage1_video, prompt, image=image, video=video, num_cond_frames=num_cond_frames, resolution=resolution,
            height=height, width=width, spatial_refine_only=spatial_refine_only, resize=resize,
            granularity=granularity, vae_sample=vae_sample, refine_rng=refine_rng,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length, **kwargs)
        if output_type == "latent":
            return lat
        return self.decode(lat, output_type, frames=crop)


def _refine_cond_frames(image, video, num_cond_frames: Optional[int]) -> int:
    if image is not None and video is not None:
        raise ValueError("give image or video as conditioning, not both")
    if image is not None:
        if num_cond_frames not in (None, 1):
            raise ValueError(f"an image is one conditioning frame; num_cond_frames={num_cond_frames}")
        return 1
    if video is not None:
        if not num_cond_frames:
            raise ValueError("video conditioning needs num_cond_frames > 0 (how many of its last frames to keep)")
        return num_cond_frames
    if num_cond_frames:
        raise ValueError(f"num_cond_frames={num_cond_frames} without an image or video to take them from")
    return 0


def _postprocess(pixels: torch.Tensor, output_type: str):
    """Decoded pixels [B, 3, F, H, W] in [-1, 1] -> the output format (on the host): the
    official ``postprocess_video`` ``(x / 2 + 0.5).clamp(0, 1)``; "video" is that as the official
    demos keep it, ``(x * 255).astype(uint8)``."""
    from .media import truncate_to_uint8

    unit = (pixels.detach().float().cpu() / 2 + 0.5).clamp_(0, 1)
    if output_type == "pt":
        return unit.permute(0, 2, 1, 3, 4).contiguous()
    arr = unit.permute(0, 2, 3, 4, 1).contiguous().numpy()
    return truncate_to_uint8(arr) if output_type == "video" else arr
