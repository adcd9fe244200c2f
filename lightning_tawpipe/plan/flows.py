"""Bandwidth sharing: transfers in flight share every resource they cross (a NIC direction, a device's link).

A *flow* moves ``work`` (seconds at full speed: a transfer's bytes over its link bandwidth, or seconds of
single-core compute on the CPU testbed) across a set of resources, whose capacities count full-speed flows (1 for a
link direction, the number of cores for the testbed's CPU). Each resource divides its capacity equally among the flows crossing it, and a flow runs at the smallest
share it gets, never faster than its own ``cap``. So two equal transfers through one NIC each take twice as long as
one alone, a weight receive and a gradient send through the same full-duplex NIC do not slow each other (different
directions), and on a 2-core machine four computing ranks each run at half speed.

Equal shares are simpler than max-min fairness (a flow held back elsewhere does not hand its unused share to the
others) but need only the flows of the resources whose population changed to be re-rated, which keeps the
simulation of a 1024-rank schedule fast. The event loop owns the clock; this module only answers "when does each
flow finish, given what else is running".
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Flow:
    __slots__ = ("work", "rate", "since", "resources", "cap", "version", "on_done")

    def __init__(self, work: float, resources: tuple[int, ...], cap: float, on_done: Callable[[float], None]) -> None:
        self.work, self.resources, self.cap, self.on_done = work, resources, cap, on_done
        self.rate, self.since, self.version = 0.0, 0.0, 0


class Network:
    """Resources with capacities and the flows crossing them; completions are pushed onto the caller's heap."""

    def __init__(self, capacities: list[float], heap: list, counter: Callable[[], int]) -> None:
        self.capacity = list(capacities)
        self.flows: list[set[Flow]] = [set() for _ in capacities]
        self.heap, self.counter = heap, counter

    def add_resource(self, capacity: float) -> int:
        self.capacity.append(capacity)
        self.flows.append(set())
        return len(self.capacity) - 1

    def start(self, now: float, work: float, resources: tuple[int, ...], cap: float,
              on_done: Callable[[float], None]) -> Flow:
        """Start a flow at ``now``; ``on_done(time)`` is called by :meth:`complete` when its event fires."""
        flow = Flow(work, resources, cap, on_done)
        flow.since = now
        affected: set[Flow] = {flow}
        for r in resources:
            self.flows[r].add(flow)
            if len(self.flows[r]) > 1:
                affected |= self.flows[r]
        self._rerate(now, affected)
        return flow

    def complete(self, now: float, flow: Flow, version: int) -> None:
        """Handle a completion event; stale events (the flow was re-rated since) are ignored."""
        if version != flow.version:
            return
        affected: set[Flow] = set()
        for r in flow.resources:
            self.flows[r].discard(flow)
            affected |= self.flows[r]
        flow.version = -1
        if affected:
            self._rerate(now, affected)
        flow.on_done(now)

    def _rerate(self, now: float, flows: set[Flow]) -> None:
        cap, pop = self.capacity, self.flows
        for f in flows:
            if f.rate > 0.0:
                f.work -= f.rate * (now - f.since)
            f.since = now
            rate = f.cap
            for r in f.resources:
                share = cap[r] / len(pop[r])
                if share < rate:
                    rate = share
            if rate == f.rate and f.version > 0:
                continue  # unchanged: its pending completion event is still right
            f.rate = rate
            f.version += 1
            remaining = f.work if f.work > 0.0 else 0.0
            heapq.heappush(self.heap, (now + remaining / rate, self.counter(), self.complete, (f, f.version)))
