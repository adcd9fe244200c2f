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
* **weights**, for every *load* (a chunk resident in a slot from one compute step to a later one: at every
  forward/backward turn, F(P-1) B(P-1) and B0 F0 between micro-batches, the turning chunk and up to ``reuse - 1``
  chunks before it stay, see :func:`~lightning_tawpipe.schedule.program.residency`): as soon as the slot it will use
  is released, either the owner in this node copies its chunk into the slot and broadcasts it, or the
  same-local-index rank receives it from the remote owner and relays it with a broadcast placed one compute step
  before the chunk's first use. The slow inter-node receive so overlaps every compute step from the slot's release
  until then (a chunk kept across a turn frees its slot early), and the fast intra-node broadcast overlaps the last.
  If the receive has not arrived when the relay reaches its broadcast, the engine defers the broadcast rather than
  stall the relay's own compute, and posts it the moment the receive is done.
* **gradients**, after every backward step (in chunk-major order, after a chunk's last backward step: its steps add
  into one buffer): reduce in the node onto the rank with the owner's local index (so every
  rail carries gradients, not only local rank 0); one step later that rank adds the sum into its accumulator if it
  is the owner. Otherwise it sends the sum to the owner right behind the reduce: the engine posts that send the
  moment the reduce is done, during the next backward step, without waiting for it (a *deferred send*). The owner
  receives it into a small ring of buffers and adds it in before the buffer is reused (or at the end).

**A replicated first chunk** (``replicate_first_chunk``): chunk 0's gradient is the last an iteration makes and its
weights the first the next one needs, so on every node that does not own it a full round trip over the slow link
(gradient out, new weights back) sits between two iterations with no compute to hide it
(``lightning_tawpipe/plan/floor.py``). With the knob, the rank of chunk 0's local index on every other node keeps a
*mirror* of chunk 0 (weights, gradient accumulator, optimizer state): each node serves chunk 0 from its own holder
and accumulates its gradient there, exactly like an owner. The holders then sum their accumulators with one
all-reduce per optimizer step and step identically. That costs one one-way exchange instead of a round trip, and
chunk 0 no longer crosses nodes in the forward. ``replicate_first_chunk=k`` mirrors the first ``k`` chunks: over a
slow link the next chunk's round trip (gradient out after ``B1``, new weights back before ``F1``, with only ``B0``
and ``F0`` to hide it) is what binds once chunk 0's is gone.

The sum must happen once per optimizer step, after its last iteration, whatever the gradient accumulation. In an
iteration that the strategy knows ends an optimizer step (``exchange=True``) it is in the program: each holder adds
its node's last gradient of a mirrored chunk right behind the reduce (waiting for it instead of computing on) and
posts the exchange (``XG``) at once, so chunk 1's overlaps ``B0``; within that last backward the engine already
sends the finished units' part (``runtime/engine.py``), so chunk 0's overlaps ``B0`` too. Otherwise the strategy sums
after the iteration (``Pipeline.finalize_gradients``).

**Striped transfers** (``stripe``): without it, a remote chunk crosses into a node on one rail, between the owner and
the rank of its local index, and is broadcast from there; a node with one NIC per device leaves the other NICs idle
for that transfer. With it, every rank of the owner's node first gets its ``1 / G`` stripe of each chunk owned in the
node (a scatter at the head of the iteration, over the fast links, ``PW``; the owner's copy does not change during an
iteration), every rank of a fetching node receives its stripe from the rank of its own local index (``RT``), posted
where the relay's receive was, and the node all-gathers the stripes (``AW``) where the relay broadcast. So each
transfer uses all ``G`` rails, each for ``1 / G`` of the bytes. Gradients go the same way back: the node
reduce-scatters a remote chunk's gradient (``YG``, where it reduced it), every rank sends its stripe of the sum to
the rank of its local index in the owner's node (``TG``), which receives it into a ring of stripe buffers (``UG``,
posted as early as the receives of whole sums), and where the owner added a whole sum the owner's node gathers the
stripes onto the owner (``GG``), which adds them right away.
"""

from __future__ import annotations

from typing import NamedTuple

from lightning_tawpipe.schedule.actions import Action, ActionPool, Op
from lightning_tawpipe.schedule.program import (
    GroupProgramBuilder,
    Schedule,
    compute_steps,
    gc_paused,
    gradient_runs,
    residency,
)
from lightning_tawpipe.topology import Topology, tawpipe_owner


class _GradArrival(NamedTuple):
    """A remote gradient sum an owner must receive: sent at ``send_point`` of node ``sender_node``'s programs."""

    send_point: int
    sender_node: int
    chunk: int
    src: int


