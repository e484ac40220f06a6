"""Incoherence processing (`DecoupleQConfig(incoherence=True)`): the randomized block Hadamard transform against
dense float64 references, the packed module, the Triton kernel under the interpreter, and a tiny Llama end to end
(quantize, save, reload, generate, dequantize, resume)."""

import copy
import json
import pickle

import pytest
import torch
from conftest import assert_same_predictions, build_tiny_model, small_config
from hf_decoupleq.kernels import interpreting, reference, triton_available
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_decoupleq import DecoupleQConfig, DecoupleQLinear, pipeline
from hf_decoupleq.errors import DecoupleQCheckpointError, DecoupleQConfigError
from hf_decoupleq.hadamard import (
    MAX_BLOCK,
    block_size,
    dense_matrix,
    fwht,
    hadamard_matrix,
    has_transform,
    inverse_transform,
    random_signs,
    transform_hessian,
    transform_input,
    transform_weight,
)
from hf_decoupleq.packing import FORMAT_VERSION, required_format_version
from hf_decoupleq.solver import dequantize, row_losses, solve_layer

F64 = torch.float64
# Relative (Frobenius) error of x V^T in a dtype vs float64: the input's and output's rounding.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------- the transform
@pytest.mark.parametrize(
    "k, b", [(576, 64), (1536, 512), (4096, 4096), (8192, MAX_BLOCK), (11008, 256), (96, 32), (6, 2), (7, 1)]
)
def test_block_size_is_the_largest_power_of_two_dividing_k_capped(k, b):
    assert MAX_BLOCK == 4096
    assert block_size(k) == b
    assert has_transform(k) == (b >= 2)


