"""Weight streaming for devices smaller than the weights (``offload="blocks"``): the embedders,
the final layer and as many blocks as fit stay resident on the device; the other blocks live in
(pinned) host memory and are copied, one block ahead and on a side stream, into fixed device
staging buffers that their parameters point at.

``WeightStreamer`` owns the host copies and the staging sets; ``LongCatTransformer.run`` calls
``before_block(i)`` before each block it runs. ``plan_resident_blocks`` is the ``max_memory`` rule,
``materialize_streamed`` the loading path (streamed blocks are materialized on the host, never on
the device). Design notes: docs/design/streaming.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels._common import allocator_bytes
from . import device as _device  # free_memory_bytes read through the module: one definition to patch
from .names import OFFLOAD_CHOICES, parse_bytes
from .tracing import model_activation_bytes

__all__ = ["WeightStreamer", "parse_bytes", "plan_resident_blocks", "resolve_resident_blocks", "check_offload",
           "materialize_streamed", "enable_weight_streaming", "disable_weight_streaming", "weight_bytes_on_device",
           "KEEP_RESIDENT", "ALIGN_BYTES", "RESERVE_LATENT", "RESERVE_BATCH"]

# Submodules of a block whose tensors are used outside the block's own call, so they stay resident:
# the loop computes block i+1's adaLN modulation (and block 0's before the loop) before it calls
# ``before_block(i + 1)``. 12.6 M parameters per block of the 13.6B model (4.5% of a block).
KEEP_RESIDENT = ("adaLN_modulation",)
ALIGN_BYTES = 512  # every tensor of a packed block starts at a multiple of this (the allocator's block)
# The activation reserve when none is given: the traced peak of a 480p forward with CFG (batch 2).
RESERVE_LATENT, RESERVE_BATCH = (24, 60, 104), 2


def _align(n: int) -> int:
    return -(-int(n) // ALIGN_BYTES) * ALIGN_BYTES


def _kept(mod_name: str) -> bool:
    first = mod_name.split(".", 1)[0]
    return first in KEEP_RESIDENT


class _Entry:
    """One streamed tensor of a block: where it is registered and where it lies in the packed block."""

    __slots__ = ("module", "name", "is_param", "offset", "nbytes", "dtype", "shape", "aliases")

    def __init__(self, module, name, is_param, offset, t):
        self.module, self.name, self.is_param, self.offset = module, name, is_param, offset
        self.nbytes = t.numel() * t.element_size()
        self.dtype, self.shape = t.dtype, tuple(t.shape)
        self.aliases: List[Tuple[Any, str, bool]] = []  # the same tensor registered under other names

    def current(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def point_at(self, t: torch.Tensor) -> None:
        for module, name, is_param in [(self.module, self.name, self.is_param)] + self.aliases:
            if is_param:
                p = module._parameters[name]
                if torch._has_compatible_shallow_copy_type(p, t):
                    p.data = t  # the same Parameter object: only its storage changes
                else:  # a meta parameter being given storage
                    module._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            else:
                module._buffers[name] = t


def _refuse_assign(module, state, prefix, local_metadata, *rest) -> None:
    """``load_state_dict(..., assign=True)`` would replace the streamed parameters by the given
    tensors, which the streamer then re-points at its buffers (changing the caller's tensors)."""
    if local_metadata.get("assign_to_params_buffers", False):
        raise RuntimeError("load_state_dict(assign=True) is not possible while the model streams its weights (the "
                           "streamed parameters are views of fixed buffers): load with assign=False (the values are "
                           "copied into the host copies), or call disable_weight_streaming() first")


def block_layout(block: torch.nn.Module) -> Tuple[List[_Entry], int]:
    """The streamed tensors of ``block`` (every parameter and buffer, whatever its dtype, but those of
    :data:`KEEP_RESIDENT`) packed at aligned offsets: ``(entries, packed bytes)``."""
    entries: List[_Entry] = []
    seen: Dict[int, _Entry] = {}
    offset = 0
    for mod_name, mod in block.named_modules():
        if _kept(mod_name):
            continue
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) in seen:  # tied: one copy, every name points at it
                    seen[id(t)].aliases.append((mod, name, is_param))
                    continue
                e = _Entry(mod, name, is_param, offset, t)
                seen[id(t)] = e
                entries.append(e)
                offset = _align(offset + e.nbytes)
    return entries, offset


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _block_split_bytes(block) -> Tuple[int, int]:
    """(packed streamed bytes, bytes kept resident) of one block."""
    _, packed = block_layout(block)
    kept = sum(_tensor_bytes(list(m.parameters()) + list(m.buffers()))
               for name, m in block.named_children() if _kept(name))
    return packed, kept


