"""A floor under the step time of any synchronous weight pipeline: the round trip of a chunk between iterations.

Why it exists: the speed target "step <= 1.15x compute-only" cannot be met by any schedule when a link is slow
enough, and a schedule should be judged against what is possible, not against compute alone.

The argument needs only the dataflow that TawPipe, WeiPipe and this engine share: every rank runs its own
micro-batches through every chunk (sample-major: each micro-batch forward through all chunks, then backward), and
chunk ``c`` is updated only by its owner. Take a rank on a node that does not own chunk ``c``. Its forward of ``c``
in iteration ``t+1`` needs ``c``'s new weights, which exist only after

1. the rank's last backward of ``c`` in iteration ``t`` ended,
2. that gradient crossed to the owner's node (at best ``grad bytes / node bandwidth``, every NIC used),
3. the owner stepped, and
4. the new weights crossed back (``weight bytes / node bandwidth``).

Meanwhile the rank can only compute what its step order puts after the last use of ``c`` in iteration ``t``
(``B_{c-1} .. B_0`` of the last micro-batch) and before the first use in ``t+1`` (``F_0 .. F_{c-1}`` of the first;
in chunk-major order those of every micro-batch).
So the iteration takes at least its compute plus ``max(0, round trip - that slack)``, maximised over chunks. For
chunk 0 the slack is zero: its gradient is the last one made and its weights the first ones needed, so a whole
round trip of chunk 0 is exposed every iteration, whatever the schedule, prefetch depth or overlap. Only fewer
bytes in chunk 0 (a partition with a lighter first chunk, lower-precision traffic) or faster links lower it, or
giving up the premise for chunk 0: with ``replicate_first_chunk`` every node holds and steps a mirror of it, so its
round trip becomes one exchange between the holders (their all-reduce), and the floor is the largest of that and
the other chunks' uncovered round trips (a mirrored chunk ``c > 0``: its exchange, which starts after its last
backward, against ``B_{c-1} .. B_0``).

The owner's optimizer step is left out of the round trip (it is in compute-only as well), which keeps the floor a
floor. It holds for dedicated devices; on the CPU testbed with shared cores a waiting rank's cores speed up the
others, and the floor there is the CPU work instead (``benchmarks/plan_validate.py`` reports both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.weightpipe import first_chunk_exchange, make_chunks
from lightning_tawpipe.plan.workload import Workload
from lightning_tawpipe.schedule.actions import Op
from lightning_tawpipe.schedule.program import compute_steps
from lightning_tawpipe.schedule.tawpipe import mirrored_chunk_count


@dataclass(frozen=True)
class BoundaryFloor:
    """The exposed round trip (seconds) that every iteration pays at least, and where it comes from."""

    exposed: float  # seconds added to the iteration's compute, at least
    chunk: int  # the chunk whose round trip is the longest uncovered one
    round_trip: float  # that chunk's gradient out plus weights back, at the node's full inter-node bandwidth
    slack: float  # compute a rank can do between that chunk's last use and its next first use
    compute: float  # one rank's compute per iteration (forward and backward of every micro-batch)


def boundary_floor(cluster: Cluster, workload: Workload, compute: ComputeModel,
                   partition: str | Sequence[int] = "parameters",
                   replicate_first_chunk: bool | int = False, microbatch_order: str = "sample") -> BoundaryFloor:
    """The iteration-boundary floor for ``workload`` on ``cluster`` with one chunk per rank (see the module doc). In
    chunk-major ``microbatch_order`` the slack around a chunk's round trip holds every micro-batch's steps."""
    n_chunks = cluster.world_size
    chunks = make_chunks(workload, compute, n_chunks, partition)
    costs = chunks.costs
    slowdown = cluster.compute_slowdown(cluster.world_size)  # every rank computes: the compute-only pace
    steps = compute_steps(microbatch_order, n_chunks, workload.n_microbatches, train=True)
    times = [(costs.forward if s.op == Op.FORWARD else costs.backward)[s.chunk] * slowdown for s in steps]
    total = sum(times)
    if cluster.nodes < 2:
        return BoundaryFloor(0.0, 0, 0.0, total, total)
    best = None
    n_mirrored = mirrored_chunk_count(replicate_first_chunk, n_chunks)
    for c in range(n_chunks):
        uses = [i for i, s in enumerate(steps) if s.chunk == c]
        slack = sum(times[uses[-1] + 1:]) + sum(times[: uses[0]])
        if c < n_mirrored:  # the holders' all-reduce of the gradient is the whole trip, before the step
            slack = sum(times[uses[-1] + 1:])
            trip = first_chunk_exchange(cluster, workload, chunks.numel[c], cluster.nodes)[0]
        else:
            trip = (2 * cluster.inter_latency
                    + (costs.grad_bytes[c] + costs.weight_bytes[c]) / cluster.node_inter_bw)
        floor = BoundaryFloor(max(0.0, trip - slack), c, trip, slack, total)
        if best is None or floor.exposed > best.exposed:
            best = floor
    return best
