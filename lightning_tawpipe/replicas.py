"""Replicas: the world as several TawPipe groups that train apart and meet every few steps (pure arithmetic).

A *replica* is one TawPipe group (``n_groups`` nodes x ``group_size`` ranks) holding one copy of the model, sharded
over its own ranks. Replicas may have different shapes: one big machine running the whole model in one process
next to a few small nodes sharing it. Their ranks are consecutive in the world: replica ``r`` is global ranks
``[offset(r), offset(r) + P_r)``, and inside it everything TawPipe does (placement, schedules, communicators) uses
the replica-local rank ``p = global - offset(r)``.

Only the outer loop (:mod:`lightning_tawpipe.outer`) crosses replicas, and it matches parameters by name, so
replicas never need to agree on how they cut the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_tawpipe.topology import MESH_AXES, Topology


@dataclass(frozen=True)
class ReplicaLayout:
    """The replicas' shapes in world-rank order."""

    topologies: tuple[Topology, ...]

    def __post_init__(self) -> None:
        if not self.topologies:
            raise ValueError("A replica layout needs at least one replica.")

    @classmethod
    def parse(cls, replicas: int | Sequence[Sequence[int]], world_size: int, group_size: int) -> ReplicaLayout:
        """``replicas`` as the user gives it: a count (equal replicas) or ``[(nodes, ranks_per_node), ...]``.

        A count splits the world into equal consecutive replicas, each grouped into nodes of ``group_size`` ranks.
        """
        if isinstance(replicas, bool):
            raise ValueError(f"replicas must be an int >= 1 or a list of (nodes, ranks_per_node), got {replicas!r}.")
        if isinstance(replicas, int):
            if replicas < 1 or world_size % replicas:
                raise ValueError(
                    f"replicas={replicas} does not divide the world of {world_size} processes into equal replicas. "
                    f"Pick a divisor of {world_size}, or list each replica's shape: replicas=[(nodes, ranks), ...]."
                )
            per_replica = world_size // replicas
            if per_replica % group_size:
                raise ValueError(
                    f"Each of the {replicas} replicas has {per_replica} ranks, which are not whole nodes of "
                    f"{group_size} ranks. Make the processes per replica a multiple of group_size (or of the "
                    "processes per node)."
                )
            return cls(tuple(Topology(per_replica // group_size, group_size) for _ in range(replicas)))
        try:
            shapes = [tuple(int(x) for x in shape) for shape in replicas]
        except TypeError:
            raise ValueError(f"replicas must be an int or a list of (nodes, ranks_per_node) pairs, got {replicas!r}.")
        if any(len(s) != 2 for s in shapes):
            raise ValueError(f"Each replica is a (nodes, ranks_per_node) pair, got {replicas!r}.")
        layout = cls(tuple(Topology(n, g) for n, g in shapes))
        if layout.world_size != world_size:
            raise ValueError(
                f"The replicas {shapes} need {layout.world_size} processes, but the job has {world_size}. Launch "
                f"{layout.world_size} processes or change the replica shapes."
            )
        return layout

    @property
    def n_replicas(self) -> int:
        return len(self.topologies)

    @property
    def world_size(self) -> int:
        return sum(t.world_size for t in self.topologies)

    @property
    def homogeneous(self) -> bool:
        return len(set(self.topologies)) == 1

    def offset(self, replica: int) -> int:
        return sum(t.world_size for t in self.topologies[:replica])

    def ranks(self, replica: int) -> list[int]:
        start = self.offset(replica)
        return list(range(start, start + self.topologies[replica].world_size))

    def replica_of(self, rank: int) -> int:
        for r in range(self.n_replicas):
            if rank < self.offset(r) + self.topologies[r].world_size:
                return r
        raise ValueError(f"rank {rank} is outside the {self.world_size} ranks of {self}")

    def local_rank(self, rank: int) -> int:
        return rank - self.offset(self.replica_of(rank))

    def sampler_slot(self, rank: int) -> tuple[int, int]:
        """``(num_replicas, rank)`` for a ``DistributedSampler`` giving each replica its own data stream.

        Replica ``r`` reads every ``R``-th sample starting at ``r``; its ``P_r`` ranks split that stream
        round-robin. So at every step a replica consumes the same samples whatever its shape, as long as its
        per-rank batch is the replica batch divided by ``P_r`` (a one-process replica reads them all).
        """
        r, p = self.replica_of(rank), self.local_rank(rank)
        return self.n_replicas * self.topologies[r].world_size, r + self.n_replicas * p

    def __str__(self) -> str:
        shapes = ", ".join(f"{t.n_groups}x{t.group_size}" for t in self.topologies)
        return f"{self.n_replicas} replica(s): {shapes}"


def build_device_mesh(replicas: ReplicaLayout, device_type: str):
    """The world as a ``DeviceMesh``, for users who want one (as ``ModelParallelStrategy`` exposes it).

    One replica: shape ``(N, G)``, axes ``("node", "local")``. Equal replicas: ``(R, N, G)`` with a leading
    ``"replica"`` axis. Replicas of different shapes do not form a mesh: ``None``. TawPipe's own traffic runs on
    communicators of its own (see ``runtime/comm.py``), never on the mesh's.
    """
    if not replicas.homogeneous:
        return None
    import torch
    from torch.distributed.device_mesh import DeviceMesh

    topo = replicas.topologies[0]
    if replicas.n_replicas == 1:
        return DeviceMesh(device_type, torch.arange(topo.world_size).view(topo.n_groups, topo.group_size),
                          mesh_dim_names=MESH_AXES)
    shape = (replicas.n_replicas, topo.n_groups, topo.group_size)
    return DeviceMesh(device_type, torch.arange(replicas.world_size).view(shape), mesh_dim_names=("replica", *MESH_AXES))
