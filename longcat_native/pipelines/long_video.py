"""The official long-video demos on :class:`~longcat_native.pipelines.pipeline.LongCatVideoPipeline`:
``run_demo_long_video.py`` / ``run_demo_interactive_video.py`` (:meth:`LongVideoDemos.generate_long`:
a text-to-video segment, then continuation segments, each from the previous one's uint8 frames)
and the long video's refinement window by window (:meth:`LongVideoDemos.refine_long_video`).
They are loops over the pipeline's single calls (its ``_t2v_latents`` / ``_vc_latents`` /
``_refine_latents``), one generator through all of them.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .media import read_pixels
from .shapes import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, cond_latent_count
from . import options as O
from . import tasks as T

__all__ = ["CHAINS", "LongVideoDemos"]

# Long video: "pixels" (official demo: decode each segment, uint8, re-encode the conditioning
# frames), "latent" (chain the latents, decode once: faster, not the official numbers).
CHAINS = ("pixels", "latent")


class LongVideoDemos:
    """The demo loops of :class:`~longcat_native.pipelines.pipeline.LongCatVideoPipeline` (a
    base class of it; its methods call the pipeline's single-call steps)."""

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
            current = read_pixels(first_frames, "first_frames")
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
        stage1 = read_pixels(frames, "frames")
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
        cond = None if cond_video is None else read_pixels(cond_video, "cond_video")
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


def _video_output(frames_u8: list, frames_unit: list, output_type: str):
    """One video's frames -> ``output_type`` with a batch of one: "video" its uint8 frames
    [1, F, H, W, 3]; "np" its float32 frames in [0, 1] (same shape), "pt" those as [1, F, 3, H, W]."""
    if output_type == "video":
        return np.stack(frames_u8)[None]
    unit = np.stack(frames_unit)[None].astype(np.float32, copy=False)
    if output_type == "pt":
        return torch.from_numpy(unit).permute(0, 1, 4, 2, 3).contiguous()
    return unit
