"""Layer-wise solver tests: every check compares against an independent float64 reference written here."""

import itertools
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

from hf_decoupleq.errors import DecoupleQConfigError, DecoupleQNumericalError
from hf_decoupleq.solver import (
    HessianAccumulator,
    QuantResult,
    clip_search,
    coordinate_descent,
    gptq_round,
    prepare_gptq,
    scale_zero_step,
    solve_layer,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- references
def make_x(k: int, n: int, seed: int, correlated: bool = False) -> torch.Tensor:
    """Calibration inputs ``X`` ``[K, n]``; correlated = low rank plus noise, with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    if correlated:
        r = max(k // 6, 2)
        x = torch.randn(k, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
        x = x + 0.1 * torch.randn(k, n, generator=g, dtype=F64)
    else:
        x = torch.randn(k, n, generator=g, dtype=F64)
    return x * torch.linspace(0.3, 3.0, k, dtype=F64)[:, None]


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T / x.shape[1]


def ref_groups(k: int, g: int) -> list[range]:
    return [range(a, min(a + g, k)) for a in range(0, k, g)]


def ref_minmax(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-loop asymmetric float-zero min-max parameters."""
    maxq = 2**bits - 1
    groups = ref_groups(w.shape[1], g)
    s = torch.empty(w.shape[0], len(groups), dtype=F64)
    z = torch.empty_like(s)
    for i in range(w.shape[0]):
        for a, cols in enumerate(groups):
            v = w[i, list(cols)].double()
            s[i, a] = (v.max() - v.min()) / maxq
            z[i, a] = v.min()
    return s, z


def ref_gptq(w, s, z, bits, g, h, damp, act_order):
    """Column-by-column GPTQ in its OBS form: explicit H^-1, downdated after every column (no Cholesky, no blocks)."""
    maxq = 2**bits - 1
    w = w.double().clone()
    k = w.shape[1]
    hd = h.double().clone()
    hd += damp * hd.diagonal().mean() * torch.eye(k, dtype=F64)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(k))
    hinv = torch.linalg.inv(hd[order][:, order])
    w = w[:, order]
    codes = torch.empty_like(w)
    for j in range(k):
        col = order[j]
        sj, zj = s[:, col // g], z[:, col // g]
        q = torch.clamp(torch.round((w[:, j] - zj) / sj), 0, maxq)
        codes[:, j] = q
        err = (w[:, j] - (sj * q + zj)) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    out = torch.empty_like(codes)
    out[:, order] = codes
    return out


def explicit_loss(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    e = (w.double() - w_hat.double()) @ x
    return (e**2).sum(1) / x.shape[1]


# ------------------------------------------------------------------------------------------- Hessian
def test_hessian_accumulator_masks_padding_and_matches_float64():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 5, 8, generator=g).to(torch.bfloat16)
    m1 = torch.rand(3, 5, generator=g) > 0.4
    x2 = torch.randn(7, 8, generator=g)
    acc = HessianAccumulator(8, name="l0")
    acc.add(x1, mask=m1)
    acc.add(x2)
    kept = torch.cat([x1.double()[m1], x2.double()])
    assert acc.nsamples == kept.shape[0]
    ref = kept.T @ kept / kept.shape[0]
    torch.testing.assert_close(acc.hessian(), ref, rtol=1e-12, atol=1e-12)
    assert acc.hessian().dtype == F64
    fast = HessianAccumulator(8, matmul_dtype=torch.float32)
    fast.add(x1, mask=m1)
    fast.add(x2)
    assert fast.hessian().dtype == F64 and fast.nsamples == acc.nsamples
    torch.testing.assert_close(fast.hessian(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matmul_dtype", [torch.float64, torch.float32])
def test_hessian_accumulator_wide_layers_use_the_triangle_and_stay_exact(matmul_dtype):
    # From 1024 input features on, each batch adds only the upper block triangle (in panels); hessian() mirrors it.
    k = 1100  # not a multiple of the panel width
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, k, generator=g), torch.randn(2, 9, k, generator=g).to(torch.bfloat16)]
    acc = HessianAccumulator(k, matmul_dtype=matmul_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a calibration pass: must not lower the product
        for x in xs:
            acc.add(x)
    kept = torch.cat([x.double().reshape(-1, k) for x in xs])
    ref = kept.T @ kept / kept.shape[0]
    h = acc.hessian()
    tol = 1e-12 if matmul_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(h, ref, rtol=tol, atol=tol)
    assert torch.equal(h, h.T)


def test_hessian_accumulator_errors():
    acc = HessianAccumulator(4, name="model.layers.0.q_proj")
    with pytest.raises(DecoupleQNumericalError, match="q_proj.*no calibration tokens"):
        acc.hessian()
    acc.add(torch.randn(2, 4), mask=torch.zeros(2, dtype=torch.bool))  # all padding
    with pytest.raises(DecoupleQNumericalError, match="no calibration tokens"):
        acc.hessian()
    acc.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(DecoupleQNumericalError, match="NaN"):
        acc.hessian()
    with pytest.raises(DecoupleQConfigError, match="features"):
        acc.add(torch.randn(2, 5))
    with pytest.raises(DecoupleQConfigError, match="mask"):
        acc.add(torch.randn(2, 3, 4), mask=torch.ones(3, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits,g", [(2, 8), (3, 16), (4, -1)])
def test_blocked_gptq_equals_columnwise_reference(act_order, bits, g):
    k, n_out = 40, 12
    x = make_x(k, 200, seed=1, correlated=True)
    h = hessian_of(x)
    w = torch.randn(n_out, k, generator=torch.Generator().manual_seed(2), dtype=F64)
    ge = k if g == -1 else g
    s, z = ref_minmax(w, bits, ge)
    ref = ref_gptq(w, s, z, bits, ge, h, 0.01, act_order)
    factor = prepare_gptq(h, 0.01, act_order, dtype=F64)
    for block in (7, 16, 128):  # blocks smaller than K exercise the lazy update between blocks
        codes = gptq_round(w, s, z, bits, ge, factor, block_size=block)
        assert torch.equal(codes, ref), f"block_size={block}"
    # Through the public API too (min-max scales computed by the library, float64 compute).
    q = solve_layer(w, h, bits=bits, group_size=g, method="gptq", act_order=act_order, block_size=16,
                    compute_dtype=F64)  # fmt: skip
    torch.testing.assert_close(q.scales.double(), s, rtol=1e-6, atol=1e-7)
    assert (q.codes.double() != ref).float().mean() <= 0.02  # only float32-rounding ties may differ


def test_gptq_beats_rtn_and_float32_path_agrees():
    k = 64
    x = make_x(k, 300, seed=3, correlated=True)
    h = hessian_of(x)
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(4))
    rtn = solve_layer(w, h, bits=3, group_size=16, method="rtn")
    g32 = solve_layer(w, h, bits=3, group_size=16, method="gptq")
    g64 = solve_layer(w, h, bits=3, group_size=16, method="gptq", compute_dtype=F64)
    assert g32.loss.sum() < 0.8 * rtn.loss.sum()
    assert (g32.codes != g64.codes).float().mean() < 0.02
    assert abs(g32.loss.sum() - g64.loss.sum()) <= 0.02 * g64.loss.sum()


# ------------------------------------------------------------------------------------------- coordinate descent
def _loss_of(w, codes, s, z, g, x):
    idx = torch.arange(w.shape[1]) // g
    return explicit_loss(w, s.double()[:, idx] * codes.double() + z.double()[:, idx], x)


@pytest.mark.parametrize("bits,g,block", [(2, 4, 5), (3, 6, 128), (2, 12, 1)])
def test_coordinate_descent_ends_at_a_brute_force_coordinate_minimum(bits, g, block):
    """After enough sweeps no single code change lowers any row's loss (checked by trying every code of every
    coordinate against the explicit X), and every sweep only lowers each row's loss."""
    k, n = 12, 5
    x = make_x(k, 80, seed=41, correlated=True)
    h = hessian_of(x)
    gen = torch.Generator().manual_seed(42)
    w = torch.randn(n, k, generator=gen, dtype=F64)
    s = torch.rand(n, math.ceil(k / g), generator=gen, dtype=F64) + 0.3
    z = -s * (2 ** (bits - 1)) + 0.1 * torch.randn(s.shape, generator=gen, dtype=F64)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).double()
    losses = [_loss_of(w, codes, s, z, g, x)]
    for _ in range(30):
        codes = coordinate_descent(w, h, codes, s, z, bits, g, sweeps=1, block_size=block)
        losses.append(_loss_of(w, codes, s, z, g, x))
        assert torch.all(losses[-1] <= losses[-2] * (1 + 1e-12) + 1e-12)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and torch.equal(codes, codes.round())
    assert torch.all(losses[-1] < 0.5 * losses[0])
    best = losses[-1]
    for i, col, c in itertools.product(range(n), range(k), range(2**bits)):
        trial = codes.clone()
        trial[i, col] = c
        assert _loss_of(w[i : i + 1], trial[i : i + 1], s[i : i + 1], z[i : i + 1], g, x)[0] >= best[i] * (1 - 1e-10)


def test_coordinate_descent_blocking_does_not_change_the_result_and_dead_columns_keep_codes():
    k, g, bits = 40, 8, 2
    x = make_x(k, 200, seed=43, correlated=True)
    x[7] = 0.0  # a dead input channel: H row/column 7 is zero
    h = hessian_of(x)
    gen = torch.Generator().manual_seed(44)
    w = torch.randn(16, k, generator=gen, dtype=F64)
    s, z = ref_minmax(w, bits, g)
    start = torch.randint(0, 4, w.shape, generator=gen).double()
    a = coordinate_descent(w, h, start, s, z, bits, g, sweeps=2, block_size=128)
    b = coordinate_descent(w, h, start, s, z, bits, g, sweeps=2, block_size=3)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 7], start[:, 7])