class WeightStreamer:
    """Streams the blocks ``streamed`` of ``model`` (a ``LongCatTransformer``) from host memory.

    At construction every streamed block's tensors are packed into one host buffer per block (pinned
    when ``device`` is CUDA; a tensor already on the device is copied there and its device memory
    freed), and ``num_staging`` device staging sets are allocated, each as large as the largest
    block mapped to it. Streamed position j (the j-th streamed block) always uses staging set
    j % num_staging, and its tensors are views of that set, assigned once (:meth:`attach`): the
    addresses the block computes from never change, which torch.compile and CUDA graph capture
    rely on. A copy is one ``copy_`` of the packed block.

    :meth:`before_block` (called by the model's block loop) is the whole protocol; on the CPU the
    same logic runs with synchronous copies and no streams. The staging contents are valid only from
    the ``before_block`` that loads a block to the end of that block's call: every forward copies
    every streamed block it runs (the PCIe traffic of docs/design/streaming.md).
    """

    def __init__(self, model, streamed: Sequence[int], device=None, num_staging: int = 2):
        blocks = model.blocks
        depth = len(blocks)
        streamed = sorted(set(int(i) for i in streamed))
        if streamed and not (0 <= streamed[0] and streamed[-1] < depth):
            raise ValueError(f"streamed blocks must be in [0, {depth}), got {streamed}")
        if isinstance(num_staging, bool) or not isinstance(num_staging, int) or num_staging < 1:
            raise ValueError(f"num_staging must be a positive int, got {num_staging!r}")
        self.model = model
        self.device = torch.device(device) if device is not None else model.x_embedder.proj.weight.device
        self.streamed: Tuple[int, ...] = tuple(streamed)
        self.depth = depth
        self.num_staging = min(num_staging, len(streamed)) if streamed else 0
        self._slot = {i: j % max(1, self.num_staging) for j, i in enumerate(streamed)}
        self._next: List[Optional[int]] = []
        for i in range(depth):
            later = [j for j in streamed if j > i]
            self._next.append(later[0] if later else None)
        cuda = self.device.type == "cuda"
        self._layout: Dict[int, Tuple[List[_Entry], int]] = {i: block_layout(blocks[i]) for i in streamed}
        # 1) The host copies. A block's tensors point at them until attach().
        self.host: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i in streamed:
                entries, packed = self._layout[i]
                buf = torch.empty(packed, dtype=torch.uint8, pin_memory=cuda)
                for e in entries:
                    view = e.view(buf)
                    t = e.current()
                    if not t.is_meta and t.data_ptr() != view.data_ptr():
                        view.copy_(t)
                    e.point_at(view)  # the device tensor (if any) is freed here
                self.host[i] = buf
        # 2) The staging sets, after the device copies are gone.
        sizes = [0] * self.num_staging
        for i in streamed:
            sizes[self._slot[i]] = max(sizes[self._slot[i]], self._layout[i][1])
        self._staging_sizes = sizes
        self.staging: List[torch.Tensor] = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        self.parked = False
        self._copy_stream = torch.cuda.Stream(device=self.device) if cuda else None
        self._pending: Optional[Tuple[int, Any]] = None  # (block, ready event or None) issued last
        self._slot_user: List[Optional[int]] = [None] * self.num_staging
        self.attached = False
        self.counters = {"copies": 0, "prefetched": 0, "on_demand": 0, "bytes_copied": 0}
        self._hooks = self._install_state_dict_hooks()

    # -- state_dict / load_state_dict: the host copies are the weights ---------------------------
    def _install_state_dict_hooks(self) -> list:
        """Hooks on every module that registers a streamed tensor, so that ``state_dict()`` (of the
        model, a block or any submodule) returns the real weights, views of the host copies, and
        ``load_state_dict`` writes into the host copies. Why: while attached, a streamed block's
        parameters are views of a staging set, which holds whichever block was copied last (and a
        set is shared between blocks, so a save would see one storage under several names)."""
        owned: Dict[int, Tuple[torch.nn.Module, int, List[Tuple[str, _Entry]]]] = {}
        for i in self.streamed:
            for e in self._layout[i][0]:
                for module, name, _ in [(e.module, e.name, e.is_param)] + e.aliases:
                    owned.setdefault(id(module), (module, i, []))[2].append((name, e))
        handles = []
        for module, i, named in owned.values():

            def saved(module, state, prefix, local_metadata, i=i, named=named):
                host = self.host.get(i)
                if host is not None:  # else detached: the tensors are the module's own again
                    for name, e in named:
                        if prefix + name in state:
                            state[prefix + name] = e.view(host)

            def before_load(module, state, prefix, local_metadata, *rest, i=i, named=named):
                _refuse_assign(module, state, prefix, local_metadata)
                if self.host.get(i) is not None:
                    for _, e in named:
                        e.point_at(e.view(self.host[i]))

            def after_load(module, incompatible, i=i, named=named):
                if self.host.get(i) is not None and self.attached and not self.parked:
                    for _, e in named:
                        e.point_at(e.view(self.staging[self._slot[i]]))
                    self.reset()  # a prefetched copy of the old values must not be used

            handles += [module.register_state_dict_post_hook(saved),
                        module.register_load_state_dict_pre_hook(before_load),
                        module.register_load_state_dict_post_hook(after_load)]
        # A load that starts above the streamed tensors' modules is refused before anything loads.
        for top in [self.model] + [self.model.blocks[i] for i in self.streamed]:
            handles.append(top.register_load_state_dict_pre_hook(_refuse_assign))
        return handles

    def _point_block(self, i: int, buf: torch.Tensor) -> None:
        for e in self._layout[i][0]:
            e.point_at(e.view(buf))

    # -- where the streamed blocks' tensors point -----------------------------------------------
    def point_at_staging(self) -> None:
        for i in self.streamed:
            self._point_block(i, self.staging[self._slot[i]])

    def point_at_host(self) -> None:
        """The streamed blocks' tensors become views of their host copies (what loading writes into)."""
        for i in self.streamed:
            self._point_block(i, self.host[i])

    def attach(self) -> "WeightStreamer":
        """Point the streamed blocks at their staging sets and install this streamer on the model.
        LoRAs then apply unmerged (a merge would write into the staging buffers): a model in the
        default "merged" mode with no LoRA active switches to "unmerged" here, so the pipelines'
        LoRA steps (the distilled pass, the refinement) run while streaming."""
        if getattr(self.model, "lora_state", None) is not None and self.model.lora_mode == "merged" \
                and not self.model.lora_state.active:
            self.model.lora_mode = "unmerged"
        self.point_at_staging()
        self._pending = None
        self._slot_user = [None] * self.num_staging
        self.model.weight_streamer = self
        self.attached = True
        return self

    def detach(self) -> None:
        """Every streamed tensor back on the device in its own storage, bit-exact from the host copy;
        staging and host buffers released; the model's streamer removed."""
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)
        self.point_at_host()
        self.staging = []
        with torch.no_grad():
            for i in self.streamed:
                for e in self._layout[i][0]:
                    t = torch.empty(e.shape, dtype=e.dtype, device=self.device)
                    t.copy_(e.view(self.host[i]))
                    e.point_at(t)
        self.host = {}
        self._pending = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, "weight_streamer", None) is self:
            self.model.weight_streamer = None
        self.attached = False

    # -- parking: the resident part in host memory while other models use the device ----------
    def _resident_tensors(self):
        """(module, name, is_param) of every model tensor outside the streamed blocks' packs."""
        packed = {(id(e.module), e.name) for i in self.streamed for e in self._layout[i][0]}
        packed |= {(id(m), n) for i in self.streamed for e in self._layout[i][0] for m, n, _ in e.aliases}
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is not None and (id(module), name) not in packed:
                    yield module, name, True
            for name, b in module._buffers.items():
                if b is not None and (id(module), name) not in packed:
                    yield module, name, False

    def _move_resident(self, device) -> None:
        moved = {}  # tied tensors stay tied
        with torch.no_grad():
            for module, name, is_param in self._resident_tensors():
                t = (module._parameters if is_param else module._buffers)[name]
                if t.device == torch.device(device):
                    continue
                new = moved.setdefault(id(t), t.data.to(device))
                if is_param:
                    t.data = new
                else:
                    module._buffers[name] = new

    def park(self) -> None:
        """Move the resident part (everything but the streamed blocks' host copies) to host memory
        and free the staging sets: the model then holds no device memory until :meth:`unpark`
        (LongCatVideoPipeline's model offload while the text encoder or the VAE runs)."""
        if self.parked:
            return
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)
        self.point_at_host()
        self.staging = []
        self._move_resident("cpu")
        self._pending = None
        self.parked = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unpark(self) -> None:
        """Undo :meth:`park`: the resident part back on the device, new staging sets, attached."""
        if not self.parked:
            return
        self._move_resident(self.device)
        self.staging = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in self._staging_sizes]
        self.parked = False
        self.attach()

    # -- the protocol ---------------------------------------------------------------------------
    def _copy(self, i: int) -> None:
        packed = self._layout[i][1]
        self.staging[self._slot[i]][:packed].copy_(self.host[i], non_blocking=True)
        self.counters["copies"] += 1
        self.counters["bytes_copied"] += packed

    @torch.compiler.disable
    def before_block(self, i: int) -> None:
        if self.parked:
            raise RuntimeError("the model's weights are parked in host memory (WeightStreamer.park): unpark() "
                               "before calling it")
        self._before_block(i)

    def _before_block(self, i: int) -> None:
        """Block i's weights are in its staging set when the block's work starts (in stream order);
        the next streamed block's copy is issued into the other set.

        If block i is the prefetched one, the compute stream waits on its copy event; if not (a step
        cache skipped blocks, or the call order is unusual), an in-flight prefetch is waited on and
        block i is copied now, on the compute stream, after every earlier use of its set: correct in
        any order. The prefetch of the next streamed block j goes on the side stream after an event
        recorded now on the compute stream, i.e. after every block that ran before block i, the last
        user of j's set among them; it is skipped when j's set is block i's own (one set, or a
        position clash), and j is then copied on demand."""
        cuda = self._copy_stream is not None
        compute = torch.cuda.current_stream(self.device) if cuda else None
        pending = self._pending
        if i in self._slot:
            self._pending = None
            if pending is not None and cuda:
                compute.wait_event(pending[1])
            if pending is not None and pending[0] == i:
                self.counters["prefetched"] += 1
            else:
                self._copy(i)
                self.counters["on_demand"] += 1
            self._slot_user[self._slot[i]] = i
        elif pending is not None and pending[0] != self._next[i]:
            self._pending = None
            if cuda:
                compute.wait_event(pending[1])
        j = self._next[i]
        if j is None or self._pending is not None or self._slot_user[self._slot[j]] == i:
            return
        if cuda:
            free = torch.cuda.Event()
            free.record(compute)
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(free)
                self._copy(j)
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        else:
            self._copy(j)
            ready = None
        self._pending = (j, ready)
        self._slot_user[self._slot[j]] = j

    def reset(self) -> None:
        """Forget any prefetch (waited on first): the next before_block copies its block anew."""
        if self._pending is not None and self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending[1])
        self._pending = None
        self._slot_user = [None] * self.num_staging

    # -- accounting -----------------------------------------------------------------------------
    def streamed_bytes(self, i: int) -> int:
        return self._layout[i][1]

    def memory_stats(self) -> Dict[str, int]:
        """Bytes: ``resident_bytes`` (the model's tensors on the device outside the staging sets),
        ``staging_bytes``, ``device_bytes`` (their sum), ``host_bytes`` (the packed host copies),
        ``bytes_per_forward`` (host->device bytes of a forward that runs every block), and the
        block counts; ``counters`` since construction (copies, prefetched, on_demand, bytes_copied)."""
        staging_ptrs = {s.untyped_storage().data_ptr() for s in self.staging}
        host_ptrs = {h.untyped_storage().data_ptr() for h in self.host.values()}
        seen, resident = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in staging_ptrs or ptr in host_ptrs or ptr in seen or t.device != self.device:
                continue
            seen.add(ptr)
            resident += allocator_bytes(st.nbytes())
        staging = sum(allocator_bytes(s.numel()) for s in self.staging)
        return {
            "resident_blocks": self.depth - len(self.streamed),
            "streamed_blocks": len(self.streamed),
            "staging_sets": self.num_staging,
            "resident_bytes": resident,
            "staging_bytes": staging,
            "device_bytes": resident + staging,
            "host_bytes": sum(h.numel() for h in self.host.values()),
            "bytes_per_forward": sum(self._layout[i][1] for i in self.streamed),
            **{k: int(v) for k, v in self.counters.items()},
        }

    def __repr__(self) -> str:
        return (f"WeightStreamer(streamed={len(self.streamed)}/{self.depth} blocks, staging_sets={self.num_staging}, "
                f"device={self.device})")


