"""Dequantize kernel: packed ``qweight`` -> ``W`` ``[N, K]`` (for ``dequantize_weight()`` on GPU and export)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import PackedLayer
from ._tiles import FORMAT_HEURISTICS, dequant_tile, group_params, unpack_tile
from .configs import DEQUANT_CONFIG

__all__ = ["KERNEL", "kernel_args", "launch"]


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_qk, stride_qn, stride_sg, stride_sn, stride_on, stride_ok,
    BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    q = unpack_tile(qw_ptr, k0, K, offs_n, mask_n, stride_qk, stride_qn, BITS, CPB, WPB, BLOCK_K)
    s, z = group_params(s_ptr, z_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg, stride_sn, GROUP_SIZE, ALIGNED)
    # Store the transposed tile [BLOCK_N, BLOCK_K] so that consecutive lanes write consecutive k (coalesced).
    w = tl.trans(dequant_tile(q, s, z))
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


KERNEL = _dequant_kernel
_HEURISTIC = triton.heuristics(FORMAT_HEURISTICS)(_dequant_kernel)


def kernel_args(layer: PackedLayer, out: torch.Tensor) -> dict[str, Any]:
    """The kernel's runtime arguments and format constexprs for ``out = W`` (tile constexprs excluded)."""
    return {
        "qw_ptr": layer.qweight, "s_ptr": layer.scales, "z_ptr": layer.zeros, "out_ptr": out,
        "N": layer.out_features, "K": layer.in_features,
        "stride_qk": layer.qweight.stride(0), "stride_qn": layer.qweight.stride(1),
        "stride_sg": layer.scales.stride(0), "stride_sn": layer.scales.stride(1),
        "stride_on": out.stride(0), "stride_ok": out.stride(1),
        "BITS": layer.bits, "GROUP_SIZE": layer.group_size,
    }  # fmt: skip


def launch(layer: PackedLayer, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W[n, k] = scales[k // g, n] * q[n, k] + zeros[k // g, n]`` as ``[N, K]`` in ``dtype`` (default scales').

    ``dtype`` must be one of the float dtypes (the caller validates it).
    """
    out = torch.empty((layer.out_features, layer.in_features), dtype=dtype or layer.scales.dtype, device=layer.device)
    cfg = DEQUANT_CONFIG
    grid = (triton.cdiv(layer.in_features, cfg.meta["BLOCK_K"]), triton.cdiv(layer.out_features, cfg.meta["BLOCK_N"]))
    _HEURISTIC[grid](**kernel_args(layer, out), **cfg.meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