def default_reuse(prefetch: int, reuse: int | None) -> int:
    """The chunks kept across a turn: ``reuse`` if given, else every prefetch slot (it costs no extra memory)."""
    return prefetch if reuse is None else reuse


def default_grad_buffers(topo: Topology, grad_buffers: int | None) -> int:
    """The gradient buffers: ``grad_buffers`` if given, else 3 with three or more nodes and 2 with fewer.

    Why the node count decides: a non-owner node sends the gradients of every chunk owned elsewhere, so with more
    nodes more of its backward steps end in a send over the slow link. With two buffers a backward step waits until
    the send from two steps back has drained; a third lets backward run on. On three nodes that was measured (5-7%
    shorter steps at 2 and 4 Gbit/s, ``benchmarks/results/sleep-blocks/3x2-gb3``) and the planner predicts it for
    GPU clusters of 3-4 nodes (1-8%); on two nodes neither showed a gain that pays for the extra buffer.
    """
    if grad_buffers is not None:
        return grad_buffers
    return 3 if topo.n_groups >= 3 else 2


def build_tawpipe(
    topo: Topology,
    n_microbatches: int,
    prefetch: int = 1,
    train: bool = True,
    grad_buffers: int | None = None,
    recv_buffers: int | None = None,
    reuse: int | None = None,
    replicate_first_chunk: bool | int = False,
    exchange: bool = False,
    stripe: bool = False,
    order: str = "sample",
) -> Schedule:
    """Programs for every rank of one TawPipe iteration (``topo.world_size`` chunks, one per rank).

    ``recv_buffers`` defaults to one per remote node: an owner gets one gradient sum per remote node and
    micro-batch, and must have all of a micro-batch's receives posted before any sender needs its buffer back.

    Every node runs the same steps with the same slots, so the compute and release actions are made once and shared
    by all ranks; a node's broadcasts and reduces are shared by its ranks (:class:`GroupProgramBuilder`).

    ``reuse`` (default: ``prefetch``) is how many chunks stay resident across each forward/backward turn instead of
    being fetched again (:func:`residency`); 1 is the paper's schedule, which keeps only the turnaround chunk.
    ``grad_buffers`` defaults by the node count (:func:`default_grad_buffers`). ``replicate_first_chunk`` gives every
    other node a mirror of chunk 0 (``True``) or of the first ``k`` chunks (an int), and ``exchange`` sums their
    gradients between the holders inside the program (see the module doc; nothing changes on one node).
    ``stripe`` moves remote weights and gradient sums in stripes over every rail of a node (module doc; nothing
    changes on one node or
    with one rank per node). ``order`` is the micro-batch order: ``"sample"`` (the paper's: each micro-batch forward
    and backward in turn) or ``"chunk"`` (every micro-batch through a chunk while it is resident, see
    :func:`~lightning_tawpipe.schedule.program.chunk_major_steps`).
    """
    with gc_paused():
        return _build(topo, n_microbatches, prefetch, train, grad_buffers, recv_buffers, reuse,
                      mirrored_chunk_count(replicate_first_chunk, topo.world_size), exchange, stripe, order)


def mirrored_chunk_count(replicate_first_chunk: bool | int, n_chunks: int) -> int:
    """How many leading chunks ``replicate_first_chunk`` mirrors: ``False``/``True`` mean 0/1, an int ``k`` the first
    ``k`` (at most every chunk)."""
    if isinstance(replicate_first_chunk, bool):
        return int(replicate_first_chunk)
    if not isinstance(replicate_first_chunk, int) or not 0 <= replicate_first_chunk <= n_chunks:
        raise ValueError(f"replicate_first_chunk must be True, False or a number of leading chunks from 0 to "
                         f"{n_chunks} (one chunk per rank), got {replicate_first_chunk!r}.")
    return replicate_first_chunk


def chunk_mirrors(topo: Topology, n_mirrored: int) -> tuple[tuple[int, ...], ...]:
    """For each of the first ``n_mirrored`` chunks, the ranks that mirror it: on every node but its owner's, the
    rank with the owner's local index (so its holders are one rail, and the exchange between them stays on it).
    Empty on one node: there is nowhere to mirror."""
    if topo.n_groups < 2:
        return ()
    owners = [tawpipe_owner(c, topo) for c in range(n_mirrored)]
    return tuple(tuple(topo.rank(n, topo.local_index(o)) for n in range(topo.n_groups) if n != topo.group_of(o))
                 for o in owners)


