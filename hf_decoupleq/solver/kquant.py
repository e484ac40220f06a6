"""decoupleQ inside llama.cpp's k-quant block structures (``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``) and the
block-32 types (``Q4_0``, ``Q5_0``, ``Q5_1``, ``Q8_0``) they fall back to.

A k-quant layer is an ordinary decoupleQ layer (codes, one scale and zero per group) whose groups are the k-quant's
sub-blocks and whose scales and zeros lie exactly on the k-quant's grid. Per super-block of 256 input columns:

* ``Q2_K``: 16 sub-blocks of 16, 2-bit codes, ``s = d sc``, ``z = -dmin m`` with integers ``sc``, ``m`` in
  ``[0, 15]`` and fp16 ``d``, ``dmin``;
* ``Q3_K``: 16 sub-blocks of 16, 3-bit codes, symmetric ``w = d sc (q - 4)``, i.e. ``s = d sc``, ``z = -4 s`` with a
  signed 6-bit ``sc`` in ``[-32, 31]`` and fp16 ``d``;
* ``Q4_K``: 8 sub-blocks of 32, 4-bit codes, ``s = d sc``, ``z = -dmin m`` with ``sc``, ``m`` in ``[0, 63]``;
* ``Q5_K``: as ``Q4_K`` with 5-bit codes;
* ``Q6_K``: 16 sub-blocks of 16, 6-bit codes, symmetric ``w = d sc (q - 32)``, i.e. ``s = d sc``, ``z = -32 s`` with a
  signed 8-bit ``sc`` in ``[-128, 127]`` and fp16 ``d``.

A super-scale is fp16 and a level a small integer, so ``d * sc`` (at most 11 + 7 significant bits) is exact in float32:
a float32 checkpoint holds the grid exactly and the GGUF export recovers ``d``, ``sc``, ``dmin`` and ``m`` from it.
The solver never produces a zero scale (``sc`` is kept away from 0), so GPTQ's divisions stay finite.

Layers whose input size is not a multiple of 256 get the type ``llama-quantize`` falls back to (``src/llama-quant.cpp``
of the llama.cpp tree vendored in llama-cpp-python 0.3.36: ``Q2_K``/``Q3_K`` -> ``Q4_0``, ``Q4_K`` -> ``Q5_0``,
``Q5_K`` -> ``Q5_1``, ``Q6_K`` -> ``Q8_0``; a size that is not a multiple of 32 would be F16 there). The block-32 types
have one fp16 scale per 32 weights: ``Q4_0``, ``Q5_0`` and ``Q8_0`` are symmetric 4-, 5- and 8-bit layers
(``w = d (q - 8)``, ``w = d (q - 16)``, ``w = d (q - 128)``: ``Q8_0``'s int8 code is ``q - 128``), ``Q5_1`` an
asymmetric 5-bit layer with an fp16 min (``w = d q + m``). The packed format has no 5- or 6-bit codes: such layers are
stored with 8-bit codes in ``[0, 31]`` / ``[0, 63]`` (:attr:`LayerFormat.packed_bits`), and the GGUF export writes
them back in 5 / 6 bits exactly.

The layer-wise solve (:func:`solve_layer_kquant`) alternates, keeping the best of every step per row:

1. the Eq. 12 clipping search for per-sub-block ``(s, z)``, projected onto the grid (per super-block the super-scale
   that best fits the sub-block values after rounding, then integer levels);
2. codes by GPTQ rounding (or round-to-nearest, whichever has the lower proxy loss) on that grid;
3. the super-scales ``d``, ``dmin`` re-fitted by H-weighted least squares with the codes and levels fixed (a small
   linear system per row), rounded to fp16;
4. the free (s, z) step of decoupleQ, projected onto the grid again and re-fitted as in 3;
5. GPTQ re-rounding on the new grid; steps 3-5 repeat ``rounds`` times.

Block-32 layers are solved by :func:`solve_layer_block32`: the same alternation with fp16 scales (and mins) and no
levels; a symmetric layer starts from a per-group fit whose scale sign is free (the largest weight on the long
``-2**(bits-1) d`` side).

The block-wise stage keeps the grid: :class:`~hf_decoupleq.solver.blockwise.FakeQuantLinear` trains latent scales and
zeros and uses their projection onto the grid (levels re-rounded against the layer-wise super-scales, a
straight-through estimator for the gradient), and snaps them onto the grid when training ends.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DecoupleQConfigError
from ..format import storage_bits
from .quant import clip_search, dequantize, expand_groups, group_sum, minmax_params, row_losses, rtn_codes

logger = logging.getLogger(__name__)

__all__ = [
    "GGUF_TYPES",
    "K_FALLBACK",
    "Fp16Grid",
    "KGrid",
    "LayerFormat",
    "layer_format",
    "project_to_grid",
    "resolve_gguf_type",
    "solve_layer_block32",
    "solve_layer_kquant",
]

QK_K = 256
# The values of DecoupleQConfig.gguf_type.
GGUF_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0")
# llama-quantize's fallback for rows whose length is not a multiple of 256 (llama-quant.cpp, tensor_type_fallback).
K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_F16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal)


@dataclass(frozen=True)
class LayerFormat:
    """How one layer is stored for a GGUF type.

    Attributes:
        ggml_type: the GGML type of the layer in the file (one of :data:`GGUF_TYPES`).
        bits, group_size, symmetric: the decoupleQ layer that holds it.
        scale_levels: integer range of the sub-block scale levels ``sc`` (k-quants only).
        min_levels: integer range of the sub-block min levels ``m`` (asymmetric k-quants only).
        fallback_from: the requested k-quant this layer fell back from, if it did.
    """

    ggml_type: str
    bits: int
    group_size: int
    symmetric: bool
    scale_levels: tuple[int, int] | None = None
    min_levels: tuple[int, int] | None = None
    fallback_from: str | None = None

    @property
    def is_kquant(self) -> bool:
        return self.scale_levels is not None

    @property
    def packed_bits(self) -> int:
        """The code width of the packed module that holds the layer (8 for the 5- and 6-bit types)."""
        return storage_bits(self.bits)

    @property
    def subs(self) -> int:
        """Sub-blocks per super-block of 256."""
        return QK_K // self.group_size


_FORMATS = {
    "q2_k": LayerFormat("q2_k", 2, 16, False, (0, 15), (0, 15)),
    "q3_k": LayerFormat("q3_k", 3, 16, True, (-32, 31)),
    "q4_k": LayerFormat("q4_k", 4, 32, False, (0, 63), (0, 63)),
    "q5_k": LayerFormat("q5_k", 5, 32, False, (0, 63), (0, 63)),
    "q6_k": LayerFormat("q6_k", 6, 16, True, (-128, 127)),
    "q4_0": LayerFormat("q4_0", 4, 32, True),
    "q5_0": LayerFormat("q5_0", 5, 32, True),
    "q5_1": LayerFormat("q5_1", 5, 32, False),
    "q8_0": LayerFormat("q8_0", 8, 32, True),
}


def resolve_gguf_type(name: str, gguf_type: str | None, layer_types: dict[str, str] | None) -> str | None:
    """The GGUF type of the layer with full module name ``name``: the first pattern of ``layer_types``
    (``{regex: type}``, ``DecoupleQConfig.gguf_layer_types``) that ``re.fullmatch``-es it, else ``gguf_type``."""
    for pattern, qtype in (layer_types or {}).items():
        if re.fullmatch(pattern, name):
            return qtype
    return gguf_type


def layer_format(gguf_type: str, in_features: int, name: str | None = None) -> LayerFormat:
    """The :class:`LayerFormat` of a layer with ``in_features`` inputs under ``gguf_type`` (see the module doc).

    Raises:
        DecoupleQConfigError: an unknown type, or ``in_features`` not a multiple of 32 (llama.cpp keeps such a layer
            in F16; leave it unquantized with ``modules_to_not_convert``).
    """
    t = str(gguf_type).lower()
    if t not in GGUF_TYPES:
        raise DecoupleQConfigError(f"gguf_type={gguf_type!r} is not supported; allowed: {GGUF_TYPES}")
    fmt = _FORMATS[t]
    if fmt.is_kquant and in_features % QK_K == 0:
        return fmt
    if in_features % 32:
        label = f"layer {name!r}" if name else "a layer"
        raise DecoupleQConfigError(
            f"{label} has in_features={in_features}, not a multiple of 32: no GGUF block type holds it (llama.cpp "
            "stores such a tensor as F16); add it to modules_to_not_convert"
        )
    if not fmt.is_kquant:
        return fmt
    fb = _FORMATS[K_FALLBACK[t]]
    return LayerFormat(fb.ggml_type, fb.bits, fb.group_size, fb.symmetric, fallback_from=t)


@dataclass(frozen=True, eq=False)
class KGrid:
    """The super-scales of a k-quant layer: ``s = d * sc`` and ``z = -dmin * m`` (``z = -mid * s`` when symmetric).

    Attributes:
        fmt: the layer's :class:`LayerFormat` (a k-quant).
        d: ``float32 [N, K / 256]`` fp16-representable scale super-scales.
        dmin: ``float32 [N, K / 256]`` fp16-representable min super-scales (zeros for symmetric types).
    """

    fmt: LayerFormat
    d: torch.Tensor
    dmin: torch.Tensor

    def project(self, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scales, zeros)`` ``[N, G]`` rounded onto this grid: levels re-rounded, super-scales kept."""
        sc = _levels(scales, self.d, self.fmt.scale_levels, self.fmt.subs, nonzero=True)
        mn = None if self.fmt.symmetric else _levels(-zeros, self.dmin, self.fmt.min_levels, self.fmt.subs)
        return _materialize(self.fmt, self.d, sc, self.dmin, mn)

    def to(self, device: torch.device | str) -> KGrid:
        return KGrid(self.fmt, self.d.to(device), self.dmin.to(device))


