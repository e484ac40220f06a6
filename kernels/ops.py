"""PyTorch custom ops (namespace ``hf_decoupleq``): the one entry into the Triton kernels.

Registered with ``torch.library.custom_op`` and fake (meta) implementations, so ``torch.compile(..., fullgraph=True)``
traces through a module that calls them without graph breaks: the compiled graph calls the op, and the op launches
the autotuned kernels. Each op validates its arguments once (:meth:`~._common.PackedLayer.validate`) and hands
the checked :class:`~._common.PackedLayer` to the launchers, which do not check again. Triton is imported only when
an op actually runs.

* ``torch.ops.hf_decoupleq.matmul(x, qweight, scales, zeros, bits, group_size, in_features)``: ``x @ W^T`` for a
  2-D ``x``; the split-K decode kernel for ``M <= 16`` rows, the tiled prefill kernel otherwise.
* ``torch.ops.hf_decoupleq.dequantize(qweight, scales, zeros, bits, group_size, in_features)``: ``W`` ``[N, K]`` in
  the scales' dtype.
* ``torch.ops.hf_decoupleq.hadamard(x, signs)``: ``x V^T`` for a 2-D ``x`` (incoherence processing, see
  :mod:`hf_decoupleq.hadamard`).

These ops are not differentiable; ``DecoupleQLinear`` takes its PyTorch path when a gradient is needed.
"""

from __future__ import annotations

import torch

from ._common import PackedLayer, check_input
from .configs import MAX_DECODE_M

__all__ = ["dequantize", "hadamard", "matmul"]


def _checked(x: torch.Tensor | None, *packed) -> PackedLayer:
    layer = PackedLayer.validate(*packed)
    if x is not None:
        check_input(x, layer.in_features, layer.device)
    return layer


@torch.library.custom_op("hf_decoupleq::matmul", mutates_args=())
def matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
    in_features: int,
) -> torch.Tensor:  # fmt: skip
    """Fused dequantize-matmul ``x @ W^T`` (``x`` ``[M, K]``) in ``x.dtype`` with the Triton kernels."""
    layer = _checked(x, qweight, scales, zeros, bits, group_size, in_features)
    if 1 <= x.shape[0] <= MAX_DECODE_M:
        from . import gemv

        return gemv.launch(x, layer)
    from . import gemm

    return gemm.launch(x, layer)


@matmul.register_fake
def _matmul_fake(x, *packed):
    return x.new_empty((x.shape[0], _checked(x, *packed).out_features))


@torch.library.custom_op("hf_decoupleq::dequantize", mutates_args=())
def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """Dequantized weight ``[N, K]`` in ``scales.dtype`` with the Triton dequantize kernel."""
    from . import dequant

    return dequant.launch(_checked(None, qweight, scales, zeros, bits, group_size, in_features))


@dequantize.register_fake
def _dequantize_fake(*packed):
    layer = _checked(None, *packed)
    return layer.scales.new_empty((layer.out_features, layer.in_features))


@torch.library.custom_op("hf_decoupleq::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Randomized block Hadamard transform ``x V^T`` (``x`` ``[M, K]``, int8 ``signs`` ``[K]``) in ``x.dtype``."""
    from .hadamard import hadamard_transform

    return hadamard_transform(x, signs)


@hadamard.register_fake
def _hadamard_fake(x, signs):
    check_input(x, signs.shape[0], signs.device)
    return x.new_empty(x.shape)
