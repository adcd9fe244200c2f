"""SparseLoCo codec: tiling, top-k, quantizer, bit packing, message size, error feedback and aggregation."""

import math

import pytest
import torch

from lightning_tawpipe.outer.codec import (
    SparseCodec,
    aggregate,
    dequantize,
    from_tiles,
    k_per_tile,
    pack_bits,
    quantize,
    tile_shape,
    to_tiles,
    unpack_bits,
)

SHAPE = (128, 344)  # the tiny LLaMA config's MLP weight: n_embd 128, FFN 344
DENSITY = 0.03125  # the reference's top_k=128 per 4096


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tile_shape_examples():
    assert tile_shape((128, 344)) == (64, 43)
    assert tile_shape((4096,)) == (1, 64)
    assert tile_shape((7,)) == (1, 7)
    assert tile_shape((6, 5, 20)) == (6, 50)  # higher-dim: the (6, 100) matrix view
    assert tile_shape((128, 344), chunk=16) == (16, 8)
    assert tile_shape((131, 64)) == (1, 64)  # a prime side > chunk gets tile side 1


def test_to_tiles_order_and_round_trip():
    x = torch.arange(24.0).reshape(4, 6)
    tiles = to_tiles(x, chunk=2)  # 2 x 3 grid of 2 x 2 tiles, "y x h w"
    assert tiles.shape == (6, 4)
    assert tiles[0].tolist() == [0, 1, 6, 7]
    assert tiles[1].tolist() == [2, 3, 8, 9]
    assert tiles[3].tolist() == [12, 13, 18, 19]
    for shape in [SHAPE, (4096,), (7,), (6, 5, 20), ()]:
        y = torch.randn(shape, generator=_gen(0))
        t = to_tiles(y)
        h, w = tile_shape(shape)
        assert t.shape == (y.numel() // (h * w), h * w)
        assert torch.equal(from_tiles(t, shape), y)
    assert to_tiles(torch.zeros(SHAPE)).shape[0] == 16  # (128 / 64) * (344 / 43)


def test_topk_per_tile():
    x = torch.randn(SHAPE, generator=_gen(1))
    codec = SparseCodec(DENSITY, quant_bits=None)
    k = k_per_tile(64 * 43, DENSITY)
    assert k == 86
    _, selected = codec.decode(codec.encode(x)[0], SHAPE)
    mask, mag = to_tiles(selected), to_tiles(x.abs())
    assert (mask.sum(1) == k).all()
    for tile_mask, tile_mag in zip(mask, mag):
        assert tile_mag[tile_mask].min() >= tile_mag[~tile_mask].max()


def test_indices_are_tile_local():
    codec = SparseCodec(DENSITY)
    lay = codec.layout(SHAPE)
    msg, _ = codec.encode(torch.randn(SHAPE, generator=_gen(2)))
    packed = msg[lay.side_nbytes : lay.side_nbytes + lay.index_nbytes]
    idx = unpack_bits(packed, lay.index_bits, lay.n_selected).reshape(lay.n_tiles, lay.k)
    assert lay.index_bits == 12
    assert idx.max() < lay.tile_len
    assert (idx.diff(dim=1) > 0).all()  # ascending and distinct inside each tile


def test_dense_unquantized_round_trip_is_exact():
    x = torch.randn(SHAPE, generator=_gen(3))
    x[0, :5] = 0.0  # zeros are still "selected" at density 1
    codec = SparseCodec(1.0, quant_bits=None)
    msg, decoded = codec.encode(x)
    values, selected = codec.decode(msg, SHAPE)
    assert torch.equal(values, x) and torch.equal(decoded, x)
    assert selected.all()


def test_non_float32_input_is_computed_in_float32():
    x = torch.randn(64, 64, generator=_gen(4)).to(torch.bfloat16)
    msg, decoded = SparseCodec(1.0, quant_bits=None).encode(x)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, x.float())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantizer(bits):
    v = torch.randn(3000, generator=_gen(5)) * 0.01 + 0.003
    codes, shift, lookup = quantize(v, bits, quant_range=6.0)
    bins = 2**bits
    assert codes.min() >= 0 and codes.max() <= bins - 1
    c = v - shift
    assert torch.allclose(shift, v.double().mean().float())
    for b in range(bins):
        in_bin = c[codes == b]
        expected = in_bin.double().mean().float() if in_bin.numel() else torch.tensor(0.0)
        assert torch.allclose(lookup[b], expected, rtol=1e-5, atol=1e-9)
    scale = 6.0 * c.norm() / math.sqrt(v.numel() - 1) / bins
    pos = c / scale + bins / 2
    clamped = (pos < -0.5) | (pos > bins - 0.5)
    # A bin's lookup is the mean of its members, so it is within one bin width (scale) of each of them as long as
    # no clamped outlier was folded into the bin (only the edge bins can hold one). The rounding has bins + 1 levels
    # for bins codes, so the top bin also takes c/scale in [bins/2 - 0.5, bins/2 + 0.5): the range is asymmetric.
    clean = ~clamped & ~torch.isin(codes, codes[clamped])
    assert clean.sum() >= 100  # the bound is checked, not vacuously (1-bit: only bin 0 is clean, about 7%)
    deq = dequantize(codes, shift, lookup)
    assert ((deq - v).abs()[clean] <= scale * (1 + 1e-5)).all()


