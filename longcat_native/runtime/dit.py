"""``LongCatDiT``: the public model, a drop-in for the official ``LongCatVideoTransformer3DModel``.

This file holds construction (from a checkpoint or random weights), input checking and the
official call signature; the network itself is ``LongCatTransformer`` in model.py. Code written
for the official module reads ``dit.config.<official key>``, ``dit.dtype``, ``dit.cp_split_hw``,
``dit.lora_dict``, calls ``dit.to(...)``, ``from_pretrained(root, subfolder="dit",
torch_dtype=..., cp_split_hw=...)`` and ``torch.compile(dit)``; all of these work here.

Why ~760 lines in one file: the official surface is one class (construction with its quantize and
offload choices, the official attributes and LoRA/BSA methods, input checking); the work behind
each lives in its own module (weights, quantize, streaming, lora, model).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from ..kernels.ops import Ops, get_ops
from ..kernels._common import is_fake, triton_usable_on
from . import lora, streaming
from . import quantize as qz
from .attention import check_attention_name, resolve_attention_backend
from .config import LongCatConfig, resolve_config
from .kv_cache import DeviceKVCache, KVCache, KVSink, identity_differences, model_identity
from .model import LongCatTransformer
from .names import KERNEL_CHOICES, merge_alias
from .weights import cap_list, check_official_weights, copy_official_weights

__all__ = ["LongCatDiT", "resolve_dtype", "resolve_device", "bsa_kernel_path", "free_memory_bytes"]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA (what the model was trained for), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def resolve_device(device, cp_size: int = 1) -> torch.device:
    """None -> CUDA when available (under context parallelism, this rank's GPU: ``LOCAL_RANK``
    as torchrun sets it), else the CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if cp_size > 1:
            import os

            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            return device
        return torch.device("cuda")
    return torch.device(device)


def bsa_kernel_path(kernels: str, device: torch.device, attention: str) -> str:
    """Which block-sparse attention runs: the Triton kernel with the fused kernels, and on CUDA
    with every attention backend but ``"reference"``; the plain-PyTorch oracle otherwise.

    BSA is an attention backend, so on a GPU the reference kernel path uses the same BSA kernel as
    the fused one (as the official code does): the oracle does dense masked float32 attention,
    about 470 TFLOP per block at 720p (N = 168,960), and is for checking, not for running."""
    if kernels == "triton" or (device.type == "cuda" and attention != "reference"):
        return "triton"
    return "reference"


