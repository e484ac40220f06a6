"""DecoupleQLinear: fake-quant vs real-quant, both backends, shapes/strides, meta + safetensors round trip,
gradients, caches, torch.compile."""

import os
import subprocess
import sys
import tempfile
import types

import pytest
import torch
from hf_decoupleq.kernels import interpreting, triton_available
from safetensors.torch import load_file, save_file

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.nn import DecoupleQLinear
from hf_decoupleq.packing import packed_rows

try:  # the solver's result type when it exists; the module only needs duck typing
    from hf_decoupleq.solver.layerwise import QuantResult
except ImportError:  # pragma: no cover
    QuantResult = None

# Relative (Frobenius) error bound of the output for the lower precision of x's and the module's dtype. It covers
# rounding the fp32 solver scales/zeros to the module dtype, the dequantized weight, and the output.
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RANK = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

needs_triton = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and not interpreting()),
    reason="triton is not installed, or no CUDA and TRITON_INTERPRET is not set",
)


def _tol(*dtypes):
    return TOL[max(dtypes, key=_RANK.get)]


def _result(n_out, k, bits, group_size, seed=0):
    """A random solver-like result: codes uint8 [out, in], scales/zeros float32 [out, G]."""
    gen = torch.Generator().manual_seed(seed + 7 * bits + n_out + k)
    g = k if group_size == -1 else min(group_size, k)
    n_groups = -(-k // g)
    codes = torch.randint(0, 2**bits, (n_out, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n_out, n_groups, generator=gen) + 0.5) * (0.2 / 2**bits)
    zeros = -scales * (2**bits - 1) / 2 + 0.02 * torch.randn(n_out, n_groups, generator=gen)
    fields = {"codes": codes, "scales": scales, "zeros": zeros, "bits": bits, "group_size": g}
    if QuantResult is not None:
        return QuantResult(loss=torch.zeros(n_out, dtype=torch.float64), **fields)
    return types.SimpleNamespace(**fields)


def _mutable(result):
    return types.SimpleNamespace(**{a: getattr(result, a) for a in ("codes", "scales", "zeros", "bits", "group_size")})


def _fake_quant_weight64(result, k):
    """Independent float64 dequantization of a solver result: scales * codes + zeros, groups along the input."""
    idx = torch.arange(k) // result.group_size
    return result.scales.double()[:, idx] * result.codes.double() + result.zeros.double()[:, idx]


def _module(n_out, k, bits, group_size, dtype, bias=True, seed=0):
    linear = torch.nn.Linear(k, n_out, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    result = _result(n_out, k, bits, group_size, seed)
    module = DecoupleQLinear.from_linear(linear.to(dtype), result)
    return module, result, linear


def _reference(x, result, linear, k):
    y = x.double() @ _fake_quant_weight64(result, k).T
    if linear.bias is not None:
        y = y + linear.bias.double()
    return y


def _rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def backend(monkeypatch):
    def set_backend(name):
        monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", name)

    return set_backend


# ----------------------------------------------------------------------------------------- construction
def test_buffers_on_meta_have_the_packed_shapes():
    with torch.device("meta"):
        m = DecoupleQLinear(100, 48, bits=3, group_size=32, bias=True, dtype=torch.bfloat16)
    assert m.qweight.is_meta and m.qweight.shape == (packed_rows(100, 3), 48) == (12, 48)
    assert m.qweight.dtype == torch.int32
    assert m.scales.shape == m.zeros.shape == (4, 48) and m.scales.dtype == torch.bfloat16
    assert m.bias.shape == (48,)
    assert set(m.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    pc = DecoupleQLinear(100, 48, bits=2, group_size=-1, bias=False, device="meta")
    assert pc.effective_group_size == 100 and pc.scales.shape == (1, 48) and pc.bias is None
    assert set(pc.state_dict()) == {"qweight", "scales", "zeros"}
    assert "bits=2" in repr(pc) and "group_size=-1" in repr(pc) and "bias=False" in repr(pc)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, "bits=5"),
        ({"group_size": 0}, "group_size=0"),
        ({"dtype": torch.int8}, "dtype"),
        ({"in_features": 0}, "in_features=0"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"in_features": 64, "out_features": 32, "bits": 2, "group_size": 32} | kwargs
    with pytest.raises(DecoupleQConfigError, match=match):
        DecoupleQLinear(**args)


def test_from_linear_errors():
    linear = torch.nn.Linear(64, 32)
    bad = _result(32, 60, 2, 32)
    with pytest.raises(DecoupleQConfigError, match="codes shape"):
        DecoupleQLinear.from_linear(linear, bad)
    with pytest.raises(DecoupleQConfigError, match="lacks"):
        DecoupleQLinear.from_linear(linear, types.SimpleNamespace(codes=None))
    wrong_groups = _mutable(_result(32, 64, 2, 32))
    wrong_groups.scales = wrong_groups.scales[:, :1]
    with pytest.raises(DecoupleQConfigError, match="scales shape"):
        DecoupleQLinear.from_linear(linear, wrong_groups)


# ----------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "group_size"), [(2, 64), (3, -1), (4, 32), (8, 48), (2, 40)])
def test_real_quant_matches_fake_quant_torch_path(dtype, bits, group_size, backend):
    backend("torch")
    k, n = 192, 64
    m, result, linear = _module(n, k, bits, group_size, dtype)
    assert m.dtype == dtype and m.effective_group_size == result.group_size
    x = torch.randn(3, 5, k).to(dtype)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    assert _rel_err(y, _reference(x, result, linear, k)) < _tol(dtype)
    w = m.dequantize_weight()
    assert w.dtype == dtype and w.shape == (n, k)
    assert _rel_err(w, _fake_quant_weight64(result, k)) < _tol(dtype)


@pytest.mark.parametrize(("k", "group_size"), [(256, 64), (320, 128)])  # 320 = 2.5 groups of 128: a short last group
def test_cpu_int4_fast_path_is_taken_and_exact_enough(backend, k, group_size):
    backend("torch")
    n = 64
    for bits in (2, 3, 4):
        m, result, linear = _module(n, k, bits, group_size, torch.bfloat16)
        m.post_init()
        assert "cpu_int4" in m._cache  # bf16, g in 32..256, N % 16 == 0: PyTorch's fused int4 CPU kernel
        for x_dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(4, k).to(x_dtype)
            with torch.no_grad():
                y = m(x)
            assert y.dtype == x_dtype
            assert _rel_err(y, _reference(x, result, linear, k)) < _tol(torch.bfloat16)
        assert "codes" not in m._cache  # no 1-byte code cache when the int4 path serves


def test_input_shapes_and_strides(backend):
    backend("torch")
    k, n = 96, 32
    m, result, linear = _module(n, k, 2, 32, torch.float32)
    w64 = _fake_quant_weight64(result, k)
    base = torch.randn(4, 6, 2 * k)
    inputs = [torch.randn(k), torch.randn(7, k), torch.randn(2, 3, k), base[..., ::2], base.transpose(0, 1)[:, :, :k]]
    with torch.no_grad():
        for x in inputs:
            y = m(x)
            assert y.shape == (*x.shape[:-1], n)
            ref = x.double() @ w64.T + linear.bias.double()
            assert _rel_err(y, ref) < 1e-5
    with pytest.raises(DecoupleQConfigError, match="in_features=96"):
        m(torch.randn(2, k + 1))
    with pytest.raises(DecoupleQConfigError, match="x dtype"):
        m(torch.ones(2, k, dtype=torch.int64))


@needs_triton
@pytest.mark.parametrize(("dtype", "bits", "group_size"), [(torch.float16, 2, 64), (torch.bfloat16, 3, -1)])
def test_triton_path_matches_fake_quant(dtype, bits, group_size, backend):
    backend("triton")
    k, n = 128, 48
    m, result, linear = _module(n, k, bits, group_size, dtype)
    with torch.no_grad():
        for shape in ((k,), (3, k), (2, 20, k)):  # decode kernel for <= 16 rows, prefill kernel above
            x = torch.randn(*shape).to(dtype)
            y = m(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], n)
            assert _rel_err(y, _reference(x, result, linear, k)) < _tol(dtype)
        x = torch.randn(5, 2 * k).to(dtype)[:, 1::2]
        assert _rel_err(m(x), _reference(x, result, linear, k)) < _tol(dtype)
    w = m.dequantize_weight()  # the Triton dequantize kernel
    assert w.dtype == dtype and _rel_err(w, _fake_quant_weight64(result, k)) < _tol(dtype)


def test_backend_env_is_validated_at_call_time(backend):
    m, _, _ = _module(32, 64, 2, 32, torch.float32)
    x = torch.randn(2, 64)
    backend("cuda-please")
    with pytest.raises(DecoupleQConfigError, match="cuda-please"):
        m(x)
    backend("auto")
    m(x)


def test_module_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import os, torch\n"
        "import hf_decoupleq.kernels as k\n"
        "from hf_decoupleq.nn import DecoupleQLinear\n"
        "m = DecoupleQLinear(64, 32, bits=2, group_size=32, dtype=torch.float32)\n"
        "y = m(torch.randn(3, 64))\n"
        "os.environ['HF_DECOUPLEQ_BACKEND'] = 'triton'\n"
        "try:\n"
        "    m(torch.randn(3, 64))\n"
        "except ValueError as e:\n"
        "    print(k.triton_available(), tuple(y.shape), 'not installed' in str(e))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DECOUPLEQ_BACKEND", "TRITON_INTERPRET")}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=cwd, env=env
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False (3, 32) True"