# ---------------------------------------------------------------------------------------------
# How many blocks stay resident: the max_memory rule
# ---------------------------------------------------------------------------------------------


def default_activation_reserve(model) -> int:
    """The traced activation peak of a 480p forward with CFG (latent 24 x 60 x 104, batch 2) of the
    fused path, for ``model``'s config and dtype (runtime/tracing.py's ``model_activation_bytes``,
    fake tensors: no memory, ~2 s for 48 blocks). Traced with ``type(model)`` (its
    ``from_config``): duck typing, so that this module, below the model, imports no model class."""
    dtype = next(model.parameters()).dtype
    return int(model_activation_bytes(type(model), model.cfg, RESERVE_LATENT, RESERVE_BATCH, dtype)
               ["peak_activation_bytes"])


def plan_resident_blocks(model, max_memory, activation_reserve=None, num_staging: int = 2) -> int:
    """The largest r in [0, depth] such that blocks 0..r-1 resident and the rest streamed fit
    ``max_memory`` bytes (an int or a string, ``parse_bytes``) on the device:

        non-block weights + blocks 0..r-1 + the kept-resident adaLN of blocks r..depth-1
        + min(num_staging, depth - r) staging sets (each the largest streamed block, packed)
        + activation_reserve  <=  max_memory

    ``activation_reserve`` (bytes or a string) defaults to :func:`default_activation_reserve`
    (480p with CFG). Works on a meta model (shapes only). A budget too small even for r = 0 is a
    ValueError naming what is needed."""
    budget = parse_bytes(max_memory)
    depth = len(model.blocks)
    reserve = default_activation_reserve(model) if activation_reserve is None else parse_bytes(activation_reserve)
    sizes = block_sizes(model)

    def need(r: int) -> Tuple[int, int, int]:
        return (*sized_device_bytes(sizes, r, num_staging), reserve)

    for r in range(depth, -1, -1):
        if sum(need(r)) <= budget:
            return r
    weights, staging, _ = need(0)
    g = 2**30
    raise ValueError(
        f"max_memory={budget / g:.2f} GiB is too small: streaming every block still needs {sum(need(0)) / g:.2f} GiB "
        f"on the device = {weights / g:.2f} GiB of resident weights (embedders, final layer, each block's "
        f"adaLN modulation) + {staging / g:.2f} GiB for {min(num_staging, depth)} staging sets + {reserve / g:.2f} GiB "
        "activation reserve; raise max_memory, or pass a smaller activation_reserve for smaller videos")


