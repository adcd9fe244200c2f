"""A schedule: the programs of all ranks plus what is needed to read them, and a helper to assemble them.

Builders place actions at *points*: point ``p`` is "right after this rank's compute step ``p``" (point ``-1`` is
before the first compute). :class:`GroupProgramBuilder` collects them for the ranks of a group and flattens them
into each rank's program in order: head, point -1, compute 0, point 0, compute 1, ..., point S-1, tail.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter

from lightning_tawpipe.schedule.actions import Action, Op, format_program
from lightning_tawpipe.topology import Topology


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building or checking a big schedule, then restore it.

    They allocate millions of long-lived objects and no cycles; each automatic full collection would walk them all
    (about 40% of the time of a 1024-rank build). Memory is unaffected: reference counting frees what is dropped.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class Step:
    """One compute step of a rank: forward or backward of ``chunk`` for micro-batch ``mb``."""

    op: Op
    chunk: int
    mb: int


@dataclass(frozen=True)
class Schedule:
    """Every rank's program for one pipeline iteration (``n_microbatches`` micro-batches per rank)."""

    name: str
    topology: Topology
    owners: tuple[int, ...]
    n_microbatches: int
    prefetch: int
    train: bool
    programs: tuple[tuple[Action, ...], ...]
    n_slots: int
    n_grad_buffers: int
    n_recv_buffers: int
    reuse: int = 1  # chunks kept resident across each forward/backward turn (TawPipe's ``residency``)
    # ``mirrors[c]``: the ranks other than chunk ``c``'s owner that hold a replica of it, one per other node, for
    # each of the first ``len(mirrors)`` chunks (``replicate_first_chunk``)
    mirrors: tuple[tuple[int, ...], ...] = ()
    # whether the programs sum the mirrored chunks' gradients between their holders (``XG``): an iteration that ends
    # an optimizer step; otherwise the strategy does it once per step, after the last iteration
    exchanges: bool = False
    # whether chunks and gradient sums cross nodes in stripes (``stripe``): every rank of a node receives its ``1 / G``
    # of a remote chunk over its own rail and the node all-gathers them, instead of one rank receiving it all and
    # broadcasting it; gradient sums go back the same way
    striped: bool = False
    # striped: each rank's ring of stripe-sized buffers for its stripes of remote gradient sums (``r<i>``)
    n_stripe_buffers: int = 0
    # the micro-batch order of the compute steps (:data:`ORDERS`)
    order: str = "sample"

    @property
    def n_chunks(self) -> int:
        return len(self.owners)

    def program(self, rank: int) -> tuple[Action, ...]:
        return self.programs[rank]

    def holders(self, chunk: int) -> tuple[int, ...]:
        """The ranks that keep ``chunk``'s weights and accumulate its gradients: its owner, and its mirrors."""
        if chunk < len(self.mirrors):
            return (self.owners[chunk],) + self.mirrors[chunk]
        return (self.owners[chunk],)

    def compute_steps(self, rank: int) -> list[Action]:
        return [a for a in self.programs[rank] if a.op in (Op.FORWARD, Op.BACKWARD)]

    def dump(self) -> str:
        """One line per rank, ``rank: action action ...`` (the CSV-like form of torch pipelining)."""
        return "\n".join(f"{r}: {format_program(list(p))}" for r, p in enumerate(self.programs))


ORDERS = ("sample", "chunk")  # micro-batch orders: sample-major (the paper's) and chunk-major


def sample_major_steps(n_chunks: int, n_microbatches: int, train: bool) -> list[Step]:
    """Each micro-batch goes forward through every chunk, then backward (the paper's order)."""
    steps: list[Step] = []
    for mb in range(n_microbatches):
        steps += [Step(Op.FORWARD, c, mb) for c in range(n_chunks)]
        if train:
            steps += [Step(Op.BACKWARD, c, mb) for c in reversed(range(n_chunks))]
    return steps


