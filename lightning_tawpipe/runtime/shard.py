"""Flat chunk layouts, binding module parameters to working buffers, and the owner's device-bound shard.

A chunk's parameters are laid out back to back in one flat tensor, so a whole chunk moves in one message and a
module's parameters can be pointed at any buffer that holds the chunk (``param.data = view``) without copies. When
a chunk is not resident its parameters point at an empty tensor: they hold no memory, and stray use fails loudly.

The :class:`OwnedShard` is what "device-bound storage" means here: the fp32 master weights of the one chunk this
rank owns, its gradient accumulator, and the ``nn.Parameter`` views the optimizer steps. They never move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatEntry:
    """Where one parameter lives inside its chunk's flat buffer."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype  # the parameter's own dtype (a low-precision working copy is bound only during compute)


class ChunkLayout:
    """Flat layout of every chunk: ``entries[c]`` in order, ``numel[c]`` elements.

    Trainable parameters come first in each chunk, so a chunk's gradients are the prefix ``[:n_trainable[c]]`` of
    its flat buffer: frozen parameters (``requires_grad=False``, e.g. a LoRA base model) send no gradient bytes and
    owners keep no gradient accumulator for them. Which parameters are frozen is read when the layout is built.
    """

    def __init__(self, chunk_params: list[list[tuple[str, nn.Parameter]]]) -> None:
        self.entries: list[list[FlatEntry]] = []
        for params in chunk_params:
            offset, entries = 0, []
            for name, p in sorted(params, key=lambda np: not np[1].requires_grad):  # stable: trainable first
                entries.append(FlatEntry(name, p, offset, p.numel(), p.shape, p.dtype))
                offset += p.numel()
            self.entries.append(entries)
        self.numel = [sum(e.numel for e in entries) for entries in self.entries]
        self.n_trainable = [sum(e.numel for e in entries if e.param.requires_grad) for entries in self.entries]
        self._empty: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def n_chunks(self) -> int:
        return len(self.entries)

    @property
    def max_numel(self) -> int:
        return max(self.numel)

    def chunk_of_param(self) -> dict[nn.Parameter, int]:
        return {e.param: c for c, entries in enumerate(self.entries) for e in entries}

    def views(self, chunk: int, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views into ``flat`` (which must hold at least the chunk's elements)."""
        return [flat[e.offset : e.offset + e.numel].view(e.shape) for e in self.entries[chunk]]

    def gather(self, chunk: int, out: torch.Tensor) -> torch.Tensor:
        """Copy the chunk's current parameter values into ``out`` (flat) and return it."""
        for e, view in zip(self.entries[chunk], self.views(chunk, out)):
            view.copy_(e.param.detach())
        return out

    def bind(self, chunk: int, flat: torch.Tensor) -> None:
        """Point the chunk's module parameters at ``flat`` (the resident copy used for compute)."""
        for e, view in zip(self.entries[chunk], self.views(chunk, flat)):
            e.param.data = view

    def unbind(self, chunk: int) -> None:
        """Drop the chunk's parameters to zero-size storage: not resident, no memory, loud misuse."""
        for e in self.entries[chunk]:
            key = (e.dtype, e.param.device)
            if key not in self._empty:
                self._empty[key] = torch.empty(0, dtype=e.dtype, device=e.param.device)
            e.param.data = self._empty[key]


class OwnedShard:
    """The chunk this rank owns: master weights, gradient accumulator, and the optimizer's parameters.

    Masters are fp32 unless the precision is a "true" low precision (then they are in that dtype, as ``ddp`` keeps
    them); the gradient accumulator covers only the trainable prefix of the chunk.
    """

    def __init__(self, layout: ChunkLayout, chunk: int, initial: torch.Tensor,
                 master_dtype: torch.dtype = torch.float32) -> None:
        self.layout, self.chunk = layout, chunk
        self.weights = initial.detach().to(master_dtype)  # ``initial`` is a fresh buffer: no copy when dtypes match
        self._grad_acc: torch.Tensor | None = None  # allocated by the first backward: eval-only runs never need it
        self.params: dict[nn.Parameter, nn.Parameter] = {}
        for e, w in zip(layout.entries[chunk], layout.views(chunk, self.weights)):
            master = nn.Parameter(w, requires_grad=e.param.requires_grad)
            self.params[e.param] = master

    @property
    def grad_acc(self) -> torch.Tensor:
        """The owner's gradient accumulator (trainable prefix of the chunk, master dtype)."""
        if self._grad_acc is None:
            n = self.layout.n_trainable[self.chunk]
            self._grad_acc = torch.zeros(n, dtype=self.weights.dtype, device=self.weights.device)
        return self._grad_acc

    def names(self) -> dict[nn.Parameter, str]:
        """Master parameter -> the module parameter's fully qualified name."""
        return {self.params[e.param]: e.name for e in self.layout.entries[self.chunk]}

    def attach_grads(self, scale: float) -> None:
        """Scale the accumulated gradient and expose it as ``.grad`` of the master parameters."""
        self.grad_acc.mul_(scale)
        for e in self.layout.entries[self.chunk]:
            master = self.params[e.param]
            master.grad = self.grad_acc[e.offset : e.offset + e.numel].view(e.shape) if master.requires_grad else None

    def zero_grad(self) -> None:
        if self._grad_acc is not None:
            self._grad_acc.zero_()

    def state_bytes(self, optimizer_state: dict | None = None) -> int:
        """Bytes of model state held here: master weights + gradient accumulator (+ the optimizer's tensors)."""
        total = self.weights.nbytes + (self._grad_acc.nbytes if self._grad_acc is not None else 0)
        for master in self.params.values():
            for value in (optimizer_state or {}).get(master, {}).values():
                if torch.is_tensor(value):
                    total += value.nbytes
        return total
