"""Uniform group quantization: grids, min-max parameters, round-to-nearest and the H-weighted clipping search.

Notation follows ``docs/method.md``: ``W`` is ``N x K`` (out x in), column ``k`` belongs to group ``k // g``,
``G = ceil(K / g)`` groups per row (the last one may be shorter), and ``W_hat = s * q + z`` groupwise with
integer codes ``q`` in ``{0, ..., 2**bits - 1}``.
"""

from __future__ import annotations

import math

import torch

from ..errors import DecoupleQConfigError

# Code widths the solver handles. The packed format stores 2, 3, 4 and 8 (``hf_decoupleq.format``); 5- and 6-bit codes
# (the GGUF types Q5_0, Q5_1, Q5_K, Q6_K) are stored there in 8-bit words (``hf_decoupleq.format.storage_bits``).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Number of points of the Eq. 12 clipping grid: p = 1 - j / 200 for j = 0..160 (p from 1 down to 0.2).
GRID_POINTS = 161
GRID_STEP = 1.0 / 200.0


def max_code(bits: int) -> int:
    """Largest integer code for ``bits`` bits (``2**bits - 1``)."""
    return (1 << bits) - 1


def validate_bits(bits: int) -> int:
    """Return ``bits`` if supported, else raise :class:`DecoupleQConfigError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise DecoupleQConfigError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")
    return bits


def effective_group_size(group_size: int, in_features: int) -> int:
    """Group size in columns: ``-1`` (per-channel) or any size ``>= in_features`` means one group per row."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise DecoupleQConfigError(f"group_size={group_size!r} is not allowed; use a positive int or -1 (per-channel)")
    if group_size == -1 or group_size >= in_features:
        return in_features
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in_features / group_size)``."""
    return math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[K]`` long tensor mapping column ``k`` to its group ``k // group_size``."""
    return torch.arange(in_features, device=device) // group_size


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Broadcast per-group values ``[N, G]`` to per-column values ``[N, K]``."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum ``[N, K]`` over each group of columns, giving ``[N, G]`` (the last group may be shorter)."""
    n, k = x.shape
    full = (k // group_size) * group_size
    parts = []
    if full:
        parts.append(x[:, :full].reshape(n, full // group_size, group_size).sum(-1))
    if full < k:
        parts.append(x[:, full:].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    full = (k // group_size) * group_size
    mins, maxs = [], []
    if full:
        v = w[:, :full].reshape(n, full // group_size, group_size)
        mins.append(v.amin(-1))
        maxs.append(v.amax(-1))
    if full < k:
        mins.append(w[:, full:].amin(-1, keepdim=True))
        maxs.append(w[:, full:].amax(-1, keepdim=True))
    return torch.cat(mins, dim=1), torch.cat(maxs, dim=1)


def _tiny_scale(w: torch.Tensor) -> torch.Tensor:
    # A floor for scales, relative to each row's magnitude, so that constant or all-zero groups never divide by 0
    # (their codes then sit at one end of the grid and the zero carries the value).
    return (w.abs().amax(dim=1, keepdim=True) * 1e-8).clamp_min(1e-30)


def sanitize_scales(scales: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Replace scales whose magnitude is below a row-relative floor by that floor (keeping the sign)."""
    tiny = _tiny_scale(w).to(scales.dtype)
    sign = torch.where(scales < 0, -1.0, 1.0).to(scales.dtype)
    return torch.where(scales.abs() < tiny, sign * tiny, scales)


def minmax_params(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    shrink: torch.Tensor | float = 1.0,
    symmetric: bool = False,
    integer_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zeros per group, with the range shrunk by ``shrink`` (Eq. 12's ``p``).

    Args:
        w: ``[N, K]`` weights.
        bits: code width.
        group_size: effective group size in columns.
        shrink: a float or a per-row ``[N]`` tensor ``p`` in ``(0, 1]``.
        symmetric: ``W_hat = s (q - 2**(bits-1))`` with ``s = 2 p max|w| / (2**bits - 1)`` (GPTQ's sym).
        integer_zero: ``z = -s z_int`` with integer ``z_int`` in the code range; the range is widened to
            contain 0 (as GPTQ does) so that such a zero exists.

    Returns:
        ``(scales, zeros)``, each ``[N, G]`` in ``w``'s dtype.
    """
    wmin, wmax = _group_minmax(w, group_size)
    return _range_params(wmin, wmax, _tiny_scale(w), bits, shrink, symmetric, integer_zero)


def _range_params(wmin, wmax, tiny, bits, shrink, symmetric, integer_zero):
    maxq = max_code(bits)
    p = shrink if not torch.is_tensor(shrink) else shrink.to(wmin.dtype).reshape(-1, 1)
    if symmetric:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        scales = torch.maximum(p * 2.0 * amax / maxq, tiny)
        zeros = -scales * float(1 << (bits - 1))
        return scales, zeros
    if integer_zero:
        wmin = wmin.clamp(max=0.0)
        wmax = wmax.clamp(min=0.0)
    wmin = p * wmin
    wmax = p * wmax
    scales = torch.maximum((wmax - wmin) / maxq, tiny)
    if integer_zero:
        zint = torch.round(-wmin / scales).clamp_(0, maxq)
        zeros = -scales * zint
    else:
        zeros = wmin
    return scales, zeros


def rtn_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest codes ``clamp(round((w - z) / s), 0, 2**bits - 1)`` as floats ``[N, K]``."""
    k = w.shape[1]
    s = expand_groups(scales, group_size, k)
    z = expand_groups(zeros, group_size, k)
    return torch.round((w - z) / s).clamp_(0, max_code(bits))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W_hat = s * q + z`` groupwise, in the dtype of ``scales``.

    Scales and zeros are broadcast over ``[N, G, group_size]`` views of the codes rather than gathered per column,
    so under autograd their gradients are plain sums over each group (a gather's backward is a scattered
    ``index_put`` with accumulation, which dominated the block-wise stage's step time on CPUs).
    """
    n, k = codes.shape
    q = codes.to(scales.dtype)
    nfull = k // group_size
    full = nfull * group_size
    parts = []
    if nfull:
        grouped = q[:, :full].reshape(n, nfull, group_size)
        parts.append(torch.addcmul(zeros[:, :nfull, None], scales[:, :nfull, None], grouped).reshape(n, full))
    if full < k:  # a shorter last group
        parts.append(torch.addcmul(zeros[:, nfull : nfull + 1], scales[:, nfull : nfull + 1], q[:, full:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def row_losses(err: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row proxy loss ``e_i H e_i^T`` for ``err`` ``[N, K]`` (Eq. 6), computed in ``err``'s dtype."""
    return ((err @ h) * err).sum(dim=1)


def clip_search(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    integer_zero: bool = False,
    steps: tuple[int, ...] = (16, 4, 1),
    eval_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 12: per row, the shrink ``p = 1 - j/200`` (``j = 0..160``) with the smallest H-weighted RTN loss.

    The grid is searched coarse to fine: every ``steps[0]``-th point first, then, around each row's best so far,
    the points ``steps[1]`` apart, and so on down to ``steps[-1]``. ``steps=(1,)`` is the exhaustive search.
    ``eval_dtype`` (e.g. ``torch.bfloat16``) runs the ``err @ H`` products of the search in that dtype: the search
    only ranks candidates, and the solver's later steps do not depend on its last digits.

    Returns:
        ``(scales, zeros, j)``: the chosen parameters ``[N, G]`` and the grid index ``j`` per row ``[N]``.
    """
    n = w.shape[0]
    last = GRID_POINTS - 1
    best_loss = torch.full((n,), math.inf, dtype=w.dtype, device=w.device)
    best_j = torch.zeros(n, dtype=torch.long, device=w.device)

    wmin, wmax = _group_minmax(w, group_size)
    tiny = _tiny_scale(w)
    k = w.shape[1]
    ng = num_groups(k, group_size)
    maxq = max_code(bits)
    h_eval = h.to(eval_dtype) if eval_dtype is not None else h
    # A [N, G, g] view (zero-padded when g does not divide K) broadcasts the per-group parameters without
    # materializing per-column copies: this loop is bound by elementwise passes once the matmul is cheap.
    wg = w if ng * group_size == k else torch.nn.functional.pad(w, (0, ng * group_size - k))
    wg = wg.reshape(n, ng, group_size)

    def evaluate(j: torch.Tensor) -> None:
        p = 1.0 - j.to(w.dtype) * GRID_STEP
        s, z = _range_params(wmin, wmax, tiny, bits, p, symmetric, integer_zero)
        wz = wg - z[..., None]
        q = (wz * s.reciprocal()[..., None]).round_().clamp_(0, maxq)
        err = torch.addcmul(wz, q, s[..., None], value=-1.0).reshape(n, ng * group_size)[:, :k]
        if eval_dtype is not None:
            loss = ((err.to(eval_dtype) @ h_eval).to(w.dtype) * err).sum(dim=1)
        else:
            loss = row_losses(err, h)
        better = loss < best_loss
        best_loss.copy_(torch.where(better, loss, best_loss))
        best_j.copy_(torch.where(better, j, best_j))

    first = steps[0]
    coarse = list(range(0, GRID_POINTS, first))
    if coarse[-1] != last:
        coarse.append(last)
    for j in coarse:
        evaluate(torch.full((n,), j, dtype=torch.long, device=w.device))
    prev = first
    for step in steps[1:]:
        centre = best_j.clone()
        for m in range(1, max(prev // step, 1)):
            for sign in (-1, 1):
                cand = centre + sign * m * step
                valid = (cand >= 0) & (cand <= last)
                if valid.any():
                    # Rows whose candidate falls off the grid re-evaluate their centre, which changes nothing.
                    evaluate(torch.where(valid, cand, centre))
        prev = step
    p = 1.0 - best_j.to(w.dtype) * GRID_STEP
    s, z = minmax_params(w, bits, group_size, p, symmetric, integer_zero)
    return s, z, best_j