def chunk_major_steps(n_chunks: int, n_microbatches: int, train: bool) -> list[Step]:
    """Every micro-batch goes through a chunk before any goes on to the next (``microbatch_order="chunk"``).

    Forward, chunk by chunk; at the last chunk each micro-batch turns (its forward, the loss, its backward) before the
    next one starts, so only one micro-batch's logits are alive at a time; then backward, chunk by chunk. A chunk's
    consecutive steps keep its weights resident (:func:`residency`), and its backward steps add into one gradient
    buffer, so an iteration moves each chunk's weights and gradient as often as one micro-batch would, whatever
    ``n_microbatches`` is. The price: every micro-batch's activations stay alive until its backward, as with one
    micro-batch of the whole batch. With one micro-batch it is the sample-major order.
    """
    mbs, last = range(n_microbatches), n_chunks - 1
    steps = [Step(Op.FORWARD, c, mb) for c in range(last) for mb in mbs]
    for mb in mbs:
        steps.append(Step(Op.FORWARD, last, mb))
        if train:
            steps.append(Step(Op.BACKWARD, last, mb))
    if train:
        steps += [Step(Op.BACKWARD, c, mb) for c in reversed(range(last)) for mb in mbs]
    return steps


def compute_steps(order: str, n_chunks: int, n_microbatches: int, train: bool) -> list[Step]:
    """The compute steps of one iteration in micro-batch ``order`` (one of :data:`ORDERS`)."""
    if order == "sample":
        return sample_major_steps(n_chunks, n_microbatches, train)
    if order == "chunk":
        return chunk_major_steps(n_chunks, n_microbatches, train)
    raise ValueError(f"microbatch_order must be one of {ORDERS}, got {order!r}.")


def gradient_runs(steps: list[Step]) -> list[tuple[int, bool, bool]]:
    """Per compute step: ``(run, first, last)`` for its *gradient run*, the backward steps of one chunk with no other
    chunk's step between them, which add into one gradient buffer and leave the rank as one gradient (in chunk-major
    order, ``B3.0 F3.1 B3.1`` at the last chunk is one run). A forward step gets the run of the next backward. In
    sample-major order every backward step is its own run."""
    n = len(steps)
    last_of = [False] * n  # whether a backward step ends its run: another chunk (or the end) comes before its next
    for j, step in enumerate(steps):
        if step.op is Op.BACKWARD:
            k = j + 1
            while k < n and steps[k].chunk == step.chunk and steps[k].op is not Op.BACKWARD:
                k += 1
            last_of[j] = k == n or steps[k].chunk != step.chunk
    out: list[tuple[int, bool, bool]] = []
    run, open_run = 0, False
    for j, step in enumerate(steps):
        if step.op is not Op.BACKWARD:
            out.append((run, False, False))
            continue
        out.append((run, not open_run, last_of[j]))
        open_run = not last_of[j]
        run += last_of[j]
    return out


@dataclass
class Load:
    """A chunk resident in weight slot ``slot`` from compute step ``first`` to ``last``, computed on at ``uses``.

    ``issue`` is the point where the slot is free for it (the previous occupant's ``last``; ``-1`` before the first
    compute): the fill is posted there, so it overlaps the computes between ``issue`` and ``first``.
    """

    chunk: int
    first: int
    last: int
    slot: int = -1
    issue: int = -1
    uses: list[int] = field(default_factory=list)


