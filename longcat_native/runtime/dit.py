"""``LongCatDiT``: the public model, a drop-in for the official ``LongCatVideoTransformer3DModel``.

This file holds the model object: the official attributes (``dit.config.<official key>``,
``dit.dtype``, ``dit.cp_split_hw``, ``dit.lora_dict``), the LoRA, BSA, memory and streaming methods,
and the official call. Building it is runtime/construction.py (``from_pretrained(root,
subfolder="dit", torch_dtype=..., cp_split_hw=...)``, ``from_config``), checking a call's inputs
runtime/call_inputs.py, both base classes of ``LongCatDiT``; the network itself is
``LongCatTransformer`` in model.py. ``dit.to(...)`` and ``torch.compile(dit)`` work as on the
official module. ``resolve_dtype``, ``resolve_device``, ``bsa_kernel_path`` and
``free_memory_bytes`` (runtime/device.py) are re-exported here, where callers have imported them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..kernels.ops import Ops, get_ops
from ..kernels._common import is_fake, triton_usable_on
from . import lora, sharding, streaming
from . import quantize as qz
from . import quantized_checkpoints as qc
from .attention import check_attention_name, resolve_attention_backend
from .call_inputs import CallInputs, check_step_cache
from .config import LongCatConfig
from .construction import LongCatDiTConstruction
from .device import bsa_kernel_path, free_memory_bytes, resolve_device, resolve_dtype
from .kv_cache import KVCache, model_identity
from .model import _RING_BSA, LongCatTransformer
from .names import KERNEL_CHOICES

__all__ = ["LongCatDiT", "resolve_dtype", "resolve_device", "bsa_kernel_path", "free_memory_bytes"]


class LongCatDiT(LongCatDiTConstruction, CallInputs, LongCatTransformer):
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
        # its layout (runtime/checkpoints.py: "official", "diffusers", ...), None for from_config
        self.checkpoint_layout: Optional[str] = None
        # ContextParallel (runtime/parallel.py) when built with cp_size > 1: the forward is split
        # over the ranks of its process group, each rank passing and receiving full tensors.
        self.cp = None
        # Parallel (runtime/mesh.py) in a parallel run: the device mesh and its groups (CFG-parallel,
        # data parallel, weight sharding read it); None in a single process.
        self.parallel = None
        # Set by runtime/sharding.py when built with shard_weights=True (each rank holds 1/N of the blocks).
        self.weight_sharding = None
        # Which LoRAs are active, in which mode, and the exact copies merged weights restore from.
        self.lora_state = lora.LoRAState()
        # The CUDAGraphRunner that denoise replays for this model (runtime/compiled.py,
        # graph_runner_for), kept so later calls at the same shape replay graphs captured earlier.
        self.graph_runner = None

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
        sharding.check_not_sharded(self, "save_quantized")  # every rank would write the folder
        return str(qc.save_quantized(self, path))

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
                + (f", checkpoint_layout={self.checkpoint_layout!r}" if self.checkpoint_layout is not None else "")
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
        """Read an official (or FastVideo-format) LoRA safetensors file into
        ``self.lora_dict[lora_key]`` (nothing is applied until :meth:`enable_loras`). Scale per
        module: ``multiplier * alpha_scale`` (the file's); ``lora_network_dim`` must be an official
        file's rank. Reloading a key replaces it."""
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
        sharding.check_not_sharded(self, "weight streaming")
        return streaming.enable_weight_streaming(self, resident_blocks, max_memory=max_memory,
                                                 activation_reserve=activation_reserve, num_staging=num_staging)

    def disable_weight_streaming(self) -> None:
        """Every block resident on the device again, bit-exactly (from the host copies)."""
        streaming.disable_weight_streaming(self)

    def weight_bytes_on_device(self) -> int:
        """Device bytes of the weights: the resident tensors, plus the staging sets when streaming;
        this rank's shards and replicated tensors under shard_weights (between forwards)."""
        if sharding.is_sharded(self):
            return sharding.local_weight_bytes(self)["total"]
        return streaming.weight_bytes_on_device(self)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), to_empty(): the weights would move
        streaming.check_not_streaming(self, "moving or casting the model")
        sharding.check_not_sharded(self, "moving or casting the model")  # FSDP2 keeps views of the shards
        return super()._apply(fn, recurse)

    # -- block-sparse attention (official API) ------------------------------------------------
    def enable_bsa(self) -> None:
        """Self-attention becomes block-sparse (``config.bsa_params``) on latents of more than one
        frame; grids that do not tile into the chunk shapes fall back to dense with a warning.
        Refused under ring attention (docs/design/parallel.md, "Ring attention")."""
        if self.cp is not None and self.cp.ring:
            raise ValueError(_RING_BSA)
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
        out = self.run(**kw, **({} if step_cache is None else {"step_cache": check_step_cache(step_cache, return_kv)}))
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
        step_cache = check_step_cache(step_cache, False)
        s = self.begin(**kw, keep_input=True)
        return s, self.step_cache_head(s, step_cache, always=True)

    def kv_cache_identity(self) -> Dict[str, Any]:
        """What a :class:`KVCache` made by this model records as ``made_by`` (runtime/kv_cache.py
        ``IDENTITY_KEYS``): the config keys that decide the cached keys and values, the checkpoint
        folder (None for random weights), the quantized mode and the active LoRAs with their scales."""
        return model_identity(self)