def test_quantizer_zero_spread_is_exact():
    for v in [torch.tensor([0.7]), torch.full((50,), -1.25)]:
        codes, shift, lookup = quantize(v, 2)
        assert torch.equal(dequantize(codes, shift, lookup), v)


@pytest.mark.parametrize("width", [1, 2, 3, 7, 12, 13])
def test_pack_bits_round_trip(width):
    for n in [0, 1, 5, 1001]:
        values = torch.randint(0, 2**width, (n,), generator=_gen(width + n))
        packed = pack_bits(values, width)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * width / 8)
        assert torch.equal(unpack_bits(packed, width, n), values)


def test_pack_bits_layout_msb_first():
    assert pack_bits(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xAB, 0xC1, 0x23]  # pack12: 2 indices in 3 bytes
    assert pack_bits(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b11000110]


def test_message_size_formula():
    codec = SparseCodec(DENSITY, quant_bits=2)
    n_sel = 16 * 86  # 16 tiles of 64 x 43, k = 86
    expected = 4 * (1 + 4) + math.ceil(n_sel * 12 / 8) + math.ceil(n_sel * 2 / 8)
    assert expected == 20 + 2064 + 344
    msg, _ = codec.encode(torch.randn(SHAPE, generator=_gen(6)))
    assert msg.dtype == torch.uint8 and msg.dim() == 1
    assert msg.numel() == codec.message_nbytes(SHAPE) == expected
    # unquantized: no side info, float32 values
    assert SparseCodec(DENSITY, quant_bits=None).message_nbytes(SHAPE) == 2064 + 4 * n_sel
    # 1-D of 4096: 64 rows of 64, k = 2, 6-bit indices, 1-bit codes
    assert SparseCodec(DENSITY, quant_bits=1).message_nbytes((4096,)) == 4 * 3 + math.ceil(128 * 6 / 8) + 16


@pytest.mark.parametrize("quant_bits", [None, 1, 2, 8])
@pytest.mark.parametrize("shape", [SHAPE, (4096,), (7,), (1,), (3, 5, 7), (2, 64)])
def test_encode_decoded_matches_decode_bitwise(shape, quant_bits):
    codec = SparseCodec(DENSITY, quant_bits=quant_bits)
    x = torch.randn(shape, generator=_gen(7))
    msg, decoded = codec.encode(x)
    values, selected = codec.decode(msg, shape)
    assert msg.numel() == codec.message_nbytes(shape)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert torch.equal(decoded, values)
    assert torch.equal(values != 0, selected)  # tie-free random data: no selected value dequantizes to exactly 0
    if shape in [(7,), (1,)]:  # one selected entry: sent exactly via the shift
        assert selected.sum() == 1 and torch.equal(values[selected], x[x.abs().argmax()].reshape(1))


def test_error_feedback_telescopes():
    codec = SparseCodec(DENSITY, quant_bits=2)
    deltas = [torch.randn(SHAPE, generator=_gen(10 + t)) * 1e-2 for t in range(5)]
    e, sent = torch.zeros(SHAPE), torch.zeros(SHAPE)
    for delta in deltas:  # beta = 1
        e = e + delta
        _, deq = codec.encode(e)
        e = e - deq
        sent += deq
    assert torch.allclose(sent + e, sum(deltas), atol=1e-5)
    assert e.abs().max() > 1e-3  # compression did leave a residual to telescope


