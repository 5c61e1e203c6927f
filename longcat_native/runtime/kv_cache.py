"""KV caches of the official call: :class:`KVCache` (what ``return_kv=True`` returns, with the
grid and the model it was made by), :class:`DeviceKVCache` (a caller's cache seen block by block
on the model's device, prefetched on a side stream from host memory) and :class:`KVSink` (each
block's new (k, v), optionally copied to pinned host memory as the forward goes)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["KVCache", "DeviceKVCache", "KVSink", "IDENTITY_KEYS", "CONFIG_IDENTITY_KEYS", "model_identity",
           "identity_differences"]


class KVCache(dict):
    """What ``return_kv=True`` returns: the official ``{block: (k, v)}`` mapping (k, v
    ``[B, heads, N, D]``), which also records what it was made from, so a call with it can check
    that it fits: ``grid`` is the (T, H, W) of the latent it was made from, ``made_by`` the
    identity of the model that made it (:data:`IDENTITY_KEYS`: its structural config, checkpoint
    folder, quantized mode and active LoRAs with their scales).

    A call passing it as ``kv_cache_dict`` must have the same latent H and W (the cached keys'
    RoPE positions depend on them: a cache from another grid with as many tokens per frame, H and
    W swapped or 2x(4x4) vs 1x(4x8), is a ValueError, not a silently wrong video), and be made on a
    model with the same identity. Plain dicts (official-format caches from elsewhere) are still
    accepted, with the shape checks only."""

    def __init__(self, entries=(), grid: Optional[Tuple[int, int, int]] = None,
                 made_by: Optional[Dict[str, Any]] = None):
        super().__init__(entries)
        self.grid = None if grid is None else tuple(int(v) for v in grid)
        self.made_by = made_by

    def __repr__(self) -> str:
        return f"KVCache(blocks={len(self)}, grid={self.grid})"

    def __reduce__(self):  # copy/pickle keep the attributes
        return (type(self), (dict(self), self.grid, self.made_by))


# Config keys that decide what a KV cache's keys and values are.
CONFIG_IDENTITY_KEYS = ("in_channels", "hidden_size", "depth", "num_heads", "caption_channels", "mlp_ratio",
                        "adaln_tembed_dim", "frequency_embedding_size", "patch_size")
# What a KVCache's ``made_by`` records: those, the checkpoint folder (None: random weights), the
# quantized mode of the block GEMMs (None: float weights) and the active LoRAs as [key, scale, file]
# in their order. The weights decide the keys and values as much as the shapes do: an fp8 model's
# cache differs from the float model's (~1e-2 relative), a LoRA's from the base model's.
IDENTITY_KEYS = CONFIG_IDENTITY_KEYS + ("checkpoint", "quantization", "loras")


def model_identity(dit) -> Dict[str, Any]:
    """A ``LongCatDiT``'s values of :data:`IDENTITY_KEYS` (JSON-friendly: lists, not tuples). A
    LoRA's scale is the multiplier it was applied with (``lora_state.scales``)."""
    c = dit.cfg
    ident: Dict[str, Any] = {k: (list(getattr(c, k)) if k == "patch_size" else getattr(c, k))
                             for k in CONFIG_IDENTITY_KEYS}
    st = dit.lora_state
    ident["checkpoint"] = dit.checkpoint_path
    ident["quantization"] = dit.quantization
    ident["loras"] = [[str(k), float(s), getattr(dit.lora_dict.get(k), "path", None)]
                      for k, s in zip(st.active, st.scales)]
    return ident


def _describe(key: str, value) -> str:
    if key == "quantization" and value is None:
        return "none (float weights)"
    if key == "loras":
        return "none" if not value else ", ".join(f"{k!r} x{s:g}" + (f" ({p})" if p else "") for k, s, p in value)
    return repr(value)


def identity_differences(made_by: Mapping[str, Any], mine: Mapping[str, Any]) -> List[str]:
    """What differs between a cache's ``made_by`` and a model's identity, one phrase per key
    ("quantization 'fp8' (this model: none (float weights))"). A key the cache does not record
    (a cache from an older version) counts as None / no LoRAs."""
    out = []
    for k in mine:
        theirs = made_by.get(k, [] if k == "loras" else None)
        if k == "loras" and theirs is not None:
            theirs = [list(e) for e in theirs]
        if theirs != mine[k]:
            name = "active LoRAs" if k == "loras" else k
            out.append(f"{name} {_describe(k, theirs)} (this model: {_describe(k, mine[k])})")
    return out


class DeviceKVCache:
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


class KVSink:
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
