"""``TawPipePrecision``: the precision plugin TawPipe installs, with gradient clipping that sees the whole model.

Each rank's optimizer holds only the masters it owns (plus any replicated parameters), so Lightning's default
``clip_grad_norm_`` would clip every shard by its own local norm. Here the squared norms of the owned gradients
are summed across ranks with one all-reduce (replicated parameters, identical on every rank, are counted once),
and every shard is scaled by the same global factor: exactly what ``ddp`` computes on the full gradient. Lightning's
FSDP plugin raises for norm clipping (Lightning #19235); this one does it. Clipping by value is element-wise and
needs nothing global.

Only ``"32-true"`` is supported so far: mixed and half precision need weights and gradients to travel in low
precision with fp32 masters on the owners, which is the Trainer-contract issue's work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer
from typing_extensions import override


class TawPipePrecision(Precision):
    """fp32 (``"32-true"``) precision with global gradient-norm clipping across TawPipe owners."""

    precision = "32-true"

    def __init__(self) -> None:
        super().__init__()
        self.replicated: set[torch.nn.Parameter] = set()  # set by the strategy: parameters every rank holds

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        params = [p for p in self.main_params(optimizer) if p.grad is not None]
        owned = [p.grad for p in params if p not in self.replicated]
        shared = [p.grad for p in params if p in self.replicated]
        device = params[0].grad.device if params else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float64, device=device)
        if owned:
            squared += torch.nn.utils.get_total_norm(owned, norm_type=2.0).double() ** 2
        if dist.is_initialized():
            dist.all_reduce(squared)
        if shared:  # identical on every rank after the all-reduce of their gradients: count them once
            squared += torch.nn.utils.get_total_norm(shared, norm_type=2.0).double() ** 2
        total = squared.sqrt().float()
        torch.nn.utils.clip_grads_with_norm_([p for p in params], clip_val, total)