def test_solve_layer_with_coordinate_descent_lowers_the_loss():
    k = 64
    x = make_x(k, 256, seed=45, correlated=True)
    h = hessian_of(x)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(46))
    plain = solve_layer(w, h, bits=2, group_size=16)
    cd = solve_layer(w, h, bits=2, group_size=16, cd_sweeps=2)
    assert torch.allclose(cd.loss, explicit_loss(w, cd.dequantize(), x), rtol=1e-4)
    assert float(cd.loss.sum()) < float(plain.loss.sum())
    hist = cd.stats["loss_per_round"]
    assert all(b <= a for a, b in itertools.pairwise(hist)), hist


# ------------------------------------------------------------------------------------------- (s, z) step
def _lstsq_rows(w, codes, x, g, symmetric_mid=None):
    """Per row, least squares over [s_1..s_G, z_1..z_G] of ||(w - M theta) X||, with M built explicitly."""
    k = w.shape[1]
    groups = ref_groups(k, g)
    ng = len(groups)
    xs = x / math.sqrt(x.shape[1])
    out = []
    for i in range(w.shape[0]):
        cols = []
        for a, rng in enumerate(groups):
            ind = torch.zeros(k, dtype=F64)
            ind[list(rng)] = 1.0
            q = codes[i].double() - (symmetric_mid or 0.0)
            cols.append(q * ind)
        if symmetric_mid is None:
            for a, rng in enumerate(groups):
                ind = torch.zeros(k, dtype=F64)
                ind[list(rng)] = 1.0
                cols.append(ind)
        m = torch.stack(cols, 1)  # [K, 2G] or [K, G]
        sol = torch.linalg.lstsq(xs.T @ m, xs.T @ w[i].double()).solution
        out.append(sol)
    sol = torch.stack(out)
    return sol[:, :ng], (sol[:, ng:] if symmetric_mid is None else None)