def free_memory_bytes(device) -> Optional[int]:
    """Memory a new allocation can get on ``device``, where it can be known: on CUDA the driver's
    free memory plus what PyTorch's caching allocator holds unused; on the CPU (Linux) the
    kernel's MemAvailable plus free swap. None elsewhere (no check is made)."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            fields = {}
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    fields[name] = int(rest.split()[0]) * 1024
            return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, RuntimeError, IndexError):
        return None
    return None


class LongCatDiT(LongCatTransformer):
    """The LongCat-Video DiT with the official call signature.

    Build it with :meth:`from_pretrained` (an official checkpoint) or :meth:`from_config`
    (random weights of a preset or config). ``kernels`` picks the op implementations
    ("reference": plain PyTorch, the oracle; "triton": fused kernels; "auto": triton on CUDA,
    reference elsewhere) and ``attention`` the attention backend; both are resolved on each call
    against the device the weights are on, so ``dit.to("cuda")`` after construction does the
    right thing.
    """

    def __init__(self, config: LongCatConfig, kernels: str = "auto", attention: str = "auto"):
        super().__init__(config)
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        check_attention_name(attention)  # the device and dtype are checked on each call
        self.kernels = kernels
        self.attention = attention
        # Filled by the LoRA loader (official attribute name; the official pipeline reads it).
        self.lora_dict: Dict[str, Any] = {}
        self.checkpoint_path: Optional[str] = None  # the dit/ folder, for from_pretrained models
        # ContextParallel (runtime/parallel.py) when built with cp_size > 1: the forward is split
        # over the ranks of its process group, each rank passing and receiving full tensors.
        self.cp = None
        # Which LoRAs are active, in which mode, and the exact copies merged weights restore from.
        self.lora_state = lora.LoRAState()
        # The CUDAGraphRunner that denoise replays for this model (runtime/compiled.py,
        # graph_runner_for), kept so later calls at the same shape replay graphs captured earlier.
        self.graph_runner = None

    # -- construction -------------------------------------------------------------------------
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
        subfolder: Optional[str] = None,
        torch_dtype=None,
        pretrained_model_name_or_path=None,
        quantize: Optional[str] = None,
        offload: Optional[str] = None,
        max_memory=None,
        resident_blocks: Optional[int] = None,
        **config_overrides,
    ) -> "LongCatDiT":
        """Load an official checkpoint: ``path`` is a ``dit/`` folder or a root that has one.

        ``quantize`` (docs/design/quantization.md): None, "fp8", "fp8-weight-only" or
        "int8-weight-only": the block GEMM weights are quantized tensor by tensor while loading.
        ``path`` may also be an official INT8 folder (``quantization_config.json``, shards
        ``quantized_model-*.safetensors``; a root's ``base_model_int8/``), read as stored
        ("int8-weight-only"), or a folder written by :meth:`save_quantized` (its mode and dtype).

        ``offload="blocks"`` (docs/design/streaming.md): weight streaming, with ``max_memory`` or
        ``resident_blocks`` as in :meth:`enable_weight_streaming` (neither: what fits the device's
        free memory); the streamed blocks are read straight into pinned host memory, never onto the
        device, so a model larger than the device loads.

        ``torch_dtype``, ``pretrained_model_name_or_path`` and ``subfolder`` are the official
        (diffusers) spellings; other keyword arguments name ``config.json`` keys and override them
        (e.g. ``text_tokens_zero_pad=False``, ``cp_split_hw=[1, 1]``).
        """
        path = merge_alias(path, pretrained_model_name_or_path, "path", "pretrained_model_name_or_path")
        if path is None:
            raise TypeError("from_pretrained() needs a checkpoint path")
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        cp_size = _check_cp_size(cp_size)
        quantize = qz.check_quantize(quantize)
        offload = streaming.check_offload(offload, resident_blocks, max_memory)
        dit_dir, kind = qz.find_checkpoint(path, subfolder, quantize)
        mode, saved_dtype = qz.checkpoint_mode(dit_dir, kind, quantize)
        cfg = LongCatConfig.from_json_file(str(dit_dir / "config.json"), config_overrides)
        files = qz.weight_files(dit_dir, kind)
        device = resolve_device(device, cp_size)
        dtype = resolve_dtype(dtype if dtype is not None else saved_dtype, device)
        # Nothing is allocated before the checkpoint is checked: the model is built on the meta
        # device (shapes only; quantized storage for a quantized mode), the safetensors headers are
        # checked against it, then its size against the device's free memory; only then does it
        # get storage and the data is read (and quantized) one tensor at a time.
        model = cls._build_meta(cfg, dtype, kernels, attention, quantize=mode)
        if kind == "official":
            plan = check_official_weights({n: tuple(p.shape) for n, p in model.named_parameters()}, files, cfg)
        else:
            described = qz.native_description(dit_dir) if kind == "native" else None
            plan = qz.check_quantized_checkpoint(model, files, kind, cfg, described)
        cp = _context_parallel(cfg, cp_size, device)
        model = cls._materialize(model, device, offload, resident_blocks, max_memory)
        if kind == "official" and mode is None:
            copy_official_weights(model, plan)
        else:
            qz.copy_weights(model, qz.plan_from_official(plan) if kind == "official" else plan)
        streaming.finish_loading(model)  # streamed blocks filled in host memory: point them at staging
        model.checkpoint_path = str(dit_dir)
        model.cp = cp
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
        torch_dtype=None,
        quantize: Optional[str] = None,
        offload: Optional[str] = None,
        max_memory=None,
        resident_blocks: Optional[int] = None,
        **config_overrides,
    ) -> "LongCatDiT":
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
        """
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        quantize = qz.check_quantize(quantize)
        offload = streaming.check_offload(offload, resident_blocks, max_memory)
        cp_size = _check_cp_size(cp_size)
        cfg = resolve_config(config_or_name, config_overrides)
        device = resolve_device(device, cp_size)
        cp = _context_parallel(cfg, cp_size, device)
        model = cls._allocate(cfg, resolve_dtype(dtype, device), device, kernels, attention, quantize,
                              offload=offload, resident_blocks=resident_blocks, max_memory=max_memory)
        if device.type != "meta":
            model._init_random(seed)  # same seed on every rank: identical replicas
        streaming.finish_loading(model)
        model.cp = cp
        return model.eval()

    @classmethod
    def _allocate(cls, cfg, dtype, device, kernels, attention, quantize=None, **offload) -> "LongCatDiT":
        return cls._materialize(cls._build_meta(cfg, dtype, kernels, attention, quantize), device, **offload)

    @classmethod
    def _build_meta(cls, cfg, dtype, kernels, attention, quantize=None) -> "LongCatDiT":
        """The model on the meta device in ``dtype``: shapes only, nothing allocated; with
        ``quantize``, the block GEMM weights as quantized meta storage (runtime/quantize.py)."""
        with torch.device("meta"):
            model = cls(cfg, kernels=kernels, attention=attention)
        # An inference runtime: no autograd state (the fused kernels have no backward).
        return qz.quantize_model(model.requires_grad_(False).to(dtype=dtype), quantize)

    @staticmethod
    def _materialize(model: "LongCatDiT", device: torch.device, offload=None, resident_blocks=None,
                     max_memory=None) -> "LongCatDiT":
        """Uninitialized storage on ``device`` in the model's dtype (no default init pass, no host
        copy), after checking that the weights fit the device's free memory where it is known.
        ``offload="blocks"``: the streamed blocks get host storage instead (runtime/streaming.py;
        the streamer is installed, pointing at the host copies until ``streaming.finish_loading``)."""
        qz.place(model, device)  # "fp8" -> "fp8-weight-only" on GPUs without FP8 GEMMs (one warning)
        if device.type == "meta":
            return model
        if offload is not None:
            return streaming.materialize_streamed(model, device, resident_blocks=resident_blocks,
                                                  max_memory=max_memory)
        need = model.weight_bytes()
        free = free_memory_bytes(device)
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

    # -- official attributes ------------------------------------------------------------------
    @property
    def config(self) -> LongCatConfig:
        return self.cfg

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def cp_split_hw(self):
        return self.cfg.cp_split_hw

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def quantization(self) -> Optional[str]:
        """The quantized mode of the block GEMMs ("fp8", "fp8-weight-only", "int8-weight-only"),
        or None (docs/design/quantization.md)."""
        return qz.model_quantization(self)

    def weight_bytes(self) -> int:
        """Bytes of the weights (every parameter and buffer; quantized storage and scales as stored)."""
        return qz.weight_bytes(self)

    def save_quantized(self, path) -> str:
        """Write the model to the folder ``path`` in longcat-native's quantized layout (internal
        names, quantized tensors + float32 scales, config.json, longcat_quantized.json);
        ``from_pretrained(path)`` loads it back bit-exactly (docs/design/quantization.md)."""
        return str(qz.save_quantized(self, path))

    def resolved_kernels(self) -> str:
        """The kernel path a call uses: "auto" is the fused path on CUDA, the reference elsewhere."""
        if self.kernels == "auto":
            return "triton" if self.device.type == "cuda" else "reference"
        if self.kernels == "triton" and not (triton_usable_on(self.device) or is_fake(next(self.parameters()))):
            raise ValueError(
                f"kernels='triton' needs the model on a CUDA device (or TRITON_INTERPRET=1 set before triton "
                f"is imported, for testing on CPU); the weights are on {self.device}. Use kernels='reference' or 'auto'."
            )
        return self.kernels

    def resolved_attention(self) -> str:
        return resolve_attention_backend(self.attention, self.device, self.dtype)

    def resolved_ops(self) -> Ops:
        """The ops a call runs: the resolved kernel path, with block-sparse attention by
        :func:`bsa_kernel_path` (which also depends on the device and the attention backend)."""
        kernels = self.resolved_kernels()
        return get_ops(kernels, bsa_kernel_path(kernels, self.device, self.resolved_attention()))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"hidden_size={c.hidden_size}, depth={c.depth}, num_heads={c.num_heads}, "
                f"kernels={self._describe(self.kernels, self.resolved_kernels)}, "
                f"attention={self._describe(self.attention, self.resolved_attention)}"
                + (f", quantization={self.quantization!r}" if self.quantization is not None else "")
                + (f", cp={self.cp}" if self.cp is not None else ""))

    def _describe(self, choice: str, resolve) -> str:
        """``'auto' (-> 'sdpa')``: the choice and, for "auto", what it resolves to here."""
        if choice != "auto" or next(self.parameters()).is_meta:
            return repr(choice)
        try:
            return f"'auto' (-> {resolve()!r})"
        except ValueError as e:  # repr must not raise
            return f"'auto' (unavailable: {e})"

    # -- LoRA (the official API; the work is in runtime/lora.py) -------------------------------
    def load_lora(self, lora_path=None, lora_key=None, multiplier=1.0, lora_network_dim=128,
                  lora_network_alpha=64, *, path=None, key=None):
        """Read an official LoRA safetensors file into ``self.lora_dict[lora_key]`` (nothing is
        applied until :meth:`enable_loras`). Scale per module: ``multiplier * alpha_scale`` (the
        file's); ``lora_network_dim`` must be the file's rank. Reloading a key replaces it."""
        return lora.load_lora(self, lora_path, lora_key, multiplier, lora_network_dim, lora_network_alpha,
                              path=path, key=key)

    def enable_loras(self, lora_key_list=()):
        """Make exactly these loaded LoRAs active (replaces the active set), in ``self.lora_mode``."""
        streaming.check_lora(self, self.lora_mode, lora_key_list)  # a non-list is lora's ValueError
        lora.enable_loras(self, lora_key_list)

    def disable_all_loras(self):
        """Back to the base weights (bit-exact) with no LoRA branches."""
        lora.disable_all_loras(self)

    @property
    def lora_mode(self) -> str:
        """"merged" (default: deltas folded into the weights) or "unmerged" (low-rank branches);
        setting it re-applies the active LoRAs in the new mode."""
        return self.lora_state.mode

    @lora_mode.setter
    def lora_mode(self, mode: str) -> None:
        streaming.check_lora(self, mode, self.lora_state.active)
        lora.set_lora_mode(self, mode)

    @property
    def active_loras(self):
        """Keys of the active LoRAs, in the order given to :meth:`enable_loras` (a copy)."""
        return list(self.lora_state.active)

    # -- memory -------------------------------------------------------------------------------
    def enable_forward_chunking(self, chunk_size: int = 16384) -> None:
        """Run each block's FFN ``chunk_size`` token rows at a time (w13 -> SwiGLU -> w2 per slice,
        written into the output; diffusers' name) and its qkv projection + norm + RoPE in slices of
        whole frames of at most ``chunk_size`` rows (one frame at least). The same math, less
        activation memory: traced (runtime/memory.py, bf16) the forward's activation peak drops
        from 11.69 to 6.51 GiB at 720p (N = 168,960, BSA) and from 5.19 to 3.02 GiB at 480p
        (batch 2) with 16,384-token slices; the attention's x, q, k, v and output are then the
        largest live set. Each slice is one more launch of its ops."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int (token rows per FFN slice), got {chunk_size!r}")
        self.ffn_chunk_tokens = chunk_size

    def disable_forward_chunking(self) -> None:
        self.ffn_chunk_tokens = None

    def enable_weight_streaming(self, resident_blocks: Optional[int] = None, *, max_memory=None,
                                activation_reserve=None, num_staging: int = 2):
        """Keep blocks 0..resident_blocks-1 (and the embedders, the final layer and every block's
        adaLN modulation) on the device and stream the others from pinned host memory into
        ``num_staging`` fixed device staging sets, one block ahead on a side stream
        (docs/design/streaming.md). Or pick ``resident_blocks`` from a budget, ``max_memory``
        (bytes or "24GiB"): the largest count whose resident weights + staging sets +
        ``activation_reserve`` (default: the traced 480p CFG activation peak) fit it; neither
        given: the budget is what the device can hold. Returns the ``WeightStreamer``
        (``.memory_stats()``), or None when every block fits (nothing streams)."""
        return streaming.enable_weight_streaming(self, resident_blocks, max_memory=max_memory,
                                                 activation_reserve=activation_reserve, num_staging=num_staging)

    def disable_weight_streaming(self) -> None:
        """Every block resident on the device again, bit-exactly (from the host copies)."""
        streaming.disable_weight_streaming(self)

    def weight_bytes_on_device(self) -> int:
        """Device bytes of the weights: the resident tensors, plus the staging sets when streaming."""
        return streaming.weight_bytes_on_device(self)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), to_empty(): the weights would move
        streaming.check_not_streaming(self, "moving or casting the model")
        return super()._apply(fn, recurse)

    # -- block-sparse attention (official API) ------------------------------------------------
    def enable_bsa(self) -> None:
        """Self-attention becomes block-sparse (``config.bsa_params``) on latents of more than one
        frame; grids that do not tile into the chunk shapes fall back to dense with a warning."""
        self.cfg.enable_bsa = True

    def disable_bsa(self) -> None:
        self.cfg.enable_bsa = False

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor],
        encoder_attention_mask: Optional[torch.Tensor] = None,
        num_cond_latents: int = 0,
        return_kv: bool = False,
        kv_cache_dict: Optional[Mapping[int, Tuple[torch.Tensor, torch.Tensor]]] = None,
        skip_crs_attn: bool = False,
        offload_kv_cache: bool = False,
        *,
        block_fn: Optional[Callable] = None,
        step_cache=None,
    ):
        """The official call. ``hidden_states`` [B, C_in, T, H, W]; ``timestep`` [B] or [B, T];
        ``encoder_hidden_states`` [B, 1, L, C_cap] or [B, L, C_cap] (may be None with
        ``skip_crs_attn``); ``encoder_attention_mask`` [B, L] or [B, 1, 1, L], nonzero = valid.

        Returns float32 [B, C_out, T, H, W]; with ``return_kv`` also ``{block: (k, v)}`` with k, v
        [B, heads, N, D] (k after RMSNorm, before RoPE) of this call's tokens, on the host when
        ``offload_kv_cache``. With ``kv_cache_dict`` (from a ``return_kv`` call on the m clean
        conditioning frames; batch 1 or B) the call's frames are the last T of an (m + T)-frame
        grid; ``num_cond_latents`` may be 0 (inferred from the cache) or must equal m.
        ``block_fn`` (not official): runs each block as ``block_fn(block, *args)``; regional
        compilation (``lcn.compile(dit, regional=True)``) passes its one compiled function.
        ``step_cache`` (not official): a :class:`~longcat_native.runtime.step_cache.StepCache` in a
        step of its run (``denoise(..., cache=...)`` drives it; docs/design/step_cache.md).
        """
        kw = self._checked_call(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                num_cond_latents, return_kv, kv_cache_dict, skip_crs_attn, offload_kv_cache, block_fn)
        out = self.run(**kw, **({} if step_cache is None else {"step_cache": _check_step_cache(step_cache, return_kv)}))
        if not return_kv:
            return out
        _, _, Tl, Hl, Wl = hidden_states.shape
        return out, KVCache(kw["kv_sink"].finish(), grid=(Tl, Hl, Wl), made_by=self.kv_cache_identity())

    def begin_cached_step(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                          num_cond_latents=0, skip_crs_attn=False, *, step_cache, block_fn=None):
        """The first part of a step with a step cache, split for CUDA graphs (runtime/compiled.py):
        the checked inputs embedded, the first Fn blocks run and the signal computed; returns
        ``(stream, sums)``. Then ``step_cache.decide(sums)`` on the host, then
        ``step_cache_tail(stream, step_cache, cached)`` gives the output ``forward`` would."""
        kw = self._checked_call(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                num_cond_latents, False, None, skip_crs_attn, False, block_fn)
        step_cache = _check_step_cache(step_cache, False)
        s = self.begin(**kw, keep_input=True)
        return s, self.step_cache_head(s, step_cache, always=True)

    def _checked_call(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, num_cond_latents,
                      return_kv, kv_cache_dict, skip_crs_attn, offload_kv_cache, block_fn) -> Dict[str, Any]:
        """``forward``'s arguments checked (a ValueError naming what is wrong) and converted: the
        keyword arguments of ``run`` / ``begin``."""
        x, B, T = self._check_latents(hidden_states)
        if self.cp is not None:
            pt, ph, pw = self.cfg.patch_size
            self.cp.check_grid((x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw))
        t = self._check_timestep(timestep, B, T, x.device)
        text = mask = None
        if not skip_crs_attn:
            text, mask = self._check_text(encoder_hidden_states, encoder_attention_mask, B, x.device)
        cache = None
        cache_frames = 0
        if kv_cache_dict is not None and not isinstance(kv_cache_dict, Mapping):
            raise ValueError(f"kv_cache_dict must be a mapping {{block: (k, v)}} (what return_kv=True returns), "
                             f"got {type(kv_cache_dict).__name__}")
        if kv_cache_dict:  # the official default is {} (no cache)
            cache_frames = self._check_kv_cache(kv_cache_dict, B, hidden_states.shape, num_cond_latents)
            if self.cp is not None:  # this rank attends with its heads only: move just those
                kv_cache_dict = {i: tuple(self.cp.local_heads_of(t, 1) for t in kv) for i, kv in kv_cache_dict.items()}
            cache = DeviceKVCache(kv_cache_dict, B, x.device, self.dtype)
            num_cond_latents = 0  # conditioning lives in the cache; every token here is noisy
        else:
            num_cond_latents = _check_int("num_cond_latents", num_cond_latents)
            if not 0 <= num_cond_latents <= T:
                raise ValueError(f"num_cond_latents must be in [0, {T}] (the latent frames), got {num_cond_latents}")

        sink = KVSink(x.device, bool(offload_kv_cache)) if return_kv else None
        return dict(hidden_states=x, timestep=t, text=text, text_mask=mask, num_cond_latents=num_cond_latents,
                    kv_cache=cache, cache_frames=cache_frames, kv_sink=sink, skip_crs_attn=bool(skip_crs_attn),
                    attention_backend=self.resolved_attention(), ops=self.resolved_ops(), cp=self.cp, block_fn=block_fn)

    def kv_cache_identity(self) -> Dict[str, Any]:
        """What a :class:`KVCache` made by this model records as ``made_by`` (runtime/kv_cache.py
        ``IDENTITY_KEYS``): the config keys that decide the cached keys and values, the checkpoint
        folder (None for random weights), the quantized mode and the active LoRAs with their scales."""
        return model_identity(self)

    def check_kv_cache_origin(self, cache, latent_hw: Tuple[int, int]) -> None:
        """For a :class:`KVCache`: it was made by a model like this one, from a latent of this H x W
        (a ValueError otherwise). Plain mappings carry no origin and pass."""
        if not isinstance(cache, KVCache):
            return
        if cache.made_by is not None:
            differ = identity_differences(cache.made_by, self.kv_cache_identity())
            if differ:
                raise ValueError("kv cache was made by a different model: " + ", ".join(differ)
                                 + "; compute the cache with the model that uses it")
        if cache.grid is not None:
            Tc, Hc, Wc = cache.grid
            H, W = latent_hw
            if (Hc, Wc) != (int(H), int(W)):
                raise ValueError(
                    f"kv cache was made from a latent of T x H x W = {Tc} x {Hc} x {Wc}; this call's latent is "
                    f"H x W = {H} x {W}. A cache serves calls at its own H and W only (its keys' positions "
                    "depend on the grid): compute it from conditioning latents of this size"
                )

    # -- input checking: every malformed input is a ValueError naming what is wrong -------------
    def _is_meta(self) -> bool:
        return next(self.parameters()).is_meta

    def _check_not_meta(self, name: str, t: torch.Tensor) -> None:
        if t.is_meta and not self._is_meta():
            raise ValueError(f"{name} is on the meta device (shapes only, no data); pass a tensor with data")

    def _check_latents(self, hs):
        cfg = self.cfg
        if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
            raise ValueError(f"hidden_states must be a 5-D tensor [B, {cfg.in_channels}, T, H, W], got "
                             f"{tuple(hs.shape) if isinstance(hs, torch.Tensor) else type(hs).__name__}")
        B, Cin, T, H, W = hs.shape
        if Cin != cfg.in_channels:
            raise ValueError(f"hidden_states has {Cin} channels, the model takes {cfg.in_channels}")
        if not hs.is_floating_point():
            raise ValueError(f"hidden_states must be floating point, got {hs.dtype}")
        self._check_not_meta("hidden_states", hs)
        if min(B, T, H, W) == 0:
            raise ValueError(f"hidden_states has an empty dimension: {tuple(hs.shape)}")
        pt, ph, pw = cfg.patch_size
        if H % ph or W % pw or T % pt:
            raise ValueError(
                f"latent T x H x W = {T} x {H} x {W} must be divisible by the patch size {cfg.patch_size} "
                "(odd H or W cannot be patchified; the official model fails on them too)"
            )
        return hs.to(device=self.device, dtype=self.dtype), B, T // pt

    def _check_timestep(self, timestep, B, T, device):
        if not isinstance(timestep, torch.Tensor):
            raise ValueError(f"timestep must be a tensor [B] or [B, T], got {type(timestep).__name__}")
        if timestep.is_complex() or timestep.dtype == torch.bool:
            raise ValueError(f"timestep must hold real numbers, got {timestep.dtype}")
        self._check_not_meta("timestep", timestep)
        if timestep.dim() == 1 and timestep.shape[0] == B:
            timestep = timestep[:, None].expand(B, T)
        elif timestep.dim() != 2 or tuple(timestep.shape) != (B, T):
            raise ValueError(f"timestep must be [B]=[{B}] or [B, T]=[{B}, {T}], got {tuple(timestep.shape)}")
        # The official model casts the timestep to its dtype before the float32 embedding.
        return timestep.to(device=device, dtype=self.dtype).float()

    def _check_text(self, text, mask, B, device):
        cfg = self.cfg
        if text is None:
            raise ValueError("encoder_hidden_states is required unless skip_crs_attn=True")
        if not isinstance(text, torch.Tensor):
            raise ValueError(f"encoder_hidden_states must be a tensor [B, 1, L, {cfg.caption_channels}], got "
                             f"{type(text).__name__}")
        if text.dim() == 4 and text.shape[1] == 1:
            text = text[:, 0]
        if text.dim() != 3 or text.shape[-1] != cfg.caption_channels:
            raise ValueError(f"encoder_hidden_states must be [B, 1, L, {cfg.caption_channels}] or "
                             f"[B, L, {cfg.caption_channels}], got {tuple(text.shape)}")
        if not text.is_floating_point():
            raise ValueError(f"encoder_hidden_states must be floating point, got {text.dtype}")
        self._check_not_meta("encoder_hidden_states", text)
        if text.shape[0] != B:
            raise ValueError(f"encoder_hidden_states has batch {text.shape[0]}, hidden_states has batch {B}")
        if text.shape[1] == 0:
            raise ValueError("encoder_hidden_states has no tokens (L = 0)")
        L = text.shape[1]
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise ValueError(f"encoder_attention_mask must be a tensor [B, L] (nonzero = valid), got "
                                 f"{type(mask).__name__}")
            self._check_not_meta("encoder_attention_mask", mask)
            if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
                mask = mask[:, 0, 0]
            if mask.dim() != 2 or tuple(mask.shape) != (B, L):
                raise ValueError(f"encoder_attention_mask must be [B, L]=[{B}, {L}] (or [B, 1, 1, L]), "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(device) != 0
        return text.to(device=device, dtype=self.dtype), mask

    def _check_kv_cache(self, cache, B, latent_shape, num_cond_latents) -> int:
        cfg = self.cfg
        depth, heads, D = cfg.depth, cfg.num_heads, cfg.head_dim
        keys = set(cache.keys())
        if keys != set(range(depth)):
            shown = cap_list([repr(k) for k in sorted(keys, key=str)])
            raise ValueError(f"kv_cache_dict must have one (k, v) per block 0..{depth - 1}, got keys [{shown}]")
        self.check_kv_cache_origin(cache, (latent_shape[3], latent_shape[4]))
        tokens_per_frame = (latent_shape[3] // cfg.patch_size[1]) * (latent_shape[4] // cfg.patch_size[2])
        shape0 = None
        for i in range(depth):
            entry = cache[i]
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"kv_cache_dict[{i}] must be a (k, v) pair")
            k, v = entry
            if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
                raise ValueError(f"kv_cache_dict[{i}]: k and v must be tensors [B, heads, N, D], got "
                                 f"{type(k).__name__} and {type(v).__name__}")
            if not (k.is_floating_point() and v.is_floating_point()):
                raise ValueError(f"kv_cache_dict[{i}]: k and v must be floating point, got {k.dtype} and {v.dtype}")
            self._check_not_meta(f"kv_cache_dict[{i}]", k)
            self._check_not_meta(f"kv_cache_dict[{i}]", v)
            if k.dim() != 4 or k.shape != v.shape:
                raise ValueError(f"kv_cache_dict[{i}]: k and v must both be [B, heads, N, D], got "
                                 f"{tuple(k.shape)} and {tuple(v.shape)}")
            if shape0 is None:
                shape0 = tuple(k.shape)
            elif tuple(k.shape) != shape0:
                raise ValueError(f"kv_cache_dict[{i}] has shape {tuple(k.shape)}, block 0 has {shape0}")
        Bc, Hc, Nc, Dc = shape0
        if (Hc, Dc) != (heads, D):
            raise ValueError(f"kv cache has {Hc} heads of dim {Dc}; the model has {heads} of dim {D}")
        if Bc not in (1, B):
            raise ValueError(f"kv cache batch {Bc} must be 1 or the call's batch {B}")
        if Nc == 0 or Nc % tokens_per_frame:
            raise ValueError(
                f"kv cache holds {Nc} tokens, not a whole number of frames of {tokens_per_frame} tokens "
                f"(H x W = {latent_shape[3]} x {latent_shape[4]}): was it made for a different resolution?"
            )
        m = Nc // tokens_per_frame
        if isinstance(cache, KVCache) and cache.grid is not None and cache.grid[0] != m:
            raise ValueError(f"kv cache holds {m} frames of tokens but was made from a latent of {cache.grid[0]} "
                             "frames: it was modified after it was made")
        num_cond_latents = _check_int("num_cond_latents", num_cond_latents)
        if num_cond_latents not in (0, m):
            raise ValueError(f"num_cond_latents={num_cond_latents} but the kv cache holds {m} frames")
        return m


def _check_step_cache(step_cache, return_kv):
    from .step_cache import StepCache

    if not isinstance(step_cache, StepCache):
        raise ValueError(f"step_cache must be a StepCache, got {type(step_cache).__name__}")
    if return_kv:
        raise ValueError("step_cache cannot be combined with return_kv=True (a cached step has no middle blocks' KV)")
    return step_cache


def _check_int(name: str, v) -> int:
    """An integer-like ``v`` (int, NumPy integer, one-element integer tensor or integral float
    tensor) as an int; anything else (bool, float, str, ...) is a ValueError."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_meta or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{name} must be an int, got a tensor of shape {tuple(v.shape)} and dtype {v.dtype}")
        x = v.item()
        if isinstance(x, float) and not (math.isfinite(x) and x == int(x)):
            raise ValueError(f"{name} must be an int, got {x!r}")
        return int(x)
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        raise ValueError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {v!r}") from None


