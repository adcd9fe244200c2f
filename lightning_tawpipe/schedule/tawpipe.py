"""TawPipe's group-based weight pipeline schedule (GWPS), built as data.

Every rank runs its own micro-batches forward through every chunk and back (sample-major), like FSDP. All ranks of
a node run the same chunk at the same step; node ``n`` runs ``n`` steps behind node 0, so at any global tick the
nodes need consecutive chunks with distinct owner nodes and every inter-node transfer is a pairwise exchange
between ranks of the same local index (``../research/tawpipe-algorithm.md`` §3.3-3.4, corrected recipe).

Per rank the program does, in order:

* **head**: as an owner, post every send of its own chunk that another node will need this iteration. The owner's
  copy never changes during an iteration, so posting early is always safe; the receiver's matching receive decides
  when the bytes move. It also means no lagging node ever waits on an owner that is busy in user code (e.g. a
  ``self.log(sync_dist=True)`` collective).
* **weights**, for every *load* (a chunk resident for consecutive steps; the forward/backward turnaround and the
  backward/forward turn between micro-batches keep their chunk): as soon as the slot it will use is released,
  either the owner in this node copies its chunk into the slot and broadcasts it, or the same-local-index rank
  receives it from the remote owner and broadcasts it one compute step later (so the receive overlaps compute).
* **gradients**, after every backward step: reduce in the node onto the rank with the owner's local index (so every
  rail carries gradients, not only local rank 0); one step later that rank adds the sum into its accumulator if it
  is the owner, or sends it to the owner, which receives it into a small ring of buffers and adds it in before
  the buffer is reused (or at the end).
"""

from __future__ import annotations

from itertools import accumulate

from dataclasses import dataclass

from lightning_tawpipe.schedule.actions import Action, Op
from lightning_tawpipe.schedule.program import ProgramBuilder, Schedule, residency, sample_major_steps
from lightning_tawpipe.topology import Topology, tawpipe_owner


@dataclass(frozen=True)
class _GradArrival:
    """A remote gradient sum an owner must receive: sent at ``send_point`` of node ``sender_node``'s programs."""

    send_point: int
    sender_node: int
    chunk: int
    src: int


def build_tawpipe(
    topo: Topology,
    n_microbatches: int,
    prefetch: int = 1,
    train: bool = True,
    grad_buffers: int = 2,
    recv_buffers: int | None = None,
) -> Schedule:
    """Programs for every rank of one TawPipe iteration (``topo.world_size`` chunks, one per rank).

    ``recv_buffers`` defaults to one per remote node: an owner gets one gradient sum per remote node and
    micro-batch, and must have all of a micro-batch's receives posted before any sender needs its buffer back.
    """
    recv_buffers = recv_buffers or max(1, topo.n_groups - 1)
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1 (chunks fetched ahead of the one computing), got {prefetch}.")
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}.")
    n_chunks, n_slots = topo.world_size, prefetch + 1
    owners = tuple(tawpipe_owner(c, topo) for c in range(n_chunks))
    steps = sample_major_steps(n_chunks, n_microbatches, train)
    backward_before = list(accumulate((s.op is Op.BACKWARD for s in steps), initial=0))  # [j]: in steps[:j]
    builders = [ProgramBuilder(len(steps)) for _ in range(topo.world_size)]
    weight_sends: dict[int, list[tuple[int, int, Action]]] = {r: [] for r in range(topo.world_size)}
    arrivals: dict[int, list[_GradArrival]] = {r: [] for r in range(topo.world_size)}

    for node in range(topo.n_groups):
        loads = residency(steps, n_slots)
        ranks = topo.group_ranks(node)
        for i, load in enumerate(loads):
            slot = f"s{load.slot}"
            issue = loads[i - n_slots].last if i >= n_slots else -1
            owner = owners[load.chunk]
            if topo.same_group(owner, ranks[0]):
                builders[owner].at(issue).append(Action(Op.COPY_W, load.chunk, buf=slot))
                root, bcast_point = owner, issue
            else:
                root = topo.rank(node, topo.local_index(owner))
                builders[root].at(issue).append(Action(Op.RECV_W, load.chunk, peer=owner, buf=slot))
                tick = issue + node
                weight_sends[owner].append((tick, root, Action(Op.SEND_W, load.chunk, peer=root, buf="own")))
                bcast_point = min(issue + 1, load.first - 1)
            computes = [(j, _compute_action(steps[j], slot, backward_before[j], grad_buffers))
                        for j in range(load.first, load.last + 1)]
            for r in ranks:
                if topo.group_size > 1:
                    builders[r].at(bcast_point).append(Action(Op.BCAST_W, load.chunk, peer=root, buf=slot))
                for j, action in computes:
                    builders[r].compute[j] = action
                builders[r].at(load.last).append(Action(Op.RELEASE, load.chunk, buf=slot))
        if train:
            _place_gradients(topo, node, steps, owners, builders, arrivals, grad_buffers)

    for rank, builder in enumerate(builders):
        builder.head += [a for _, _, a in sorted(weight_sends[rank], key=lambda t: (t[0], t[1]))]
        _place_arrivals(builder, arrivals[rank], topo.group_of(rank), recv_buffers)
    return Schedule(
        name="tawpipe",
        topology=topo,
        owners=owners,
        n_microbatches=n_microbatches,
        prefetch=prefetch,
        train=train,
        programs=tuple(b.build() for b in builders),
        n_slots=n_slots,
        n_grad_buffers=grad_buffers,
        n_recv_buffers=recv_buffers,
    )


