"""Process groups for the two traffic lanes, async send/recv/broadcast/reduce, and byte accounting.

Weights and gradients travel on separate communicators ("lanes"): collectives on one communicator must be issued in
the same order on every member, and keeping the lanes apart means a gradient reduce never has to queue behind a
weight broadcast. Each lane has the two axes of the ``("node", "local")`` mesh as communicators of its own: the
intra-node group (broadcast, reduce) and the rail of same-local-index ranks across nodes, which carries every
TawPipe point-to-point transfer. Schedules whose peers are not on one rail (the WeiPipe ring) also get a
replica-wide group per lane. Everything stays inside this rank's replica; only the outer loop crosses replicas.

P2P lowering (``p2p_groups``): with gloo every pair of ranks is an independent channel, so one group per rail
(``"rail"``) is enough. NCCL runs the operations of one communicator in issue order, so a send posted early (owners
post all their sends at the start of an iteration) would hold back every later receive on the same communicator.
``"directed"`` gives every ordered pair of peers its own communicator per lane: each one is then a FIFO pipe in one
direction, which is exactly what the schedule validator simulates. It is the default on NCCL.

Accounting counts the bytes this rank *sends* (a broadcast root sends one copy to each other member, a reduce
member other than the root sends its buffer once) split into intra-node and inter-node, and the seconds spent
blocked waiting for communication.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lightning_tawpipe.replicas import ReplicaLayout, build_device_mesh
from lightning_tawpipe.topology import Topology

LANES = ("weights", "grads")


@dataclass
class CommStats:
    """What this rank sent and how long it waited, since the last :meth:`reset`."""

    intra_node_bytes: int = 0
    inter_node_bytes: int = 0
    grad_bytes: int = 0  # the part of both that carried gradients (the rest carried weights)
    comm_wait_s: float = 0.0
    messages: int = 0
    wait_by_op: dict[str, float] = field(default_factory=dict)  # seconds blocked, by the kind of op waited for
    # traffic between two steps (chunk 0's exchange after an optimizer step), counted into the next step's figures
    carried_bytes: int = 0
    carried_wait_s: float = 0.0

    def reset(self) -> None:
        """Start a step's figures, with whatever moved since the last step (so it is logged, with that step)."""
        carried, waited = self.carried_bytes, self.carried_wait_s
        self.intra_node_bytes = self.carried_bytes = 0
        self.inter_node_bytes = self.grad_bytes = carried
        self.comm_wait_s, self.carried_wait_s = waited, 0.0
        self.wait_by_op = {"first_chunk_exchange": waited} if carried else {}
        self.messages = 1 if carried else 0

    def as_dict(self) -> dict[str, float]:
        return {
            "intra_node_bytes": float(self.intra_node_bytes),
            "inter_node_bytes": float(self.inter_node_bytes),
            "grad_bytes": float(self.grad_bytes),
            "comm_wait_s": self.comm_wait_s,
        }


P2P_GROUPINGS = ("rail", "directed")


@dataclass
class _Lane:
    node_group: object  # intra-node ("local" axis)
    rail_group: object  # same local index across nodes ("node" axis)
    world_group: object | None = None
    directed: dict[tuple[int, int], object] = field(default_factory=dict)  # (src, dst) -> 2-rank group


