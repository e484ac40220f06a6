"""Randomized block Hadamard transform of activations, ``x -> x V^T`` (incoherence processing), in Triton.

``V = blockdiag(H_b, ..., H_b) diag(signs) / sqrt(b)`` (see :mod:`hf_decoupleq.hadamard`, whose
:func:`~hf_decoupleq.hadamard.transform_input` is the torch reference). One program owns ``BLOCK_M`` rows and one
Hadamard block of ``b`` columns, kept in registers in float32: it loads them, multiplies by the signs, runs the
``log2(b)`` butterfly stages of the constant-geometry (Pease) Walsh-Hadamard transform, in which every stage is the
same shuffle, ``y[i] = x[2i] + x[2i+1]``, ``y[b/2 + i] = x[2i] - x[2i+1]`` (a reshape, split, join and permute of
the tile), scales by ``1/sqrt(b)`` and stores in ``x``'s dtype. ``H_b^T = H_b``, so this is ``x V^T``.

The twelve unrolled stages of ``b = 4096`` were checked ahead of time (``examples/benchmarks/aot_sweep.sh``,
``results/aot``): for sm_90, 43 registers, no spills, 16 KiB of shared memory and 1-3 s to compile; Triton keeps most
stages as register relabelings (4 layout conversions in the TTGIR), so the kernel was left as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.format import hadamard_block_size

from ._common import FLOAT_DTYPES, interpreting
from .configs import hadamard_launch

__all__ = ["KERNEL", "hadamard_transform", "kernel_args"]


@triton.jit
def _hadamard_kernel(
    x_ptr,
    s_ptr,
    out_ptr,
    M,
    stride_xm,
    stride_xk,
    stride_om,
    stride_ok,
    scale,
    BLOCK: tl.constexpr,
    LOG_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_b * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_m < M)[:, None]
    rows = offs_m[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs_k).to(tl.float32)
    x = x * s[None, :]
    for _ in tl.static_range(LOG_BLOCK):
        pairs = tl.reshape(x, (BLOCK_M, BLOCK // 2, 2))
        even, odd = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(even + odd, even - odd), (0, 2, 1)), (BLOCK_M, BLOCK))
    x = x * scale
    tl.store(out_ptr + rows * stride_om + offs_k[None, :] * stride_ok, x.to(out_ptr.dtype.element_ty), mask=mask)


KERNEL = _hadamard_kernel


def kernel_args(x: torch.Tensor, signs: torch.Tensor, out: torch.Tensor, block: int) -> dict[str, Any]:
    """The kernel's arguments for ``out = x V^T`` with Hadamard block ``block`` (``BLOCK_M`` excluded)."""
    return {
        "x_ptr": x, "s_ptr": signs, "out_ptr": out, "M": x.shape[0],
        "stride_xm": x.stride(0), "stride_xk": x.stride(1), "stride_om": out.stride(0), "stride_ok": out.stride(1),
        "scale": 1.0 / math.sqrt(block), "BLOCK": block, "LOG_BLOCK": block.bit_length() - 1,
    }  # fmt: skip


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x V^T`` for ``x`` ``[M, K]`` (fp16/bf16/fp32, any strides) and int8 ``signs`` ``[K]``; ``[M, K]`` in
    ``x.dtype``, with ``b = block_size(K)``."""
    if x.dtype not in FLOAT_DTYPES:
        raise DecoupleQConfigError(f"x dtype {x.dtype} is not one of {FLOAT_DTYPES}")
    if x.dim() != 2:
        raise DecoupleQConfigError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if signs.dim() != 1 or signs.shape[0] != k:
        raise DecoupleQConfigError(f"signs must be [{k}], got shape {tuple(signs.shape)}")
    if signs.device != x.device:
        raise DecoupleQConfigError(f"signs are on {signs.device} but x is on {x.device}")
    b = hadamard_block_size(k)
    if b < 2:
        raise DecoupleQConfigError(f"K={k} is odd: it has no Hadamard block")
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, num_warps = hadamard_launch(m, b, interpreting())
    grid = (triton.cdiv(m, block_m), k // b)
    _hadamard_kernel[grid](**kernel_args(x, signs.contiguous(), out, b), BLOCK_M=block_m, num_warps=num_warps)
    return out