def test_error_feedback_one_step_beta():
    codec, beta = SparseCodec(DENSITY, quant_bits=2), 0.9
    e_prev = torch.randn(SHAPE, generator=_gen(20)) * 1e-2
    delta = torch.randn(SHAPE, generator=_gen(21)) * 1e-2
    acc = beta * e_prev + delta
    msg, deq = codec.encode(acc)
    e = acc - deq
    assert torch.equal(e, beta * e_prev + delta - codec.decode(msg, SHAPE)[0])
    # unquantized, the residual is exactly the unsent part
    msg, deq = SparseCodec(DENSITY, quant_bits=None).encode(acc)
    selected = SparseCodec(DENSITY, quant_bits=None).decode(msg, SHAPE)[1]
    assert torch.equal((acc - deq)[selected], torch.zeros(int(selected.sum())))
    assert torch.equal((acc - deq)[~selected], acc[~selected])


def test_aggregate_rules_by_hand():
    r0 = (torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0]), torch.tensor([True, True, False, True, False]))
    r1 = (torch.tensor([3.0, 0.0, 5.0, 0.0, 0.0]), torch.tensor([True, False, True, True, False]))  # sends a 0 at 3
    assert aggregate([r0, r1], "contributors").tolist() == [2.0, 2.0, 5.0, 2.0, 0.0]
    assert aggregate([r0, r1], "replicas").tolist() == [2.0, 1.0, 2.5, 2.0, 0.0]


def test_aggregate_deterministic_order_and_dense_agreement():
    codec = SparseCodec(DENSITY, quant_bits=2)
    peers = [codec.decode(codec.encode(torch.randn(SHAPE, generator=_gen(30 + r)))[0], SHAPE) for r in range(4)]
    for rule in ["contributors", "replicas"]:
        a = aggregate(peers, rule)
        assert torch.equal(a, aggregate(peers, rule))
        assert torch.allclose(a, aggregate(peers[::-1], rule), rtol=1e-6, atol=1e-8)
    dense = SparseCodec(1.0, quant_bits=None)
    xs = [torch.randn(SHAPE, generator=_gen(40 + r)) for r in range(3)]
    peers = [dense.decode(dense.encode(x)[0], SHAPE) for x in xs]
    mean = (xs[0] + xs[1] + xs[2]) / 3
    assert torch.equal(aggregate(peers, "contributors"), mean)
    assert torch.equal(aggregate(peers, "replicas"), mean)


def test_value_errors():
    for kwargs in [dict(density=0.0), dict(density=1.5), dict(density=0.1, quant_bits=3),
                   dict(density=0.1, chunk=0), dict(density=0.1, quant_range=0.0)]:
        with pytest.raises(ValueError):
            SparseCodec(**kwargs)
    with pytest.raises(ValueError, match="density"):
        k_per_tile(64, 0.0)
    with pytest.raises(ValueError, match="empty"):
        tile_shape((0, 5))
    with pytest.raises(ValueError, match="width"):
        pack_bits(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 12, 1)
    codec = SparseCodec(DENSITY)
    with pytest.raises(ValueError, match="message"):
        codec.decode(torch.zeros(10, dtype=torch.uint8), SHAPE)
    with pytest.raises(ValueError, match="do not tile"):
        from_tiles(torch.zeros(3, 4), SHAPE)
    with pytest.raises(ValueError, match="rule"):
        aggregate([(torch.zeros(2), torch.zeros(2, dtype=torch.bool))], "median")
    with pytest.raises(ValueError, match="no replicas"):
        aggregate([], "contributors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_decodes_identically_on_cpu():
    codec = SparseCodec(DENSITY, quant_bits=2)
    x = torch.randn(SHAPE, generator=_gen(50)).cuda()
    msg, decoded = codec.encode(x)
    assert msg.device == decoded.device == x.device
    assert torch.equal(decoded.cpu(), codec.decode(msg.cpu(), SHAPE)[0])
