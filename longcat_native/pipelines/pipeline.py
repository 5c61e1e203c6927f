"""``LongCatVideoPipeline``: the DiT with the umT5 text encoder, the Wan VAE and the scheduler
settings of an official checkpoint root: prompt strings and pixels in, decoded video out, the
official way by default (same seed, same random draws in the same order, same video as the
official ``LongCatVideoPipeline`` in float32). The tensor-level work is in
:mod:`~longcat_native.pipelines.tasks`.

Design notes: docs/design/pipelines.md.

Why ~800 lines in one file: one class, one method per official call (its argument list and its
pixel-side steps: buckets, posterior draws in the official order, decoding) plus the two demo
loops (long video, its refinement windows), which call those methods, and the memory switches
(model and sequential offload, a memory plan) that wrap its stages.
"""

from __future__ import annotations

import contextlib

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .media import PIPELINES_EXTRA
from .shapes import (BSA_LATENT_GRANULARITY, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, bucket_scale_factor, bucket_size,
                     cond_latent_count, frames_to_latents, latent_size, pixel_size, refine_frame_padding)
from . import options as O
from . import tasks as T

__all__ = ["OUTPUT_TYPES", "CHAINS", "encode_prompts", "LongCatVideoPipeline"]

# "latent": [B, 16, T, H, W] float32; decoded (needs the VAE): "np" float32 [B, F, H, W, 3] in [0, 1]
# (the official default), "pt" float32 tensor [B, F, 3, H, W] in [0, 1], "video" uint8 [B, F, H, W, 3]
# (the official demos' (x * 255).astype(uint8) of "np").
OUTPUT_TYPES = ("latent", "np", "pt", "video")
# Long video: "pixels" (official demo: decode each segment, uint8, re-encode the conditioning
# frames), "latent" (chain the latents, decode once: faster, not the official numbers).
CHAINS = ("pixels", "latent")


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


