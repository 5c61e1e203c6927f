"""The device mesh one model runs on: which ranks split what, and the process groups of each kind
of parallelism, composed in one ``torch.distributed.device_mesh`` (docs/design/parallel.md).

Four mesh dimensions, outermost first (a rank's neighbours in the innermost one are the closest
GPUs, and Ulysses' all-to-alls are the heaviest traffic, so they get them):

- ``dp``: data parallel, each index a replica that denoises its own videos;
- ``cfg``: CFG-parallel, size 1 or 2: the unconditional and conditional halves of a guided step;
- ``ring``: ring attention, the token sequence in ``ring`` segments whose keys and values travel
  around the ring;
- ``ulysses``: Ulysses attention (the official scheme, ``cp_size``): heads exchanged for tokens
  by an all-to-all.

``shard_weights`` (FSDP2) is not a dimension: the weights are the same on every rank, so they are
sharded over all of them (the whole world as one flat mesh).

:class:`ParallelConfig` is the choice (plain data, checked before anything is launched or
loaded); :func:`init_parallel` makes the process groups from it and returns the :class:`Parallel`
a model holds (``dit.parallel``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["MESH_DIMS", "ParallelConfig", "Parallel", "init_parallel", "DEFAULT_TIMEOUT_S", "world_from_env",
           "dp_split"]

MESH_DIMS = ("dp", "cfg", "ring", "ulysses")

# Long enough for the first compile of a 48-block forward on one rank while others wait;
# LONGCAT_CP_TIMEOUT_S overrides it (read when the group is created).
DEFAULT_TIMEOUT_S = 1800.0


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks each kind of parallelism takes. ``ulysses`` is ``cp_size``; the world is
    the product of the four sizes."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    dp: int = 1
    shard_weights: bool = False

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg", "dp"):
            _positive_int(name if name != "ulysses" else "cp_size", getattr(self, name))
        if self.cfg not in (1, 2):
            raise ValueError(f"CFG-parallel splits a guided step's two halves: its mesh size is 1 or 2, got {self.cfg}")
        if not isinstance(self.shard_weights, bool):
            raise ValueError(f"shard_weights must be True or False, got {self.shard_weights!r}")

    @property
    def sizes(self) -> Dict[str, int]:
        return {"dp": self.dp, "cfg": self.cfg, "ring": self.ring, "ulysses": self.ulysses}

    @property
    def world_size(self) -> int:
        return self.dp * self.cfg * self.ring * self.ulysses

    @property
    def cp_size(self) -> int:
        """Ranks one forward's tokens are split over (ring x Ulysses)."""
        return self.ring * self.ulysses

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check_model(self, num_heads: int) -> None:
        """The model-dependent checks, the same on every rank and before any collective."""
        if num_heads % self.ulysses:
            raise ValueError(f"Ulysses context parallelism splits attention heads over ranks: num_heads={num_heads} "
                             f"is not divisible by cp_size={self.ulysses} (use ring attention, ring_size, to "
                             "split further)")

    def check_world(self, world: int) -> None:
        if world != self.world_size:
            raise ValueError(f"the parallel layout {self.describe()} needs {self.world_size} processes but "
                             f"{world} were launched (torchrun --nproc-per-node {self.world_size}, or as many ranks "
                             "over the nodes)")

    def describe(self) -> str:
        parts = [f"{d}={n}" for d, n in self.sizes.items() if n > 1] or ["single process"]
        return "(" + ", ".join(parts) + (", shard_weights" if self.shard_weights else "") + ")"

    def coords(self, rank: int) -> Dict[str, int]:
        """The mesh coordinates of global ``rank`` (row-major over :data:`MESH_DIMS`)."""
        out = {}
        for d in reversed(MESH_DIMS):
            rank, out[d] = divmod(rank, self.sizes[d])
        return {d: out[d] for d in MESH_DIMS}


def dp_split(n: int, dp: int) -> List[Tuple[int, int]]:
    """The contiguous ``(start, stop)`` slice of ``n`` batch items each of ``dp`` replicas
    computes: the first ``n % dp`` replicas take one item more (``numpy.array_split``'s rule), so
    replica ``j`` holds items ``start..stop-1`` of the single-process batch and a replica may
    hold none when ``n < dp``."""
    base, extra = divmod(int(n), int(dp))
    out, start = [], 0
    for j in range(dp):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def world_from_env() -> Optional[int]:
    """``WORLD_SIZE`` as torchrun sets it, or None outside a launcher."""
    w = os.environ.get("WORLD_SIZE")
    return int(w) if w else None


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("parallel runs need torch.distributed, which this torch build lacks")
    return dist