def _build(topo, n_microbatches, prefetch, train, grad_buffers, recv_buffers, reuse, n_mirrored,
           exchange, stripe, order) -> Schedule:
    recv_buffers = recv_buffers or max(1, topo.n_groups - 1)
    grad_buffers = default_grad_buffers(topo, grad_buffers)
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1 (chunks fetched ahead of the one computing), got {prefetch}.")
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}.")
    if grad_buffers < 2 or recv_buffers < 1:
        raise ValueError(f"grad_buffers must be >= 2 (a step's gradients move while the next backward step writes "
                         f"into another buffer) and recv_buffers >= 1, got {grad_buffers} and {recv_buffers}.")
    n_chunks, n_slots, G = topo.world_size, prefetch + 1, topo.group_size
    owners = tuple(tawpipe_owner(c, topo) for c in range(n_chunks))
    mirrors = chunk_mirrors(topo, n_mirrored)
    n_mirrored = len(mirrors)
    exchange = exchange and train and n_mirrored > 0
    stripe = stripe and topo.n_groups > 1 and topo.group_size > 1
    steps = compute_steps(order, n_chunks, n_microbatches, train)
    runs = gradient_runs(steps)  # a chunk's backward steps with no other chunk between add into one buffer
    reuse = default_reuse(prefetch, reuse)
    loads = residency(steps, n_slots, reuse)  # the same on every node
    slots = [f"s{load.slot}" for load in loads]
    slot_of_step = {j: slot for load, slot in zip(loads, slots) for j in load.uses}
    compute = [_compute_action(step, slot_of_step[j], runs[j], grad_buffers) for j, step in enumerate(steps)]
    releases = [Action(Op.RELEASE, load.chunk, buf=slot) for load, slot in zip(loads, slots)]
    groups = [GroupProgramBuilder(len(steps), topo.group_ranks(node), compute) for node in range(topo.n_groups)]
    action = ActionPool()  # one object for the repeats (e.g. a chunk sent to the same rank for F and for B)
    weight_sends: dict[int, list[tuple[int, int, Action]]] = {r: [] for r in range(topo.world_size)}
    # remote gradient sums each owner (whole) or, striped, each owner's node (in stripes) receives
    arrivals: dict[int, list[_GradArrival]] = {r: [] for r in range(topo.world_size)}
    node_arrivals: dict[int, list[_GradArrival]] = {n: [] for n in range(topo.n_groups)}

    for node, group in enumerate(groups):
        for i, load in enumerate(loads):
            slot = slots[i]
            issue = load.issue
            owner = owners[load.chunk]
            # the owner, or the chunk's mirror, copies it from its own storage (topo.same_group, inlined: hot)
            striped = stripe and owner // G != node and load.chunk >= n_mirrored  # all-gathered, not broadcast
            if owner // G == node or load.chunk < n_mirrored:
                root, bcast_point = node * G + owner % G, issue
                group.add(root, issue, action(Op.COPY_W, load.chunk, buf=slot))
            else:
                root = node * G + owner % G
                tick = issue + node
                if striped:  # every rank receives its stripe from the rank of its local index in the owner's node
                    owner_node = owner // G
                    stripes = f"t{load.chunk}"
                    for k in range(G):
                        src, dst = owner_node * G + k, node * G + k
                        group.add(dst, issue, action(Op.RECV_STRIPE_W, load.chunk, peer=src, buf=slot))
                        weight_sends[src].append((tick, dst, action(Op.SEND_W, load.chunk, peer=dst, buf=stripes)))
                else:
                    group.add(root, issue, action(Op.RECV_W, load.chunk, peer=owner, buf=slot))
                    weight_sends[owner].append((tick, root, action(Op.SEND_W, load.chunk, peer=root, buf="own")))
                # relay one compute before the first use: the inter-node receive overlaps every compute from
                # the slot's release until then, the (faster) intra-node broadcast the last one
                bcast_point = min(max(issue + 1, load.first - 2), load.first - 1)
            if G > 1:
                group.shared(bcast_point).append(action(Op.GATHER_W, load.chunk, buf=slot) if striped
                                                 else Action(Op.BCAST_W, load.chunk, peer=root, buf=slot))
            group.shared(load.last).append(releases[i])
        if train:
            _place_gradients(topo, node, steps, runs, owners, group, arrivals, grad_buffers, action, n_mirrored,
                             exchange, n_microbatches - 1, node_arrivals if stripe else None)

    programs: dict[int, tuple[Action, ...]] = {}
    for node, group in enumerate(groups):
        # striped: the node's ranks first take their stripes of every chunk owned here that other nodes fetch
        scatters = [action(Op.SCATTER_W, c, peer=owners[c], buf=f"t{c}") for c in range(n_mirrored, n_chunks)
                    if stripe and owners[c] // G == node]
        for rank in topo.group_ranks(node):
            group.head[rank] += scatters
            group.head[rank] += [a for _, _, a in sorted(weight_sends[rank], key=lambda t: (t[0], t[1]))]
            _place_arrivals(group, rank, arrivals[rank], node, recv_buffers, action)
        if stripe and train:
            _place_striped_arrivals(group, node, node_arrivals[node], owners, G * recv_buffers, action)
        programs.update(group.build())
    return Schedule(
        name="tawpipe",
        order=order,
        topology=topo,
        owners=owners,
        n_microbatches=n_microbatches,
        prefetch=prefetch,
        train=train,
        programs=tuple(programs[r] for r in range(topo.world_size)),
        n_slots=n_slots,
        n_grad_buffers=grad_buffers,
        n_recv_buffers=1 if stripe else recv_buffers,  # striped: the owner adds each gathered sum at once
        n_stripe_buffers=G * recv_buffers if stripe and train else 0,
        reuse=reuse,
        mirrors=mirrors,
        exchanges=exchange,
        striped=stripe,
    )


def _compute_action(step, slot: str, run: tuple[int, bool, bool], grad_buffers: int) -> Action:
    if step.op is Op.FORWARD:
        return Action(Op.FORWARD, step.chunk, mb=step.mb, buf=slot)
    index, first, _ = run
    return Action(Op.BACKWARD, step.chunk, mb=step.mb, buf=slot, buf2=f"g{index % grad_buffers}", acc=not first)


def _place_gradients(topo, node, steps, runs, owners, group: GroupProgramBuilder, arrivals, grad_buffers,
                     action: ActionPool, n_mirrored: int, exchange: bool, last_mb: int,
                     node_arrivals: dict[int, list[_GradArrival]] | None = None) -> None:
    """Reduce each gradient run's gradients (one backward step's, in sample-major order) in the node, then add them
    at (or send them to) the owner; a chunk held in the node (its owner's, or a mirror) is added right there. With
    ``exchange`` a holder adds a mirrored chunk's last gradient right behind its reduce and posts the holders'
    exchange of it. With ``node_arrivals`` (striped) a remote chunk's gradient is reduce-scattered and every rank
    sends its stripe to its own rail's peer."""
    last = len(steps) - 1
    G = topo.group_size
    gbufs = [f"g{i}" for i in range(grad_buffers)]
    for j, step in enumerate(steps):
        run, _, ends_run = runs[j]
        if step.op is not Op.BACKWARD or not ends_run:
            continue
        gbuf = gbufs[run % grad_buffers]
        owner = owners[step.chunk]
        root = node * G + owner % G
        later = min(j + 1, last)  # one compute later, so the reduce overlaps the next backward
        if node_arrivals is not None and owner // G != node and step.chunk >= n_mirrored:
            owner_node = owner // G
            group.shared(j).append(action(Op.REDUCE_SCATTER_G, step.chunk, buf=gbuf))
            for k in range(G):  # right behind the reduce-scatter, deferred like a whole sum's send
                group.add(node * G + k, j, action(Op.SEND_STRIPE_G, step.chunk, peer=owner_node * G + k, buf=gbuf))
            node_arrivals[owner_node].append(_GradArrival(later, node, step.chunk, node * G))
            continue
        if G > 1:
            group.shared(j).append(action(Op.REDUCE_G, step.chunk, peer=root, buf=gbuf))
        if step.chunk < n_mirrored and exchange and step.mb == last_mb:
            group.add(root, j, action(Op.ACC_G, step.chunk, buf=gbuf))
            group.add(root, j, action(Op.EXCHANGE_G, step.chunk, buf=f"acc{step.chunk}"))
        elif root == owner or step.chunk < n_mirrored:
            group.add(root, later, action(Op.ACC_G, step.chunk, buf=gbuf))
        else:
            # right behind its reduce: the engine defers a send whose reduce is still running and posts it as soon
            # as the reduce is done (runtime/engine.py), so the slow transfer overlaps the next backward step
            # instead of starting after it; the owner still adds it in one step after ``later``
            group.add(root, j, action(Op.SEND_G, step.chunk, peer=owner, buf=gbuf))
            arrivals[owner].append(_GradArrival(later, node, step.chunk, root))


def _place_striped_arrivals(group: GroupProgramBuilder, node: int, arrivals: list[_GradArrival], owners,
                            n_buffers: int, action: ActionPool) -> None:
    """Striped: every rank of the owner's node receives its stripe of each remote gradient sum, and the node gathers
    the stripes onto the owner, which adds them.

    The same timing as :func:`_place_arrivals`, for the node as a whole: the stripe receives of arrival ``i`` are
    posted as soon as its stripe buffer (a node-wide ring of ``n_buffers``) is free again, and the gather sits where
    an owner added a whole sum, one compute step after the sender certainly posted it; the owner adds the gathered
    sum right behind the gather, so one buffer of the chunk's size serves it (``q0``). Every rank of the node places
    the same receives, gathers and buffers in the same order, which is what makes the gathers a collective.
    """
    last = group.n_steps - 1
    G = len(group.head)
    ordered = sorted(arrivals, key=lambda a: (a.send_point + max(0, a.sender_node - node), a.src, a.chunk))
    rbufs = [f"r{i}" for i in range(n_buffers)]
    freed_at: list[int | None] = [None] * n_buffers
    for i, arr in enumerate(ordered):
        rbuf, post = rbufs[i % n_buffers], freed_at[i % n_buffers]
        owner = owners[arr.chunk]
        for k in range(G):
            _place_when_free(group, node * G + k, post,
                             action(Op.RECV_STRIPE_G, arr.chunk, peer=arr.sender_node * G + k, buf=rbuf))
        gather = action(Op.GATHER_G, arr.chunk, peer=owner, buf=rbuf, buf2="q0")
        add = action(Op.ACC_G, arr.chunk, buf="q0")
        add_point = arr.send_point + max(0, arr.sender_node - node) + 1
        if add_point > last:
            for k in range(G):
                group.tail[node * G + k].append(gather)
            group.tail[owner].append(add)
            freed_at[i % n_buffers] = last + 1
        else:
            group.shared(add_point).append(gather)
            group.add(owner, add_point, add)
            freed_at[i % n_buffers] = add_point


def _place_when_free(group: GroupProgramBuilder, rank: int, freed_at: int | None, receive: Action) -> None:
    """Place a receive where its buffer is free again: at the head (not used yet this iteration), in the tail (freed
    after the last compute), or at that point."""
    if freed_at is None:
        group.head[rank].append(receive)
    elif freed_at > group.n_steps - 1:
        group.tail[rank].append(receive)
    else:
        group.add(rank, freed_at, receive)


def _place_arrivals(group: GroupProgramBuilder, rank: int, arrivals: list[_GradArrival], owner_node: int,
                    n_buffers: int, action: ActionPool) -> None:
    """Post each remote gradient receive early, add it into the accumulator late.

    Receive ``i`` is posted as soon as its buffer is free (right after receive ``i - n_buffers`` was added in), so a
    sender never waits for its buffer on an owner that is busy in user code. The add waits for the data, so it is
    placed one compute step after the sender has certainly posted the send (no earlier in the iteration than the
    sender's own point, i.e. the same user-code epoch, and no earlier in global time: node ``n`` runs ``n`` steps
    behind node 0), so the transfer overlaps that step instead of blocking the owner.
    """
    last = group.n_steps - 1
    ordered = sorted(arrivals, key=lambda a: (a.send_point + max(0, a.sender_node - owner_node), a.src))
    qbufs = [f"q{i}" for i in range(n_buffers)]
    freed_at: list[int | None] = [None] * n_buffers  # point where each buffer's previous content was added in
    for i, arr in enumerate(ordered):
        qbuf = qbufs[i % n_buffers]
        post = freed_at[i % n_buffers]
        _place_when_free(group, rank, post, action(Op.RECV_G, arr.chunk, peer=arr.src, buf=qbuf))
        add_point = arr.send_point + max(0, arr.sender_node - owner_node) + 1  # +1: the transfer hides behind a step
        add = action(Op.ACC_G, arr.chunk, buf=qbuf)
        if add_point > last:
            group.tail[rank].append(add)
            freed_at[i % n_buffers] = last + 1
        else:
            group.add(rank, add_point, add)
            freed_at[i % n_buffers] = add_point
