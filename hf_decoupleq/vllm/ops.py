"""Custom ops (namespace ``hf_decoupleq_vllm``) around the PyTorch compute of :mod:`hf_decoupleq.nn.functional`.

vLLM traces a model once with dynamic batch sizes (``torch.compile``); Python branches on the number of rows would
be specialized into the graph. As custom ops with fake implementations, these are opaque to the tracer and choose
their path at run time. Pure torch (no vLLM import).
"""

from __future__ import annotations

import torch

from ..hadamard import transform_input
from ..nn import functional as F

__all__ = ["codes_linear", "int4_linear", "rotate"]


@torch.library.custom_op("hf_decoupleq_vllm::rotate", mutates_args=())
def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x V^T`` for a 2-D ``x`` (:func:`hf_decoupleq.hadamard.transform_input`), in ``x.dtype``."""
    return transform_input(x, signs)


@rotate.register_fake
def _rotate_fake(x, signs):
    return x.new_empty(x.shape)


@torch.library.custom_op("hf_decoupleq_vllm::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """``x W^T`` with PyTorch's fused int4 CPU kernel on :func:`~hf_decoupleq.nn.functional.cpu_int4_operands`."""
    return F.cpu_int4_matmul(x, packed, scale_zero, group_size)


@int4_linear.register_fake
def _int4_linear_fake(x, packed, scale_zero, group_size, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("hf_decoupleq_vllm::codes_linear", mutates_args=())
def codes_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``x W^T`` from unpacked uint8 codes ``[G, g, N]`` (:func:`~hf_decoupleq.nn.functional.torch_matmul`)."""
    return F.torch_matmul(x, codes, scales, zeros, in_features)


@codes_linear.register_fake
def _codes_linear_fake(x, codes, scales, zeros, in_features):
    return x.new_empty((x.shape[0], codes.shape[-1]))
