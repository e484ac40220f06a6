"""Exact tests of the packed format: round trips, the documented bit layout (checked with Python integers), errors."""

import pytest
import torch

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.packing import (
    FORMAT_VERSION,
    codes_per_block,
    effective_group_size,
    num_groups,
    pack,
    packed_rows,
    unpack,
    words_per_block,
)

BITS = (2, 3, 4, 8)
IN_SIZES = (1, 5, 10, 11, 15, 16, 17, 21, 22, 31, 32, 33, 64, 100)


def _codes(n_out, k, bits, seed=0):
    gen = torch.Generator().manual_seed(seed * 1000 + n_out * 37 + k * 7 + bits)
    codes = torch.randint(0, 2**bits, (n_out, k), generator=gen, dtype=torch.uint8)
    # Make sure the extreme codes (all ones: the bits that straddle words) are present.
    codes[0, -1] = 2**bits - 1
    codes[-1, 0] = 2**bits - 1
    return codes


def _layout_by_python_ints(codes: torch.Tensor, bits: int) -> list[list[int]]:
    """The documented layout, built independently: each column is one little-endian bit stream of 32-bit words."""
    n_out, k = codes.shape
    rows = -(-k // codes_per_block(bits)) * words_per_block(bits)
    columns = []
    for n in range(n_out):
        stream = 0
        for kk in range(k):
            stream |= int(codes[n, kk]) << (kk * bits)
        columns.append([(stream >> (32 * r)) & 0xFFFFFFFF for r in range(rows)])
    return columns


def test_format_version_and_block_sizes():
    assert FORMAT_VERSION == 3  # 2 added the incoherence signs, 3 shares them per input; the bit layout is v1
    assert [codes_per_block(b) for b in BITS] == [16, 32, 8, 4]
    assert [words_per_block(b) for b in BITS] == [1, 3, 1, 1]
    # bits per weight of whole blocks: exactly `bits` for every width (3-bit is dense).
    for b in BITS:
        assert words_per_block(b) * 32 / codes_per_block(b) == b


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", IN_SIZES)
def test_round_trip_exact(bits, k):
    for n_out in (1, 3, 8):
        codes = _codes(n_out, k, bits)
        qweight = pack(codes, bits)
        assert qweight.dtype == torch.int32
        assert tuple(qweight.shape) == (packed_rows(k, bits), n_out)
        out = unpack(qweight, bits, k)
        assert out.dtype == torch.uint8
        assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", (1, 10, 11, 21, 22, 33, 70))
def test_bit_layout_matches_documented_stream(bits, k):
    codes = _codes(3, k, bits, seed=1)
    qweight = pack(codes, bits)
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).T.tolist()
    assert words == _layout_by_python_ints(codes, bits)


def test_gptq_word_layout_for_4_bits():
    # bits 2/4/8 are the GPTQ layout: code k in word k // (32 // bits) at shift (k % (32 // bits)) * bits.
    codes = torch.arange(16, dtype=torch.uint8).view(1, 16)
    q = pack(codes, 4)
    assert q.shape == (2, 1)
    assert (int(q[0, 0]) & 0xFFFFFFFF) == 0x76543210
    assert (int(q[1, 0]) & 0xFFFFFFFF) == 0xFEDCBA98


def test_padding_is_zero_codes():
    codes = torch.full((2, 5), 3, dtype=torch.uint8)
    q = pack(codes, 2)
    assert q.shape == (1, 2)
    # 5 codes of value 3 use the low 10 bits; the 11 padded codes are zero.
    assert torch.equal(q, torch.full((1, 2), 0x3FF, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_accepts_integer_dtypes(dtype):
    codes = _codes(4, 37, 3).to(dtype)
    assert torch.equal(unpack(pack(codes, 3), 3, 37), codes.to(torch.uint8))


def test_all_ones_and_all_zeros_3bit():
    for value in (0, 7):
        codes = torch.full((2, 64), value, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, 3), 3, 64), codes)
    assert torch.equal(pack(torch.full((1, 32), 7), 3), torch.full((3, 1), -1, dtype=torch.int32))


@pytest.mark.parametrize(
    ("bits", "codes", "match"),
    [
        (5, torch.zeros(2, 4, dtype=torch.uint8), "bits=5"),
        (1, torch.zeros(2, 4, dtype=torch.uint8), "bits=1"),
        (True, torch.zeros(2, 4, dtype=torch.uint8), "bits=True"),
        (2, torch.zeros(2, 4, dtype=torch.float32), "not an integer dtype"),
        (2, torch.zeros(2, 4, dtype=torch.bool), "not an integer dtype"),
        (2, torch.zeros(4, dtype=torch.uint8), "2-D"),
        (2, torch.zeros(0, 4, dtype=torch.uint8), "2-D"),
        (2, torch.full((2, 4), 4, dtype=torch.uint8), r"\[0, 3\]"),
        (3, torch.full((2, 4), -1, dtype=torch.int32), r"\[0, 7\]"),
        (8, torch.full((2, 4), 256, dtype=torch.int32), r"\[0, 255\]"),
    ],
)
def test_pack_errors(bits, codes, match):
    with pytest.raises(DecoupleQConfigError, match=match):
        pack(codes, bits)


def test_unpack_errors():
    q = pack(_codes(3, 20, 2), 2)
    with pytest.raises(DecoupleQConfigError, match="expected"):
        unpack(q, 2, 40)  # needs 3 rows, has 2
    with pytest.raises(DecoupleQConfigError, match="int32"):
        unpack(q.to(torch.int64), 2, 20)
    with pytest.raises(DecoupleQConfigError, match="bits=6"):
        unpack(q, 6, 20)
    with pytest.raises(DecoupleQConfigError, match="in_features"):
        unpack(q, 2, 0)


def test_group_helpers():
    assert effective_group_size(100, -1) == 100
    assert effective_group_size(100, 128) == 100
    assert effective_group_size(100, 32) == 32
    assert num_groups(100, 32) == 4  # 32 + 32 + 32 + 4: the last group is shorter
    assert num_groups(100, -1) == 1
    with pytest.raises(DecoupleQConfigError, match="group_size=0"):
        effective_group_size(100, 0)
    with pytest.raises(DecoupleQConfigError, match="group_size=-2"):
        num_groups(100, -2)