def block_sizes(model) -> Tuple[int, List[int], List[Tuple[int, int]]]:
    """(bytes outside the blocks, each block's bytes, each block's (packed streamed, kept) bytes)."""
    blocks = model.blocks
    block_ids = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    other = _tensor_bytes([t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in block_ids])
    full = [_tensor_bytes(list(b.parameters()) + list(b.buffers())) for b in blocks]
    return other, full, [_block_split_bytes(b) for b in blocks]


def sized_device_bytes(sizes, r: int, num_staging: int = 2) -> Tuple[int, int]:
    """(resident, staging) device bytes for ``r`` resident blocks, from :func:`block_sizes`."""
    other, full, split = sizes
    depth = len(full)
    kept = sum(split[i][1] for i in range(r, depth))
    staging = sorted((split[i][0] for i in range(r, depth)), reverse=True)[:min(num_staging, depth - r)]
    return other + sum(full[:r]) + kept, sum(staging)


def device_weight_bytes(model, resident_blocks: int, num_staging: int = 2) -> Dict[str, int]:
    """The weight bytes on the device with blocks 0..resident_blocks-1 resident and the rest
    streamed (the :func:`plan_resident_blocks` rule's terms; works on a meta model): ``resident``
    (non-block weights, resident blocks, the streamed blocks' kept adaLN), ``staging``, ``total``,
    and ``streamed_per_forward`` (host-to-device bytes of one forward)."""
    sizes = block_sizes(model)
    r = _check_resident_blocks(resident_blocks, len(sizes[1]))
    resident, staging = sized_device_bytes(sizes, r, num_staging)
    return {"resident": resident, "staging": staging, "total": resident + staging,
            "streamed_per_forward": sum(p for p, _ in sizes[2][r:])}


