"""Triton kernels against a float64 reference. Without a GPU they run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported), so shapes are tiny and chosen to cross tile and word boundaries.

The autotuned launches use one small tile under the interpreter; the ``*_gpu_configs`` tests run every tile
configuration a GPU autotunes over (:mod:`hf_decoupleq.kernels.configs`) explicitly."""

import logging

import pytest
import torch

pytest.importorskip("triton")

from hf_decoupleq.kernels import dequant, gemm, gemv, interpreting, reference
from hf_decoupleq.kernels._common import PackedLayer
from hf_decoupleq.kernels.configs import (
    DECODE_BLOCK_N,
    DECODE_CONFIGS,
    DECODE_MAX_WEIGHTS_PER_THREAD,
    GEMM_CONFIGS,
    GEMM_M_BUCKETS,
    decode_configs,
    decode_plan,
    gemm_m_bucket,
)
from hf_decoupleq.kernels.tuning import pretune

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


def _layer(bits, k, n, group_size, dtype, seed=0) -> PackedLayer:
    gen = torch.Generator().manual_seed(seed + 17 * bits + k + 3 * n)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    n_groups = num_groups(k, group_size)
    scales = (torch.rand(n_groups, n, generator=gen) + 0.5) / 2**bits
    zeros = -0.5 * scales * (2**bits - 1) + 0.05 * torch.randn(n_groups, n, generator=gen)
    return PackedLayer.validate(
        pack(codes, bits).to(DEVICE), scales.to(DEVICE, dtype), zeros.to(DEVICE, dtype), bits, group_size, k
    )


def _w64(layer: PackedLayer) -> torch.Tensor:
    """The float64 weight, unpacked by the PyTorch reader of the format (an independent implementation)."""
    return reference.dequantize(*layer, dtype=torch.float64)


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
    layer = _layer(bits, k, n, g, dtype)
    w64 = _w64(layer)

    w = dequant.launch(layer)
    assert w.dtype == dtype and w.shape == (n, k)
    assert _rel_err(w, w64) < TOL[dtype]

    for m in (1, 3, 16, 77):
        x = _x(m, k, dtype)
        _check(gemm.launch(x, layer), x, w64, dtype)
    for m, split in ((1, 1), (3, 3), (16, 2)):
        x = _x(m, k, dtype, seed=2)
        _check(gemv.launch(x, layer, split_k=split), x, w64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_dtypes_and_8_bits(dtype, poison):
    k, n, g = 72, 48, 32
    for bits in (2, 8):
        layer = _layer(bits, k, n, g, dtype, seed=5)
        w64 = _w64(layer)
        assert _rel_err(dequant.launch(layer), w64) < TOL[dtype]
        for m in (1, 16):
            x = _x(m, k, dtype)
            _check(gemv.launch(x, layer, split_k=2), x, w64, dtype)
        x = _x(40, k, dtype)
        _check(gemm.launch(x, layer), x, w64, dtype)


def test_non_contiguous_inputs_and_more_splits_than_chunks(poison):
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float16
    layer = _layer(bits, k, n, g, dtype)
    w64 = _w64(layer)
    wide = _x(20, 2 * k, dtype)
    x = wide[:, ::2]  # stride 2 along K
    assert not x.is_contiguous()
    _check(gemm.launch(x, layer), x, w64, dtype)
    xt = _x(k, 4, dtype).T  # [4, K] with K-stride 4
    _check(gemv.launch(xt, layer, split_k=2), xt, w64, dtype)
    # K = 96 has 3 chunks of 32: with 5 splits, two splits own no chunk and must still write zero partials.
    x1 = _x(1, k, dtype)
    _check(gemv.launch(x1, layer, split_k=5), x1, w64, dtype)


# The GPU's tile configurations, each with shapes that cross its tiles: K = 200 is no multiple of any BLOCK_K
# (and ends inside a 3-bit block), N = 70 and M = 40 cross the 64-wide tiles and leave the wider ones partial.
# The group sizes put each BLOCK_K on both paths: g = 128 aligned for all, g = 64 unaligned for BLOCK_K = 128,
# g = 32 unaligned for BLOCK_K >= 64, g = 48 unaligned everywhere (and not dividing K).
GPU_CASES = ((3, 64, torch.bfloat16), (2, 32, torch.float16), (4, 48, torch.float16), (3, 128, torch.float16))


@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=lambda c: c.label())
def test_gemm_gpu_configs(config, poison):
    k, n, m = 200, 70, 40
    for bits, g, dtype in GPU_CASES:
        layer = _layer(bits, k, n, g, dtype, seed=11)
        x = _x(m, k, dtype, seed=3)
        _check(gemm.launch(x, layer, config=config), x, _w64(layer), dtype)


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: c.label())
@pytest.mark.parametrize("block_n", DECODE_BLOCK_N)
def test_decode_gpu_configs(config, block_n, poison):
    k, n = 200, 70
    for i, (bits, g, dtype) in enumerate(GPU_CASES):
        layer = _layer(bits, k, n, g, dtype, seed=13)
        w64 = _w64(layer)
        # Splits 1 (direct store), 2 and 3: with BLOCK_K = 128 (2 chunks) the third split owns nothing.
        for m in (1, 5):
            x = _x(m, k, dtype, seed=4)
            _check(gemv.launch(x, layer, split_k=1 + (i + m) % 3, block_n=block_n, config=config), x, w64, dtype)


