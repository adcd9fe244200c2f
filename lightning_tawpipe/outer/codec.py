"""SparseLoCo's message codec: one tensor's error-feedback buffer -> a fixed-size byte message, and back.

SparseLoCo (arXiv 2508.15706) sends, per replica and outer step, only the largest entries of each parameter's
error-feedback (EF) buffer, 2-bit quantized. The pipeline for one tensor ``x``:

1. **Tile.** View ``x`` as a matrix (``shape[0]`` x the rest; a 1-D tensor is one row) and cut it into tiles of
   ``h x w`` where ``h``/``w`` are the largest divisors of the matrix sides that are <= ``chunk`` (64: tiles of at most
   4096 elements). The tile shape depends only on the *full* shape, so every replica tiles a tensor the same way
   whatever its sharding, and per-tile selections line up across replicas.
2. **Top-k per tile** by magnitude, ``k = max(1, round(tile_len * density))``. A fixed ``k`` per tile (instead of one
   global top-k) makes the message size a function of the shape alone, so fixed-size ``all_gather`` buffers work.
3. **Quantize** the selected values per tensor (:func:`quantize`, the reference code's bin-mean quantizer).
4. **Pack**: tile-local indices with ``ceil(log2(tile_len))`` bits each (12 for 4096-element tiles), codes with
   ``quant_bits`` bits each. The reference code sends int64 indices + uint8 codes (9 B per entry); packing is what makes
   the 14 bits per entry of the paper's accounting true on the wire.

Message layout (a flat ``uint8`` tensor of exactly :meth:`SparseCodec.message_nbytes` bytes, native little-endian)::

    [shift: f32][lookup: 2**quant_bits x f32]     side info, absent when quant_bits is None
    [indices: K x idx_bits, bit-packed]           K = n_tiles * k, tile-major, ascending inside each tile
    [codes: K x quant_bits, bit-packed]           or [values: K x f32] when quant_bits is None

The encoder returns the dequantized tensor it sent (bit-identical to what :meth:`SparseCodec.decode` gives every peer),
because error feedback must subtract exactly what the others will add. Everything is torch ops on ``x.device`` with no
host synchronisation, and pure (no ``torch.distributed``): the outer loop does the exchange.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

QUANT_BITS = (None, 1, 2, 4, 8)
AGGREGATION_RULES = ("contributors", "replicas")


# ----------------------------------------------------------------------------------------------------------- tiling


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a tensor is tiled as: ``(shape[0], prod(rest))``; 1-D and 0-D tensors are a single row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def _largest_divisor(n: int, limit: int) -> int:
    return next(s for s in range(min(n, limit), 0, -1) if n % s == 0)


def tile_shape(shape: tuple[int, ...], chunk: int = 64) -> tuple[int, int]:
    """Tile ``(h, w)`` for a tensor of ``shape``: per side of its matrix view, the largest divisor <= ``chunk``.

    A 1-D tensor of length ``n`` is the matrix ``(1, n)``, so its tiles are rows of ``(1, largest divisor of n)``.
    Tiles always cover the tensor exactly (no padding), at the price of thin tiles for a side with no divisor near
    ``chunk`` (a prime side > ``chunk`` gives width 1): the reference implementation's rule, kept for parity.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    rows, cols = _as_matrix(tuple(shape))
    if rows * cols == 0:
        raise ValueError(f"Cannot tile an empty tensor of shape {tuple(shape)}.")
    return _largest_divisor(rows, chunk), _largest_divisor(cols, chunk)


