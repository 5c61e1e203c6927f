"""The part of :class:`~longcat_native.pipelines.pipeline.LongCatVideoPipeline` that holds and
loads its components (the DiT, the umT5 text encoder, the Wan VAE, the scheduler settings) and
places them in memory: ``from_pretrained``, the memory plan of a device budget
(``max_memory``), model offload between stages and the text encoder's sequential offload. The
tasks are in :mod:`.pipeline`, the long-video demo loops in :mod:`.long_video`.

Design notes: docs/design/pipelines.md.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .media import PIPELINES_EXTRA
from .shapes import VAE_SPACE_STRIDE, VAE_TIME_STRIDE
from . import options as O

__all__ = ["PipelineComponents"]


class PipelineComponents:
    """The components of a pipeline and where they live: built from loaded components (checked
    to fit each other) or :meth:`from_pretrained` an official checkpoint root, with the memory
    switches (diffusers' names) that move them between the device and host memory around each
    stage."""

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
                        buckets=None, max_memory=None, step_cache=None, **dit_kwargs) -> "PipelineComponents":
        """Load the DiT (:meth:`LongCatDiT.from_pretrained` with ``dtype``, ``device``, ``kernels``,
        ``attention`` and config overrides: an official root's ``dit/``, or a FastVideo Diffusers
        root's ``transformer/``, whose ``model_index.json`` is checked first: its pipeline and
        component classes, and every component this load reads listed and on disk),
        ``scheduler/scheduler_config.json`` (its ``shift`` and
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
        from .components import (MODEL_INDEX, SchedulerConfig, TextEncoder, VideoVAE, check_components,
                                 check_model_index, checkpoint_root)
        from ..runtime.checkpoints import checkpoint_config
        from ..runtime.dit import LongCatDiT
        from .media import MissingExtraError, missing_modules

        dit_folder, _, dit_cfg = checkpoint_config(path, quantize=dit_kwargs.get("quantize"))
        if dit_folder.name == "transformer" and (checkpoint_root(path) / MODEL_INDEX).is_file():
            check_model_index(path, text_encoder=text_encoder, vae=vae)  # a Diffusers root's own list
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

    def _need(self, part: str, why: str):
        comp = getattr(self, part)
        if comp is None:
            folder = {"text_encoder": "tokenizer/ and text_encoder/", "vae": "vae/"}[part]
            raise ValueError(f"{why} needs the {'text encoder' if part == 'text_encoder' else 'VAE'}, which this "
                             f"pipeline does not have (from_pretrained loads it from the checkpoint's {folder})")
        return comp

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


def _shard_ranks(dit_kwargs) -> int:
    """The ranks a ``shard_weights=True`` DiT shards over (every rank of its layout), else 1."""
    if not dit_kwargs.get("shard_weights"):
        return 1
    return (int(dit_kwargs.get("cp_size", 1)) * int(dit_kwargs.get("ring_size", 1))
            * (2 if dit_kwargs.get("cfg_parallel") else 1) * int(dit_kwargs.get("dp_size", 1)))


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
                       vae_config=component_config(root, VAE_DIR) if vae else None, step_cache=step_cache,
                       shard_ranks=_shard_ranks(dit_kwargs))
    if not plan.fits:
        raise ValueError("the official run does not fit max_memory:\n" + format_plan(plan))
    return plan
