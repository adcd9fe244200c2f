"""The cluster a plan is made for: nodes, devices, links, NICs, device speed and memory.

A plan is only as good as its picture of the hardware, so the picture is explicit and small: two link classes
(intra-node, inter-node), each with a bandwidth and a per-message latency, and the number of NICs per node (one NIC
shared by all devices, the Ethernet setting of the TawPipe paper, or one per device, a "multi-rail" cluster).
Bandwidths are bytes per second *per direction* (links are full duplex). ``host_cores`` models the CPU testbed,
where every rank of the machine shares a few cores: a compute step then runs slower while more ranks compute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_RATE = re.compile(r"^\s*([0-9.]+)\s*(k|m|g|t)?(bit|b|bps|gbe|byte|bytes)?(/s)?\s*$", re.IGNORECASE)
_SCALE = {None: 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str | float) -> float:
    """A link rate in bytes/s from ``"10gbit"``, ``"25GbE"``, ``"200mbit"``, ``"50GB"`` (bytes) or a number (bytes/s)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _RATE.match(text)
    if m is None:
        raise ValueError(f"Not a link rate: {text!r} (expected e.g. '10gbit', '25GbE', '200mbit', '400GB').")
    value, prefix, unit = float(m[1]), (m[2] or "").lower() or None, (m[3] or "bit").lower()
    if unit == "gbe":  # "25GbE" = 25 gigabit Ethernet
        prefix, unit = "g", "bit"
    scale = _SCALE[prefix]
    if unit in ("bit", "bps"):
        return value * scale / 8.0
    if unit == "b" and m[3] == "b":  # lower-case b: bits
        return value * scale / 8.0
    return value * scale  # B, byte, bytes


def parse_seconds(text: str | float) -> float:
    """``"5us"``, ``"1ms"``, ``"0"`` or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    t = text.strip().lower()
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("ns", 1e-9), ("s", 1.0)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    return float(t)


@dataclass(frozen=True)
class Cluster:
    """``nodes`` x ``devices_per_node`` devices, and the links between them (bytes/s per direction, seconds)."""

    nodes: int
    devices_per_node: int
    intra_bw: float
    inter_bw: float
    intra_latency: float = 5e-6
    inter_latency: float = 20e-6
    nics_per_node: int = 1
    device_flops: float = 400e12  # dense bf16 FLOP/s one device sustains (used when no calibration is given)
    device_memory: float = 80e9  # bytes
    mem_bw: float = 2e12  # device memory bandwidth (local copies and adds, optimizer step), bytes/s
    host_cores: int | None = None  # CPU testbed: cores shared by every rank of the machine (None: devices are separate)
    collectives: str = "nccl"  # "nccl": ring collectives over all NICs; "gloo": direct all-gather, ring all-reduce
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise ValueError(f"A cluster needs >= 1 node of >= 1 device, got {self.nodes} x {self.devices_per_node}.")
        if not 1 <= self.nics_per_node <= self.devices_per_node:
            raise ValueError(f"nics_per_node must be 1..devices_per_node ({self.devices_per_node}), "
                             f"got {self.nics_per_node}.")
        if self.collectives not in ("nccl", "gloo"):
            raise ValueError(f"collectives must be 'nccl' or 'gloo', got {self.collectives!r}.")
        if min(self.intra_bw, self.inter_bw, self.mem_bw) <= 0:
            raise ValueError("Bandwidths must be positive.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def node_inter_bw(self) -> float:
        """Inter-node bandwidth of a whole node (all its NICs), per direction."""
        return self.inter_bw * self.nics_per_node

    def nic_of(self, local_index: int) -> int:
        """The NIC a device uses: devices are spread evenly over the node's NICs (rail-optimised wiring)."""
        return local_index * self.nics_per_node // self.devices_per_node

    def with_nodes(self, nodes: int) -> Cluster:
        return replace(self, nodes=nodes)

    def compute_slowdown(self, active_ranks: float) -> float:
        """How much slower a compute step runs while ``active_ranks`` ranks compute at once (CPU testbed only)."""
        return max(1.0, active_ranks / self.host_cores) if self.host_cores else 1.0

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} device(s); intra {_fmt_bw(self.intra_bw)}"
                f" ({self.intra_latency * 1e6:.0f} us), inter {self.nics_per_node} NIC(s) x {_fmt_bw(self.inter_bw)}"
                f" ({self.inter_latency * 1e6:.0f} us)")


def _fmt_bw(bw: float) -> str:
    bits = bw * 8
    return f"{bits / 1e9:.3g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.3g} Mbit/s"


def h100_ethernet(nodes: int, rate: str = "10gbit", devices: int = 8, nics: int = 1) -> Cluster:
    """H100 SXM nodes (NVLink ~150 GB/s bus bandwidth per GPU) joined by Ethernet: the TawPipe paper's setting."""
    return Cluster(nodes, devices, intra_bw=150e9, inter_bw=parse_rate(rate), intra_latency=10e-6,
                   inter_latency=50e-6, nics_per_node=nics, device_flops=400e12, device_memory=80e9, mem_bw=2.5e12,
                   name=f"H100 x{devices}/node, {rate} x{nics}")


def cpu_testbed(nodes: int, devices: int, rate: str | None, host_cores: int = 2) -> Cluster:
    """The project's CPU testbed: gloo ranks on one machine, network namespaces joined by tc-shaped veth links.

    Intra-node traffic goes over a namespace's loopback (a memcpy through the kernel, a few GB/s shared with
    compute); ``rate=None`` is an unshaped veth. Latency is that of local TCP.
    """
    inter = parse_rate(rate) if rate else 2.0e9
    return Cluster(nodes, devices, intra_bw=2.0e9, inter_bw=inter, intra_latency=50e-6, inter_latency=100e-6,
                   nics_per_node=1, device_flops=50e9, device_memory=24e9, mem_bw=5e9, host_cores=host_cores,
                   collectives="gloo",
                   name=f"CPU testbed {nodes}x{devices}, {rate or 'unshaped'}")
