"""Simulate every rank's program together, with no process group, and check the schedule is right.

The simulator executes programs with the engine's semantics: communication is posted asynchronously and completes
when matched (a P2P send with the receive of the same pair and lane, in order; a collective when every member of the
node has posted it); an action waits for earlier conflicting actions on the same buffer. It tracks *what* each
buffer holds, so it checks more than "no deadlock":

* every compute step finds the right chunk's weights, copied from that chunk's owner, in its slot (striped: each
  rank's stripe scattered from the owner, received from the rank of the same local index, and all-gathered);
* a slot is never overwritten while it holds a chunk that was not released, and all are released at the end;
* P2P pairs and collectives agree on chunk, root and kind;
* striped gradients: a node's reduce-scatter leaves each rank its stripe of the sum, each stripe travels to the rank
  of its local index, and the gather onto the owner finds every stripe with the same contributions;
* every owner's accumulator ends with exactly one gradient contribution from every (rank, micro-batch) (a mirrored
  chunk: its holders' accumulators together, each contribution in exactly one; after the holders' exchange ``XG``,
  every holder's, and none added after it; the holders of a rail exchange the same chunk at each turn);
* nothing is left unmatched, and no rank is stuck (a deadlock is reported with each rank's blocked action).

``with_user_barriers`` adds a world-wide collective at every micro-batch's loss and end, modelling user code that
calls ``self.log(..., sync_dist=True)`` in the middle of the pipeline; schedules must survive it.

Every action of every rank is executed; what keeps 1024 ranks (8 M actions) to seconds is the representation:

* each action object is decoded once into a small tuple (kind, buffer numbers, the weights it expects), cached on
  the object; builders share objects between the ranks of a node, so most are decoded once for all of them;
* buffers are small integers; per rank, a list of contents and a list of ``busy`` counters,
  ``W * (posted, unfinished ops writing the buffer) + (... reading it)``, with ``W`` above any count of readers:
  an action that writes a buffer waits while its counter is non-zero, one that reads it while it is ``>= W``;
* a weight content is one interned ``("W", chunk)`` tuple per chunk, so "the right weights" is an identity test;
  a gradient content ``("G", chunk, mask)`` holds its contributions as the bits ``(mb + 1) * P + rank`` of an int,
  so sums and the double-count test are ``|`` and ``&``;
* queues hold the posted action objects, keyed by small ints; a queue is matched only once both sides (every
  member) have posted, and a collective posted by the same object on every member completes in one loop.

Events run in the order of the plain simulation (ranks run FIFO as they wake; after each run the queues that can
match are matched in key order), so a broken schedule fails with the same first error as the plain simulation did
(one exception: a P2P peer outside the world, which could never match, is refused when it is posted).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import replace

from lightning_tawpipe.schedule.actions import Action, Op, is_stripe
from lightning_tawpipe.schedule.program import Schedule, gc_paused


class ScheduleError(RuntimeError):
    """A schedule is inconsistent; the message names the rank, the action and the reason."""


def with_user_barriers(schedule: Schedule) -> Schedule:
    """The same schedule with a world collective wherever the user's code runs between compute steps: after each
    last-chunk forward (the loss), after each chunk-0 backward (sample-major: the next micro-batch's
    ``training_step`` begins, or the step ends), and after each compute step that a chunk-0 forward follows
    (chunk-major: the next micro-batch's ``training_step`` begins there). The engine runs the actions between two
    compute steps only when the second is asked for, so user code sits right after the first."""
    last = schedule.n_chunks - 1
    barrier = Action(Op.BARRIER)
    forward, backward = Op.FORWARD, Op.BACKWARD
    programs = []
    with gc_paused():
        for program in schedule.programs:
            out: list[Action] = []
            append = out.append
            after_compute = -1  # where in ``out`` the last compute step (and its barrier) ends
            for a in program:
                op = a.op
                if op is forward and a.chunk == 0 and after_compute > 0 and out[after_compute - 1] is not barrier:
                    out.insert(after_compute, barrier)
                append(a)
                if (op is forward and a.chunk == last) or (op is backward and a.chunk == 0):
                    append(barrier)
                if op is forward or op is backward:
                    after_compute = len(out)
            programs.append(tuple(out))
    return replace(schedule, programs=tuple(programs))


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` if the schedule is wrong in any way listed in the module docstring."""
    with gc_paused():
        _Simulator(schedule).run()


# -- the decoded form of an action ------------------------------------------------------------------------------------

# kinds, in the order the simulator tests them (the P2P ones consecutive: `kind <= _UG` once the others are out)
(_BW, _X, _F, _RG, _B, _SW, _RW, _SG, _QG, _RT, _TG, _UG, _CW, _AG, _GA, _BAR, _XG, _PW, _AW, _YG, _GG,
 _UNKNOWN) = range(22)
# op -> (kind, lane, posted op reads its buffer): lane "W" = 1 > "G" = 0 keeps the key order of (src, dst, lane);
# a P2P send reads its buffer, a receive writes it; a broadcast's root reads it, other members write it
_KIND = {
    Op.BCAST_W.value: (_BW, 1, 0), Op.RELEASE.value: (_X, -1, 0), Op.FORWARD.value: (_F, -1, 0),
    Op.REDUCE_G.value: (_RG, 0, 1), Op.BACKWARD.value: (_B, -1, 0), Op.SEND_W.value: (_SW, 1, 1),
    Op.RECV_W.value: (_RW, 1, 0), Op.SEND_G.value: (_SG, 0, 1), Op.RECV_G.value: (_QG, 0, 0),
    Op.COPY_W.value: (_CW, -1, 0), Op.ACC_G.value: (_AG, -1, 0), Op.ADD_G.value: (_GA, -1, 0),
    Op.BARRIER.value: (_BAR, -1, 0), Op.EXCHANGE_G.value: (_XG, -1, 0), Op.RECV_STRIPE_W.value: (_RT, 1, 0),
    Op.SCATTER_W.value: (_PW, 1, 0), Op.GATHER_W.value: (_AW, 1, 0), Op.SEND_STRIPE_G.value: (_TG, 0, 1),
    Op.RECV_STRIPE_G.value: (_UG, 0, 0), Op.REDUCE_SCATTER_G.value: (_YG, 0, 0), Op.GATHER_G.value: (_GG, 0, 0),
}
_STRIPE_RECEIVES = (Op.RECV_STRIPE_W, Op.RECV_STRIPE_G)

_BUFFER_IDS: dict[str, int] = {"own": 0, "": 1}  # every buffer name seen -> a small int (stable for the process)
_BUFFER_NAMES: list[str] = ["own", ""]
_WEIGHTS: dict[int, tuple] = {}  # chunk -> its one ("W", chunk) content tuple
_STRIPES: dict[tuple[int, int], tuple] = {}  # (chunk, local index) -> its one ("WS", chunk, local index) content
_REGISTER = threading.Lock()  # the tables above are shared by every validation in the process


def _buffer_id(name: str) -> int:
    with _REGISTER:
        i = _BUFFER_IDS.get(name)
        if i is None:
            i = _BUFFER_IDS[name] = len(_BUFFER_NAMES)
            _BUFFER_NAMES.append(name)
        return i


def _weights(chunk: int) -> tuple:
    with _REGISTER:
        return _WEIGHTS.setdefault(chunk, ("W", chunk))


def _stripe(chunk: int, local: int) -> tuple:
    """The content "stripe ``local`` of chunk ``chunk``'s weights" (what a rank of that local index holds in ``t<c>``
    after the scatter, and in its part of a slot after its stripe receive)."""
    with _REGISTER:
        return _STRIPES.setdefault((chunk, local), ("WS", chunk, local))


def _decode(a: Action) -> tuple:
    """``(kind, buf id, buf2 id, chunk, peer, ("W", chunk), mb + 1, lane, is_send)``, cached on the action."""
    try:
        kind, lane, reads = _KIND[a.op._value_]
        code = (kind, _BUFFER_IDS[a.buf], _BUFFER_IDS[a.buf2], a.chunk, a.peer, _WEIGHTS[a.chunk],
                a.mb + 1 if a.mb >= -1 else 0, lane, reads)
    except (KeyError, AttributeError):  # a name or chunk seen for the first time, or not an Op
        kind, lane, reads = _KIND.get(getattr(a.op, "_value_", None), (_UNKNOWN, -1, 0))
        code = (kind, _buffer_id(a.buf), _buffer_id(a.buf2), a.chunk, a.peer, _weights(a.chunk),
                a.mb + 1 if a.mb >= -1 else 0, lane, reads)
    _set_sim(a, code)
    return code


_set_sim = Action._sim.__set__  # the slot's own setter: the cache is not part of the frozen value


def _bits_to_pairs(mask: int, P: int) -> list[tuple[int, int]]:
    """The (rank, micro-batch) contributions in a gradient mask, sorted."""
    out, i = [], 0
    while mask:
        if mask & 1:
            out.append((i % P, i // P - 1))
        mask >>= 1
        i += 1
    return sorted(out)


def _show(content: object, P: int) -> object:
    """A buffer content as the messages print it: gradients with their set of (rank, micro-batch) contributions."""
    if isinstance(content, tuple) and len(content) == 3 and content[0] == "G":
        return ("G", content[1], frozenset(_bits_to_pairs(content[2], P)))
    if isinstance(content, tuple) and len(content) == 4 and content[0] == "GS":  # (.., chunk, local index, mask)
        return ("GS", content[1], content[2], frozenset(_bits_to_pairs(content[3], P)))
    return content


class _Simulator:
    def __init__(self, schedule: Schedule) -> None:
        self.s = schedule
        self.topo = schedule.topology
        self.world = P = self.topo.world_size
        self.G = self.topo.group_size
        self.programs = schedule.programs
        for i in range(schedule.n_slots):
            _buffer_id(f"s{i}")
        for i in range(schedule.n_grad_buffers):
            _buffer_id(f"g{i}")
        for i in range(schedule.n_recv_buffers):
            _buffer_id(f"q{i}")
        for i in range(schedule.n_stripe_buffers):
            _buffer_id(f"r{i}")
        self.n_buffers = n = len(_BUFFER_NAMES)
        # one posted writer counts W in a busy counter, one reader 1: more readers than actions cannot be posted
        self.W = 1 + max(map(len, self.programs), default=0)
        self.pc = [0] * P
        self.buffers: list[list] = [[None] * n for _ in range(P)]  # [rank][buffer id] -> content
        self.busy: list[list[int]] = [[0] * n for _ in range(P)]  # [rank][buffer id] -> W * writers + readers
        for c, owner in enumerate(schedule.owners):
            self.buffers[owner][0] = _weights(c)
        self.acc: list[dict[int, int]] = [{} for _ in range(P)]  # [owner][chunk] -> contributions added
        self.twice: list[dict[int, int]] = [{} for _ in range(P)]  # [owner][chunk] -> contributions added again
        self.exchanged: list[set[int]] = [set() for _ in range(P)]  # [holder] -> mirrored chunks summed (XG)
        self.exchanges: dict[int, deque] = {}  # holder -> its posted, unmatched exchanges (in order)
        self.barriers = [0] * P  # barriers passed
        self.arrived = [0] * P  # barriers reached (passed, or waiting at the next one)
        self.reached: dict[int, int] = {}  # barrier k -> ranks that reached it
        # P2P: (src * P + dst) * 2 + lane -> (sends, receives); collectives: group * 2 + lane -> a queue per member
        self.p2p: dict[int, tuple[list, list]] = {}
        self.collectives = [[deque() for _ in range(self.G)] for _ in range(2 * self.topo.n_groups)]
        self.posted = [0] * (2 * self.topo.n_groups)  # members with a posted, unmatched op in each collective queue
        # queues that received a post since the last match and can match now (a key is only matched if it is here)
        self.ready_p2p: list[int] = []
        self.ready_coll: list[int] = []
        self.runnable: deque[int] = deque(range(P))  # ranks that may move, in the order they woke
        self.queued = [True] * P

    def _code(self, a: Action) -> tuple:
        code = _decode(a)
        extra = len(_BUFFER_NAMES) - self.n_buffers
        if extra > 0:  # a buffer name first seen now (only a hand-made program does that): widen the tables
            for row in self.buffers:
                row.extend([None] * extra)
            for row in self.busy:
                row.extend([0] * extra)
            self.n_buffers += extra
        return code

    # -- driver ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Advance ranks as events allow: a rank runs again only when one of its posted ops completes (or a barrier
        it waits at opens), and only the queues that received a post are matched. Same outcome as sweeping every
        rank and every queue until nothing moves, in time linear in the number of actions."""
        while True:
            self._run_ranks()
            if not self._open_barriers():
                break
        programs = self.programs
        stuck = {r: programs[r][pc] for r, pc in enumerate(self.pc) if pc < len(programs[r])}
        if stuck:
            detail = ", ".join(f"rank {r} at #{self.pc[r]} {a}" for r, a in stuck.items())
            raise ScheduleError(f"{self.s.name}: deadlock, no rank can make progress: {detail}")
        unmatched = {(r, str(a)) for r, a in self._posted_unfinished()}
        if unmatched:
            raise ScheduleError(f"{self.s.name}: communication never matched: {sorted(unmatched)[:8]}")
        self._check_final_state()

    def _run_ranks(self) -> None:
        """Until no rank can move: take the next woken rank and run its program until an action is blocked (a
        posted, unfinished op of the rank writes a buffer the action reads or writes, or reads a buffer it writes)
        or it ends; then match the queues that can. The common kinds are inline; the rest in :meth:`_local`."""
        runnable, queued, pcs = self.runnable, self.queued, self.pc
        P, G, W = self.world, self.G, self.W
        WR = W + 1  # a reduce's member writes and reads its buffer
        collectives, posted, ready_coll = self.collectives, self.posted, self.ready_coll
        p2p, ready_p2p = self.p2p, self.ready_p2p
        # per rank: its program, tables, and its queue (and key) for the node's gradient and weight collectives
        state = [(self.programs[r], len(self.programs[r]), self.buffers[r], self.busy[r],
                  collectives[(r // G) * 2][r % G], (r // G) * 2, collectives[(r // G) * 2 + 1][r % G],
                  (r // G) * 2 + 1) for r in range(P)]
        while runnable:
            rank = runnable.popleft()
            queued[rank] = False
            program, n, buffers, busy, grads_queue, grads_key, weights_queue, weights_key = state[rank]
            for pc in range(pcs[rank], n):
                a = program[pc]
                c = a._sim
                if c is None:  # not decoded yet
                    c = self._code(a)
                kind = c[0]
                if kind == _BW:
                    b = c[1]
                    if c[4] != rank:  # a member receives: writes its slot
                        if busy[b]:
                            break
                        busy[b] += W
                    else:  # the root sends: reads it
                        if busy[b] >= W:
                            break
                        busy[b] += 1
                    if not weights_queue:  # posted[key]: members with something in the key's queues
                        posted[weights_key] += 1
                        if posted[weights_key] == G:
                            ready_coll.append(weights_key)
                    weights_queue.append(a)
                elif kind == _X:  # writes its slot
                    b = c[1]
                    if busy[b]:
                        break
                    if buffers[b] is not c[5]:
                        pcs[rank] = pc
                        self._fail(rank, a, f"releases {a.buf} but it holds {_show(buffers[b], P)}")
                    buffers[b] = None
                elif kind == _F:  # reads its slot
                    b = c[1]
                    if busy[b] >= W:
                        break
                    if buffers[b] is not c[5]:
                        pcs[rank] = pc
                        self._fail(rank, a, f"slot {a.buf} holds {_show(buffers[b], P)}, not chunk {a.chunk}'s "
                                            "weights")
                elif kind == _RG:  # every member may write its buffer (gloo uses inputs as scratch)
                    b = c[1]
                    if busy[b]:
                        break
                    busy[b] += WR
                    if not grads_queue:
                        posted[grads_key] += 1
                        if posted[grads_key] == G:
                            ready_coll.append(grads_key)
                    grads_queue.append(a)
                elif kind == _B:  # reads its slot, writes its gradient buffer
                    b = c[1]
                    if busy[b] >= W or busy[c[2]]:
                        break
                    if buffers[b] is not c[5]:
                        pcs[rank] = pc
                        self._fail(rank, a, f"slot {a.buf} holds {_show(buffers[b], P)}, not chunk {a.chunk}'s "
                                            "weights")
                    if a.acc:  # adds to the same chunk's earlier micro-batches (a gradient run)
                        held = buffers[c[2]]
                        if not held or held[0] != "G" or held[1] != c[3]:
                            pcs[rank] = pc
                            self._fail(rank, a, f"adds its gradients to {_show(held, P)}, not chunk {c[3]}'s")
                        buffers[c[2]] = ("G", c[3], held[2] | 1 << (c[6] * P + rank))
                    else:
                        buffers[c[2]] = ("G", c[3], 1 << (c[6] * P + rank))
                elif kind <= _UG:  # P2P: a send reads its buffer, a receive writes it
                    b, peer = c[1], c[4]
                    if c[8]:
                        if busy[b] >= W:
                            break
                        busy[b] += 1
                        key = (rank * P + peer) * 2 + c[7]
                    else:
                        if busy[b]:
                            break
                        busy[b] += W
                        key = (peer * P + rank) * 2 + c[7]
                    if not 0 <= peer < P:  # could never match
                        pcs[rank] = pc
                        self._fail(rank, a, f"peer {peer} is not a rank (world size {P})")
                    queues = p2p.get(key)
                    if queues is None:
                        queues = p2p[key] = ([], [])  # short: lists are much smaller than deques
                    queues[1 - c[8]].append(a)  # [0]: sends, [1]: receives
                    if queues[c[8]]:  # the other side has posted: it can match
                        ready_p2p.append(key)
                else:
                    pcs[rank] = pc
                    if not self._local(rank, a, c):
                        break
            else:  # the program ran to its end
                pc = n
            pcs[rank] = pc
            if ready_p2p:
                self._match_p2p()
            if ready_coll:
                self._match_collectives()

    def _posted_unfinished(self):
        P, G = self.world, self.G
        for key, (sends, recvs) in self.p2p.items():
            src, dst = divmod(key >> 1, P)
            yield from ((src, a) for a in sends)
            yield from ((dst, a) for a in recvs)
        for key, queues in enumerate(self.collectives):
            for local, q in enumerate(queues):
                yield from (((key >> 1) * G + local, a) for a in q)
        for rank, q in self.exchanges.items():
            yield from ((rank, a) for a in q)

    def _wake(self, rank: int) -> None:
        if not self.queued[rank]:
            self.queued[rank] = True
            self.runnable.append(rank)

    def _open_barriers(self) -> bool:
        """Wake the ranks waiting at a barrier that every rank has reached; True if any woke."""
        woke = False
        for r, pc in enumerate(self.pc):
            program = self.programs[r]
            if pc < len(program) and program[pc].op is Op.BARRIER and self._barrier_open(self.barriers[r]):
                self._wake(r)
                woke = True
        return woke

    def _barrier_open(self, k: int) -> bool:
        """Barrier ``k`` opens when every rank has either passed it or is waiting at it."""
        return self.reached.get(k, 0) == self.world

    def _local(self, rank: int, a: Action, c: tuple) -> bool:
        """The rarer actions (local copies and adds, barriers): False if blocked, else run it."""
        busy, W = self.busy[rank], self.W
        kind, b, b2 = c[0], c[1], c[2]
        if kind == _BAR:
            k = self.barriers[rank]
            if self.arrived[rank] == k:
                self.arrived[rank] = k + 1
                self.reached[k] = self.reached.get(k, 0) + 1
            if not self._barrier_open(k):
                return False
            self.barriers[rank] = k + 1
            return True
        if kind == _CW:  # reads own, writes the slot
            if busy[0] >= W or busy[b]:
                return False
        elif kind == _AG:  # reads the buffer, writes the accumulator (only a hand-made program would post on it)
            acc = _BUFFER_IDS.get(f"acc{a.chunk}")
            if busy[b] >= W or (acc is not None and acc < len(busy) and busy[acc]):
                return False
        elif kind == _GA:  # reads both, writes the first
            if busy[b] or busy[b2] >= W:
                return False
        elif kind == _PW or kind == _AW:  # the node's weight collectives: write t<c> / the slot (the root reads own)
            root = kind == _PW and a.peer == rank
            if busy[b] or (root and busy[0] >= W):
                return False
            busy[b] += W
            busy[0] += root
            self._post_in_node(rank, a, lane=1)
            return True
        elif kind == _YG:  # like a reduce: every member writes (and reads) its buffer
            if busy[b]:
                return False
            busy[b] += W + 1
            self._post_in_node(rank, a, lane=0)
            return True
        elif kind == _GG:  # every member reads its stripe buffer; the owner writes the whole sum
            root = a.peer == rank
            if busy[b] >= W or (root and busy[b2]):
                return False
            busy[b] += 1
            if root:
                busy[b2] += W
            self._post_in_node(rank, a, lane=0)
            return True
        elif kind == _XG:  # posted: writes the accumulator until every holder of the rail has posted
            if busy[b]:
                return False
            if rank not in self.s.holders(a.chunk) or len(self.s.holders(a.chunk)) < 2:
                self._fail(rank, a, "exchanges a chunk it does not hold with other holders")
            busy[b] += W
            self.exchanges.setdefault(rank, deque()).append(a)
            self._match_exchanges(self.topo.local_index(rank))
            return True
        self._execute_local(rank, a, c)
        return True

    def _post_in_node(self, rank: int, a: Action, lane: int) -> None:
        """Queue ``a`` as ``rank``'s next collective of its node on ``lane`` (1: weights, 0: gradients)."""
        key = (rank // self.G) * 2 + lane
        queue = self.collectives[key][rank % self.G]
        if not queue:
            self.posted[key] += 1
            if self.posted[key] == self.G:
                self.ready_coll.append(key)
        queue.append(a)

    def _match_exchanges(self, local: int) -> None:
        """Complete the exchanges every rank of the rail (every node's rank of this local index) has posted, in
        order: each must be of the same chunk (gloo matches a group's collectives by their order), and after it each
        holder's accumulator has every holder's contributions, each once."""
        rail = [self.topo.rank(n, local) for n in range(self.topo.n_groups)]
        queues = [self.exchanges.get(r) for r in rail]
        while all(queues):
            ops = [q.popleft() for q in queues]
            chunk = ops[0].chunk
            for r, a in zip(rail, ops):
                if a.chunk != chunk:
                    self._fail(r, a, f"exchange mismatch on the rail: rank {rail[0]} exchanges chunk {chunk}")
            union = 0
            for r in rail:
                part = self.acc[r].get(chunk, 0)
                if union & part:
                    self.twice[r][chunk] = self.twice[r].get(chunk, 0) | (union & part)
                union |= part
            for r, a in zip(rail, ops):
                self.acc[r][chunk] = union
                self.exchanged[r].add(chunk)
                self.busy[r][a._sim[1]] -= self.W
                self._wake(r)

    # -- local semantics ------------------------------------------------------------------------------------------
    def _fail(self, rank: int, action: Action, why: str) -> None:
        raise ScheduleError(f"{self.s.name}: rank {rank} at #{self.pc[rank]} {action}: {why}")

    def _execute_local(self, rank: int, a: Action, c: tuple) -> None:
        buffers, kind, P = self.buffers[rank], c[0], self.world
        if kind == _CW:
            if self.s.owners[a.chunk] != rank and rank not in self.s.holders(a.chunk):  # owner first: hot
                self._fail(rank, a, "copies a chunk it does not own")
            self._fill_slot(rank, a, c[1], c[5])
        elif kind == _AG:
            content = buffers[c[1]]
            if self.s.owners[a.chunk] != rank and rank not in self.s.holders(a.chunk):  # owner first: hot
                self._fail(rank, a, "accumulates a chunk it does not own")
            if not content or content[0] != "G" or content[1] != a.chunk:
                self._fail(rank, a, f"accumulates {_show(content, P)}, not chunk {a.chunk}'s gradient")
            if a.chunk in self.exchanged[rank]:
                self._fail(rank, a, "adds a gradient after the holders exchanged it (the others would miss it)")
            acc, twice = self.acc[rank], self.twice[rank]
            have = acc.get(a.chunk, 0)
            if have & content[2]:
                twice[a.chunk] = twice.get(a.chunk, 0) | (have & content[2])
            acc[a.chunk] = have | content[2]
            buffers[c[1]] = None
        elif kind == _GA:
            mine, other = buffers[c[1]], buffers[c[2]]
            if not (mine and other and mine[0] == other[0] == "G" and mine[1] == other[1] == a.chunk) or (
                    mine[2] & other[2]):
                self._fail(rank, a, f"adds {_show(other, P)} into {_show(mine, P)}")
            buffers[c[1]] = ("G", a.chunk, mine[2] | other[2])
            buffers[c[2]] = None
        else:
            self._fail(rank, a, "unknown action")

    def _fill_slot(self, rank: int, a: Action, b: int, content: object) -> None:
        current = self.buffers[rank][b]
        if current is not None:
            self._fail(rank, a, f"overwrites {a.buf} while it still holds {_show(current, self.world)} (not released)")
        self.buffers[rank][b] = content

    # -- communication --------------------------------------------------------------------------------------------
    def _match_p2p(self) -> None:
        """Match the P2P queues that can, in key order (a send's content is copied into the receive's buffer)."""
        ready = sorted(set(self.ready_p2p)) if len(self.ready_p2p) > 1 else list(self.ready_p2p)
        self.ready_p2p.clear()  # the same list object: the driver holds it
        P, W, buffers, busy = self.world, self.W, self.buffers, self.busy
        queued, runnable = self.queued, self.runnable
        for key in ready:
            sends, recvs = self.p2p[key]
            src, dst = divmod(key >> 1, P)
            while sends and recvs:
                send, recv = sends.pop(0), recvs.pop(0)
                if send.chunk != recv.chunk:
                    self._fail(dst, recv, f"matched with {send} from rank {src}")
                b, rb = send._sim[1], recv._sim[1]
                content = buffers[src][b]
                if content is None or content[1] != send.chunk:
                    self._fail(src, send, f"sends {send.buf} holding {_show(content, P)}")
                striped = content[0] == "WS" or content[0] == "GS"
                if is_stripe(send) != striped:  # the engine sends what the op says: a stripe, or the whole buffer
                    self._fail(src, send, f"sends {_show(content, P)} as {'a stripe' if striped else 'a whole'}")
                if (recv.op in _STRIPE_RECEIVES) != striped:
                    self._fail(dst, recv, f"receives {_show(content, P)} from rank {src}'s {send.buf}")
                if striped and content[2] != dst % self.G:
                    self._fail(dst, recv, f"receives stripe {content[2]} of chunk {send.chunk} in the part of "
                                          f"local index {dst % self.G}")
                if recv.op in (Op.RECV_W, Op.RECV_STRIPE_W) and buffers[dst][rb] is not None:
                    self._fill_slot(dst, recv, rb, content)  # fails: a slot is only filled when released
                buffers[dst][rb] = content
                # both completed: they no longer block their ranks, which may now move on
                busy[src][b] -= 1
                busy[dst][rb] -= W
                for rank in (src, dst):
                    if not queued[rank]:
                        queued[rank] = True
                        runnable.append(rank)

    def _match_collectives(self) -> None:
        """Complete the collectives every member of the node has posted, in key order."""
        ready = sorted(set(self.ready_coll)) if len(self.ready_coll) > 1 else list(self.ready_coll)
        self.ready_coll.clear()
        popleft = deque.popleft
        for key in ready:
            queues = self.collectives[key]
            while all(queues):
                self._complete_collective(key >> 1, list(map(popleft, queues)))
            self.posted[key] = sum(map(bool, queues))

    def _complete_collective(self, group: int, ops: list[Action]) -> None:
        G, P, W = self.G, self.world, self.W
        base = group * G
        first = ops[0]
        if ops.count(first) != G:  # usually the very same object on every rank of the node
            for i, a in enumerate(ops):
                if (a.op, a.chunk, a.peer) != (first.op, first.chunk, first.peer):
                    self._fail(base + i, a, f"collective mismatch in the node: rank {base} posted {first}")
        if first.op is Op.GATHER_W or first.op is Op.SCATTER_W:
            self._complete_stripes(base, ops)
            return
        if first.op is Op.REDUCE_SCATTER_G or first.op is Op.GATHER_G:
            self._complete_gradient_stripes(base, ops)
            return
        root = first.peer
        if not base <= root < base + G:
            self._fail(base, first, f"root {root} is not in the node {self.topo.group_ranks(group)}")
        buffers, busy, queued, runnable = self.buffers, self.busy, self.queued, self.runnable
        members = range(base, base + G)
        if first.op is Op.BCAST_W:
            content = buffers[root][first._sim[1]]
            if content is not first._sim[5]:
                self._fail(root, first, f"broadcasts {_show(content, P)}")
            for rank, a in zip(members, ops):
                b = a._sim[1]
                if rank != root:  # receives: its slot must be free
                    row = buffers[rank]
                    if row[b] is not None:
                        self._fill_slot(rank, a, b, content)  # fails
                    row[b] = content
                    busy[rank][b] -= W
                else:
                    busy[rank][b] -= 1
                if not queued[rank]:  # the op completed: its rank may move on
                    queued[rank] = True
                    runnable.append(rank)
            return
        chunk, union = first.chunk, 0
        for rank, a in zip(members, ops):
            c = buffers[rank][a._sim[1]]
            if c is None or c[0] != "G" or c[1] != chunk or union & c[2]:
                contents = [buffers[r][a._sim[1]] for r, a in zip(members, ops)]
                if any(c is None or c[0] != "G" or c[1] != chunk for c in contents):
                    self._fail(root, first, f"reduces {[_show(c, P) for c in contents]}")
                self._fail(root, first, "a gradient contribution is counted twice")
            union |= c[2]
        for rank, a in zip(members, ops):
            b = a._sim[1]
            buffers[rank][b] = None
            busy[rank][b] -= W + 1
            if not queued[rank]:
                queued[rank] = True
                runnable.append(rank)
        buffers[root][ops[root - base]._sim[1]] = ("G", chunk, union)

    def _complete_stripes(self, base: int, ops: list[Action]) -> None:
        """A node's scatter of a chunk's stripes (each rank gets its own into ``t<c>``, from the owner's copy) or
        all-gather of them (every rank must hold its own stripe in the slot; all then hold the whole chunk)."""
        first, P, W = ops[0], self.world, self.W
        chunk = first.chunk
        for i, a in enumerate(ops):
            rank, b = base + i, a._sim[1]
            row = self.buffers[rank]
            if first.op is Op.SCATTER_W:
                if i == 0:
                    owner = first.peer
                    if not base <= owner < base + self.G or self.s.owners[chunk] != owner:
                        self._fail(rank, a, f"scatters chunk {chunk} from rank {owner}, not from its owner in the node")
                    self.busy[owner][0] -= 1
                if row[b] is not None:
                    self._fail(rank, a, f"overwrites {a.buf} while it still holds {_show(row[b], P)}")
                row[b] = _stripe(chunk, i)
            else:
                if row[b] is not _stripe(chunk, i):
                    self._fail(rank, a, f"all-gathers chunk {chunk} but its part of {a.buf} holds {_show(row[b], P)}")
            self.busy[rank][b] -= W
            self._wake(rank)
        if first.op is Op.GATHER_W:
            for i, a in enumerate(ops):
                self.buffers[base + i][a._sim[1]] = first._sim[5]

    def _complete_gradient_stripes(self, base: int, ops: list[Action]) -> None:
        """A node's reduce-scatter of a chunk's gradients (each rank's buffer then holds its stripe of the node's sum)
        or gather of a remote sum's stripes onto the owner (every rank's stripe must carry the same contributions;
        the owner then holds the whole sum)."""
        first, P, W = ops[0], self.world, self.W
        chunk, G = first.chunk, self.G
        rows = [self.buffers[base + i] for i in range(G)]
        ids = [a._sim[1] for a in ops]
        if first.op is Op.REDUCE_SCATTER_G:
            union = 0
            for i, a in enumerate(ops):
                c = rows[i][ids[i]]
                if c is None or c[0] != "G" or c[1] != chunk:
                    self._fail(base + i, a, f"reduce-scatters {_show(c, P)}, not chunk {chunk}'s gradient")
                if union & c[2]:
                    self._fail(base + i, a, "a gradient contribution is counted twice")
                union |= c[2]
            for i, a in enumerate(ops):
                rows[i][ids[i]] = ("GS", chunk, i, union)
                self.busy[base + i][ids[i]] -= W + 1
                self._wake(base + i)
            return
        owner = first.peer
        if not base <= owner < base + G or self.s.owners[chunk] != owner:
            self._fail(base, first,
                       f"gathers chunk {chunk}'s stripes onto rank {owner}, not onto its owner in the node")
        stripes = [rows[i][ids[i]] for i in range(G)]
        if any(c is None or c[0] != "GS" or c[1] != chunk or c[2] != i for i, c in enumerate(stripes)) or len(
                {c[3] for c in stripes}) != 1:
            self._fail(owner, first, f"gathers stripes {[_show(c, P) for c in stripes]}")
        out = ops[owner - base]._sim[2]
        if self.buffers[owner][out] is not None:
            self._fail(owner, first, f"overwrites {first.buf2} while it still holds "
                                     f"{_show(self.buffers[owner][out], P)}")
        for i in range(G):
            rows[i][ids[i]] = None
            self.busy[base + i][ids[i]] -= 1
            self._wake(base + i)
        self.buffers[owner][out] = ("G", chunk, stripes[0][3])
        self.busy[owner][out] -= W

    # -- final checks ---------------------------------------------------------------------------------------------
    def _check_final_state(self) -> None:
        slots = [i for i, name in enumerate(_BUFFER_NAMES[:self.n_buffers]) if name.startswith("s")]
        for rank, buffers in enumerate(self.buffers):
            resident = {_BUFFER_NAMES[i]: _show(buffers[i], self.world) for i in slots if buffers[i] is not None}
            if resident:
                raise ScheduleError(f"{self.s.name}: rank {rank} ends with unreleased slots {resident}")
        if not self.s.train:
            return
        P = self.world
        expected = ((1 << (P * self.s.n_microbatches)) - 1) << P  # bit (mb + 1) * P + rank for every (rank, mb)
        for c, owner in enumerate(self.s.owners):
            # a mirrored chunk's holders each accumulate their node's part; the all-reduce after the iteration sums
            # them, so together they must hold every contribution once
            got = twice = 0
            holders = self.s.holders(c)
            if all(c in self.exchanged[h] for h in holders):  # summed in the program: each holder has everything
                bad = [h for h in holders if self.acc[h].get(c, 0) != expected or self.twice[h].get(c, 0)]
                holders = bad[:1] or holders[:1]
            for holder in holders:
                part = self.acc[holder].get(c, 0)
                twice |= self.twice[holder].get(c, 0) | (got & part)
                got |= part
            if got != expected or twice:
                missing = _bits_to_pairs(expected & ~got, P)[:6]
                extra = _bits_to_pairs((got & ~expected) | twice, P)[:6]
                who = f"owner rank {owner}" if len(self.s.holders(c)) == 1 else f"holders {self.s.holders(c)}"
                raise ScheduleError(
                    f"{self.s.name}: {who} of chunk {c} accumulated the wrong gradients "
                    f"(missing {missing}, duplicated {extra})"
                )