# ----------------------------------------------------------------------------------------- state
def test_safetensors_round_trip_into_meta_module_is_bit_exact(backend):
    backend("torch")
    k, n = 100, 48
    m, _, _ = _module(n, k, 3, 32, torch.bfloat16)
    x = torch.randn(4, k, dtype=torch.bfloat16)
    with torch.no_grad():
        y = m(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.safetensors")
        save_file(m.state_dict(), path)
        loaded = load_file(path)
    with torch.device("meta"):
        m2 = DecoupleQLinear(k, n, bits=3, group_size=32, bias=True, dtype=torch.bfloat16)
    m2.load_state_dict(loaded, assign=True)
    m2.post_init()
    m2.post_init()  # idempotent
    for name, t in m.state_dict().items():
        t2 = m2.state_dict()[name]
        assert t2.dtype == t.dtype and t2.device.type == "cpu" and torch.equal(t2, t), name
    with torch.no_grad():
        assert torch.equal(m2(x), y)


def test_caches_follow_in_place_updates(backend):
    backend("torch")
    k, n = 128, 32
    for dtype in (torch.float32, torch.bfloat16):  # generic path (code cache) and int4 CPU path
        m, result, linear = _module(n, k, 2, 64, dtype)
        result = _mutable(result)
        x = torch.randn(3, k).to(dtype)
        with torch.no_grad():
            m(x)  # fill the caches
            m.scales.mul_(2)
            m.zeros.add_(0.01)
            m.qweight.copy_(torch.flip(m.qweight, dims=[1]))
            y = m(x)
        # Expected: output rows' codes reversed (qweight columns flipped), scales doubled, zeros shifted.
        result.codes = result.codes.flip(0)
        result.scales = result.scales.to(dtype) * 2
        result.zeros = result.zeros.to(dtype) + 0.01
        assert _rel_err(y, _reference(x, result, linear, k)) < _tol(dtype)


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("k, group_size, bits", [(96, 32, 2), (100, 32, 3), (40, -1, 4)])
def test_gradients_flow_to_scales_zeros_and_x(k, group_size, bits):
    # (the last group of k=100 is partial: the training path pads it; -1 is one group per row)
    n = 24
    m, result, linear = _module(n, k, bits, group_size, torch.float32)
    group_size = k if group_size == -1 else group_size
    m.scales.requires_grad_(True)
    m.zeros.requires_grad_(True)
    x = torch.randn(5, k, requires_grad=True)
    gy = torch.randn(5, n)
    (m(x) * gy).sum().backward()

    # float64 autograd on the independent formula
    s64 = m.scales.detach().double().requires_grad_(True)
    z64 = m.zeros.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    idx = torch.arange(k) // group_size
    w64 = s64[idx].T * result.codes.double() + z64[idx].T
    ((x64 @ w64.T + linear.bias.double()) * gy.double()).sum().backward()
    for got, want in ((m.scales.grad, s64.grad), (m.zeros.grad, z64.grad), (x.grad, x64.grad)):
        assert _rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_torch_path(backend):
    backend("torch")
    k, n = 96, 32
    m, result, linear = _module(n, k, 3, 32, torch.float32)
    x = torch.randn(2, 3, k)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)  # inductor: fuses unpack + dequantize + matmul
    with torch.no_grad():
        y = compiled(x)
    assert _rel_err(y, _reference(x, result, linear, k)) < 1e-5