def _check_resident_blocks(resident_blocks, depth: int) -> int:
    if isinstance(resident_blocks, bool) or not isinstance(resident_blocks, int):
        raise ValueError(f"resident_blocks must be an int in [0, {depth}], got {resident_blocks!r}")
    if not 0 <= resident_blocks <= depth:
        raise ValueError(f"resident_blocks must be in [0, {depth}] (the model has {depth} blocks), got {resident_blocks}")
    return resident_blocks


def resolve_resident_blocks(model, device, resident_blocks=None, max_memory=None, activation_reserve=None,
                            num_staging: int = 2) -> int:
    """``resident_blocks`` as given (checked), or the :func:`plan_resident_blocks` rule for
    ``max_memory``; neither: the budget is what the device can hold (its free memory plus what this
    model already holds there)."""
    depth = len(model.blocks)
    if resident_blocks is not None and max_memory is not None:
        raise ValueError("pass resident_blocks or max_memory, not both")
    if resident_blocks is not None:
        return _check_resident_blocks(resident_blocks, depth)
    if max_memory is None:
        free = _device.free_memory_bytes(device)
        if free is None:
            raise ValueError(f"the free memory of {device} is unknown: pass max_memory or resident_blocks")
        held = _tensor_bytes([t for t in list(model.parameters()) + list(model.buffers())
                              if t.device == torch.device(device)])
        max_memory = free + held
    return plan_resident_blocks(model, max_memory, activation_reserve, num_staging)


