"""Dequantize kernel: packed ``qweight`` -> ``W`` ``[N, K]`` (for ``dequantize_weight()`` on GPU and export)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_decoupleq.errors import DecoupleQConfigError

from ._common import FLOAT_DTYPES, check_packed
from ._unpack import unpack_tile

__all__ = ["dequantize"]


@triton.jit
def _dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_on,
    stride_ok,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    m2 = mask_k[:, None] & mask_n[None, :]
    q = unpack_tile(qw_ptr, offs_k, offs_n, mask_k, mask_n, stride_qk, stride_qn, BITS).to(tl.float32)
    sp = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :] * stride_sn
    s = tl.load(s_ptr + sp, mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sp, mask=m2, other=0.0).to(tl.float32)
    # Store the transposed tile [BLOCK_N, BLOCK_K] so that consecutive lanes write consecutive k (coalesced).
    w = tl.trans(q * s + z)
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W[n, k] = scales[k // g, n] * q[n, k] + zeros[k // g, n]`` as ``[N, K]`` in ``dtype`` (default scales')."""
    n_out, g = check_packed(qweight, scales, zeros, bits, group_size, in_features)
    dtype = dtype or scales.dtype
    if dtype not in FLOAT_DTYPES:
        raise DecoupleQConfigError(f"dtype {dtype} is not one of {FLOAT_DTYPES}")
    out = torch.empty((n_out, in_features), dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 64
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n_out, block_n))
    _dequant_kernel[grid](
        qweight, scales, zeros, out, n_out, in_features,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
        BITS=bits, GROUP_SIZE=g, BLOCK_K=block_k, BLOCK_N=block_n,
    )  # fmt: skip
    return out
