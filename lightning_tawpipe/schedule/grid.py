"""Print a schedule as a step x rank grid: one row per global tick, one column per rank.

The programs themselves carry no clock (every action waits only for what it depends on), so the grid places each
rank's compute steps on the *intended* global timeline of its schedule:

* TawPipe: every rank of node ``n`` runs its ``j``-th compute at tick ``j + n`` (node ``n`` is ``n`` steps behind
  node 0, so at any tick the nodes work on consecutive chunks);
* WeiPipe (more than one rank): rank ``r`` runs the forward of chunk ``c``, micro-batch ``m`` at ring slot
  ``r + m*P + c`` and its backward at slot ``r + P + m*P + (P - 1 - c)``, so one slot may hold a forward and a
  backward (shown as ``F0.1/B2.0``).

Cells show compute steps as ``F<chunk>.<mb>`` / ``B<chunk>.<mb>``, ``--`` when the rank is idle; a ``|`` separates
the nodes. With ``comm=True`` each compute is followed by the actions the rank posts after it (before its next
compute), in brackets, and a ``pre`` row shows what every rank does before its first compute.
"""

from __future__ import annotations

from lightning_tawpipe.schedule.actions import COMPUTE_OPS, Action, Op
from lightning_tawpipe.schedule.program import Schedule

EMPTY = "--"


def compute_ticks(schedule: Schedule) -> list[list[int]]:
    """For every rank, the global tick of each of its compute steps (in program order)."""
    P = schedule.topology.world_size
    ticks: list[list[int]] = []
    for rank in range(P):
        steps = schedule.compute_steps(rank)
        if schedule.name == "weipipe" and P > 1:
            ticks.append([_weipipe_slot(rank, a, P) for a in steps])
        else:
            lag = schedule.topology.group_of(rank)
            ticks.append([j + lag for j in range(len(steps))])
    return ticks


def _weipipe_slot(rank: int, a: Action, P: int) -> int:
    if a.op is Op.FORWARD:
        return rank + a.mb * P + a.chunk
    return rank + P + a.mb * P + (P - 1 - a.chunk)


def _label(a: Action) -> str:
    return f"{a.op.value}{a.chunk}.{a.mb}"


def format_grid(schedule: Schedule, comm: bool = False) -> str:
    """The schedule as text: a header row (``tick r0 r1 ...``), then one row per tick (see the module docstring)."""
    topo = schedule.topology
    P = topo.world_size
    ticks = compute_ticks(schedule)
    n_rows = 1 + max((t for ts in ticks for t in ts), default=-1)
    cells: list[list[list[str]]] = [[[] for _ in range(P)] for _ in range(n_rows)]
    pre: list[list[Action]] = [[] for _ in range(P)]
    for rank in range(P):
        segments: list[tuple[Action, list[Action]]] = []
        for a in schedule.programs[rank]:
            if a.op in COMPUTE_OPS:
                segments.append((a, []))
            elif segments:
                segments[-1][1].append(a)
            else:
                pre[rank].append(a)
        for (a, after), tick in zip(segments, ticks[rank]):
            text = _label(a)
            if comm and after:
                text += " [" + " ".join(str(x) for x in after) + "]"
            cells[tick][rank].append(text)

    rows = [["tick"] + [f"r{r}" for r in range(P)]]
    if comm:
        rows.append(["pre"] + [("[" + " ".join(str(x) for x in pre[r]) + "]") if pre[r] else EMPTY for r in range(P)])
    for tick in range(n_rows):
        rows.append([str(tick)] + ["/".join(c) if c else EMPTY for c in cells[tick]])
    widths = [max(len(row[i]) for row in rows) for i in range(P + 1)]

    lines = []
    for row in rows:
        parts = [row[0].rjust(widths[0])]
        for r in range(P):
            sep = " | " if r > 0 and topo.local_index(r) == 0 else "  "
            parts.append(sep + row[r + 1].ljust(widths[r + 1]))
        lines.append("".join(parts).rstrip())
    return "\n".join(lines)