@pytest.mark.parametrize("k,g", [(40, 16), (32, 8), (24, 24)])
def test_scale_zero_step_equals_per_row_lstsq(k, g):
    bits = 2
    x = make_x(k, 300, seed=5, correlated=True)
    h = hessian_of(x)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(6, k, generator=gen, dtype=F64)
    codes = torch.randint(0, 2**bits, (6, k), generator=gen)
    s_ref, z_ref = _lstsq_rows(w, codes, x, g)
    s, z = scale_zero_step(w, h, codes, g, bits)
    torch.testing.assert_close(s, s_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(z, z_ref, rtol=1e-7, atol=1e-9)
    # The result is a global minimizer: starting point does not matter, float32 compute is close.
    s2, _ = scale_zero_step(w, h, codes, g, bits, scales=torch.rand(6, s.shape[1]), zeros=torch.randn(6, s.shape[1]))
    torch.testing.assert_close(s2, s_ref, rtol=1e-7, atol=1e-9)
    # float32 products: the parameters may move along flat directions, but the loss stays at the optimum.
    s3, z3 = scale_zero_step(w, h, codes, g, bits, compute_dtype=torch.float32)
    idx = torch.arange(k) // g
    loss_ref = explicit_loss(w, s_ref[:, idx] * codes + z_ref[:, idx], x)
    loss32 = explicit_loss(w, s3.double()[:, idx] * codes + z3.double()[:, idx], x)
    torch.testing.assert_close(loss32, loss_ref, rtol=1e-5, atol=1e-9)
    # Symmetric: s only, codes shifted by 2**(bits-1).
    ss, zs = scale_zero_step(w, h, codes, g, bits, symmetric=True)
    ss_ref, _ = _lstsq_rows(w, codes, x, g, symmetric_mid=2.0)
    torch.testing.assert_close(ss, ss_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(zs, -2.0 * ss)


def test_scale_zero_step_integer_zero_projects_and_refits():
    k, g, bits = 32, 8, 3
    x = make_x(k, 200, seed=7)
    h = hessian_of(x)
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(5, k, generator=gen, dtype=F64)
    codes = torch.randint(0, 8, (5, k), generator=gen)
    s, z = scale_zero_step(w, h, codes, g, bits, integer_zero=True)
    zint = -z / s
    torch.testing.assert_close(zint, zint.round(), rtol=0, atol=1e-9)
    assert zint.round().min() >= 0 and zint.round().max() <= 7
    # With z_int fixed, s is the least-squares optimum: compare with lstsq on the shifted codes, per group column.
    xs = x / math.sqrt(x.shape[1])
    for i in range(5):
        cols = []
        for a, rng in enumerate(ref_groups(k, g)):
            v = torch.zeros(k, dtype=F64)
            v[list(rng)] = codes[i, list(rng)].double() - zint[i, a].round()
            cols.append(v)
        m = torch.stack(cols, 1)
        ref = torch.linalg.lstsq(xs.T @ m, xs.T @ w[i]).solution
        torch.testing.assert_close(s[i], ref, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------- decoupleQ
@pytest.mark.parametrize("correlated", [False, True])
def test_decoupleq_beats_gptq_beats_rtn(correlated):
    k = 64
    x = make_x(k, 256, seed=9, correlated=correlated)
    h = hessian_of(x)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(10))
    tot = {
        m: float(solve_layer(w, h, bits=2, group_size=16, method=m).loss.sum()) for m in ("rtn", "gptq", "decoupleq")
    }
    assert tot["decoupleq"] <= tot["gptq"] <= tot["rtn"], tot
    assert tot["decoupleq"] < 0.9 * tot["gptq"], tot


def test_clip_search_precision_barely_matters():
    """The bf16 search (default where bf16 matmul is native) and the float32 one end at nearly the same loss."""
    k = 64
    h = hessian_of(make_x(k, 256, seed=27, correlated=True))
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(28))
    gptq = float(solve_layer(w, h, bits=2, group_size=16, method="gptq").loss.sum())
    f32 = float(solve_layer(w, h, bits=2, group_size=16, clip_dtype=torch.float32).loss.sum())
    bf16 = float(solve_layer(w, h, bits=2, group_size=16, clip_dtype=torch.bfloat16).loss.sum())
    assert max(f32, bf16) < gptq
    assert abs(f32 - bf16) <= 0.15 * f32  # on 48 rows the end point varies ~10% with any change of the start


def test_loss_never_increases_across_rounds():
    k = 48
    x = make_x(k, 200, seed=11, correlated=True)
    h = hessian_of(x)
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(12))
    finals = []
    for rounds in range(4):
        q = solve_layer(w, h, bits=2, group_size=16, rounds=rounds, early_stop_frac=0.0)
        hist = q.stats["loss_per_round"]
        assert q.stats["rounds_run"] <= rounds and len(hist) == q.stats["rounds_run"] + 2
        assert all(b <= a for a, b in itertools.pairwise(hist)), hist
        finals.append(q.loss)
    for a, b in itertools.pairwise(finals):  # per row, float64 loss never goes up (float32-noise tolerance)
        assert torch.all(b <= a * (1 + 1e-5) + 1e-9)


