"""Plain-PyTorch references of every kernel in this package (the ground truth the Triton kernels are tested against).

They are also the portable fallback: everything here runs on any device and is differentiable with respect
to ``scales``, ``zeros`` and ``x``.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_decoupleq.format import effective_group_size
from hf_decoupleq.hadamard import transform_input
from hf_decoupleq.packing import unpack

__all__ = ["dequantize", "dequantize_codes", "hadamard", "matmul"]


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W[n, k] = scales[k // g, n] * codes[n, k] + zeros[k // g, n]`` for codes ``[N, K]``, scales ``[G, N]``.

    Differentiable in ``scales`` and ``zeros``. ``dtype`` (default: ``scales.dtype``) is the dtype of the math
    and of the result.
    """
    dtype = dtype or scales.dtype
    k = codes.shape[1]
    g = effective_group_size(k, group_size)
    idx = torch.arange(k, device=codes.device) // g
    s = scales.to(dtype).index_select(0, idx).T  # [N, K]
    z = zeros.to(dtype).index_select(0, idx).T
    return codes.to(dtype) * s + z


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference of the dequantize kernel: packed ``qweight`` -> ``W`` ``[N, K]`` in ``dtype`` (default scales')."""
    return dequantize_codes(unpack(qweight, bits, in_features), scales, zeros, group_size, dtype)


def matmul(x: torch.Tensor, *packed: Any) -> torch.Tensor:
    """Reference of the fused kernels: ``x @ W^T`` for ``x`` ``[..., K]``, in ``x.dtype`` (fp32 math for halves).

    ``packed`` is ``(qweight, scales, zeros, bits, group_size, in_features)``, as for :func:`dequantize`.
    """
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.to(compute) @ dequantize(*packed, dtype=compute).T).to(x.dtype)


def hadamard(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Reference of the Hadamard kernel: ``x V^T`` (randomized block Hadamard, :mod:`hf_decoupleq.hadamard`)."""
    return transform_input(x, signs)
