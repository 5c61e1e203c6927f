"""FSDP2 weight sharding (``shard_weights=True``): each rank holds 1/N of every block's weights,
and a block is all-gathered just before it runs, one block ahead (docs/design/parallel.md,
"Weight sharding").

``torch.distributed.fsdp.fully_shard`` per block (the natural unit: a block is 538 MiB in bf16 at
the real config, 48 of them hold 99.7% of the weights), on ``dit.parallel.world_mesh`` (every
rank: the weights are the same everywhere). The root (embedders, final layer: 74 MiB in bf16,
0.3%) is a ``fully_shard`` state too, so FSDP2 initializes every block's state together, but its
parameters are ``ignored_params``: replicated. Sharding them would save 55 MiB per rank on 4 ranks
and cost an all-gather per step, and ``begin`` / ``finish`` read them outside any module call.

Two facts of the model shape the schedule:

- Block i+1's adaLN modulation runs before block i+1's forward (``_add_residual`` fuses it with
  block i's last residual), outside any FSDP hook. Each block's ``modulation`` is therefore
  wrapped (an instance attribute) to wait for the block's all-gather first; the forward's own
  pre-hook then finds the block gathered, and its post-hook reshards it. One all-gather per block
  per forward, whatever calls the modulation.
- Prefetch is explicit (``set_modules_to_forward_prefetch``: block i's pre-forward issues block
  i+1's all-gather), so at most two blocks are gathered: the current one and the next.

Inference only: no gradients (the parameters do not require them), no mixed precision (the model
dtype is the compute dtype). fp8/int8 weights are plain int8/float8 parameters
(runtime/quantize.py): a block mixes them with model-dtype biases and norms, and FSDP2 all-gathers
such a group as bytes (uint8), which gloo and NCCL both carry; the float32 ``weight_scale``
buffers are replicated (FSDP2 shards parameters, not buffers; 0.1% of an int8 block).

Loading: the model is built on the meta device, then the root gets device storage and the blocks
host storage (on a CPU model, both on the CPU), the checkpoint (or the random init) fills them
as for any model, and :func:`shard_model` moves each block to the device and keeps this rank's
rows only. The device never holds more than the shards, the root and one whole block; the ranks
load one after another (:func:`load_in_turns`), so the host holds one copy of the blocks at a
time (docs/design/parallel.md has the figures).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["check_shard_options", "materialize_for_sharding", "load_in_turns", "shard_model", "is_sharded",
           "check_not_sharded", "local_shard", "row_offsets", "gather_rows", "local_weight_bytes", "shard_sizes",
           "sharded_device_bytes", "block_runner", "GATHERED_BLOCKS"]

# Blocks gathered at once on the device: the one running and the one prefetched.
GATHERED_BLOCKS = 2


def check_shard_options(pc, offload, device: torch.device) -> None:
    """The checks before anything is built (the same on every rank)."""
    if not pc.shard_weights:
        return
    if offload is not None:
        raise ValueError('shard_weights=True and offload="blocks" exclude each other: streaming copies whole blocks '
                         "from this rank's host memory, sharding gathers them from the other ranks' device memory; "
                         "with enough ranks sharding alone fits (1/N of the weights per rank), so drop offload")
    if device.type != "meta" and pc.world_size < 2:
        raise ValueError("shard_weights=True splits the weights over the ranks of a parallel run, but this is a "
                         "single process: launch with torchrun --nproc-per-node N and a layout of N ranks "
                         "(cp_size, ring_size, cfg_parallel, dp_size)")


def is_sharded(model) -> bool:
    """True once :func:`shard_model` ran on ``model``."""
    return getattr(model, "weight_sharding", None) is not None


def check_not_sharded(model, what: str) -> None:
    if is_sharded(model):
        raise RuntimeError(f"{what} is not possible on a model built with shard_weights=True: each rank holds 1/N of "
                           "every block (FSDP2 shards, runtime/sharding.py); build the model without shard_weights "
                           "for this")


# -- sizes ---------------------------------------------------------------------------------------


def _shard_rows(rows: int, world: int, index: int) -> Tuple[int, int]:
    """[start, stop) of the dim-0 rows rank ``index`` holds: FSDP2 chunks dim 0 as torch.chunk
    does (ceil(rows / world) per rank, the last ones shorter or empty)."""
    per = -(-rows // world)
    start = min(index * per, rows)
    return start, min(start + per, rows)


def shard_sizes(model) -> Tuple[int, List[List[Tuple[int, int]]], List[int]]:
    """What :func:`sharded_device_bytes` needs (works on a meta model): (bytes outside the blocks,
    each block's parameters as (dim-0 rows, bytes per row), each block's buffer bytes)."""
    blocks = list(model.blocks)
    in_blocks = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
    other = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if id(t) not in in_blocks)
    params = [[(p.shape[0], p.numel() // max(p.shape[0], 1) * p.element_size()) for p in b.parameters()]
              for b in blocks]
    buffers = [sum(t.numel() * t.element_size() for t in b.buffers()) for b in blocks]
    return other, params, buffers


def sharded_device_bytes(sizes, world: int, gathered: int = GATHERED_BLOCKS) -> Dict[str, int]:
    """Per-rank device bytes of the weights sharded over ``world`` ranks, from :func:`shard_sizes`:
    ``shards`` (rank 0's rows of every block parameter, FSDP2's dim-0 chunks: the most any rank
    holds), ``replicated`` (the root's weights and the block buffers: quantized weights' float32
    scales), ``gathered`` (the parameters of the ``gathered`` largest blocks, whole: the one
    running and the one prefetched) and ``total``."""
    other, params, buffers = sizes
    shards = sum(_shard_rows(rows, world, 0)[1] * row for block in params for rows, row in block)
    whole = sorted((sum(rows * row for rows, row in block) for block in params), reverse=True)
    peak = sum(whole[:gathered])
    replicated = other + sum(buffers)
    return {"shards": shards, "replicated": replicated, "gathered": peak, "total": shards + replicated + peak}


def local_weight_bytes(model) -> Dict[str, int]:
    """Bytes of the weights this rank holds: ``sharded`` (its shards of the block parameters),
    ``replicated`` (the root and the block buffers) and ``total``. On an unsharded model the
    blocks count whole under ``sharded``."""
    sharded = replicated = 0
    block_params = {id(p) for b in model.blocks for p in b.parameters()}
    for p in model.parameters():
        t = local_shard(p)[0]
        n = t.numel() * t.element_size()
        if id(p) in block_params:
            sharded += n
        else:
            replicated += n
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"sharded": sharded, "replicated": replicated, "total": sharded + replicated}


def local_shard(p: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(this rank's rows of ``p`` as a plain tensor viewing the shard's storage, the global index of
    its first row); an unsharded tensor is itself at row 0. Writes into the view change the shard
    the next all-gather reads (FSDP2's sharded parameter is a view of its padded shard storage)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return p, 0
    mesh = p.device_mesh
    start, stop = _shard_rows(p.shape[0], mesh.size(), mesh.get_local_rank())
    local = p.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(f"a sharded parameter of shape {tuple(p.shape)} holds {local.shape[0]} rows on this rank, "
                           f"not the {stop - start} of a dim-0 chunk: not FSDP2's layout")
    return local, start


def row_offsets(model) -> Dict[str, int]:
    """{parameter name: global index of this rank's first row} for the sharded parameters; empty
    on an unsharded model (what LoRA merging needs to place its deltas, runtime/lora.py)."""
    if not is_sharded(model):
        return {}
    return {n: local_shard(p)[1] for n, p in model.named_parameters() if n.startswith("blocks.")}


def gather_rows(model, dst: torch.Tensor, local: torch.Tensor) -> None:
    """``dst`` (a replicated tensor, [rows, ...]) set to every rank's ``local`` rows in rank order,
    each rank's being its dim-0 chunk of ``dst`` (FSDP2's split): the new per-row scales of a
    LoRA merged into a sharded quantized weight (runtime/lora.py). A collective over the world."""
    import torch.distributed as dist

    group = model.parallel.world_mesh.get_group()
    world, rows = dist.get_world_size(group), dst.shape[0]
    per = -(-rows // world)
    send = local.new_zeros((per,) + tuple(local.shape[1:]))
    send[: local.shape[0]] = local  # the last ranks' chunks are short or empty: padded at the end
    out = local.new_empty((per * world,) + tuple(local.shape[1:]))
    dist.all_gather_into_tensor(out, send, group=group)
    dst.copy_(out[:rows])


# -- construction --------------------------------------------------------------------------------


def materialize_for_sharding(model, device: torch.device, world: int, free_bytes: Optional[int]):
    """Storage for a meta model about to be sharded over ``world`` ranks: the root on ``device``,
    the blocks in host memory (on ``device`` itself for a CPU model) for :func:`shard_model` to
    move there shard by shard. Checks first that this rank's part fits ``free_bytes`` (None:
    unknown)."""
    need = sharded_device_bytes(shard_sizes(model), world)
    if free_bytes is not None and need["total"] > free_bytes:
        raise ValueError(
            f"the sharded weights need {need['total'] / 2**30:.2f} GiB per rank ({need['shards'] / 2**30:.2f} of "
            f"shards over {world} ranks, {need['replicated'] / 2**30:.2f} replicated, {need['gathered'] / 2**30:.2f} "
            f"for the {GATHERED_BLOCKS} gathered blocks) but only {free_bytes / 2**30:.2f} GiB are free on {device}: "
            "use more ranks or a quantized mode")
    for name, _ in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False)):
        raise RuntimeError(f"the model has a tensor outside its modules ({name}): sharding places modules")
    host = torch.device("cpu")
    for name, child in model.named_children():
        child.to_empty(device=host if name == "blocks" else device)
    return model


def load_in_turns(parallel, load, arg):
    """``load(arg)`` on every rank, one rank after another (rank order), with what it returns: the
    ranks of a node share its host memory, and each rank's load holds the whole blocks there until
    :func:`shard_model` moves them to the device, so in turns the host holds one copy, not N (the
    later ranks read the checkpoint from the page cache). ``LONGCAT_SHARD_LOAD_TURNS=0`` loads on
    every rank at once. A failure on the rank whose turn it is is raised on every rank (its own
    exception there, a RuntimeError naming it elsewhere), so no rank waits for a turn that never
    ends."""
    import os

    import torch.distributed as dist

    if os.environ.get("LONGCAT_SHARD_LOAD_TURNS", "1") == "0":
        return load(arg)
    rank, world = parallel.rank, parallel.config.world_size
    result = None
    for turn in range(world):
        failure, error = None, None
        if turn == rank:
            try:
                result = load(arg)
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank heard of it
                failure, error = e, f"{type(e).__name__}: {e}"
        box = [error]
        dist.broadcast_object_list(box, src=turn)
        if box[0] is not None:
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank {turn} failed loading its weights (shard_weights loads rank by rank): {box[0]}")
    return result


def shard_model(model, parallel) -> None:
    """Shard ``model``'s blocks over ``parallel.world_mesh`` with FSDP2 (the module docstring's
    schedule). Every rank calls it (FSDP2 keeps the layout in lockstep); ``model`` is filled."""
    from torch.distributed.fsdp import fully_shard

    mesh = parallel.world_mesh
    blocks = list(model.blocks)
    for b in blocks:
        fully_shard(b, mesh=mesh, reshard_after_forward=True)
    root_params = {p for n, p in model.named_parameters() if not n.startswith("blocks.")}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=root_params)
    for cur, nxt in zip(blocks, blocks[1:]):
        cur.set_modules_to_forward_prefetch([nxt])
    for b in blocks:
        _gather_before_modulation(b)
    nxt = {id(cur): n for cur, n in zip(blocks, blocks[1:])}
    # The root's lazy init now, while nothing runs: otherwise a block reached first (its modulation,
    # from a path that skips the model's forward) would make itself a root.
    model._get_fsdp_state()._lazy_init()
    model.register_forward_pre_hook(_check_call, with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: _settle(m))
    model.register_state_dict_post_hook(_full_tensors)
    model.register_load_state_dict_pre_hook(_refuse_load)
    model.weight_sharding = {"world": mesh.size(), "next": nxt}


def _full_tensors(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict()`` of a sharded model: full tensors (each all-gathered: a collective, so every
    rank calls it, as it calls the forward), the same keys and values as the unsharded model's."""
    from torch.distributed.tensor import DTensor

    for k, v in list(state_dict.items()):
        if isinstance(v, DTensor):
            state_dict[k] = v.full_tensor()