def residency(steps: list[Step], n_slots: int, reuse: int = 1) -> list[Load]:
    """Turn compute steps into slot loads: which chunk sits in which slot, from when to when, filled at which point.

    A chunk stays resident from one use to its next when at most ``reuse - 1`` other chunks are used in between, so
    it is not fetched again: ``reuse=1`` keeps only the chunk at the forward/backward turnaround (F(P-1) B(P-1)) and
    at the backward/forward turn between micro-batches (B0 F0); ``reuse=k`` also keeps the ``k-1`` chunks before
    it (F(P-k)...F(P-1) B(P-1)...B(P-k)), which saves ``k-1`` loads per turn and uses no memory beyond the slots.
    The loads it keeps are nested, so they need ``k`` slots at once; with ``n_slots >= reuse + 1`` every load is
    still issued at least one compute step before its first use (only the prefetch lead shrinks at the turn).

    Slots are handed out in order of first use, each load taking the slot freed earliest: with ``reuse=1`` this is
    the round-robin ``load i -> slot i % n_slots``, issued when load ``i - n_slots`` is released.
    """
    if not 1 <= reuse < n_slots:
        raise ValueError(f"reuse must be in 1..{n_slots - 1} (at most the prefetch depth), got {reuse}.")
    loads: list[Load] = []
    latest: dict[int, Load] = {}  # chunk -> its most recent load
    for j, step in enumerate(steps):
        load = latest.get(step.chunk)
        if load is not None and _stays_resident(steps, load.last, j, reuse):
            load.last = j
        else:
            load = latest[step.chunk] = Load(step.chunk, j, j)
            loads.append(load)
        load.uses.append(j)
    free_at = [-1] * n_slots  # per slot: the point where its last load is released
    for load in loads:  # in order of first use
        slot = min(range(n_slots), key=free_at.__getitem__)
        if free_at[slot] >= load.first:
            raise ValueError(f"{n_slots} weight slots cannot hold chunk {load.chunk} at step {load.first} "
                             f"with reuse={reuse}")
        load.slot, load.issue = slot, free_at[slot]
        free_at[slot] = load.last
    return loads


def _stays_resident(steps: list[Step], last_use: int, j: int, reuse: int) -> bool:
    """Whether at most ``reuse - 1`` other chunks are used between steps ``last_use`` and ``j`` (stops early)."""
    others: set[int] = set()
    for i in range(last_use + 1, j):
        others.add(steps[i].chunk)
        if len(others) >= reuse:
            return False
    return True


class GroupProgramBuilder:
    """Collects actions by point for the ranks of one group (node) and flattens them into their programs.

    The ranks of a group run mostly the same actions (the same computes, releases, broadcasts and reduces), so those
    are placed once with :meth:`shared` and the few that belong to one rank with :meth:`add`; each rank's program is
    then its own actions merged into the shared sequence in placement order, as if every rank had its own list per
    point. Ranks share the action objects, and building costs ``O(shared + own)`` Python steps per rank.
    """

    def __init__(self, n_steps: int, ranks: list[int], compute: list[Action]) -> None:
        if len(compute) != n_steps:
            raise ValueError(f"{len(compute)} compute actions for {n_steps} steps")
        self.n_steps = n_steps
        self.compute = compute  # compute[j]: step j, the same on every rank of the group
        self.points: list[list[Action]] = [[] for _ in range(n_steps + 1)]  # [point + 1]: shared actions in order
        self.own: dict[int, list[tuple[int, int, Action]]] = {r: [] for r in ranks}  # (point, shared before, a)
        self.head: dict[int, list[Action]] = {r: [] for r in ranks}
        self.tail: dict[int, list[Action]] = {r: [] for r in ranks}

    def _check(self, point: int) -> int:
        if not -1 <= point < self.n_steps:
            raise ValueError(f"point {point} outside -1..{self.n_steps - 1}")
        return point + 1

    def shared(self, point: int) -> list[Action]:
        """The list of actions every rank of the group runs at ``point`` (append to it)."""
        return self.points[self._check(point)]

    def add(self, rank: int, point: int, action: Action) -> None:
        """Place ``action`` at ``point`` on ``rank`` only, after the shared actions placed there so far."""
        self.own[rank].append((point, len(self.points[self._check(point)]), action))

    def build(self) -> dict[int, tuple[Action, ...]]:
        """Every rank's program: head, point -1, compute 0, point 0, ..., compute S-1, point S-1, tail."""
        flat: list[Action] = list(self.points[0])
        start = [0]  # start[point + 1]: index in `flat` of the point's first shared action
        for j in range(self.n_steps):
            flat.append(self.compute[j])
            start.append(len(flat))
            flat += self.points[j + 1]
        programs = {}
        for rank, own in self.own.items():
            # stable: a rank's actions at the same place keep the order they were added in
            at = sorted(((start[p + 1] + before, a) for p, before, a in own), key=itemgetter(0))
            out = list(self.head[rank])
            done = 0
            for i, a in at:
                out += flat[done:i]
                out.append(a)
                done = i
            out += flat[done:]
            out += self.tail[rank]
            programs[rank] = tuple(out)
        return programs