@needs_triton
def test_compile_fullgraph_triton_path(backend):
    backend("triton")
    k, n = 96, 32
    m, result, linear = _module(n, k, 2, 32, torch.float16)
    torch._dynamo.reset()
    # The custom op is opaque to the graph, so aot_eager checks the no-graph-break trace (with its fake impl)
    # without asking Inductor to compile anything.
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for rows in (1, 20):
            x = torch.randn(rows, k, dtype=torch.float16)
            assert _rel_err(compiled(x), _reference(x, result, linear, k)) < _tol(torch.float16)


def test_compile_fullgraph_with_gradients():
    k, n = 64, 16
    m, result, _ = _module(n, k, 2, 32, torch.float32)
    m.scales.requires_grad_(True)
    x = torch.randn(3, k)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    grad_compiled = m.scales.grad.clone()
    m.scales.grad = None
    m(x).sum().backward()  # eager: the cached-codes path
    assert torch.allclose(grad_compiled, m.scales.grad, rtol=1e-6, atol=1e-6)
    # independent closed form: d/ds[g, n] sum(y) = sum over rows and group columns of x * q
    idx = torch.arange(k) // 32
    xq = x.double().sum(0)[None, :] * result.codes.double()  # [n, k]
    want = torch.zeros(2, n, dtype=torch.float64).index_add_(0, idx, xq.T)
    assert torch.allclose(m.scales.grad.double(), want, rtol=1e-5, atol=1e-5)