def _compute_action(step, slot: str, n_backward_before: int, grad_buffers: int) -> Action:
    if step.op is Op.FORWARD:
        return Action(Op.FORWARD, step.chunk, mb=step.mb, buf=slot)
    return Action(Op.BACKWARD, step.chunk, mb=step.mb, buf=slot, buf2=f"g{n_backward_before % grad_buffers}")


def _place_gradients(topo, node, steps, owners, builders, arrivals, grad_buffers) -> None:
    """Reduce each backward step's gradients in the node, then add them at (or send them to) the owner."""
    last = len(steps) - 1
    n_backward = 0
    for j, step in enumerate(steps):
        if step.op is not Op.BACKWARD:
            continue
        gbuf = f"g{n_backward % grad_buffers}"
        n_backward += 1
        owner = owners[step.chunk]
        root = topo.rank(node, topo.local_index(owner))
        if topo.group_size > 1:
            for r in topo.group_ranks(node):
                builders[r].at(j).append(Action(Op.REDUCE_G, step.chunk, peer=root, buf=gbuf))
        later = min(j + 1, last)  # one compute later, so the reduce overlaps the next backward
        if root == owner:
            builders[owner].at(later).append(Action(Op.ACC_G, step.chunk, buf=gbuf))
        else:
            builders[root].at(later).append(Action(Op.SEND_G, step.chunk, peer=owner, buf=gbuf))
            arrivals[owner].append(_GradArrival(later, node, step.chunk, root))


def _place_arrivals(builder: ProgramBuilder, arrivals: list[_GradArrival], owner_node: int, n_buffers: int) -> None:
    """Post each remote gradient receive early, add it into the accumulator late.

    Receive ``i`` is posted as soon as its buffer is free (right after receive ``i - n_buffers`` was added in), so a
    sender never waits for its buffer on an owner that is busy in user code. The add waits for the data, so it is
    placed one compute step after the sender has certainly posted the send (no earlier in the iteration than the
    sender's own point, i.e. the same user-code epoch, and no earlier in global time: node ``n`` runs ``n`` steps
    behind node 0), so the transfer overlaps that step instead of blocking the owner.
    """
    last = builder.n_steps - 1
    ordered = sorted(arrivals, key=lambda a: (a.send_point + max(0, a.sender_node - owner_node), a.src))
    # the add waits for the data, so it comes one compute step after the sender has posted it
    freed_at: list[int | None] = [None] * n_buffers  # point where each buffer's previous content was added in
    for i, arr in enumerate(ordered):
        qbuf = f"q{i % n_buffers}"
        post = freed_at[i % n_buffers]
        receive = Action(Op.RECV_G, arr.chunk, peer=arr.src, buf=qbuf)
        if post is None:
            builder.head.append(receive)
        elif post > last:
            builder.tail.append(receive)
        else:
            builder.at(post).append(receive)
        add_point = arr.send_point + max(0, arr.sender_node - owner_node) + 1  # +1: the transfer hides behind a step
        add = Action(Op.ACC_G, arr.chunk, buf=qbuf)
        if add_point > last:
            builder.tail.append(add)
            freed_at[i % n_buffers] = last + 1
        else:
            builder.at(add_point).append(add)
            freed_at[i % n_buffers] = add_point
