"""Nodes × local ranks: who owns which chunk, who talks to whom.

TawPipe's whole advantage comes from knowing which ranks share a fast link (a *group*, normally one node) and which
pairs of ranks cross the slow inter-node links. This module is pure arithmetic over that picture (no process group,
no Lightning).

Vocabulary (fixed, used everywhere):

* ``n_groups`` (N): groups of ranks that share fast links; a group is a node unless the user regroups.
* ``group_size`` (G): ranks per group.  ``world_size = N * G``.  Global rank ``r = n * G + k`` (group ``n``,
  local index ``k``).
* mesh axes ``("node", "local")``: the ``"local"`` axis spans one group (intra-node collectives); the ``"node"`` axis
  spans the ranks with the same local index across groups (one "rail": inter-node point-to-point). With several
  equal replicas (:mod:`lightning_tawpipe.replicas`) a leading ``"replica"`` axis is added.
"""

from __future__ import annotations

from dataclasses import dataclass

MESH_AXES = ("node", "local")


@dataclass(frozen=True)
class Topology:
    """``n_groups`` groups of ``group_size`` ranks; validated on construction."""

    n_groups: int
    group_size: int

    def __post_init__(self) -> None:
        if self.n_groups < 1 or self.group_size < 1:
            raise ValueError(
                f"A topology needs at least one group of at least one rank, got n_groups={self.n_groups}, "
                f"group_size={self.group_size}."
            )

    @classmethod
    def from_world(cls, world_size: int, group_size: int) -> Topology:
        """Group ``world_size`` ranks into groups of ``group_size``; raises if it does not divide."""
        if group_size < 1 or world_size % group_size != 0:
            raise ValueError(
                f"TawPipe groups ranks into equal groups (nodes), but group_size={group_size} does not divide the "
                f"world size {world_size}. Pick a group_size that divides {world_size} (for example the number of "
                f"processes per node) or change devices/num_nodes."
            )
        return cls(world_size // group_size, group_size)

    @property
    def world_size(self) -> int:
        return self.n_groups * self.group_size

    def group_of(self, rank: int) -> int:
        return rank // self.group_size

    def local_index(self, rank: int) -> int:
        return rank % self.group_size

    def rank(self, group: int, local_index: int) -> int:
        return group * self.group_size + local_index

    def group_ranks(self, group: int) -> list[int]:
        return [self.rank(group, k) for k in range(self.group_size)]

    def same_group(self, a: int, b: int) -> bool:
        return self.group_of(a) == self.group_of(b)

    def __str__(self) -> str:
        rows = [f"  node {n}: ranks {self.group_ranks(n)}" for n in range(self.n_groups)]
        return f"Topology({self.n_groups} nodes x {self.group_size} ranks)\n" + "\n".join(rows)


def tawpipe_owner(chunk: int, topo: Topology) -> int:
    """Rank that owns ``chunk`` under TawPipe placement.

    Rank ``n*G + k`` owns chunk ``k*N + n``: consecutive chunks alternate between nodes, so while node ``n`` works
    on chunk ``c`` the next node needs chunk ``c-1`` and every inter-node transfer pairs up ranks of the same local
    index (one rail each).
    """
    n, k = chunk % topo.n_groups, chunk // topo.n_groups
    return topo.rank(n, k)


def ring_owner(chunk: int, world_size: int) -> int:
    """Rank that owns ``chunk`` in the WeiPipe ring: rank ``r`` owns chunk ``-r mod P``.

    With this placement the forward ring starts with every rank holding its own chunk, which makes the initial
    swap of the WeiPipe code unnecessary for the forward ring.
    """
    return (-chunk) % world_size