def to_tiles(x: Tensor, chunk: int = 64) -> Tensor:
    """``x`` as ``[n_tiles, tile_len]``: tiles in row-major order of the tile grid, row-major inside a tile."""
    h, w = tile_shape(tuple(x.shape), chunk)
    rows, cols = _as_matrix(tuple(x.shape))
    return x.reshape(rows // h, h, cols // w, w).permute(0, 2, 1, 3).reshape(-1, h * w)


def from_tiles(tiles: Tensor, shape: tuple[int, ...], chunk: int = 64) -> Tensor:
    """The exact inverse of :func:`to_tiles`: ``from_tiles(to_tiles(x), x.shape) == x``."""
    h, w = tile_shape(tuple(shape), chunk)
    rows, cols = _as_matrix(tuple(shape))
    if tuple(tiles.shape) != (rows * cols // (h * w), h * w):
        raise ValueError(f"Tiles of shape {tuple(tiles.shape)} do not tile a tensor of shape {tuple(shape)}.")
    return tiles.reshape(rows // h, cols // w, h, w).permute(0, 2, 1, 3).reshape(shape)


def k_per_tile(tile_len: int, density: float) -> int:
    """Entries kept per tile: ``max(1, round(tile_len * density))``; density 1.0 keeps every element."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    return max(1, round(tile_len * density))


# ------------------------------------------------------------------------------------------------------- bit packing


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack non-negative integers into a ``uint8`` bit stream, ``width`` bits each, most significant bit first.

    The stream is ``values`` in order, each as ``width`` bits, zero-padded to whole bytes: ``ceil(n * width / 8)``
    bytes. Vectorised through an ``[n, width]`` bit matrix, so it runs on any device without Python loops over the
    elements. Bits of a value above ``width`` are dropped (checking would cost a host sync on CUDA).
    """
    if not 1 <= width <= 63:
        raise ValueError(f"width must be in [1, 63], got {width}.")
    shifts = torch.arange(width - 1, -1, -1, device=values.device)
    bits = ((values.reshape(-1, 1).long() >> shifts) & 1).reshape(-1)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8))
    byte_weights = 1 << torch.arange(7, -1, -1, device=values.device)
    return (bits.reshape(-1, 8) * byte_weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    """The first ``count`` ``width``-bit integers of a stream written by :func:`pack_bits`, as int64."""
    if not 1 <= width <= 63:
        raise ValueError(f"width must be in [1, 63], got {width}.")
    if packed.dtype != torch.uint8 or packed.numel() * 8 < count * width:
        raise ValueError(f"Need a uint8 tensor of >= {math.ceil(count * width / 8)} bytes, got {packed.numel()} "
                         f"of {packed.dtype}.")
    byte_shifts = torch.arange(7, -1, -1, device=packed.device)
    bits = ((packed.reshape(-1, 1).long() >> byte_shifts) & 1).reshape(-1)[: count * width]
    shifts = torch.arange(width - 1, -1, -1, device=packed.device)
    return (bits.reshape(count, width) << shifts).sum(1)


def _index_bits(tile_len: int) -> int:
    """Bits for a tile-local index: ``ceil(log2(tile_len))``, at least 1 (12 for a 64 x 64 tile)."""
    return max(1, (tile_len - 1).bit_length())


# -------------------------------------------------------------------------------------------------------- quantizer


def quantize(v: Tensor, bits: int, quant_range: float = 6.0) -> tuple[Tensor, Tensor, Tensor]:
    """SparseLoCo's per-tensor quantizer: ``(codes int64, shift f32 scalar, lookup f32[2**bits])``.

    ``shift = mean(v)``, ``c = v - shift``, ``scale = quant_range * std(c) / bins``; the code is the bin of ``c``
    (``round(c / scale + bins / 2)``, clamped). Decoding uses ``lookup[code] = mean of the c in that bin`` rather than
    the bin centre: it is the least-squares value for the bin, and it makes the clamped outer bins (everything beyond
    +-range/2 sigma) land on their actual mean instead of the edge. A zero spread (one value, or all equal) maps every
    value to the middle bin, whose mean is 0, so ``deq = shift`` is still exact.
    """
    bins = 2**bits
    v = v.float()
    n = v.numel()
    shift = v.mean()
    c = v - shift
    scale = quant_range * torch.linalg.vector_norm(c) / math.sqrt(max(n - 1, 1)) / bins
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero spread: c == 0, any scale puts it mid-bin
    codes = torch.round(c / scale + bins / 2).clamp(0, bins - 1).long()
    # Per-bin sums as masked reductions (a loop over the <= 256 bins, not the elements): index_add_ would be one
    # kernel, but its CUDA atomics sum in a run-dependent order and the lookup would not be reproducible.
    in_bin = [codes == b for b in range(bins)]
    sums = torch.stack([torch.where(m, c, 0.0).sum() for m in in_bin])
    counts = torch.stack([m.sum() for m in in_bin])
    lookup = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    return codes, shift, lookup


def dequantize(codes: Tensor, shift: Tensor, lookup: Tensor) -> Tensor:
    """``lookup[codes] + shift``: the same float32 ops in the encoder and every decoder, hence bit-identical."""
    return lookup[codes] + shift


# ------------------------------------------------------------------------------------------------------------ codec


class MessageLayout(NamedTuple):
    """Sizes that follow from a tensor's shape alone; the byte counts are the three message sections."""

    n_tiles: int
    tile_len: int
    k: int  # entries per tile
    index_bits: int
    side_nbytes: int
    index_nbytes: int
    value_nbytes: int

    @property
    def n_selected(self) -> int:
        return self.n_tiles * self.k

    @property
    def nbytes(self) -> int:
        return self.side_nbytes + self.index_nbytes + self.value_nbytes


class SparseCodec:
    """Top-k-per-tile + quantization codec for SparseLoCo messages (see the module docstring for the layout).

    Args:
        density: fraction of each tile sent, in (0, 1]; the reference's ``top_k=128`` per 4096 is 0.03125.
        quant_bits: bits per sent value (1, 2, 4 or 8), or None to send float32 values unquantized.
        chunk: the largest tile side (64: tiles of <= 4096 elements, 12-bit indices).
        quant_range: the quantizer spans ``quant_range`` standard deviations of the selected values over all bins.
    """

    def __init__(self, density: float, quant_bits: int | None = 2, chunk: int = 64, quant_range: float = 6.0) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}.")
        if quant_bits not in QUANT_BITS:
            raise ValueError(f"quant_bits must be one of {QUANT_BITS}, got {quant_bits!r}.")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}.")
        if not quant_range > 0:
            raise ValueError(f"quant_range must be > 0, got {quant_range}.")
        self.density, self.quant_bits, self.chunk, self.quant_range = density, quant_bits, chunk, quant_range

    def __repr__(self) -> str:
        return (f"SparseCodec(density={self.density}, quant_bits={self.quant_bits}, chunk={self.chunk}, "
                f"quant_range={self.quant_range})")

    @property
    def bins(self) -> int | None:
        return None if self.quant_bits is None else 2**self.quant_bits

    def layout(self, shape: tuple[int, ...]) -> MessageLayout:
        """Tiles, k and the three section sizes for ``shape``; also what byte accounting reports."""
        h, w = tile_shape(tuple(shape), self.chunk)
        tile_len = h * w
        n_tiles = math.prod(_as_matrix(tuple(shape))) // tile_len
        k = k_per_tile(tile_len, self.density)
        n = n_tiles * k
        index_bits = _index_bits(tile_len)
        if self.quant_bits is None:
            side, values = 0, 4 * n
        else:
            side, values = 4 * (1 + self.bins), math.ceil(n * self.quant_bits / 8)
        return MessageLayout(n_tiles, tile_len, k, index_bits, side, math.ceil(n * index_bits / 8), values)

    def message_nbytes(self, shape: tuple[int, ...]) -> int:
        """The message size for a tensor of ``shape``: fixed, so every replica's all-gather buffer has one size."""
        return self.layout(shape).nbytes

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(message uint8[message_nbytes], decoded f32 like x)``; ``decoded`` is bitwise ``decode(message)[0]``."""
        lay = self.layout(tuple(x.shape))
        tiles = to_tiles(x.detach().float(), self.chunk)
        idx = torch.topk(tiles.abs(), lay.k, dim=1, sorted=False).indices
        # Ascending indices make the message a function of the selected *set* (topk's order is unspecified), and
        # with it the order of the values the quantizer's mean sums over: same selection, same bytes, everywhere.
        idx = idx.sort(dim=1).values
        vals = tiles.gather(1, idx).reshape(-1)
        parts = [pack_bits(idx.reshape(-1), lay.index_bits)]
        if self.quant_bits is None:
            sent = vals
            parts.append(vals.view(torch.uint8))
        else:
            codes, shift, lookup = quantize(vals, self.quant_bits, self.quant_range)
            sent = dequantize(codes, shift, lookup)
            parts.insert(0, torch.cat([shift.reshape(1), lookup]).view(torch.uint8))
            parts.append(pack_bits(codes, self.quant_bits))
        message = torch.cat(parts)
        decoded, _ = self._scatter(idx, sent, tuple(x.shape), lay)
        return message, decoded

    def decode(self, message: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``(values f32[shape], selected bool[shape])``: the sender's dequantized entries (0 elsewhere) and where.

        The mask is returned separately because a selected value can be exactly 0, and the "contributors"
        aggregation must still count that replica.
        """
        lay = self.layout(tuple(shape))
        if message.dtype != torch.uint8 or message.dim() != 1 or message.numel() != lay.nbytes:
            raise ValueError(f"Expected a 1-D uint8 message of {lay.nbytes} bytes for shape {tuple(shape)}, got "
                             f"{message.dtype} of shape {tuple(message.shape)}.")
        side, packed_idx, packed_vals = message.split([lay.side_nbytes, lay.index_nbytes, lay.value_nbytes])
        idx = unpack_bits(packed_idx, lay.index_bits, lay.n_selected).reshape(lay.n_tiles, lay.k)
        if self.quant_bits is None:
            sent = packed_vals.clone().view(torch.float32)  # clone: a float view needs a 4-byte aligned offset
        else:
            side = side.clone().view(torch.float32)
            codes = unpack_bits(packed_vals, self.quant_bits, lay.n_selected)
            sent = dequantize(codes, side[0], side[1:])
        return self._scatter(idx, sent, tuple(shape), lay)

    def _scatter(self, idx: Tensor, sent: Tensor, shape: tuple[int, ...], lay: MessageLayout) -> tuple[Tensor, Tensor]:
        """Dense ``(values, mask)`` from tile-local indices: one helper, so encode and decode build them identically."""
        values = torch.zeros(lay.n_tiles, lay.tile_len, dtype=torch.float32, device=idx.device)
        values.scatter_(1, idx, sent.reshape(lay.n_tiles, lay.k))
        mask = torch.zeros(lay.n_tiles, lay.tile_len, dtype=torch.bool, device=idx.device)
        mask.scatter_(1, idx, True)
        return from_tiles(values, shape, self.chunk), from_tiles(mask, shape, self.chunk)


