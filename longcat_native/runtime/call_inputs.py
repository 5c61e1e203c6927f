"""The official call's inputs, checked and converted: every malformed input to ``LongCatDiT``'s
``forward`` is a ValueError naming what is wrong (shapes, dtypes, the meta device, a KV cache made
by another model or for another grid), and the checked inputs become the keyword arguments of
``LongCatTransformer.run`` / ``begin`` (model.py).

``CallInputs`` is a base class of ``LongCatDiT`` (runtime/dit.py) holding these methods; they use
the model only through its attributes (``cfg``, ``cp``, ``device``, ``dtype``, ``resolved_*``,
``kv_cache_identity``), so this module does not import dit.py.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, Mapping, Tuple

import torch

from .kv_cache import DeviceKVCache, KVCache, KVSink, identity_differences
from .weights import cap_list

__all__ = ["CallInputs", "check_step_cache", "check_int"]


class CallInputs:
    """The input checking of ``LongCatDiT`` (a mixin)."""

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
            num_cond_latents = check_int("num_cond_latents", num_cond_latents)
            if not 0 <= num_cond_latents <= T:
                raise ValueError(f"num_cond_latents must be in [0, {T}] (the latent frames), got {num_cond_latents}")

        sink = KVSink(x.device, bool(offload_kv_cache)) if return_kv else None
        return dict(hidden_states=x, timestep=t, text=text, text_mask=mask, num_cond_latents=num_cond_latents,
                    kv_cache=cache, cache_frames=cache_frames, kv_sink=sink, skip_crs_attn=bool(skip_crs_attn),
                    attention_backend=self.resolved_attention(), ops=self.resolved_ops(), cp=self.cp, block_fn=block_fn)

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
        num_cond_latents = check_int("num_cond_latents", num_cond_latents)
        if num_cond_latents not in (0, m):
            raise ValueError(f"num_cond_latents={num_cond_latents} but the kv cache holds {m} frames")
        return m


def check_step_cache(step_cache, return_kv):
    from .step_cache import StepCache

    if not isinstance(step_cache, StepCache):
        raise ValueError(f"step_cache must be a StepCache, got {type(step_cache).__name__}")
    if return_kv:
        raise ValueError("step_cache cannot be combined with return_kv=True (a cached step has no middle blocks' KV)")
    return step_cache


def check_int(name: str, v) -> int:
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
