"""GGML quantization blocks in numpy: exact packing of decoupleQ codes, and k-quant quantizers for lossy export.

Every function here works on rows of a weight ``[N, K]`` (``K`` the input dimension, along which the blocks run) and
returns the raw block bytes ``uint8 [N, K / block_size * type_size]`` that a GGUF file stores for the tensor. The
layouts are llama.cpp's (``ggml/src/ggml-common.h``); ``gguf.quants.dequantize`` reads every one of them and is what
the tests compare against.

* ``Q4_0`` (32 values, 18 bytes): fp16 ``d``, 16 bytes of nibbles; ``w = d (q - 8)``.
* ``Q4_1`` (32 values, 20 bytes): fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = d q + m``.
* ``Q5_0`` (32 values, 22 bytes): fp16 ``d``, 4 bytes with the high bit of value ``j`` at bit ``j``, 16 bytes of
  low nibbles; ``w = d (q - 16)``.
* ``Q5_1`` (32 values, 24 bytes): fp16 ``d``, fp16 ``m``, then as ``Q5_0``; ``w = d q + m``.
* ``Q8_0`` (32 values, 34 bytes): fp16 ``d``, 32 int8; ``w = d q``.
  In all of them, byte ``j`` of the nibbles holds value ``j`` (low nibble) and value ``j + 16`` (high nibble).
* ``Q2_K`` (256 values, 84 bytes): 16 bytes of (4-bit scale | 4-bit min << 4) for 16 sub-blocks of 16, 64 bytes of
  2-bit codes, fp16 ``d``, fp16 ``dmin``; ``w = d sc q - dmin m``.
* ``Q3_K`` (256 values, 110 bytes): 32 bytes of high bits, 64 bytes of low 2 bits, 12 bytes of 16 6-bit signed scales
  (stored ``+32``), fp16 ``d``; ``w = d sc (q - 4)`` with ``q`` in ``[0, 7]``.
* ``Q4_K`` (256 values, 144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of 8 6-bit scales and 8 6-bit mins for
  sub-blocks of 32, 128 bytes of nibbles; ``w = d sc q - dmin m``.
* ``Q5_K`` (256 values, 176 bytes): as ``Q4_K`` with 32 bytes of high bits between the scales and the nibbles (bit
  ``i`` of byte ``l`` is the high bit of value ``32 i + l``); codes in ``[0, 31]``.
* ``Q6_K`` (256 values, 210 bytes): 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 int8 scales for sub-blocks of
  16, fp16 ``d``; ``w = d sc (q - 32)`` with ``q`` in ``[0, 63]``. Per 128-value half ``h`` (value ``32 j + l`` of
  it), the low nibble is in byte ``64 h + l + 32 (j % 2)`` of ``ql`` (low nibble for ``j < 2``, high for ``j >= 2``)
  and the high 2 bits at bits ``2 j`` of byte ``32 h + l`` of ``qh``.

In the k-quants, codes of value ``e`` of a 128-value half (``e = 32 j + l``) sit at bits ``2 j`` (``Q2_K``/``Q3_K``)
of byte ``l`` of that half's 32 bytes; in ``Q4_K`` a 64-value chunk's 32 bytes hold its first 32 values in the low
nibbles and the next 32 in the high nibbles.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BLOCK_SIZES",
    "KQUANT_LEVELS",
    "pack_kquant",
    "pack_q4_0",
    "pack_q4_1",
    "pack_q5_0",
    "pack_q5_1",
    "pack_q8_0",
    "quantize_k",
    "recover_grid",
]

QK = 32
QK_K = 256
# (values per block, bytes per block), as in gguf.GGML_QUANT_SIZES.
BLOCK_SIZES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
               "Q6_K": (256, 210)}  # fmt: skip


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """``[..., n]`` floats -> ``[..., n, 2]`` little-endian fp16 bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles32(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` 4-bit codes -> ``[..., 16]`` bytes: value ``j`` low nibble, value ``j + 16`` high nibble."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _blocks(codes: np.ndarray, n: int) -> np.ndarray:
    rows, k = codes.shape
    return codes.reshape(rows, k // n, n)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``Q4_1`` bytes of codes ``[N, K]`` in ``[0, 15]`` with per-block ``d``, ``m`` ``[N, K / 32]``: ``w = d q + m``."""
    q = _blocks(codes, QK)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles32(q)], axis=-1)
    return out.reshape(codes.shape[0], -1)


def pack_q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``Q4_0`` bytes of codes ``[N, K]`` in ``[0, 15]`` with per-block ``d`` ``[N, K / 32]``: ``w = d (q - 8)``."""
    q = _blocks(codes, QK)
    out = np.concatenate([_f16_bytes(d), _nibbles32(q)], axis=-1)
    return out.reshape(codes.shape[0], -1)


def _five_bit32(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` 5-bit codes -> ``[..., 20]`` bytes: the 32 high bits (value ``j`` at bit ``j`` of a little-endian
    uint32), then the low nibbles as in ``Q4_0``."""
    q = q.astype(np.uint32)
    high = ((q >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    qh = np.bitwise_or.reduce(high, axis=-1).astype("<u4")
    qh_bytes = np.ascontiguousarray(qh).view(np.uint8).reshape(*qh.shape, 4)
    return np.concatenate([qh_bytes, _nibbles32(q & 0x0F)], axis=-1)


def pack_q5_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``Q5_0`` bytes of codes ``[N, K]`` in ``[0, 31]`` with per-block ``d`` ``[N, K / 32]``: ``w = d (q - 16)``."""
    out = np.concatenate([_f16_bytes(d), _five_bit32(_blocks(codes, QK))], axis=-1)
    return out.reshape(codes.shape[0], -1)


def pack_q5_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``Q5_1`` bytes of codes ``[N, K]`` in ``[0, 31]`` with per-block ``d``, ``m`` ``[N, K / 32]``: ``w = d q + m``."""
    out = np.concatenate([_f16_bytes(d), _f16_bytes(m), _five_bit32(_blocks(codes, QK))], axis=-1)
    return out.reshape(codes.shape[0], -1)


def pack_q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``Q8_0`` bytes of signed codes ``[N, K]`` in ``[-128, 127]`` with per-block ``d`` ``[N, K / 32]``: ``w = d q``."""
    q = _blocks(codes, QK).astype(np.int8).view(np.uint8)
    out = np.concatenate([_f16_bytes(d), q], axis=-1)
    return out.reshape(codes.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------------------
# k-quants: a per-sub-block search for (scale, min), scales and mins rounded onto their grids, then codes re-rounded.
# ---------------------------------------------------------------------------------------------------------------------


def _fit_affine(x: np.ndarray, qmax: int, steps: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` ``[B, n]``: scale ``a >= 0`` and offset ``b <= 0`` minimizing ``|x - (a q + b)|^2`` over a
    grid of candidate ranges (the min-max range shrunk or stretched), each refit by least squares on its codes."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    best_err = np.full(x.shape[0], np.inf)
    best_a = np.maximum(hi - lo, 1e-30) / qmax
    best_b = lo.copy()
    for f in np.linspace(0.7, 1.1, steps):
        a = np.maximum((hi - lo) * f, 1e-30) / qmax
        q = np.clip(np.rint((x - lo[:, None]) / a[:, None]), 0, qmax)
        # Least-squares refit of (a, b) for these codes, then b clamped to <= 0.
        qm, xm = q.mean(-1), x.mean(-1)
        var = ((q - qm[:, None]) ** 2).mean(-1)
        cov = ((q - qm[:, None]) * (x - xm[:, None])).mean(-1)
        a2 = np.where(var > 0, cov / np.where(var > 0, var, 1), a)
        a2 = np.where(a2 > 0, a2, a)
        b2 = np.minimum(xm - a2 * qm, 0.0)
        q2 = np.clip(np.rint((x - b2[:, None]) / a2[:, None]), 0, qmax)
        err = ((a2[:, None] * q2 + b2[:, None] - x) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a = np.where(better, a2, best_a)
        best_b = np.where(better, b2, best_b)
    return best_a, best_b


def _fit_symmetric(x: np.ndarray, qmin: int, qmax: int, steps: int = 24) -> np.ndarray:
    """Per row of ``x`` ``[B, n]``: signed scale ``a`` minimizing ``|x - a q|^2`` with ``q`` in ``[qmin, qmax]``.

    The value of largest magnitude is mapped onto ``qmin`` (the longer side of the asymmetric integer range) with the
    matching sign, over a grid of shrink factors, each refit by least squares."""
    idx = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]
    best_err = np.full(x.shape[0], np.inf)
    best_a = np.where(peak != 0, peak / qmin, 1e-30)
    for f in np.linspace(0.7, 1.1, steps):
        a = np.where(peak != 0, peak * f / qmin, 1e-30)
        q = np.clip(np.rint(x / a[:, None]), qmin, qmax)
        qq = (q * q).sum(-1)
        a2 = np.where(qq > 0, (q * x).sum(-1) / np.where(qq > 0, qq, 1), a)
        a2 = np.where(a2 != 0, a2, a)
        q2 = np.clip(np.rint(x / a2[:, None]), qmin, qmax)
        err = ((a2[:, None] * q2 - x) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a = np.where(better, a2, best_a)
    return best_a


def _grid(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``values`` ``[B, S]`` -> (fp16-rounded super-scale ``[B]``, integer levels ``[B, S]`` in
    ``[0, levels]``) with ``values ~ super * level``."""
    top = values.max(axis=-1)
    sup = (top / levels).astype(np.float16).astype(np.float64)
    inv = np.where(sup > 0, 1.0 / np.where(sup > 0, sup, 1), 0.0)
    lev = np.clip(np.rint(values * inv[:, None]), 0, levels)
    return sup, lev


def _pack_q2_k(q, sc, mn, d, dmin) -> np.ndarray:
    b = q.shape[0]
    scales = (sc.astype(np.uint8) | (mn.astype(np.uint8) << 4)).reshape(b, 16)
    qh = q.astype(np.uint8).reshape(b, 2, 4, 32)  # [half, j, l]
    qs = (qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)).reshape(b, 64)
    return np.concatenate([scales, qs, _f16_bytes(d[:, None]).reshape(b, 2), _f16_bytes(dmin[:, None]).reshape(b, 2)],
                          axis=-1)  # fmt: skip


def _pack_q3_k(q, sc, d) -> np.ndarray:
    """``q`` ``[B, 256]`` in ``[0, 7]`` (``w = d sc (q - 4)``), ``sc`` ``[B, 16]`` in ``[-32, 31]``."""
    b = q.shape[0]
    q = q.astype(np.uint8)
    high = (q >> 2).reshape(b, 8, 32)  # value 32 i + l -> bit i of byte l
    hmask = np.zeros((b, 32), dtype=np.uint8)
    for i in range(8):
        hmask |= high[:, i] << i
    low = (q & 3).reshape(b, 2, 4, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(b, 64)
    s = (sc.astype(np.int16) + 32).astype(np.uint8)  # 6 bits
    lo4, hi2 = s & 0x0F, s >> 4
    packed = np.empty((b, 12), dtype=np.uint8)
    packed[:, :8] = lo4[:, :8] | (lo4[:, 8:] << 4)
    packed[:, 8:] = hi2[:, 0:4] | (hi2[:, 4:8] << 2) | (hi2[:, 8:12] << 4) | (hi2[:, 12:16] << 6)
    return np.concatenate([hmask, qs, packed, _f16_bytes(d[:, None]).reshape(b, 2)], axis=-1)


def _scales_k(sc, mn) -> np.ndarray:
    """8 6-bit scales and 8 6-bit mins ``[B, 8]`` -> the 12 bytes of ``Q4_K``/``Q5_K``."""
    b = sc.shape[0]
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed = np.empty((b, 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return packed


def _nibbles_k(q) -> np.ndarray:
    """``[B, 256]`` codes -> 128 bytes: per 64-value chunk, values ``l`` low and ``32 + l`` high in byte ``l``."""
    qc = (q.astype(np.uint8) & 0x0F).reshape(q.shape[0], 4, 2, 32)  # [chunk, low/high, l]
    return (qc[:, :, 0] | (qc[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _super_k(d, dmin) -> np.ndarray:
    b = d.shape[0]
    return np.concatenate([_f16_bytes(d[:, None]).reshape(b, 2), _f16_bytes(dmin[:, None]).reshape(b, 2)], axis=-1)


def _pack_q4_k(q, sc, mn, d, dmin) -> np.ndarray:
    return np.concatenate([_super_k(d, dmin), _scales_k(sc, mn), _nibbles_k(q)], axis=-1)


def _pack_q5_k(q, sc, mn, d, dmin) -> np.ndarray:
    """``q`` ``[B, 256]`` in ``[0, 31]``: the low nibbles as in ``Q4_K``, the high bit of value ``32 i + l`` at bit
    ``i`` of byte ``l`` of ``qh``."""
    b = q.shape[0]
    high = ((q.astype(np.uint8) >> 4) & 1).reshape(b, 8, 32)
    qh = np.zeros((b, 32), dtype=np.uint8)
    for i in range(8):
        qh |= high[:, i] << i
    return np.concatenate([_super_k(d, dmin), _scales_k(sc, mn), qh, _nibbles_k(q)], axis=-1)


def _pack_q6_k(q, sc, d) -> np.ndarray:
    """``q`` ``[B, 256]`` in ``[0, 63]`` (``w = d sc (q - 32)``), ``sc`` ``[B, 16]`` in ``[-128, 127]``."""
    b = q.shape[0]
    qv = q.astype(np.uint8).reshape(b, 2, 4, 32)  # [half, j, l]: value 128 half + 32 j + l
    low, high = qv & 0x0F, qv >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    scales = sc.astype(np.int8).view(np.uint8).reshape(b, 16)
    return np.concatenate([ql.reshape(b, 128), qh.reshape(b, 64), scales, _f16_bytes(d[:, None]).reshape(b, 2)],
                          axis=-1)  # fmt: skip


def _quantize_affine_k(x: np.ndarray, sub: int, qmax: int, levels: int, pack) -> np.ndarray:
    """``w = d sc q - dmin m`` types (Q2_K: sub 16, qmax 3, 4-bit levels; Q4_K/Q5_K: sub 32, qmax 15/31, 6-bit
    levels)."""
    b = x.shape[0]
    n_sub = QK_K // sub
    xs = x.reshape(b * n_sub, sub)
    a, off = _fit_affine(xs, qmax)
    d, sc = _grid(a.reshape(b, n_sub), levels)
    dmin, mn = _grid((-off).reshape(b, n_sub), levels)
    scale = (d[:, None] * sc).reshape(-1, 1)
    shift = (dmin[:, None] * mn).reshape(-1, 1)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.where(scale > 0, np.clip(np.rint((xs + shift) / safe), 0, qmax), 0).reshape(b, QK_K)
    return pack(q, sc, mn, d, dmin)


def _quantize_symmetric_k(x: np.ndarray, mid: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w = d sc (q - mid)`` types on sub-blocks of 16 (Q3_K: mid 4, signed 6-bit scales, levels 32; Q6_K: mid 32,
    int8 scales, levels 128): codes ``[B, 256]`` in ``[0, 2 mid - 1]``, scales ``[B, 16]``, fp16 ``d`` ``[B]``."""
    b = x.shape[0]
    xs = x.reshape(b * 16, 16)
    a = _fit_symmetric(xs, -mid, mid - 1).reshape(b, 16)
    # Signed scales in [-levels, levels - 1] on one fp16 super-scale (the largest magnitude maps onto -levels).
    idx = np.abs(a).argmax(axis=-1)
    peak = np.take_along_axis(a, idx[:, None], axis=-1)[:, 0]
    d = (peak / -levels).astype(np.float16).astype(np.float64)
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    sc = np.clip(np.rint(a * inv[:, None]), -levels, levels - 1)
    scale = (d[:, None] * sc).reshape(-1, 1)
    safe = np.where(scale != 0, scale, 1.0)
    q = np.where(scale != 0, np.clip(np.rint(xs / safe), -mid, mid - 1), 0).reshape(b, QK_K) + mid
    return q, sc, d


def quantize_k(w: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize rows ``w`` ``[N, K]`` (``K`` a multiple of 256) to ``Q2_K``/``Q3_K``/``Q4_K``/``Q5_K``/``Q6_K`` block
    bytes.

    Round-to-nearest on a per-sub-block search for the sub-block's scale (and min): the lossy conversion of an
    existing checkpoint onto these grids. It takes no calibration data (unlike ``llama-quantize`` with an importance
    matrix), so it is a fallback, not a replacement for quantizing into the structure.
    """
    n, k = w.shape
    if k % QK_K:
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {QK_K}, got {k}")
    x = w.astype(np.float64).reshape(n * (k // QK_K), QK_K)
    if qtype == "Q2_K":
        out = _quantize_affine_k(x, 16, 3, 15, _pack_q2_k)
    elif qtype == "Q4_K":
        out = _quantize_affine_k(x, 32, 15, 63, _pack_q4_k)
    elif qtype == "Q5_K":
        out = _quantize_affine_k(x, 32, 31, 63, _pack_q5_k)
    elif qtype == "Q3_K":
        out = _pack_q3_k(*_quantize_symmetric_k(x, 4, 32))
    elif qtype == "Q6_K":
        out = _pack_q6_k(*_quantize_symmetric_k(x, 32, 128))
    else:
        raise ValueError(f"no k-quant quantizer for {qtype}")
    return np.ascontiguousarray(out).reshape(n, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Exact k-quant packing of a checkpoint whose scales and zeros lie on the grid (DecoupleQConfig.gguf_type).
# ---------------------------------------------------------------------------------------------------------------------

# type -> (sub-block size, code bits, scale level range, min level range or None for the symmetric Q3_K and Q6_K)
KQUANT_LEVELS = {
    "Q2_K": (16, 2, (0, 15), (0, 15)),
    "Q3_K": (16, 3, (-32, 31), None),
    "Q4_K": (32, 4, (0, 63), (0, 63)),
    "Q5_K": (32, 5, (0, 63), (0, 63)),
    "Q6_K": (16, 6, (-128, 127), None),
}


def recover_grid(values: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Factor each row of ``values`` ``[R, n]`` as ``sup * lev`` with an fp16 ``sup`` and integers ``lev`` in
    ``[lo, hi]``, exactly (in float64, which holds every such product of a float32 checkpoint exactly).

    The value of largest magnitude is ``sup * c`` for some level ``c``; every candidate ``c`` is tried and the first
    that factors the whole row is kept (any exact factorization dequantizes identically). An all-zero row is
    ``0 * 0``.

    Returns:
        ``(sup [R], lev [R, n], ok [R])``: ``ok`` is False for rows that have no such factorization.
    """
    v = values.astype(np.float64)
    r = v.shape[0]
    peak = np.take_along_axis(v, np.abs(v).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    sup = np.zeros(r)
    lev = np.zeros_like(v)
    ok = peak == 0
    for c in [c for c in range(lo, hi + 1) if c != 0]:
        todo = ~ok
        if not todo.any():
            break
        cand = peak / c
        exact16 = cand.astype(np.float16).astype(np.float64) == cand
        with np.errstate(divide="ignore", invalid="ignore"):
            lv = np.rint(v / cand[:, None])
        fits = exact16 & np.all((lv >= lo) & (lv <= hi) & (lv * cand[:, None] == v), axis=-1) & (cand != 0)
        take = todo & fits
        sup[take] = cand[take]
        lev[take] = lv[take]
        ok |= take
    return sup, lev, ok


def pack_kquant(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, qtype: str) -> np.ndarray | str:
    """``Q2_K``/``Q3_K``/``Q4_K``/``Q5_K``/``Q6_K`` bytes of a layer whose per-sub-block ``scales``, ``zeros``
    ``[N, K / sub]`` lie on the type's grid (``s = d sc``, ``z = -dmin m``; ``z = -4 s`` for ``Q3_K``, ``z = -32 s``
    for ``Q6_K``), with codes ``[N, K]``.

    Returns the bytes ``[N, K / 256 * type_size]``, or a string saying why the layer is not on the grid.
    """
    sub, bits, srange, mrange = KQUANT_LEVELS[qtype]
    n, k = codes.shape
    if k % QK_K:
        return f"in_features {k} is not a multiple of {QK_K}"
    if codes.size and (codes.min() < 0 or codes.max() > (1 << bits) - 1):
        return f"codes span [{codes.min()}, {codes.max()}], {qtype} holds [0, {(1 << bits) - 1}]"
    nsub = QK_K // sub
    rows = n * (k // QK_K)
    s = scales.astype(np.float64).reshape(rows, nsub)
    z = zeros.astype(np.float64).reshape(rows, nsub)
    d, sc, ok = recover_grid(s, *srange)
    if not ok.all():
        return f"{int((~ok).sum())} of {rows} super-blocks have scales that are not fp16 d * {srange} integers"
    q = codes.reshape(rows, QK_K)
    if mrange is None:
        mid = 1 << (bits - 1)
        if not np.array_equal(z, -float(mid) * s):
            return f"zeros are not -{mid} * scales ({qtype} is symmetric)"
        out = (_pack_q3_k if qtype == "Q3_K" else _pack_q6_k)(q, sc, d)
    else:
        dmin, mn, ok = recover_grid(-z, *mrange)
        if not ok.all():
            return f"{int((~ok).sum())} of {rows} super-blocks have zeros that are not -fp16 dmin * {mrange} integers"
        out = {"Q2_K": _pack_q2_k, "Q4_K": _pack_q4_k, "Q5_K": _pack_q5_k}[qtype](q, sc, mn, d, dmin)
    return np.ascontiguousarray(out).reshape(n, -1)
