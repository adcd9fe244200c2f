"""Deterministic, placement-independent weight initialization, and materializing a meta-device model by the chunk.

With ``TawPipeStrategy(meta_init=True)`` the LightningModule's ``configure_model`` builds the model on the meta
device, so no rank ever allocates the whole model. Each owner then materializes and initializes only the units of
the chunk it owns. For that to give the same model whatever the world size (and the same as any other strategy),
every module is initialized from its own generator, seeded by the run's seed and the module's qualified name,
with the module's own ``reset_parameters()`` (``nn.Linear``, ``nn.Embedding``, LitGPT's ``RMSNorm``, LoRA
layers...). :func:`seeded_reset_parameters` applies exactly that to an ordinary (eagerly built) model, which is how a
``ddp`` run or a test reproduces a meta-initialized TawPipe model bit for bit.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


def module_seed(seed: int, name: str) -> int:
    """The generator seed of the module called ``name`` (stable across processes and Python versions)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def reset_module(module: nn.Module, seed: int, name: str) -> None:
    """``module.reset_parameters()`` drawn from the module's own generator (no effect on the global RNG)."""
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        return
    devices = [t.device for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
               if t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(module_seed(seed, name))
        reset()


def seeded_reset_parameters(root: nn.Module, seed: int, prefix: str = "") -> None:
    """Re-initialize every module of ``root`` that has ``reset_parameters`` from its name-seeded generator."""
    for name, module in root.named_modules(prefix=prefix.rstrip(".")):
        reset_module(module, seed, name)


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def placeholder(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor with ``t``'s shape and dtype backed by one element: real enough for ``configure_optimizers`` code
    that looks at ``p.shape``/``p.ndim``, costing nothing. TawPipe binds real storage only while a chunk computes."""
    return torch.empty((), dtype=t.dtype, device=device).expand(t.shape)


def swap_in(t: torch.Tensor, value: torch.Tensor) -> None:
    """Replace ``t``'s data with ``value`` in place, keeping the Python object (optimizers and the chunk layout
    refer to parameters by identity). Works from the meta device, where ``t.data = value`` does not."""
    new = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    torch.utils.swap_tensors(t, new)


def materialize(module: nn.Module, device: torch.device, seed: int, prefix: str, recurse: bool = True,
                storage: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Give ``module``'s meta tensors real storage on ``device`` and initialize them (name-seeded).

    ``storage`` may map tensors to the memory they should live in (a view of a chunk's flat master buffer, so
    initialization writes straight into it with no extra copy of the chunk).
    """
    modules = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
    for name, m in modules:
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if not any(t.is_meta for t in tensors):
            continue
        if getattr(m, "reset_parameters", None) is None:
            raise TypeError(
                f"{type(m).__name__} ({name!r}) has tensors on the meta device but no reset_parameters(), so TawPipe's "
                "meta_init cannot initialize them. Give the module a reset_parameters() method, or build the model "
                "on a real device (meta_init=False)."
            )
        for t in tensors:
            if t.is_meta:
                where = (storage or {}).get(t)
                swap_in(t, where if where is not None else torch.empty(t.shape, dtype=t.dtype, device=device))
        reset_module(m, seed, name)