@dataclass
class Comm:
    """Async communication for one rank of one replica, over the lanes built by :meth:`build`.

    Ranks here are *replica-local* (see :mod:`lightning_tawpipe.replicas`): ``rank`` and every peer are positions
    inside this rank's replica, and ``base`` turns them into global ranks for the process-group API.
    """

    topo: Topology
    rank: int
    lanes: dict[str, _Lane]
    base: int = 0
    replica: int = 0
    replica_group: object = None  # every rank of this replica (replicated gradients, clipping, input checks)
    mesh: object = None
    stats: CommStats = field(default_factory=CommStats)
    # gloo stages an all-gather or a reduce-scatter through flat copies of the whole buffer (measured: 8 MB cost 13-41
    # MB of peak memory and ~1.5x the time of the equivalent broadcasts or reduces), so on gloo they are posted as
    # one broadcast (or reduce) per rank, in place; NCCL runs them in place as they are
    per_rank_collectives: bool = False

    @classmethod
    def build(cls, topo: Topology, device_type: str, ring_peers: bool, p2p_groups: str = "rail",
              replicas: ReplicaLayout | None = None) -> Comm:
        """Create every group this rank needs; a collective call, every rank must make it in the same order.

        With several replicas every rank creates every replica's groups (``new_group`` is collective over the
        world) and keeps its own replica's.
        """
        replicas = replicas or ReplicaLayout((topo,))
        if dist.get_world_size() != replicas.world_size:
            raise RuntimeError(
                f"The process group has {dist.get_world_size()} ranks but {replicas} need {replicas.world_size}."
            )
        if p2p_groups not in P2P_GROUPINGS:
            raise ValueError(f"p2p_groups must be one of {P2P_GROUPINGS}, got {p2p_groups!r}.")
        me = dist.get_rank()
        replica = replicas.replica_of(me)
        if replicas.topologies[replica] != topo:
            raise RuntimeError(f"rank {me} is in replica {replica} ({replicas.topologies[replica]}), not in {topo}")
        layouts = [(replicas.offset(r), t) for r, t in enumerate(replicas.topologies)]
        lanes = {}
        for name in LANES:
            # The lane's own communicators: sharing one with the other lane or with Lightning's collectives would
            # interleave their messages (DeviceMesh, for one, hands out the world group for a dimension that spans
            # every rank).
            node_group, _ = dist.new_subgroups_by_enumeration(
                [[o + r for r in t.group_ranks(n)] for o, t in layouts for n in range(t.n_groups)])
            rail_group, _ = dist.new_subgroups_by_enumeration(
                [[o + t.rank(n, k) for n in range(t.n_groups)] for o, t in layouts for k in range(t.group_size)])
            world = None
            if ring_peers and p2p_groups == "rail":
                world, _ = dist.new_subgroups_by_enumeration([list(range(o, o + t.world_size)) for o, t in layouts])
            lane = _Lane(node_group, rail_group, world)
            if p2p_groups == "directed":
                for o, t in layouts:
                    for src, dst in _peer_pairs(t, ring_peers):
                        group = dist.new_group([o + src, o + dst])
                        if o == replicas.offset(replica):
                            lane.directed[(src, dst)] = group
            lanes[name] = lane
        if replicas.n_replicas == 1:
            replica_group = dist.group.WORLD
        else:
            replica_group, _ = dist.new_subgroups_by_enumeration(
                [replicas.ranks(r) for r in range(replicas.n_replicas)])
        base = replicas.offset(replica)
        return cls(topo, me - base, lanes, base, replica, replica_group, build_device_mesh(replicas, device_type),
                   per_rank_collectives=dist.get_backend() == "gloo")

    # -- point to point -------------------------------------------------------------------------------------------
    def _p2p_target(self, lane: str, src: int, dst: int) -> tuple[object, int]:
        """The group carrying ``src -> dst`` on ``lane`` and the peer's rank inside it."""
        ln = self.lanes[lane]
        peer = dst if src == self.rank else src
        if ln.directed:
            group = ln.directed[(src, dst)]
            return group, dist.get_group_rank(group, self.base + peer)
        if self.topo.local_index(peer) == self.topo.local_index(self.rank):
            return ln.rail_group, self.topo.group_of(peer)
        if ln.world_group is None:
            raise RuntimeError(f"rank {self.rank} has no group to reach rank {peer} on the {lane} lane")
        return ln.world_group, peer

    def isend(self, tensor: torch.Tensor, peer: int, lane: str):
        group, group_peer = self._p2p_target(lane, self.rank, peer)
        self._count(tensor.numel() * tensor.element_size(), self.topo.same_group(peer, self.rank), lane)
        return dist.isend(tensor, group=group, group_dst=group_peer)

    def irecv(self, tensor: torch.Tensor, peer: int, lane: str):
        group, group_peer = self._p2p_target(lane, peer, self.rank)
        return dist.irecv(tensor, group=group, group_src=group_peer)

    # -- intra-node collectives -----------------------------------------------------------------------------------
    def broadcast(self, tensor: torch.Tensor, root: int, lane: str):
        if root == self.rank:
            self._count(tensor.numel() * tensor.element_size() * (self.topo.group_size - 1), True, lane)
        group = self.lanes[lane].node_group
        return dist.broadcast(tensor, group=group, group_src=self.topo.local_index(root), async_op=True)

    def reduce(self, tensor: torch.Tensor, root: int, lane: str):
        if root != self.rank:
            self._count(tensor.numel() * tensor.element_size(), True, lane)
        group = self.lanes[lane].node_group
        return dist.reduce(tensor, group=group, group_dst=self.topo.local_index(root), op=dist.ReduceOp.SUM, async_op=True)

    def scatter(self, out: torch.Tensor, pieces: list[torch.Tensor] | None, root: int, lane: str):
        """Give each rank of the node its piece of the root's ``pieces`` (the root's own lands in its ``out`` too):
        the stripes of a chunk owned in the node, before its ranks send them on over their rails."""
        if root == self.rank:
            self._count(out.numel() * out.element_size() * (self.topo.group_size - 1), True, lane)
        group = self.lanes[lane].node_group
        return dist.scatter(out, pieces, group=group, group_src=self.topo.local_index(root), async_op=True)

    def all_gather(self, out: torch.Tensor, piece: torch.Tensor, lane: str):
        """Assemble the node's pieces into ``out`` on every rank (``piece`` is this rank's part of ``out``): the
        stripes of a remote chunk, which each rank received over its own rail."""
        self._count(piece.numel() * piece.element_size() * (self.topo.group_size - 1), True, lane)
        group = self.lanes[lane].node_group
        if self.per_rank_collectives:  # rank k broadcasts part k
            parts = out.split(piece.numel())
            return _AllOf([dist.broadcast(part, group=group, group_src=k, async_op=True)
                           for k, part in enumerate(parts)])
        return dist.all_gather_into_tensor(out, piece, group=group, async_op=True)

    def reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor, lane: str):
        """Sum ``tensor`` over the node and leave each rank its part of the sum in ``out`` (its own part of
        ``tensor``; the other parts may be overwritten): a remote chunk's gradient, whose stripes then leave over every
        rank's rail."""
        self._count(out.numel() * out.element_size() * (self.topo.group_size - 1), True, lane)
        group = self.lanes[lane].node_group
        if self.per_rank_collectives:  # part k is reduced onto rank k
            parts = tensor.split(out.numel())
            return _AllOf([dist.reduce(part, group=group, group_dst=k, op=dist.ReduceOp.SUM, async_op=True)
                           for k, part in enumerate(parts)])
        return dist.reduce_scatter_tensor(out, tensor, group=group, async_op=True)

    def gather(self, piece: torch.Tensor, out: list[torch.Tensor] | None, root: int, lane: str):
        """Collect every rank's ``piece`` into the root's ``out`` (one tensor per rank of the node): the stripes of
        a remote gradient sum, onto the chunk's owner."""
        if root != self.rank:
            self._count(piece.numel() * piece.element_size(), True, lane)
        group = self.lanes[lane].node_group
        return dist.gather(piece, out, group=group, group_dst=self.topo.local_index(root), async_op=True)

    # -- between steps --------------------------------------------------------------------------------------------
    def all_reduce_rail(self, tensor: torch.Tensor, between_steps: bool = False):
        """Post the sum of ``tensor`` over this rank's rail (its local index on every node) and return the work: the
        holders of a mirrored chunk exchange its gradient this way (``replicate_first_chunk``), inside an iteration
        that ends an optimizer step or after it. A ring all-reduce sends ``2 (N - 1) / N`` of the tensor from each
        member; ``between_steps`` (after the step's figures were logged) counts those bytes into the next step's."""
        members = self.topo.n_groups
        nbytes = tensor.numel() * tensor.element_size() * 2 * (members - 1) // members
        if between_steps:
            self.stats.carried_bytes += nbytes
        else:
            self._count(nbytes, False, "grads")
        return dist.all_reduce(tensor, group=self.lanes["grads"].rail_group, async_op=True)

    def _count(self, nbytes: int, intra_node: bool, lane: str) -> None:
        if intra_node:
            self.stats.intra_node_bytes += nbytes
        else:
            self.stats.inter_node_bytes += nbytes
        if lane == "grads":
            self.stats.grad_bytes += nbytes
        self.stats.messages += 1

    def wait(self, work, what: str = "other") -> None:
        """Block until ``work`` is done, counting the time as communication wait (attributed to ``what``)."""
        start = time.perf_counter()
        work.wait()
        waited = time.perf_counter() - start
        self.stats.comm_wait_s += waited
        self.stats.wait_by_op[what] = self.stats.wait_by_op.get(what, 0.0) + waited


class _AllOf:
    """Several posted operations that count as one: done when all are done, waited for in order."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def _peer_pairs(topo: Topology, any_peer: bool) -> list[tuple[int, int]]:
    """Ordered (src, dst) pairs that may exchange P2P: same-rail pairs across nodes, or all pairs for rings."""
    ranks = range(topo.world_size)
    return [
        (a, b)
        for a in ranks
        for b in ranks
        if a != b and (any_peer or topo.local_index(a) == topo.local_index(b))
    ]
