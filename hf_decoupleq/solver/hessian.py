"""The layer Hessian ``H = X X^T / n`` (streamed in float64) and its dampened inverse Cholesky factor."""

from __future__ import annotations

import logging

import torch

from ..errors import DecoupleQConfigError, DecoupleQNumericalError
from .matmul import matmul_nt

logger = logging.getLogger(__name__)

# From this width on, each batch adds only the upper block triangle of x^T x (in column panels of _PANEL): about
# 2/3 of the multiply-adds for K = 1536, tending to 1/2; hessian() mirrors it.
_TRIANGLE_MIN_K = 1024
_PANEL = 512

# Dampening escalation (method.md step 0): d, 10 d, 100 d, 1000 d, then give up.
MAX_DAMP_TRIES = 4


class HessianAccumulator:
    """Streams ``H = X X^T / n`` over calibration tokens in float64.

    Args:
        in_features: ``K``, the width of the layer input.
        device: where ``H`` is accumulated; ``None`` means the device of the first batch added.
        name: the layer name, used in error messages.
        matmul_dtype: dtype of each batch's ``x^T x`` product. The running sum is always float64; float32 products
            (one rounding per batch, ~1e-7 relative) take about half the time of float64 ones on CPUs, less where
            oneDNN's GEMM is faster than the default one (:func:`hf_decoupleq.solver.matmul.matmul_nt`).

    Example:
        >>> acc = HessianAccumulator(4)
        >>> acc.add(torch.randn(2, 3, 4))
        >>> acc.nsamples, acc.hessian().shape
        (6, torch.Size([4, 4]))
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        name: str | None = None,
        matmul_dtype: torch.dtype = torch.float64,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise DecoupleQConfigError(f"in_features={in_features!r} must be a positive int")
        if matmul_dtype not in (torch.float32, torch.float64):
            raise DecoupleQConfigError(f"matmul_dtype={matmul_dtype} must be torch.float32 or torch.float64")
        self.matmul_dtype = matmul_dtype
        self.in_features = in_features
        self.name = name
        self.device = torch.device(device) if device is not None else None
        self._sum: torch.Tensor | None = None
        self.nsamples = 0
        self.nonfinite_batches = 0

    def _label(self) -> str:
        return f"layer {self.name!r}" if self.name else "layer"

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of ``x`` (``[..., in_features]``, any float dtype).

        Args:
            x: layer inputs.
            mask: optional bool tensor of shape ``x.shape[:-1]``; ``True`` marks a real token, ``False`` padding
                (excluded).
        """
        if x.shape[-1] != self.in_features:
            raise DecoupleQConfigError(
                f"{self._label()}: input has {x.shape[-1]} features, expected in_features={self.in_features}"
            )
        lead = tuple(x.shape[:-1])
        x = x.detach().reshape(-1, self.in_features)
        if mask is not None:
            if tuple(mask.shape) != lead:
                raise DecoupleQConfigError(
                    f"{self._label()}: mask has shape {tuple(mask.shape)}, expected x.shape[:-1] = {lead}"
                )
            x = x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
        if x.shape[0] == 0:
            return
        if self._sum is None:
            if self.device is None:
                self.device = x.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=self.device)
        # x^T as a contiguous [K, tokens] matrix in matmul_dtype (one pass for the cast and the transpose): every
        # panel below is then a block of whole rows, the layout the fast GEMMs take without a copy.
        xt = torch.empty((self.in_features, x.shape[0]), dtype=self.matmul_dtype, device=self.device)
        xt.copy_(x.T)
        if not torch.isfinite(xt).all():
            # Recorded rather than raised here: hessian() reports it once, with the layer name.
            self.nonfinite_batches += 1
            return
        # Called from forward hooks, possibly inside an autocast region: the product must stay in matmul_dtype.
        with torch.autocast(device_type=xt.device.type, enabled=False):
            if self.in_features < _TRIANGLE_MIN_K:
                self._add_panel(xt, 0, self.in_features)
            else:
                for start in range(0, self.in_features, _PANEL):
                    self._add_panel(xt, start, min(self.in_features, start + _PANEL))
        self.nsamples += xt.shape[1]

    def _add_panel(self, xt: torch.Tensor, start: int, stop: int) -> None:
        """``sum[start:stop, start:] += xt[start:stop] xt[start:]^T`` for ``xt = x^T`` (``[K, tokens]``)."""
        target = self._sum[start:stop, start:]
        if self.matmul_dtype == torch.float64:
            target.addmm_(xt[start:stop], xt[start:].T)
        else:
            # oneDNN's float32 GEMM where it is faster than the default one (see .matmul).
            target += matmul_nt(xt[start:stop], xt[start:]).to(torch.float64)

    def hessian(self) -> torch.Tensor:
        """Return ``H = X X^T / n`` as ``[K, K]`` float64.

        Raises:
            DecoupleQNumericalError: no tokens were added, or some input was non-finite.
        """
        if self.nonfinite_batches:
            raise DecoupleQNumericalError(
                f"{self._label()}: {self.nonfinite_batches} calibration batch(es) had NaN/Inf inputs; "
                "the Hessian would be non-finite"
            )
        if self._sum is None or self.nsamples == 0:
            raise DecoupleQNumericalError(f"{self._label()}: no calibration tokens were added to the Hessian")
        total = self._sum
        if self.in_features >= _TRIANGLE_MIN_K:
            upper = total.triu()
            total = upper + upper.triu(1).T
        return total / self.nsamples


def dampen(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` (method.md step 0); an all-zero diagonal dampens with 1 instead."""
    # abs(): a valid H has a non-negative diagonal; on a broken one this keeps the shift positive.
    diag_mean = h.diagonal().abs().mean()
    if not bool(diag_mean > 0):
        diag_mean = torch.ones((), dtype=h.dtype, device=h.device)
    out = h.clone()
    out.diagonal().add_(damp * diag_mean)
    return out


def inverse_cholesky_upper(
    h: torch.Tensor, damp: float, name: str | None = None, max_tries: int = MAX_DAMP_TRIES
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + d mean(diag H) I)^-1`` in float64, escalating ``d`` tenfold on failure.

    Returns:
        ``(U, d)`` with the dampening actually used.

    Raises:
        DecoupleQNumericalError: still not positive definite after ``max_tries`` dampening levels.
    """
    h = h.to(torch.float64)
    d = damp
    for attempt in range(max_tries):
        # With J the order-reversing permutation and J H J = M M^T (M lower), U = J M^-1 J is upper triangular
        # and U^T U = J M^-T M^-1 J = H^-1: one Cholesky and one triangular inverse instead of a Cholesky, an
        # inverse and a second Cholesky.
        hd = dampen(h, d).flip(0, 1)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all() and bool((upper.diagonal() > 0).all()):
                if attempt:
                    logger.warning("layer %s: Hessian needed dampening %.3g (asked for %.3g)", name, d, damp)
                return upper, d
        d *= 10.0
    raise DecoupleQNumericalError(
        f"layer {name!r}: Hessian of shape {tuple(h.shape)} is not positive definite even with dampening "
        f"{d / 10.0:.3g} x mean(diag H) after {max_tries} tries"
    )
