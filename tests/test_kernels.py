"""Triton kernels against a float64 reference. Without a GPU they run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported), so shapes are tiny and chosen to cross tile and word boundaries."""

import pytest
import torch

pytest.importorskip("triton")

from hf_decoupleq.kernels import interpreting, reference
from hf_decoupleq.kernels.dequant import dequantize
from hf_decoupleq.kernels.gemm import gemm
from hf_decoupleq.kernels.gemv import gemv

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.packing import num_groups, pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():  # pragma: no cover - conftest sets it
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

# Relative (Frobenius) error bounds: a few units of the dtype's rounding (output rounding, dequantized weight
# rounding on the unaligned path); fp32 also absorbs accumulation-order differences.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (in_features K, out_features N, group_size): the interpreter's tiles are BLOCK_K = BLOCK_N = 32, so
# K, N are not multiples of 32 where the group allows it; 48 does not divide K (unaligned path, short last group).
CASES = {
    "g32": (96, 40, 32),
    "g64": (136, 36, 64),
    "g128": (264, 33, 128),
    "per_channel": (70, 40, -1),
    "g48_nondividing": (100, 35, 48),
}


@pytest.fixture
def poison(monkeypatch):
    """Make every floating torch.empty return NaNs while the kernel wrappers allocate, so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _layer(bits, k, n, group_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 17 * bits + k + 3 * n)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    n_groups = num_groups(k, group_size)
    scales = (torch.rand(n_groups, n, generator=gen) + 0.5) / 2**bits
    zeros = -0.5 * scales * (2**bits - 1) + 0.05 * torch.randn(n_groups, n, generator=gen)
    return pack(codes, bits).to(DEVICE), scales.to(DEVICE, dtype), zeros.to(DEVICE, dtype)


def _x(m, k, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed + m)
    return torch.randn(m, k, generator=gen).to(DEVICE, dtype)


def _rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite (unwritten) outputs"
    return ((y.double() - ref).norm() / ref.norm()).item()


def _check(y, x, w64, dtype):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w64.shape[0])
    ref = x.double() @ w64.T
    assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("case", list(CASES))
def test_gemm_gemv_dequant(bits, case, poison):
    k, n, g = CASES[case]
    dtype = DTYPES[(bits + list(CASES).index(case)) % 3]  # every dtype meets every bit width over the grid
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)
    w64 = reference.dequantize(qweight, scales, zeros, bits, g, k, dtype=torch.float64)

    w = dequantize(qweight, scales, zeros, bits, g, k)
    assert w.dtype == dtype and w.shape == (n, k)
    assert _rel_err(w, w64) < TOL[dtype]

    for m in (1, 3, 16, 77):
        x = _x(m, k, dtype)
        _check(gemm(x, qweight, scales, zeros, bits, g, k), x, w64, dtype)
    for m, split in ((1, 1), (3, 3), (16, 2)):
        x = _x(m, k, dtype, seed=2)
        _check(gemv(x, qweight, scales, zeros, bits, g, k, split_k=split), x, w64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_dtypes_and_8_bits(dtype, poison):
    k, n, g = 72, 48, 32
    for bits in (2, 8):
        qweight, scales, zeros = _layer(bits, k, n, g, dtype, seed=5)
        w64 = reference.dequantize(qweight, scales, zeros, bits, g, k, dtype=torch.float64)
        assert _rel_err(dequantize(qweight, scales, zeros, bits, g, k), w64) < TOL[dtype]
        for m in (1, 16):
            x = _x(m, k, dtype)
            _check(gemv(x, qweight, scales, zeros, bits, g, k, split_k=2), x, w64, dtype)
        x = _x(40, k, dtype)
        _check(gemm(x, qweight, scales, zeros, bits, g, k), x, w64, dtype)


def test_non_contiguous_inputs_and_more_splits_than_chunks(poison):
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float16
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)
    w64 = reference.dequantize(qweight, scales, zeros, bits, g, k, dtype=torch.float64)
    wide = _x(20, 2 * k, dtype)
    x = wide[:, ::2]  # stride 2 along K
    assert not x.is_contiguous()
    _check(gemm(x, qweight, scales, zeros, bits, g, k), x, w64, dtype)
    xt = _x(k, 4, dtype).T  # [4, K] with K-stride 4
    _check(gemv(xt, qweight, scales, zeros, bits, g, k, split_k=2), xt, w64, dtype)
    # K = 96 has 3 chunks of 32: with 5 splits, two splits own no chunk and must still write zero partials.
    x1 = _x(1, k, dtype)
    _check(gemv(x1, qweight, scales, zeros, bits, g, k, split_k=5), x1, w64, dtype)


def test_custom_ops_dispatch_and_fake(poison):
    bits, (k, n, g), dtype = 3, CASES["g64"], torch.bfloat16
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)
    w64 = reference.dequantize(qweight, scales, zeros, bits, g, k, dtype=torch.float64)
    for m in (1, 5, 17):
        x = _x(m, k, dtype)
        _check(torch.ops.hf_decoupleq.matmul(x, qweight, scales, zeros, bits, g, k), x, w64, dtype)
    assert _rel_err(torch.ops.hf_decoupleq.dequantize(qweight, scales, zeros, bits, g, k), w64) < TOL[dtype]
    # Fake implementations give the right metadata without running a kernel.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fs, fz = (mode.from_tensor(t) for t in (qweight, scales, zeros))
        fx = mode.from_tensor(_x(7, k, torch.float16))
        out = torch.ops.hf_decoupleq.matmul(fx, fq, fs, fz, bits, g, k)
        assert out.shape == (7, n) and out.dtype == torch.float16
        w = torch.ops.hf_decoupleq.dequantize(fq, fs, fz, bits, g, k)
        assert w.shape == (n, k) and w.dtype == dtype


def test_opcheck():
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float32
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)
    torch.library.opcheck(
        torch.ops.hf_decoupleq.matmul.default,
        (_x(2, k, dtype), qweight, scales, zeros, bits, g, k),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_wrapper_errors():
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float16
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)
    with pytest.raises(DecoupleQConfigError, match=r"x must be \[M, 96\]"):
        gemm(_x(2, k + 1, dtype), qweight, scales, zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="scales shape"):
        gemm(_x(2, k, dtype), qweight, scales[:1], zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="rows"):
        gemm(_x(2, k, dtype), qweight, scales, zeros, 4, g, k)
    with pytest.raises(DecoupleQConfigError, match="1..16 rows"):
        gemv(_x(17, k, dtype), qweight, scales, zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="x dtype"):
        gemm(_x(2, k, dtype).to(torch.int32), qweight, scales, zeros, bits, g, k)
