"""Run the user's per-micro-batch step in the order the schedule wants, even when it interleaves micro-batches.

TawPipe's order is sample-major (micro-batch 0 forward and backward, then micro-batch 1, ...), so a plain loop over
micro-batches follows it. WeiPipe interleaves: the forward of micro-batch ``m + 1`` alternates with the backward of
micro-batch ``m``, chunk by chunk. A user's ``training_step`` cannot be cut in half, so each micro-batch runs in its
own thread and the threads pass a baton: exactly one runs at a time, and whenever the schedule's next compute
action belongs to another micro-batch, the running thread hands the baton to that one and waits. Execution stays
sequential and deterministic; the threads only exist to keep each micro-batch's Python stack alive while another
one runs. (CPU autograd runs a backward on the thread that called it, so a backward can pause mid-way. CUDA runs
backward on a per-device autograd thread; at most one backward is ever in flight here, so it pauses in the same way:
that thread counts as the micro-batch holding the baton, whose thread waits in ``loss.backward()``.)

Chunk-major order (``microbatch_order="chunk"``) runs every micro-batch through a chunk before the next chunk, so it
interleaves too, in the forward. Its backward does not pause: the engine cuts the graph between chunks, a
micro-batch's own ``loss.backward()`` ends at its last chunk, and once every micro-batch has run the engine runs the
remaining backward steps itself, one complete autograd call each (``Engine.cut``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


class MicrobatchRunner:
    """Runs ``step(i)`` for ``i in range(n)`` in the interleaving dictated by ``engine``'s program."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._turn: int | None = None
        self._local = threading.local()
        self._error: BaseException | None = None

    def run(self, n: int, step: Callable[[int], Any]) -> list[Any]:
        if not self.engine.interleaves_microbatches():
            return [step(i) for i in range(n)]
        results: list[Any] = [None] * n
        self._threads = torch.get_num_threads()
        self.engine.gate = self._gate
        self.engine.thread_microbatch = self._microbatch
        threads = [threading.Thread(target=self._worker, args=(i, step, results), daemon=True) for i in range(n)]
        with self._cv:
            self._turn, self._error = self._next_owner(), None
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.engine.gate = None
            self.engine.thread_microbatch = lambda: None
        if self._error is not None:
            raise self._error
        self.engine.run_cut_backward()  # chunk-major: the backward steps below each micro-batch's last chunk
        return results

    def _next_owner(self) -> int | None:
        nxt = self.engine.peek_compute()
        return None if nxt is None else nxt.mb

    def _worker(self, i: int, step: Callable[[int], Any], results: list[Any]) -> None:
        self._local.mb = i
        # OpenMP keeps the intra-op thread count per thread: a new thread would compute with every core, whatever
        # torch.set_num_threads said in the caller (measured: 2 threads per matmul on the 2-core box, where 4 ranks
        # then oversubscribe the cores). Set it again here, to the caller's.
        torch.set_num_threads(self._threads)
        try:
            self._wait_for_turn(i)
            results[i] = step(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            with self._cv:
                self._error = self._error or e
                self._cv.notify_all()
            return
        with self._cv:
            self._turn = self._next_owner()
            self._cv.notify_all()

    def _wait_for_turn(self, i: int) -> None:
        with self._cv:
            while self._turn != i:
                if self._error is not None:
                    raise RuntimeError("another micro-batch failed") from self._error
                self._cv.wait(timeout=1.0)

    def _microbatch(self) -> int | None:
        """The micro-batch the calling thread computes for: a worker's own, or for any other thread (CUDA's autograd
        thread running a worker's backward) that of the worker holding the baton, which is blocked in that backward."""
        return getattr(self._local, "mb", self._turn)

    def _gate(self, next_mb: int | None) -> None:
        """Called by the engine before advancing: hand over the baton if the next compute is not ours."""
        mine = self._microbatch()
        if next_mb is None or next_mb == mine:
            return
        with self._cv:
            self._turn = next_mb
            self._cv.notify_all()
        self._wait_for_turn(mine)


def batch_size(batch: Any) -> int:
    """The common leading size of the tensors in ``batch`` (raises if there is none or they differ)."""
    sizes = set()
    apply_to_collection(batch, Tensor, lambda t: sizes.add(t.shape[0]))
    if not sizes:
        raise ValueError("TawPipe could not find a tensor in the batch to split into micro-batches.")
    if len(sizes) > 1:
        raise ValueError(f"Batch tensors have different leading sizes {sorted(sizes)}; cannot split micro-batches.")
    return sizes.pop()


def split_batch(batch: Any, n: int) -> list[Any]:
    """Split every tensor in ``batch`` into ``n`` equal micro-batches along dim 0 (raises if it does not divide)."""
    size = batch_size(batch)
    if n > size or size % n:
        raise ValueError(
            f"n_microbatches={n} must divide the per-rank batch size {size}; choose a divisor of {size} or change "
            "the batch size."
        )
    pieces = [apply_to_collection(batch, Tensor, lambda t, i=i: t.chunk(n)[i]) for i in range(n)]
    return pieces
