"""Simulate every rank's program together, with no process group, and check the schedule is right.

The simulator executes programs with the engine's semantics: communication is posted asynchronously and completes
when matched (a P2P send with the receive of the same pair and lane, in order; a collective when every member of the
node has posted it); an action waits for earlier conflicting actions on the same buffer. It tracks *what* each
buffer holds, so it checks more than "no deadlock":

* every compute step finds the right chunk's weights, copied from that chunk's owner, in its slot;
* a slot is never overwritten while it holds a chunk that was not released, and all are released at the end;
* P2P pairs and collectives agree on chunk, root and kind;
* every owner's accumulator ends with exactly one gradient contribution from every (rank, micro-batch);
* nothing is left unmatched, and no rank is stuck (a deadlock is reported with each rank's blocked action).

``with_user_barriers`` adds a world-wide collective at every micro-batch's loss and end, modelling user code that
calls ``self.log(..., sync_dist=True)`` in the middle of the pipeline; schedules must survive it.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field, replace

from lightning_tawpipe.schedule.actions import ASYNC_OPS, COLLECTIVE_OPS, Action, Op
from lightning_tawpipe.schedule.program import Schedule


class ScheduleError(RuntimeError):
    """A schedule is inconsistent; the message names the rank, the action and the reason."""


@dataclass(eq=False)
class _Posted:
    rank: int
    action: Action
    done: bool = False
    reads: frozenset = frozenset()
    writes: frozenset = frozenset()


@dataclass
class _RankState:
    pc: int = 0
    # posted ops not yet completed, indexed by the buffers they write / read (so a check costs O(conflicts))
    open_writes: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    open_reads: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    n_open: int = 0
    buffers: dict[str, object] = field(default_factory=dict)
    acc: Counter = field(default_factory=Counter)
    barriers: int = 0


def with_user_barriers(schedule: Schedule) -> Schedule:
    """The same schedule with a world collective after each last-chunk forward and each chunk-0 backward."""
    last = schedule.n_chunks - 1
    programs = []
    for program in schedule.programs:
        out: list[Action] = []
        for a in program:
            out.append(a)
            if (a.op is Op.FORWARD and a.chunk == last) or (a.op is Op.BACKWARD and a.chunk == 0):
                out.append(Action(Op.BARRIER))
        programs.append(tuple(out))
    return replace(schedule, programs=tuple(programs))


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` if the schedule is wrong in any way listed in the module docstring."""
    _Simulator(schedule).run()