def _check_cp_size(cp_size) -> int:
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    return cp_size


def _context_parallel(cfg: LongCatConfig, cp_size: int, device: torch.device):
    """The ``ContextParallel`` for ``cp_size`` > 1 (None for 1), with ``cfg.cp_split_hw`` set to
    the split in use. Every check that can fail runs on every rank before any collective but the
    process-group setup, so a bad configuration is the same clear error everywhere."""
    if cp_size == 1:
        split = cfg.cp_split_hw
        if split is not None and split[0] * split[1] != 1:
            raise ValueError(f"cp_split_hw={split} splits the token grid over {split[0] * split[1]} ranks but "
                             "cp_size=1; pass cp_size equal to the split's product, or cp_split_hw=[1, 1]")
        return None
    from .parallel import ContextParallel, init_context_parallel, resolve_split_hw

    split = resolve_split_hw(cp_size, cfg.cp_split_hw)
    if cfg.num_heads % cp_size:
        raise ValueError(f"context parallelism splits attention heads over ranks: num_heads={cfg.num_heads} is "
                         f"not divisible by cp_size={cp_size}")
    if device.type == "meta":  # shapes only (planning): checked, nothing to communicate
        cfg.cp_split_hw = list(split)
        return None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"context parallelism runs on CUDA (NCCL) or the CPU (gloo), not on {device}")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and its object collectives use the current device
    group = init_context_parallel(cp_size, device)
    cfg.cp_split_hw = list(split)
    cp = ContextParallel(group, split, cfg.num_heads, device)
    cp.check_replicas(cfg)
    return cp
