"""What a plan says about one strategy: step time, traffic, bubble, memory, and how it was obtained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Memory:
    """Peak bytes per device, split so a reader sees what dominates."""

    model_states: float  # master weights, gradient accumulators, optimizer state held by this device
    working: float  # weight/gradient buffers of chunks or layers in flight
    activations: float

    @property
    def total(self) -> float:
        return self.model_states + self.working + self.activations


@dataclass
class Prediction:
    """One strategy on one cluster and workload. Times in seconds, bytes per iteration."""

    strategy: str
    step_time: float
    inter_node_bytes_per_node: float  # busiest node's inter-node egress
    inter_node_bytes: float  # all nodes together
    intra_node_bytes: float
    bubble: float  # share of the step a device idles because of the schedule alone (free communication)
    exposed_comm: float  # seconds the step is longer than with free communication
    memory: Memory
    method: str
    knobs: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    fits: bool = True

    def tokens_per_s(self, tokens_per_step: float) -> float:
        return tokens_per_step / self.step_time

    def as_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        return d
