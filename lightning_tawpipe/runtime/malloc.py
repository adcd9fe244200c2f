"""Keep the threads of interleaved micro-batches on the process's main malloc arena (CPU runs, glibc).

Why: in chunk-major order (and in WeiPipe's interleaving) each micro-batch's ``training_step`` runs on its own thread
(``runtime/microbatch.py``). glibc gives every new thread its own malloc arena, so on CPU each micro-batch's
activations are allocated in a different arena and freed by the thread that runs the backward. Measured on the 2-core
box (2 x 2 ranks, 4 micro-batches of 1 sample, S=512, chunk-major, unlimited link): peak RSS 1.6-1.7 GB per rank and
8.1 CPU-seconds per step with an arena per thread, 1.0 GB and 6.8 CPU-seconds with one arena
(``MALLOC_ARENA_MAX=1``), which made the step 18% shorter. One arena costs a lock per allocation; only one micro-batch
thread computes at a time, so it is uncontended there. CUDA tensors do not come from malloc, so nothing changes for
them. The limit only binds arenas created after it, so the strategies set it before the process group starts its
threads (``TawPipeEnvironment._share_malloc_arena_if_interleaved``): set once the first iteration had begun, threads
that gloo and the engine's helpers had started already held arenas, and the step was as slow as without it.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter: the most arenas the process may create
_limited = False


def share_main_arena() -> bool:
    """Have threads created from now on allocate from the main arena (``mallopt(M_ARENA_MAX, 1)``), once per process.
    Returns whether the limit is in place; False where the C library has no ``mallopt`` (not glibc)."""
    global _limited
    if _limited:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _limited = mallopt(M_ARENA_MAX, 1) == 1
    if _limited:
        log.info("TawPipe: micro-batch threads share the main malloc arena (see lightning_tawpipe/runtime/malloc.py)")
    return _limited