def check_offload(offload, resident_blocks=None, max_memory=None) -> Optional[str]:
    """``offload`` as "blocks" or None; ``resident_blocks`` / ``max_memory`` only go with "blocks"."""
    if offload in (None, "none"):
        if resident_blocks is not None or max_memory is not None:
            raise ValueError('resident_blocks and max_memory need offload="blocks"')
        return None
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES} or None, got {offload!r}")
    if max_memory is not None:
        parse_bytes(max_memory)  # a bad string fails before anything else happens
    return offload


# ---------------------------------------------------------------------------------------------
# The model's API (LongCatDiT.enable_weight_streaming / disable_weight_streaming / from_pretrained)
# ---------------------------------------------------------------------------------------------


def check_lora(model, mode: str, keys) -> None:
    """Merged LoRAs and streaming exclude each other: a merge writes into the parameters, which for
    a streamed block are the staging buffers (overwritten by the next copy). Unmerged LoRAs (branch
    tensors on the device, outside the streamed parameters) compose."""
    if getattr(model, "weight_streamer", None) is not None and mode == "merged" \
            and isinstance(keys, (list, tuple)) and len(keys):
        raise ValueError("merged LoRAs cannot be applied while the weights stream (a merge would write into the "
                         'staging buffers): set dit.lora_mode = "unmerged" first, or disable_weight_streaming()')