def _frames_hw(x) -> Tuple[int, int]:
    """(height, width) of an image / video input already read (uint8 frames or a float tensor)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[-2]), int(x.shape[-1])
    return int(x.shape[-3]), int(x.shape[-2])


def _read(x, what: str):
    """An image / video input -> uint8 frames [F, H, W, 3], or a float tensor in [-1, 1] as is."""
    from .media import load_frames

    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x
    if x is None:
        raise ValueError(f"{what} is None")
    return load_frames(x)


class LongCatVideoPipeline:
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

    def __init__(self, dit, text_encoder=None, vae=None, scheduler=None, *, buckets=None):
        cfg = getattr(dit, "config", None)
        cap = getattr(cfg, "caption_channels", None)
        if text_encoder is not None and cap is not None and text_encoder.caption_channels != int(cap):
            raise ValueError(f"the text encoder's width {text_encoder.caption_channels} is not the DiT's "
                             f"caption_channels {cap}")
        if vae is not None:
            if vae.z_dim != O.model_channels(dit):
                raise ValueError(f"the VAE's z_dim {vae.z_dim} is not the DiT's in_channels {O.model_channels(dit)}")
            if (vae.time_stride, vae.space_stride) != (VAE_TIME_STRIDE, VAE_SPACE_STRIDE):
                raise ValueError(f"the VAE compresses {vae.time_stride}x in time and {vae.space_stride}x in space; "
                                 f"the pipelines need the Wan VAE's {VAE_TIME_STRIDE}x and {VAE_SPACE_STRIDE}x")
        if scheduler is None:
            from .components import SchedulerConfig

            scheduler = SchedulerConfig()
        self.dit, self.text_encoder, self.vae, self.scheduler = dit, text_encoder, vae, scheduler
        # Model offload between stages (enable_model_cpu_offload): the DiT waits in host memory
        # while the text encoder or the VAE runs; _home is where it runs (None: not offloading).
        self._home: Optional[torch.device] = None
        self._dit_away = False
        # The MemoryPlan (pipelines/budget.py) this pipeline was set up with, when given a budget.
        self.memory_plan = None
        # {resolution: {ratio_key: (height, width)}} instead of the official tables (None: official)
        self.buckets = buckets

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, kernels: str = "auto", attention: str = "auto",
                        text_encoder: bool = True, vae: bool = True, vae_tiling: bool = False,
                        vae_tile: Tuple[int, int] = (256, 256), vae_tile_stride: Tuple[int, int] = (192, 192),
                        buckets=None, max_memory=None, step_cache=None, **dit_kwargs) -> "LongCatVideoPipeline":
        """Load ``dit/`` (:meth:`LongCatDiT.from_pretrained` with ``dtype``, ``device``, ``kernels``,
        ``attention`` and config overrides), ``scheduler/scheduler_config.json`` (its ``shift`` and
        ``num_train_timesteps``; the official defaults when the file is missing) and, unless
        switched off, ``tokenizer/`` + ``text_encoder/`` (kept in host memory until a prompt is
        encoded) and ``vae/``, in the DiT's dtype. The VAE decodes and encodes whole frames, as
        officially; ``vae_tiling=True`` tiles them (``vae_tile`` pixels every ``vae_tile_stride``):
        less memory, but other pixels at the tile seams. Missing folders and packages, and
        components that do not fit the DiT, are errors raised before anything is loaded.

        ``quantize`` (and the other :meth:`LongCatDiT.from_pretrained` keywords, ``offload`` among
        them) go to the DiT. ``max_memory`` (bytes or "24GiB"): a device budget for the official
        3-stage run (:func:`~longcat_native.pipelines.budget.plan_memory` traces every stage at
        its real shape): the pipeline is set up with the plan's forward chunking, streamed blocks,
        model offload, text-encoder sequential offload and VAE tiling, kept as
        ``pipe.memory_plan``; a budget nothing fits is a ValueError with the stage table. With
        ``step_cache`` (the StepCache the calls will take as ``cache=``) the plan counts its
        buffers in every denoising stage; a call with a cache the plan was not made with warns."""
        from .components import SchedulerConfig, TextEncoder, VideoVAE, check_components
        from ..runtime.config import LongCatConfig
        from ..runtime.dit import LongCatDiT
        from .media import MissingExtraError, missing_modules
        from ..runtime.weights import find_dit_dir

        dit_cfg = LongCatConfig.from_json_file(str(find_dit_dir(path) / "config.json"))
        root = check_components(path, text_encoder=text_encoder, vae=vae,
                                caption_channels=dit_cfg.caption_channels, latent_channels=dit_cfg.in_channels)
        scheduler = SchedulerConfig.from_pretrained(root)
        missing = missing_modules((["transformers", "ftfy"] if text_encoder else []) + (["diffusers"] if vae else []))
        if missing:
            raise MissingExtraError(f"the text encoder / VAE need {', '.join(missing)}, not installed: {PIPELINES_EXTRA}")
        plan = None
        if step_cache is not None and max_memory is None:
            raise ValueError("step_cache= is what the max_memory plan counts (pass the cache itself to each call "
                             "as cache=): it needs max_memory")
        if max_memory is not None:
            plan = _budget_plan(root, dit_cfg, max_memory, dtype, device, dit_kwargs, text_encoder, vae, step_cache)
            if plan.streams:
                dit_kwargs.update(offload="blocks", resident_blocks=plan.resident_blocks)
            vae_tiling = vae_tiling or plan.vae_tiling
        dit = LongCatDiT.from_pretrained(path, dtype=dtype, device=device, kernels=kernels, attention=attention,
                                         **dit_kwargs)
        te = TextEncoder.from_pretrained(root, dtype=dit.dtype, device=dit.device) if text_encoder else None
        v = VideoVAE.from_pretrained(root, dtype=dit.dtype, device=dit.device, tiling=vae_tiling, tile=vae_tile,
                                     tile_stride=vae_tile_stride) if vae else None
        pipe = cls(dit, te, v, scheduler, buckets=buckets)
        if plan is not None:
            pipe.apply_memory_plan(plan)
        return pipe

    def apply_memory_plan(self, plan) -> None:
        """Switch on what ``plan`` (a :class:`~longcat_native.pipelines.budget.MemoryPlan`) chose
        that can change after loading: forward chunking, model offload, the text encoder's
        sequential offload, VAE tiling (streaming is chosen at load). Warns once when the plan
        tiles the VAE (other pixels at the seams)."""
        import warnings

        self.memory_plan = plan
        if plan.ffn_chunk_tokens is not None:
            self.dit.enable_forward_chunking(plan.ffn_chunk_tokens)
        if plan.offload_dit:
            self.enable_model_cpu_offload()
        if plan.text_encoder_layer_by_layer and self.text_encoder is not None:
            self.enable_sequential_cpu_offload()
        if plan.vae_tiling and self.vae is not None and not self.vae.tiling:
            self.vae.set_tiling(True, self.vae.tile, self.vae.tile_stride)
        if plan.vae_tiling:
            warnings.warn("the memory budget needs VAE tiling: decoded pixels differ from the official pipeline's "
                          "at the tile seams", stacklevel=2)

    # -- building blocks --------------------------------------------------------------------------

    def _need(self, part: str, why: str):
        comp = getattr(self, part)
        if comp is None:
            folder = {"text_encoder": "tokenizer/ and text_encoder/", "vae": "vae/"}[part]
            raise ValueError(f"{why} needs the {'text encoder' if part == 'text_encoder' else 'VAE'}, which this "
                             f"pipeline does not have (from_pretrained loads it from the checkpoint's {folder})")
        return comp

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

    def _check_cache_in_plan(self, cache) -> None:
        """A step cache's buffers are device memory: a memory plan counts them only when it was
        made with that cache's parameters (from_pretrained's ``step_cache``)."""
        import warnings

        plan = self.memory_plan
        if cache is None or plan is None or not hasattr(cache, "params") or plan.step_cache == cache.params():
            return
        made = "without a step cache" if plan.step_cache is None else f"for another step cache ({plan.step_cache})"
        warnings.warn(f"the memory plan of this pipeline (from_pretrained's max_memory) was made {made}: the buffers "
                      f"of {cache!r} are not in it and may not fit; pass the cache to from_pretrained as step_cache=",
                      stacklevel=4)

    def _device(self):
        return self._home if self._dit_away else O.model_device(self.dit)

    # -- memory switches (diffusers' names) ---------------------------------------------------------

    def enable_model_cpu_offload(self) -> None:
        """Keep the DiT in host memory while the text encoder or the VAE runs, and move it back to
        its device for denoising: the stages never share the device. Costs one host round trip of
        the DiT's device weights per text-encoder or VAE call (13.3 GiB in FP8, 25.3 in bf16:
        about 0.5 to 1 s each way at 25 GB/s; a DiT that streams its blocks moves only its
        resident part). The text encoder is on the device only while it encodes in any case."""
        self._home = O.model_device(self.dit)

    def disable_model_cpu_offload(self) -> None:
        self._home = None

    def enable_sequential_cpu_offload(self) -> None:
        """The text encoder runs one layer at a time on the device (each moved there for its
        forward and back after): its device peak is one layer and the embedding table, not the
        whole 10.6 GiB umT5-XXL."""
        self._need("text_encoder", "sequential offload").layer_by_layer = True

    def _vae(self, fn, *args, **kwargs):
        """A VAE encode or decode, with the DiT offloaded around it when offloading."""
        with self._dit_offloaded():
            return fn(*args, **kwargs)

    @contextlib.contextmanager
    def _dit_offloaded(self):
        """While the text encoder or the VAE runs: the DiT in host memory, when offloading."""
        home = self._home
        if home is None or self._dit_away or home.type == "cpu":
            yield
            return
        streamer = getattr(self.dit, "weight_streamer", None)
        if streamer is not None:
            streamer.park()  # the resident part to the host, the staging sets freed
        else:
            self.dit.to("cpu")
            if home.type == "cuda":
                torch.cuda.empty_cache()
        self._dit_away = True
        try:
            yield
        finally:
            self._dit_away = False
            if streamer is not None:
                streamer.unpark()
            else:
                self.dit.to(home)

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
        src = _read(image, "image")
        if not isinstance(src, torch.Tensor):
            src = src[0]
        size = self._cond_size(_frames_hw(src), resolution, height, width)
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
        src = _read(video, "video")
        size = self._cond_size(_frames_hw(src), resolution, height, width)
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
        stage1 = _read(stage1_video, "stage1_video")
        n_frames = stage1.shape[-3] if isinstance(stage1, torch.Tensor) else stage1.shape[0]
        refine_frame_padding(n_frames, num_cond_frames, spatial_refine_only, granularity)
        hw = _frames_hw(stage1)
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

    # -- long video (the official demos) ----------------------------------------------------------------

    def generate_long(self, prompt, negative_prompt=None, *, num_segments: Optional[int] = None,
                      num_frames: int = 93, num_cond_frames: int = 13, height: Optional[int] = None,
                      width: Optional[int] = None, latent: Optional[Tuple[int, int, int]] = None,
                      resolution: str = "480p", resize: str = "stretch", chain: str = "pixels", first_frames=None,
                      guidance_scale: float = 4.0, use_kv_cache: bool = True, offload_kv_cache: bool = False,
                      enhance_hf: Optional[bool] = None, cfg_zero_cond_frames: bool = True,
                      max_sequence_length: Optional[int] = None, vae_sample: bool = True, output_type: str = "np",
                      segment_latents: Optional[list] = None, **kwargs):
        """Long video, the official ``run_demo_long_video.py`` (one ``prompt`` string) or
        ``run_demo_interactive_video.py`` (``prompt`` a list: one prompt per generated segment,
        the text-to-video one first; ``num_segments`` then follows). One generator feeds every
        call, in order.

        ``chain="pixels"`` (default, official): a text-to-video segment (480 x 832 unless
        ``height``/``width``/``latent`` are given; or the uint8 ``first_frames`` of an existing
        video), then ``num_segments`` continuation segments (:meth:`generate_vc`): each segment is
        decoded to uint8 frames the demos' way (``(x * 255).astype(uint8)``), resized back to the
        first segment's size (bicubic, as the demo; only when they differ), and the next segment
        continues its last ``num_cond_frames`` frames, re-encoded. The continuation segments run
        at the ``resolution`` bucket of the frames' aspect ratio (official), or at ``height`` x
        ``width`` when those are given. Returns the whole video (the first segment, then each
        segment's new frames: the demo's ``all_generated_frames``) as ``output_type``: "video":
        the demo's uint8 frames [1, F, H, W, 3]; "np" (float32 [1, F, H, W, 3] in [0, 1]) and "pt"
        ([1, F, 3, H, W]): each segment's decoded floats, as the official ``generate_*`` calls
        return them (the uint8 truncation feeds only the next segment; a segment resized back to
        the first one's size exists only as the demo's resized uint8 frames, so its frames are
        those / 255; ``first_frames`` are given as uint8); "latent": the chain's latents in one
        tensor [1, 16, T0 + n (T - m), h, w] (the first segment's T0 latents, then each of the n
        continuations' T - m new ones; m = ``1 + (num_cond_frames - 1) // 4``), as
        ``chain="latent"`` returns them. A list passed as ``segment_latents`` receives each
        segment's whole latents (conditioning included), as decoded, whatever the output type.

        ``chain="latent"``: :func:`generate_long` (the last latents of each segment condition the
        next one directly; decoded once): faster, not the official numbers; ``num_videos_per_prompt``
        and ``first_latents`` are taken there.

        The demo then refines the result window by window: :meth:`refine_long_video`."""
        if chain not in CHAINS:
            raise ValueError(f"chain must be one of {CHAINS}, got {chain!r}")
        self._check(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings (one per segment), got "
                             f"{prompt!r}")
        first = 0 if first_frames is not None else 1
        if isinstance(prompt, str):
            num_segments = 1 if num_segments is None else num_segments
            prompts = prompts * (num_segments + first)
        else:
            if num_segments is not None and num_segments + first != len(prompts):
                raise ValueError(f"num_segments={num_segments} but {len(prompts)} prompts (one per generated segment"
                                 f"{', the text-to-video one first' if first else ''})")
            num_segments = len(prompts) - first
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
            raise ValueError(f"num_segments must be an int >= 0, got {num_segments!r}")
        negs = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} segments")
        vc_kw = dict(use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache, enhance_hf=enhance_hf,
                     cfg_zero_cond_frames=cfg_zero_cond_frames)
        if latent is not None:
            O.resolve_latent_size(self.dit, latent, num_frames, 16, 16)
            num_frames = (latent[0] - 1) * VAE_TIME_STRIDE + 1
            height, width = latent[1] * VAE_SPACE_STRIDE, latent[2] * VAE_SPACE_STRIDE
        if chain == "latent":
            if first_frames is not None:
                raise ValueError("first_frames= continues a pixel video: chain='pixels' (or first_latents= with "
                                 "chain='latent')")
            O.check_task_keywords(T.generate_long, dict(kwargs, **vc_kw))
            O.LoRAAndBSAEnabled(self.dit, kwargs.get("lora"), kwargs.get("lora_path"), False, kwargs.get("lora_kwargs"))
            n = kwargs.pop("num_videos_per_prompt", 1)
            distinct = list(dict.fromkeys(zip(prompts, [str(q) for q in negs])))
            if len(distinct) == 1:  # one prompt for every segment: encoded once
                text = self.encode_prompt(prompts[0], negs[0], guidance_scale, num_videos_per_prompt=1,
                                          max_sequence_length=max_sequence_length)
            else:
                texts = [self.encode_prompt(p, q, guidance_scale, max_sequence_length=max_sequence_length)
                         for p, q in zip(prompts, negs)]
                text = [list(t) for t in zip(*texts)]
            _, kw = self._sampling(kwargs)
            lat = T.generate_long(self.dit, *text, num_segments=num_segments, num_frames=num_frames,
                                  num_cond_frames=num_cond_frames, height=480 if height is None else height,
                                  width=832 if width is None else width, guidance_scale=guidance_scale,
                                  num_videos_per_prompt=n, **kw, **vc_kw)
            return self.decode(lat, output_type)

        self._need("vae", "long video with chain='pixels' (decoding and re-encoding each segment)")
        allowed = O.sampling_keywords("generate_long") - {"num_videos_per_prompt"}
        O.reject_unknown("generate_long", O.official_aliases(kwargs), allowed | {"latents"})
        O.LoRAAndBSAEnabled(self.dit, kwargs.get("lora"), kwargs.get("lora_path"), False, kwargs.get("lora_kwargs"))
        gen, kw = self._sampling(kwargs)
        kw.pop("generator")
        t2v_latents = kw.pop("latents", None)
        seg_latents = [] if segment_latents is None else segment_latents
        start = len(seg_latents)
        # uint8 frames (the demo's, each segment's input) and the decoded floats (the "np" output)
        frames, floats = [], []
        if first_frames is None:
            h, w = (480 if height is None else height), (832 if width is None else width)
            lat = self._t2v_latents(prompts[0], negs[0], num_frames, h, w, None, guidance_scale, 1,
                                    max_sequence_length, dict(kw, generator=gen, latents=t2v_latents))
            current, unit = self._segment_frames(lat, seg_latents)
        else:
            if t2v_latents is not None:
                raise ValueError("latents= is the text-to-video segment's noise; with first_frames there is none")
            current = _read(first_frames, "first_frames")
            if isinstance(current, torch.Tensor):
                raise ValueError("first_frames must be uint8 frames (a list of PIL images, an array, a file)")
            unit = current.astype(np.float32) / 255.0
        target = current.shape[1:3]
        frames.extend(current)
        floats.extend(unit)
        for p, q in zip(prompts[first:], negs[first:]):
            lat = self._vc_latents(current, p, q, num_frames, num_cond_frames, resolution, height, width, resize,
                                   guidance_scale, 1, max_sequence_length, vae_sample, dict(kw, generator=gen, **vc_kw))
            new, unit = self._segment_frames(lat, seg_latents, target)
            frames.extend(new[num_cond_frames:])
            floats.extend(unit[num_cond_frames:])
            current = new
        if output_type == "latent":
            m = cond_latent_count(num_cond_frames)
            segs = seg_latents[start:]
            return torch.cat([segs[0]] + [s[:, :, m:] for s in segs[1:]], dim=2)
        return _video_output(frames, floats, output_type)

    def _segment_frames(self, lat, seg_latents: list, target=None, crop=None) -> Tuple[np.ndarray, np.ndarray]:
        """A segment's latents -> (its uint8 frames the official demos' way (decode, "np",
        ``(x * 255).astype(uint8)``), resized to ``target`` (bicubic) when they differ; its decoded
        float32 frames in [0, 1], or, when resized, the resized uint8 frames / 255)."""
        from .media import resize_frames, truncate_to_uint8

        seg_latents.append(lat)
        unit = self.decode(lat, "np", frames=crop)[0]
        u8 = truncate_to_uint8(unit)
        if target is not None and tuple(u8.shape[1:3]) != tuple(target):
            u8 = resize_frames(u8, tuple(target), "stretch", resample="bicubic")
            unit = u8.astype(np.float32) / 255.0
        return u8, unit

    def refine_long_video(self, frames, prompt: str = "", *, num_frames: int = 93, num_cond_frames: int = 13,
                          cond_video=None, num_windows: Optional[int] = None, lora: Optional[str] = "refinement_lora",
                          enable_bsa: bool = True, output_type: str = "np", **kwargs):
        """The official long-video refinement loop (``run_demo_long_video.py``, also the
        interactive demo's): the stage-1 ``frames`` (uint8, e.g. :meth:`generate_long`'s "video"
        output; a list of PIL images, an array [F, H, W, 3] or a file) are refined window by
        window, ``num_frames`` stage-1 frames each, windows starting every ``num_frames -
        num_cond_frames`` frames, as long as a window has frames beyond its conditioning ones
        (``num_windows`` caps the count). The first window has no conditioning (unless
        ``cond_video``, the refined frames of the window before ``frames[0]``, is given); each
        later one is conditioned on the last ``2 * num_cond_frames`` refined frames of the
        previous window (:meth:`generate_refine` with ``video=`` and ``num_cond_frames=``), the
        refined windows kept as the demo keeps them (uint8 truncation). One generator feeds every
        window; refinement's own draws come from torch's global CPU generator (``refine_rng``).
        ``lora`` and ``enable_bsa`` default to the demo's (the refinement LoRA, block-sparse
        attention on). Returns the refined video (the first window, then each window's new
        frames: the demo's ``all_refine_frames``) as ``output_type`` (as :meth:`generate_long`: "video"
        the demo's uint8 frames, "np"/"pt" the windows' decoded floats; "latent": the list of each
        window's latents, padding frames included)."""
        self._check(output_type)
        kwargs = dict(kwargs, lora=lora, enable_bsa=enable_bsa)
        self._check("latent", T.generate_refine, {k: v for k, v in kwargs.items()
                                                  if k not in _REFINE_PIXEL_ARGS})
        stage1 = _read(frames, "frames")
        if isinstance(stage1, torch.Tensor):
            raise ValueError("frames must be uint8 frames (a list of PIL images, an array, a file)")
        if num_cond_frames < 1 or num_frames <= num_cond_frames:
            raise ValueError(f"num_cond_frames={num_cond_frames} must be in [1, num_frames={num_frames})")
        step = num_frames - num_cond_frames
        starts = [0]
        while starts[-1] + step + num_cond_frames < len(stage1):
            starts.append(starts[-1] + step)
        if num_windows is not None:
            if isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1:
                raise ValueError(f"num_windows must be a positive int, got {num_windows!r}")
            starts = starts[:num_windows]
        gen = O.call_generator(kwargs.pop("seed", 0), kwargs.pop("generator", None))
        cond = None if cond_video is None else _read(cond_video, "cond_video")
        if isinstance(cond, torch.Tensor):
            raise ValueError("cond_video must be uint8 frames (a list of PIL images, an array, a file)")
        cond_n = 0 if cond is None else 2 * num_cond_frames
        out, floats, window_latents = [], [], []
        for start in starts:
            lat, crop = self._refine_latents(stage1[start:start + num_frames], prompt, video=cond,
                                             num_cond_frames=cond_n or None, generator=gen, **kwargs)
            new, unit = self._segment_frames(lat, window_latents, crop=crop)
            out.extend(new[cond_n:])
            floats.extend(unit[cond_n:])
            cond, cond_n = new, 2 * num_cond_frames
        if output_type == "latent":
            return window_latents
        return _video_output(out, floats, output_type)


# refinement arguments of the pixel path (LongCatVideoPipeline.generate_refine's own)
_REFINE_PIXEL_ARGS = ("resolution", "height", "width", "spatial_refine_only", "resize", "granularity", "vae_sample",
                      "refine_rng", "max_sequence_length")


def _budget_plan(root, dit_cfg, max_memory, dtype, device, dit_kwargs, text_encoder: bool, vae: bool, step_cache=None):
    """The memory plan of the official 3-stage run for this checkpoint's components, or a
    ValueError with its stage table when nothing fits ``max_memory``."""
    from .budget import format_plan, official_t2v_stages, plan_memory
    from .components import TEXT_ENCODER_DIR, VAE_DIR, component_config
    from ..runtime.dit import resolve_device, resolve_dtype

    if dit_kwargs.get("offload") not in (None, "none") or dit_kwargs.get("resident_blocks") is not None:
        raise ValueError("pass max_memory (the plan picks the streamed blocks) or offload/resident_blocks, not both")
    dt = resolve_dtype(dtype, resolve_device(device))
    stages = [st for st in official_t2v_stages()  # the components this pipeline has
              if (text_encoder or st.kind != "text_encode") and (vae or not st.kind.startswith("vae_"))]
    plan = plan_memory(max_memory, dit_config=dit_cfg, quantize=dit_kwargs.get("quantize"), dtype=dt, stages=stages,
                       text_encoder_config=component_config(root, TEXT_ENCODER_DIR) if text_encoder else None,
                       vae_config=component_config(root, VAE_DIR) if vae else None, step_cache=step_cache)
    if not plan.fits:
        raise ValueError("the official run does not fit max_memory:\n" + format_plan(plan))
    return plan


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


def _video_output(frames_u8: list, frames_unit: list, output_type: str):
    """One video's frames -> ``output_type`` with a batch of one: "video" its uint8 frames
    [1, F, H, W, 3]; "np" its float32 frames in [0, 1] (same shape), "pt" those as [1, F, 3, H, W]."""
    if output_type == "video":
        return np.stack(frames_u8)[None]
    unit = np.stack(frames_unit)[None].astype(np.float32, copy=False)
    if output_type == "pt":
        return torch.from_numpy(unit).permute(0, 1, 4, 2, 3).contiguous()
    return unit
