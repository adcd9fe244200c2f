"""Closed-form models of the baselines: FSDP FULL_SHARD, HYBRID_SHARD (HSDP), DDP and 1F1B.

These strategies are regular enough that a per-layer formula captures them (``../research/tawpipe-algorithm.md``
§5), and their code is not ours to simulate. Every collective costs ``latency + max(inter-node bytes of the busiest
NIC / its bandwidth, intra-node bytes / NVLink bandwidth)``; layer ``l+1``'s all-gather is prefetched under layer
``l``'s compute, so a layer costs ``max(compute, communication)``; the first all-gather and the last
reduce-scatter are exposed.

Inter-node bytes per node and collective (W = one layer's bytes, P ranks, N nodes, G per node):

* NCCL rings (node-contiguous ranks, one ring per NIC): all-gather and reduce-scatter send ``(P-1)/P * W`` out of
  every node, split over its NICs; all-reduce twice that. Ring latency grows with ``P - 1`` steps.
* gloo (the CPU testbed): all-gather/reduce-scatter send every shard straight to every rank,
  ``G (N-1)/N * W`` per node; all-reduce is a ring. (These match the link counters of the speed benchmark.)

1F1B: ``P*M`` micro-batches through ``P`` stages: ``(P*M + P - 1)`` slots, each the longer of one stage's
forward+backward and the activation plus activation-gradient transfer across the slowest stage boundary (sends are
asynchronous), plus one exposed transfer per stage boundary while the pipeline fills.

On the CPU testbed FSDP/HSDP collectives block (no CUDA streams to overlap them on), so a layer costs compute plus
communication there. DDP's gloo all-reduce runs on gloo's threads, but the cores are busy with every rank's
backward, so there too it adds up (measured: within a few % of compute-only plus all-reduce time).

On the CPU testbed all ranks share the machine's cores: symmetric strategies compute on every rank at once, so a
step runs ``ranks / cores`` times slower; 1F1B keeps on average ``P * busy share`` ranks computing.
"""

from __future__ import annotations

from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.memory import onef1b_memory, sharded_memory
from lightning_tawpipe.plan.result import Prediction
from lightning_tawpipe.plan.weightpipe import OPTIMIZER_BYTES_PER_PARAM, make_chunks
from lightning_tawpipe.plan.workload import Workload


