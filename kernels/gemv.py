"""Split-K decode kernel for 1..16 tokens: ``out = x @ W^T`` reading each packed weight word once.

Decode is bound by reading weights, so the grid is (column tiles) x (K splits) to fill the GPU even for one
token. With one split the kernel writes the output itself; with more, each split writes an fp32 partial and the
partials are summed afterwards (deterministic, no atomics). The column tile and the split are chosen together
(:func:`~.configs.decode_plan`), the rest of the tile is autotuned.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from hf_decoupleq.errors import DecoupleQConfigError

from ._common import PackedLayer, interpreting
from ._tiles import FORMAT_HEURISTICS, dequant_tile, dot_k_range, group_params, unpack_tile
from .configs import (
    DECODE_CONFIGS,
    INTERPRETER_DECODE_BLOCK_N,
    INTERPRETER_DECODE_CONFIG,
    MAX_DECODE_M,
    TileConfig,
    decode_configs,
    decode_plan,
)
from .tuning import launch_tuned, triton_configs

__all__ = ["KERNEL", "MAX_DECODE_M", "kernel_args", "launch"]


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_ok, stride_om, stride_on,
    BITS: tl.constexpr, CPB: tl.constexpr, WPB: tl.constexpr, GROUP_SIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Each split owns whole BLOCK_K chunks, so the ALIGNED test (chunk inside one group) stays valid.
    chunks = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * chunks * BLOCK_K
    k_end = tl.minimum(K, k_begin + chunks * BLOCK_K)
    if BLOCK_M == 1:
        # One token: multiply-adds on CUDA cores (a tensor-core dot would pad M to 16). Every lane accumulates its
        # own products; the reduction across K (and across threads) happens once, after the loop.
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            q = unpack_tile(qw_ptr, k0, K, offs_n, mask_n, stride_qk, stride_qn, BITS, CPB, WPB, BLOCK_K)
            s, z = group_params(
                s_ptr, z_ptr, k0, offs_k, offs_n, mask_k, mask_n, stride_sg, stride_sn, GROUP_SIZE, ALIGNED
            )
            acc2 += x[:, None] * dequant_tile(q, s, z)
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = dot_k_range(
            acc, x_ptr + offs_m[:, None] * stride_xm, mask_m, stride_xk, qw_ptr, s_ptr, z_ptr, offs_n, mask_n,
            k_begin, k_end, K, stride_qk, stride_qn, stride_sg, stride_sn,
            BITS, CPB, WPB, GROUP_SIZE, IEEE, ALIGNED, BLOCK_K,
        )  # fmt: skip
    out_ptrs = out_ptr + pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


KERNEL = _gemv_kernel
_HEURISTIC = triton.heuristics(FORMAT_HEURISTICS)(_gemv_kernel)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    keep = {
        (c.meta["BLOCK_K"], c.num_warps, c.num_stages) for c in decode_configs(args["BLOCK_N"], args["GROUP_SIZE"])
    }
    return [c for c in configs if (c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in keep]


_TUNED = triton.autotune(
    configs=triton_configs((INTERPRETER_DECODE_CONFIG,) if interpreting() else DECODE_CONFIGS),
    key=["N", "K", "BITS", "GROUP_SIZE", "BLOCK_M", "BLOCK_N", "SPLIT_K", "IEEE"],
    prune_configs_by={"early_config_prune": _prune},
    cache_results=True,
)(_HEURISTIC)


def _plan(layer: PackedLayer, device: torch.device) -> tuple[int, int]:
    if interpreting():
        return INTERPRETER_DECODE_BLOCK_N, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return decode_plan(layer.out_features, layer.in_features, sms)


def kernel_args(x: torch.Tensor, layer: PackedLayer, out: torch.Tensor, block_n: int) -> dict[str, Any]:
    """The kernel's runtime arguments and format constexprs; ``out`` is ``[SPLIT_K, M, N]``."""
    return {
        "x_ptr": x, "qw_ptr": layer.qweight, "s_ptr": layer.scales, "z_ptr": layer.zeros, "out_ptr": out,
        "M": x.shape[0], "N": layer.out_features, "K": layer.in_features, "SPLIT_K": out.shape[0],
        "stride_xm": x.stride(0), "stride_xk": x.stride(1),
        "stride_qk": layer.qweight.stride(0), "stride_qn": layer.qweight.stride(1),
        "stride_sg": layer.scales.stride(0), "stride_sn": layer.scales.stride(1),
        "stride_ok": out.stride(0), "stride_om": out.stride(1), "stride_on": out.stride(2),
        "BITS": layer.bits, "GROUP_SIZE": layer.group_size, "IEEE": x.dtype == torch.float32,
        "BLOCK_M": 1 if x.shape[0] == 1 else MAX_DECODE_M, "BLOCK_N": block_n,
    }  # fmt: skip


def launch(
    x: torch.Tensor,
    layer: PackedLayer,
    split_k: int | None = None,
    block_n: int | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``x @ W^T`` for a validated ``x`` ``[M, K]`` with ``1 <= M <= 16``; ``[M, N]`` in ``x.dtype``.

    ``split_k`` and ``block_n`` default to :func:`~.configs.decode_plan` for this GPU; ``config`` runs one tile
    configuration instead of the autotuned choice (tests, benchmarks).
    """
    m = x.shape[0]
    if not 1 <= m <= MAX_DECODE_M:
        raise DecoupleQConfigError(f"gemv takes 1..{MAX_DECODE_M} rows, got M={m}")
    if split_k is None or block_n is None:
        plan_n, plan_split = _plan(layer, x.device)
        block_n = block_n or plan_n
        split_k = plan_split if split_k is None else split_k
    split = int(split_k)
    if split < 1:
        raise DecoupleQConfigError(f"split_k={split_k!r} must be >= 1")
    # One split writes the output directly; several write fp32 partials.
    out = torch.empty((split, m, layer.out_features), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    grid = (triton.cdiv(layer.out_features, block_n), split)
    args = kernel_args(x, layer, out, block_n)
    if config is None:
        launch_tuned(_TUNED, grid, args, "gemv")
    else:
        _HEURISTIC[grid](**args, **config.meta, num_warps=config.num_warps, num_stages=config.num_stages)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
