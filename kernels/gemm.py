"""Fused dequantize-matmul for prefill (many tokens): ``out = x @ W^T`` with ``W`` unpacked in registers.

Never materializes a full-precision weight in global memory; fp32 accumulation on tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_input, check_packed, interpreting
from ._unpack import grouped_dot_acc, unpack_tile

__all__ = ["gemm"]


def _configs() -> list[triton.Config]:
    if interpreting():
        # The CPU interpreter is slow and cannot benchmark: one small config.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 128, 128, 4, 3),
        (32, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "IEEE"])
@triton.heuristics({"ALIGNED": lambda a: a["GROUP_SIZE"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row tiles share each column tile of packed weights while it is in L2.
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_rows
    pid_n = (pid % num_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = unpack_tile(qw_ptr, offs_k, offs_n, mask_k, mask_n, stride_qk, stride_qn, BITS)
        acc = grouped_dot_acc(
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
            GROUP_SIZE,
            ALIGNED,
            IEEE,
        )
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W^T`` for ``x`` ``[M, K]`` (fp16/bf16/fp32, any strides); returns ``[M, N]`` in ``x.dtype``."""
    n_out, g = check_packed(qweight, scales, zeros, bits, group_size, in_features)
    check_input(x, in_features, qweight.device)
    m = x.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    m_bucket = triton.next_power_of_2(m)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        x, qweight, scales, zeros, out,
        m, n_out, in_features, m_bucket,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1),
        BITS=bits, GROUP_SIZE=g, IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return out
