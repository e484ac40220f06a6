"""Argument checks shared by the kernel wrappers and the custom ops (pure torch; no triton import)."""

from __future__ import annotations

import os

import torch

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.packing import SUPPORTED_BITS, effective_group_size, num_groups, packed_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_packed(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int
) -> tuple[int, int]:
    """Validate a packed layer; returns ``(N, g)`` with ``g`` the effective group size."""
    if bits not in SUPPORTED_BITS:
        raise DecoupleQConfigError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
    g = effective_group_size(in_features, group_size)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise DecoupleQConfigError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    rows = packed_rows(in_features, bits)
    n_out = qweight.shape[1]
    if qweight.shape[0] != rows:
        raise DecoupleQConfigError(
            f"qweight has {qweight.shape[0]} rows; in_features={in_features} at bits={bits} needs {rows}"
        )
    n_groups = num_groups(in_features, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype not in FLOAT_DTYPES:
            raise DecoupleQConfigError(f"{name} dtype {t.dtype} is not one of {FLOAT_DTYPES}")
        if tuple(t.shape) != (n_groups, n_out):
            raise DecoupleQConfigError(f"{name} shape {tuple(t.shape)} != expected [{n_groups}, {n_out}]")
        if t.device != qweight.device:
            raise DecoupleQConfigError(f"{name} is on {t.device} but qweight is on {qweight.device}")
    return n_out, g


def check_input(x: torch.Tensor, in_features: int, device: torch.device) -> None:
    """Validate a 2-D activation ``[M, K]``."""
    if x.dtype not in FLOAT_DTYPES:
        raise DecoupleQConfigError(f"x dtype {x.dtype} is not one of {FLOAT_DTYPES}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise DecoupleQConfigError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    if x.device != device:
        raise DecoupleQConfigError(f"x is on {x.device} but the packed weight is on {device}")