def _refuse_load(module, state_dict, prefix, *args) -> None:
    raise RuntimeError("load_state_dict into a model built with shard_weights=True is not supported (its block "
                       "parameters are FSDP2 shards): load the weights at construction, from_pretrained(..., "
                       "shard_weights=True), or into an unsharded model")


def _gather_before_modulation(block) -> None:
    base = type(block).modulation

    def modulation(t, _block=block, _base=base):
        _block.unshard()  # waits for the prefetched all-gather (or gathers now); the forward then finds it gathered
        return _base(_block, t)

    block.modulation = modulation  # an instance attribute: LongCatTransformer calls blocks[i].modulation(t)


def _settle(model) -> None:
    """No block left gathered or with an all-gather in flight once a forward ends (or before the
    next begins, after one that raised): a step cache's cached step skips the middle blocks, so
    the block after the first ones was prefetched and never ran. Left pending, it would hold a
    whole block through the step and later deliver the values gathered before, even after a
    merged LoRA changed the shards in between. (FSDP2 has no public "cancel prefetch": its
    param group's state is read here.)"""
    for b in model.blocks:
        group = b._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        if group._all_gather_result is not None:
            group.wait_for_unshard()
        if not group.is_sharded:
            b.reshard()


def _check_call(model, args, kwargs):
    """Every rank gathers every block of every forward: calls that skip blocks on some ranks only
    would pair one rank's all-gather of block j with another's of block k."""
    par = getattr(model, "parallel", None)
    if kwargs.get("step_cache") is not None and par is not None and par.config.dp > 1:
        raise ValueError("a step cache skips blocks on the steps it decides to, which differ between data-parallel "
                         "replicas (their videos differ), while shard_weights gathers each block on every rank: "
                         "use dp_size=1 with a step cache, or no step cache")
    _settle(model)  # after a forward that raised half-way
    return None


def block_runner(model, compiled_forward):
    """The ``block_fn`` regional compilation passes a sharded model (runtime/compiled.py): dynamo
    does not trace FSDP2's hooks (they are marked skipped, and fullgraph refuses them), so the
    hooks' work runs here, eagerly, around the compiled block body ``compiled_forward(block,
    *args)``: gather the block (the prefetch its modulation already waited for), issue the next
    block's all-gather, run, reshard."""

    following = model.weight_sharding["next"]

    def run(block, *args):
        block.unshard()
        nxt = following.get(id(block))
        if nxt is not None:
            nxt.unshard(async_op=True)  # waited for by its modulation
        out = compiled_forward(block, *args)
        block.reshard()
        return out

    return run
