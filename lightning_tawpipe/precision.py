"""``TawPipePrecision``: the precision plugin TawPipe installs: traffic dtype, master dtype, scaler, global clipping.

TawPipe shards like FSDP, so the plugin is an ``FSDPPrecision`` (which also makes ``ThroughputMonitor`` measure MFU
against the peak of the dtype the model really computes in) and follows FSDP's ``MixedPrecision`` semantics:

=============  ================================  ====================  ================================
precision      weights/gradients computed and    owners' masters,      loss scaling
               sent in (``param_dtype``)         grad accumulators
=============  ================================  ====================  ================================
``32-true``    fp32                              fp32                  no
``bf16-mixed`` bf16 (+ autocast)                 fp32                  no
``16-mixed``   fp16 (+ autocast)                 fp32                  ``ShardedGradScaler`` (global)
``bf16-true``  bf16                              bf16                  no
``16-true``    fp16                              fp16                  no
=============  ================================  ====================  ================================

Mixed precision halves every byte TawPipe moves (weights out, gradients back) while owners keep fp32 masters and
accumulate fp32 gradients. Because the module computes with the low-precision *copy* of its weights (as FSDP's
``param_dtype`` does), the residual stream runs in bf16/fp16, whereas ``ddp``'s autocast keeps fp32 parameters and
upcasts element-wise ops: the two agree to bf16/fp16 rounding, not bit for bit (tests document the tolerance).

The gradient scaler must see every owner's gradients: a rank that found an inf must make *every* rank skip the step,
or the shards diverge. ``ShardedGradScaler`` all-reduces the found-inf flags, which is exactly that.

Each rank's optimizer holds only the masters it owns (plus any replicated parameters), so Lightning's default
``clip_grad_norm_`` would clip every shard by its own local norm. Here the squared norms of the owned gradients are
summed across ranks with one all-reduce (replicated parameters, identical on every rank, are counted once), and every
shard is scaled by the same global factor: exactly what ``ddp`` computes on the full gradient. Lightning's FSDP
plugin raises for norm clipping (Lightning #19235); this one does it. Clipping by value needs nothing global.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.precision.utils import _DtypeContextManager
from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision, MixedPrecision, Precision
from torch.optim import Optimizer
from typing_extensions import override

SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")

_PARAM_DTYPE = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
}


def plugin_precision(plugin, plain: type, mixed: type, half: type, ours: type, where: str) -> tuple[str, str | None]:
    """``(precision, autocast device)`` of a plugin Lightning or Fabric built from ``precision=...``.

    ``plain``/``mixed``/``half`` are that library's ``Precision``/``MixedPrecision``/``HalfPrecision`` classes (the
    Trainer and Fabric each have their own). A mixed plugin's ``GradScaler`` checks for infs per rank, so only its
    precision and device are kept: TawPipe builds a sharded scaler. Anything else is refused with a ``TypeError``.
    """
    if type(plugin) is plain:
        return "32-true", None
    if type(plugin) is mixed:
        return plugin.precision, plugin.device
    if type(plugin) is half:
        return plugin.precision, None
    raise TypeError(
        f"TawPipe needs its own precision plugin ({ours.__name__}), which it builds from {where}(precision=...) for "
        f"{SUPPORTED_PRECISION}; got {type(plugin).__name__}"
        f"{' (' + str(plugin.precision) + ')' if hasattr(plugin, 'precision') else ''}. Pass one of those precision "
        f"strings, or plugins=[{ours.__name__}(...)]."
    )


class TawPipePrecision(FSDPPrecision):
    """Precision for TawPipe: what travels and computes in low precision, what owners keep in full precision.

    Arguments:
        precision: one of ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``, ``"16-true"``.
        scaler: a ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` for ``"16-mixed"`` (default: one
            is built for the run's device at setup).
        device: device type for autocast (``"cpu"``/``"cuda"``); set by the strategy at setup when not given.
    """

    def __init__(self, precision: str = "32-true", scaler=None, device: Optional[str] = None) -> None:
        if precision not in SUPPORTED_PRECISION:
            raise ValueError(
                f"TawPipe supports precision in {SUPPORTED_PRECISION}, got {precision!r}. Use 'bf16-mixed' for "
                "low-precision traffic with fp32 masters, or '32-true'."
            )
        # FSDPPrecision.__init__ is not called: it would build a CUDA scaler before the device is known
        self.precision = precision  # type: ignore[assignment]
        self.scaler = scaler  # built at setup (``bind_device``) for 16-mixed
        self._desired_input_dtype = _PARAM_DTYPE[precision] if "true" in precision else torch.float32
        self.device = device
        self.replicated: set[torch.nn.Parameter] = set()  # set by the strategy: parameters every rank holds
        # set by the strategy: masters of chunk 0's mirrors (replicate_first_chunk), counted by the owner only
        self.mirrored: set[torch.nn.Parameter] = set()
        self.group = None  # set by the strategy with several replicas: one replica's ranks (clipping, inf checks)

    @classmethod
    def from_lightning(cls, plugin: Precision) -> "TawPipePrecision":
        """The TawPipe equivalent of the plugin Lightning's connector built for ``Trainer(precision=...)``."""
        if isinstance(plugin, cls):
            return plugin
        precision, device = plugin_precision(plugin, Precision, MixedPrecision, HalfPrecision, cls, "Trainer")
        return cls(precision, device=device)

    # -- what the pipeline needs to know -------------------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype weights are computed in and weights and gradients travel in."""
        return _PARAM_DTYPE[self.precision]

    @property
    def master_dtype(self) -> torch.dtype:
        """The dtype of the owners' master weights, gradient accumulators (and so of the optimizer state)."""
        return _PARAM_DTYPE[self.precision] if "true" in self.precision else torch.float32

    def bind_device(self, device_type: str) -> None:
        """Called by the strategy at setup: autocast device, and the sharded scaler for ``16-mixed``."""
        self.device = self.device or device_type
        if self.precision == "16-mixed" and self.scaler is None:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=self.device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss each micro-batch back-propagates (scaled for ``16-mixed``)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    @property
    @override
    def mixed_precision_config(self):
        """FSDP's description of the same policy (read by ``ThroughputMonitor`` for the peak-FLOPs dtype)."""
        from torch.distributed.fsdp import MixedPrecision as TorchMixedPrecision

        dtype = self.param_dtype
        return TorchMixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)

    @override
    def forward_context(self) -> AbstractContextManager:
        if "mixed" in self.precision:
            return torch.autocast(self.device or "cpu", dtype=self.param_dtype, cache_enabled=False)
        return _DtypeContextManager(self._desired_input_dtype)

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        params = [p for p in self.main_params(optimizer) if p.grad is not None]
        owned = [p.grad for p in params if p not in self.replicated and p not in self.mirrored]
        shared = [p.grad for p in params if p in self.replicated]
        device = params[0].grad.device if params else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float64, device=device)
        if owned:
            squared += torch.nn.utils.get_total_norm(owned, norm_type=2.0).double() ** 2
        if dist.is_initialized():
            dist.all_reduce(squared, group=self.group)
        if shared:  # identical on every rank after the all-reduce of their gradients: count them once
            squared += torch.nn.utils.get_total_norm(shared, norm_type=2.0).double() ** 2
        total = squared.sqrt().float()
        torch.nn.utils.clip_grads_with_norm_([p for p in params], clip_val, total)
