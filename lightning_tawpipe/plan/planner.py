"""Plan a training run: predict every strategy, recommend one, and say where TawPipe loses and why.

Recommendation rule: the fastest strategy whose peak memory fits the device. Warnings follow
``../research/tawpipe-algorithm.md`` §5 ("When TawPipe loses or ties"), each stated with this plan's own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_tawpipe.partition import parse_partition
from lightning_tawpipe.plan import analytic, weightpipe
from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.floor import boundary_floor
from lightning_tawpipe.plan.result import Prediction
from lightning_tawpipe.plan.workload import Workload

STRATEGIES = ("tawpipe", "weipipe", "fsdp", "hsdp", "1f1b", "ddp")


@dataclass
class Plan:
    cluster: Cluster
    workload: Workload
    compute: ComputeModel
    predictions: list[Prediction]
    recommended: str
    reason: str
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        return self.workload.tokens_per_rank * self.cluster.world_size

    def get(self, strategy: str) -> Prediction:
        """The best prediction of ``strategy`` (over its knobs)."""
        options = [p for p in self.predictions if p.strategy == strategy]
        if not options:
            raise KeyError(strategy)
        return min(options, key=lambda p: p.step_time)


def plan(cluster: Cluster, workload: Workload, compute: ComputeModel | None = None,
         prefetch: tuple[int, ...] = (1, 2), group_sizes: tuple[int | None, ...] = (None,),
         strategies: tuple[str, ...] = STRATEGIES, partitions: tuple = ("parameters",),
         grad_buffers: tuple[int | None, ...] = (None,),
         replicate_first_chunk: tuple[bool | int, ...] = (False,), stripe: tuple[bool, ...] | None = None,
         microbatch_order: tuple[str, ...] | None = None) -> Plan:
    """Predict ``strategies`` (TawPipe for every prefetch x group size x partition x gradient buffers x chunk-0
    mirrors x striping x micro-batch order; None: the strategy's default) and recommend one. ``stripe=None`` tries
    striped transfers where a node has several NICs; ``microbatch_order=None`` tries chunk-major order where there
    are several micro-batches."""
    if stripe is None:
        stripe = (False, True) if cluster.nics_per_node > 1 else (False,)
    if microbatch_order is None:
        microbatch_order = ("sample", "chunk") if workload.n_microbatches > 1 else ("sample",)
    compute = compute or ComputeModel.from_device(cluster.device_flops)
    preds: list[Prediction] = []
    skipped: list[str] = []
    for s in strategies:
        try:
            preds += _predict(s, cluster, workload, compute, prefetch, group_sizes, partitions, grad_buffers,
                              replicate_first_chunk, stripe, microbatch_order)
        except ValueError as err:  # e.g. fewer pipeline units than ranks: the strategy cannot run here
            if s not in STRATEGIES:
                raise
            skipped.append(f"{s} not applicable: {err}")
    if not preds:
        raise ValueError("no strategy applies: " + "; ".join(skipped))
    for p in preds:
        p.fits = p.memory.total <= cluster.device_memory
    best, reason = _recommend(preds, cluster)
    result = Plan(cluster, workload, compute, preds, best, reason)
    result.warnings = skipped + warnings(result)
    return result


def _predict(s: str, cluster: Cluster, workload: Workload, compute: ComputeModel, prefetch: tuple[int, ...],
             group_sizes: tuple[int | None, ...], partitions: tuple,
             grad_buffers: tuple[int | None, ...] = (None,),
             replicate_first_chunk: tuple[bool | int, ...] = (False,),
             stripe: tuple[bool, ...] = (False,), microbatch_order: tuple[str, ...] = ("sample",)) -> list[Prediction]:
    preds: list[Prediction] = []
    if s == "tawpipe":
        preds += [weightpipe.predict("tawpipe", cluster, workload, compute, prefetch=d, group_size=g, partition=q,
                                     grad_buffers=b, replicate_first_chunk=m, stripe=t, microbatch_order=o)
                  for d in prefetch for g in group_sizes for q in partitions for b in grad_buffers
                  for m in replicate_first_chunk for t in stripe for o in microbatch_order]
    elif s == "weipipe":
        preds.append(weightpipe.predict("weipipe", cluster, workload, compute, prefetch=max(prefetch),
                                        partition=partitions[0]))
    elif s == "fsdp":
        preds.append(analytic.fsdp(cluster, workload, compute))
    elif s == "hsdp":
        preds.append(analytic.fsdp(cluster, workload, compute, hybrid=True))
        if workload.n_microbatches > 1:
            preds.append(analytic.fsdp(cluster, workload, compute, hybrid=True, defer_allreduce=True))
    elif s == "1f1b":
        preds.append(analytic.onef1b(cluster, workload, compute))
    elif s == "ddp":
        preds.append(analytic.ddp(cluster, workload, compute))
    else:
        raise ValueError(f"unknown strategy {s!r}; choose from {STRATEGIES}")
    return preds


def _tawpipe_knobs(taw: Prediction) -> dict:
    """The knobs of a TawPipe prediction, as ``weightpipe.predict`` takes them (striping aside)."""
    k = taw.knobs
    return dict(prefetch=k["prefetch"], group_size=k["group_size"], partition=parse_partition(k["partition"]),
                grad_buffers=k["grad_buffers"], reuse=k["reuse"],
                replicate_first_chunk=k.get("replicate_first_chunk", False),
                microbatch_order=k.get("microbatch_order", "sample"))


def _recommend(preds: list[Prediction], cluster: Cluster) -> tuple[str, str]:
    fitting = sorted((p for p in preds if p.fits), key=lambda p: p.step_time)
    if not fitting:
        smallest = min(preds, key=lambda p: p.memory.total)
        return smallest.strategy, (f"nothing fits {cluster.device_memory / 1e9:.0f} GB per device; {smallest.strategy}"
                                   f" needs the least ({smallest.memory.total / 1e9:.1f} GB): add devices, "
                                   "checkpoint activations or shorten the sequence")
    best = fitting[0]
    runner = next((p for p in fitting if p.strategy != best.strategy), None)
    why = f"{best.strategy} is the fastest that fits ({best.step_time * 1e3:.0f} ms/step"
    if runner is not None:
        why += f", {runner.step_time / best.step_time:.2f}x faster than {runner.strategy}"
    why += f"; {best.memory.total / 1e9:.1f} GB of {cluster.device_memory / 1e9:.0f} GB)"
    too_big = [p.strategy for p in preds if not p.fits and p.step_time < best.step_time]
    if too_big:
        why += f"; faster but out of memory: {', '.join(sorted(set(too_big)))}"
    return best.strategy, why


def warnings(p: Plan) -> list[str]:
    """Where TawPipe loses or ties on this cluster (empty if it is not in the plan)."""
    try:
        taw = p.get("tawpipe")
    except KeyError:
        return []
    out, c, w = [], p.cluster, p.workload
    names = {q.strategy for q in p.predictions}
    if "1f1b" in names:
        pp = p.get("1f1b")
        if pp.inter_node_bytes < taw.inter_node_bytes:
            crossover = w.seq * taw.inter_node_bytes / max(pp.inter_node_bytes, 1.0)
            out.append(f"sequence too short for weight passing: at S={w.seq} activation passing (1F1B) moves "
                       f"{pp.inter_node_bytes / 1e6:.0f} MB across nodes per step vs TawPipe's "
                       f"{taw.inter_node_bytes / 1e6:.0f} MB of weights and gradients; the bytes cross over near "
                       f"S={crossover:,.0f} (1F1B predicted at {pp.step_time / taw.step_time:.2f}x TawPipe's step "
                       f"time, bubble {pp.bubble:.0%})")
    floor = boundary_floor(c, w, p.compute, parse_partition(taw.knobs.get("partition", "parameters")),
                           microbatch_order=taw.knobs.get("microbatch_order", "sample"))
    if floor.exposed > 0.05 * floor.compute:
        out.append(f"iteration boundary: chunk {floor.chunk}'s gradient must reach its owner and its new weights come "
                   f"back between one iteration's last backward and the next forward ({floor.round_trip * 1e3:.0f} ms "
                   f"at full link speed, {floor.slack * 1e3:.0f} ms of compute to hide it), so any weight pipeline "
                   f"adds at least {floor.exposed * 1e3:.0f} ms ({floor.exposed / floor.compute:.0%} of compute) per "
                   "step here; more compute per iteration (batch, sequence, micro-batches) amortises it, and a lighter "
                   f"chunk {floor.chunk} (--partition) shortens it")
    if c.nics_per_node > 1 and c.nodes > 1 and not taw.knobs.get("stripe"):
        k = c.nics_per_node
        striped = weightpipe.predict("tawpipe", c, w, p.compute, **_tawpipe_knobs(taw), stripe=True)
        fsdp = f"; fsdp: {p.get('fsdp').step_time * 1e3:.0f} ms" if "fsdp" in names else ""
        out.append(f"multi-rail links ({k} NICs per node): FSDP/HSDP collectives use all {k} NICs but each TawPipe "
                   f"transfer uses one; stripe=True spreads them over all {k} (predicted "
                   f"{striped.step_time * 1e3:.0f} ms against {taw.step_time * 1e3:.0f}{fsdp})")
    if "hsdp" in names:
        h = p.get("hsdp")
        if h.fits:
            verdict = "faster" if h.step_time < taw.step_time else "slower"
            out.append(f"the model fits HYBRID_SHARD ({h.memory.total / 1e9:.1f} GB per device): HSDP is predicted "
                       f"{verdict} ({h.step_time * 1e3:.0f} vs {taw.step_time * 1e3:.0f} ms) and crosses nodes with "
                       f"{h.inter_node_bytes_per_node / 1e6:.0f} MB per node vs TawPipe's "
                       f"{taw.inter_node_bytes_per_node / 1e6:.0f} MB")
    if c.nodes >= 8:
        out.append(f"{c.nodes} nodes: TawPipe's byte saving over FSDP, (N-1)/N * P/(P-1) = "
                   f"{(c.nodes - 1) / c.nodes * c.world_size / (c.world_size - 1):.2f}, tends to 1 as N grows")
    losers = [q for q in p.predictions if q.strategy != "tawpipe" and q.fits and q.step_time < taw.step_time]
    if losers and p.recommended != "tawpipe":
        best = min(losers, key=lambda q: q.step_time)
        out.append(f"TawPipe is predicted {taw.step_time / best.step_time:.2f}x slower than {best.strategy} here")
    return out
