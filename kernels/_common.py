"""The validated arguments every kernel takes (pure torch; no triton import).

A packed layer is checked once, where it enters the kernels (the custom ops of :mod:`.ops`), and travels as a
:class:`PackedLayer` from there on: the launchers in :mod:`.gemm`, :mod:`.gemv` and :mod:`.dequant` trust it.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.format import check_bits, effective_group_size, num_groups, packed_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class PackedLayer(NamedTuple):
    """A packed layer whose tensors agree with each other and with ``docs/format.md``.

    Build it with :meth:`validate`; ``group_size`` is the effective group size in columns.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @classmethod
    def validate(cls, *args: Any) -> PackedLayer:
        """Check ``(qweight, scales, zeros, bits, group_size, in_features)``, the fields in order (``group_size`` may
        be ``-1`` or larger than ``in_features``: per-channel)."""
        qweight, scales, zeros, bits, group_size, in_features = cls(*args)
        check_bits(bits)
        g = effective_group_size(in_features, group_size)
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise DecoupleQConfigError(
                f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        rows = packed_rows(in_features, bits)
        if qweight.shape[0] != rows:
            raise DecoupleQConfigError(
                f"qweight has {qweight.shape[0]} rows; in_features={in_features} at bits={bits} needs {rows}"
            )
        expected = (num_groups(in_features, group_size), qweight.shape[1])
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.dtype not in FLOAT_DTYPES:
                raise DecoupleQConfigError(f"{name} dtype {t.dtype} is not one of {FLOAT_DTYPES}")
            if tuple(t.shape) != expected:
                raise DecoupleQConfigError(f"{name} shape {tuple(t.shape)} != expected [{expected[0]}, {expected[1]}]")
            if t.device != qweight.device:
                raise DecoupleQConfigError(f"{name} is on {t.device} but qweight is on {qweight.device}")
        return cls(qweight, scales, zeros, bits, g, in_features)


def check_input(x: torch.Tensor, in_features: int, device: torch.device) -> None:
    """Validate a 2-D activation ``[M, K]``."""
    if x.dtype not in FLOAT_DTYPES:
        raise DecoupleQConfigError(f"x dtype {x.dtype} is not one of {FLOAT_DTYPES}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise DecoupleQConfigError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    if x.device != device:
        raise DecoupleQConfigError(f"x is on {x.device} but the packed weight is on {device}")