def test_decode_heuristics():
    """The split uses the column tile it is launched with, and pruning keeps configs within the register budget."""
    for n_out, k in ((4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1536, 576), (128, 8192)):
        for sms in (20, 108, 132):
            block_n, split = decode_plan(n_out, k, sms)
            assert block_n in DECODE_BLOCK_N and 1 <= split <= max(1, k // 512)
            programs = -(-n_out // block_n) * split
            # Enough programs for two per SM unless K is too short to split further (or the split cap is reached).
            assert programs >= 2 * sms or split == max(1, min(16, k // 512))
    for block_n in DECODE_BLOCK_N:
        for g in (32, 48, 64, 128, 4096):
            kept = decode_configs(block_n, g)
            assert kept
            for c in kept:
                assert c.meta["BLOCK_K"] * block_n <= DECODE_MAX_WEIGHTS_PER_THREAD * 32 * c.num_warps
            if any(g % c.meta["BLOCK_K"] == 0 and c in kept for c in DECODE_CONFIGS):
                assert all(g % c.meta["BLOCK_K"] == 0 for c in kept)
    assert [gemm_m_bucket(m) for m in (17, 32, 33, 512, 513, 2048, 10000)] == [32, 32, 128, 512, 2048, 2048, 2048]
    assert GEMM_M_BUCKETS == tuple(sorted(GEMM_M_BUCKETS))


def test_custom_ops_dispatch_and_fake(poison):
    bits, (k, n, g), dtype = 3, CASES["g64"], torch.bfloat16
    layer = _layer(bits, k, n, g, dtype)
    w64 = _w64(layer)
    for m in (1, 5, 17):
        x = _x(m, k, dtype)
        _check(torch.ops.hf_decoupleq.matmul(x, *layer), x, w64, dtype)
    assert _rel_err(torch.ops.hf_decoupleq.dequantize(*layer), w64) < TOL[dtype]
    # Fake implementations give the right metadata without running a kernel.
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fs, fz = (mode.from_tensor(t) for t in layer[:3])
        fx = mode.from_tensor(_x(7, k, torch.float16))
        out = torch.ops.hf_decoupleq.matmul(fx, fq, fs, fz, bits, g, k)
        assert out.shape == (7, n) and out.dtype == torch.float16
        w = torch.ops.hf_decoupleq.dequantize(fq, fs, fz, bits, g, k)
        assert w.shape == (n, k) and w.dtype == dtype


def test_opcheck():
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float32
    layer = _layer(bits, k, n, g, dtype)
    torch.library.opcheck(
        torch.ops.hf_decoupleq.matmul.default,
        (_x(2, k, dtype), *layer),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_entry_errors():
    bits, (k, n, g), dtype = 2, CASES["g32"], torch.float16
    qweight, scales, zeros = _layer(bits, k, n, g, dtype)[:3]
    matmul = torch.ops.hf_decoupleq.matmul
    with pytest.raises(DecoupleQConfigError, match=r"x must be \[M, 96\]"):
        matmul(_x(2, k + 1, dtype), qweight, scales, zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="scales shape"):
        matmul(_x(2, k, dtype), qweight, scales[:1], zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="rows"):
        matmul(_x(2, k, dtype), qweight, scales, zeros, 4, g, k)
    with pytest.raises(DecoupleQConfigError, match="x dtype"):
        matmul(_x(2, k, dtype).to(torch.int32), qweight, scales, zeros, bits, g, k)
    with pytest.raises(DecoupleQConfigError, match="bits=5"):
        torch.ops.hf_decoupleq.dequantize(qweight, scales, zeros, 5, g, k)
    with pytest.raises(DecoupleQConfigError, match="1..16 rows"):
        gemv.launch(_x(17, k, dtype), PackedLayer.validate(qweight, scales, zeros, bits, g, k))


def test_pretune_runs_every_shape_at_every_bucket(caplog):
    from hf_decoupleq.nn import DecoupleQLinear

    model = torch.nn.Sequential(
        DecoupleQLinear(64, 32, bits=2, group_size=32, dtype=torch.float16),
        DecoupleQLinear(64, 32, bits=2, group_size=32, dtype=torch.float16),  # same shape: tuned once
        DecoupleQLinear(32, 48, bits=3, group_size=-1, dtype=torch.float16),
    ).to(DEVICE)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq.kernels.tuning"):
        assert pretune(model, m_values=(1, 16, 40)) == 2 * 3
    assert "pretuned 2 packed layer shapes" in caplog.text