def check_not_streaming(model, what: str) -> None:
    if getattr(model, "weight_streamer", None) is not None:
        raise RuntimeError(f"{what} is not possible while the model streams its weights (enable_weight_streaming / "
                           "offload='blocks'): the streamed blocks point at fixed staging buffers; call "
                           "disable_weight_streaming() first")


def finish_loading(model) -> None:
    """After the weights are written (into the host copies, for streamed blocks): start streaming."""
    streamer = getattr(model, "weight_streamer", None)
    if streamer is not None and not streamer.attached:
        streamer.attach()


def enable_weight_streaming(model, resident_blocks=None, *, max_memory=None, activation_reserve=None,
                            num_staging: int = 2) -> Optional[WeightStreamer]:
    """Stream blocks resident_blocks..depth-1 of a model on its device (see LongCatDiT)."""
    st = getattr(model, "lora_state", None)
    if st is not None and st.merged:
        raise ValueError("weight streaming with merged LoRAs is not supported (a merge writes into the staging "
                         'buffers): call disable_all_loras() first, and use dit.lora_mode = "unmerged"')
    device = model.x_embedder.proj.weight.device
    if device.type == "meta":
        raise ValueError("weight streaming needs a model with storage, not one on the meta device")
    if model.weight_streamer is not None:
        model.weight_streamer.detach()
    r = resolve_resident_blocks(model, device, resident_blocks, max_memory, activation_reserve, num_staging)
    if r == len(model.blocks):
        return None
    return WeightStreamer(model, range(r, len(model.blocks)), device, num_staging).attach()


def disable_weight_streaming(model) -> None:
    if model.weight_streamer is not None:
        model.weight_streamer.detach()


def materialize_streamed(model, device, *, resident_blocks=None, max_memory=None, activation_reserve=None,
                         num_staging: int = 2):
    """Give a meta ``model`` storage for streaming: every tensor that stays resident gets
    uninitialized storage on ``device``, the streamed blocks' tensors become views of their (pinned)
    host copies, never allocated on the device. Returns the model, with its ``weight_streamer``
    installed but not attached (fill the weights, then :func:`finish_loading`); none when every
    block fits (the whole model is then on the device). The resident bytes are checked against the device's free memory and the host bytes
    against the host's."""
    depth = len(model.blocks)
    r = resolve_resident_blocks(model, device, resident_blocks, max_memory, activation_reserve, num_staging)
    streamed = range(r, depth)
    host = {id(t) for i in streamed for e in block_layout(model.blocks[i])[0] for t in [e.current()]}
    resident = _tensor_bytes([t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in host])
    staging = sorted((block_layout(model.blocks[i])[1] for i in streamed), reverse=True)[:num_staging]
    for where, need in ((device, resident + sum(staging)),
                        (torch.device("cpu"), sum(block_layout(model.blocks[i])[1] for i in streamed))):
        free = _device.free_memory_bytes(where)
        if need and free is not None and need > free:
            raise ValueError(f"weight streaming with {r} resident blocks needs {need / 2**30:.2f} GiB on {where}, "
                             f"only {free / 2**30:.2f} GiB are free")
    with torch.no_grad():
        for mod in model.modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None or id(t) in host or not t.is_meta:
                        continue
                    new = torch.empty(t.shape, dtype=t.dtype, device=device)
                    if is_param:
                        table[name] = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    else:
                        table[name] = new
    if r < depth:
        model.weight_streamer = WeightStreamer(model, streamed, device, num_staging)  # allocates the host copies
    return model


def weight_bytes_on_device(model) -> int:
    """Bytes of the model's parameters and buffers on its device: staging sets included when streaming."""
    if model.weight_streamer is not None:
        return model.weight_streamer.memory_stats()["device_bytes"]
    device = model.x_embedder.proj.weight.device
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        if t.device == device and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += allocator_bytes(st.nbytes())
    return total
