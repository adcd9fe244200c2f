"""Peak memory per device for every strategy, from the same shapes the strategies allocate.

Model states follow mixed-precision AdamW accounting: an owner keeps master weights, a gradient accumulator and two
moments in the master dtype (16 bytes per parameter in fp32). Working buffers are what the strategy allocates to
move weights and gradients (for TawPipe/WeiPipe: the schedule's weight slots, gradient and receive buffers, all in
the compute dtype and each the size of the largest chunk, as ``runtime/engine.py`` allocates them).
Activations: a full-depth micro-batch for the data-parallel family (TawPipe runs every chunk on its own micro-batch,
one micro-batch at a time; in chunk-major order every micro-batch's, all alive until their backward), the in-flight
micro-batches of the first stage for 1F1B. With activation checkpointing only unit inputs are kept, plus one block's
internals during its recompute. The logits of the loss (fp32) are counted on whoever computes the head, one
micro-batch's.
"""

from __future__ import annotations

from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.result import Memory
from lightning_tawpipe.plan.workload import Workload
from lightning_tawpipe.schedule.actions import stripe_numel
from lightning_tawpipe.schedule.program import Schedule


def state_bytes_per_param(w: Workload) -> float:
    """Master weights + gradient accumulator + two AdamW moments, all in the master dtype."""
    return 4.0 * w.master_bytes


def activations(w: Workload, n_layers: float, micro_batches_in_flight: float, with_head: bool = True) -> float:
    m = w.model
    act = w.weight_bytes
    if w.activation_checkpointing:
        per_mb = (n_layers + 1) * m.boundary_bytes(w.seq, w.micro_batch, act)
        peak_extra = m.block_activation_bytes(w.seq, w.micro_batch, act)
    else:
        per_mb = n_layers * m.block_activation_bytes(w.seq, w.micro_batch, act)
        peak_extra = 0.0
    logits = (w.seq * w.micro_batch * m.vocab_size * (act + 4)) if with_head else 0.0
    return per_mb * micro_batches_in_flight + peak_extra + logits


def weight_pipeline_memory(kind: str, cluster: Cluster, w: Workload, chunk_numel: list[int],
                           schedule: Schedule) -> Memory:
    biggest = max(chunk_numel)
    # a rank that mirrors chunks (replicate_first_chunk) keeps their state next to that of the chunk it owns
    held = [chunk_numel[schedule.owners.index(r)] for r in range(len(schedule.owners))]
    for c, mirrors in enumerate(schedule.mirrors):
        for r in mirrors:
            held[r] += chunk_numel[c]
    states = max([biggest, *held]) * state_bytes_per_param(w)
    working = schedule.n_slots * biggest * w.weight_bytes
    if schedule.striped:  # each rank's stripes of the chunks owned in its node (t<c>), the largest node's
        G = schedule.topology.group_size
        stripes = [0] * schedule.topology.n_groups
        for c in range(len(schedule.mirrors), len(chunk_numel)):
            stripes[schedule.owners[c] // G] += stripe_numel(chunk_numel[c], G)
        working += max(stripes) * w.weight_bytes
    if schedule.train:
        working += (schedule.n_grad_buffers + schedule.n_recv_buffers) * biggest * w.weight_bytes
        # striped: the ring of stripe buffers for remote gradient sums (each a stripe of the largest chunk)
        working += schedule.n_stripe_buffers * stripe_numel(biggest, schedule.topology.group_size) * w.weight_bytes
    # WeiPipe overlaps two micro-batches; chunk-major order keeps every micro-batch's activations until its backward
    # (its loss, and so its logits, still one micro-batch at a time)
    if schedule.order == "chunk":
        in_flight = w.n_microbatches
    else:
        in_flight = 1.0 if kind == "tawpipe" else min(w.n_microbatches, 2)
    return Memory(states, working, activations(w, w.model.n_layer, in_flight))


def sharded_memory(cluster: Cluster, w: Workload, shard_over: int) -> Memory:
    """FSDP (``shard_over`` = world size) and HSDP (= devices per node); DDP is ``shard_over=1``."""
    m = w.model
    states = m.n_params * state_bytes_per_param(w) / shard_over
    # two unsharded blocks (current + prefetched) and one block's gradient before its reduce-scatter
    unit = max(m.block_params, m.head_params, m.embedding_params)
    working = 0.0 if shard_over == 1 else unit * (2 * w.weight_bytes + 4)
    return Memory(states, working, activations(w, m.n_layer, 1.0))


def onef1b_memory(cluster: Cluster, w: Workload) -> Memory:
    """Stage 0 of P: its layers' states, and up to P micro-batches in flight (1F1B's warm-up depth)."""
    P = cluster.world_size
    m = w.model
    stage_params = m.n_params / P
    layers = m.n_layer / P
    in_flight = min(P, P * w.n_microbatches)
    return Memory(stage_params * state_bytes_per_param(w), 0.0, activations(w, layers, in_flight, with_head=False))
