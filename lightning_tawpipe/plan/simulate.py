"""Time a schedule by executing every rank's real program with the engine's semantics and a clock.

This is the validator's execution model (``schedule/validate.py``) with durations, and the engine's waiting rule
(``runtime/engine.py``), so a prediction follows exactly what the strategy will do:

* a rank's host walks its program in order;
* ``F``/``B`` occupy the device for the calibrated compute time of that chunk (on the CPU testbed, a flow on the
  machine's shared cores);
* ``SW/RW/SG/QG`` (point to point) and ``BW/RG`` (broadcast/reduce in the node) are *posted* without waiting; they
  start when every participant has posted them (P2P: the matching send/receive of the same pair and lane, in order;
  a collective: every rank of the node, in order) and when the previous operation on the same communicator has
  finished (NCCL and gloo run one communicator's operations in issue order). They then take the link class's latency
  plus their bytes through the resources they cross, sharing bandwidth with whatever else is in flight there
  (``flows.py``): an inter-node transfer crosses its sender's NIC egress and its receiver's NIC ingress, an
  intra-node one the devices' own links, a collective every member's links; on the CPU testbed an intra-node
  transfer (a loopback TCP copy) also takes a share of the machine's cores, as compute does;
* before any action touches a buffer, the host waits for every earlier posted operation that conflicts with it on
  that buffer (read-after-write, write-after-read, write-after-write): the engine's waiting rule. A gradient send
  whose reduce is still running, or a relay's broadcast whose inter-node receive is, is *deferred* instead, as the
  engine does (later operations of its communicator family queue behind it): it is posted the moment its input is
  done, and the host runs on; later actions that touch its buffers wait for it, and the forward step after which
  user code runs waits until nothing is deferred;
* ``XG`` (the holders of a mirrored chunk summing its gradient) is an all-reduce over the rail: it starts when every
  node's holder has posted it, and each sends and receives ``2 (N - 1) / N`` of the gradient through its NIC;
* ``CW/AG/GA`` are local copies/adds costing their bytes over the device memory bandwidth; ``X`` is free;
* the iteration ends when every rank has run its program and every operation it posted has finished.

Message sizes: weights and gradients travel in the compute dtype (bf16 under bf16-mixed), as the engine sends them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.flows import Network
from lightning_tawpipe.schedule.actions import (
    ASYNC_OPS,
    Action,
    Op,
    buffers_conflict,
    channel,
    deferrable,
    is_stripe,
    user_code_follows,
)
from lightning_tawpipe.schedule.program import Schedule

_LOCAL = (Op.COPY_W, Op.ACC_G, Op.ADD_G)
_P2P_SEND = (Op.SEND_W, Op.SEND_G, Op.SEND_STRIPE_G)
_P2P_RECV = (Op.RECV_W, Op.RECV_G, Op.RECV_STRIPE_W, Op.RECV_STRIPE_G)
_WEIGHT_LANE = (Op.SEND_W, Op.RECV_W, Op.BCAST_W, Op.SCATTER_W, Op.RECV_STRIPE_W, Op.GATHER_W)
_STRIPED_COLLECTIVES = (Op.SCATTER_W, Op.GATHER_W, Op.REDUCE_SCATTER_G, Op.GATHER_G)


@dataclass(frozen=True)
class ChunkCosts:
    """Per chunk: forward and backward seconds (one micro-batch), weight and gradient message bytes."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    weight_bytes: tuple[float, ...]
    grad_bytes: tuple[float, ...]


@dataclass
class SimResult:
    """What one simulated iteration did (seconds and bytes); per-rank lists are indexed by rank."""

    makespan: float
    finish: list[float]
    compute_busy: list[float]
    comm_wait: list[float]
    intra_bytes: float = 0.0  # bytes sent over intra-node links (a collective counts its buffer once per receiver)
    inter_bytes: float = 0.0  # bytes that crossed node boundaries (all nodes together)
    inter_bytes_per_node_max: float = 0.0  # the busiest node's egress
    n_transfers: int = 0
    wait_by_op: dict[str, float] = field(default_factory=dict)

    @property
    def idle_fraction(self) -> float:
        """Mean share of the iteration a device is not computing (bubble plus exposed communication)."""
        n = len(self.compute_busy)
        return 1.0 - sum(self.compute_busy) / (n * self.makespan) if self.makespan > 0 else 0.0