def test_converged_rows_are_fixed_points_of_both_steps():
    """Rows leave the alternation once their codes stop changing; check that they are then truly fixed points."""
    k, g, bits = 48, 16, 2
    x = make_x(k, 200, seed=25, correlated=True)
    h = hessian_of(x)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(26))
    q = solve_layer(w, h, bits=bits, group_size=g, rounds=50, early_stop_frac=0.0)
    assert q.stats["rounds_run"] < 50  # converged: no active rows left
    s, z = scale_zero_step(w, h, q.codes, g, bits, q.scales, q.zeros, compute_dtype=torch.float32)
    idx = torch.arange(k) // g
    moved = explicit_loss(w, s.double()[:, idx] * q.codes + z.double()[:, idx], x)
    assert torch.all(moved >= q.loss * (1 - 1e-4))  # the (s, z)-step cannot improve any row any more
    codes = gptq_round(w, q.scales, q.zeros, bits, g, prepare_gptq(h, 0.01, True))
    loss_regptq = explicit_loss(w, q.scales.double()[:, idx] * codes + q.zeros.double()[:, idx], x)
    assert torch.all(loss_regptq >= q.loss * (1 - 1e-5))  # re-rounding cannot either


def test_per_row_loss_equals_explicit_x():
    k = 40
    x = make_x(k, 150, seed=13, correlated=True)
    h = hessian_of(x)
    w = torch.randn(10, k, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    for method in ("rtn", "gptq", "decoupleq"):
        q = solve_layer(w, h, bits=3, group_size=16, method=method)
        assert q.loss.dtype == F64 and q.loss.shape == (10,)
        torch.testing.assert_close(q.loss, explicit_loss(w, q.dequantize(), x), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_on_grid_are_recovered(bits):
    k, g, maxq = 40, 16, 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, maxq + 1, (8, k), generator=gen)
    codes[:, ::16] = 0  # every group holds both ends of the grid, so min-max sees the exact range
    codes[:, 1::16] = maxq
    s = torch.rand(8, 3, generator=gen) + 0.1
    z = torch.randn(8, 3, generator=gen)
    idx = torch.arange(k) // g
    w = s[:, idx] * codes + z[:, idx]
    h = hessian_of(make_x(k, 100, seed=15))
    ref = float((w.double() @ h * w.double()).sum())
    for method in ("rtn", "gptq", "decoupleq"):
        q = solve_layer(w, h, bits=bits, group_size=g, method=method)
        assert float(q.loss.sum()) <= 1e-9 * ref, method
        torch.testing.assert_close(q.dequantize(), w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [16, -1])
def test_shapes_ranges_and_uneven_groups(bits, g):
    k = 40  # 40 = 16 + 16 + 8: the last group is shorter
    x = make_x(k, 120, seed=16, correlated=True)
    h = hessian_of(x)
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(17)) * 0.05
    rtn = solve_layer(w, h, bits=bits, group_size=g, method="rtn")
    q = solve_layer(w, h, bits=bits, group_size=g)
    ng = 3 if g == 16 else 1
    assert isinstance(q, QuantResult)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (12, k) and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == (12, ng) and q.zeros.shape == (12, ng) and q.scales.dtype == torch.float32
    assert q.group_size == (16 if g == 16 else k) and q.bits == bits
    # Independent dequantization with the documented formula.
    ge = q.group_size
    ref = torch.stack([q.scales[:, c // ge] * q.codes[:, c].float() + q.zeros[:, c // ge] for c in range(k)], 1)
    torch.testing.assert_close(q.dequantize(), ref)
    torch.testing.assert_close(q.loss, explicit_loss(w, q.dequantize(), x), rtol=1e-6, atol=1e-12)
    assert float(q.loss.sum()) <= float(rtn.loss.sum())


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_and_integer_zero(bits):
    k, g = 40, 16
    x = make_x(k, 150, seed=18, correlated=True)
    h = hessian_of(x)
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(19))
    mid = 2 ** (bits - 1)
    rtn_sym = solve_layer(w, h, bits=bits, group_size=g, method="rtn", symmetric=True)
    # GPTQ's symmetric min-max: s = 2 max|w| / maxq (checked by hand on the first group of the first row).
    v = w[0, :16].double()
    assert math.isclose(float(rtn_sym.scales[0, 0]), float(2 * v.abs().max() / (2**bits - 1)), rel_tol=1e-6)
    sym = solve_layer(w, h, bits=bits, group_size=g, symmetric=True)
    torch.testing.assert_close(sym.zeros, -mid * sym.scales)
    assert float(sym.loss.sum()) <= float(rtn_sym.loss.sum())
    rtn_iz = solve_layer(w, h, bits=bits, group_size=g, method="rtn", integer_zero=True)
    iz = solve_layer(w, h, bits=bits, group_size=g, integer_zero=True)
    for q in (rtn_iz, iz):
        zint = -q.zeros.double() / q.scales.double()
        torch.testing.assert_close(zint, zint.round(), rtol=0, atol=1e-4)
        assert zint.round().min() >= 0 and zint.round().max() <= 2**bits - 1
    assert float(iz.loss.sum()) <= float(rtn_iz.loss.sum())
    free = solve_layer(w, h, bits=bits, group_size=g)
    assert float(free.loss.sum()) <= float(iz.loss.sum()) * 1.05  # the free zero is the larger feasible set


def test_clip_search_exhaustive_matches_brute_force_and_coarse_is_close():
    k, g, bits = 32, 8, 2
    x = make_x(k, 100, seed=20, correlated=True)
    h = hessian_of(x)
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(21), dtype=F64)
    # Brute force in float64 with explicit loops over p.
    best = []
    for i in range(6):
        losses = []
        for j in range(161):
            p = 1 - j / 200
            s, z = ref_minmax(w[i : i + 1] * p, bits, g)
            idx = torch.arange(k) // g
            q = torch.clamp(torch.round((w[i] - z[0, idx]) / s[0, idx]), 0, 3)
            e = w[i] - (s[0, idx] * q + z[0, idx])
            losses.append(float(e @ h @ e))
        best.append(min(losses))
    s, z, j = clip_search(w, h, bits, g, steps=(1,))
    idx = torch.arange(k) // g
    q = torch.clamp(torch.round((w - z[:, idx]) / s[:, idx]), 0, 3)
    e = w - (s[:, idx] * q + z[:, idx])
    got = ((e @ h) * e).sum(1)
    torch.testing.assert_close(got, torch.tensor(best, dtype=F64), rtol=1e-9, atol=1e-12)
    # Coarse to fine: per row between the exhaustive optimum and the plain min-max (p = 1) loss.
    s2, z2, _ = clip_search(w, h, bits, g)
    q2 = torch.clamp(torch.round((w - z2[:, idx]) / s2[:, idx]), 0, 3)
    e2 = w - (s2[:, idx] * q2 + z2[:, idx])
    got2 = ((e2 @ h) * e2).sum(1)
    s1, z1 = ref_minmax(w, bits, g)
    q1 = torch.clamp(torch.round((w - z1[:, idx]) / s1[:, idx]), 0, 3)
    e1 = w - (s1[:, idx] * q1 + z1[:, idx])
    got1 = ((e1 @ h) * e1).sum(1)
    assert torch.all(got2 >= got * (1 - 1e-9)) and torch.all(got2 <= got1 * (1 + 1e-9))
    assert float(got2.sum()) <= 1.3 * float(got.sum())


# ------------------------------------------------------------------------------------------- edge cases
def test_singular_hessian_zero_and_constant_rows_are_finite():
    k = 48
    x = make_x(k, 10, seed=22)  # 10 tokens < 48 features: H has rank 10
    h = hessian_of(x)
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(23))
    w[1] = 0.0
    w[2] = 0.37
    for method in ("rtn", "gptq", "decoupleq"):
        for g in (16, -1):
            q = solve_layer(w, h, bits=2, group_size=g, method=method)
            assert torch.isfinite(q.scales).all() and torch.isfinite(q.zeros).all() and torch.isfinite(q.loss).all()
            w_hat = q.dequantize()
            assert torch.equal(w_hat[1], torch.zeros(k))
            torch.testing.assert_close(w_hat[2], w[2], rtol=0, atol=1e-6)
            torch.testing.assert_close(q.loss, explicit_loss(w, w_hat, x), rtol=1e-5, atol=1e-9)
    # A zero Hessian (no signal at all) is fine too: everything has loss 0.
    q = solve_layer(w, torch.zeros(k, k, dtype=F64), bits=2, group_size=16)
    assert torch.equal(q.loss, torch.zeros(6, dtype=F64))


