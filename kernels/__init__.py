"""Kernels for decoupleQ packed weights, shipped as ``hf_decoupleq.kernels``.

* :mod:`.reference`: plain-PyTorch references (and the portable fallback) of every kernel.
* :mod:`.gemm` (prefill), :mod:`.gemv` (split-K decode), :mod:`.dequant`, :mod:`.hadamard` (activation transform of
  incoherence processing): Triton kernels and their launchers; :mod:`._tiles`: the Triton helpers they share
  (unpacking, group scales, dequantization).
* :mod:`.ops`: the ``torch.ops.hf_decoupleq.*`` custom ops around them (registered on import of this package), the
  one entry that validates arguments.
* :mod:`.configs`: tile configurations and launch heuristics; :mod:`.tuning`: autotuning log and ``pretune``;
  :mod:`.aot`: ahead-of-time compilation of every kernel configuration for sm_80/sm_90 without a GPU
  (``python -m hf_decoupleq.kernels.aot``).

Importing this package never imports Triton; the kernel modules import it when first used, so the PyTorch path
keeps working where Triton is not installed.
"""

from __future__ import annotations

import importlib.util

from . import ops, reference
from ._common import interpreting

__all__ = ["interpreting", "ops", "reference", "triton_available"]


# Decided once, without importing triton (that would cost seconds): a plain constant also keeps torch.compile
# from tracing an import check.
def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


_TRITON_AVAILABLE = _find_triton()


def triton_available() -> bool:
    """Whether triton is installed (the kernel modules import it when first used)."""
    return _TRITON_AVAILABLE
