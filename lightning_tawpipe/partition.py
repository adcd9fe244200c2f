"""Cut the model's pipeline units into contiguous chunks, one chunk per rank.

A *unit* is the smallest piece the pipeline moves: the token embedding, one transformer block, or the final
norm + LM head. The embedding rides in chunk 0 and the head in the last chunk, so they are owned (device-bound)
like blocks instead of replicated on every rank; with a Llama-3 vocabulary they are a third of a 1B model.

Two methods, with DeepSpeed's meaning:

* ``"uniform"``: the same number of units per chunk (the first chunks take the remainder);
* ``"parameters"``: contiguous chunks whose parameter counts are as even as possible (minimises the largest chunk,
  which sizes every working buffer and the slowest pipeline step).

Or explicit: a list of units per chunk, e.g. ``[2, 3, 2, 3]`` for 10 units on 4 ranks (as DeepSpeed's and
torchtitan's manual split points). Why: between iterations a weight pipeline always exposes the round trip of
chunk 0 (its gradient is made last, its weights are needed first; ``plan/floor.py``), so on slow links a lighter
chunk 0 can beat the balanced cut even though it enlarges the largest chunk. ``python -m lightning_tawpipe.plan``
predicts both.
"""

from __future__ import annotations

from collections.abc import Sequence

PARTITION_METHODS = ("parameters", "uniform")


def check_partition(partition: str | Sequence[int]) -> None:
    """Refuse a partition knob that cannot be right for any model (its sums are checked against the model later)."""
    if isinstance(partition, str):
        if partition not in PARTITION_METHODS:
            raise ValueError(f"partition must be one of {PARTITION_METHODS} or a list of units per chunk, "
                             f"got {partition!r}.")
        return
    counts = list(partition) if isinstance(partition, (list, tuple)) else None
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"An explicit partition is a list of positive ints, the units (embedding, blocks, head) of "
                         f"each rank's chunk in order, e.g. [2, 3, 2, 3]; got {partition!r}.")


def parse_partition(text: str) -> str | list[int]:
    """A command line's ``--partition``: a method name, or comma-separated units per chunk (``2,1,2,3``)."""
    return [int(n) for n in text.split(",")] if text.strip()[:1].isdigit() else text


def partition_units(unit_sizes: Sequence[int], n_chunks: int, method: str | Sequence[int] = "parameters"
                    ) -> list[range]:
    """Split units ``0..len(unit_sizes)-1`` into ``n_chunks`` non-empty contiguous ranges."""
    n_units = len(unit_sizes)
    check_partition(method)
    if not isinstance(method, str):
        return _explicit(list(method), n_units, n_chunks)
    if n_chunks < 1:
        raise ValueError(f"Need at least one chunk, got {n_chunks}.")
    if n_units < n_chunks:
        raise ValueError(
            f"The model has {n_units} pipeline units (embedding, blocks, head) but {n_chunks} ranks each need a chunk "
            f"of at least one unit. Use a model with more layers, or fewer ranks."
        )
    if method == "uniform":
        return _uniform(n_units, n_chunks)
    return _balanced(list(unit_sizes), n_chunks)


def _explicit(counts: list[int], n_units: int, n_chunks: int) -> list[range]:
    if len(counts) != n_chunks or sum(counts) != n_units:
        raise ValueError(
            f"partition={counts} gives {len(counts)} chunk(s) of {sum(counts)} unit(s), but this pipeline has "
            f"{n_chunks} rank(s) and the model {n_units} pipeline units (embedding, blocks, head): list one "
            f"count per rank, summing to {n_units}."
        )
    bounds, start = [], 0
    for n in counts:
        bounds.append(range(start, start + n))
        start += n
    return bounds


def _uniform(n_units: int, n_chunks: int) -> list[range]:
    base, extra = divmod(n_units, n_chunks)
    bounds, start = [], 0
    for c in range(n_chunks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def _greedy_pack(sizes: list[int], capacity: int) -> list[range]:
    """Pack units left to right, starting a new chunk whenever ``capacity`` would be exceeded."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > capacity:
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    chunks.append(range(start, len(sizes)))
    return chunks


def _balanced(sizes: list[int], n_chunks: int) -> list[range]:
    """Smallest capacity (binary search) whose greedy packing needs at most ``n_chunks`` chunks, then split to fit."""
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy_pack(sizes, mid)) <= n_chunks:
            hi = mid
        else:
            lo = mid + 1
    chunks = _greedy_pack(sizes, lo)
    while len(chunks) < n_chunks:  # splitting a multi-unit chunk never raises the maximum
        i = max((j for j, r in enumerate(chunks) if len(r) > 1), key=lambda j: sum(sizes[u] for u in chunks[j]))
        r = chunks[i]
        chunks[i : i + 1] = [range(r.start, r.stop - 1), range(r.stop - 1, r.stop)]
    return chunks