def test_sylvester_matrix_and_dense_v_are_orthogonal():
    h = hadamard_matrix(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16, dtype=F64))
    assert torch.equal(h[1], torch.tensor([1.0, -1.0] * 8, dtype=F64))  # Sylvester order, not sequency order
    for k in (96, 576):
        v = dense_matrix(random_signs(k, 0, "model.layers.0.mlp.up_proj"))
        torch.testing.assert_close(v @ v.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
        b = block_size(k)
        # Block diagonal: nothing mixes across Hadamard blocks.
        assert v[:b, b:].abs().max() == 0 and v[b:, :b].abs().max() == 0
        assert torch.allclose(v.abs(), torch.block_diag(*[torch.ones(b, b, dtype=F64)] * (k // b)) / b**0.5)


def test_signs_are_seeded_by_seed_and_full_layer_name():
    a = random_signs(576, 0, "model.layers.0.self_attn.q_proj")
    assert a.dtype == torch.int8 and a.shape == (576,)
    assert set(a.tolist()) == {-1, 1}
    assert torch.equal(a, random_signs(576, 0, "model.layers.0.self_attn.q_proj"))
    assert not torch.equal(a, random_signs(576, 0, "model.layers.0.self_attn.k_proj"))
    assert not torch.equal(a, random_signs(576, 1, "model.layers.0.self_attn.q_proj"))
    # Stable across processes and Python versions (crc32, not hash): pinned values.
    assert a[:16].tolist() == [-1, -1, 1, -1, -1, 1, -1, -1, 1, 1, 1, -1, 1, -1, 1, -1]
    assert abs(int(a.sum())) < 100  # balanced


@pytest.mark.parametrize("k", [96, 576, 6, 1536])
def test_fast_transforms_match_dense_float64_references(k):
    g = torch.Generator().manual_seed(k)
    signs = random_signs(k, 3, f"layer{k}")
    v = dense_matrix(signs)
    x = torch.randn(2, 3, k, generator=g, dtype=F64)  # any leading dims
    w = torch.randn(5, k, generator=g, dtype=F64)
    xh = torch.randn(4 * k, k, generator=g, dtype=F64)
    H = xh.T @ xh / xh.shape[0]
    torch.testing.assert_close(transform_input(x, signs), x @ v.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(transform_weight(w, signs), w @ v.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(inverse_transform(x, signs), x @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(transform_hessian(H, signs), v @ H @ v.T, rtol=1e-12, atol=1e-12)
    assert torch.equal(transform_hessian(H, signs), transform_hessian(H, signs).T)
    # The layer's function is preserved: (x V^T)(W V^T)^T == x W^T.
    torch.testing.assert_close(transform_input(x, signs) @ transform_weight(w, signs).T, x @ w.T)
    torch.testing.assert_close(inverse_transform(transform_input(x, signs), signs), x)
    # The unnormalized FWHT is x @ blockdiag(H_b).
    b = block_size(k)
    blocks = torch.block_diag(*[hadamard_matrix(b)] * (k // b))
    torch.testing.assert_close(fwht(x, b), x @ blocks, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_transform_in_low_precision_dtypes(dtype):
    k = 576
    signs = random_signs(k, 0, "x")
    x = torch.randn(7, k).to(dtype)
    y = transform_input(x, signs)
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, x.double() @ dense_matrix(signs).T) < TOL[dtype]
    assert inverse_transform(y, signs).dtype == dtype


@pytest.mark.parametrize(
    "k, b, rows", [(1536, 512, 1), (1536, 512, 300), (256, 256, 7), (128, 64, 5), (8192, 8192, 2), (6, 2, 3)]
)
def test_fwht_kronecker_factors_match_the_block_matrix(k, b, rows):
    """fwht applies H_b as H_m (x) H_n (one matmul for b <= 64, two up to 4096, recursion beyond): it must equal
    x @ blockdiag(H_b), also under inference mode and then with autograd (the cached factors are plain tensors)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g, dtype=F64)
    blocks = torch.block_diag(*[hadamard_matrix(b)] * (k // b))
    with torch.inference_mode():
        torch.testing.assert_close(fwht(x, b), x @ blocks, rtol=0, atol=1e-11)
    x32 = x.float().requires_grad_(True)
    y = fwht(x32, b)
    assert _rel(y, x @ blocks) < 1e-6
    y.sum().backward()
    assert _rel(x32.grad, torch.ones(rows, k, dtype=F64) @ blocks.T) < 1e-6


def test_fwht_rejects_a_block_that_does_not_divide():
    with pytest.raises(DecoupleQConfigError, match="power of two"):
        fwht(torch.zeros(2, 12), 8)
    with pytest.raises(DecoupleQConfigError, match="power of two"):
        fwht(torch.zeros(2, 12), 3)


# ----------------------------------------------------------------------------------------- proxy loss
def test_incoherence_lowers_the_w2_proxy_loss_of_a_layer_with_outlier_columns():
    # A layer whose weight has a few 20x columns (outliers) and correlated inputs with uneven channel scales.
    g = torch.Generator().manual_seed(0)
    n_out, k, n = 64, 256, 2048
    w = torch.randn(n_out, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[:4]] *= 20
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(n, k, generator=g) @ mix) * (0.5 + torch.rand(k, generator=g))
    H = x.double().T @ x.double() / n
    signs = random_signs(k, 0, "outlier_layer")
    kw = {"bits": 2, "group_size": 64, "method": "decoupleq", "rounds": 2}
    plain = solve_layer(w, H, **kw)
    rotated = solve_layer(transform_weight(w, signs), transform_hessian(H, signs), **kw)
    # The comparison is in the original basis: W_hat = (s q + z) V, loss = sum_i (w_i - w_hat_i) H (w_i - w_hat_i)^T.
    v = dense_matrix(signs)
    w_hat = dequantize(rotated.codes, rotated.scales.double(), rotated.zeros.double(), rotated.group_size) @ v
    loss_rot = float(row_losses(w.double() - w_hat, H).sum())
    loss_plain = float(row_losses(w.double() - plain_w_hat(plain), H).sum())
    torch.testing.assert_close(loss_rot, float(rotated.loss.sum()), rtol=1e-6, atol=0)  # basis-independent
    torch.testing.assert_close(loss_plain, float(plain.loss.sum()), rtol=1e-6, atol=0)
    # Measured: 14.64 -> 5.34 (0.36x) on this layer.
    assert loss_rot < 0.6 * loss_plain, (loss_plain, loss_rot)


def plain_w_hat(result):
    return dequantize(result.codes, result.scales.double(), result.zeros.double(), result.group_size)


# ----------------------------------------------------------------------------------------- the packed module
def _packed(k=96, n=40, bits=2, g=32, dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    ng = -(-k // g)
    scales = (torch.rand(n, ng, generator=gen) + 0.5) / 2**bits
    zeros = -0.5 * scales * (2**bits - 1)

    class Result:
        pass

    r = Result()
    r.codes, r.scales, r.zeros, r.bits, r.group_size = codes, scales, zeros, bits, g
    signs = random_signs(k, seed, "layer")
    module = DecoupleQLinear.from_linear(linear, r, dtype=dtype, hadamard_signs=signs)
    w_rot = dequantize(codes.double(), scales.double(), zeros.double(), g)  # the stored weight, rotated basis
    return module, w_rot, signs, linear


def test_packed_module_rotates_inputs_and_dequantizes_to_the_original_basis(monkeypatch):
    monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", "torch")
    module, w_rot, signs, linear = _packed()
    assert module.hadamard_signs.dtype == torch.int8 and torch.equal(module.hadamard_signs, signs)
    assert "hadamard_signs" in module.state_dict()
    v = dense_matrix(signs)
    w_orig = w_rot @ v  # W_hat V
    torch.testing.assert_close(module.dequantize_weight().double(), w_orig, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 5, 96)
    ref = x.double() @ w_orig.T + linear.bias.double()
    for rows in (x[:, :1], x):  # few rows (grouped path) and more than 16 rows (dense path)
        y = module(rows)
        assert y.shape == (*rows.shape[:-1], 40)
        assert _rel(y, rows.double() @ w_orig.T + linear.bias.double()) < 1e-5
    assert _rel(module(x), ref) < 1e-5
    # Without the rotation the module would compute something else entirely.
    assert _rel(x.double() @ w_rot.T + linear.bias.double(), ref) > 0.1


def test_packed_module_bfloat16_cpu_int4_path(monkeypatch):
    monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", "torch")
    module, w_rot, signs, _ = _packed(k=128, n=32, g=64, dtype=torch.bfloat16, bias=False)
    module.post_init()
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    ref = x.double() @ (w_rot @ dense_matrix(signs)).T
    assert _rel(module(x), ref) < 3e-2


def test_gradients_flow_through_the_rotation(monkeypatch):
    monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", "torch")
    module, _, signs, linear = _packed()
    module.scales.requires_grad_(True)
    x = torch.randn(6, 96, requires_grad=True)
    gy = torch.randn(6, 40)
    (module(x) * gy).sum().backward()
    # float64 autograd through the dense V: y = (x V^T) W_rot^T
    s64 = module.scales.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    codes = module._codes().double()
    idx = torch.arange(96) // 32
    w64 = s64[idx].T * codes + module.zeros.double()[idx].T
    (((x64 @ dense_matrix(signs).T) @ w64.T + linear.bias.double()) * gy.double()).sum().backward()
    assert _rel(module.scales.grad, s64.grad) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("rows", [8, 100])  # fewer rows than out_features (input rotated) / more (weight rotated)
def test_fake_quant_linear_paths_agree_with_the_dense_rotation(rows):
    """The solver's FakeQuantLinear folds V into the weight (W_hat V) where that is cheaper: without autograd
    always, with autograd when there are more activation rows than weight rows. Every path must compute
    (x V^T) W_hat^T with the same gradients as float64 autograd through the dense V."""
    from hf_decoupleq.solver.blockwise import FakeQuantLinear

    torch.manual_seed(3)
    k, n, g = 96, 40, 32
    codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // g) * 0.1 + 0.01, torch.randn(n, k // g) * 0.1
    signs = random_signs(k, 0, "fq")
    fq = FakeQuantLinear(codes, scales, zeros, g, 2, bias=torch.randn(n), hadamard_signs=signs)
    x = torch.randn(rows, k)
    gy = torch.randn(rows, n)
    s64 = scales.double().requires_grad_(True)
    z64 = zeros.double().requires_grad_(True)
    idx = torch.arange(k) // g
    w64 = s64[:, idx] * codes.double() + z64[:, idx]
    ref = (x.double() @ dense_matrix(signs).T) @ w64.T + fq.bias.detach().double()
    (ref * gy.double()).sum().backward()
    with torch.no_grad():
        assert _rel(fq(x), ref) < 1e-5
    y = fq(x)
    assert _rel(y, ref) < 1e-5
    (y * gy).sum().backward()
    assert _rel(fq.scales.grad, s64.grad) < 1e-5 and _rel(fq.zeros.grad, z64.grad) < 1e-5
    torch.testing.assert_close(fq.effective_weight().double(), w64.detach() @ dense_matrix(signs), rtol=1e-5, atol=1e-6)


def test_packed_module_checks_its_signs():
    with pytest.raises(DecoupleQConfigError, match="even in_features"):
        DecoupleQLinear(63, 8, bits=2, group_size=16, incoherence=True)
    module, *_ = _packed()
    module.post_init()
    with torch.no_grad():
        module.hadamard_signs[3] = 0
    with pytest.raises(DecoupleQConfigError, match=r"\+1 and -1"):
        module.post_init()
    plain = DecoupleQLinear(96, 8, bits=2, group_size=32)
    assert plain.hadamard_signs is None and "hadamard_signs" not in plain.state_dict()


# ----------------------------------------------------------------------------------------- Triton kernel
needs_triton = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and not interpreting()),
    reason="needs triton on CUDA or under TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize(
    "k, m, dtype",
    [(96, 5, torch.float32), (576, 3, torch.bfloat16), (48, 19, torch.float16), (8192, 2, torch.float32)],
)
def test_triton_hadamard_matches_torch(k, m, dtype, monkeypatch):
    from hf_decoupleq.kernels.hadamard import hadamard_transform

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # unwritten outputs show up as NaN
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    signs = random_signs(k, 0, f"k{k}").to(DEVICE)
    wide = torch.randn(m, 2 * k).to(DEVICE, dtype)
    for x in (wide[:, :k].contiguous(), wide[:, ::2]):  # contiguous and strided along K
        monkeypatch.setattr(torch, "empty", poisoned_empty)
        y = hadamard_transform(x, signs)
        y_op = torch.ops.hf_decoupleq.hadamard(x, signs)
        monkeypatch.setattr(torch, "empty", real_empty)
        assert y.dtype == dtype and y.shape == (m, k) and torch.isfinite(y).all()
        assert torch.equal(y, y_op)
        ref64 = x.double() @ dense_matrix(signs.cpu()).to(DEVICE).T
        assert _rel(y, ref64) < TOL[dtype]
        assert _rel(y, reference.hadamard(x, signs)) < TOL[dtype]
    with pytest.raises(DecoupleQConfigError, match="odd"):
        hadamard_transform(torch.zeros(2, 7, device=DEVICE), torch.ones(7, dtype=torch.int8, device=DEVICE))
    with pytest.raises(DecoupleQConfigError, match="signs must be"):
        hadamard_transform(torch.zeros(2, 8, device=DEVICE), torch.ones(4, dtype=torch.int8, device=DEVICE))


@needs_triton
def test_packed_module_triton_backend_matches_torch_backend(monkeypatch):
    module, w_rot, signs, linear = _packed(k=96, n=40, dtype=torch.float16)
    module = module.to(DEVICE)
    x = torch.randn(3, 96).to(DEVICE, torch.float16)
    monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", "triton")
    y_triton = module(x)
    w_triton = module.dequantize_weight()
    monkeypatch.setenv("HF_DECOUPLEQ_BACKEND", "torch")
    ref = x.double() @ (w_rot.to(DEVICE) @ dense_matrix(signs).to(DEVICE)).T + linear.bias.to(DEVICE).double()
    assert _rel(y_triton, ref) < 3e-3
    assert _rel(module(x), ref) < 3e-3
    assert _rel(w_triton, module.dequantize_weight()) < 2e-3  # fp16 weights, one rounding apart


# ----------------------------------------------------------------------------------------- pipeline
CPU = torch.device("cpu")


def _first_block_inputs(model, num=6, seq=24, batch_size=2):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (num, seq), generator=g)
    _, blocks = pipeline.find_decoder_blocks(model)
    return blocks, pipeline.capture_block_inputs(model, blocks[0], windows, batch_size)


@pytest.mark.parametrize("blockwise", [False, True])
def test_quantize_block_rotates_every_linear_and_keeps_the_fast_paths_exact(blockwise):
    model = build_tiny_model("llama")
    blocks, inputs = _first_block_inputs(model)
    block = blocks[0]
    fp_block = copy.deepcopy(block)
    cfg = DecoupleQConfig(
        bits=2,
        group_size=16,
        rounds=1,
        dataset="self",
        incoherence=True,
        blockwise=blockwise,
        blockwise_epochs=1,
        blockwise_lr=1e-4,
        seed=5,
    )
    replay = pipeline.ChildReplay(block, [], 0)
    pipeline.quantize_block(block, inputs, cfg, block_name="m.0", block_index=0, skip=[], device=CPU, replay=replay)
    packed = {n: m for n, m in block.named_modules() if isinstance(m, DecoupleQLinear)}
    assert len(packed) == 7
    # One rotation per input (format 3): q/k/v share the signs drawn for q_proj, gate/up those of gate_proj; o_proj
    # and down_proj read tensors of their own.
    first_reader = {
        "self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"
    }  # fmt: skip
    for name, module in packed.items():
        key = f"m.0.{first_reader.get(name, name)}"
        assert torch.equal(module.hadamard_signs, random_signs(module.in_features, 5, key)), name
    assert not torch.equal(packed["self_attn.q_proj"].hadamard_signs, packed["self_attn.o_proj"].hadamard_signs)
    # The packed tensors and the fake-quant layers used while solving agree exactly, signs included, so the
    # replayed / reused outputs are valid (without blockwise training the recorded attention outputs are replayed).
    if blockwise:
        assert replay.final_outputs is not None
    else:
        assert replay.final_forward_ok
    fast = pipeline.forward_quantized_block(block, inputs, CPU, replay=replay)
    slow = pipeline.forward_quantized_block(block, inputs, CPU)  # no replay: dense fake-quant copies of the packs
    direct = pipeline._forward_all(block, inputs, CPU)  # the DecoupleQLinear modules themselves
    target = pipeline._forward_all(fp_block, inputs, CPU)
    for a, b, c, t, h in zip(fast, slow, direct, target, inputs.hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5)
        # What the block adds to the residual stream approximates the fp block's at 2 bits (measured ~0.25-0.3,
        # the same as without incoherence); with the rotation left out of the forward it is ~1.6.
        assert _rel(c - h, t - h) < 0.6


def test_plain_and_incoherent_results_write_their_format_versions():
    assert FORMAT_VERSION == 3
    assert required_format_version(False) == 1 and required_format_version(True) == 3
    for incoherence, version in ((False, 1), (True, 3)):
        model = build_tiny_model("llama")
        cfg = DecoupleQConfig(
            bits=2,
            group_size=32,
            rounds=0,
            dataset=torch.randint(0, 128, (2, 16)),
            num_samples=2,
            seq_len=16,
            blockwise=False,
            incoherence=incoherence,
        )
        assert cfg.format_version == FORMAT_VERSION
        pipeline.quantize_model(model, cfg)
        assert cfg.format_version == version
        has_signs = [m.hadamard_signs is not None for m in model.modules() if isinstance(m, DecoupleQLinear)]
        assert has_signs and all(h == incoherence for h in has_signs)


# ----------------------------------------------------------------------------------------- end to end
def quantize(path, **overrides):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=small_config(**{"incoherence": True, **overrides}), dtype=torch.float32
    )


@pytest.fixture(scope="module")
def incoherent_llama(tiny_checkpoint):
    return quantize(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def saved_incoherent(incoherent_llama, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("incoherent")
    incoherent_llama.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def test_quantize_save_reload_generate_with_incoherence(incoherent_llama, saved_incoherent, tiny_tokenizer):
    model, out = incoherent_llama, saved_incoherent
    packed = {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}
    assert len(packed) == 14 and all(m.hadamard_signs is not None for m in packed.values())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["incoherence"] is True and cfg["format_version"] == 3
    saved = load_file(out / "model.safetensors")
    assert {k for k in saved if k.endswith(".hadamard_signs")} == {f"{n}.hadamard_signs" for n in packed}
    assert all(saved[f"{n}.hadamard_signs"].dtype == torch.int8 for n in packed)

    # transformers' load report: nothing missing, unexpected or mismatched.
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not any(info.values()), info
    state = reloaded.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert_same_predictions(model, reloaded, tiny_tokenizer)


def test_layers_that_read_one_input_rotate_it_once(saved_incoherent, tiny_tokenizer, monkeypatch):
    from hf_decoupleq.nn import linear as linear_module

    model = AutoModelForCausalLM.from_pretrained(saved_incoherent)
    ids = tiny_tokenizer("the game was released in", return_tensors="pt").input_ids
    calls = []
    real = linear_module.transform_input

    def counting(x, signs):
        calls.append(signs)
        return real(x, signs)

    monkeypatch.setattr(linear_module, "transform_input", counting)
    with torch.no_grad():
        shared = model(ids).logits
    # Two blocks, four inputs each (q/k/v, o, gate/up, down): four rotations per block instead of seven.
    assert len(calls) == 8
    for module in model.modules():
        if isinstance(module, DecoupleQLinear):
            module._shared_rotation = None
    calls.clear()
    with torch.no_grad():
        unshared = model(ids).logits
    assert len(calls) == 14
    assert torch.equal(shared, unshared)


def test_shared_rotation_is_keyed_by_the_input_and_the_signs():
    from hf_decoupleq.nn.linear import share_rotations

    a, _, signs_a, _ = _packed(seed=1)
    b, _, _, _ = _packed(seed=2)
    b.hadamard_signs.copy_(signs_a)  # same signs as a: grouped with it
    c, _, _, _ = _packed(seed=3)  # other signs: never grouped
    parent = torch.nn.ModuleDict({"a": a, "b": b, "c": c})
    assert share_rotations(parent) == 1
    assert a._shared_rotation is b._shared_rotation and c._shared_rotation is None
    x, y = torch.randn(5, 96), torch.randn(5, 96)
    with torch.no_grad():
        got = [a(x), b(y), b(x), a(y), c(x)]  # b's first input differs from a's: no reuse across inputs
        x.mul_(2)  # an in-place change of the cached input invalidates it
        got += [a(x), b(x)]
    for module in (a, b, c):
        module._shared_rotation = None
    with torch.no_grad():
        x.div_(2)
        want = [a(x), b(y), b(x), a(y), c(x)]
        want += [a(2 * x), b(2 * x)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # Copies and pickles start with an empty cache and keep the grouping.
    share_rotations(parent)
    with torch.no_grad():
        a(x)  # leaves a cached rotation behind, which a copy must not carry
    clone = copy.deepcopy(parent)
    assert clone["a"]._shared_rotation is clone["b"]._shared_rotation is not None
    assert clone["a"]._shared_rotation._value is None and parent["a"]._shared_rotation._value is not None
    pickle.loads(pickle.dumps(parent))


def test_format_2_checkpoints_with_per_layer_signs_still_load(saved_incoherent, tiny_tokenizer, tmp_path):
    # Format 2 wrote one set of signs per layer; give k_proj and up_proj signs of their own (rotating their stored
    # weights to match), mark the checkpoint version 2, and it must load and compute the dequantized model.
    def per_layer(tensors):
        for key in [k for k in tensors if k.endswith(("k_proj.hadamard_signs", "up_proj.hadamard_signs"))]:
            tensors[key] = random_signs(tensors[key].shape[0], 0, key)
        return tensors

    old = tmp_path / "v2"
    old.mkdir()
    _copy_checkpoint(saved_incoherent, old, edit_config=lambda q: q.update(format_version=2), edit_tensors=per_layer)
    model = AutoModelForCausalLM.from_pretrained(old)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}
    k, q = packed["model.layers.0.self_attn.k_proj"], packed["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(k.hadamard_signs, q.hadamard_signs)
    assert k._shared_rotation is None or k._shared_rotation is not q._shared_rotation
    ids = tiny_tokenizer("in the first season of the series", return_tensors="pt").input_ids
    plain = copy.deepcopy(model)
    plain.dequantize()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_dequantized_model_computes_what_the_incoherent_model_computes(incoherent_llama, tiny_tokenizer):
    ids = tiny_tokenizer("in the first season of the series", return_tensors="pt").input_ids
    plain = copy.deepcopy(incoherent_llama)
    plain.dequantize()
    assert not [m for m in plain.modules() if isinstance(m, DecoupleQLinear)]
    with torch.no_grad():
        logits_q, logits_p = incoherent_llama(ids).logits, plain(ids).logits
    torch.testing.assert_close(logits_q, logits_p, rtol=1e-4, atol=1e-4)


def _copy_checkpoint(src, dst, edit_config=None, edit_tensors=None):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        save_file(edit_tensors(tensors), dst / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_and_config_that_disagree_about_incoherence_are_refused(saved_incoherent, tmp_path):
    # Signs in the checkpoint, but the config says no incoherence: the layers would ignore the rotation.
    a = tmp_path / "a"
    a.mkdir()
    _copy_checkpoint(saved_incoherent, a, edit_config=lambda q: q.update(incoherence=False, format_version=1))
    with pytest.raises(DecoupleQCheckpointError, match="incoherence signs"):
        AutoModelForCausalLM.from_pretrained(a)
    # A version-1 checkpoint with incoherence=True predates the feature (weights in the original basis): it has
    # no signs, so these signs have no layer to go to either.
    b = tmp_path / "b"
    b.mkdir()
    _copy_checkpoint(saved_incoherent, b, edit_config=lambda q: q.update(format_version=1))
    with pytest.raises(DecoupleQCheckpointError, match="incoherence signs"):
        AutoModelForCausalLM.from_pretrained(b)
    # The config says incoherence, but the checkpoint lost its signs.
    c = tmp_path / "c"
    c.mkdir()
    _copy_checkpoint(
        saved_incoherent, c, edit_tensors=lambda t: {k: v for k, v in t.items() if not k.endswith("hadamard_signs")}
    )
    with pytest.raises(DecoupleQCheckpointError, match="no incoherence signs"):
        AutoModelForCausalLM.from_pretrained(c)


def test_hadamard_custom_op_has_a_fake_implementation():
    signs = random_signs(96, 0, "x")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fs = mode.from_tensor(torch.randn(7, 96, dtype=torch.float16)), mode.from_tensor(signs)
        out = torch.ops.hf_decoupleq.hadamard(fx, fs)
        assert out.shape == (7, 96) and out.dtype == torch.float16
        with pytest.raises(DecoupleQConfigError, match=r"x must be \[M, 96\]"):
            torch.ops.hf_decoupleq.hadamard(mode.from_tensor(torch.randn(7, 48)), fs)
