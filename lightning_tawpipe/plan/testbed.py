"""Connect the CPU testbed to real clusters: calibrate its compute, and translate a cluster into a link rate.

A CPU rank computes ~10^4 times slower than an H100, so the emulated links of the speed benchmark are slowed until
communication weighs as much against compute as it does on a GPU cluster. The quantity that must match is the
*comm-to-compute ratio* the benchmark reports: (inter-node bytes per node per step / link rate) / compute-only step
time. :func:`equivalent_rate` solves for the testbed link rate with the same ratio as a given cluster, so a
benchmark point measured at that rate reads as a prediction for the cluster.
"""

from __future__ import annotations

from lightning_tawpipe.plan import weightpipe
from lightning_tawpipe.plan.cluster import Cluster
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.weightpipe import OPTIMIZER_BYTES_PER_PARAM
from lightning_tawpipe.plan.workload import Workload

CPU_BASE = ComputeModel(block_rate=50e9, head_rate=50e9, source="CPU, 1 thread, ~50 GFLOP/s")


def compute_only_time(cluster: Cluster, w: Workload, compute: ComputeModel) -> float:
    """Step time with no communication: every rank trains a full replica (the benchmark's ``compute`` job)."""
    per_mb = sum(f + b for f, b in compute.unit_times(w))
    opt = w.model.n_params * OPTIMIZER_BYTES_PER_PARAM / cluster.mem_bw
    return w.n_microbatches * per_mb * cluster.compute_slowdown(cluster.world_size) + opt


def calibrate_cpu(cluster: Cluster, w: Workload, measured_compute_only: float,
                  base: ComputeModel = CPU_BASE) -> ComputeModel:
    """Scale ``base`` so that the predicted compute-only step equals the measured one on this testbed point."""
    opt = w.model.n_params * OPTIMIZER_BYTES_PER_PARAM / cluster.mem_bw
    predicted = compute_only_time(cluster, w, base) - opt
    factor = max(1e-9, measured_compute_only - opt) / predicted
    return base.scaled(factor, source=f"CPU calibrated on a measured compute-only step of {measured_compute_only:.3f} s")


def comm_compute_ratio(cluster: Cluster, w: Workload, compute: ComputeModel, strategy: str = "tawpipe",
                       prefetch: int = 1) -> float:
    """(inter-node bytes per node per step / node link rate) / compute-only step time, as the benchmark reports it."""
    pred = weightpipe.predict(strategy, cluster, w, compute, prefetch=prefetch)
    return pred.inter_node_bytes_per_node / cluster.node_inter_bw / compute_only_time(cluster, w, compute)


def equivalent_rate(real: Cluster, real_w: Workload, real_compute: ComputeModel, testbed: Cluster,
                    testbed_w: Workload, testbed_compute: ComputeModel, strategy: str = "tawpipe") -> float:
    """Testbed link rate (bytes/s) giving ``testbed_w`` the comm-to-compute ratio ``real_w`` has on ``real``."""
    target = comm_compute_ratio(real, real_w, real_compute, strategy)
    pred = weightpipe.predict(strategy, testbed, testbed_w, testbed_compute)
    return pred.inter_node_bytes_per_node / (target * compute_only_time(testbed, testbed_w, testbed_compute))