class _Posted:
    __slots__ = ("rank", "action", "reads", "writes", "done", "waiters", "t_post", "seq")

    def __init__(self, rank: int, action: Action, reads, writes, t_post: float, seq: int) -> None:
        self.rank, self.action, self.reads, self.writes = rank, action, reads, writes
        self.done, self.waiters, self.t_post, self.seq = False, None, t_post, seq  # seq: order of entry


class _Transfer:
    __slots__ = ("members", "nbytes", "resources", "latency", "key", "inter", "receivers", "src_node", "bw")

    def __init__(self, members, nbytes, resources, latency, key, inter, receivers, src_node, bw) -> None:
        self.members, self.nbytes, self.resources, self.latency, self.key = members, nbytes, resources, latency, key
        self.inter, self.receivers, self.src_node, self.bw = inter, receivers, src_node, bw


def simulate(schedule: Schedule, cluster: Cluster, costs: ChunkCosts) -> SimResult:
    """Run every rank's program of ``schedule`` on ``cluster`` and return the timing (see the module docstring)."""
    topo = schedule.topology
    if topo.world_size != cluster.world_size or topo.group_size != cluster.devices_per_node:
        raise ValueError(f"schedule topology {topo.n_groups}x{topo.group_size} does not match the cluster "
                         f"{cluster.nodes}x{cluster.devices_per_node}")
    return _Sim(schedule, cluster, costs).run()