def test_dampening_escalates_then_fails_with_a_clear_error():
    k = 16
    h = torch.eye(k, dtype=F64)
    h[0, 0] = -0.05  # mean diag ~0.93: d = 0.01 is not enough, d = 0.1 is
    w = torch.randn(4, k)
    q = solve_layer(w, h, bits=2, group_size=8, method="gptq")
    assert math.isclose(q.stats["damp"], 0.1)
    with pytest.raises(DecoupleQNumericalError, match=r"'blk.0.q'.*\(16, 16\)"):
        h_bad = torch.eye(k, dtype=F64)
        h_bad[0, 0] = -1000.0  # so negative that even 10 x mean|diag| cannot lift it
        solve_layer(w, h_bad, bits=2, group_size=8, name="blk.0.q")


def test_invalid_arguments_raise_clear_errors():
    w = torch.randn(4, 16)
    h = torch.eye(16, dtype=F64)
    with pytest.raises(DecoupleQConfigError, match="bits=7"):
        solve_layer(w, h, bits=7)
    # 5 and 6 bits (the GGUF Q5 types, Q6_K) are solver widths: codes in [0, 31] / [0, 63].
    assert 16 <= int(solve_layer(w, h, bits=5, group_size=8).codes.max()) <= 31
    assert 32 <= int(solve_layer(w, h, bits=6, group_size=8).codes.max()) <= 63
    with pytest.raises(DecoupleQConfigError, match="group_size=0"):
        solve_layer(w, h, group_size=0)
    with pytest.raises(DecoupleQConfigError, match="group_size=-2"):
        solve_layer(w, h, group_size=-2)
    with pytest.raises(DecoupleQConfigError, match="method='awq'"):
        solve_layer(w, h, method="awq")
    with pytest.raises(DecoupleQConfigError, match=r"\(16, 16\)"):
        solve_layer(w, torch.eye(15, dtype=F64))
    with pytest.raises(DecoupleQConfigError, match="rounds"):
        solve_layer(w, h, rounds=-1)
    with pytest.raises(DecoupleQConfigError, match="damp"):
        solve_layer(w, h, damp=0.0)
    with pytest.raises(DecoupleQConfigError, match="cd_sweeps"):
        solve_layer(w, h, cd_sweeps=-1)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(DecoupleQNumericalError, match="weight.*NaN"):
        solve_layer(bad, h, name="x")
    hb = h.clone()
    hb[3, 3] = float("inf")
    with pytest.raises(DecoupleQNumericalError, match="Hessian.*NaN or Inf"):
        solve_layer(w, hb)