class _Simulator:
    def __init__(self, schedule: Schedule) -> None:
        self.s = schedule
        self.topo = schedule.topology
        self.world = self.topo.world_size
        self.ranks = [_RankState() for _ in range(self.world)]
        for c, owner in enumerate(schedule.owners):
            self.ranks[owner].buffers["own"] = ("W", c)
        self.p2p: dict[tuple[int, int, str], tuple[deque, deque]] = defaultdict(lambda: (deque(), deque()))
        self.collectives: dict[tuple[int, str], dict[int, deque]] = defaultdict(lambda: defaultdict(deque))

    # -- driver ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Advance ranks as events allow: a rank runs again only when one of its posted ops completes (or a barrier
        it waits at opens), and only the queues that received a post are matched. Same outcome as sweeping every
        rank and every queue until nothing moves, in time linear in the number of actions."""
        self.runnable: deque[int] = deque(range(self.world))
        self.queued = [True] * self.world
        self.dirty_p2p: set = set()
        self.dirty_coll: set = set()
        while True:
            while self.runnable:
                rank = self.runnable.popleft()
                self.queued[rank] = False
                self._advance(rank)
                self._match()
            if not self._open_barriers():
                break
        stuck = {r: self.s.programs[r][st.pc] for r, st in enumerate(self.ranks) if st.pc < len(self.s.programs[r])}
        if stuck:
            detail = ", ".join(f"rank {r} at #{self.ranks[r].pc} {a}" for r, a in stuck.items())
            raise ScheduleError(f"{self.s.name}: deadlock, no rank can make progress: {detail}")
        unmatched = [(r, str(p.action)) for r, st in enumerate(self.ranks) for ps in st.open_writes.values()
                     for p in ps] + [(r, str(p.action)) for r, st in enumerate(self.ranks)
                                     for ps in st.open_reads.values() for p in ps]
        if unmatched:
            raise ScheduleError(f"{self.s.name}: communication never matched: {sorted(set(unmatched))[:8]}")
        self._check_final_state()

    def _wake(self, rank: int) -> None:
        if not self.queued[rank]:
            self.queued[rank] = True
            self.runnable.append(rank)

    def _open_barriers(self) -> bool:
        """Wake the ranks waiting at a barrier that every rank has reached; True if any woke."""
        waiting = [r for r, st in enumerate(self.ranks)
                   if st.pc < len(self.s.programs[r]) and self.s.programs[r][st.pc].op is Op.BARRIER]
        woke = False
        for r in waiting:
            if self._barrier_open(self.ranks[r].barriers):
                self._wake(r)
                woke = True
        return woke

    def _advance(self, rank: int) -> bool:
        st, program, moved = self.ranks[rank], self.s.programs[rank], False
        while st.pc < len(program):
            action = program[st.pc]
            if self._blocked(rank, action):
                break
            self._execute(rank, action)
            st.pc += 1
            moved = True
        return moved

    def _blocked(self, rank: int, action: Action) -> bool:
        st = self.ranks[rank]
        if action.op is Op.BARRIER:
            return not self._barrier_open(st.barriers)
        reads, writes = action.reads_writes(rank)
        ow, orr = st.open_writes, st.open_reads
        return (any(ow.get(b) for b in reads) or any(ow.get(b) for b in writes)
                or any(orr.get(b) for b in writes))

    def _barrier_open(self, k: int) -> bool:
        """Barrier ``k`` opens when every rank has either passed it or is waiting at it."""
        for i, other in enumerate(self.ranks):
            program = self.s.programs[i]
            waiting = other.pc < len(program) and program[other.pc].op is Op.BARRIER
            if not (other.barriers > k or (other.barriers == k and waiting)):
                return False
        return True

    # -- local semantics ------------------------------------------------------------------------------------------
    def _fail(self, rank: int, action: Action, why: str) -> None:
        raise ScheduleError(f"{self.s.name}: rank {rank} at #{self.ranks[rank].pc} {action}: {why}")

    def _execute(self, rank: int, a: Action) -> None:
        st, buffers = self.ranks[rank], self.ranks[rank].buffers
        if a.op is Op.BARRIER:
            st.barriers += 1
        elif a.op in ASYNC_OPS:
            self._post(rank, a)
        elif a.op in (Op.FORWARD, Op.BACKWARD):
            if buffers.get(a.buf) != ("W", a.chunk):
                self._fail(rank, a, f"slot {a.buf} holds {buffers.get(a.buf)}, not chunk {a.chunk}'s weights")
            if a.op is Op.BACKWARD:
                buffers[a.buf2] = ("G", a.chunk, frozenset({(rank, a.mb)}))
        elif a.op is Op.RELEASE:
            if buffers.get(a.buf) != ("W", a.chunk):
                self._fail(rank, a, f"releases {a.buf} but it holds {buffers.get(a.buf)}")
            buffers[a.buf] = None
        elif a.op is Op.COPY_W:
            if self.s.owners[a.chunk] != rank:
                self._fail(rank, a, "copies a chunk it does not own")
            self._fill_slot(rank, a, ("W", a.chunk))
        elif a.op is Op.ACC_G:
            self._accumulate(rank, a)
        elif a.op is Op.ADD_G:
            mine, other = buffers.get(a.buf), buffers.get(a.buf2)
            if not (mine and other and mine[1] == other[1] == a.chunk) or mine[2] & other[2]:
                self._fail(rank, a, f"adds {other} into {mine}")
            buffers[a.buf] = ("G", a.chunk, mine[2] | other[2])
            buffers[a.buf2] = None
        else:
            self._fail(rank, a, "unknown action")

    def _fill_slot(self, rank: int, a: Action, content: object) -> None:
        current = self.ranks[rank].buffers.get(a.buf)
        if current is not None:
            self._fail(rank, a, f"overwrites {a.buf} while it still holds {current} (not released)")
        self.ranks[rank].buffers[a.buf] = content

    def _accumulate(self, rank: int, a: Action) -> None:
        content = self.ranks[rank].buffers.get(a.buf)
        if self.s.owners[a.chunk] != rank:
            self._fail(rank, a, "accumulates a chunk it does not own")
        if not content or content[0] != "G" or content[1] != a.chunk:
            self._fail(rank, a, f"accumulates {content}, not chunk {a.chunk}'s gradient")
        self.ranks[rank].acc.update({(a.chunk, c) for c in content[2]})
        self.ranks[rank].buffers[a.buf] = None

    # -- communication --------------------------------------------------------------------------------------------
    def _post(self, rank: int, a: Action) -> None:
        reads, writes = a.reads_writes(rank)
        posted = _Posted(rank, a, reads=frozenset(reads), writes=frozenset(writes))
        st = self.ranks[rank]
        for b in posted.writes:
            st.open_writes[b].add(posted)
        for b in posted.reads:
            st.open_reads[b].add(posted)
        lane = "W" if a.op in (Op.SEND_W, Op.RECV_W, Op.BCAST_W) else "G"
        if a.op in COLLECTIVE_OPS:
            key = (self.topo.group_of(rank), lane)
            self.collectives[key][rank].append(posted)
            self.dirty_coll.add(key)
        else:
            key = (rank, a.peer, lane) if a.op in (Op.SEND_W, Op.SEND_G) else (a.peer, rank, lane)
            self.p2p[key][0 if a.op in (Op.SEND_W, Op.SEND_G) else 1].append(posted)
            self.dirty_p2p.add(key)

    def _finish(self, posted: _Posted) -> None:
        """The op completed: it no longer blocks its rank, which may now move on."""
        posted.done = True
        st = self.ranks[posted.rank]
        for b in posted.writes:
            st.open_writes[b].discard(posted)
        for b in posted.reads:
            st.open_reads[b].discard(posted)
        self._wake(posted.rank)

    def _match(self) -> bool:
        matched = False
        dirty, self.dirty_p2p = self.dirty_p2p, set()
        for key in sorted(dirty):
            src, dst, _ = key
            sends, recvs = self.p2p[key]
            while sends and recvs:
                send, recv = sends.popleft(), recvs.popleft()
                if send.action.chunk != recv.action.chunk:
                    self._fail(dst, recv.action, f"matched with {send.action} from rank {src}")
                content = self.ranks[src].buffers.get(send.action.buf)
                if content is None or content[1] != send.action.chunk:
                    self._fail(src, send.action, f"sends {send.action.buf} holding {content}")
                if recv.action.op is Op.RECV_W:
                    self._fill_slot(dst, recv.action, content)
                else:
                    self.ranks[dst].buffers[recv.action.buf] = content
                self._finish(send)
                self._finish(recv)
                matched = True
        dirty, self.dirty_coll = self.dirty_coll, set()
        for key in sorted(dirty):
            queues = self.collectives[key]
            members = self.topo.group_ranks(key[0])
            while all(queues[r] for r in members):
                ops = [queues[r].popleft() for r in members]
                self._complete_collective(members, ops)
                matched = True
        return matched

    def _complete_collective(self, members: list[int], ops: list[_Posted]) -> None:
        first = ops[0].action
        for p in ops:
            a = p.action
            if (a.op, a.chunk, a.peer) != (first.op, first.chunk, first.peer):
                self._fail(p.rank, a, f"collective mismatch in the node: rank {ops[0].rank} posted {first}")
        root = first.peer
        if root not in members:
            self._fail(ops[0].rank, first, f"root {root} is not in the node {members}")
        if first.op is Op.BCAST_W:
            content = self.ranks[root].buffers.get(first.buf)
            if content != ("W", first.chunk):
                self._fail(root, first, f"broadcasts {content}")
            for p in ops:
                if p.rank != root:
                    self._fill_slot(p.rank, p.action, content)
        else:
            contents = [self.ranks[p.rank].buffers.get(p.action.buf) for p in ops]
            if any(c is None or c[1] != first.chunk for c in contents):
                self._fail(root, first, f"reduces {contents}")
            union: frozenset = frozenset()
            for c in contents:
                if union & c[2]:
                    self._fail(root, first, "a gradient contribution is counted twice")
                union |= c[2]
            for p in ops:
                self.ranks[p.rank].buffers[p.action.buf] = ("G", first.chunk, union) if p.rank == root else None
        for p in ops:
            self._finish(p)

    # -- final checks ---------------------------------------------------------------------------------------------
    def _check_final_state(self) -> None:
        for rank, st in enumerate(self.ranks):
            resident = {b: v for b, v in st.buffers.items() if b.startswith("s") and v is not None}
            if resident:
                raise ScheduleError(f"{self.s.name}: rank {rank} ends with unreleased slots {resident}")
        if not self.s.train:
            return
        expected = Counter((r, m) for r in range(self.world) for m in range(self.s.n_microbatches))
        for c, owner in enumerate(self.s.owners):
            got = Counter({k[1]: v for k, v in self.ranks[owner].acc.items() if k[0] == c})
            if got != expected:
                missing = sorted((expected - got).keys())[:6]
                extra = sorted((got - expected).keys())[:6]
                raise ScheduleError(
                    f"{self.s.name}: owner rank {owner} of chunk {c} accumulated the wrong gradients "
                    f"(missing {missing}, duplicated {extra})"
                )
