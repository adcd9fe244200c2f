"""Execute one rank's program, driven by the model's own forward and backward.

The engine holds no schedule logic: it walks the program the schedule builder made for this rank. Compute actions
are not run by the engine; they are *requested* by the pipelined unit wrappers (``enter(F, chunk)`` from a unit's
forward, ``enter(B, chunk)`` from its backward). A request executes every communication action up to the next
compute action, checks that it is the one requested, waits until its weights are resident and binds the chunk's
parameters to them. So whatever the user's ``training_step`` does around ``model(x)`` and ``loss.backward()``,
the pipeline runs exactly the validated program.

Waiting follows one rule (the same the validator simulates): before an action touches a buffer, wait for every
earlier posted communication that conflicts with it on that buffer. No async op is read or reused before it is
waited on, and nothing waits earlier than it must.

One refinement keeps the host from stalling on an input that is still in flight. The schedule places a node's
gradient send right behind the reduce that fills its buffer, and a relay's broadcast of a remote chunk one compute
step before the chunk's first use, whatever the inter-node receive before it still needs. Waiting for that input
there would stall the host (and with it compute that does not need the data), so the engine *defers* the operation
instead and posts it the moment its input is ready. On the CPU (gloo) a helper thread waits for that input and posts
the operation as soon as it completes (``watch_inputs``); elsewhere, and as a fallback, the engine looks at every unit
boundary, which inside a long backward step can be a whole transformer block late. Later operations on the same
communicator family (:func:`~lightning_tawpipe.schedule.actions.channel`) queue behind it, keeping the order every
member issues them in. Deferred operations are posted, waiting for their input if need be, as soon as anything else
would block the host or touch their buffers, and before control leaves the model for user code: before the
forward step after which user code runs (the loss), and after every backward pass (``flush_deferred``). So
wherever the host blocks or user code could run a collective, everything before it in the program is posted, as in
the validated order; deferring only moves operations later than their place in the program, never past a wait.
The inputs they wait for (a reduce this rank has posted, a receive whose sender posted it at the start of the
iteration) complete without this rank doing anything more, so a deferred operation never waits on its own host.

A second refinement splits a mirrored chunk's last gradient exchange along its units. In a program that sums the
mirrored chunks' gradients (``XG``), the last backward of such a chunk is followed by its reduce in the node, the
holder's add and the holders' exchange; for chunk 0 nothing computes after them. So at each unit boundary inside
that backward step the engine reduces, adds and exchanges the units already done (their gradients are final), and
the program's ``RG``/``AG``/``XG`` then cover the rest (the chunk's first units). Every rank of a node and every
holder of a rail meets the same unit boundaries, so they issue the same pieces in the same order, and the sums are
the program's, piece by piece: the slow exchange overlaps the chunk's own backward (``unit_slices`` enables it).

In chunk-major order (``Schedule.order == "chunk"``) the engine also drives part of the backward. Every micro-batch
runs through a chunk before the next chunk, so the graph is cut after each chunk's last unit (:meth:`Engine.cut`): a
micro-batch's own ``loss.backward()`` covers its last chunk only, and once every micro-batch has run, the engine runs
the program's remaining backward steps itself (:meth:`Engine.run_cut_backward`), one complete autograd call each. A
backward step marked ``acc`` adds into its gradient buffer instead of zeroing it first: a chunk's backward steps sum
their micro-batches in one buffer, which leaves the rank once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from lightning_tawpipe.runtime.comm import Comm
from lightning_tawpipe.runtime.shard import ChunkLayout, OwnedShard
from lightning_tawpipe.schedule.actions import COMPUTE_OPS, Action, Op, buffers_conflict, channel, deferrable
from lightning_tawpipe.schedule.actions import WEIGHT_OPS, stripe_numel, user_code_follows
from lightning_tawpipe.schedule.program import Schedule


class _Watched:
    """A posted operation whose completion a helper thread waits for, so that what is deferred behind it can be
    posted the moment it is done (:meth:`Engine._watch`).

    Why a thread and not ``is_completed()`` polling or a future: gloo reports a point-to-point operation complete only
    once some thread has waited for it, allows only one wait (a second one blocks until the timeout), and gives it no
    future. So the helper owns the wait, and everyone else waits on this event instead.
    """

    def __init__(self, work) -> None:
        self.work, self.done, self.error = work, threading.Event(), None

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error

    def run(self, then: Callable[[], None]) -> None:
        """The helper thread: wait for the operation, record how it ended, then call ``then``."""
        try:
            self.work.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised by whoever waits on this operation
            self.error = e
        finally:
            self.done.set()
        if self.error is None:
            then()


@dataclass
class _Pending:
    action: Action
    work: object
    reads: set[str]
    writes: set[str]

    def conflicts(self, reads: set[str], writes: set[str]) -> bool:
        """Whether touching these buffers must wait for this operation."""
        return buffers_conflict(reads, writes, self.reads, self.writes)


# communication actions: the Comm method that posts them (None: a striped operation, Engine._post_striped) and the
# lane (communicator set) they travel on
_POSTED = {
    Op.SEND_W: ("isend", "weights"),
    Op.RECV_W: ("irecv", "weights"),
    Op.BCAST_W: ("broadcast", "weights"),
    Op.REDUCE_G: ("reduce", "grads"),
    Op.SEND_G: ("isend", "grads"),
    Op.RECV_G: ("irecv", "grads"),
    Op.SCATTER_W: (None, "weights"),
    Op.RECV_STRIPE_W: (None, "weights"),
    Op.GATHER_W: (None, "weights"),
    Op.REDUCE_SCATTER_G: (None, "grads"),
    Op.SEND_STRIPE_G: (None, "grads"),
    Op.RECV_STRIPE_G: (None, "grads"),
    Op.GATHER_G: (None, "grads"),
}

# actions that move or combine gradients: they cover only a chunk's trainable prefix (see ChunkLayout)
_GRADIENT_OPS = (Op.REDUCE_G, Op.SEND_G, Op.RECV_G, Op.ACC_G, Op.ADD_G, Op.EXCHANGE_G, Op.REDUCE_SCATTER_G,
                 Op.SEND_STRIPE_G, Op.RECV_STRIPE_G, Op.GATHER_G)


@dataclass(frozen=True)
class _SavedWeight:
    """What autograd keeps for a saved view of a working buffer: the chunk and the view's geometry."""

    chunk: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class Engine:
    """Runs TawPipe/WeiPipe programs for this rank over ``comm``."""

    def __init__(
        self,
        comm: Comm,
        layout: ChunkLayout,
        shard: OwnedShard,
        build_schedule: Callable[[bool, int, bool], Schedule],
        compute_dtype: torch.dtype,
        device: torch.device,
        activation_checkpointing: bool = False,
        mirrors: dict[int, OwnedShard] | None = None,
        watch_inputs: bool = False,
        mirrored_chunks: bool = False,
        unit_slices: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.comm, self.layout = comm, layout
        # every chunk this rank holds: the one it owns, and those it mirrors (``replicate_first_chunk``)
        self.shards = {shard.chunk: shard, **(mirrors or {})}
        self.rank = comm.rank
        self._build_schedule = build_schedule
        self._schedules: dict[tuple[bool, int, bool], Schedule] = {}
        # mirrored chunks whose gradients the holders summed (XG) since the strategy last asked, and the exchanges of
        # this iteration still to finish: (accumulator, the tensor on the wire when the traffic dtype differs)
        self.exchanged: set[int] = set()
        self.mirrored_chunks = mirrored_chunks  # the topology mirrors chunks (this rank may hold none of them)
        self._exchanges: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per unit, (chunk, start, end) of its gradients in its chunk's gradient prefix; with them, the last backward
        # of an exchanged chunk sends the finished units' gradients at each unit boundary (module doc)
        self.unit_slices = unit_slices
        self._schedule: Schedule | None = None  # the running iteration's
        self._gradient_end: dict[int, int] = {}  # chunk -> end of what the program's gradient actions still cover
        self.compute_dtype, self.device = compute_dtype, device
        # what a holder serves its chunks from: the masters themselves, or copies in the compute (traffic) dtype
        self._own = {c: s.weights if s.weights.dtype == compute_dtype else s.weights.to(compute_dtype)
                     for c, s in self.shards.items()}
        self.activation_checkpointing = activation_checkpointing
        self.token = torch.zeros((), device=device, requires_grad=True)
        self._buffers: dict[str, torch.Tensor] = {}
        self._program: tuple[Action, ...] | None = None
        self._pc = 0
        self._current: Action | None = None
        self._pending: list[_Pending] = []
        self._deferred: list[Action] = []  # operations posted once their input is ready (see the module doc)
        # post deferred operations from helper threads the moment their input completes (see _watch); off on CUDA,
        # where waiting on a work only orders streams, so a helper would post at once
        self.watch_inputs = watch_inputs
        self._lock = threading.RLock()  # the host thread and the helpers post, wait and edit the lists under it
        self._helper_error: BaseException | None = None
        self._bound: dict[str, int] = {}  # slot -> chunk whose module parameters point into it
        self._grad_chunk: int | None = None  # chunk whose parameters' .grad point into a gradient buffer
        # chunk-major order: per (chunk, micro-batch), the output of the chunk's last unit and the leaf that stood in
        # for it as the next chunk's input (see :meth:`cut`)
        self._cuts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # set by MicrobatchRunner while micro-batches run interleaved in threads (see microbatch.py)
        self.gate: Callable[[int | None], None] | None = None
        self.thread_microbatch: Callable[[], int | None] = lambda: None

    # -- public API -----------------------------------------------------------------------------------------------
    def schedule(self, train: bool, n_microbatches: int, exchange: bool = False) -> Schedule:
        key = (train, n_microbatches, exchange)
        if key not in self._schedules:
            self._schedules[key] = self._build_schedule(train, n_microbatches, exchange)
        return self._schedules[key]

    @property
    def active(self) -> bool:
        return self._program is not None

    @property
    def training_iteration(self) -> bool:
        """Whether the running iteration has backward steps."""
        return self._program is not None and self._train

    def begin(self, train: bool, n_microbatches: int, ends_step: bool = False) -> None:
        """Start an iteration: ``n_microbatches`` forward (and, if ``train``, backward) passes will follow.
        ``ends_step``: the optimizer steps right after it, so mirrored chunks' gradients are summed inside it."""
        if self._program is not None:
            raise RuntimeError("A TawPipe iteration is already running; each step must finish before the next.")
        self._raise_helper_error()
        schedule = self.schedule(train, n_microbatches, exchange=ends_step and train and self.mirrored_chunks)
        self._ensure_buffers(schedule)
        for chunk, own in self._own.items():
            if own is not self.shards[chunk].weights:  # the optimizer stepped the masters since the last iteration
                own.copy_(self.shards[chunk].weights)
        self._program, self._pc, self._current = schedule.program(self.rank), 0, None
        self._train = train
        self._cuts.clear()
        self._schedule = schedule
        self._gradient_end = {}

    def enter(self, op: Op, chunk: int, unit: int | None = None, mb: int | None = None) -> None:
        """Called by a unit before computing: make ``chunk`` resident for ``op`` (no-op if already current).
        ``unit``: the unit's index, which a backward names so that finished units can be exchanged (module doc).
        ``mb``: the micro-batch, where the caller knows it (else the running micro-batch thread's, if any)."""
        cur, mb = self._current, self.thread_microbatch() if mb is None else mb
        if self._deferred:
            with self._lock:  # a unit boundary: post the deferred operations whose input is ready
                self._post_deferred(block=False)
        if cur is not None and cur.op is op and cur.chunk == chunk and (mb is None or cur.mb == mb):
            if unit is not None and op is Op.BACKWARD and self._exchanged_last_backward(cur):
                self._exchange_finished_units(cur, unit)
            return
        if self._program is None:
            raise RuntimeError(
                "The pipelined model was called outside a TawPipe step. Its weights are sharded across ranks, so "
                "every rank must run the model together inside training_step/validation_step/test_step/"
                "predict_step (or gather a full copy first with `strategy.full_state_dict()`)."
            )
        while self.gate is not None and (nxt := self.peek_compute()) is not None and nxt.mb != mb:
            self.gate(nxt.mb)  # not under the lock: the micro-batch that takes over enters the engine itself
        with self._lock:
            self._raise_helper_error()
            action = self._run_until_compute()
            if action is None or action.op is not op or action.chunk != chunk:
                expected = "the end of the iteration" if action is None else str(action)
                raise RuntimeError(
                    f"TawPipe schedule mismatch on rank {self.rank}: the model asked for {op.value}{chunk} but the "
                    f"schedule expects {expected}. Each micro-batch must run the model forward exactly once (and "
                    f"backward once when training), through every unit in order."
                )
            self._start_compute(action)

    @property
    def cuts_graph(self) -> bool:
        """Whether the running iteration cuts the autograd graph between chunks: a training iteration in chunk-major
        order with several micro-batches (:meth:`cut`)."""
        s = self._schedule
        return self._program is not None and self._train and s.order == "chunk" and s.n_microbatches > 1

    def cut(self, chunk: int, out: torch.Tensor) -> torch.Tensor:
        """Chunk-major order: cut the graph after ``chunk``'s last unit. The next chunk gets a leaf that stands in
        for ``out``; the engine keeps both and runs this chunk's backward itself (:meth:`run_cut_backward`).

        Why: in chunk-major order the backward of chunk ``c`` runs for every micro-batch before chunk ``c - 1``'s. If
        each micro-batch's ``loss.backward()`` ran through the whole model, every micro-batch's backward would pause at
        each chunk boundary while the others caught up, several backward passes in flight at once. On CUDA those all
        run on the device's one autograd thread, which a paused pass would block. With the cut, a micro-batch's own
        backward ends at its last chunk's input, and every other backward step is one complete autograd call."""
        if not out.requires_grad:
            return out
        leaf = out.detach().requires_grad_()
        self._cuts[(chunk, self._current.mb)] = (out, leaf)
        return leaf

    def run_cut_backward(self) -> None:
        """Chunk-major order, after every micro-batch's ``loss.backward()`` ended at its last chunk's input: run the
        backward steps the program has left (every micro-batch through the next chunk down, and so on), each from the
        output kept by :meth:`cut` with the gradient its successor left on the leaf."""
        while self._cuts and (nxt := self.peek_compute()) is not None and nxt.op is Op.BACKWARD:
            out, leaf = self._cuts.pop((nxt.chunk, nxt.mb), (None, None))
            if out is None or leaf.grad is None:
                raise RuntimeError(
                    f"TawPipe rank {self.rank}: the schedule's next step is {nxt}, but micro-batch {nxt.mb}'s loss "
                    f"did not reach chunk {nxt.chunk}'s output. In chunk-major order every micro-batch's loss must "
                    f"depend on the output of the model's last unit, through every chunk."
                )
            self.enter(Op.BACKWARD, nxt.chunk, mb=nxt.mb)
            torch.autograd.backward(out, leaf.grad)
        self.flush_deferred()  # back to user code

    def flush_deferred(self) -> None:
        """Post every deferred operation, waiting for its input if need be. Called after each backward pass: user
        code may run a collective next, and no peer may then be left waiting on an operation not yet posted."""
        with self._lock:
            self._raise_helper_error()
            if self._deferred:
                self._post_deferred(block=True)

    def peek_compute(self) -> Action | None:
        """The next compute action of the running program, without executing anything."""
        if self._program is None:
            return None
        return next((a for a in self._program[self._pc :] if a.op in COMPUTE_OPS), None)

    def interleaves_microbatches(self) -> bool:
        """Whether the running program alternates between micro-batches (then steps must run in threads)."""
        mbs = [a.mb for a in self._program or () if a.op in COMPUTE_OPS]
        return any(b < a for a, b in zip(mbs, mbs[1:]))

    @contextmanager
    def weight_saving_hooks(self):
        """Autograd keeps "chunk c's weights at (size, stride, offset)" instead of a working buffer's storage."""
        slots = {self._buffers[n].untyped_storage().data_ptr(): n for n in self._buffers if n.startswith("s")}

        def pack(t: torch.Tensor):
            slot = slots.get(t.untyped_storage().data_ptr()) if t.device == self.device else None
            if slot is None:
                return t
            return _SavedWeight(self._bound[slot], t.size(), t.stride(), t.storage_offset())

        def unpack(x):
            if not isinstance(x, _SavedWeight):
                return x
            cur = self._current
            if cur is None or cur.chunk != x.chunk:
                raise RuntimeError(f"chunk {x.chunk}'s weights were needed outside its backward step ({cur})")
            return self._buffers[cur.buf].as_strided(x.size, x.stride, x.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def end(self) -> None:
        """Finish the iteration: run the remaining actions and wait for all communication."""
        with self._lock:
            self._end()

    def _end(self) -> None:
        if self._program is None:
            return
        self._current = None
        self._detach_grads()
        while self._pc < len(self._program):
            action = self._program[self._pc]
            self._pc += 1
            if action.op in COMPUTE_OPS:
                if self._train:
                    self._program = None
                    raise RuntimeError(
                        f"TawPipe step ended before the schedule's {action} on rank {self.rank}: every micro-batch "
                        "must run forward and backward through the whole model."
                    )
                continue  # eval: a step that did not call the model still serves and relays weights
            self._execute(action)
        self.flush_deferred()
        for pending in self._pending:
            self.comm.wait(pending.work, f"drain:{pending.action.op.value}")
        self._pending.clear()
        self._finish_exchanges()
        self._gradient_end.clear()
        self._cuts.clear()
        self._program = None

    # -- internals ------------------------------------------------------------------------------------------------
    def _ensure_buffers(self, schedule: Schedule) -> None:
        n = self.layout.max_numel
        G = schedule.topology.group_size
        # slots and gradient buffers hold whole stripes (a chunk's size rounded up to G): a striped chunk is
        # all-gathered, and its gradient reduce-scattered and gathered, in place
        padded = stripe_numel(n, G) * G
        wanted = {f"s{i}": (self.compute_dtype, padded) for i in range(schedule.n_slots)}
        # gradients are produced, reduced and sent in the compute dtype; owners accumulate them in the master dtype
        wanted.update({f"g{i}": (self.compute_dtype, padded)
                       for i in range(schedule.n_grad_buffers if schedule.train else 0)})
        wanted.update({f"q{i}": (self.compute_dtype, padded)
                       for i in range(schedule.n_recv_buffers if schedule.train else 0)})
        wanted.update({f"r{i}": (self.compute_dtype, padded // G) for i in range(schedule.n_stripe_buffers)})
        if schedule.striped:  # this rank's stripe of every chunk its node owns (and serves to other nodes)
            node = schedule.topology.group_of(self.rank)
            wanted.update({f"t{c}": (self.compute_dtype, stripe_numel(self.layout.numel[c], G))
                           for c, o in enumerate(schedule.owners)
                           if c >= len(schedule.mirrors) and schedule.topology.group_of(o) == node})
        for name, (dtype, size) in wanted.items():
            if name not in self._buffers or self._buffers[name].numel() < size:
                if self._bound.pop(name, None) is not None:
                    raise RuntimeError(f"weight slot {name} was resized while a chunk is bound to it")
                self._buffers[name] = torch.empty(size, dtype=dtype, device=self.device)

    def _stripe(self, buf: str, size: int, local: int | None = None) -> torch.Tensor:
        """Stripe ``local`` (default: this rank's) of ``size`` elements in buffer ``buf``: a chunk's weights
        (:meth:`_weight_stripe_size`) or its gradient (:meth:`_grad_stripe_size`)."""
        local = self._schedule.topology.local_index(self.rank) if local is None else local
        return self._buffers[buf][local * size:(local + 1) * size]

    def _weight_stripe_size(self, chunk: int) -> int:
        return stripe_numel(self.layout.numel[chunk], self._schedule.topology.group_size)

    def _grad_stripe_size(self, chunk: int) -> int:
        """A gradient stripe covers the chunk's trainable prefix only (a frozen chunk has none)."""
        return stripe_numel(self.layout.n_trainable[chunk], self._schedule.topology.group_size)

    def _stripes_of_own(self, chunk: int) -> list[torch.Tensor]:
        """The owner's copy of ``chunk`` cut into the node's stripes, for the scatter; the last is padded (a copy)."""
        G = self._schedule.topology.group_size
        size, own = self._weight_stripe_size(chunk), self._own[chunk]
        pieces = list(own.split(size))
        if len(pieces) < G or pieces[-1].numel() < size:
            padded = torch.zeros(G * size, dtype=own.dtype, device=own.device)
            padded[: own.numel()].copy_(own)
            pieces = list(padded.split(size))
        return pieces

    def _view(self, buf: str, chunk: int) -> torch.Tensor:
        if buf == "own":
            return self._own[chunk]
        if buf[0] == "t":  # a stripe buffer: exactly one stripe
            return self._buffers[buf]
        return self._buffers[buf][: self.layout.numel[chunk]]

    def _grad_view(self, buf: str, chunk: int) -> torch.Tensor:
        return self._buffers[buf][: self._gradient_end.get(chunk, self.layout.n_trainable[chunk])]

    def _run_until_compute(self) -> Action | None:
        program = self._program
        while self._pc < len(program):
            action = program[self._pc]
            self._pc += 1
            if action.op in COMPUTE_OPS:
                return action
            self._execute(action)
        return None

    def _start_compute(self, action: Action) -> None:
        if action.op is Op.FORWARD and user_code_follows(self._program, self._pc - 1):  # pc is past ``action``
            # once this forward step returns, user code (the loss, a logging collective) runs before the engine is
            # called again; between two forward steps of one micro-batch only the model's own forward runs
            self.flush_deferred()
        reads, writes = action.reads_writes(self.rank)
        with record_function(f"TAWPIPE:wait-for:{action}"):
            self._wait_conflicts(reads, writes)
        if self._bound.get(action.buf) != action.chunk:
            self.layout.bind(action.chunk, self._view(action.buf, action.chunk))
            self._bound[action.buf] = action.chunk
        self._detach_grads()
        if action.op is Op.BACKWARD:
            if not action.acc:  # a gradient run's later steps add to its earlier micro-batches' gradients
                self._grad_view(action.buf2, action.chunk).zero_()
                if self._schedule.striped:  # the pad of the last stripe is summed and sent too: keep it finite
                    G = self._schedule.topology.group_size
                    self._buffers[action.buf2][self.layout.n_trainable[action.chunk]:
                                               G * self._grad_stripe_size(action.chunk)].zero_()
            grad = self._view(action.buf2, action.chunk)
            for e, view in zip(self.layout.entries[action.chunk], self.layout.views(action.chunk, grad)):
                if e.param.requires_grad:
                    e.param.grad = view
            self._grad_chunk = action.chunk
        self._current = action

    def _detach_grads(self) -> None:
        """Gradients go to the buffer only during their chunk's backward step."""
        if self._grad_chunk is not None:
            for e in self.layout.entries[self._grad_chunk]:
                e.param.grad = None
            self._grad_chunk = None

    def _wait_conflicts(self, reads: set[str], writes: set[str]) -> None:
        """The waiting rule. Before it blocks, or touches a deferred operation's buffers, every deferred one is
        posted."""
        if self._deferred and (self._conflicts(reads, writes) or any(
                buffers_conflict(reads, writes, *d.reads_writes(self.rank)) for d in self._deferred)):
            self._post_deferred(block=True)
        self._wait_for(reads, writes)

    def _conflicts(self, reads: set[str], writes: set[str]) -> bool:
        """Whether a posted, unfinished operation conflicts with touching these buffers."""
        return any(p.conflicts(reads, writes) and not p.work.is_completed() for p in self._pending)

    def _wait_for(self, reads: set[str], writes: set[str]) -> None:
        keep = []
        for p in self._pending:
            if p.conflicts(reads, writes):
                self.comm.wait(p.work, p.action.op.value)
            else:
                keep.append(p)
        self._pending = keep

    def _must_defer(self, a: Action, reads: set[str], writes: set[str]) -> bool:
        """Defer ``a`` if its communicator family has a deferred operation queued (order), or if it is deferrable
        and its input is still in flight."""
        if any(channel(d) == channel(a) for d in self._deferred):
            return True
        return deferrable(a, self.rank) and self._conflicts(reads, writes)

    def _post_deferred(self, block: bool) -> None:
        """Post deferred operations in program order. With ``block``, all of them, waiting for their inputs; without,
        those whose input is ready and that no earlier held one precedes (same family, or a buffer they share)."""
        held: list[Action] = []
        queue = list(self._deferred)
        try:
            while queue:
                a = queue[0]
                reads, writes = a.reads_writes(self.rank)
                if not block and (self._conflicts(reads, writes) or any(
                        channel(h) == channel(a) or buffers_conflict(reads, writes, *h.reads_writes(self.rank))
                        for h in held)):
                    held.append(queue.pop(0))
                    continue
                self._wait_for(reads, writes)
                self._post(a, reads, writes)
                queue.pop(0)
        finally:  # whatever was posted is off the list even if a later post fails
            self._deferred = held + queue
        for a in self._deferred:  # now held by an operation just posted: watch that one too
            self._watch(*a.reads_writes(self.rank))

    def _watch(self, reads: set[str], writes: set[str]) -> None:
        """Have a helper thread wait for each unfinished input of an operation just deferred and post what is ready
        the moment it completes, instead of at the next unit boundary (a whole block of backward, 37 ms on the
        benchmark, by which time a gradient send over a slow link is that much later)."""
        if not self.watch_inputs:
            return
        for p in self._pending:
            if p.conflicts(reads, writes) and not isinstance(p.work, _Watched) and not p.work.is_completed():
                p.work = watched = _Watched(p.work)
                threading.Thread(target=watched.run, args=(self._post_ready,), daemon=True,
                                 name=f"tawpipe-watch-{p.action}").start()

    def _post_ready(self) -> None:
        """A helper thread, after an input completed: post the deferred operations that are ready now."""
        with self._lock:
            if not self._deferred:
                return
            try:
                self._post_deferred(block=False)
            except BaseException as e:  # noqa: BLE001 - the host thread raises it at its next call
                self._helper_error = e

    def _raise_helper_error(self) -> None:
        if self._helper_error is not None:
            error, self._helper_error = self._helper_error, None
            raise RuntimeError(f"TawPipe rank {self.rank}: posting a deferred operation failed: {error}") from error

    def _execute(self, a: Action) -> None:
        with record_function(f"TAWPIPE:{a}"):  # profiler traces line up with the schedule IR
            self._execute_action(a)

    def _execute_action(self, a: Action) -> None:
        reads, writes = a.reads_writes(self.rank)
        op = a.op
        if op in _GRADIENT_OPS and self.layout.n_trainable[a.chunk] == 0:
            return  # a frozen chunk: no gradient to move (every rank's layout agrees, so peers skip it too)
        if op in _POSTED and self._must_defer(a, reads, writes):
            self._deferred.append(a)  # its input is in flight: post it when ready, not by blocking here
            self._watch(reads, writes)
            return
        self._wait_conflicts(reads, writes)
        if op in _POSTED:
            self._post(a, reads, writes)
        elif op is Op.RELEASE:
            if self._bound.get(a.buf) == a.chunk:
                self.layout.unbind(a.chunk)
                del self._bound[a.buf]
        elif op is Op.COPY_W:
            self._view(a.buf, a.chunk).copy_(self.shards[a.chunk].weights)
        elif op is Op.ACC_G:
            view = self._grad_view(a.buf, a.chunk)
            self.shards[a.chunk].grad_acc[: view.numel()].add_(view)
        elif op is Op.EXCHANGE_G:
            self._pending.append(_Pending(a, self._post_exchange(a.chunk), reads, writes))
        elif op is Op.ADD_G:
            self._grad_view(a.buf, a.chunk).add_(self._grad_view(a.buf2, a.chunk))
        else:
            raise RuntimeError(f"the engine cannot execute {a}")

    # -- mirrored chunks: the holders' sum of their gradients -------------------------------------------------------
    def take_exchanged(self) -> set[int]:
        """The mirrored chunks whose gradients the holders summed (``XG``) since the last call; forgets them."""
        with self._lock:
            exchanged, self.exchanged = self.exchanged, set()
        return exchanged

    def sum_mirrored_gradients(self, chunks: list[int]) -> None:
        """Between iterations: sum the gradients of these mirrored chunks with their other holders, last chunk first
        (the order the programs' ``XG`` use), and wait (counted into the next step's figures). Each holder must list
        the same chunks of a rail."""
        start = time.perf_counter()
        for chunk in sorted(chunks, reverse=True):
            if self.layout.n_trainable[chunk]:  # a frozen chunk: no gradient (every holder skips it)
                self._post_exchange(chunk, between_steps=True).wait()
        self.comm.stats.carried_wait_s += time.perf_counter() - start
        self._finish_exchanges()

    def _exchanged_last_backward(self, action: Action) -> bool:
        """Whether ``action`` is the last backward of a mirrored chunk that this iteration's program exchanges."""
        s = self._schedule
        return (s.exchanges and self.unit_slices is not None and action.chunk < len(s.mirrors)
                and action.mb == s.n_microbatches - 1)

    def _exchange_finished_units(self, current: Action, unit: int) -> None:
        """Inside the exchanged last backward of ``current.chunk``, at the boundary before ``unit``: the units after
        it are done. Reduce their gradients in the node now; a holder waits for that, adds them and posts the holders'
        exchange of them, which then runs while the backward goes on (module doc)."""
        chunk = current.chunk
        end = self._gradient_end.get(chunk, self.layout.n_trainable[chunk])
        start = min((s for c, s, e in self.unit_slices[unit + 1:] if c == chunk and e > s), default=end)
        if start >= end:
            return
        topo = self._schedule.topology
        root = topo.rank(topo.group_of(self.rank), topo.local_index(self._schedule.owners[chunk]))
        gradient = self._buffers[current.buf2][start:end]
        with self._lock:
            self._gradient_end[chunk] = start  # the program's actions now cover only the first units
            reduce = Action(Op.REDUCE_G, chunk, peer=root, buf=current.buf2)
            work = self.comm.reduce(gradient, root, "grads") if topo.group_size > 1 else None
            if self.rank != root:
                self._pending.append(_Pending(reduce, work, {current.buf2}, {current.buf2}))
                return
        if work is not None:
            self.comm.wait(work, "piece")  # not under the lock: helpers may post deferred operations meanwhile
        with self._lock:
            self.shards[chunk].grad_acc[start:end].add_(gradient)
            # its own buffer name: the program's add and exchange of the first units need not wait for it
            piece = f"acc{chunk}[{start}:{end}]"
            exchange = Action(Op.EXCHANGE_G, chunk, buf=piece)
            self._pending.append(_Pending(exchange, self._post_exchange(chunk, start=start, end=end), set(), {piece}))

    def _post_exchange(self, chunk: int, between_steps: bool = False, start: int = 0, end: int | None = None):
        """Post the all-reduce of ``chunk``'s accumulator (or of ``[start:end]`` of it; by default what the program's
        gradient actions cover) over its holders' rail. It runs in the compute dtype, the precision every other
        gradient crosses nodes in (under bf16-mixed, half the bytes); an all-reduce gives every member the same
        result, so owner and mirrors stay identical."""
        if end is None:
            end = self._gradient_end.get(chunk, self.layout.n_trainable[chunk])
        acc = self.shards[chunk].grad_acc[start:end]
        wire = acc if acc.dtype == self.compute_dtype else acc.to(self.compute_dtype)
        self._exchanges.append((acc, wire))
        if not between_steps:  # what the strategy asked for itself is not reported back to it (take_exchanged)
            self.exchanged.add(chunk)
        return self.comm.all_reduce_rail(wire, between_steps)

    def _finish_exchanges(self) -> None:
        """After the exchanges were waited for: copy sums made in another dtype back into the accumulators."""
        for acc, wire in self._exchanges:
            if wire is not acc:
                acc.copy_(wire)
        self._exchanges.clear()

    def _post(self, a: Action, reads: set[str], writes: set[str]) -> None:
        method, lane = _POSTED[a.op]
        if method is None:
            work = self._post_striped(a, lane)
        else:
            view = self._grad_view(a.buf, a.chunk) if a.op in _GRADIENT_OPS else self._view(a.buf, a.chunk)
            work = getattr(self.comm, method)(view, a.peer, lane)
        self._pending.append(_Pending(a, work, reads, writes))

    def _post_striped(self, a: Action, lane: str):
        """Post an operation on stripes (``stripe``): each rank's ``1 / G`` part of a chunk's weights or gradient,
        cut at the same offsets on every rank of the node (stripe ``k`` at ``k * size``; slots and gradient buffers
        are padded to whole stripes, so the collectives work in place)."""
        G = self._schedule.topology.group_size
        if a.op is Op.SCATTER_W:
            pieces = self._stripes_of_own(a.chunk) if a.peer == self.rank else None
            return self.comm.scatter(self._view(a.buf, a.chunk), pieces, a.peer, lane)
        size = self._weight_stripe_size(a.chunk) if a.op in WEIGHT_OPS else self._grad_stripe_size(a.chunk)
        if a.op is Op.RECV_STRIPE_W:
            return self.comm.irecv(self._stripe(a.buf, size), a.peer, lane)
        if a.op is Op.GATHER_W:
            return self.comm.all_gather(self._buffers[a.buf][: size * G], self._stripe(a.buf, size), lane)
        if a.op is Op.REDUCE_SCATTER_G:
            return self.comm.reduce_scatter(self._stripe(a.buf, size), self._buffers[a.buf][: size * G], lane)
        if a.op is Op.SEND_STRIPE_G:
            return self.comm.isend(self._stripe(a.buf, size), a.peer, lane)
        received = self._buffers[a.buf][:size]  # a stripe buffer r<i>
        if a.op is Op.RECV_STRIPE_G:
            return self.comm.irecv(received, a.peer, lane)
        out = [self._stripe(a.buf2, size, k) for k in range(G)] if a.peer == self.rank else None
        return self.comm.gather(received, out, a.peer, lane)  # GATHER_G: onto the owner's buffer, whole