# ------------------------------------------------------------------------------------------------------ aggregation


def aggregate(decoded: list[tuple[Tensor, Tensor]], rule: str = "contributors") -> Tensor:
    """Combine R replicas' decoded ``(values, selected)`` into one update, summing in the given (rank) order.

    * ``"contributors"``: per coordinate, the sum over the replicas that selected it divided by their number (0 where
      none did), the SparseLoCo reference code's ``scatter_reduce(mean, include_self=False)``. A coordinate one
      replica found important is not diluted by the R - 1 that did not send it.
    * ``"replicas"``: ``sum / R``, the unbiased average of the R sparse messages (DiLoCo's mean of pseudo-gradients).

    At density 1 the two agree. Floating-point addition is not associative, so the result is bit-reproducible only for
    a fixed order: pass the replicas in rank order (what ``all_gather`` returns).
    """
    if rule not in AGGREGATION_RULES:
        raise ValueError(f"Unknown aggregation rule {rule!r}; choose one of {AGGREGATION_RULES}.")
    if not decoded:
        raise ValueError("Nothing to aggregate: got no replicas.")
    total = decoded[0][0].float().clone()
    count = decoded[0][1].to(torch.int32)
    for values, selected in decoded[1:]:
        total += values
        count += selected
    if rule == "replicas":
        return total / len(decoded)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)
