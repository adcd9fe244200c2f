"""TawPipe and WeiPipe predictions: build the strategy's own schedule, cost its chunks, simulate it.

Chunks are cut exactly as the strategy cuts them (``partition_units`` over the embedding, blocks and norm+head,
one chunk per rank), the programs come from the same builders the engine runs (``build_tawpipe``,
``build_weipipe``), and the timing comes from ``simulate.py``. Only the optimizer step after the drain is a formula:
each owner steps its own chunk (AdamW touches ~32 bytes per parameter: fp32 weight, gradient, two moments, the
low-precision copy), which no schedule action models; so is, where the program does not sum them itself (an
iteration that does not end an optimizer step), the all-reduce of the mirrored chunks' gradients between their
holders under ``replicate_first_chunk`` (:func:`first_chunk_exchange`), which the strategy then runs after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lightning_tawpipe.partition import partition_units
from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.memory import weight_pipeline_memory
from lightning_tawpipe.plan.result import Prediction
from lightning_tawpipe.plan.simulate import ChunkCosts, simulate
from lightning_tawpipe.plan.workload import Workload
from lightning_tawpipe.schedule.program import Schedule
from lightning_tawpipe.schedule.tawpipe import build_tawpipe
from lightning_tawpipe.schedule.weipipe import build_weipipe
from lightning_tawpipe.topology import Topology

OPTIMIZER_BYTES_PER_PARAM = 32.0


@dataclass(frozen=True)
class Chunks:
    """The strategy's partition: unit ranges per chunk, parameters per chunk, and the per-chunk costs."""

    ranges: list[range]
    numel: list[int]
    costs: ChunkCosts


def make_chunks(workload: Workload, compute: ComputeModel, n_chunks: int,
                partition: str | Sequence[int] = "parameters") -> Chunks:
    units = workload.model.unit_params()
    ranges = partition_units(units, n_chunks, partition)
    times = compute.unit_times(workload)
    numel = [sum(units[u] for u in r) for r in ranges]
    costs = ChunkCosts(
        forward=tuple(sum(times[u][0] for u in r) for r in ranges),
        backward=tuple(sum(times[u][1] for u in r) for r in ranges),
        weight_bytes=tuple(float(n * workload.weight_bytes) for n in numel),
        grad_bytes=tuple(float(n * workload.weight_bytes) for n in numel),  # gradients travel in the compute dtype
    )
    return Chunks(ranges, numel, costs)


def build(kind: str, topo: Topology, n_microbatches: int, prefetch: int, grad_buffers: int | None = None,
          reuse: int | None = None, replicate_first_chunk: bool | int = False, exchange: bool = True,
          stripe: bool = False, order: str = "sample") -> Schedule:
    if kind == "tawpipe":
        return build_tawpipe(topo, n_microbatches, prefetch=prefetch, grad_buffers=grad_buffers, reuse=reuse,
                             replicate_first_chunk=replicate_first_chunk, exchange=exchange, stripe=stripe,
                             order=order)
    if kind == "weipipe":
        return build_weipipe(topo, n_microbatches, prefetch=prefetch)
    raise ValueError(f"unknown weight pipeline {kind!r}")