def _gather_bytes(c: Cluster, nbytes: float, ranks: int, nodes: int) -> float:
    """Inter-node bytes out of one node for an all-gather or reduce-scatter of ``nbytes`` over ``ranks``."""
    if nodes <= 1:
        return 0.0
    if c.collectives == "gloo":
        return (ranks // nodes) * (nodes - 1) / nodes * nbytes
    return (ranks - 1) / ranks * nbytes


def _allreduce_bytes(nbytes: float, ranks: int, nodes: int) -> float:
    return 0.0 if nodes <= 1 else 2.0 * (ranks - 1) / ranks * nbytes


def _collective_time(c: Cluster, inter_node_bytes: float, intra_bytes: float, ranks: int) -> float:
    steps = (ranks - 1) if c.collectives == "nccl" else 1
    nics = c.nics_per_node if c.collectives == "nccl" else 1
    inter = inter_node_bytes / (c.inter_bw * nics) if inter_node_bytes else 0.0
    latency = steps * (c.inter_latency if inter_node_bytes else c.intra_latency)
    return latency + max(inter, intra_bytes / c.intra_bw)


def _overlap(c: Cluster, compute: float, comm: float) -> float:
    """A layer's time: communication hides under compute with NCCL streams; on CPU (gloo) FSDP has no streams and
    its collectives block, so they add up."""
    return max(compute, comm) if c.collectives == "nccl" else compute + comm


def _unit_costs(w: Workload, compute: ComputeModel, slowdown: float) -> list[tuple[float, float, int]]:
    units = w.model.unit_params()
    return [(f * slowdown, b * slowdown, n) for (f, b), n in zip(compute.unit_times(w), units)]


def fsdp(c: Cluster, w: Workload, compute: ComputeModel, hybrid: bool = False,
         defer_allreduce: bool = False) -> Prediction:
    """FULL_SHARD (``hybrid=False``) or HYBRID_SHARD (shard in the node, replicate across nodes)."""
    P, N, G = c.world_size, c.nodes, c.devices_per_node
    shard_ranks = G if hybrid else P
    shard_nodes = 1 if hybrid else N
    slow = c.compute_slowdown(P)
    b = w.weight_bytes
    total, inter_per_node, intra, first_ag, last_rs = 0.0, 0.0, 0.0, None, 0.0
    for mb in range(w.n_microbatches):
        sync = not (hybrid and defer_allreduce) or mb == w.n_microbatches - 1
        fwd_steps, bwd_steps = [], []
        for t_f, t_b, n in _unit_costs(w, compute, slow):
            nbytes = n * b
            ag_inter = _gather_bytes(c, nbytes, shard_ranks, shard_nodes)
            ag_intra = (shard_ranks - 1) / shard_ranks * nbytes if G > 1 else 0.0
            ag = _collective_time(c, ag_inter, ag_intra, shard_ranks)
            rs = ag
            ar_inter = _allreduce_bytes(nbytes / G, N, N) * G if hybrid and sync else 0.0
            ar = _collective_time(c, ar_inter, 0.0, N) if ar_inter else 0.0
            fwd_steps.append(_overlap(c, t_f, ag))
            bwd_steps.append(_overlap(c, t_b, ag + rs + ar))
            inter_per_node += 3 * ag_inter + ar_inter
            intra += 3 * ag_intra * G * N
            first_ag = ag if first_ag is None else first_ag
            last_rs = rs + ar
        total += sum(fwd_steps) + sum(bwd_steps)
    opt = w.model.n_params / shard_ranks * OPTIMIZER_BYTES_PER_PARAM / c.mem_bw
    ideal = sum(t_f + t_b for t_f, t_b, _ in _unit_costs(w, compute, slow)) * w.n_microbatches
    step = total + first_ag + last_rs + opt
    name = "hsdp" if hybrid else "fsdp"
    return Prediction(name, step, inter_per_node, inter_per_node * N, intra, bubble=0.0,
                      exposed_comm=step - ideal - opt, memory=sharded_memory(c, w, shard_ranks),
                      method="analytic (per-layer overlap)",
                      knobs={"defer_allreduce": defer_allreduce} if hybrid else {})


def ddp(c: Cluster, w: Workload, compute: ComputeModel) -> Prediction:
    """All-reduce of every gradient bucket, overlapped with the backward of the last micro-batch."""
    P, N = c.world_size, c.nodes
    slow = c.compute_slowdown(P)
    units = _unit_costs(w, compute, slow)
    fwd, bwd = sum(u[0] for u in units), sum(u[1] for u in units)
    grad_bytes = w.model.n_params * w.master_bytes
    inter = _allreduce_bytes(grad_bytes, P, N)
    ar = _collective_time(c, inter, 2.0 * (P - 1) / P * grad_bytes if P > 1 else 0.0, P)
    step = w.n_microbatches * fwd + (w.n_microbatches - 1) * bwd + _overlap(c, bwd, ar)
    opt = w.model.n_params * OPTIMIZER_BYTES_PER_PARAM / c.mem_bw
    return Prediction("ddp", step + opt, inter, inter * N, 0.0, bubble=0.0,
                      exposed_comm=max(0.0, ar - bwd), memory=sharded_memory(c, w, 1),
                      method="analytic (all-reduce: serial on gloo, under backward on NCCL)")


def onef1b(c: Cluster, w: Workload, compute: ComputeModel) -> Prediction:
    """Activation-passing 1F1B, one stage per rank (stages cut like TawPipe's chunks)."""
    P, N = c.world_size, c.nodes
    micro = P * w.n_microbatches
    slots = micro + P - 1
    busy = micro / slots
    chunks = make_chunks(w, compute, P)
    slow = c.compute_slowdown(P * busy)
    stage = max(f + b for f, b in zip(chunks.costs.forward, chunks.costs.backward)) * slow
    act = w.model.boundary_bytes(w.seq, w.micro_batch, w.weight_bytes)
    if N > 1:
        p2p = 2 * (c.inter_latency + act / c.inter_bw)
    elif P > 1:
        p2p = 2 * (c.intra_latency + act / c.intra_bw)
    else:
        p2p = 0.0
    opt = max(chunks.numel) * OPTIMIZER_BYTES_PER_PARAM / c.mem_bw
    step = slots * max(stage, p2p) + (P - 1) * p2p + opt
    inter_node = 2 * micro * act * (N - 1)  # every micro-batch crosses each node boundary forward and back
    intra_node = 2 * micro * act * (P - N)
    return Prediction("1f1b", step, inter_node / N if N > 1 else 0.0, inter_node, intra_node,
                      bubble=(P - 1) / slots, exposed_comm=slots * p2p, memory=onef1b_memory(c, w),
                      method="analytic ((P*M + P - 1) slots)")
