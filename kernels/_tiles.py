"""Triton helpers shared by the kernels: unpacking a tile of codes, its group scales/zeros, and the dot product.

The bit layout is :mod:`hf_decoupleq.format`'s: per output column a stream of ``BITS``-bit codes cut into
``WORD_BITS``-bit words, in blocks of ``CPB`` codes held by ``WPB`` words (``codes_per_block`` /
``words_per_block``, passed by the launchers as constexprs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hf_decoupleq.format import WORD_BITS, codes_per_block, words_per_block

from ._common import interpreting

__all__ = ["FORMAT_HEURISTICS", "dequant_tile", "dot_k_range", "group_params", "grouped_dot_acc", "unpack_tile"]

_WORD_BITS = tl.constexpr(WORD_BITS)

# Constexprs every kernel derives from its arguments (``triton.heuristics``; the AOT sweep applies the same ones).
FORMAT_HEURISTICS = {
    "CPB": lambda a: codes_per_block(a["BITS"]),
    "WPB": lambda a: words_per_block(a["BITS"]),
    "ALIGNED": lambda a: a["GROUP_SIZE"] % a["BLOCK_K"] == 0,
}

# Triton's CPU interpreter keeps bfloat16 tensors as raw 16-bit integers in numpy, and its tl.dot then multiplies
# those integers (garbage results). Under the interpreter only, dot operands are upcast to fp32 first, which is
# the same math a GPU does (exact products of 16-bit values, fp32 accumulation).
_UPCAST_DOT = tl.constexpr(interpreting())


@triton.jit
def unpack_tile(
    qw_ptr,
    k0,
    K,
    offs_n,
    mask_n,
    stride_qk,
    stride_qn,
    BITS: tl.constexpr,
    CPB: tl.constexpr,
    WPB: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Codes ``q[k, n]`` (uint32) for ``k`` in ``[k0, k0 + BLOCK_K)`` as a ``[BLOCK_K, BLOCK_N]`` tile.

    ``k0`` and ``BLOCK_K`` are multiples of ``CPB``, so the tile is ``BLOCK_K // CPB`` whole blocks: each word is
    loaded once (``WPB`` loads of ``[blocks, BLOCK_N]`` words) and its codes are shifted out in registers. A code
    at stream bit ``j * BITS`` of its block sits in word ``j * BITS // WORD_BITS`` at that shift; with 3 bits,
    codes 10 and 21 straddle two words and take their high bits from the next one. Blocks past the padded end of
    ``K`` read as 0; codes past ``K`` inside the last block are the format's zero padding.
    """
    NB: tl.constexpr = BLOCK_K // CPB
    blk = k0 // CPB + tl.arange(0, NB)
    mask = (blk < tl.cdiv(K, CPB))[:, None] & mask_n[None, :]
    ptrs = qw_ptr + (blk * WPB)[:, None].to(tl.int64) * stride_qk + offs_n[None, :] * stride_qn
    bitpos = tl.arange(0, CPB) * BITS
    in_word = bitpos % _WORD_BITS
    sh = in_word.to(tl.uint32)[None, :, None]
    # Logical shifts need unsigned words: an arithmetic shift would smear the sign bit into a straddling code.
    w0 = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
    if WPB == 1:
        q = w0 >> sh
    else:
        w1 = tl.load(ptrs + stride_qk, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        w2 = tl.load(ptrs + 2 * stride_qk, mask=mask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        word = (bitpos // _WORD_BITS)[None, :, None]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
        hi = tl.where(word == 0, w1, w2)
        # A straddling code takes its high bits from the next word, shifted up past its low part.
        straddles = (in_word + BITS > _WORD_BITS)[None, :, None]
        up = ((tl.full((CPB,), _WORD_BITS, tl.int32) - in_word) % _WORD_BITS).to(tl.uint32)[None, :, None]
        q = (lo >> sh) | tl.where(straddles, hi << up, 0)
    q = q & ((1 << BITS) - 1)
    return tl.reshape(q, (BLOCK_K, q.shape[2]))


@triton.jit
def group_params(
    s_ptr,
    z_ptr,
    k0,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    stride_sg,
    stride_sn,
    GROUP_SIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Scales and zeros (fp32) of a ``[BLOCK_K, BLOCK_N]`` tile, broadcastable against it.

    ALIGNED (the K tile lies inside one group): one row, ``[1, BLOCK_N]``; otherwise ``[BLOCK_K, BLOCK_N]`` with
    each column ``k``'s group ``k // GROUP_SIZE``. Masked-out positions give 0.
    """
    if ALIGNED:
        offs = (k0 // GROUP_SIZE) * stride_sg + offs_n[None, :] * stride_sn
        mask = mask_n[None, :]
    else:
        offs = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :] * stride_sn
        mask = mask_k[:, None] & mask_n[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def dequant_tile(q, s, z):
    """``W = s * q + z`` in fp32 (the format's dequantization; ``s``, ``z`` from :func:`group_params`)."""
    return q.to(tl.float32) * s + z


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 activations would silently become tf32 on tensor cores; "ieee" keeps fp32 accuracy.
    if _UPCAST_DOT:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def grouped_dot_acc(acc, x, q, s, z, IEEE: tl.constexpr, ALIGNED: tl.constexpr):
    """``acc += x @ W_tile`` for ``x`` ``[BM, BK]``, codes ``q`` ``[BK, BN]`` and their ``s``, ``z``.

    ALIGNED (one group, ``s``/``z`` one row): ``x.w = s * (x . q) + z * sum(x)``, so the codes enter the
    tensor-core dot unscaled (exact in fp16/bf16) and the zero term needs only the row sums of ``x``.
    Otherwise the tile is dequantized in registers with per-element scales.
    """
    if ALIGNED:
        # Codes go through fp32 (exact): the interpreter converts integers to bfloat16 wrongly.
        p = _dot(x, q.to(tl.float32).to(x.dtype), IEEE)
        xs = tl.sum(x.to(tl.float32), axis=1)
        acc += p * s + xs[:, None] * z
    else:
        acc += _dot(x, dequant_tile(q, s, z).to(x.dtype), IEEE)
    return acc


@triton.jit
def dot_k_range(
    acc,
    x_rows,
    mask_m,
    stride_xk,
    qw_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    mask_n,
    k_begin,
    k_end,
    K,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    BITS: tl.constexpr,
    CPB: tl.constexpr,
    WPB: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc += x[:, k_begin:k_end] @ W[k_begin:k_end]`` in ``BLOCK_K`` steps (``x_rows``: ``[BM, 1]`` row
    pointers of ``x``; ``k_begin`` a multiple of ``BLOCK_K``)."""
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = unpack_tile(qw_ptr, k0, K, offs_n, mask_n, stride_qk, stride_qn, BITS, CPB, WPB, BLOCK_K)
        s, z = group_params(
            s_ptr, z_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg, stride_sn, GROUP_SIZE, ALIGNED
        )
        acc = grouped_dot_acc(acc, x, q, s, z, IEEE, ALIGNED)
    return acc