@dataclass(frozen=True, eq=False)
class Fp16Grid:
    """The grid of the block-32 types: scales rounded to fp16 (the type's ``d``); zeros tied to
    ``-2**(bits-1) * scales`` (``Q4_0``, ``Q5_0``, ``Q8_0``) or rounded to fp16 (the min ``m`` of ``Q5_1``)."""

    fmt: LayerFormat

    def project(self, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _fp16(scales)
        if not self.fmt.symmetric:
            return s, _fp16(zeros)
        return s, -float(1 << (self.fmt.bits - 1)) * s

    def to(self, device: torch.device | str) -> Fp16Grid:
        return self


def _split(x: torch.Tensor, subs: int) -> torch.Tensor:
    """``[N, G]`` per sub-block -> ``[N, S, subs]`` per super-block."""
    n, g = x.shape
    return x.reshape(n, g // subs, subs)


def _round_levels(ratio: torch.Tensor, lo: int, hi: int, nonzero: bool) -> torch.Tensor:
    """``clamp(round(ratio), lo, hi)``; with ``nonzero`` a level of 0 becomes -1 for a negative ratio in a signed
    range and 1 otherwise (a scale is never 0, so GPTQ's divisions stay finite)."""
    lev = torch.round(ratio).clamp(lo, hi)
    if nonzero:
        one = torch.where((ratio < 0) & (lo < 0), -1.0, 1.0).to(lev.dtype)
        lev = torch.where(lev == 0, one, lev)
    return lev


def _levels(values, sup, rng, subs, nonzero=False) -> torch.Tensor:
    """Integer levels ``clamp(round(values / sup))`` ``[N, G]`` for per-super-block ``sup`` ``[N, S]`` (see
    :func:`_round_levels`)."""
    lo, hi = rng
    v = _split(values, subs)
    safe = torch.where(sup == 0, torch.ones_like(sup), sup)[..., None]
    lev = _round_levels(v / safe, lo, hi, nonzero)
    lev = torch.where(sup[..., None] == 0, torch.zeros_like(lev), lev)
    return lev.reshape(values.shape)


def _materialize(fmt, d, sc, dmin, mn) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros ``[N, G]`` of the grid point ``(d, sc, dmin, m)``."""
    s = (d[..., None] * _split(sc, fmt.subs)).reshape(sc.shape)
    if fmt.symmetric:
        return s, -float(1 << (fmt.bits - 1)) * s
    z = -(dmin[..., None] * _split(mn, fmt.subs)).reshape(mn.shape)
    return s, z


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 (kept in ``x``'s dtype); magnitudes that would round to 0 become the smallest fp16."""
    y = x.to(torch.float16).to(x.dtype)
    tiny = torch.where(x < 0, -_F16_TINY, _F16_TINY).to(x.dtype)
    return torch.where((y == 0) & (x != 0), tiny, y)


def _choose_super(values: torch.Tensor, rng: tuple[int, int], nonzero: bool, steps: int = 24):
    """Per super-block ``values`` ``[N, S, n]``: the fp16 super-scale ``[N, S]`` minimizing the squared
    error of ``sup * level`` with rounded, clamped levels, over a grid of candidates each re-fitted by least squares.

    The value of largest magnitude is mapped onto the far end of the level range on its side (both ends are tried
    for signed ranges, whose negative side is one level longer)."""
    lo, hi = rng
    v = values.double()
    idx = v.abs().argmax(dim=-1, keepdim=True)
    peak = v.gather(-1, idx)[..., 0]
    peak = torch.where(peak == 0, torch.full_like(peak, 1e-30), peak)
    ends = [hi] if lo >= 0 else [lo, hi]
    best_err = torch.full(peak.shape, math.inf, dtype=v.dtype, device=v.device)
    best = torch.full_like(peak, 1e-30)
    for end in ends:
        for f in torch.linspace(0.55, 1.05, steps).tolist():
            sup = peak / (end * f)  # the peak lands on level `end * f` (non-negative levels: sup takes its sign)
            for _ in range(2):
                lev = _round_levels(v / sup[..., None], lo, hi, nonzero)
                ll = (lev * lev).sum(-1)
                refit = (lev * v).sum(-1) / torch.where(ll > 0, ll, torch.ones_like(ll))
                sup = torch.where((ll > 0) & (refit != 0), refit, sup)
            sup = _fp16(sup)
            lev = _round_levels(v / sup[..., None], lo, hi, nonzero)
            err = ((sup[..., None] * lev - v) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, sup, best)
    return best


def project_to_grid(scales: torch.Tensor, zeros: torch.Tensor, fmt: LayerFormat):
    """Project free per-sub-block ``(scales, zeros)`` ``[N, G]`` onto the grid of ``fmt``.

    Returns:
        ``(d, sc, dmin, m)``: fp16-representable super-scales ``[N, S]`` and integer levels ``[N, G]`` (``dmin`` and
        ``m`` are zeros for symmetric types), all in ``scales``' dtype.
    """
    subs = fmt.subs
    d = _choose_super(_split(scales, subs), fmt.scale_levels, nonzero=True).to(scales.dtype)
    sc = _levels(scales, d, fmt.scale_levels, subs, nonzero=True)
    if fmt.symmetric:
        return d, sc, torch.zeros_like(d), torch.zeros_like(sc)
    neg = -zeros
    dmin = _choose_super(_split(neg, subs), fmt.min_levels, nonzero=False).to(scales.dtype)
    # A super-block whose zeros are all 0 needs no min.
    dmin = torch.where(_split(neg, subs).abs().amax(-1) == 0, torch.zeros_like(dmin), dmin)
    m = _levels(neg, dmin, fmt.min_levels, subs)
    return d, sc, dmin, m


def subblock_fit(w: torch.Tensor, weights: torch.Tensor, fmt: LayerFormat, steps: int = 24):
    """Per sub-block ``(s, z)`` ``[N, G]`` minimizing the ``weights``-weighted squared error of round-to-nearest
    (``weights`` ``[K]``, e.g. ``diag H``), over a grid of candidate ranges, each re-fitted by weighted least squares
    on its codes.

    Asymmetric: the range ``[min, min + f (max - min)]``. Symmetric (``Q3_K``, ``Q6_K``, the block-32 types): the
    value of largest magnitude is mapped onto code 0, i.e. onto the longer, negative side ``-2**(bits-1) s`` of the
    code range (the scale takes the opposite sign of that value), shrunk by ``f``; the scale's sign is free per
    sub-block.
    """
    n, k = w.shape
    g = fmt.group_size
    maxq = float((1 << fmt.bits) - 1)
    x = w.double().reshape(n, k // g, g)
    u = weights.double().clamp_min(0).reshape(1, k // g, g).expand_as(x)
    usum = u.sum(-1).clamp_min(1e-300)
    tiny = x.abs().amax(dim=(1, 2), keepdim=True)[..., 0].clamp_min(1e-30) * 1e-8
    best_err = torch.full(x.shape[:2], math.inf, dtype=x.dtype, device=x.device)
    best_s = torch.zeros_like(best_err)
    best_z = torch.zeros_like(best_err)
    if fmt.symmetric:
        mid = float(1 << (fmt.bits - 1))
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        peak = torch.where(peak.abs() < tiny, tiny, peak)
    else:
        lo, hi = x.amin(-1), x.amax(-1)
    for f in torch.linspace(0.55, 1.1, steps).tolist():
        if fmt.symmetric:
            a = -peak * f / mid
            q = torch.round(x / a[..., None] + mid).clamp_(0, maxq) - mid
            qq = (u * q * q).sum(-1)
            a = torch.where(qq > 0, (u * q * x).sum(-1) / qq.clamp_min(1e-300), a)
            a = torch.where(a.abs() < tiny, torch.where(a < 0, -tiny, tiny), a)
            q = torch.round(x / a[..., None] + mid).clamp_(0, maxq) - mid
            err = (u * (a[..., None] * q - x) ** 2).sum(-1)
            b = -mid * a
        else:
            a = torch.maximum((hi - lo) * f / maxq, tiny)
            q = torch.round((x - lo[..., None]) / a[..., None]).clamp_(0, maxq)
            # Weighted least squares for (a, b) on these codes.
            sq, s1 = (u * q).sum(-1), usum
            sqq, sx, sqx = (u * q * q).sum(-1), (u * x).sum(-1), (u * q * x).sum(-1)
            det = sqq * s1 - sq * sq
            ok = det > 1e-12 * sqq * s1
            a2 = torch.where(ok, (sqx * s1 - sq * sx) / torch.where(ok, det, 1.0), a)
            b2 = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1.0), lo)
            bad = a2 <= tiny
            a, b = torch.where(bad, a, a2), torch.where(bad, lo, b2)
            q = torch.round((x - b[..., None]) / a[..., None]).clamp_(0, maxq)
            err = (u * (a[..., None] * q + b[..., None] - x) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, a, best_s)
        best_z = torch.where(better, b, best_z)
    return best_s.to(w.dtype), best_z.to(w.dtype)


def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from .layerwise import _solve_spd as solve

    return solve(a, b)


def refit_super(w, h, codes, fmt, d, sc, dmin, m) -> tuple[torch.Tensor, torch.Tensor]:
    """H-weighted least squares for the super-scales with codes and levels fixed, rounded to fp16.

    Per row ``w_hat = d_b * A + dmin_b * B`` on super-block ``b`` with ``A = sc q`` (``sc (q - mid)`` when symmetric)
    and ``B = -m``, both per column: the ``(2 S) x (2 S)`` (``S x S`` when symmetric) normal equations are assembled
    from ``256 x K`` slices of ``H`` and solved in float64 for the step from the current point.
    """
    n, k = w.shape
    g = fmt.group_size
    nsup = k // QK_K
    q = codes.to(w.dtype)
    if fmt.symmetric:
        q = q - float(1 << (fmt.bits - 1))
    bases = [expand_groups(sc, g, k) * q]
    if not fmt.symmetric:
        bases.append(-expand_groups(m, g, k))
    s, z = _materialize(fmt, d, sc, dmin, m)
    err = w - dequantize(codes, s, z, g)
    eh = err @ h
    nb = len(bases)
    r = torch.cat([group_sum(x * eh, QK_K) for x in bases], dim=1).double()
    mat = torch.zeros(n, nb * nsup, nb * nsup, dtype=torch.float64, device=w.device)
    for u, xu in enumerate(bases):
        for a in range(nsup):
            t = xu[:, a * QK_K : (a + 1) * QK_K] @ h[a * QK_K : (a + 1) * QK_K]
            for v, xv in enumerate(bases):
                mat[:, u * nsup + a, v * nsup : (v + 1) * nsup] = group_sum(t * xv, QK_K).double()
    mat = 0.5 * (mat + mat.transpose(1, 2))
    delta = _solve_spd(mat, r).to(w.dtype)
    d_new = _fp16(d + delta[:, :nsup])
    dmin_new = dmin if fmt.symmetric else _fp16(dmin + delta[:, nsup:])
    return d_new, dmin_new


def solve_layer_kquant(
    weight: torch.Tensor,
    H: torch.Tensor,
    fmt: LayerFormat,
    *,
    method: str = "decoupleq",
    rounds: int = 3,
    act_order: bool = True,
    damp: float = 0.01,
    name: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    clip_dtype: torch.dtype | None = None,
    grid_steps: tuple[int, ...] = (16, 4, 1),
    **_: Any,
):
    """Quantize one layer inside the k-quant structure ``fmt`` (see the module doc); returns a ``QuantResult`` whose
    scales and zeros lie exactly on the grid and whose ``grid`` holds the super-scales.

    ``method="rtn"`` / ``"gptq"``: min-max sub-block ranges projected onto the grid, codes by round-to-nearest / GPTQ,
    no alternation. ``"decoupleq"``: the alternation of the module doc with ``rounds`` rounds.
    """
    from .layerwise import QuantResult, _fast_low_precision, _validate, scale_zero_step
    from .rounding import DEFAULT_BLOCK_SIZE, gptq_round, prepare_gptq

    if not fmt.is_kquant:
        raise DecoupleQConfigError(f"{fmt.ggml_type} is not a k-quant: solve it with solve_layer")
    _validate(weight, H, fmt.bits, fmt.group_size, method, rounds, damp, compute_dtype, DEFAULT_BLOCK_SIZE, name)
    k = weight.shape[1]
    if k % QK_K:
        raise DecoupleQConfigError(f"layer {name!r}: {fmt.ggml_type} needs in_features % 256 == 0, got {k}")
    t0 = time.perf_counter()
    cd = compute_dtype
    bits, g = fmt.bits, fmt.group_size
    w = weight.detach().to(cd)
    h64 = H.detach().to(device=w.device, dtype=torch.float64)
    h = h64.to(cd)
    stats: dict[str, Any] = {"method": method, "gguf_type": fmt.ggml_type, "rounds_run": 0, "damp": None}
    history: list[float] = []

    def loss_of(codes, d, sc, dmin, m):
        s, z = _materialize(fmt, d, sc, dmin, m)
        return torch.nan_to_num(row_losses(w - dequantize(codes, s, z, g), h), nan=math.inf)

    if method == "decoupleq":
        if clip_dtype is None:
            clip_dtype = _fast_low_precision(w.device) if cd == torch.float32 else cd
        # Two starting points, projected onto the grid, the better (H-weighted loss of round-to-nearest) kept per
        # row: the per-row clipping search of Eq. 12 (asymmetric types), and a per-sub-block fit weighted by diag H
        # (which also picks each Q3_K / Q6_K sub-block's sign).
        starts = [subblock_fit(w, h.diagonal(), fmt)]
        if not fmt.symmetric:
            starts.append(clip_search(w, h, bits, g, False, False, steps=grid_steps, eval_dtype=clip_dtype)[:2])
    else:
        starts = [minmax_params(w, bits, g, 1.0, fmt.symmetric, False)]
    best_loss = None
    for s, z in starts:
        cand = project_to_grid(s.to(cd), z.to(cd), fmt)
        s, z = _materialize(fmt, *cand)
        cand_codes = rtn_codes(w, s, z, bits, g)
        cand_loss = loss_of(cand_codes, *cand)
        if best_loss is None:
            (d, sc, dmin, m), codes, best_loss = cand, cand_codes, cand_loss
            continue
        take = cand_loss < best_loss
        d, dmin = (torch.where(take[:, None], new, old) for new, old in ((cand[0], d), (cand[2], dmin)))
        sc, m = (torch.where(take[:, None], new, old) for new, old in ((cand[1], sc), (cand[3], m)))
        codes = torch.where(take[:, None], cand_codes, codes)
        best_loss = torch.minimum(cand_loss, best_loss)
    s, z = _materialize(fmt, d, sc, dmin, m)
    factor = None
    if method != "rtn":
        factor = prepare_gptq(h64, damp, act_order, name, cd)
        stats["damp"] = factor.damp
        codes_g = gptq_round(w, s, z, bits, g, factor)
        if method == "gptq":
            codes = codes_g
        else:
            loss = loss_of(codes, d, sc, dmin, m)
            loss_g = loss_of(codes_g, d, sc, dmin, m)
            codes = torch.where((loss_g < loss)[:, None], codes_g, codes)
    if method == "decoupleq":
        state = [codes, d, sc, dmin, m]
        loss = loss_of(*state)
        history.append(float(loss.sum()))

        def keep(candidate, loss):
            cand_loss = loss_of(*candidate)
            take = cand_loss < loss
            for i, (old, new) in enumerate(zip(state, candidate)):
                state[i] = torch.where(take.reshape(-1, *([1] * (old.dim() - 1))), new, old)
            return torch.where(take, cand_loss, loss)

        for _ in range(rounds):
            codes, d, sc, dmin, m = state
            # Super-scales re-fitted for the current codes and levels.
            d2, dmin2 = refit_super(w, h, codes, fmt, d, sc, dmin, m)
            loss = keep([codes, d2, sc, dmin2, m], loss)
            # decoupleQ's free (s, z) step, projected onto the grid, super-scales re-fitted.
            codes, d, sc, dmin, m = state
            s, z = _materialize(fmt, d, sc, dmin, m)
            s_f, z_f = scale_zero_step(w, h, codes, g, bits, s, z, fmt.symmetric, False, cd)
            d3, sc3, dmin3, m3 = project_to_grid(s_f.to(cd), z_f.to(cd), fmt)
            d3, dmin3 = refit_super(w, h, codes, fmt, d3, sc3, dmin3, m3)
            loss = keep([codes, d3, sc3, dmin3, m3], loss)
            # GPTQ re-rounding on the grid.
            codes, d, sc, dmin, m = state
            s, z = _materialize(fmt, d, sc, dmin, m)
            codes_g = gptq_round(w, s, z, bits, g, factor)
            loss = keep([codes_g, d, sc, dmin, m], loss)
            history.append(float(loss.sum()))
            stats["rounds_run"] += 1
        codes, d, sc, dmin, m = state
    s, z = _materialize(fmt, d, sc, dmin, m)
    scales, zeros = s.float(), z.float()
    codes_u8 = codes.round().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    w_hat = dequantize(codes_u8, scales, zeros, g).double()
    final = row_losses(weight.detach().to(torch.float64) - w_hat, h64)
    stats["loss_per_round"] = history
    stats["time_s"] = time.perf_counter() - t0
    logger.debug("layer %s %s: %s %s mean proxy loss %.4g (%.2fs)", name, tuple(weight.shape), fmt.ggml_type.upper(),
                 method, float(final.mean()), stats["time_s"])  # fmt: skip
    grid = KGrid(fmt, d.float(), dmin.float())
    return QuantResult(codes=codes_u8, scales=scales, zeros=zeros, loss=final, bits=bits, group_size=g, stats=stats,
                       symmetric=fmt.symmetric, grid=grid)  # fmt: skip


def solve_layer_block32(
    weight: torch.Tensor,
    H: torch.Tensor,
    fmt: LayerFormat,
    *,
    method: str = "decoupleq",
    rounds: int = 3,
    act_order: bool = True,
    damp: float = 0.01,
    name: str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    clip_dtype: torch.dtype | None = None,
    grid_steps: tuple[int, ...] = (16, 4, 1),
    **_: Any,
):
    """A block-32 layer with fp16 scales: symmetric ``w = d (q - 2**(bits-1))`` (``Q4_0``, ``Q5_0``, ``Q8_0``) or
    asymmetric ``w = d q + m`` with an fp16 ``m`` (``Q5_1``).

    As :func:`solve_layer_kquant` without levels: the starting points are the per-group fit weighted by ``diag H`` (for
    symmetric types the scale's sign is free per group, so the weight of largest magnitude lands on the longer side
    ``-2**(bits-1) d``, as in llama.cpp's own quantizer) and the per-row clipping search; then GPTQ rounding, and
    ``rounds`` alternations of decoupleQ's (s, z)-step (rounded to fp16) and GPTQ re-rounding, each kept per row if it
    helps.
    """
    from .layerwise import QuantResult, _fast_low_precision, _validate, scale_zero_step
    from .rounding import DEFAULT_BLOCK_SIZE, gptq_round, prepare_gptq

    if fmt.is_kquant:
        raise DecoupleQConfigError(f"{fmt.ggml_type} is a k-quant: solve it with solve_layer_kquant")
    _validate(weight, H, fmt.bits, fmt.group_size, method, rounds, damp, compute_dtype, DEFAULT_BLOCK_SIZE, name)
    t0 = time.perf_counter()
    cd = compute_dtype
    bits, g, sym = fmt.bits, fmt.group_size, fmt.symmetric
    grid = Fp16Grid(fmt)
    w = weight.detach().to(cd)
    h64 = H.detach().to(device=w.device, dtype=torch.float64)
    h = h64.to(cd)
    stats: dict[str, Any] = {"method": method, "gguf_type": fmt.ggml_type, "rounds_run": 0, "damp": None}
    history: list[float] = []

    def loss_of(codes, s, z):
        return torch.nan_to_num(row_losses(w - dequantize(codes, s, z, g), h), nan=math.inf)

    if method == "decoupleq":
        if clip_dtype is None:
            clip_dtype = _fast_low_precision(w.device) if cd == torch.float32 else cd
        starts = [subblock_fit(w, h.diagonal(), fmt),
                  clip_search(w, h, bits, g, sym, False, steps=grid_steps, eval_dtype=clip_dtype)[:2]]  # fmt: skip
    else:
        starts = [minmax_params(w, bits, g, 1.0, sym, False)]
    s = z = codes = loss = None
    for cand_s, cand_z in starts:
        cand_s, cand_z = grid.project(cand_s.to(cd), cand_z.to(cd))
        cand_codes = rtn_codes(w, cand_s, cand_z, bits, g)
        cand_loss = loss_of(cand_codes, cand_s, cand_z)
        if s is None:
            s, z, codes, loss = cand_s, cand_z, cand_codes, cand_loss
            continue
        take = (cand_loss < loss)[:, None]
        s, z = torch.where(take, cand_s, s), torch.where(take, cand_z, z)
        codes = torch.where(take, cand_codes, codes)
        loss = torch.minimum(cand_loss, loss)
    if method != "rtn":
        factor = prepare_gptq(h64, damp, act_order, name, cd)
        stats["damp"] = factor.damp
        codes_g = gptq_round(w, s, z, bits, g, factor)
        loss_g = loss_of(codes_g, s, z)
        take = loss_g < loss if method == "decoupleq" else torch.ones_like(loss, dtype=torch.bool)
        codes = torch.where(take[:, None], codes_g, codes)
        loss = torch.where(take, loss_g, loss)
    if method == "decoupleq":
        history.append(float(loss.sum()))
        for _ in range(rounds):
            s_f, z_f = scale_zero_step(w, h, codes, g, bits, s, z, sym, False, cd)
            s_f, z_f = grid.project(s_f.to(cd), z_f.to(cd))
            loss_f = loss_of(codes, s_f, z_f)
            take = loss_f < loss
            s, z = torch.where(take[:, None], s_f, s), torch.where(take[:, None], z_f, z)
            loss = torch.where(take, loss_f, loss)
            codes_g = gptq_round(w, s, z, bits, g, factor)
            loss_g = loss_of(codes_g, s, z)
            take = loss_g < loss
            codes = torch.where(take[:, None], codes_g, codes)
            loss = torch.where(take, loss_g, loss)
            history.append(float(loss.sum()))
            stats["rounds_run"] += 1
    scales, zeros = s.float(), z.float()
    codes_u8 = codes.round().clamp_(0, (1 << bits) - 1).to(torch.uint8)
    w_hat = dequantize(codes_u8, scales, zeros, g).double()
    final = row_losses(weight.detach().to(torch.float64) - w_hat, h64)
    stats["loss_per_round"] = history
    stats["time_s"] = time.perf_counter() - t0
    return QuantResult(codes=codes_u8, scales=scales, zeros=zeros, loss=final, bits=bits, group_size=g, stats=stats,
                       symmetric=sym, grid=grid)  # fmt: skip
