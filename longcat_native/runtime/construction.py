"""Building a ``LongCatDiT``: from an official checkpoint or a save (``from_pretrained``) or from
random weights (``from_config``), with the quantize and offload choices; the context-parallel
group it computes with.

``LongCatDiTConstruction`` is a base class of ``LongCatDiT`` (runtime/dit.py) holding these
classmethods: they build ``cls``, so this module does not import dit.py (``runtime/`` imports only
go down). Nothing is allocated before the checkpoint and the free memory are checked: the model is
built on the meta device, checked, then given storage (on the device, or in host memory for
streamed blocks) and filled one tensor at a time. Design notes: docs/design/quantization.md
(loading quantized), docs/design/streaming.md (loading streamed).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Union

import torch

from . import checkpoints
from . import device as _device  # free_memory_bytes read through the module: one definition to patch
from . import comfy_checkpoints as cc
from . import quantize as qz
from . import quantized_checkpoints as qc
from . import sharding, streaming
from .config import LongCatConfig, resolve_config
from .device import resolve_device, resolve_dtype
from .diffusers_checkpoints import check_diffusers_weights
from .names import merge_alias
from .weights import check_official_weights, copy_official_weights

logger = logging.getLogger(__name__)

__all__ = ["LongCatDiTConstruction"]


class LongCatDiTConstruction:
    """The construction classmethods of ``LongCatDiT`` (a mixin: ``cls`` is the model class)."""

    @classmethod
    def from_pretrained(
        cls,
        path=None,
        *,
        dtype=None,
        device=None,
        kernels: str = "auto",
        attention: str = "auto",
        cp_size: int = 1,
        ring_size: int = 1,
        cfg_parallel: bool = False,
        dp_size: int = 1,
        shard_weights: bool = False,
        subfolder: Optional[str] = None,
        torch_dtype=None,
        pretrained_model_name_or_path=None,
        quantize: Optional[str] = None,
        offload: Optional[str] = None,
        max_memory=None,
        resident_blocks: Optional[int] = None,
        **config_overrides,
    ) -> "LongCatDiTConstruction":
        """Load a checkpoint: ``path`` is an official ``dit/`` folder or a root that has one, or a
        FastVideo Diffusers ``transformer/`` folder or a root that has one (``model_index.json`` +
        ``transformer/``; read as stored, its split q/k/v fused at load time). The layout found is
        logged (INFO) and kept as ``checkpoint_layout`` (docs/design/checkpoints.md).

        ``quantize`` (docs/design/quantization.md): None, "fp8", "fp8-weight-only" or
        "int8-weight-only": the block GEMM weights are quantized tensor by tensor while loading.
        ``path`` may also be a ComfyUI single file (``LongCat_TI2V_comfy_fp8_e4m3fn_scaled_KJ.safetensors``,
        runtime/comfy_checkpoints.py: the config inferred from its shapes, keyword arguments
        override; an fp8 file loads as "fp8-weight-only" unless ``quantize`` says otherwise), an
        official INT8 folder (``quantization_config.json``, shards
        ``quantized_model-*.safetensors``; a root's ``base_model_int8/``), read as stored
        ("int8-weight-only"), or a folder written by :meth:`save_quantized` (its mode and dtype).

        ``offload="blocks"`` (docs/design/streaming.md): weight streaming, with ``max_memory`` or
        ``resident_blocks`` as in :meth:`enable_weight_streaming` (neither: what fits the device's
        free memory); the streamed blocks are read straight into pinned host memory, never onto the
        device, so a model larger than the device loads.

        ``torch_dtype``, ``pretrained_model_name_or_path`` and ``subfolder`` are the official
        (diffusers) spellings; other keyword arguments name ``config.json`` keys and override them
        (e.g. ``text_tokens_zero_pad=False``, ``cp_split_hw=[1, 1]``).

        Parallel runs under ``torchrun`` (docs/design/parallel.md; the world must be the product of
        the sizes): ``cp_size`` Ulysses context parallelism, ``ring_size`` ring attention,
        ``cfg_parallel`` the two halves of a guided step on two ranks, ``dp_size`` data-parallel
        replicas, ``shard_weights`` FSDP2 sharding of the weights over every rank.
        """
        path = merge_alias(path, pretrained_model_name_or_path, "path", "pretrained_model_name_or_path")
        if path is None:
            raise TypeError("from_pretrained() needs a checkpoint path")
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        pc = _parallel_config(cp_size, ring_size, cfg_parallel, dp_size, shard_weights)
        quantize = qz.check_quantize(quantize)
        offload = streaming.check_offload(offload, resident_blocks, max_memory)
        dit_dir, kind = checkpoints.find_checkpoint(path, subfolder, quantize)
        logger.info("LongCatDiT.from_pretrained: %s layout in %s", checkpoints.LAYOUTS[kind], dit_dir)
        if kind == "comfy":  # one file, no config.json: the config comes from its shapes
            comfy = cc.open_comfy_checkpoint(dit_dir, quantize, config_overrides)
            (mode, saved_dtype), cfg = (comfy.mode, None), comfy.cfg
        else:
            mode, saved_dtype = qc.checkpoint_mode(dit_dir, kind, quantize)
            cfg = checkpoints.read_config(dit_dir, kind, config_overrides)
            files = qc.weight_files(dit_dir, kind)
        device = resolve_device(device, pc.world_size)
        sharding.check_shard_options(pc, offload, device)
        dtype = resolve_dtype(dtype if dtype is not None else saved_dtype, device)
        # Nothing is allocated before the checkpoint is checked: the model is built on the meta
        # device (shapes only; quantized storage for a quantized mode), the safetensors headers are
        # checked against it, then its size against the device's free memory; only then does it
        # get storage and the data is read (and quantized) one tensor at a time.
        model = cls._build_meta(cfg, dtype, kernels, attention, quantize=mode)
        float_layout = kind in ("official", "diffusers")  # float weights, a weights.LoadPlan
        if kind == "comfy":
            plan = comfy.check(model)
        elif float_layout:
            check = check_official_weights if kind == "official" else check_diffusers_weights
            plan = check({n: tuple(p.shape) for n, p in model.named_parameters()}, files, cfg)
        else:
            described = qc.native_description(dit_dir) if kind == "native" else None
            plan = qc.check_quantized_checkpoint(model, files, kind, cfg, described)
        parallel, cp = _parallel(cfg, pc, device)
        shard = parallel if pc.shard_weights else None

        def load(model):
            model = cls._materialize(model, device, offload, resident_blocks, max_memory, shard=shard)
            if kind == "comfy":
                comfy.copy(model, plan)
            elif float_layout and mode is None:
                copy_official_weights(model, plan)
            else:
                qc.copy_weights(model, qc.plan_from_official(plan) if float_layout else plan)
            streaming.finish_loading(model)  # streamed blocks filled in host memory: point them at staging
            if shard is not None:  # the blocks filled in host memory: each to the device, this rank's rows only
                sharding.shard_model(model, shard)
            return model

        # shard_weights: the ranks load one after another (one host copy of the blocks at a time)
        model = load(model) if shard is None else sharding.load_in_turns(shard, load, model)
        model.checkpoint_path = str(dit_dir)
        model.checkpoint_layout = kind
        model.cp = cp
        model.parallel = parallel
        return model.eval()

    @classmethod
    def from_config(
        cls,
        config_or_name: Union[str, Dict[str, Any], LongCatConfig] = "tiny",
        *,
        dtype=None,
        device=None,
        seed: int = 0,
        kernels: str = "auto",
        attention: str = "auto",
        cp_size: int = 1,
        ring_size: int = 1,
        cfg_parallel: bool = False,
        dp_size: int = 1,
        shard_weights: bool = False,
        torch_dtype=None,
        quantize: Optional[str] = None,
        offload: Optional[str] = None,
        max_memory=None,
        resident_blocks: Optional[int] = None,
        **config_overrides,
    ) -> "LongCatDiTConstruction":
        """Random weights of a preset ("tiny", "longcat-video"), a config dict or a config.json.

        Parameters are allocated directly on ``device`` in ``dtype`` and filled there by a
        generator on that device, so the 13.6B config never exists in float32 on the host.
        ``device="meta"`` builds shapes only (parameter counting, planning). The values are for
        tests and benchmarks, not training: every weight, adaLN and the final layer included, is
        random so each path does real work (the official init zeroes adaLN, making the output 0).
        ``quantize``: as in :meth:`from_pretrained`; each block weight is drawn in the model dtype
        (the same values as without ``quantize``, seed for seed) and quantized one at a time.
        ``offload``, ``max_memory``, ``resident_blocks``: as in :meth:`from_pretrained` (streamed
        tensors are drawn on the device and copied to the host: the same values as without).
        ``cp_size``, ``ring_size``, ``cfg_parallel``, ``dp_size``, ``shard_weights``: as in
        :meth:`from_pretrained`.
        """
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        quantize = qz.check_quantize(quantize)
        offload = streaming.check_offload(offload, resident_blocks, max_memory)
        pc = _parallel_config(cp_size, ring_size, cfg_parallel, dp_size, shard_weights)
        cfg = resolve_config(config_or_name, config_overrides)
        device = resolve_device(device, pc.world_size)
        sharding.check_shard_options(pc, offload, device)
        parallel, cp = _parallel(cfg, pc, device)
        shard = parallel if pc.shard_weights else None

        def load(_):
            model = cls._allocate(cfg, resolve_dtype(dtype, device), device, kernels, attention, quantize,
                                  offload=offload, resident_blocks=resident_blocks, max_memory=max_memory, shard=shard)
            if device.type != "meta":
                model._init_random(seed)  # same seed on every rank: identical replicas
            streaming.finish_loading(model)
            if shard is not None:
                sharding.shard_model(model, shard)
            return model

        model = load(None) if shard is None else sharding.load_in_turns(shard, load, None)
        model.cp = cp
        model.parallel = parallel
        return model.eval()

    @classmethod
    def _allocate(cls, cfg, dtype, device, kernels, attention, quantize=None, **offload) -> "LongCatDiTConstruction":
        return cls._materialize(cls._build_meta(cfg, dtype, kernels, attention, quantize), device, **offload)

    @classmethod
    def _build_meta(cls, cfg, dtype, kernels, attention, quantize=None) -> "LongCatDiTConstruction":
        """The model on the meta device in ``dtype``: shapes only, nothing allocated; with
        ``quantize``, the block GEMM weights as quantized meta storage (runtime/quantize.py)."""
        with torch.device("meta"):
            model = cls(cfg, kernels=kernels, attention=attention)
        # An inference runtime: no autograd state (the fused kernels have no backward).
        return qz.quantize_model(model.requires_grad_(False).to(dtype=dtype), quantize)

    @staticmethod
    def _materialize(model: "LongCatDiTConstruction", device: torch.device, offload=None, resident_blocks=None,
                     max_memory=None, shard=None) -> "LongCatDiTConstruction":
        """Uninitialized storage on ``device`` in the model's dtype (no default init pass, no host
        copy), after checking that the weights fit the device's free memory where it is known.
        ``offload="blocks"``: the streamed blocks get host storage instead (runtime/streaming.py;
        the streamer is installed, pointing at the host copies until ``streaming.finish_loading``).
        ``shard`` (the Parallel of a shard_weights run): the blocks get host storage, sharded onto the
        device once filled (runtime/sharding.py), and the check is this rank's part."""
        qz.place(model, device)  # "fp8" -> "fp8-weight-only" on GPUs without FP8 GEMMs (one warning)
        if device.type == "meta":
            return model
        if shard is not None:
            return sharding.materialize_for_sharding(model, device, shard.config.world_size,
                                                     _device.free_memory_bytes(device))
        if offload is not None:
            return streaming.materialize_streamed(model, device, resident_blocks=resident_blocks,
                                                  max_memory=max_memory)
        need = model.weight_bytes()
        free = _device.free_memory_bytes(device)
        if free is not None and need > free:
            c = model.cfg
            raise ValueError(
                f"the model's weights need {need / 2**30:.2f} GiB ({model.num_parameters():,} parameters in "
                f"{str(model.dtype).replace('torch.', '')}; hidden_size={c.hidden_size}, depth={c.depth}) but "
                f"only {free / 2**30:.2f} GiB are free on {device}: check the config, or use a smaller dtype or "
                "another device"
            )
        return model.to_empty(device=device)

    @torch.no_grad()
    def _init_random(self, seed: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            direct = qz.init_target(p, self.dtype)  # a quantized weight: drawn in the model dtype, then quantized
            # a streamed block's tensor (host memory) is drawn on the device: the same values
            t = direct if direct.device == self.device else torch.empty_like(direct, device=self.device)
            if name.endswith("norm.weight"):  # RMSNorm and LayerNorm gains
                t.normal_(1.0, 0.1, generator=gen)
            elif t.dim() == 1:
                t.normal_(0.0, 0.02, generator=gen)
            else:
                # fan-in scaling keeps activations O(1) through depth, like nn.Linear's default.
                t.uniform_(-1.0, 1.0, generator=gen).mul_(math.sqrt(3.0 / t.shape[1]))
            if direct is not p:
                qz.store_init(self, name, t)
            elif t is not p:
                p.copy_(t)


def _parallel_config(cp_size, ring_size, cfg_parallel, dp_size, shard_weights):
    from .mesh import ParallelConfig

    if not isinstance(cfg_parallel, bool):
        raise ValueError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")
    return ParallelConfig(ulysses=cp_size, ring=ring_size, cfg=2 if cfg_parallel else 1, dp=dp_size,
                          shard_weights=shard_weights)


def _parallel(cfg: LongCatConfig, pc, device: torch.device):
    """``(Parallel or None, ContextParallel or None)`` for the layout ``pc``, with
    ``cfg.cp_split_hw`` set to the split in use. Every check that can fail runs on every rank
    before any collective but the process-group setup, so a bad configuration is the same clear
    error everywhere."""
    from .parallel import context_parallel, resolve_split_hw

    if pc.ring > 1:  # per-frame chunks, not 2D tiles (runtime/parallel.py)
        split = cfg.cp_split_hw
        if split is not None and tuple(split) != (1, 1):
            raise ValueError(f"cp_split_hw={split}: with ring_size > 1 the tokens are split in per-frame chunks, "
                             "not 2D tiles; pass no cp_split_hw (or [1, 1])")
        split = (1, 1)
    elif pc.ulysses == 1:
        split = cfg.cp_split_hw
        if split is not None and split[0] * split[1] != 1:
            raise ValueError(f"cp_split_hw={split} splits the token grid over {split[0] * split[1]} ranks but "
                             "cp_size=1; pass cp_size equal to the split's product, or cp_split_hw=[1, 1]")
        split = (1, 1)
    else:
        split = resolve_split_hw(pc.ulysses, cfg.cp_split_hw)
    pc.check_model(cfg.num_heads)
    if not pc.distributed:
        return None, None
    if device.type == "meta":  # shapes only (planning): checked, nothing to communicate
        cfg.cp_split_hw = list(split)
        return None, None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"parallel runs use CUDA (NCCL) or the CPU (gloo), not {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and its object collectives use the current device
    from .mesh import init_parallel

    par = init_parallel(pc, device)
    cfg.cp_split_hw = list(split)
    par.check_replicas((tuple(split), cfg.hidden_size, cfg.depth, cfg.num_heads, tuple(cfg.patch_size)))
    cp = context_parallel(par, split, cfg.num_heads, device)  # ring x Ulysses; None when both are 1
    return par, cp
