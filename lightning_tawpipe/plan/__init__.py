"""Planner: predict step time, traffic, bubble and memory of TawPipe and its alternatives on any cluster.

TawPipe and WeiPipe are predicted by simulating the schedule programs the strategy itself runs
(``simulate.py``); FSDP, HSDP, DDP and 1F1B by closed-form models (``analytic.py``). Imports no Lightning.
"""

from lightning_tawpipe.plan.cluster import Cluster, cpu_testbed, h100_ethernet, parse_rate
from lightning_tawpipe.plan.compute import ComputeModel
from lightning_tawpipe.plan.planner import STRATEGIES, Plan, plan
from lightning_tawpipe.plan.result import Memory, Prediction
from lightning_tawpipe.plan.simulate import ChunkCosts, SimResult, simulate
from lightning_tawpipe.plan.workload import ModelShape, Workload

__all__ = [
    "STRATEGIES",
    "ChunkCosts",
    "Cluster",
    "ComputeModel",
    "Memory",
    "ModelShape",
    "Plan",
    "Prediction",
    "SimResult",
    "Workload",
    "cpu_testbed",
    "h100_ethernet",
    "parse_rate",
    "plan",
    "simulate",
]
