"""``python -m lightning_tawpipe.plan``: which strategy to rent a cluster for, before renting it.

    python -m lightning_tawpipe.plan --nodes 3 --devices 8 --inter 10gbit --model tiny-llama-1.1b \\
        --override n_layer=48 n_embd=1024 n_head=16 n_query_groups=16 intermediate_size=4096 --seq 16384 \\
        --micro-batch 1 --microbatches 2 --precision bf16-mixed --calibration benchmarks/results/gpu/gpu_single.json

Prints every strategy's predicted step time, tokens/s, inter-node bytes per node, bubble, peak memory per device,
the recommendation and the warnings; ``--json`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from lightning_tawpipe.partition import parse_partition
from lightning_tawpipe.plan.cluster import Cluster, parse_rate, parse_seconds
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.planner import STRATEGIES, plan
from lightning_tawpipe.plan.report import as_json, table
from lightning_tawpipe.plan.workload import PRECISIONS, ModelShape, Workload


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_tawpipe.plan", description=__doc__.split("\n\n")[0])
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, required=True)
    c.add_argument("--devices", type=int, default=8, help="devices per node")
    c.add_argument("--intra", default="150GB", help="intra-node bandwidth per device per direction (e.g. 150GB)")
    c.add_argument("--inter", default="10gbit", help="bandwidth of one NIC per direction (e.g. 10gbit, 25GbE)")
    c.add_argument("--intra-latency", default="10us")
    c.add_argument("--inter-latency", default="50us")
    c.add_argument("--nics", type=int, default=1, help="NICs per node (1: shared Ethernet; = devices: multi-rail)")
    c.add_argument("--flops", type=float, default=400e12, help="sustainable dense FLOP/s of one device (peak)")
    c.add_argument("--efficiency", type=float, default=0.45, help="share of --flops reached without --calibration")
    c.add_argument("--memory", type=float, default=80, help="device memory, GB")
    c.add_argument("--mem-bw", default="2.5TB", help="device memory bandwidth")
    c.add_argument("--calibration", help="gpu_single.json with measured block times (benchmarks/gpu_single.py)")
    m = p.add_argument_group("model and batch")
    m.add_argument("--model", default="tiny-llama-1.1b", help="LitGPT config name")
    m.add_argument("--override", nargs="*", type=_override, default=[], help="config overrides, e.g. n_layer=48")
    m.add_argument("--seq", type=int, required=True)
    m.add_argument("--micro-batch", type=int, default=1)
    m.add_argument("--microbatches", type=int, default=1, help="micro-batches per device per step")
    m.add_argument("--precision", default="bf16-mixed", choices=sorted(PRECISIONS))
    m.add_argument("--activation-checkpointing", action="store_true")
    k = p.add_argument_group("strategies")
    k.add_argument("--strategies", default=",".join(STRATEGIES))
    k.add_argument("--prefetch", default="1,2", help="TawPipe prefetch depths to try")
    k.add_argument("--group-size", default="", help="TawPipe group sizes to try (divisors of --devices)")
    k.add_argument("--partition", action="append", type=parse_partition,
                   help="TawPipe partitions to try (repeatable): parameters, uniform, or units per chunk (2,3,2,3)")
    k.add_argument("--grad_buffers", default="",
                   help="TawPipe gradient buffer counts to try, e.g. 2,3 (more let backward outrun slow sends; "
                        "default: the strategy's, 3 with three or more nodes and 2 with fewer)")
    k.add_argument("--replicate_first_chunk", default="false", type=parse_mirrored,
                   help="TawPipe: mirror chunk 0 on every node (no chunk-0 round trip between steps, for its state "
                        "once more per node): false, true, 'both' (with and without), or numbers of leading chunks "
                        "to mirror, e.g. 0,1,2")
    k.add_argument("--stripe", default="auto", choices=["auto", "false", "true", "both"],
                   help="TawPipe: move remote weights and gradient sums in stripes over every NIC of a node: false, "
                        "true, both (with and without), or auto (default: both with --nics > 1, else false)")
    k.add_argument("--microbatch_order", default="auto", choices=["auto", "sample", "chunk", "both"],
                   help="TawPipe: micro-batch order: sample, chunk (every micro-batch through a chunk while it is "
                        "resident), both, or auto (default: both with --microbatches > 1, else sample)")
    p.add_argument("--json", help="also write the plan as JSON here")
    return p


def parse_mirrored(text: str) -> tuple[bool | int, ...]:
    """``--replicate_first_chunk``: false, true, both, or a comma list of leading-chunk counts."""
    named = {"false": (False,), "true": (True,), "both": (False, True)}
    if text in named:
        return named[text]
    try:
        counts = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected false, true, both or counts like 0,1,2; got {text!r}") from None
    if any(k < 0 for k in counts):
        raise argparse.ArgumentTypeError(f"chunk counts must be >= 0, got {text!r}")
    return counts


def _stripe_options(text: str) -> tuple[bool, ...] | None:
    """``--stripe``: which TawPipe variants to predict; ``auto`` (None) lets the planner try striping where a node
    has several NICs."""
    return {"auto": None, "false": (False,), "true": (True,), "both": (False, True)}[text]


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = Cluster(a.nodes, a.devices, intra_bw=parse_rate(a.intra), inter_bw=parse_rate(a.inter),
                      intra_latency=parse_seconds(a.intra_latency), inter_latency=parse_seconds(a.inter_latency),
                      nics_per_node=a.nics, device_flops=a.flops, device_memory=a.memory * 1e9,
                      mem_bw=parse_rate(a.mem_bw), name="cluster")
    shape = ModelShape.from_litgpt(a.model, **dict(a.override))
    workload = Workload(shape, a.seq, a.micro_batch, a.microbatches, a.precision, a.activation_checkpointing)
    if a.calibration:
        compute = ComputeModel.from_gpu_single(a.calibration, shape.n_embd, a.precision)
    else:
        compute = ComputeModel.from_device(a.flops, a.efficiency)
    groups = tuple(int(g) for g in a.group_size.split(",") if g) or (None,)
    result = plan(cluster, workload, compute, prefetch=tuple(int(d) for d in a.prefetch.split(",")),
                  group_sizes=groups, strategies=tuple(a.strategies.split(",")),
                  partitions=tuple(a.partition or ["parameters"]),
                  grad_buffers=tuple(int(b) for b in a.grad_buffers.split(",")) if a.grad_buffers else (None,),
                  replicate_first_chunk=a.replicate_first_chunk,
                  stripe=_stripe_options(a.stripe),
                  microbatch_order={"auto": None, "both": ("sample", "chunk")}.get(a.microbatch_order,
                                                                                 (a.microbatch_order,)))
    sys.stdout.write(table(result) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(as_json(result), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
