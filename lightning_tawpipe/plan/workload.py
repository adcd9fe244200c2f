"""What is trained: a LitGPT model's shapes (parameters per pipeline unit, FLOPs, activation bytes) and the batch.

The planner never builds the model: every number here is arithmetic on the LitGPT ``Config`` fields, so planning a
70B model on a laptop is instant. LitGPT's ``config.py`` is loaded on its own (it only needs ``yaml``), because
``import litgpt`` pulls in Lightning and torch and costs seconds.

Pipeline units are the same as the strategy's (``runtime/units.py``): the token embedding, every block, and the
final norm with the LM head; chunks are cut from them with the strategy's own ``partition_units``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

PRECISIONS = {  # precision -> (bytes of weights that compute and travel, bytes of master weights)
    "32-true": (4, 4),
    "bf16-mixed": (2, 4),
    "16-mixed": (2, 4),
    "bf16-true": (2, 2),
    "16-true": (2, 2),
}


@lru_cache(maxsize=1)
def _litgpt_config_module():
    """LitGPT's ``config.py`` loaded standalone (no Lightning import); falls back to the package import."""
    spec = importlib.util.find_spec("litgpt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("litgpt is not installed: pass the model shape explicitly (ModelShape(...)).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "config.py")
    try:
        mspec = importlib.util.spec_from_file_location("_tawpipe_plan_litgpt_config", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module
    except Exception:  # a LitGPT version whose config.py needs the package: pay the import
        import litgpt.config as module

        return module


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a LLaMA-family decoder the cost model needs."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_query_groups: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    mlp: str = "LLaMAMLP"
    bias: bool = False
    tied_embeddings: bool = False

    @classmethod
    def from_litgpt(cls, name: str, **overrides) -> ModelShape:
        """Shapes of LitGPT config ``name`` with ``overrides`` (e.g. ``n_layer=48``), as ``Config.from_name`` sees them."""
        cfg = _litgpt_config_module().Config.from_name(name, **overrides)
        return cls(name=name, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                   n_query_groups=cfg.n_query_groups, head_size=cfg.head_size,
                   intermediate_size=cfg.intermediate_size, vocab_size=cfg.padded_vocab_size,
                   mlp=cfg.mlp_class_name, bias=bool(cfg.bias))

    # -- parameters -----------------------------------------------------------------------------------------------
    @property
    def attn_width(self) -> int:
        return self.n_head * self.head_size

    @property
    def block_params(self) -> int:
        h, q = self.n_embd, self.attn_width
        qkv = h * (self.n_head + 2 * self.n_query_groups) * self.head_size
        proj = q * h
        n_mats = 3 if self.mlp in ("LLaMAMLP", "GemmaMLP") else 2
        mlp = n_mats * h * self.intermediate_size
        biases = ((self.n_head + 2 * self.n_query_groups) * self.head_size + h + self.intermediate_size * (n_mats - 1)
                  + h) if self.bias else 0
        return qkv + proj + mlp + 2 * h + biases  # + two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.n_embd

    @property
    def head_params(self) -> int:
        return self.n_embd + (0 if self.tied_embeddings else self.vocab_size * self.n_embd)  # final norm + lm_head

    def unit_params(self) -> list[int]:
        """Parameters of every pipeline unit in forward order: embedding, blocks, norm+head."""
        return [self.embedding_params] + [self.block_params] * self.n_layer + [self.head_params]

    @property
    def n_params(self) -> int:
        return sum(self.unit_params())

    # -- compute --------------------------------------------------------------------------------------------------
    def block_flops(self, seq: int, batch: int) -> tuple[float, float]:
        """(dense, attention) forward FLOPs of one block on ``batch`` sequences of ``seq`` tokens (causal attention)."""
        tokens = seq * batch
        dense = 2.0 * (self.block_params - 2 * self.n_embd) * tokens
        attention = 2.0 * seq * seq * self.attn_width * batch  # QK^T and AV, halved by the causal mask
        return dense, attention

    def head_flops(self, seq: int, batch: int) -> float:
        return 2.0 * self.vocab_size * self.n_embd * seq * batch

    def block_activation_bytes(self, seq: int, batch: int, dtype_bytes: int) -> float:
        """Tensors autograd keeps for one block's backward (flash/SDPA attention: no S x S matrix).

        Roughly: the block input and the two norm outputs, q/k/v and rotated q/k, the attention output and its
        projection input, the residual, and four MLP tensors of the intermediate width (fc1, fc2, SiLU, product).
        """
        kv = 2 * self.n_query_groups * self.head_size
        per_token = 6 * self.n_embd + 2 * self.attn_width + 2 * kv + 4 * self.intermediate_size
        return float(per_token * seq * batch * dtype_bytes)

    def boundary_bytes(self, seq: int, batch: int, dtype_bytes: int) -> float:
        """One activation (or its gradient) at a block boundary: what 1F1B sends between stages."""
        return float(seq * batch * self.n_embd * dtype_bytes)


@dataclass(frozen=True)
class Workload:
    """A model and how it is trained: sequence length, micro-batch size, micro-batches per rank, precision."""

    model: ModelShape
    seq: int
    micro_batch: int = 1
    n_microbatches: int = 1
    precision: str = "bf16-mixed"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}.")
        if min(self.seq, self.micro_batch, self.n_microbatches) < 1:
            raise ValueError("seq, micro_batch and n_microbatches must be >= 1.")

    @property
    def weight_bytes(self) -> int:
        """Bytes per parameter of the weights that compute and travel."""
        return PRECISIONS[self.precision][0]

    @property
    def master_bytes(self) -> int:
        return PRECISIONS[self.precision][1]

    @property
    def tokens_per_rank(self) -> int:
        return self.seq * self.micro_batch * self.n_microbatches
