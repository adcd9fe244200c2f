"""Render a plan for people (a table, the recommendation, the warnings) and for programs (JSON)."""

from __future__ import annotations

from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.planner import Plan
from lightning_tawpipe.schedule.tawpipe import default_grad_buffers
from lightning_tawpipe.topology import Topology


def _label(p, cluster: Cluster) -> str:
    """The strategy and its knobs; partition and gradient buffers only where they are not the strategy's default."""
    shown = ("prefetch", "group_size", "defer_allreduce", "replicate_first_chunk", "stripe", "microbatch_order")
    default_gb = None
    if "grad_buffers" in p.knobs:
        group = p.knobs.get("group_size") or cluster.devices_per_node
        default_gb = default_grad_buffers(Topology.from_world(cluster.world_size, group), None)
    knobs = ",".join(f"{k}={v}" for k, v in p.knobs.items()
                     if k in shown or (k == "partition" and v != "parameters")
                     or (k == "grad_buffers" and v != default_gb))
    return f"{p.strategy}({knobs})" if knobs else p.strategy


def table(plan: Plan) -> str:
    c, w = plan.cluster, plan.workload
    head = [c.describe(),
            f"model {w.model.name}: {w.model.n_layer} layers, H={w.model.n_embd}, {w.model.n_params / 1e9:.2f} B params; "
            f"S={w.seq}, micro-batch {w.micro_batch} x {w.n_microbatches} per device, {w.precision}",
            f"compute: {plan.compute.source}", ""]
    rows = [("strategy", "step ms", "tok/s", "inter MB/node", "intra MB", "bubble", "exposed comm ms",
             "peak GB/dev", "fits", "method")]
    for p in sorted(plan.predictions, key=lambda p: p.step_time):
        rows.append((_label(p, c), f"{p.step_time * 1e3:.1f}", f"{p.tokens_per_s(plan.tokens_per_step):.0f}",
                     f"{p.inter_node_bytes_per_node / 1e6:.1f}", f"{p.intra_node_bytes / 1e6:.0f}",
                     f"{p.bubble:.1%}", f"{p.exposed_comm * 1e3:.1f}", f"{p.memory.total / 1e9:.2f}",
                     "yes" if p.fits else "NO", p.method))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = head + ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines += ["", f"recommended: {plan.recommended} - {plan.reason}"]
    lines += [f"warning: {x}" for x in plan.warnings]
    return "\n".join(lines)


def as_json(plan: Plan) -> dict:
    return {
        "cluster": vars(plan.cluster),
        "workload": {"model": vars(plan.workload.model), "seq": plan.workload.seq,
                     "micro_batch": plan.workload.micro_batch, "n_microbatches": plan.workload.n_microbatches,
                     "precision": plan.workload.precision},
        "compute": vars(plan.compute),
        "tokens_per_step": plan.tokens_per_step,
        "predictions": [p.as_dict() for p in plan.predictions],
        "recommended": plan.recommended,
        "reason": plan.reason,
        "warnings": plan.warnings,
    }
