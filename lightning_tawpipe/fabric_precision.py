"""Fabric's precision plugin for TawPipe: the Trainer plugin's policy (``precision.py``) behind Fabric's hooks.

Fabric and the Trainer have different ``Precision`` base classes, so the policy (what computes and travels in low
precision, what owners keep in fp32, the sharded scaler for ``16-mixed``) lives once in
:class:`~lightning_tawpipe.precision.TawPipePrecision`, and this class forwards Fabric's hooks to it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch
from lightning.fabric.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.fabric.utilities.types import Optimizable
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_tawpipe.precision import TawPipePrecision, plugin_precision


class TawPipeFabricPrecision(Precision):
    """Fabric's side of :class:`~lightning_tawpipe.precision.TawPipePrecision` (same policy, Fabric's hooks).

    ``param_dtype`` is what weights and gradients are computed and sent in, ``master_dtype`` what owners keep;
    ``"16-mixed"`` uses a ``ShardedGradScaler`` (its inf checks are global, so every shard skips together).
    ``Fabric(precision=...)`` plugins for the supported precisions are converted automatically.
    """

    def __init__(self, precision: str = "32-true", scaler=None, device: Optional[str] = None) -> None:
        self.core = TawPipePrecision(precision, scaler=scaler, device=device)  # validates ``precision``
        self.precision = precision  # type: ignore[assignment]

    @classmethod
    def from_fabric(cls, plugin: Precision) -> "TawPipeFabricPrecision":
        """The TawPipe equivalent of the plugin Fabric's connector built for ``Fabric(precision=...)``."""
        if isinstance(plugin, cls):
            return plugin
        precision, device = plugin_precision(plugin, Precision, MixedPrecision, HalfPrecision, cls, "Fabric")
        return cls(precision, device=device)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.core.param_dtype

    @property
    def master_dtype(self) -> torch.dtype:
        return self.core.master_dtype

    @property
    def scaler(self):
        return self.core.scaler

    @property
    def _true(self) -> bool:
        return "true" in self.precision

    def bind_device(self, device_type: str) -> None:
        self.core.bind_device(device_type)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.param_dtype) if self._true and self.param_dtype != torch.float32 else module

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.param_dtype) if self._true else nullcontext()

    @override
    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @override
    def forward_context(self) -> AbstractContextManager:
        return self.core.forward_context()

    @override
    def convert_input(self, data: Any) -> Any:
        if not self._true:
            return data
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.param_dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        if not self._true:
            return data
        dst = torch.get_default_dtype()
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=dst)

    @override
    def backward(self, tensor: Tensor, model: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        tensor.backward(*args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        if self.scaler is None:
            return optimizer.step(**kwargs)
        output = self.scaler.step(optimizer, **kwargs)  # skipped on every rank if any rank found an inf
        self.scaler.update()
        return output

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state_dict)
