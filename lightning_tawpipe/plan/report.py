"""Render a plan for people (a table, the recommendation, the warnings) and for programs (JSON)."""

from __future__ import annotations

from lightning_tawpipe.plan.planner import Plan


def _label(p) -> str:
    shown = ("prefetch", "group_size", "defer_allreduce")
    knobs = ",".join(f"{k}={v}" for k, v in p.knobs.items()
                     if k in shown or (k == "partition" and v != "parameters") or (k == "grad_buffers" and v != 2))
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
        rows.append((_label(p), f"{p.step_time * 1e3:.1f}", f"{p.tokens_per_s(plan.tokens_per_step):.0f}",
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
