"""Fused dequantize-matmul for prefill (many tokens): ``out = x @ W^T`` with ``W`` unpacked in registers.

Never materializes a full-precision weight in global memory; fp32 accumulation on tensor cores.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import PackedLayer, interpreting
from ._tiles import FORMAT_HEURISTICS, dot_k_range
from .configs import GEMM_CONFIGS, INTERPRETER_GEMM_CONFIG, TileConfig, gemm_m_bucket
from .tuning import launch_tuned, triton_configs

__all__ = ["KERNEL", "kernel_args", "launch"]


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_om, stride_on,
    BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
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
    acc = dot_k_range(
        acc, x_rows, mask_m, stride_xk, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, 0, K, K,
        stride_qk, stride_qn, stride_sg, stride_sn, BITS, CPB, WPB, GROUP_SIZE, IEEE, ALIGNED, BLOCK_K,
    )  # fmt: skip
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


KERNEL = _gemm_kernel
_HEURISTIC = triton.heuristics(FORMAT_HEURISTICS)(_gemm_kernel)
_TUNED = triton.autotune(
    configs=triton_configs((INTERPRETER_GEMM_CONFIG,) if interpreting() else GEMM_CONFIGS),
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "IEEE"],
    cache_results=True,
)(_HEURISTIC)


def kernel_args(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor) -> dict[str, Any]:
    """The kernel's runtime arguments and format constexprs for ``out = x @ W^T`` (tile constexprs excluded)."""
    return {
        "x_ptr": x, "qw_ptr": layer.qweight, "s_ptr": layer.scales, "z_ptr": layer.zeros, "out_ptr": out,
        "M": x.shape[0], "N": layer.out_features, "K": layer.in_features, "M_BUCKET": gemm_m_bucket(x.shape[0]),
        "stride_xm": x.stride(0), "stride_xk": x.stride(1),
        "stride_qk": layer.qweight.stride(0), "stride_qn": layer.qweight.stride(1),
        "stride_sg": layer.scales.stride(0), "stride_sn": layer.scales.stride(1),
        "stride_om": out.stride(0), "stride_on": out.stride(1),
        "BITS": layer.bits, "GROUP_SIZE": layer.group_size, "IEEE": x.dtype == torch.float32,
    }  # fmt: skip


def launch(x: torch.Tensor, layer: PackedLayer, config: TileConfig | None = None) -> torch.Tensor:
    """``x @ W^T`` for a validated ``x`` ``[M, K]`` (fp16/bf16/fp32, any strides); ``[M, N]`` in ``x.dtype``.

    ``config`` runs one tile configuration instead of the autotuned choice (tests, benchmarks).
    """
    m = x.shape[0]
    out = torch.empty((m, layer.out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(layer.out_features, meta["BLOCK_N"]),)

    args = kernel_args(x, layer, out)
    if config is None:
        launch_tuned(_TUNED, grid, args, "gemm")
    else:
        _HEURISTIC[grid](**args, **config.meta, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
