"""A schedule: the programs of all ranks plus what is needed to read them, and a helper to assemble them.

Builders place actions at *points*: point ``p`` is "right after this rank's compute step ``p``" (point ``-1`` is
before the first compute). :class:`ProgramBuilder` collects them and flattens them into the program in order:
head, point -1, compute 0, point 0, compute 1, ..., point S-1, tail.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from lightning_tawpipe.schedule.actions import Action, Op, format_program
from lightning_tawpipe.topology import Topology


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

    @property
    def n_chunks(self) -> int:
        return len(self.owners)

    def program(self, rank: int) -> tuple[Action, ...]:
        return self.programs[rank]

    def compute_steps(self, rank: int) -> list[Action]:
        return [a for a in self.programs[rank] if a.op in (Op.FORWARD, Op.BACKWARD)]

    def dump(self) -> str:
        """One line per rank, ``rank: action action ...`` (the CSV-like form of torch pipelining)."""
        return "\n".join(f"{r}: {format_program(list(p))}" for r, p in enumerate(self.programs))


def sample_major_steps(n_chunks: int, n_microbatches: int, train: bool) -> list[Step]:
    """Each micro-batch goes forward through every chunk, then backward (the paper's order)."""
    steps: list[Step] = []
    for mb in range(n_microbatches):
        steps += [Step(Op.FORWARD, c, mb) for c in range(n_chunks)]
        if train:
            steps += [Step(Op.BACKWARD, c, mb) for c in reversed(range(n_chunks))]
    return steps


@dataclass
class Load:
    """A chunk resident in a weight slot for consecutive compute steps ``first..last``."""

    chunk: int
    first: int
    last: int
    slot: int = -1


def residency(steps: list[Step], n_slots: int) -> list[Load]:
    """Group consecutive steps on the same chunk (e.g. the F(P-1)/B(P-1) turnaround) into one load per slot use."""
    loads: list[Load] = []
    for j, step in enumerate(steps):
        if loads and loads[-1].chunk == step.chunk:
            loads[-1].last = j
        else:
            loads.append(Load(step.chunk, j, j, slot=len(loads) % n_slots))
    return loads


class ProgramBuilder:
    """Collects actions by point for one rank and flattens them into a program."""

    def __init__(self, n_steps: int) -> None:
        self.n_steps = n_steps
        self.head: list[Action] = []
        self.points: dict[int, list[Action]] = defaultdict(list)
        self.compute: dict[int, Action] = {}
        self.tail: list[Action] = []

    def at(self, point: int) -> list[Action]:
        if not -1 <= point < self.n_steps:
            raise ValueError(f"point {point} outside -1..{self.n_steps - 1}")
        return self.points[point]

    def build(self) -> tuple[Action, ...]:
        out = list(self.head) + self.points.get(-1, [])
        for j in range(self.n_steps):
            out.append(self.compute[j])
            out += self.points.get(j, [])
        return tuple(out + self.tail)
