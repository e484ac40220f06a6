"""The PyTorch compute of a decoupleQ linear as module-level functions (no module state, no caches).

`DecoupleQLinear` calls these on its cached operands; the vLLM plugin (:mod:`hf_decoupleq.vllm`) calls the same
functions on operands it prepares once after loading. The packed layout is :mod:`hf_decoupleq.packing`'s:
``qweight`` int32 ``[packed_rows(K, bits), N]``, ``scales``/``zeros`` ``[G, N]``, ``W[n, k] = s q + z``.
"""

from __future__ import annotations

import torch

from ..kernels import reference
from ..packing import effective_group_size, num_groups, unpack

__all__ = [
    "CPU_INT4_GROUPS",
    "GROUPED_MAX_M",
    "codes_by_group",
    "cpu_int4_matmul",
    "cpu_int4_operands",
    "cpu_int4_supported",
    "grouped_matmul",
    "torch_matmul",
]

# Group sizes accepted by PyTorch's fused CPU int4 kernel (aten._weight_int4pack_mm_for_cpu).
CPU_INT4_GROUPS = (32, 64, 128, 256)
# The generic PyTorch path uses the grouped formula up to this many rows, one dequantized temporary above.
GROUPED_MAX_M = 16
# Codes converted to float per chunk of output columns (~1 MiB of fp32: stays in L2).
_CHUNK_ELEMS = 1 << 18


def codes_by_group(qweight: torch.Tensor, bits: int, in_features: int, group_size: int) -> torch.Tensor:
    """Unpacked uint8 codes as ``[G, g, N]`` (``g`` the effective group size; K zero-padded to ``G * g``), 1 byte per
    weight. ``group_size`` may be ``-1`` (per-channel)."""
    n_out = qweight.shape[1]
    n_groups, g = num_groups(in_features, group_size), effective_group_size(in_features, group_size)
    codes = torch.zeros(n_groups * g, n_out, dtype=torch.uint8, device=qweight.device)
    codes[:in_features] = unpack(qweight, bits, in_features).T
    return codes.view(n_groups, g, n_out)


def cpu_int4_supported(
    bits: int, group_size: int, out_features: int, compute_dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether PyTorch's fused int4 CPU kernel can run this layer (``group_size``: the effective group size).

    It needs bfloat16 compute, codes of at most 4 bits, a group size of 32/64/128/256, ``out_features % 16 == 0``
    and tensors on the CPU. A last group shorter than ``group_size`` (SmolLM2's K = 576 at g128) is padded: the
    padded columns meet zero inputs, so their codes do not matter.
    """
    return (
        compute_dtype == torch.bfloat16
        and bits <= 4
        and group_size in CPU_INT4_GROUPS
        and out_features % 16 == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
        and torch.device(device).type == "cpu"
    )


def cpu_int4_operands(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands of ``aten._weight_int4pack_mm_for_cpu``: the 4-bit repacked codes and the bf16 scale/zero pairs.

    ``K`` is padded to whole groups of ``group_size`` (the effective group size); :func:`cpu_int4_matmul` pads the
    input to match.

    The kernel computes ``(c - 8) * s + z'``. Storing ``c = q + 8 - m`` with ``m = 2**(bits-1)`` (the middle code)
    gives ``(q - m) * s + z'``, so ``z' = z + m * s``: the middle of the group's range, which is small and rounds to
    bfloat16 with little error (``z + 8 s`` would be far larger than the weights at 2 bits).
    """
    mid = 1 << (bits - 1)
    codes = unpack(qweight, bits, in_features).to(torch.int32) + (8 - mid)
    padded = scales.shape[0] * group_size  # whole groups
    if padded != in_features:
        codes = torch.nn.functional.pad(codes, (0, padded - in_features), value=8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = scales.detach().float()
    z = zeros.detach().float() + mid * s
    return packed, torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()


def cpu_int4_matmul(x2: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x W^T`` for a 2-D ``x`` with the fused int4 CPU kernel (bfloat16 math), in ``x.dtype``."""
    padded = scale_zero.shape[0] * group_size
    xb = x2.to(torch.bfloat16)
    if xb.shape[1] != padded:  # a short last group: zero inputs for the padded columns
        xb = torch.nn.functional.pad(xb, (0, padded - xb.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, group_size, scale_zero)
    return y.to(x2.dtype)


def grouped_matmul(
    x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``x W^T = sum_g s_g * (x_g . q_g) + z_g * sum(x_g)`` for few rows, without a full-size temporary.

    ``codes`` are :func:`codes_by_group`'s ``[G, g, N]``. Per group the codes enter a batched matmul unscaled; the
    zero term needs only the group sums of ``x``. Output columns go in chunks so that each chunk's float copy of
    the codes stays in cache.
    """
    n_groups, g, n_out = codes.shape
    m, dtype = x2.shape[0], x2.dtype
    if n_groups * g != in_features:
        x2 = torch.nn.functional.pad(x2, (0, n_groups * g - in_features))
    xg = x2.reshape(m, n_groups, g).transpose(0, 1)  # [G, M, g]
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    y = xg.sum(-1).T @ zeros  # [M, N]: the zero term
    chunk = max(16, (_CHUNK_ELEMS // (n_groups * g)) // 16 * 16)
    for n0 in range(0, n_out, chunk):
        n1 = min(n_out, n0 + chunk)
        partial = torch.bmm(xg, codes[:, :, n0:n1].to(dtype))  # [G, M, nc] = x_g . q_g
        y[:, n0:n1] += torch.einsum("gmn,gn->mn", partial, scales[:, n0:n1])
    return y


def torch_matmul(
    x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``x W^T`` from :func:`codes_by_group`'s codes in ``x.dtype``: :func:`grouped_matmul` for up to
    :data:`GROUPED_MAX_M` rows, one dequantized temporary weight and a GEMM above (compute-bound anyway)."""
    if x2.shape[0] > GROUPED_MAX_M:
        flat = codes.view(-1, codes.shape[-1])[:in_features].T
        w = reference.dequantize_codes(flat, scales, zeros, codes.shape[1], x2.dtype)
        return x2 @ w.T
    return grouped_matmul(x2, codes, scales, zeros, in_features)