class _Sim:
    def __init__(self, schedule: Schedule, cluster: Cluster, costs: ChunkCosts) -> None:
        self.s, self.c, self.costs = schedule, cluster, costs
        self.topo = schedule.topology
        P, N, nics = cluster.world_size, cluster.nodes, cluster.nics_per_node
        self.heap: list = []
        self.counter = itertools.count().__next__
        # capacities count full-speed flows: a transfer's work is its bytes over its link class's bandwidth
        self.net = Network([1.0] * (2 * P + 2 * N * nics), self.heap, self.counter)
        self.cpu = self.net.add_resource(float(cluster.host_cores)) if cluster.host_cores else None
        # on the CPU testbed an intra-node transfer is a copy through the kernel: it needs a core like compute does
        self.cpu_res = (self.cpu,) if self.cpu is not None else ()
        self.pc = [0] * P
        self.now_host = [0.0] * P
        self.blocked_since: list[float | None] = [None] * P
        self.pending_w: list[dict[str, set]] = [dict() for _ in range(P)]
        self.pending_r: list[dict[str, set]] = [dict() for _ in range(P)]
        self.unfinished: list[int] = [0] * P
        self.deferred: list[list] = [[] for _ in range(P)]  # operations waiting for their input (engine.py)
        self.finish = [0.0] * P
        self.busy = [0.0] * P
        self.wait = [0.0] * P
        self.wait_by_op: dict[str, float] = {}
        self.sends: dict[tuple, deque] = {}
        self.recvs: dict[tuple, deque] = {}
        self.coll: dict[tuple, list[deque]] = {}
        self.comm_queue: dict[tuple, deque] = {}
        self.res = SimResult(0.0, self.finish, self.busy, self.wait)
        self.node_egress = [0.0] * N

    # -- driver -----------------------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        for r in range(self.c.world_size):
            self._push(0.0, self._advance, (r,))
        heap, pop = self.heap, heapq.heappop
        while heap:
            t, _, fn, args = pop(heap)
            fn(t, *args)
        stuck = [r for r in range(self.c.world_size) if self.pc[r] < len(self.s.programs[r])]
        if stuck:
            r = stuck[0]
            raise RuntimeError(f"simulation of {self.s.name} deadlocked: rank {r} at {self.s.programs[r][self.pc[r]]}"
                               " (validate the schedule first)")
        self.res.makespan = max(self.finish)
        self.res.wait_by_op = self.wait_by_op
        self.res.inter_bytes_per_node_max = max(self.node_egress)
        return self.res

    def _push(self, t: float, fn, args: tuple) -> None:
        heapq.heappush(self.heap, (t, self.counter(), fn, args))

    # -- a rank's host ------------------------------------------------------------------------------------------------
    def _advance(self, now: float, r: int) -> None:
        """Run rank ``r``'s program from its program counter until it computes, waits or ends."""
        program, s_pc = self.s.programs[r], self.pc[r]
        if self.blocked_since[r] is not None:
            self.wait[r] += now - self.blocked_since[r]
            self.blocked_since[r] = None
        pw, pr = self.pending_w[r], self.pending_r[r]
        while s_pc < len(program):
            a = program[s_pc]
            if a.op is Op.BARRIER or a.op is Op.RELEASE:
                s_pc += 1
                continue
            reads, writes = a.reads_writes(r)
            blocker = self._conflict(pw, pr, reads, writes)
            if a.op in ASYNC_OPS and self._must_defer(r, a, blocker):
                # the engine defers an operation whose input is in flight and posts it when the input is done
                self.deferred[r].append(self._register(now, r, a, reads, writes, pw, pr))
                self._post_deferred(now, r)
                s_pc += 1
                continue
            if a.op is Op.FORWARD and self.deferred[r] and user_code_follows(program, s_pc):
                # the engine posts everything deferred before a forward step that returns to user code
                blocker = blocker or self._input_of(self.deferred[r][0])
            if blocker is not None:
                self.pc[r] = s_pc
                self.blocked_since[r] = now
                key = blocker.action.op.value
                if blocker.waiters is None:
                    blocker.waiters = []
                blocker.waiters.append((r, key))
                return
            op = a.op
            if op is Op.FORWARD or op is Op.BACKWARD:
                d = (self.costs.forward if op is Op.FORWARD else self.costs.backward)[a.chunk]
                self.busy[r] += d
                self.pc[r] = s_pc + 1
                if self.cpu is None:
                    self._push(now + d, self._advance, (r,))
                else:
                    self.net.start(now, d, (self.cpu,), 1.0, lambda t, r=r: self._advance(t, r))
                return
            if op in _LOCAL:
                nbytes = (self.costs.weight_bytes if op is Op.COPY_W else self.costs.grad_bytes)[a.chunk]
                self.pc[r] = s_pc + 1
                self._push(now + 2.0 * nbytes / self.c.mem_bw, self._advance, (r,))
                return
            self._post(now, r, a, reads, writes, pw, pr)
            s_pc += 1
        self.pc[r] = s_pc
        self._maybe_finish(now, r)

    @staticmethod
    def _conflict(pw: dict, pr: dict, reads, writes, before: int | None = None):
        """The first unfinished conflicting posted op (entered before entry ``before`` if given), or None (finished
        conflicting ops are dropped: waited on)."""
        for bufs, table in ((reads, pw), (writes, pw), (writes, pr)):
            for b in bufs:
                posted = table.get(b)
                if not posted:
                    continue
                for p in list(posted):
                    if not p.done:
                        if before is None or p.seq < before:
                            return p
                        continue
                    posted.discard(p)
        return None

    def _maybe_finish(self, now: float, r: int) -> None:
        if self.pc[r] >= len(self.s.programs[r]) and self.unfinished[r] == 0:
            self.finish[r] = max(self.finish[r], now)

    # -- posting and matching -----------------------------------------------------------------------------------------
    def _register(self, now: float, r: int, a: Action, reads, writes, pw, pr) -> _Posted:
        """Enter an operation in the rank's tables of unfinished ones (later actions that conflict wait for it)."""
        p = _Posted(r, a, reads, writes, now, self.counter())
        for b in reads:
            pr.setdefault(b, set()).add(p)
        for b in writes:
            pw.setdefault(b, set()).add(p)
        self.unfinished[r] += 1
        return p

    def _must_defer(self, r: int, a: Action, blocker) -> bool:
        """The engine's rule: a deferred operation of the same family is queued, or ``a`` is deferrable and its
        input is in flight."""
        if any(channel(d.action) == channel(a) for d in self.deferred[r]):
            return True
        return blocker is not None and deferrable(a, r)

    def _input_of(self, p: _Posted):
        """The unfinished operation a deferred one waits for: the waiting rule over what was entered before it (it
        is in the tables itself)."""
        return self._conflict(self.pending_w[p.rank], self.pending_r[p.rank], p.reads, p.writes, before=p.seq)

    def _post_deferred(self, now: float, r: int) -> None:
        """Post rank ``r``'s deferred operations whose input is done and that no earlier held one precedes (same
        family, or a buffer they share), in program order (``runtime/engine.py``)."""
        held = []
        for p in self.deferred[r]:
            if self._input_of(p) is not None or any(
                    channel(h.action) == channel(p.action)
                    or buffers_conflict(p.reads, p.writes, h.reads, h.writes) for h in held):
                held.append(p)
            else:
                self._match(now, p)
        self.deferred[r] = held

    def _post(self, now: float, r: int, a: Action, reads, writes, pw, pr) -> None:
        self._match(now, self._register(now, r, a, reads, writes, pw, pr))

    def _match(self, now: float, p: _Posted) -> None:
        """Pair a posted operation with its peers' (or start it once all are posted)."""
        r, a = p.rank, p.action
        lane = "W" if a.op in _WEIGHT_LANE else "G"
        if a.op in _P2P_SEND or a.op in _P2P_RECV:
            src, dst = (r, a.peer) if a.op in _P2P_SEND else (a.peer, r)
            key = (src, dst, lane)
            mine, other = (self.sends, self.recvs) if a.op in _P2P_SEND else (self.recvs, self.sends)
            q = other.get(key)
            if q:
                peer = q.popleft()
                send, recv = (p, peer) if a.op in _P2P_SEND else (peer, p)
                self._matched(now, self._p2p_transfer(send, recv, key))
            else:
                mine.setdefault(key, deque()).append(p)
        elif a.op is Op.EXCHANGE_G:  # the holders of a rail, one per node
            self._gather(now, ("rail", self.topo.local_index(r)), self.topo.n_groups, self.topo.group_of(r), p,
                         self._exchange)
        else:  # the ranks of a node
            self._gather(now, (self.topo.group_of(r), lane), self.topo.group_size, self.topo.local_index(r), p,
                         self._collective)

    def _gather(self, now: float, key: tuple, n_members: int, member: int, p: _Posted, make) -> None:
        """Queue ``p`` as member ``member`` of collective ``key``; start it once every member has posted it."""
        queues = self.coll.get(key)
        if queues is None:
            queues = self.coll[key] = [deque() for _ in range(n_members)]
        queues[member].append(p)
        if all(queues):
            self._matched(now, make([q.popleft() for q in queues], key))

    def _bytes(self, a: Action) -> float:
        nbytes = (self.costs.weight_bytes if a.op in _WEIGHT_LANE else self.costs.grad_bytes)[a.chunk]
        return nbytes / self.topo.group_size if is_stripe(a) else nbytes

    def _p2p_transfer(self, send: _Posted, recv: _Posted, key: tuple) -> _Transfer:
        src, dst = send.rank, recv.rank
        nbytes, P, c = self._bytes(send.action), self.c.world_size, self.c
        if self._node(src) == self._node(dst):
            resources, latency, inter = (src, P + dst) + self.cpu_res, c.intra_latency, False
        else:
            nics, base = c.nics_per_node, 2 * P
            G = c.devices_per_node
            egress = base + self._node(src) * nics + c.nic_of(src % G)
            ingress = base + c.nodes * nics + self._node(dst) * nics + c.nic_of(dst % G)
            resources, latency, inter = (egress, ingress), c.inter_latency, True
        bw = c.inter_bw if inter else c.intra_bw
        return _Transfer((send, recv), nbytes, resources, latency, ("p",) + key, inter, 1, self._node(src), bw)

    def _node(self, rank: int) -> int:
        """The cluster node of a rank (TawPipe groups may be smaller than a node; links follow the hardware)."""
        return rank // self.c.devices_per_node

    def _collective(self, members: list[_Posted], key: tuple) -> _Transfer:
        """A node's broadcast or reduce: the buffer flows through every member's links (pipelined). Striped, the
        all-gather of weights and the reduce-scatter of gradients (each member exchanges ``1 / G`` with every other)
        and the scatter of weights and gather of gradients (the root sends, or receives, each member's ``1 / G``)
        move ``(G - 1) / G`` of the chunk through each link they use."""
        P = self.c.world_size
        ranks = [m.rank for m in members]
        first = members[0].action
        resources = tuple(ranks) + tuple(P + x for x in ranks) + self.cpu_res
        nbytes, receivers = self._bytes(first), len(ranks) - 1
        if first.op in _STRIPED_COLLECTIVES:
            nbytes *= (len(ranks) - 1) / len(ranks)
            if first.op is Op.GATHER_W or first.op is Op.REDUCE_SCATTER_G:
                receivers = len(ranks)  # every member receives (G - 1) / G of the chunk
            elif first.op is Op.SCATTER_W:
                receivers = 1  # the root's (G - 1) / G leaves through its link once, split among the members
                resources = (first.peer,) + tuple(P + x for x in ranks if x != first.peer) + self.cpu_res
            else:  # a gather: the members' stripes arrive through the root's link
                receivers = 1
                resources = tuple(x for x in ranks if x != first.peer) + (P + first.peer,) + self.cpu_res
        hops = max(1, (len(ranks) - 1).bit_length())  # tree depth: latency grows with log2 of the node size
        return _Transfer(tuple(members), nbytes, resources, hops * self.c.intra_latency, ("c",) + key, False,
                         receivers, self._node(ranks[0]), self.c.intra_bw)

    def _exchange(self, members: list[_Posted], key: tuple) -> _Transfer:
        """A ring all-reduce between the holders (one per node): each sends and receives ``2 (N - 1) / N`` of the
        gradient through its own NIC, over ``2 (N - 1)`` steps."""
        c, n = self.c, len(members)
        base, nics, G = 2 * c.world_size, c.nics_per_node, c.devices_per_node
        resources = tuple(base + self._node(m.rank) * nics + c.nic_of(m.rank % G) for m in members)
        resources += tuple(base + c.nodes * nics + self._node(m.rank) * nics + c.nic_of(m.rank % G) for m in members)
        nbytes = self._bytes(members[0].action) * 2 * (n - 1) / n
        return _Transfer(tuple(members), nbytes, resources, 2 * (n - 1) * c.inter_latency, ("x",) + key, True, n,
                         tuple(self._node(m.rank) for m in members), c.inter_bw)

    def _matched(self, now: float, t: _Transfer) -> None:
        """Both/all sides posted: start now, or after the communicator's previous operation."""
        q = self.comm_queue.get(t.key)
        if q is None:
            q = self.comm_queue[t.key] = deque()
        q.append(t)
        if len(q) == 1:
            self._start(now, t)

    def _start(self, now: float, t: _Transfer) -> None:
        self.res.n_transfers += 1
        self.res.intra_bytes += 0.0 if t.inter else t.nbytes * t.receivers
        if t.inter:
            for node in t.src_node if isinstance(t.src_node, tuple) else (t.src_node,):  # an exchange: every holder's
                self.res.inter_bytes += t.nbytes
                self.node_egress[node] += t.nbytes
        if t.nbytes <= 0:
            self._push(now + t.latency, self._done, (t,))
        else:
            self._push(now + t.latency, self._flow, (t,))

    def _flow(self, now: float, t: _Transfer) -> None:
        self.net.start(now, t.nbytes / t.bw, t.resources, 1.0, lambda time, t=t: self._done(time, t))

    def _done(self, now: float, t: _Transfer) -> None:
        for p in t.members:
            p.done = True
            self.unfinished[p.rank] -= 1
            if self.deferred[p.rank]:
                self._post_deferred(now, p.rank)
            if p.waiters:
                for r, key in p.waiters:
                    self.wait_by_op[key] = self.wait_by_op.get(key, 0.0) + now - self.blocked_since[r]
                    self._advance(now, r)
                p.waiters = None
            else:
                self._maybe_finish(now, p.rank)
        q = self.comm_queue[t.key]
        q.popleft()
        if q:
            self._start(now, q[0])
