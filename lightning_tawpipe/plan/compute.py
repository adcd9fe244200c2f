"""How long a device takes to run one pipeline unit forward or backward: a FLOP model calibrated on measurements.

``time = max(floor, flops / rate)``: a block computes at a sustained rate (fitted to measured block times), but never
faster than a fixed floor (kernel launches and Python dispatch dominate small blocks: on an H100 a H=1024 block takes
~3.5 ms forward+backward whatever the sequence length below 4k). Backward is twice the forward; activation
checkpointing adds one more forward to every backward.

Calibrations:

* :meth:`ComputeModel.from_gpu_single`: from ``benchmarks/results/gpu/gpu_single.json`` (real LitGPT blocks on an
  H100, micro-batch 1): the rows of the closest hidden size and the dtype of the precision;
* :meth:`ComputeModel.from_device`: a device's peak FLOP/s times an efficiency (no measurement at hand);
* :meth:`ComputeModel.scaled`: the CPU testbed, scaled so the simulated compute-only step equals the measured one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from lightning_tawpipe.plan.workload import Workload

FORWARD_SHARE = 1.0 / 3.0  # forward / (forward + backward): measured 0.31-0.33 on CPU and H100 for LLaMA blocks


@dataclass(frozen=True)
class ComputeModel:
    """Sustained FLOP/s for blocks and for the head, and the per-unit time floors (seconds, forward+backward)."""

    block_rate: float
    head_rate: float
    block_floor: float = 0.0
    head_floor: float = 0.0
    source: str = "device peak x efficiency"

    @classmethod
    def from_device(cls, flops: float, efficiency: float = 0.45) -> ComputeModel:
        return cls(block_rate=flops * efficiency, head_rate=flops * efficiency,
                   source=f"{flops / 1e12:.0f} TFLOP/s x {efficiency:.2f}")

    @classmethod
    def from_gpu_single(cls, path: str, n_embd: int, precision: str) -> ComputeModel:
        """Fit to the per-block measurements of ``benchmarks/gpu_single.py`` (closest ``n_embd``, matching dtype)."""
        with open(path) as f:
            rows = [r for r in json.load(f)["blocks"] if "error" not in r]
        dtype = "float32" if precision == "32-true" else "bfloat16"
        rows = [r for r in rows if r["dtype"] == dtype]
        if not rows:
            raise ValueError(f"{path} has no {dtype} block measurements.")
        best = min({r["n_embd"] for r in rows}, key=lambda h: abs(h - n_embd))
        rows = sorted((r for r in rows if r["n_embd"] == best), key=lambda r: r["seq"])
        label = rows[0]["block"]
        rows = [r for r in rows if r["block"] == label]
        block_rate, block_floor = _fit([(_block_flops(r), r["forward_backward_s"]) for r in rows])
        head_rate, head_floor = _fit([(6.0 * r["head_params"] * r["seq"], r["head_forward_backward_s"]) for r in rows])
        return cls(block_rate, head_rate, block_floor, head_floor, source=f"{path} ({label}, {dtype})")

    def scaled(self, factor: float, source: str | None = None) -> ComputeModel:
        """Every time multiplied by ``factor`` (rates divided, floors multiplied)."""
        return replace(self, block_rate=self.block_rate / factor, head_rate=self.head_rate / factor,
                       block_floor=self.block_floor * factor, head_floor=self.head_floor * factor,
                       source=source or f"{self.source} x {factor:.3f}")

    # -- per unit ---------------------------------------------------------------------------------------------------
    def unit_times(self, w: Workload) -> list[tuple[float, float]]:
        """(forward, backward) seconds of every pipeline unit for one micro-batch, in forward order."""
        m = w.model
        dense, attn = m.block_flops(w.seq, w.micro_batch)
        block = max(self.block_floor, 3.0 * (dense + attn) / self.block_rate)
        head = max(self.head_floor, 3.0 * m.head_flops(w.seq, w.micro_batch) / self.head_rate)
        embed = 0.02 * block  # a gather forward and a scatter-add backward: memory-bound, a few % of a block
        out = []
        for total in [embed] + [block] * m.n_layer + [head]:
            fwd = total * FORWARD_SHARE
            bwd = total - fwd + (fwd if w.activation_checkpointing else 0.0)
            out.append((fwd, bwd))
        return out


def _block_flops(row: dict) -> float:
    """Forward+backward FLOPs of a measured block row, counted as :meth:`ModelShape.block_flops` counts them."""
    s, h = row["seq"], row["n_embd"]
    dense = 2.0 * (row["block_params"] - 2 * h) * s
    attn = 2.0 * s * s * h
    return 3.0 * (dense + attn)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(rate, floor) for ``t = max(floor, flops / rate)``: the floor is the fastest measurement; the rate comes from
    the points clearly above it (at least 1.25x), or from the largest one if none is."""
    floor = min(t for _, t in points)
    above = [(f, t) for f, t in points if t >= 1.25 * floor] or [max(points)]
    rate = sum(f for f, _ in above) / sum(t for _, t in above)
    return rate, floor
