"""WeiPipe-Interleave as data: the topology-unaware weight ring, our baseline for ablations.

The consistent form of ``../research/tawpipe-algorithm.md`` §2.3. Time runs in slots ``τ = 0 .. M·P + 2P - 2``;
at slot ``τ`` rank ``r``

* runs the forward of chunk ``(τ - r) mod P`` for micro-batch ``(τ - r) div P`` if ``0 <= τ - r < M·P``;
* runs the backward of chunk ``P - 1 - ((τ - r - P) mod P)`` for micro-batch ``(τ - r - P) div P`` if
  ``0 <= τ - r - P < M·P``.

The chunk a rank holds in either ring at slot ``τ`` sits on rank ``r + 1`` at ``τ + 1``, so three rings flow
``r -> r + 1``: forward weights, backward weights, and gradient accumulators (riding with the backward weights and
picking up each rank's share). Rank ``r`` owns chunk ``-r mod P``, so at slot 0 every rank holds its own chunk in
the forward ring; the backward ring starts with one fetch from the owner (the code's initial swap). A ring keeps
moving through idle slots while a rank further along still needs it. The last contributor to a chunk's
accumulator sends the sum straight to the owner. Nothing here knows about nodes: that is the point of the ablation.
"""

from __future__ import annotations

from lightning_tawpipe.schedule.actions import Action, ActionPool, Op
from lightning_tawpipe.schedule.program import Schedule, gc_paused
from lightning_tawpipe.schedule.tawpipe import build_tawpipe
from lightning_tawpipe.topology import Topology, ring_owner


def build_weipipe(topo: Topology, n_microbatches: int, prefetch: int = 1, train: bool = True) -> Schedule:
    """Programs for every rank of one WeiPipe-Interleave iteration (one chunk per rank)."""
    if prefetch < 1 or n_microbatches < 1:
        raise ValueError(f"prefetch and n_microbatches must be >= 1, got {prefetch}, {n_microbatches}.")
    P = topo.world_size
    if P == 1:  # a ring of one is a single rank computing alone: identical to TawPipe on one rank
        single = build_tawpipe(topo, n_microbatches, prefetch=prefetch, train=train)
        return Schedule("weipipe", topo, (0,), n_microbatches, prefetch, train, single.programs, single.n_slots,
                        single.n_grad_buffers, single.n_recv_buffers)
    ring = _Ring(P, n_microbatches, prefetch, train)
    with gc_paused():
        programs = tuple(tuple(ring.program(r)) for r in range(P))
    return Schedule(
        name="weipipe",
        topology=topo,
        owners=tuple(ring_owner(c, P) for c in range(P)),
        n_microbatches=n_microbatches,
        prefetch=prefetch,
        train=train,
        programs=programs,
        n_slots=2 * ring.k if train else ring.k,
        n_grad_buffers=2,
        n_recv_buffers=3,
    )


