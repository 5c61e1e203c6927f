"""``LongCatDiT``: the public model, a drop-in for the official ``LongCatVideoTransformer3DModel``.

This file holds construction (from a checkpoint or random weights), input checking and the
official call signature; the network itself is ``LongCatTransformer`` in model.py. Code written
for the official module reads ``dit.config.<official key>``, ``dit.dtype``, ``dit.cp_split_hw``,
``dit.lora_dict``, calls ``dit.to(...)``, ``from_pretrained(root, subfolder="dit",
torch_dtype=..., cp_split_hw=...)`` and ``torch.compile(dit)``; all of these work here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from ..kernels.ops import Ops, get_ops
from ..kernels._common import is_fake, triton_usable_on
from . import lora
from .attention import check_attention_name, resolve_attention_backend
from .config import LongCatConfig, resolve_config
from .model import LongCatTransformer
from .names import KERNEL_CHOICES, merge_alias
from .weights import find_dit_dir, list_weight_files, load_official_weights

__all__ = ["LongCatDiT", "resolve_dtype", "bsa_kernel_path"]

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


def _resolve_device(device, cp_size: int = 1) -> torch.device:
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


class _DeviceKVCache:
    """The caller's ``kv_cache_dict`` seen block by block as ``[B, Nc, heads, D]`` tensors.

    A block's cache is moved to the model's device and dtype only when that block needs it. When
    the cache lives in host memory and the model on CUDA (``offload_kv_cache``), block i+1's copy
    is issued on a side stream while block i computes, so at most two blocks' caches sit in device
    memory and the transfer hides behind compute (pinned host memory makes it a true async DMA).
    A batch-1 cache is shared by every item of the call (an expanded view, no copy).
    """

    def __init__(self, cache: Mapping[int, Tuple[torch.Tensor, torch.Tensor]], batch: int, device, dtype):
        self.cache, self.batch, self.device, self.dtype = cache, batch, device, dtype
        self.stream = None
        if device.type == "cuda" and any(k.device.type == "cpu" for k, _ in cache.values()):
            self.stream = torch.cuda.Stream(device=device)
        self.pending: Dict[int, Any] = {}

    def _load(self, i: int):
        return tuple(t.to(device=self.device, dtype=self.dtype, non_blocking=True) for t in self.cache[i])

    def _prefetch(self, i: int) -> None:
        if self.stream is None or i not in self.cache or i in self.pending:
            return
        with torch.cuda.stream(self.stream):
            kv = self._load(i)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.pending[i] = (kv, ready)

    def __getitem__(self, i: int):
        if i in self.pending:
            kv, ready = self.pending.pop(i)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in kv:  # allocated on the side stream, used on the compute stream
                t.record_stream(compute)
        else:
            kv = self._load(i)
        self._prefetch(i + 1)
        return tuple(t.transpose(1, 2).expand(self.batch, -1, -1, -1) for t in kv)


class _KVSink:
    """Receives each block's (k, v) [B, N, heads, D] as the forward produces it and keeps it in the
    returned layout [B, heads, N, D]. With ``offload`` on CUDA, each block's copy to pinned host
    memory runs on a side stream right away (overlapping later blocks, freeing device memory
    early); ``finish`` waits for the copies once, at the end of the forward."""

    def __init__(self, device: torch.device, offload: bool):
        self.offload = offload
        self.stream = torch.cuda.Stream(device=device) if offload and device.type == "cuda" else None
        self.out: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __setitem__(self, i: int, kv) -> None:
        kv = tuple(t.transpose(1, 2).contiguous() for t in kv)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(kv[0].device))
            host = []
            with torch.cuda.stream(self.stream):
                for t in kv:
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    t.record_stream(self.stream)  # keep t's memory until the copy is done
                    host.append(h)
            kv = tuple(host)
        elif self.offload:
            kv = tuple(t.to("cpu") for t in kv)
        self.out[i] = kv

    def finish(self) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        if self.stream is not None:
            self.stream.synchronize()  # host tensors are complete before the caller sees them
        return self.out


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
        **config_overrides,
    ) -> "LongCatDiT":
        """Load an official checkpoint: ``path`` is a ``dit/`` folder or a root that has one.

        ``torch_dtype``, ``pretrained_model_name_or_path`` and ``subfolder`` are the official
        (diffusers) spellings; other keyword arguments name ``config.json`` keys and override them
        (e.g. ``text_tokens_zero_pad=False``, ``cp_split_hw=[1, 1]``).
        """
        path = merge_alias(path, pretrained_model_name_or_path, "path", "pretrained_model_name_or_path")
        if path is None:
            raise TypeError("from_pretrained() needs a checkpoint path")
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        cp_size = _check_cp_size(cp_size)
        dit_dir = find_dit_dir(path, subfolder)
        cfg = LongCatConfig.from_json_file(str(dit_dir / "config.json"), config_overrides)
        files = list_weight_files(dit_dir)
        device = _resolve_device(device, cp_size)
        cp = _context_parallel(cfg, cp_size, device)
        model = cls._allocate(cfg, resolve_dtype(dtype, device), device, kernels, attention)
        load_official_weights(model, files, cfg)
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
        **config_overrides,
    ) -> "LongCatDiT":
        """Random weights of a preset ("tiny", "longcat-video"), a config dict or a config.json.

        Parameters are allocated directly on ``device`` in ``dtype`` and filled there by a
        generator on that device, so the 13.6B config never exists in float32 on the host.
        ``device="meta"`` builds shapes only (parameter counting, planning). The values are for
        tests and benchmarks, not training: every weight, adaLN and the final layer included, is
        random so each path does real work (the official init zeroes adaLN, making the output 0).
        """
        dtype = merge_alias(dtype, torch_dtype, "dtype", "torch_dtype")
        cp_size = _check_cp_size(cp_size)
        cfg = resolve_config(config_or_name, config_overrides)
        device = _resolve_device(device, cp_size)
        cp = _context_parallel(cfg, cp_size, device)
        model = cls._allocate(cfg, resolve_dtype(dtype, device), device, kernels, attention)
        if device.type != "meta":
            model._init_random(seed)  # same seed on every rank: identical replicas
        model.cp = cp
        return model.eval()

    @classmethod
    def _allocate(cls, cfg, dtype, device, kernels, attention) -> "LongCatDiT":
        # Built on the meta device, then given uninitialized storage on the target device in the
        # target dtype: no default init pass, no host copy.
        with torch.device("meta"):
            model = cls(cfg, kernels=kernels, attention=attention)
        # An inference runtime: no autograd state (the fused kernels have no backward).
        model = model.requires_grad_(False).to(dtype=dtype)
        if device.type != "meta":
            model = model.to_empty(device=device)
        return model

    @torch.no_grad()
    def _init_random(self, seed: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm and LayerNorm gains
                p.normal_(1.0, 0.1, generator=gen)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                # fan-in scaling keeps activations O(1) through depth, like nn.Linear's default.
                p.uniform_(-1.0, 1.0, generator=gen).mul_(math.sqrt(3.0 / p.shape[1]))

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
        lora.set_lora_mode(self, mode)

    @property
    def active_loras(self):
        """Keys of the active LoRAs, in the order given to :meth:`enable_loras` (a copy)."""
        return list(self.lora_state.active)

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
        """
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
        if kv_cache_dict:  # the official default is {} (no cache)
            cache_frames = self._check_kv_cache(kv_cache_dict, B, hidden_states.shape, num_cond_latents)
            if self.cp is not None:  # this rank attends with its heads only: move just those
                kv_cache_dict = {i: tuple(self.cp.local_heads_of(t, 1) for t in kv) for i, kv in kv_cache_dict.items()}
            cache = _DeviceKVCache(kv_cache_dict, B, x.device, self.dtype)
            num_cond_latents = 0  # conditioning lives in the cache; every token here is noisy
        else:
            num_cond_latents = _check_int("num_cond_latents", num_cond_latents)
            if not 0 <= num_cond_latents <= T:
                raise ValueError(f"num_cond_latents must be in [0, {T}] (the latent frames), got {num_cond_latents}")

        sink = _KVSink(x.device, bool(offload_kv_cache)) if return_kv else None
        out = self.run(
            x, t, text, mask, num_cond_latents, cache, cache_frames, sink, bool(skip_crs_attn),
            attention_backend=self.resolved_attention(), ops=self.resolved_ops(), cp=self.cp, block_fn=block_fn,
        )
        return (out, sink.finish()) if return_kv else out

    # -- input checking: every malformed input is a ValueError naming what is wrong -------------
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
        if text.dim() == 4 and text.shape[1] == 1:
            text = text[:, 0]
        if text.dim() != 3 or text.shape[-1] != cfg.caption_channels:
            raise ValueError(f"encoder_hidden_states must be [B, 1, L, {cfg.caption_channels}] or "
                             f"[B, L, {cfg.caption_channels}], got {tuple(text.shape)}")
        if text.shape[0] != B:
            raise ValueError(f"encoder_hidden_states has batch {text.shape[0]}, hidden_states has batch {B}")
        if text.shape[1] == 0:
            raise ValueError("encoder_hidden_states has no tokens (L = 0)")
        L = text.shape[1]
        if mask is not None:
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
            raise ValueError(f"kv_cache_dict must have one (k, v) per block 0..{depth - 1}, got keys {sorted(keys, key=str)}")
        tokens_per_frame = (latent_shape[3] // cfg.patch_size[1]) * (latent_shape[4] // cfg.patch_size[2])
        shape0 = None
        for i in range(depth):
            entry = cache[i]
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"kv_cache_dict[{i}] must be a (k, v) pair")
            k, v = entry
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
        num_cond_latents = _check_int("num_cond_latents", num_cond_latents)
        if num_cond_latents not in (0, m):
            raise ValueError(f"num_cond_latents={num_cond_latents} but the kv cache holds {m} frames")
        return m


def _check_int(name: str, v) -> int:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    return v


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