def _ensure_process_group(config: ParallelConfig, device: torch.device, timeout_s: Optional[float]):
    """The default group: the one already initialized, else one made from torchrun's
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL for CUDA
    models and gloo for CPU ones."""
    dist = _dist()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise RuntimeError(
                f"the parallel layout {config.describe()} needs torch.distributed: launch with `torchrun "
                f"--nproc-per-node {config.world_size} ...` (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), "
                "or call torch.distributed.init_process_group() before building the model"
            )
        config.check_world(int(os.environ["WORLD_SIZE"]))  # before any rendezvous: no rank waits for absent peers
        backend = "nccl" if device.type == "cuda" else "gloo"
        if timeout_s is None:
            timeout_s = float(os.environ.get("LONGCAT_CP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    config.check_world(dist.get_world_size())
    backend = str(dist.get_backend())
    if device.type == "cpu" and "gloo" not in backend:
        raise ValueError(f"the model is on the CPU but the process group's backend is {backend!r}; CPU tensors "
                         "need gloo (init_process_group('gloo'))")


@dataclass
class Parallel:
    """One model's mesh and groups. ``mesh`` is the 4-D ``DeviceMesh`` over :data:`MESH_DIMS`;
    ``world_mesh`` the flat 1-D mesh over every rank (FSDP2's); ``replica_group`` the ranks that
    compute the same videos together (cfg x ring x ulysses: one dp index), which receive their
    inputs from the first of them."""

    config: ParallelConfig
    rank: int
    mesh: object = None
    world_mesh: object = None
    replica_group: object = None
    replica_src: int = 0  # global rank of the replica's first rank
    coords: Dict[str, int] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Bytes this rank sent through :meth:`all_gather`, per mesh dimension (the pipelines' CFG and
    # DP exchanges; the forward's Ulysses/ring traffic is counted by runtime/parallel.py's formula).
    comm_bytes: Dict[str, int] = field(default_factory=dict)

    def group(self, dim: str):
        """The process group of mesh dimension ``dim`` this rank belongs to."""
        return self.mesh.get_group(dim)

    def size(self, dim: str) -> int:
        return self.config.sizes[dim]

    def index(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        return self.coords[dim]

    @property
    def is_lead(self) -> bool:
        """Rank 0 of the world: the one that reports."""
        return self.rank == 0

    @property
    def is_replica_lead(self) -> bool:
        """The first rank of this rank's replica: the one that writes the replica's outputs."""
        return self.rank == self.replica_src

    def items(self, n: int) -> Tuple[int, int]:
        """The ``(start, stop)`` slice of an ``n``-item batch this rank's replica computes
        (:func:`dp_split`)."""
        return dp_split(n, self.size("dp"))[self.index("dp")]

    def all_gather(self, x: torch.Tensor, dim: str) -> torch.Tensor:
        """``x`` of every rank of ``dim``'s group, concatenated along dim 0 in ``dim``-index order
        (a functional collective, waited on at once; the bytes sent are counted in
        :attr:`comm_bytes`)."""
        import torch.distributed._functional_collectives as funcol

        x = x.contiguous()
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        out = gather(x, 0, self.group(dim))
        wait = getattr(out, "wait", None)
        out = wait() if callable(wait) else out
        self.comm_bytes[dim] = self.comm_bytes.get(dim, 0) + x.numel() * x.element_size()
        return out

    def check_replicas(self, signature: Sequence) -> None:
        """Every rank built the same model and layout (a rank with another config would
        otherwise exchange mismatched tensors, or hang in a collective)."""
        dist = _dist()
        mine = (self.config, tuple(signature))
        everyone: List = [None] * self.config.world_size
        dist.all_gather_object(everyone, mine)
        if any(o != mine for o in everyone):
            raise ValueError(f"ranks disagree on the parallel layout or the model: {everyone}; every rank must build "
                             "the same model with the same parallel options")

    def broadcast_inputs(self, tensors):
        """The replica lead's tensors on every rank of the replica (``None`` entries stay
        ``None``): what pipelines use so that the ranks that compute one video together start
        from the same inputs. Shapes and dtypes travel first, so other ranks need not pass
        matching tensors; each tensor stays on (or is received on) its rank's device."""
        if self.replica_group is None:
            return list(tensors)
        dist = _dist()
        meta = [None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors]
        box = [meta]
        dist.broadcast_object_list(box, src=self.replica_src, group=self.replica_group)
        out = []
        for t, m in zip(tensors, box[0]):
            if m is None:
                out.append(None)
                continue
            if self.is_replica_lead:
                buf = t.contiguous()
            else:
                buf = torch.empty(m[0], dtype=m[1], device=t.device if t is not None else self.device)
            dist.broadcast(buf, src=self.replica_src, group=self.replica_group)
            out.append(buf)
        return out

    def __repr__(self) -> str:
        return f"Parallel(rank={self.rank}, {self.config.describe()}, coords={self.coords})"


def init_parallel(config: ParallelConfig, device: torch.device, timeout_s: Optional[float] = None) -> Parallel:
    """The process groups of ``config`` (the default group created from torchrun's environment
    if none exists; its size must be ``config.world_size``)."""
    from torch.distributed.device_mesh import init_device_mesh

    dist = _dist()
    _ensure_process_group(config, device, timeout_s)
    rank = dist.get_rank()
    coords = config.coords(rank)
    mesh = init_device_mesh(device.type, tuple(config.sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    world_mesh = init_device_mesh(device.type, (config.world_size,), mesh_dim_names=("world",))
    # One replica group per dp index; new_group is collective over the world, so every rank makes
    # every group, in the same order.
    per_replica = config.world_size // config.dp
    replica_group, replica_src = None, coords["dp"] * per_replica
    if per_replica > 1:
        for i in range(config.dp):
            g = dist.new_group(list(range(i * per_replica, (i + 1) * per_replica)))
            if i == coords["dp"]:
                replica_group = g
    return Parallel(config=config, rank=rank, mesh=mesh, world_mesh=world_mesh, replica_group=replica_group,
                    replica_src=replica_src, coords=coords, device=device)
