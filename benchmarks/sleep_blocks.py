"""Transformer blocks that sleep instead of computing: time the communication engine as if every rank had a GPU.

    python -m benchmarks.speed ... --sleep_blocks 18.4,36.8   # every block: 18.4 ms forward, 36.8 ms backward
                                                              # per sample of its (micro-)batch
    python -m benchmarks.speed ... --sleep_blocks 18.4,36.8,0.15   # each sleep drawn within +-15% of that

Why: on a CPU testbed a rank's compute and its communication share the same cores, so a step measures both the
schedule's exposed communication and the CPU that gloo and the kernel take from compute. On a GPU cluster compute
runs on the device and leaves the host's cores to the communication threads. With ``--sleep_blocks`` every LitGPT
``Block`` holds its rank for a fixed time without using a core (``time.sleep`` releases the CPU and the GIL), so even
the 2-core box has its cores free for gloo, the kernel's TCP work and the link shaping, and the step time shows
what the schedule and the engine leave exposed. The embedding, the head, the loss and the optimizer step still run
for real. This is a diagnostic for the benchmark only: the model learns nothing in its blocks (their backward
returns zero gradients, which the engines still reduce, send and apply like any other).

The durations to use for a host are the planner's calibrated per-block times (``benchmarks.plan_validate``).
"""

from __future__ import annotations

import random
import time

import torch


def parse_sleep_blocks(text: str) -> tuple[float, float, float]:
    """``"18.4,36.8"`` (milliseconds) -> (forward s, backward s, jitter 0); ``"18.4,36.8,0.15"``: +-15% jitter."""
    try:
        values = [float(x) for x in text.split(",")]
        if len(values) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ValueError(f"--sleep_blocks takes FORWARD_MS,BACKWARD_MS[,JITTER] (e.g. 18.4,36.8 or 18.4,36.8,0.15), "
                         f"got {text!r}") from None
    fwd, bwd, jitter = (*values, 0.0)[:3]
    if fwd < 0 or bwd < 0 or not 0 <= jitter < 1:
        raise ValueError(f"--sleep_blocks durations must be >= 0 ms and the jitter in [0, 1), got {text!r}")
    return fwd / 1e3, bwd / 1e3, jitter


class _SleepingBlock(torch.autograd.Function):
    """Identity on the activations that sleeps; backward sleeps and gives every block parameter a zero gradient.

    The sleep scales with the samples in the batch (``x.shape[0]``), as a device's compute does once it is busy: a
    batch of 4 in one call holds the rank as long as 4 micro-batches of 1, so every strategy computes the same
    per-rank work whatever its micro-batching."""

    @staticmethod
    def forward(ctx, forward_s: float, backward_s: float, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        samples = x.shape[0] if x.dim() > 1 else 1
        time.sleep(_jittered(forward_s * samples))
        ctx.backward_s = backward_s * samples
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(_jittered(ctx.backward_s))
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.param_meta]
        return (None, None, grad, *zeros)


_JITTER = {"fraction": 0.0, "rng": random.Random(0)}


def _jittered(seconds: float) -> float:
    j = _JITTER["fraction"]
    return seconds * (1.0 + _JITTER["rng"].uniform(-j, j)) if j else seconds


def install(forward_s: float, backward_s: float, jitter: float = 0.0, seed: int = 0) -> None:
    """Make every LitGPT ``Block`` of this process sleep for ``forward_s`` / ``backward_s`` instead of computing.

    ``jitter`` draws each sleep uniformly within +-jitter of its duration (seeded per process with ``seed``): real
    compute steps vary, and ranks that wait on each other within a step pay for the slowest of them each time.
    """
    from litgpt.model import Block

    _JITTER.update(fraction=jitter, rng=random.Random(seed))

    def sleeping_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        params = [p for p in self.parameters() if p.requires_grad]
        return _SleepingBlock.apply(forward_s, backward_s, x, *params)

    Block.forward = sleeping_forward