class _Ring:
    """Slot arithmetic of the two weight rings and the gradient ring (pure functions of rank and slot)."""

    def __init__(self, P: int, M: int, prefetch: int, train: bool) -> None:
        self.P, self.M, self.d, self.train = P, M, prefetch, train
        self.k = prefetch + 1  # buffers per ring: the slot computing plus `prefetch` arriving
        self.action = ActionPool()  # identical actions of different ranks and slots share one object
        self.n_slots = M * P + (2 * P - 1 if train else P - 1)

    # which chunk/micro-batch a rank computes, and which chunk it holds, at slot t
    def forward_step(self, r: int, t: int) -> tuple[int, int] | None:
        i = t - r
        return (i % self.P, i // self.P) if 0 <= i < self.M * self.P else None

    def backward_step(self, r: int, t: int) -> tuple[int, int] | None:
        i = t - r - self.P
        return (self.P - 1 - i % self.P, i // self.P) if self.train and 0 <= i < self.M * self.P else None

    def forward_held(self, r: int, t: int) -> int | None:
        return (t - r) % self.P if 0 <= t <= self.M * self.P - 1 + r else None

    def backward_held(self, r: int, t: int) -> int | None:
        if not self.train or not 0 <= t <= self.M * self.P + self.P - 1 + r:
            return None
        return self.P - 1 - (t - r) % self.P

    def _next(self, r: int) -> int:
        return (r + 1) % self.P

    def _prev(self, r: int) -> int:
        return (r - 1) % self.P

    def _rings(self):
        """(name, held(r, t), first buffer index) for each weight ring."""
        rings = [("F", self.forward_held, 0)]
        if self.train:
            rings.append(("B", self.backward_held, self.k))
        return rings

    # program assembly
    def program(self, r: int) -> list[Action]:
        out: list[Action] = self._head(r)
        for t in range(self.n_slots):
            out += self._slot_start(r, t)
            f = self.forward_step(r, t)
            if f is not None:
                out.append(self.action(Op.FORWARD, f[0], mb=f[1], buf=self._buf(0, t)))
            b = self.backward_step(r, t)
            if b is not None:
                out.append(self.action(Op.BACKWARD, b[0], mb=b[1], buf=self._buf(self.k, t), buf2=f"g{t % 2}"))
                out += self._gradient_after_backward(r, t, *b)
        out += self._tail(r)
        return out

    def _buf(self, base: int, t: int) -> str:
        return f"s{base + t % self.k}"

    def _head(self, r: int) -> list[Action]:
        """Slot-0 holdings (fetched from owners), then the first `prefetch` ring receives, then the final-sum receive.

        Owner fetches come first on every rank, so on a pair that carries both an owner fetch and ring traffic the
        sends and receives are posted in the same order.
        """
        out: list[Action] = []
        P = self.P
        for _, held, base in self._rings():
            chunk = held(r, 0)
            owner = ring_owner(chunk, P)
            if owner == r:
                out.append(self.action(Op.COPY_W, chunk, buf=self._buf(base, 0)))
            else:
                out.append(self.action(Op.RECV_W, chunk, peer=owner, buf=self._buf(base, 0)))
            for other in range(P):
                c = held(other, 0)
                if other != r and ring_owner(c, P) == r:
                    out.append(self.action(Op.SEND_W, c, peer=other, buf="own"))
        for t in range(1, min(self.d, self.n_slots - 1) + 1):
            for _, held, base in self._rings():
                if held(r, t) is not None:
                    out.append(self.action(Op.RECV_W, held(r, t), peer=self._prev(r), buf=self._buf(base, t)))
        if self.train and self._receives_final_sum(r) and r != self._next(self._final_sender(r)):
            out.append(self.action(Op.RECV_G, self._own_chunk(r), peer=self._final_sender(r), buf="q2"))
        return out

    def _receives_final_sum(self, r: int) -> bool:
        return self._final_sender(r) != r

    def _own_chunk(self, r: int) -> int:
        return (-r) % self.P

    def _final_sender(self, r: int) -> int:
        """Rank P-1 adds the last share of every chunk, then sends the sum to the chunk's owner."""
        return self.P - 1

    def _slot_start(self, r: int, t: int) -> list[Action]:
        """Release what slot t-1 used, post the receive for slot t+prefetch, send slot t's chunks on."""
        out: list[Action] = []
        for name, held, base in self._rings():
            previous = held(r, t - 1) if t >= 1 else None
            if previous is not None:
                out.append(self.action(Op.RELEASE, previous, buf=self._buf(base, t - 1)))
            ahead = t + self.d
            if t >= 1 and ahead < self.n_slots and held(r, ahead) is not None:
                out.append(self.action(Op.RECV_W, held(r, ahead), peer=self._prev(r), buf=self._buf(base, ahead)))
            current = held(r, t)
            if current is not None and held(self._next(r), t + 1) is not None:
                out.append(self.action(Op.SEND_W, current, peer=self._next(r), buf=self._buf(base, t)))
        if self.train and self.backward_step(r, t) is not None:
            chunk, mb = self.backward_step(r, t)
            if not (r == 0 and mb == 0):  # everyone but the first contributor receives the running sum
                out.append(self.action(Op.RECV_G, chunk, peer=self._prev(r), buf=f"q{t % 2}"))
        return out

    def _gradient_after_backward(self, r: int, t: int, chunk: int, mb: int) -> list[Action]:
        """Add this rank's share into the running sum and pass it on (or to the owner, after the last share)."""
        P, M = self.P, self.M
        first, last = (r == 0 and mb == 0), (r == P - 1 and mb == M - 1)
        acc_buf = f"g{t % 2}" if first else f"q{t % 2}"
        out: list[Action] = []
        if not first:
            out.append(self.action(Op.ADD_G, chunk, buf=acc_buf, buf2=f"g{t % 2}"))
        if not last:
            out.append(self.action(Op.SEND_G, chunk, peer=self._next(r), buf=acc_buf))
        elif ring_owner(chunk, P) == r:
            out.append(self.action(Op.ACC_G, chunk, buf=acc_buf))
        else:
            out.append(self.action(Op.SEND_G, chunk, peer=ring_owner(chunk, P), buf=acc_buf))
        return out

    def _tail(self, r: int) -> list[Action]:
        """Release the last holdings; collect this rank's chunk's final gradient sum.

        The ring successor of the final sender (rank 0) also receives ring sums from it, so it posts the final
        receive last, after every ring receive, to keep that pair's order.
        """
        out: list[Action] = []
        last = self.n_slots - 1  # holdings of earlier slots were released at the start of the next slot
        for _, held, base in self._rings():
            if held(r, last) is not None:
                out.append(self.action(Op.RELEASE, held(r, last), buf=self._buf(base, last)))
        if self.train and self._receives_final_sum(r):
            if r == self._next(self._final_sender(r)):
                out.append(self.action(Op.RECV_G, self._own_chunk(r), peer=self._final_sender(r), buf="q2"))
            out.append(self.action(Op.ACC_G, self._own_chunk(r), buf="q2"))
        return out
