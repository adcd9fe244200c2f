"""Ranks, devices, topology and process-group start-up shared by the Trainer and the Fabric strategies.

Both strategies launch and number processes exactly like ``ddp`` (same launchers, cluster environments and
samplers); what TawPipe adds is the grouping of ranks into nodes, the accelerator/backend check made before any
process starts, and, once the process group exists, the health records and the equal-nodes check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_tawpipe.partition import check_partition
from lightning_tawpipe.runtime import health
from lightning_tawpipe.runtime.malloc import share_main_arena
from lightning_tawpipe.runtime.pipeline import SCHEDULES
from lightning_tawpipe.replicas import ReplicaLayout
from lightning_tawpipe.topology import Topology

SUPPORTED_BACKENDS = {"cpu": ("gloo",), "cuda": ("nccl", "gloo")}


class TawPipeEnvironment:
    """Mixin for a Lightning/Fabric ``ParallelStrategy``: expects ``parallel_devices`` and ``cluster_environment``
    on the instance, and the knobs set by :meth:`_set_engine_knobs`."""

    def _set_engine_knobs(self, n_microbatches, prefetch, reuse, grad_buffers, schedule, group_size, partition,
                          validate_schedules, p2p_groups, activation_checkpointing, meta_init, state_dict_type,
                          process_group_backend, timeout, start_method, check_finite_loss) -> None:
        """Check and keep the knobs the Trainer and the Fabric strategy share, so both reject bad input alike."""
        check_knobs(n_microbatches, prefetch, schedule, group_size, partition, reuse, grad_buffers)
        self.grad_buffers = grad_buffers
        if p2p_groups not in (None, "rail", "directed"):
            raise ValueError(f"p2p_groups must be 'rail', 'directed' or None, got {p2p_groups!r}.")
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"state_dict_type must be 'sharded' or 'full', got {state_dict_type!r}.")
        self.n_microbatches, self.prefetch, self.schedule, self.reuse = n_microbatches, prefetch, schedule, reuse
        self.group_size, self.partition, self.validate_schedules = group_size, partition, validate_schedules
        self.p2p_groups, self.activation_checkpointing = p2p_groups, bool(activation_checkpointing)
        self.meta_init, self.state_dict_type = bool(meta_init), state_dict_type
        self.check_finite_loss = bool(check_finite_loss)
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method = start_method

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

    def _share_malloc_arena_if_interleaved(self) -> bool:
        """On CPU, before any thread of the process group exists: if micro-batches may run on threads (chunk-major
        order, or the WeiPipe ring), keep every thread on the main malloc arena (``runtime/malloc.py`` says why; it
        must come before other threads create arenas, which later threads would be spread over)."""
        interleaves = self.microbatch_order == "chunk" or self.schedule == "weipipe"
        return self.root_device.type == "cpu" and interleaves and share_main_arena()

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


def check_knobs(n_microbatches, prefetch, schedule, group_size, partition, reuse=None, grad_buffers=None) -> None:
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be an int >= 1, got {n_microbatches!r}.")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an int >= 1 (how many chunks are fetched ahead), got {prefetch!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if reuse is not None:
        if schedule != "tawpipe":
            raise ValueError(f"reuse applies to schedule='tawpipe' only (the WeiPipe ring has its own buffers), "
                             f"got reuse={reuse!r} with schedule={schedule!r}.")
        if isinstance(reuse, bool) or not isinstance(reuse, int) or not 1 <= reuse <= prefetch:
            raise ValueError(f"reuse must be an int in 1..prefetch={prefetch} (chunks kept across a turn live in the "
                             f"prefetch slots; raise prefetch to keep more), got {reuse!r}.")
    if grad_buffers is not None and (isinstance(grad_buffers, bool) or not isinstance(grad_buffers, int)
                                     or grad_buffers < 2):
        raise ValueError(f"grad_buffers must be an int >= 2 (a backward step writes one buffer while the previous "
                         f"step's gradients are still moving out of another) or None (by node count), "
                         f"got {grad_buffers!r}.")
    if grad_buffers not in (None, 2) and schedule != "tawpipe":
        raise ValueError(f"grad_buffers applies to schedule='tawpipe' only (the WeiPipe ring has its own buffers), "
                         f"got grad_buffers={grad_buffers!r} with schedule={schedule!r}.")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}.")
    check_partition(partition)
