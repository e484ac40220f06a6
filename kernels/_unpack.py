"""Triton helpers shared by the kernels: in-register unpacking of codes and the grouped dot product."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting

# Triton's CPU interpreter keeps bfloat16 tensors as raw 16-bit integers in numpy, and its tl.dot then multiplies
# those integers (garbage results). Under the interpreter only, dot operands are upcast to fp32 first, which is
# the same math a GPU does (exact products of 16-bit values, fp32 accumulation).
_UPCAST_DOT = tl.constexpr(interpreting())


@triton.jit
def unpack_tile(qw_ptr, offs_k, offs_n, mask_k, mask_n, stride_qk, stride_qn, BITS: tl.constexpr):
    """Codes ``q[k, n]`` (uint32) of a ``[BLOCK_K, BLOCK_N]`` tile, read from the per-column bit streams.

    Code ``k`` starts at stream bit ``k * BITS``: word row ``k * BITS // 32``, shift ``k * BITS % 32``. Neighbouring
    ``k`` read the same word (a cached load); only 3-bit codes at shifts 30/31 need the next word as well.
    Masked-out positions give 0.
    """
    bitpos = offs_k * BITS
    row = bitpos // 32
    sh = (bitpos % 32).to(tl.uint32)
    mask = mask_k[:, None] & mask_n[None, :]
    ptrs = qw_ptr + row[:, None].to(tl.int64) * stride_qk + offs_n[None, :] * stride_qn
    # Logical shifts need unsigned words: an arithmetic shift would smear the sign bit into a straddling code.
    w0 = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = (w0 >> sh[:, None]) & ((1 << BITS) - 1)
    if BITS == 3:
        spill = sh > 29
        w1 = tl.load(ptrs + stride_qk, mask=mask & spill[:, None], other=0).to(tl.uint32, bitcast=True)
        # For non-straddling codes w1 is 0 (masked load), so the shift amount does not matter there.
        q = q | ((w1 << ((32 - sh) % 32)[:, None]) & 7)
    return q


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
def grouped_dot_acc(
    acc,
    x,
    q,
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
    IEEE: tl.constexpr,
):
    """``acc += x @ W_tile`` for ``x`` ``[BM, BK]`` and codes ``q`` ``[BK, BN]``, with fp32 accumulation.

    ALIGNED (the K tile lies inside one group): ``x.w = s * (x . q) + z * sum(x)``, so the codes enter the
    tensor-core dot unscaled (exact in fp16/bf16) and the zero term needs only the row sums of ``x``.
    Otherwise the tile is dequantized in registers with per-element scales.
    """
    if ALIGNED:
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        # Codes go through fp32 (exact): the interpreter converts integers to bfloat16 wrongly.
        p = _dot(x, q.to(tl.float32).to(x.dtype), IEEE)
        xs = tl.sum(x.to(tl.float32), axis=1)
        acc += p * s[None, :] + xs[:, None] * z[None, :]
    else:
        gidx = offs_k // GROUP_SIZE
        m2 = mask_k[:, None] & mask_n[None, :]
        sp = gidx[:, None] * stride_sg + offs_n[None, :] * stride_sn
        s = tl.load(s_ptr + sp, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sp, mask=m2, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) * s + z).to(x.dtype)
        acc += _dot(x, w, IEEE)
    return acc
