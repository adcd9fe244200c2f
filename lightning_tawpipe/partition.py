"""Cut the model's pipeline units into contiguous chunks, one chunk per rank.

A *unit* is the smallest piece the pipeline moves: the token embedding, one transformer block, or the final
norm + LM head. The embedding rides in chunk 0 and the head in the last chunk, so they are owned (device-bound)
like blocks instead of replicated on every rank; with a Llama-3 vocabulary they are a third of a 1B model.

Two methods, with DeepSpeed's meaning:

* ``"uniform"``: the same number of units per chunk (the first chunks take the remainder);
* ``"parameters"``: contiguous chunks whose parameter counts are as even as possible (minimises the largest chunk,
  which sizes every working buffer and the slowest pipeline step).
"""

from __future__ import annotations

from collections.abc import Sequence

PARTITION_METHODS = ("parameters", "uniform")


def partition_units(unit_sizes: Sequence[int], n_chunks: int, method: str = "parameters") -> list[range]:
    """Split units ``0..len(unit_sizes)-1`` into ``n_chunks`` non-empty contiguous ranges."""
    n_units = len(unit_sizes)
    if method not in PARTITION_METHODS:
        raise ValueError(f"Unknown partition method {method!r}; choose one of {PARTITION_METHODS}.")
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
