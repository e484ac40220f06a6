"""``a @ b.T`` for large float32 CPU matrices through oneDNN, with a plain ``matmul`` everywhere else.

PyTorch runs IEEE float32 ``mm`` on CPUs through MKL. On the project's 2-core AMD EPYC (Zen 5) machine that is about
half as fast as oneDNN's float32 GEMM (``x^T x`` for x of 4096 x 1536: 93 ms vs 44 ms,
``examples/benchmarks/bench_matmul.py``), consistent with MKL choosing AVX2 code on non-Intel processors; both are
IEEE float32 with float32 accumulation. PyTorch already ships oneDNN (it serves bf16 matmuls and ``torch.compile``'s
CPU linears), and its ``mkldnn::_linear_pointwise`` operator takes ordinary dense tensors, so this module calls it for
the solver's no-grad float32 products (the Hessian accumulation). It falls back to ``a @ b.T`` when oneDNN is not
built in, the tensors are not contiguous 2-D float32 CPU tensors, autograd needs the product, the product is small,
or the operator fails.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Below about this many multiply-adds the call overhead of a oneDNN primitive outweighs its faster kernel.
_MIN_MACS = 1 << 22

_state = {"usable": None}


def _onednn_usable() -> bool:
    usable = _state["usable"]
    if usable is None:
        usable = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        _state["usable"] = usable
    return usable


def _onednn_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for 2-D ``a`` ``[M, K]`` and ``b`` ``[N, K]``, in their common dtype.

    Large float32 CPU products of contiguous (row-major) tensors without autograd go through oneDNN; everything
    else is ``a @ b.T``. Both are float32-accurate (float32 accumulation), though not bit-identical.
    """
    if (
        a.dim() == 2
        and b.dim() == 2
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        # Other layouts (e.g. column slices) can drop oneDNN to its slow reference kernel.
        and a.is_contiguous()
        and b.is_contiguous()
        and a.shape[0] * a.shape[1] * b.shape[0] >= _MIN_MACS
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        and _onednn_usable()
    ):
        try:
            return _onednn_matmul_nt(a, b)
        except (RuntimeError, NotImplementedError) as exc:  # an unusual build: use the plain product from now on
            logger.debug("oneDNN float32 matmul unavailable (%s); using torch.matmul", exc)
            _state["usable"] = False
    return a @ b.T


__all__ = ["matmul_nt"]