def predict(kind: str, cluster: Cluster, workload: Workload, compute: ComputeModel, prefetch: int = 1,
            group_size: int | None = None, partition: str | Sequence[int] = "parameters",
            schedule: Schedule | None = None, grad_buffers: int | None = None, reuse: int | None = None,
            replicate_first_chunk: bool | int = False, stripe: bool = False,
            microbatch_order: str = "sample") -> Prediction:
    """Simulate one iteration of ``kind`` ("tawpipe" or "weipipe") and add the owners' optimizer step.

    ``group_size`` is TawPipe's fast-link group (default: a node); it must divide the devices per node. ``reuse``
    (TawPipe) is the chunks kept resident across the turn and ``grad_buffers`` its gradient buffers (None: the
    strategy's defaults, ``prefetch`` and by node count). ``replicate_first_chunk`` (TawPipe) mirrors chunk 0 (or
    the first ``k`` chunks) on every node. The iteration is one that ends an optimizer step (the Trainer's with no
    gradient accumulation): it sums the mirrored chunks' gradients in its program. ``stripe`` (TawPipe) moves remote
    weights and gradient sums in stripes over every rail of a node. ``microbatch_order`` (TawPipe) is ``"sample"`` or
    ``"chunk"`` (every micro-batch through a chunk while it is resident: fewer bytes, every micro-batch's
    activations alive at once, see ``plan/memory.py``).
    """
    g = group_size or cluster.devices_per_node
    if cluster.devices_per_node % g:
        raise ValueError(f"group_size {g} must divide the devices per node ({cluster.devices_per_node}).")
    topo = Topology.from_world(cluster.world_size, g)
    schedule = schedule or build(kind, topo, workload.n_microbatches, prefetch, grad_buffers, reuse,
                                 replicate_first_chunk, stripe=stripe, order=microbatch_order)
    chunks = make_chunks(workload, compute, topo.world_size, partition)
    sim = simulate(schedule, cluster, chunks.costs)
    ideal = simulate(schedule, _ideal_links(cluster), chunks.costs)
    # every rank steps the chunk it owns and the ones it mirrors
    stepped = [chunks.numel[schedule.owners.index(r)] for r in range(topo.world_size)]
    for c, mirrors in enumerate(schedule.mirrors):
        for r in mirrors:
            stepped[r] += chunks.numel[c]
    opt = max(stepped) * OPTIMIZER_BYTES_PER_PARAM / cluster.mem_bw
    exchange_s = exchange_bytes = 0.0
    if not schedule.exchanges:  # summed after the program, chunk after chunk
        for c, mirrors in enumerate(schedule.mirrors):
            s, b = first_chunk_exchange(cluster, workload, chunks.numel[c], 1 + len(mirrors))
            exchange_s, exchange_bytes = exchange_s + s, exchange_bytes + b
    holders = 1 + len(schedule.mirrors[0]) if schedule.mirrors else 1
    step = sim.makespan + exchange_s + opt
    knobs = {"prefetch": prefetch, "chunks": len(chunks.numel),
             "partition": partition if isinstance(partition, str) else ",".join(map(str, partition))}
    if kind == "tawpipe":
        knobs["group_size"] = g
        knobs["reuse"] = schedule.reuse
        knobs["grad_buffers"] = schedule.n_grad_buffers
        if schedule.mirrors:
            knobs["replicate_first_chunk"] = True if len(schedule.mirrors) == 1 else len(schedule.mirrors)
        if schedule.striped:
            knobs["stripe"] = True
        if schedule.order == "chunk" and schedule.n_microbatches > 1:
            knobs["microbatch_order"] = "chunk"
    return Prediction(
        strategy=kind, step_time=step, knobs=knobs,
        inter_node_bytes_per_node=sim.inter_bytes_per_node_max + exchange_bytes,
        inter_node_bytes=sim.inter_bytes + holders * exchange_bytes,
        intra_node_bytes=sim.intra_bytes,
        bubble=max(0.0, ideal.idle_fraction), exposed_comm=max(0.0, sim.makespan - ideal.makespan),
        memory=weight_pipeline_memory(kind, cluster, workload, chunks.numel, schedule),
        method="simulated (schedule IR)",
        detail={"makespan": sim.makespan, "ideal_makespan": ideal.makespan, "optimizer": opt,
                "first_chunk_exchange": exchange_s,
                "comm_wait_max": max(sim.comm_wait), "transfers": sim.n_transfers,
                "wait_by_op": {k: v / cluster.world_size for k, v in sim.wait_by_op.items()}},
    )


def first_chunk_exchange(cluster: Cluster, workload: Workload, numel: int, holders: int) -> tuple[float, float]:
    """Seconds and bytes sent per holder of the all-reduce that sums a mirrored chunk's gradient between its
    ``holders`` (``replicate_first_chunk``; one holder: none). It runs on one rail (one NIC per node), in the compute
    dtype like all gradient traffic; a ring all-reduce sends ``2 (N - 1) / N`` of the gradient from every member."""
    if holders < 2:
        return 0.0, 0.0
    nbytes = numel * workload.weight_bytes * 2 * (holders - 1) / holders
    return 2 * (holders - 1) * cluster.inter_latency + nbytes / cluster.inter_bw, nbytes


def _ideal_links(cluster: Cluster) -> Cluster:
    """The same cluster with free communication: what is left idle is the schedule's own bubble."""
    return replace(cluster, intra_bw=1e30, inter_bw=1e30, intra_latency=0.0, inter_latency=0.0, mem_bw=1e30)
