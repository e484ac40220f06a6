"""Split-K decode kernel for 1..16 tokens: ``out = x @ W^T`` reading each packed weight word once.

Decode is bound by reading weights, so the grid is (column tiles) x (K splits) to fill the GPU even for one
token; each split writes an fp32 partial and the partials are summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_decoupleq.errors import DecoupleQConfigError

from ._common import check_input, check_packed, interpreting
from ._unpack import grouped_dot_acc, unpack_tile

__all__ = ["MAX_DECODE_M", "gemv"]

MAX_DECODE_M = 16


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    shapes = [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 256, 4, 2)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


@triton.autotune(configs=_configs(), key=["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M", "SPLIT_K", "IEEE"])
@triton.heuristics({"ALIGNED": lambda a: a["GROUP_SIZE"] % a["BLOCK_K"] == 0})
@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    part_ptr,
    M,
    N,
    K,
    SPLIT_K,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_pk,
    stride_pm,
    stride_pn,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Each split owns whole BLOCK_K chunks, so the ALIGNED test (chunk inside one group) stays valid.
    chunks = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * chunks * BLOCK_K
    k_end = tl.minimum(K, k_begin + chunks * BLOCK_K)
    if BLOCK_M == 1:
        # One token: a broadcast-multiply-reduce on CUDA cores (a tensor-core dot would pad M to 16).
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            q = unpack_tile(qw_ptr, offs_k, offs_n, mask_k, mask_n, stride_qk, stride_qn, BITS).to(tl.float32)
            if ALIGNED:
                g = k0 // GROUP_SIZE
                s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
                acc += tl.sum(x[:, None] * q, axis=0) * s + tl.sum(x, axis=0) * z
            else:
                gidx = offs_k // GROUP_SIZE
                m2 = mask_k[:, None] & mask_n[None, :]
                sp = gidx[:, None] * stride_sg + offs_n[None, :] * stride_sn
                s = tl.load(s_ptr + sp, mask=m2, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sp, mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(x[:, None] * (q * s + z), axis=0)
        tl.store(part_ptr + pid_k * stride_pk + offs_n * stride_pn, acc, mask=mask_n)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
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
        p_ptrs = part_ptr + pid_k * stride_pk + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
        tl.store(p_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def _auto_split_k(n_out: int, k: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    col_tiles = triton.cdiv(n_out, 128)
    # About two waves of programs, but keep every split at least ~512 columns of K long.
    return max(1, min(16, triton.cdiv(2 * sms, col_tiles), k // 512))


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x @ W^T`` for ``x`` ``[M, K]`` with ``1 <= M <= 16``; returns ``[M, N]`` in ``x.dtype``.

    ``split_k`` (default: chosen from the GPU's SM count) splits K across programs.
    """
    n_out, g = check_packed(qweight, scales, zeros, bits, group_size, in_features)
    check_input(x, in_features, qweight.device)
    m = x.shape[0]
    if not 1 <= m <= MAX_DECODE_M:
        raise DecoupleQConfigError(f"gemv takes 1..{MAX_DECODE_M} rows, got M={m}")
    split = _auto_split_k(n_out, in_features, x.device) if split_k is None else int(split_k)
    if split < 1:
        raise DecoupleQConfigError(f"split_k={split_k!r} must be >= 1")
    block_m = 1 if m == 1 else 16
    part = torch.empty((split, m, n_out), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n_out, meta["BLOCK_N"]), split)

    _gemv_kernel[grid](
        x, qweight, scales, zeros, part,
        m, n_out, in_features, split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        BITS=bits, GROUP_SIZE=g, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
    )  # fmt: skip
    return (part[0] if split == 1 else part.sum(0)).to(x.dtype)
