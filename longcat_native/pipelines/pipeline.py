"""``LongCatVideoPipeline``: the DiT with the umT5 text encoder and the Wan VAE of an official
checkpoint root: prompt strings and pixels in, decoded video out. The tensor-level work is in
:mod:`~longcat_native.pipelines.tasks`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .media import PIPELINES_EXTRA
from .shapes import (BSA_LATENT_GRANULARITY, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, cond_latent_count,
                     frames_to_latents, pixel_size, refine_frame_padding)
from . import tasks as T

__all__ = ["OUTPUT_TYPES", "encode_prompts", "LongCatVideoPipeline"]

# "latent": [B, 16, T, H, W] float32; decoded (needs the VAE): "np" float32 [B, F, H, W, 3] in [0, 1]
# (the official default), "pt" float32 tensor [B, F, 3, H, W] in [0, 1], "video" uint8 [B, F, H, W, 3].
OUTPUT_TYPES = ("latent", "np", "pt", "video")


def encode_prompts(text_encoder, prompt, negative_prompt=None, guidance_scale: float = 4.0, *, dtype=None,
                   device=None, offload: bool = True):
    """Prompt string(s) -> (prompt_embeds [B, 1, L, C], prompt_mask [B, L], negative_embeds,
    negative_mask) with a :class:`~longcat_native.pipelines.components.TextEncoder`, in ``dtype`` on
    ``device``. As officially, the negative prompt ("" when None; one string for all prompts, or
    one per prompt) is encoded only when ``guidance_scale > 1`` (the negatives are None otherwise,
    and a non-empty negative prompt is then an error: it would have no effect). ``offload`` moves
    the encoder to host memory once done."""
    from .components import prompt_list

    prompts = prompt_list(prompt)
    guided = float(guidance_scale) > 1
    negs = None
    if guided:
        neg = "" if negative_prompt is None else negative_prompt
        negs = [neg] * len(prompts) if isinstance(neg, str) else prompt_list(neg, "negative_prompt")
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    elif negative_prompt:
        raise ValueError(f"negative_prompt has no effect with guidance_scale={guidance_scale} <= 1 (no negative "
                         "branch runs); drop it or raise guidance_scale")
    try:
        pe, pm = text_encoder.encode(prompts, dtype)
        ne = nm = None
        if guided:
            ne, nm = text_encoder.encode(negs, dtype)
    finally:
        if offload:
            text_encoder.offload()
    return tuple(None if t is None else t.to(device) for t in (pe, pm, ne, nm))


class LongCatVideoPipeline:
    """The DiT with the umT5 text encoder and the Wan VAE: prompt strings and pixels in, decoded
    video out (``output_type``: "np" (default, as officially), "pt", "video" or "latent").

    ``pipe = LongCatVideoPipeline.from_pretrained("weights/LongCat-Video")`` loads all three from
    an official root. Each ``generate_*`` method checks its inputs, encodes the prompt(s)
    (:func:`encode_prompts`: the negative prompt only when ``guidance_scale > 1``; the official
    default negative prompt is "", the official demos' is :data:`OFFICIAL_DEMO_NEGATIVE_PROMPT`),
    moves the text encoder off the GPU, encodes the conditioning pixels with the VAE, calls the
    pipeline function of the same name (other keyword arguments go to it: ``num_steps``,
    ``seed``, ``lora``, ...) and decodes the latents.

    Conditioning images and video frames are resized to ``height`` x ``width`` (default: the
    ``resolution`` bucket) with ``resize="crop"`` (cover, then crop the centre) or ``"stretch"``
    (:mod:`~longcat_native.pipelines.media`). The VAE encodes to its posterior mean (the official
    pipeline samples the posterior; see :meth:`VideoVAE.encode`).
    """

    def __init__(self, dit, text_encoder=None, vae=None):
        cfg = getattr(dit, "config", None)
        cap = getattr(cfg, "caption_channels", None)
        if text_encoder is not None and cap is not None and text_encoder.caption_channels != int(cap):
            raise ValueError(f"the text encoder's width {text_encoder.caption_channels} is not the DiT's "
                             f"caption_channels {cap}")
        if vae is not None:
            if vae.z_dim != T.model_channels(dit):
                raise ValueError(f"the VAE's z_dim {vae.z_dim} is not the DiT's in_channels {T.model_channels(dit)}")
            if (vae.time_stride, vae.space_stride) != (VAE_TIME_STRIDE, VAE_SPACE_STRIDE):
                raise ValueError(f"the VAE compresses {vae.time_stride}x in time and {vae.space_stride}x in space; "
                                 f"the pipelines need the Wan VAE's {VAE_TIME_STRIDE}x and {VAE_SPACE_STRIDE}x")
        self.dit, self.text_encoder, self.vae = dit, text_encoder, vae

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, kernels: str = "auto", attention: str = "auto",
                        text_encoder: bool = True, vae: bool = True, vae_tiling: bool = True,
                        vae_tile: Tuple[int, int] = (256, 256), vae_tile_stride: Tuple[int, int] = (192, 192),
                        **dit_kwargs) -> "LongCatVideoPipeline":
        """Load ``dit/`` (:meth:`LongCatDiT.from_pretrained` with ``dtype``, ``device``, ``kernels``,
        ``attention`` and config overrides) and, unless switched off, ``tokenizer/`` +
        ``text_encoder/`` (kept in host memory until a prompt is encoded) and ``vae/`` (tiled
        decoding with ``vae_tile`` / ``vae_tile_stride`` pixels), in the DiT's dtype. Missing
        folders and packages, and components that do not fit the DiT, are errors raised before
        anything is loaded."""
        from .components import TextEncoder, VideoVAE, check_components
        from ..runtime.config import LongCatConfig
        from ..runtime.dit import LongCatDiT
        from .media import MissingExtraError, missing_modules
        from ..runtime.weights import find_dit_dir

        dit_cfg = LongCatConfig.from_json_file(str(find_dit_dir(path) / "config.json"))
        root = check_components(path, text_encoder=text_encoder, vae=vae,
                                caption_channels=dit_cfg.caption_channels, latent_channels=dit_cfg.in_channels)
        missing = missing_modules((["transformers", "ftfy"] if text_encoder else []) + (["diffusers"] if vae else []))
        if missing:
            raise MissingExtraError(f"the text encoder / VAE need {', '.join(missing)}, not installed: {PIPELINES_EXTRA}")
        dit = LongCatDiT.from_pretrained(path, dtype=dtype, device=device, kernels=kernels, attention=attention,
                                         **dit_kwargs)
        te = TextEncoder.from_pretrained(root, dtype=dit.dtype, device=dit.device) if text_encoder else None
        v = VideoVAE.from_pretrained(root, dtype=dit.dtype, device=dit.device, tiling=vae_tiling, tile=vae_tile,
                                     tile_stride=vae_tile_stride) if vae else None
        return cls(dit, te, v)

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
            T.check_task_keywords(task, kwargs)
            T.LoRAAndBSAEnabled(self.dit, kwargs.get("lora"), kwargs.get("lora_path"), kwargs.get("enable_bsa", False),
                                kwargs.get("lora_kwargs"))

    def encode_prompt(self, prompt, negative_prompt=None, guidance_scale: float = 4.0, offload: bool = True):
        """:func:`encode_prompts` with this pipeline's text encoder, in the DiT's dtype on its device."""
        te = self._need("text_encoder", "a prompt string")
        return encode_prompts(te, prompt, negative_prompt, guidance_scale, dtype=getattr(self.dit, "dtype", None),
                              device=T.model_device(self.dit), offload=offload)

    def encode_image(self, image, size: Tuple[int, int], resize: str = "crop") -> torch.Tensor:
        """An image (path, PIL, uint8 array, or [1, 3, H, W] in [-1, 1]) -> normalized latents
        [1, 16, 1, H/8, W/8] of it resized to ``size``, on the DiT's device."""
        from .media import load_image

        vae = self._need("vae", "a pixel image")
        return vae.encode(load_image(image, size, resize).unsqueeze(2)).to(T.model_device(self.dit))

    def encode_video(self, video, size: Tuple[int, int], last_frames: Optional[int] = None,
                     resize: str = "crop") -> torch.Tensor:
        """A video (path, frames, or [1, 3, F, H, W] in [-1, 1]) -> normalized latents of its last
        ``last_frames`` frames (all by default; 4k + 1 of them) resized to ``size``."""
        from .media import load_video

        vae = self._need("vae", "a pixel video")
        if last_frames is not None:
            frames_to_latents(last_frames)
        return vae.encode(load_video(video, size, resize, last_frames=last_frames)).to(T.model_device(self.dit))

    def encode_refine_input(self, stage1_video, size: Tuple[int, int], *, image=None, video=None,
                            num_cond_frames: Optional[int] = None, spatial_refine_only: bool = False,
                            resize: str = "crop", granularity: int = BSA_LATENT_GRANULARITY):
        """The official refinement's inputs from a decoded stage-1 video (path, frames, or
        [1, 3, F, H, W] in [-1, 1]): its frames resized to ``size`` (bilinear, ``align_corners=True``),
        doubled in time unless ``spatial_refine_only`` (trilinear), padded
        (:func:`refine_frame_padding`) and encoded -> ``(latents [1, 16, m + n, h, w],
        cond_latents [1, 16, m, h, w] or None, padding)``. Conditioning: ``image`` (one frame)
        or the last ``num_cond_frames`` frames of ``video``, resized with ``resize`` and padded in
        front. Pass the results to :func:`generate_refine` with ``size`` = (h, w),
        ``temporal_upsample=False, pad_frames=False`` (the latents are already at the target size and padded)."""
        from .media import load_image, load_video

        vae = self._need("vae", "refinement from a pixel video")
        num_cond_frames = _refine_cond_frames(image, video, num_cond_frames)
        stage1 = load_video(stage1_video)  # at its own size
        pad = refine_frame_padding(stage1.shape[2], num_cond_frames, spatial_refine_only, granularity)
        cond_pixels = None
        if image is not None:
            cond_pixels = load_image(image, size, resize).unsqueeze(2)
        elif video is not None:
            cond_pixels = load_video(video, size, resize, last_frames=num_cond_frames)
        # Interpolation is linear, so doing it on [-1, 1] values equals the official order
        # (interpolate the 0..255 values, then map to [-1, 1]).
        frames = F.interpolate(stage1[0].movedim(1, 0), size=tuple(size), mode="bilinear", align_corners=True)
        up = F.interpolate(frames.movedim(0, 1)[None], size=(pad["frames"],) + tuple(size), mode="trilinear",
                           align_corners=True)
        up = torch.cat([up[:, :, :1].expand(-1, -1, pad["cond_added"], -1, -1), up,
                        up[:, :, -1:].expand(-1, -1, pad["noise_added"], -1, -1)], dim=2)
        # Without conditioning the padded video has 4n frames; the Wan VAE encodes 1 + 4(n - 1) of
        # them (the official call passes all 4n and the encoder ignores the last 3 padding frames).
        latents = vae.encode(up[:, :, :pad["encoded_frames"]])
        del up, frames
        cond = None
        if cond_pixels is not None:
            cond_pixels = torch.cat([cond_pixels[:, :, :1].expand(-1, -1, pad["cond_added"], -1, -1), cond_pixels], 2)
            cond = vae.encode(cond_pixels).to(T.model_device(self.dit))
        return latents.to(T.model_device(self.dit)), cond, pad

    def decode(self, latents: torch.Tensor, output_type: str = "np", frames: Optional[Tuple[int, int]] = None):
        """Latents [B, 16, T, H, W] -> frames in ``output_type`` ("latent" returns them as is);
        ``frames`` = (start, stop) keeps only those decoded frames."""
        self._check(output_type)
        if output_type == "latent":
            return latents
        from ..runtime.compiled import release_graphs

        release_graphs(self.dit)  # the denoising graphs' memory goes to the decode instead
        pixels = self.vae.decode(latents)
        if frames is not None:
            pixels = pixels[:, :, frames[0]: frames[1]]
        return _postprocess(pixels, output_type)

    # -- tasks ------------------------------------------------------------------------------------

    def generate_t2v(self, prompt, negative_prompt=None, *, num_frames: int = 93, height: int = 480,
                     width: int = 832, latent: Optional[Tuple[int, int, int]] = None, guidance_scale: float = 4.0,
                     output_type: str = "np", **kwargs):
        """Text-to-video (:func:`generate_t2v`) from prompt strings."""
        self._check(output_type, T.generate_t2v, kwargs)
        T.resolve_latent_size(self.dit, latent, num_frames, height, width)
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale)
        lat = T.generate_t2v(self.dit, *text, num_frames=num_frames, height=height, width=width, latent=latent,
                             guidance_scale=guidance_scale, **kwargs)
        return self.decode(lat, output_type)

    def generate_i2v(self, image, prompt, negative_prompt=None, *, num_frames: int = 93,
                     resolution: str = "480p", height: Optional[int] = None, width: Optional[int] = None,
                     resize: str = "crop", guidance_scale: float = 4.0, output_type: str = "np", **kwargs):
        """Image-to-video (:func:`generate_i2v`): ``image`` resized to ``height`` x ``width`` (or
        the ``resolution`` bucket) is encoded as the first latent frame."""
        self._check(output_type, T.generate_i2v, kwargs)
        self._need("vae", "image-to-video from pixels")
        size = pixel_size(height, width, resolution, patch=T.model_patch(self.dit))
        if frames_to_latents(num_frames) < 2:
            raise ValueError(f"num_frames={num_frames} gives a single latent frame: nothing to generate after the image")
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale)
        img = self.encode_image(image, size, resize)
        lat = T.generate_i2v(self.dit, img, *text, num_frames=num_frames, guidance_scale=guidance_scale, **kwargs)
        return self.decode(lat, output_type)

    def generate_vc(self, video, prompt, negative_prompt=None, *, num_frames: int = 93, num_cond_frames: int = 13,
                    resolution: str = "480p", height: Optional[int] = None, width: Optional[int] = None,
                    resize: str = "crop", guidance_scale: float = 4.0, output_type: str = "np", **kwargs):
        """Video continuation (:func:`generate_vc`): the last ``num_cond_frames`` frames of
        ``video`` (4k + 1 of them; 13 officially), resized and encoded, condition a ``num_frames``
        segment; the result is that segment, conditioning frames included (as officially)."""
        self._check(output_type, T.generate_vc, kwargs)
        self._need("vae", "video continuation from pixels")
        size = pixel_size(height, width, resolution, patch=T.model_patch(self.dit))
        frames_to_latents(num_cond_frames)
        if frames_to_latents(num_frames) <= cond_latent_count(num_cond_frames):
            raise ValueError(f"num_frames={num_frames} leaves nothing to generate after num_cond_frames={num_cond_frames}")
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale)
        cond = self.encode_video(video, size, last_frames=num_cond_frames, resize=resize)
        lat = T.generate_vc(self.dit, cond, *text, num_frames=num_frames, num_cond_frames=num_cond_frames,
                            guidance_scale=guidance_scale, **kwargs)
        return self.decode(lat, output_type)

    def generate_long(self, prompt, negative_prompt=None, *, guidance_scale: float = 4.0, output_type: str = "np",
                      **kwargs):
        """Long video (:func:`generate_long`, chained in latent space), decoded at the end."""
        self._check(output_type, T.generate_long, kwargs)
        text = self.encode_prompt(prompt, negative_prompt, guidance_scale)
        lat = T.generate_long(self.dit, *text, guidance_scale=guidance_scale, **kwargs)
        return self.decode(lat, output_type)

    def generate_refine(self, stage1_video, prompt, *, image=None, video=None, num_cond_frames: Optional[int] = None,
                        resolution: str = "720p", height: Optional[int] = None, width: Optional[int] = None,
                        spatial_refine_only: bool = False, resize: str = "crop",
                        granularity: int = BSA_LATENT_GRANULARITY, output_type: str = "np", **kwargs):
        """Refinement of a decoded stage-1 video, the official way (:meth:`encode_refine_input`,
        then :func:`generate_refine` on the padded latents: noised to ``t_thresh``, no guidance;
        ``lora`` and ``enable_bsa`` as there, e.g. ``lora='refinement_lora', enable_bsa=True`` as
        the official demo runs it). Target size: ``height`` x ``width`` or the ``resolution``
        bucket (720p = 704 x 1280). Decoded output is cropped to the refined frames;
        ``output_type="latent"`` returns the padded latents. For stage-1 *latents*, call
        :func:`generate_refine` and :meth:`decode`."""
        self._check(output_type, T.generate_refine, kwargs)
        self._need("vae", "refinement from a pixel video")
        size = pixel_size(height, width, resolution, default="720p", patch=T.model_patch(self.dit))
        for bad in ("size", "temporal_upsample", "pad_frames", "cond_latents"):
            if bad in kwargs:
                raise ValueError(f"{bad}= is set by the pixel path here (see encode_refine_input)")
        from .media import load_video

        num_cond_frames = _refine_cond_frames(image, video, num_cond_frames)
        stage1_video = load_video(stage1_video)
        refine_frame_padding(stage1_video.shape[2], num_cond_frames, spatial_refine_only, granularity)
        text = self.encode_prompt(prompt, guidance_scale=1.0)
        latents, cond, pad = self.encode_refine_input(stage1_video, size, image=image, video=video,
                                                      num_cond_frames=num_cond_frames,
                                                      spatial_refine_only=spatial_refine_only, resize=resize,
                                                      granularity=granularity)
        lat = T.generate_refine(self.dit, latents, text[0], text[1], cond_latents=cond, size=latents.shape[3:],
                                temporal_upsample=False, pad_frames=False, **kwargs)
        if output_type == "latent":
            return lat
        return self.decode(lat, output_type, frames=(pad["cond_added"], pad["cond_added"] + pad["frames"]))


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
    """Decoded pixels [B, 3, F, H, W] in [-1, 1] -> the output format (on the host)."""
    from .media import pixels_to_uint8

    if output_type == "video":
        return pixels_to_uint8(pixels)
    unit = (pixels.detach().float().cpu() / 2 + 0.5).clamp_(0, 1)
    if output_type == "pt":
        return unit.permute(0, 2, 1, 3, 4).contiguous()
    return unit.permute(0, 2, 3, 4, 1).contiguous().numpy()
