"""The layer-wise stage of decoupleQ (Eq. 6) and its RTN / GPTQ baselines: :func:`solve_layer`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DecoupleQConfigError, DecoupleQNumericalError
from .quant import (
    clip_search,
    dequantize,
    effective_group_size,
    expand_groups,
    group_sum,
    max_code,
    minmax_params,
    num_groups,
    row_losses,
    rtn_codes,
    sanitize_scales,
    validate_bits,
)
from .rounding import DEFAULT_BLOCK_SIZE, coordinate_descent, gptq_round, prepare_gptq

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "decoupleq")
# Diagonal regularizers tried, relative to each diagonal entry, when a (s, z) system is singular.
_RIDGES = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


@dataclass(frozen=True, eq=False)
class QuantResult:
    """A quantized ``[out, in]`` weight: ``W_hat[i, k] = scales[i, k // g] * codes[i, k] + zeros[i, k // g]``.

    Attributes:
        codes: ``torch.uint8 [out, in]``, values in ``[0, 2**bits - 1]``.
        scales: ``float32 [out, G]`` with ``G = ceil(in / group_size)``.
        zeros: ``float32 [out, G]``.
        loss: ``float64 [out]`` proxy loss ``(w - w_hat) H (w - w_hat)^T`` per row, undamped ``H``.
        bits: code width.
        group_size: effective group size in columns (``in`` when per-channel).
        stats: solver diagnostics (method, rounds run, dampening used, time, total loss per stage).
        symmetric: zeros are tied to ``-2**(bits-1) * scales`` (the block-wise stage keeps them tied).
        integer_zero: each zero is ``-scales * z_int`` with an integer ``z_int`` in the code range (the block-wise
            stage keeps each group's ``z_int`` and trains its scale).
        grid: for a k-quant layer (:mod:`hf_decoupleq.solver.kquant`), its :class:`~hf_decoupleq.solver.kquant.KGrid`
            (super-scales); the block-wise stage keeps the scales and zeros on it.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    loss: torch.Tensor
    bits: int
    group_size: int
    stats: dict[str, Any] = field(default_factory=dict)
    symmetric: bool = False
    grid: Any = None
    integer_zero: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` as ``float32 [out, in]``."""
        return dequantize(self.codes, self.scales.float(), self.zeros.float(), self.group_size)


def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve the batch of PSD systems ``a x = b`` (``[N, m, m]``, ``[N, m]``, float64).

    Rows whose system is singular get a diagonal regularizer relative to their diagonal, escalated until the
    Cholesky factorization succeeds; the very last resort is a pseudo-inverse.
    """
    n, m, _ = a.shape
    x = torch.zeros_like(b)
    todo = torch.arange(n, device=a.device)
    diag = a.diagonal(dim1=-2, dim2=-1)
    # Scale-aware ridge: relative to each diagonal entry plus a little of the row's mean diagonal, so that
    # an all-zero row/column (unidentifiable variable) is also lifted.
    ridge_base = diag + 1e-6 * diag.mean(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    for rel in _RIDGES:
        if todo.numel() == 0:
            break
        sub = a[todo]
        if rel:
            sub = sub + rel * ridge_base[todo].unsqueeze(-1) * eye
        chol, info = torch.linalg.cholesky_ex(sub)
        sol = torch.cholesky_solve(b[todo].unsqueeze(-1), chol).squeeze(-1)
        ok = (info == 0) & torch.isfinite(sol).all(-1)
        x[todo[ok]] = sol[ok]
        todo = todo[~ok]
    if todo.numel():
        x[todo] = (torch.linalg.pinv(a[todo], hermitian=True) @ b[todo].unsqueeze(-1)).squeeze(-1)
    return x


def _normal_equations(
    err: torch.Tensor, qs: torch.Tensor, h: torch.Tensor, group_size: int, with_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble ``A delta = r`` for the update of ``theta = [s_1..s_G, (z_1..z_G)]`` from the current point.

    ``W_hat = s * qs + z`` groupwise; ``err = W - W_hat`` at the current point. Built from ``g x g`` blocks of
    ``H`` with one ``[N, g] x [g, K - a g]`` product per group ``a`` (only the blocks ``b >= a``: ``P11`` is
    symmetric), never an ``N x G x K`` tensor.
    """
    n, k = qs.shape
    g = group_size
    ng = num_groups(k, g)
    p11 = torch.zeros(n, ng, ng, dtype=torch.float64, device=qs.device)
    p12 = torch.empty_like(p11) if with_zero else None
    h_ones = group_sum(h, g).T.contiguous() if with_zero else None  # [G, K]: row b is 1^T H_{b, :}
    for a in range(ng):
        lo, hi = a * g, min((a + 1) * g, k)
        q_a = qs[:, lo:hi]
        t = q_a @ h[lo:hi, lo:]  # row i: q_ia^T H_{a, b} for the groups b >= a
        p11[:, a, a:] = group_sum(t * qs[:, lo:], g)
        if with_zero:
            p12[:, a, :] = q_a @ h_ones[:, lo:hi].T  # q_ia^T H_{a, b} 1 for every b
    p11 = p11 + p11.triu(1).transpose(1, 2)
    he = err @ h  # H is symmetric, so row i is (H e_i)^T
    r_s = group_sum(he * qs, g).to(torch.float64)
    if not with_zero:
        return p11, r_s
    p22 = group_sum(h_ones, g).to(torch.float64)
    top = torch.cat([p11, p12], dim=2)
    bottom = torch.cat([p12.transpose(1, 2), p22.expand(n, ng, ng)], dim=2)
    a_mat = torch.cat([top, bottom], dim=1)
    r = torch.cat([r_s, group_sum(he, g).to(torch.float64)], dim=1)
    return a_mat, r


def _fit(
    w: torch.Tensor,
    h: torch.Tensor,
    qs: torch.Tensor,
    s0: torch.Tensor,
    z0: torch.Tensor | None,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact minimizer of ``sum_i (w_i - w_hat_i) H (..)^T`` over ``s`` (and ``z`` if ``z0`` is given), codes fixed.

    Solved as an update from ``(s0, z0)``: assembling the system in float32 then only perturbs the (small) step,
    not the whole solution, which keeps float32 accurate enough on ill-conditioned ``H``.
    """
    k = w.shape[1]
    g = group_size
    ng = s0.shape[1]
    w_hat = qs * expand_groups(s0, g, k)
    if z0 is not None:
        w_hat = w_hat + expand_groups(z0, g, k)
    a_mat, r = _normal_equations(w - w_hat, qs, h, g, z0 is not None)
    # Unidentifiable scales: with a free zero, a group whose codes are all equal (s and z collinear); without
    # one, a group whose shifted codes are all 0. Keep their scale where it is and solve for the rest.
    if z0 is not None:
        deg = _group_const(qs, g)
    else:
        deg = _group_const(qs, g) & (group_sum(qs.abs(), g) == 0)
    a_mat = 0.5 * (a_mat + a_mat.transpose(1, 2))
    if deg.any():
        idx = deg.nonzero(as_tuple=True)
        a_mat[idx[0], idx[1], :] = 0.0
        a_mat[idx[0], :, idx[1]] = 0.0
        a_mat[idx[0], idx[1], idx[1]] = 1.0
        r[idx[0], idx[1]] = 0.0
    delta = _solve_spd(a_mat, r).to(w.dtype)
    s = s0 + delta[:, :ng]
    z = None if z0 is None else z0 + delta[:, ng:]
    return s, z


def _group_const(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[N, G]`` bool: all entries of the group are equal."""
    k = x.shape[1]
    first = expand_groups(x[:, ::g], g, k)
    return group_sum((x != first).to(x.dtype), g) == 0


def scale_zero_step(
    weight: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    group_size: int,
    bits: int,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    symmetric: bool = False,
    integer_zero: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (s, z)-step of method.md step 3a: with the codes fixed, the per-row least-squares floats.

    For every row ``i`` this minimizes ``(w_i - w_hat_i) H (w_i - w_hat_i)^T`` with
    ``w_hat = s * q + z`` groupwise, by solving the batched ``2G x 2G`` normal equations
    ``[[P11, P12], [P12^T, P22]] theta_i = r_i`` in float64 (``G x G`` in ``s`` alone when ``symmetric``).
    With ``integer_zero`` the free solution's zero is projected onto ``z = -s z_int`` (``z_int`` an integer code)
    and the scale re-solved with that ``z_int`` fixed.

    Args:
        weight: ``[N, K]``.
        H: ``[K, K]`` (symmetric PSD).
        codes: ``[N, K]`` integer codes (any dtype).
        group_size: columns per group (``-1`` or ``K`` for per-channel).
        bits: code width.
        scales, zeros: the current point ``[N, G]`` (only a starting point: the result does not depend on it
            except where a scale is unidentifiable, in which case it is kept). Default 0.
        symmetric: zero fixed at ``-s * 2**(bits-1)``; solve for ``s`` only.
        integer_zero: zeros constrained to ``-s * z_int``, ``z_int`` in ``[0, 2**bits - 1]``.
        compute_dtype: dtype of the big products (the small systems are always float64).

    Returns:
        ``(scales, zeros)`` ``[N, G]`` in ``compute_dtype``.
    """
    k = weight.shape[1]
    g = effective_group_size(group_size, k)
    validate_bits(bits)
    if tuple(codes.shape) != tuple(weight.shape) or tuple(H.shape) != (k, k):
        raise DecoupleQConfigError(
            f"codes {tuple(codes.shape)} and H {tuple(H.shape)} do not match weight {tuple(weight.shape)}"
        )
    ng = num_groups(k, g)
    w = weight.to(compute_dtype)
    h = H.to(device=w.device, dtype=compute_dtype)
    q = codes.to(device=w.device, dtype=compute_dtype)
    s0 = torch.zeros(w.shape[0], ng, dtype=compute_dtype, device=w.device) if scales is None else scales.to(w)
    z0 = torch.zeros_like(s0) if zeros is None else zeros.to(w)
    maxq = max_code(bits)
    if symmetric:
        mid = float(1 << (bits - 1))
        s, _ = _fit(w, h, q - mid, s0, None, g)
        s = sanitize_scales(s, w)
        return s, -s * mid
    s, z = _fit(w, h, q, s0, z0, g)
    s = sanitize_scales(s, w)
    if not integer_zero:
        return s, z
    zint = torch.round(-z / s).clamp_(0, maxq)
    s, _ = _fit(w, h, q - expand_groups(zint, g, k), s, None, g)
    s = sanitize_scales(s, w)
    return s, -s * zint


def _validate(weight, H, bits, group_size, method, rounds, damp, compute_dtype, block_size, name, cd_sweeps=0):
    label = f"layer {name!r}: " if name else ""
    validate_bits(bits)
    if method not in METHODS:
        raise DecoupleQConfigError(f"{label}method={method!r} is not supported; allowed: {METHODS}")
    if not torch.is_tensor(weight) or weight.dim() != 2 or not weight.is_floating_point():
        raise DecoupleQConfigError(f"{label}weight must be a 2-D float tensor [out, in], got {_describe(weight)}")
    k = weight.shape[1]
    if weight.shape[0] == 0 or k == 0:
        raise DecoupleQConfigError(f"{label}weight has an empty shape {tuple(weight.shape)}")
    if not torch.is_tensor(H) or tuple(H.shape) != (k, k) or not H.is_floating_point():
        raise DecoupleQConfigError(
            f"{label}H must be a float tensor of shape ({k}, {k}) to match weight {tuple(weight.shape)}, "
            f"got {_describe(H)}"
        )
    effective_group_size(group_size, k)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise DecoupleQConfigError(f"{label}rounds={rounds!r} must be an int >= 0")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not math.isfinite(damp) or damp <= 0:
        raise DecoupleQConfigError(f"{label}damp={damp!r} must be a positive finite float")
    if compute_dtype not in (torch.float32, torch.float64):
        raise DecoupleQConfigError(f"{label}compute_dtype={compute_dtype} must be torch.float32 or torch.float64")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise DecoupleQConfigError(f"{label}block_size={block_size!r} must be a positive int")
    if isinstance(cd_sweeps, bool) or not isinstance(cd_sweeps, int) or cd_sweeps < 0:
        raise DecoupleQConfigError(f"{label}cd_sweeps={cd_sweeps!r} must be an int >= 0")
    if not torch.isfinite(weight).all():
        raise DecoupleQNumericalError(f"{label}weight {tuple(weight.shape)} contains NaN or Inf")
    if not torch.isfinite(H).all():
        raise DecoupleQNumericalError(f"{label}Hessian {tuple(H.shape)} contains NaN or Inf")


def _fast_low_precision(device: torch.device) -> torch.dtype:
    """bfloat16 where its matmul is native (CUDA with bf16, CPUs with oneDNN bf16 support), else float32.

    Emulated bf16 matmul on CPUs without it is many times slower than float32, hence the check.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # private op: absent or failing means "do not rely on it"
            native = False
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def solve_layer(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int = 2,
    group_size: int = 64,
    method: str = "decoupleq",
    rounds: int = 3,
    act_order: bool = True,
    damp: float = 0.01,
    symmetric: bool = False,
    integer_zero: bool = False,
    name: str | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    grid_steps: tuple[int, ...] = (16, 4, 1),
    early_stop_frac: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    clip_dtype: torch.dtype | None = None,
    cd_sweeps: int = 0,
    gguf_type: str | None = None,
) -> QuantResult:
    """Quantize one linear layer's weight against its input Hessian (method.md, layer-wise stage).

    Args:
        weight: ``[out, in]`` float weight (any float dtype, any device; the work happens on its device).
        H: ``[in, in]`` Hessian ``X X^T / n`` (float64 from :class:`HessianAccumulator`, float32 accepted).
        bits: 2, 3, 4 or 8.
        group_size: columns per (scale, zero) group; ``-1`` for per-channel. Need not divide ``in``.
        method: ``"rtn"`` (min-max, round to nearest), ``"gptq"`` (min-max, GPTQ rounding) or ``"decoupleq"``
            (Eq. 12 clipping search, GPTQ/RTN first rounding, then ``rounds`` alternations of the (s, z)-step and
            GPTQ re-rounding, keep-best per row).
        rounds: number of alternations for ``"decoupleq"``.
        act_order: GPTQ visits columns in descending ``diag H``.
        damp: dampening ``H + damp * mean(diag H) * I`` for GPTQ, escalated tenfold if Cholesky fails.
        symmetric: ``w_hat = s (q - 2**(bits-1))``.
        integer_zero: zeros restricted to ``-s * z_int`` with an integer ``z_int`` in the code range.
        name: layer name for messages.
        block_size: GPTQ lazy-update block width.
        grid_steps: coarse-to-fine strides of the clipping grid search (``(1,)`` = all 161 points).
        early_stop_frac: stop the alternation when fewer than this fraction of rows changed codes in a round.
        compute_dtype: dtype of the big products (float32 is fast and enough; small systems are float64).
        clip_dtype: dtype of the ``err @ H`` products of the clipping search only. ``None`` picks bfloat16 where
            it is fast (CUDA, CPUs with native bf16 matmul) and ``compute_dtype`` elsewhere or when
            ``compute_dtype`` is float64: the search only ranks candidates, and on SmolLM2 layers the final loss
            is the same either way while the search costs about half.
        cd_sweeps: for ``"decoupleq"``, sweeps of :func:`~hf_decoupleq.solver.rounding.coordinate_descent` over the
            codes after the first rounding and after every q-step (kept per row where they lower the loss). They
            always lower the proxy loss, but on SmolLM2 W2 g64 (layer-wise only, 32 calibration windows, 4 test
            windows) one sweep changed perplexity 231 -> 207 without incoherence and 93.8 -> 98.5 with it, for
            35-70% more quantization time, so it is off by default and not a `DecoupleQConfig` option.
        gguf_type: solve inside a llama.cpp block structure instead (one of
            :data:`hf_decoupleq.solver.kquant.GGUF_TYPES`, e.g. ``"q2_k"``, ``"q4_0"``, ``"q5_1"``): ``bits``, ``group_size`` and ``symmetric`` then come from the type and
            the layer's ``in_features`` (a k-quant, or llama-quantize's fallback type when ``in_features`` is not a
            multiple of 256), and ``integer_zero`` must be False.

    Returns:
        A :class:`QuantResult`; ``loss`` is evaluated in float64 with the undamped ``H``.

    Raises:
        DecoupleQConfigError: an argument is not allowed.
        DecoupleQNumericalError: NaN/Inf in ``weight`` or ``H``, or ``H`` stays singular after dampening.
    """
    if gguf_type is not None:
        from .kquant import layer_format, solve_layer_kquant

        if integer_zero:
            raise DecoupleQConfigError(f"layer {name!r}: gguf_type={gguf_type!r} needs integer_zero=False")
        fmt = layer_format(gguf_type, weight.shape[-1] if torch.is_tensor(weight) else 0, name)
        if fmt.fallback_from is not None:
            logger.info(
                "layer %s: in_features=%d is not a multiple of 256, so %s falls back to %s (as llama-quantize does): "
                "solved as %s W%d g%d", name, weight.shape[-1], fmt.fallback_from.upper(), fmt.ggml_type.upper(),
                "symmetric" if fmt.symmetric else "asymmetric", fmt.bits, fmt.group_size,
            )  # fmt: skip
        if fmt.is_kquant:
            return solve_layer_kquant(
                weight, H, fmt, method=method, rounds=rounds, act_order=act_order, damp=damp, name=name,
                compute_dtype=compute_dtype, clip_dtype=clip_dtype, grid_steps=grid_steps,
            )  # fmt: skip
        from .kquant import solve_layer_block32

        return solve_layer_block32(
            weight, H, fmt, method=method, rounds=rounds, act_order=act_order, damp=damp, name=name,
            compute_dtype=compute_dtype, clip_dtype=clip_dtype, grid_steps=grid_steps,
        )  # fmt: skip
    t0 = time.perf_counter()
    _validate(weight, H, bits, group_size, method, rounds, damp, compute_dtype, block_size, name, cd_sweeps)
    k = weight.shape[1]
    g = effective_group_size(group_size, k)
    cd = compute_dtype
    w = weight.detach().to(cd)
    h64 = H.detach().to(device=w.device, dtype=torch.float64)
    h = h64.to(cd)
    stats: dict[str, Any] = {"method": method, "rounds_run": 0, "damp": None}
    history: list[float] = []
    if method == "decoupleq":
        if clip_dtype is None:
            clip_dtype = _fast_low_precision(w.device) if cd == torch.float32 else cd
        stats["clip_dtype"] = str(clip_dtype).replace("torch.", "")
        s, z, grid_j = clip_search(w, h, bits, g, symmetric, integer_zero, steps=grid_steps, eval_dtype=clip_dtype)
        stats["clip_p_mean"] = float((1.0 - grid_j.double() / 200.0).mean())
    else:
        s, z = minmax_params(w, bits, g, 1.0, symmetric, integer_zero)
    codes = rtn_codes(w, s, z, bits, g)
    if method != "rtn":
        factor = prepare_gptq(h64, damp, act_order, name, cd)
        stats["damp"] = factor.damp
        codes_g = gptq_round(w, s, z, bits, g, factor, block_size)
        if method == "decoupleq":
            problem = _Problem(w, h, g, bits, block_size, cd_sweeps, factor)
            codes = _alternate(
                problem, codes, codes_g, s, z, symmetric=symmetric, integer_zero=integer_zero, rounds=rounds,
                early_stop_frac=early_stop_frac, stats=stats, history=history,
            )  # fmt: skip
        else:
            codes = codes_g
    scales = s.float()
    zeros = z.float()
    if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
        raise DecoupleQNumericalError(f"layer {name!r}: non-finite scales/zeros for weight {tuple(weight.shape)}")
    codes_u8 = codes.round().clamp_(0, max_code(bits)).to(torch.uint8)
    # The loss of exactly what QuantResult.dequantize() returns (float32 W_hat), accumulated in float64.
    w_hat = dequantize(codes_u8, scales, zeros, g).double()
    final = row_losses(weight.detach().to(torch.float64) - w_hat, h64)
    stats["loss_per_round"] = history
    stats["time_s"] = time.perf_counter() - t0
    logger.debug(
        "layer %s %s: W%d g%d %s mean proxy loss %.4g (%.2fs)",
        name, tuple(weight.shape), bits, g, method, float(final.mean()), stats["time_s"],
    )  # fmt: skip
    return QuantResult(
        codes=codes_u8, scales=scales, zeros=zeros, loss=final, bits=bits, group_size=g, stats=stats,
        symmetric=symmetric, integer_zero=integer_zero and not symmetric,
    )


@dataclass(frozen=True, eq=False)
class _Problem:
    """One layer's proxy problem in the compute dtype: weight ``w``, Hessian ``h``, and the rounding settings."""

    w: torch.Tensor
    h: torch.Tensor
    g: int
    bits: int
    block_size: int
    cd_sweeps: int
    factor: Any

    def losses(self, wr: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        loss = row_losses(wr - dequantize(codes, s, z, self.g), self.h)
        # A non-finite candidate must never win a keep-best comparison.
        return torch.nan_to_num(loss, nan=math.inf)

    def descend(self, wr, codes, s, z, loss):
        # Coordinate descent from the current codes, kept per row only where it lowered the (undamped) loss.
        codes_cd = coordinate_descent(wr, self.h, codes, s, z, self.bits, self.g, self.cd_sweeps, self.block_size)
        loss_cd = self.losses(wr, codes_cd, s, z)
        take = loss_cd < loss
        return torch.where(take[:, None], codes_cd, codes), torch.where(take, loss_cd, loss)


def _alternate(
    p: _Problem,
    codes: torch.Tensor,
    codes_g: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    *,
    symmetric: bool,
    integer_zero: bool,
    rounds: int,
    early_stop_frac: float,
    stats: dict[str, Any],
    history: list[float],
) -> torch.Tensor:
    """decoupleQ's alternation (method.md step 3): the better first rounding per row (RTN ``codes`` or GPTQ
    ``codes_g``), then up to ``rounds`` of the (s, z)-step and GPTQ re-rounding, keep-best per row. Updates ``s`` and
    ``z`` in place and returns the codes; appends the total loss after each step to ``history``."""
    w, g, bits, cd = p.w, p.g, p.bits, p.w.dtype
    loss = p.losses(w, codes, s, z)
    history.append(float(loss.sum()))
    loss_g = p.losses(w, codes_g, s, z)
    take = loss_g < loss
    stats["rows_gptq_first"] = float(take.float().mean())
    codes = torch.where(take[:, None], codes_g, codes)
    loss = torch.minimum(loss, loss_g)
    if p.cd_sweeps:
        codes, loss = p.descend(w, codes, s, z, loss)
    history.append(float(loss.sum()))
    # Rows are independent and both steps are deterministic, so a row whose codes did not change in the
    # last q-step is at a fixed point (its (s, z) is already optimal for its codes, and re-rounding with
    # the same (s, z) gives the same codes): only rows whose codes changed are worked on again.
    active = torch.arange(w.shape[0], device=w.device)
    stats["active_rows"] = []
    for _ in range(rounds):
        if active.numel() == 0 or active.numel() < early_stop_frac * w.shape[0]:
            break
        stats["active_rows"].append(int(active.numel()))
        wa, ca, sa, za, la = w[active], codes[active], s[active], z[active], loss[active]
        s_new, z_new = scale_zero_step(wa, p.h, ca, g, bits, sa, za, symmetric, integer_zero, cd)
        loss_sz = p.losses(wa, ca, s_new, z_new)
        take = loss_sz < la
        sa = torch.where(take[:, None], s_new, sa)
        za = torch.where(take[:, None], z_new, za)
        la = torch.where(take, loss_sz, la)
        codes_g = gptq_round(wa, sa, za, bits, g, p.factor, p.block_size)
        loss_q = p.losses(wa, codes_g, sa, za)
        take = loss_q < la
        ca_new = torch.where(take[:, None], codes_g, ca)
        la = torch.where(take, loss_q, la)
        if p.cd_sweeps:
            ca_new, la = p.descend(wa, ca_new, sa, za, la)
        changed = (ca_new != ca).any(dim=1)
        s[active], z[active], codes[active], loss[active] = sa, za, ca_new, la
        history.append(float(loss.sum()))
        stats["rounds_run"] += 1
        active = active[changed]
    return codes
