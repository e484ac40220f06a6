"""GPTQ rounding (= LDLQ) onto a fixed grid, with blocked lazy updates as in the reference GPTQ code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hessian import inverse_cholesky_upper
from .quant import expand_groups, max_code

DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True, eq=False)
class GPTQFactor:
    """What GPTQ needs from ``H``, computed once per layer and reused across rounds.

    Attributes:
        perm: column order (descending ``diag H`` with act_order, else identity), ``[K]`` long.
        upper: upper Cholesky factor ``U`` of the dampened ``H^-1`` in ``perm`` order, ``[K, K]``.
        damp: the dampening actually used.
    """

    perm: torch.Tensor
    upper: torch.Tensor
    damp: float

    @property
    def scaled_upper(self) -> torch.Tensor:
        """``U`` with each row divided by its diagonal entry (``U[j, :] / U[j, j]``)."""
        return self.upper / self.upper.diagonal()[:, None]


def prepare_gptq(
    h: torch.Tensor, damp: float = 0.01, act_order: bool = True, name: str | None = None, dtype=torch.float32
) -> GPTQFactor:
    """Order the columns and factor the dampened inverse Hessian (float64 factorization, stored as ``dtype``)."""
    k = h.shape[0]
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=h.device)
    hp = h.to(torch.float64)[perm][:, perm]
    upper, used = inverse_cholesky_upper(hp, damp, name=name)
    return GPTQFactor(perm=perm, upper=upper.to(dtype), damp=used)


def gptq_round(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    factor: GPTQFactor,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """GPTQ codes for ``w`` on the fixed grid ``s * q + z`` (per (row, group) ``s``, ``z`` ``[N, G]``).

    Columns are visited in ``factor.perm`` order. Within a block of ``block_size`` columns each column's rounding
    error, divided by the pivot ``U[j, j]``, is fed into the block's later columns one by one through row ``j`` of
    ``U``; the columns after the block are updated with one matrix product per block.

    Returns:
        float codes ``[N, K]`` in the original column order.
    """
    dtype = factor.upper.dtype
    k = w.shape[1]
    perm = factor.perm
    maxq = float(max_code(bits))
    # Work transposed ([K, N]) so that one column is a contiguous row, and pre-split everything into row views
    # once: the column loop is bound by per-op overhead, not by arithmetic.
    wt = w.to(dtype)[:, perm].T.contiguous()
    st = expand_groups(scales.to(dtype), group_size, k)[:, perm].T.contiguous()
    zt = expand_groups(zeros.to(dtype), group_size, k)[:, perm].T.contiguous()
    inv_st = st.reciprocal()
    zt_scaled = -zt * inv_st  # (w - z) / s == w * (1/s) + (-z/s): one fused op per column
    # Rows of U divided by their pivot: the update w_l -= U[j, l] * (w_j - q_j) / U[j, j] becomes one addr_ with
    # the unscaled error, and the between-block product uses the same scaled rows.
    us = factor.scaled_upper
    qt = torch.empty_like(wt)
    err = torch.empty_like(wt)
    w_rows, s_rows, z_rows = wt.unbind(0), st.unbind(0), zt.unbind(0)
    is_rows, zs_rows, q_rows, e_rows = inv_st.unbind(0), zt_scaled.unbind(0), qt.unbind(0), err.unbind(0)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2]
        u_rows = us[i1:i2, i1:i2].unbind(0)
        for j in range(i2 - i1):
            c = i1 + j
            col, q, e = w_rows[c], q_rows[c], e_rows[c]
            torch.addcmul(zs_rows[c], col, is_rows[c], out=q)
            q.round_().clamp_(0.0, maxq)
            torch.addcmul(z_rows[c], q, s_rows[c], out=e)
            torch.sub(col, e, out=e)
            if j + 1 < i2 - i1:
                w1[j + 1 :].addr_(u_rows[j][j + 1 :], e, alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(us[i1:i2, i2:].T, err[i1:i2], alpha=-1.0)
    codes = torch.empty_like(qt)
    codes[perm] = qt
    return codes.T.contiguous()


def coordinate_descent(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    sweeps: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Lower the proxy loss ``(w - w_hat) H (w - w_hat)^T`` of every row by cyclic coordinate descent on the codes.

    One sweep visits the columns in order; at column ``k`` every row's code moves to the grid point that minimizes
    its loss with all other codes fixed. That is exact: in one coordinate the loss is the convex parabola
    ``H_kk d^2 - 2 d g_k`` (``g = (w - w_hat) H``), whose best grid point is the one nearest its vertex
    ``w_hat_k + g_k / H_kk``, clamped to the code range. So no row's loss goes up (up to rounding in ``h``'s dtype),
    and a row stops changing once no single code can improve it. Columns with ``H_kk == 0`` do not affect the loss
    and keep their codes. Within a block of ``block_size`` columns the gradient of the block's later columns is
    updated column by column; the rest with one matrix product per block, as in GPTQ.

    Args:
        w: ``[N, K]`` weight; h: ``[K, K]`` symmetric PSD (the objective's ``H``, usually undamped).
        codes: ``[N, K]`` starting codes (any dtype); scales, zeros: ``[N, G]``, fixed.

    Returns:
        float codes ``[N, K]`` in ``h``'s dtype.
    """
    dtype = h.dtype
    k = w.shape[1]
    maxq = float(max_code(bits))
    wt = w.to(dtype).T.contiguous()
    st = expand_groups(scales.to(dtype), group_size, k).T.contiguous()
    zt = expand_groups(zeros.to(dtype), group_size, k).T.contiguous()
    qt = codes.to(dtype).T.contiguous()
    diag = h.diagonal()
    live = diag > 0
    live_cols = live.tolist()
    inv_diag = torch.where(live, 1.0 / torch.where(live, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    # In code units the vertex is q + g / (H_kk s): one fused op per column with this precomputed factor.
    step = st.reciprocal() * inv_diag[:, None]
    # Work transposed ([K, N]) so that one column is a contiguous row, pre-split into row views (the column loop
    # is bound by per-op overhead).
    q_rows, s_rows, step_rows = qt.unbind(0), st.unbind(0), step.unbind(0)
    q_new = torch.empty_like(q_rows[0])
    for _ in range(sweeps):
        grad = h @ (wt - (qt * st + zt))  # [K, N]: column k of (w - w_hat) H, transposed
        delta = torch.zeros_like(wt)
        d_rows = delta.unbind(0)
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            gb = grad[i1:i2].clone()
            g_rows = gb.unbind(0)
            h_rows = h[i1:i2, i1:i2].unbind(0)
            for j in range(i2 - i1):
                c = i1 + j
                if not live_cols[c]:
                    continue
                q = q_rows[c]
                torch.addcmul(q, g_rows[j], step_rows[c], out=q_new)
                q_new.round_().clamp_(0.0, maxq)
                d = d_rows[c]
                torch.sub(q_new, q, out=d).mul_(s_rows[c])
                q.copy_(q_new)
                if j + 1 < i2 - i1:
                    gb[j + 1 :].addr_(h_rows[j][j + 1 :], d, alpha=-1.0)
            grad.addmm_(h[:, i1:i2], delta[i1:i2], alpha=-1.0)
    return qt.T.contiguous()