def test_group_size_larger_than_in_features_is_per_channel():
    w = torch.randn(4, 24)
    h = hessian_of(make_x(24, 60, seed=24))
    a = solve_layer(w, h, group_size=64)
    b = solve_layer(w, h, group_size=-1)
    assert a.group_size == b.group_size == 24
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_solver_import_is_free_of_transformers():
    code = "import sys, hf_decoupleq.solver; print('transformers' in sys.modules)"
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, PYTHONPATH=repo)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, check=False
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "shape, contiguous, via_onednn",
    [
        ((64, 300, 256), True, True),  # large, row-major: oneDNN (the Hessian panels' layout)
        ((64, 300, 256), False, False),  # a transposed offset view: plain matmul (oneDNN would pick a slow kernel)
        ((3, 5, 4), True, False),  # tiny: plain matmul
    ],
)
def test_matmul_nt_matches_float64_and_takes_the_expected_path(shape, contiguous, via_onednn, monkeypatch):
    from hf_decoupleq.solver import matmul as mm

    m, k, n = shape
    g = torch.Generator().manual_seed(7)
    a_full = torch.randn(k, m + 3, generator=g)
    b = torch.randn(n, k, generator=g)
    a = a_full[:, 1 : m + 1].T  # [m, k], not contiguous
    if contiguous:
        a = a.contiguous()
    ref = a.double() @ b.double().T
    calls = []
    real = mm._onednn_matmul_nt
    monkeypatch.setattr(mm, "_onednn_matmul_nt", lambda x, y: calls.append(1) or real(x, y))
    out = mm.matmul_nt(a, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    onednn_built = torch.backends.mkldnn.is_available()
    assert len(calls) == (1 if via_onednn and onednn_built else 0)
    # A failing oneDNN call falls back to the plain product (and disables oneDNN from then on).
    monkeypatch.setitem(mm._state, "usable", None)

    def broken(x, y):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(mm, "_onednn_matmul_nt", broken)
    torch.testing.assert_close(mm.matmul_nt(a, b).double(), ref, rtol=1e-5, atol=1e-4)
    if via_onednn and onednn_built:
        assert mm._state["usable"] is False


def test_matmul_nt_keeps_autograd_and_other_dtypes():
    from hf_decoupleq.solver.matmul import matmul_nt

    g = torch.Generator().manual_seed(8)
    a = torch.randn(64, 256, generator=g, requires_grad=True)
    b = torch.randn(300, 256, generator=g)
    matmul_nt(a, b).sum().backward()  # needs the autograd-aware path
    torch.testing.assert_close(a.grad, b.sum(0).expand(64, -1), rtol=1e-5, atol=1e-4)
    a64, b64 = a.detach().double(), b.double()
    out = matmul_nt(a64, b64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, a64 @ b64.T, rtol=0, atol=0)
