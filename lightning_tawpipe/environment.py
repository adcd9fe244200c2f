"""Ranks, devices, topology and process-group start-up shared by the Trainer and the Fabric strategies.

Both strategies launch and number processes exactly like ``ddp`` (same launchers, cluster environments and
samplers); what TawPipe adds is the grouping of ranks into nodes, the accelerator/backend check made before any
process starts, and, once the process group exists, the health records and the equal-nodes check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_tawpipe.runtime import health
from lightning_tawpipe.replicas import ReplicaLayout
from lightning_tawpipe.topology import Topology

SUPPORTED_BACKENDS = {"cpu": ("gloo",), "cuda": ("nccl", "gloo")}


class TawPipeEnvironment:
    """Mixin for a Lightning/Fabric ``ParallelStrategy``: expects ``parallel_devices``, ``cluster_environment``,
    ``group_size``, ``_num_nodes`` and ``_process_group_backend`` on the instance."""

    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """As ``ddp``; with several replicas, each replica reads its own stream (see ``ReplicaLayout.sampler_slot``)."""
        layout = self.replica_layout
        if layout.n_replicas == 1:
            return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}
        num_replicas, rank = layout.sampler_slot(self.global_rank)
        return {"num_replicas": num_replicas, "rank": rank}

    @property
    def replica_layout(self) -> ReplicaLayout:
        """The world as replicas (one unless the strategy was given ``replicas``), grouped into nodes."""
        world = self.num_nodes * self.num_processes
        return ReplicaLayout.parse(getattr(self, "replicas", 1), world, self.group_size or self.num_processes)

    @property
    def topology(self) -> Topology:
        """This rank's replica's groups: ``group_size`` if given, else one group per node (processes per node)."""
        layout = self.replica_layout
        return layout.topologies[layout.replica_of(self.global_rank)]

    def _check_accelerator(self) -> None:
        """Called before launching: fail on an accelerator/backend TawPipe cannot run, and on a bad grouping."""
        device = self.root_device.type
        if device not in SUPPORTED_BACKENDS:
            raise ValueError(f"TawPipe runs on CPU (gloo) or CUDA (nccl); got a {device!r} accelerator.")
        backend = self._process_group_backend
        if backend is not None and backend not in SUPPORTED_BACKENDS[device]:
            raise ValueError(
                f"TawPipe cannot use process_group_backend={backend!r} on {device}: use one of "
                f"{SUPPORTED_BACKENDS[device]}."
            )
        if getattr(self, "replicas", 1) == 1:  # replicas are checked by ReplicaLayout.parse below
            Topology.from_world(self.num_nodes * self.num_processes, self.group_size or self.num_processes)
        self.topology  # noqa: B018 - raises if the replicas or group_size do not fit the world size

    def _assign_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)

    def _start_health(self) -> health.Health:
        """After the process group exists: the health records, and nodes of equal size when groups are nodes."""
        if self.group_size is None and self.world_size > 1:
            nodes: list = [None] * self.world_size
            dist.all_gather_object(nodes, self.cluster_environment.node_rank())
            health.check_equal_nodes(nodes)
        return health.Health(self.global_rank, self.world_size)
