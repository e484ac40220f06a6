"""Block-wise stage: FakeQuantLinear and refine_block on a tiny random Llama decoder layer."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.solver import BlockwiseResult, FakeQuantLinear, HessianAccumulator, refine_block, solve_layer


def _quantized_result(out_f=6, in_f=20, g=8, bits=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(in_f, 64, generator=gen, dtype=torch.float64)
    return w, solve_layer(w, x @ x.T / 64, bits=bits, group_size=g)


def test_fake_quant_linear_matches_result_and_formula():
    _, q = _quantized_result()
    bias = torch.randn(6)
    mod = FakeQuantLinear.from_result(q, bias=bias)
    torch.testing.assert_close(mod.dequantize(), q.dequantize(), rtol=0, atol=0)
    # The documented formula, column by column: W_hat[i, k] = s[i, k // g] * q[i, k] + z[i, k // g].
    ref = torch.stack([q.scales[:, c // 8] * q.codes[:, c].float() + q.zeros[:, c // 8] for c in range(20)], 1)
    torch.testing.assert_close(mod.dequantize(), ref)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    torch.testing.assert_close(mod(x), x @ ref.double().T + bias.double(), rtol=1e-5, atol=1e-6)
    assert mod.bias.requires_grad is False and mod.codes.dtype == torch.uint8
    assert set(mod.state_dict()) == {"codes", "scales", "zeros", "bias"}  # nothing derived is saved


def test_integer_zero_layer_trains_scales_with_its_zero_codes_kept():
    """A layer solved with integer_zero computes with zeros ``-scales * z_int``: the scale's gradient is the float64
    one of that formula, and after a training step the zeros are still the same integers times the new scales."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=gen)
    x = torch.randn(20, 64, generator=gen, dtype=torch.float64)
    q = solve_layer(w, x @ x.T / 64, bits=3, group_size=8, integer_zero=True)
    assert q.integer_zero
    z_int = -q.zeros.double() / q.scales.double()
    torch.testing.assert_close(z_int, z_int.round(), rtol=0, atol=1e-5)
    mod = FakeQuantLinear.from_result(q)
    assert "integer_zero=True" in repr(mod)
    inputs, target = torch.randn(5, 20, generator=gen), torch.randn(5, 6, generator=gen)
    F.mse_loss(mod(inputs), target).backward()
    # Reference: W = s (q - z_int) groupwise, in float64 autograd.
    s = q.scales.double().clone().requires_grad_(True)
    zi = z_int.round()
    ref_w = torch.stack([s[:, c // 8] * (q.codes[:, c].double() - zi[:, c // 8]) for c in range(20)], 1)
    F.mse_loss(inputs.double() @ ref_w.T, target.double()).backward()
    torch.testing.assert_close(mod.scales.grad.double(), s.grad, rtol=1e-4, atol=1e-7)
    assert mod.zeros.grad is None or float(mod.zeros.grad.abs().max()) == 0.0
    with torch.no_grad():
        mod.scales.mul_(1.1)
    mod.snap_()
    out = mod.to_result()
    assert out.integer_zero
    torch.testing.assert_close(-out.zeros.double() / out.scales.double(), zi, rtol=0, atol=1e-5)
    with pytest.raises(DecoupleQConfigError, match="zero_codes"):
        FakeQuantLinear(q.codes, q.scales, q.zeros, 8, 3, symmetric=True, zero_codes=zi.to(torch.uint8))


def test_fake_quant_linear_gradients_and_to_result():
    _, q = _quantized_result()
    mod = FakeQuantLinear.from_result(q)
    x = torch.randn(4, 20)
    target = torch.randn(4, 6)
    loss = F.mse_loss(mod(x), target)
    loss.backward()
    # Analytic gradient of the MSE wrt W_hat, pushed to the groups: dL/ds = sum_k dL/dW * q, dL/dz = sum_k dL/dW.
    with torch.no_grad():
        gw = 2.0 / target.numel() * (x @ q.dequantize().T - target).T @ x
        gs = torch.stack([(gw[:, c : c + 8] * q.codes[:, c : c + 8].float()).sum(1) for c in range(0, 20, 8)], 1)
        gz = torch.stack([gw[:, c : c + 8].sum(1) for c in range(0, 20, 8)], 1)
    torch.testing.assert_close(mod.scales.grad, gs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.zeros.grad, gz, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        mod.scales.mul_(1.1)
    r = mod.to_result()
    assert torch.equal(r.codes, q.codes) and torch.equal(r.loss, q.loss)
    torch.testing.assert_close(r.scales, q.scales * 1.1)
    torch.testing.assert_close(r.dequantize(), mod.dequantize().detach())


def test_fake_quant_linear_rejects_bad_shapes():
    _, q = _quantized_result()
    with pytest.raises(DecoupleQConfigError, match="scales has shape"):
        FakeQuantLinear(q.codes, q.scales[:, :2], q.zeros, 8, 2)
    with pytest.raises(DecoupleQConfigError, match="outside"):
        FakeQuantLinear(q.codes * 0 + 7, q.scales, q.zeros, 8, 2)


# ------------------------------------------------------------------------------------------ tiny Llama layer
@pytest.fixture(scope="module")
def llama_parts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=0).float().eval()
    with torch.no_grad():  # norms at 1 would be a trivial start; make them non-uniform like trained ones
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    rotary = LlamaRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(1)
    seq = 16
    inputs = [torch.randn(2, seq, 64, generator=gen) for _ in range(4)]
    pos = torch.arange(seq)[None].expand(2, seq)
    cos_sin = rotary(inputs[0], pos)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(2, 1, seq, seq)
    kwargs = {"position_embeddings": cos_sin, "attention_mask": mask, "position_ids": pos}
    with torch.no_grad():
        targets = [layer(x, **kwargs) for x in inputs]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    return layer, inputs, targets, kwargs


def _quantize_layer(layer, inputs, kwargs, bits=2, g=32):
    """Swap every nn.Linear for a FakeQuantLinear solved against its real H (from hooks on the fp layer)."""
    qlayer = copy.deepcopy(layer)
    linears = {n: m for n, m in qlayer.named_modules() if isinstance(m, nn.Linear)}
    accs = {n: HessianAccumulator(m.in_features, name=n) for n, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: accs[n].add(a[0])) for n, m in linears.items()]
    with torch.no_grad():
        for x in inputs:
            qlayer(x, **kwargs)
    for hk in hooks:
        hk.remove()
    for n, m in linears.items():
        res = solve_layer(m.weight.data, accs[n].hessian(), bits=bits, group_size=g, name=n)
        parent = qlayer.get_submodule(n.rsplit(".", 1)[0])
        setattr(parent, n.rsplit(".", 1)[1], FakeQuantLinear.from_result(res, bias=m.bias))
    return qlayer


def _mse(block, inputs, targets, kwargs):
    with torch.no_grad():
        outs = [block(x, **kwargs) for x in inputs]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return sum(float(F.mse_loss(o, t)) for o, t in zip(outs, targets)) / len(outs)


def test_refine_block_lowers_output_error_and_keeps_codes(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    fq = {n: m for n, m in qlayer.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fq) == 7
    codes_before = {n: m.codes.clone() for n, m in fq.items()}
    scales_before = {n: m.scales.detach().clone() for n, m in fq.items()}
    flags_before = {n: p.requires_grad for n, p in qlayer.named_parameters()}
    before = _mse(qlayer, inputs, targets, kwargs)
    with torch.no_grad():  # callers may well be in no_grad
        res = refine_block(qlayer, inputs, targets, kwargs, lr=1e-3, epochs=6, seed=0)
    after = _mse(qlayer, inputs, targets, kwargs)
    assert isinstance(res, BlockwiseResult) and len(res.epoch_losses) == 6 and not res.restored
    assert math.isclose(res.initial_loss, before, rel_tol=1e-5)
    assert math.isclose(res.final_loss, after, rel_tol=1e-5)
    assert after < 0.9 * before
    for n, m in fq.items():
        assert torch.equal(m.codes, codes_before[n])
    assert any(not torch.equal(m.scales, scales_before[n]) for n, m in fq.items())
    assert not torch.equal(qlayer.input_layernorm.weight, layer.input_layernorm.weight)  # norms trained
    assert {n: p.requires_grad for n, p in qlayer.named_parameters()} == flags_before


def test_refine_block_returns_the_trained_blocks_outputs(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    res = refine_block(qlayer, inputs, targets, kwargs, lr=1e-3, epochs=2, seed=0, return_outputs=True)
    assert not res.restored and res.outputs is not None and len(res.outputs) == len(inputs)
    with torch.no_grad():
        for x, out in zip(inputs, res.outputs):
            ref = qlayer(x, **kwargs)
            assert torch.equal(out, ref[0] if isinstance(ref, tuple) else ref)
    # Restored (training made it worse): no outputs, the caller must recompute them.
    worse = refine_block(qlayer, inputs, targets, kwargs, lr=10.0, epochs=1, return_outputs=True)
    assert worse.restored and worse.outputs is None


def test_refine_block_is_deterministic_and_respects_flags(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    a, b = copy.deepcopy(qlayer), copy.deepcopy(qlayer)
    per_batch = [kwargs] * len(inputs)  # a sequence of per-batch dicts works too
    ra = refine_block(a, inputs, targets, kwargs, lr=1e-3, epochs=2, seed=3, train_norms=False)
    rb = refine_block(b, inputs, targets, per_batch, lr=1e-3, epochs=2, seed=3, train_norms=False)
    assert ra == rb
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert torch.equal(a.input_layernorm.weight, qlayer.input_layernorm.weight)  # train_norms=False


def test_refine_block_never_returns_worse(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    saved = {n: p.detach().clone() for n, p in qlayer.named_parameters()}
    res = refine_block(qlayer, inputs, targets, kwargs, lr=10.0, epochs=1)  # a step size that must overshoot
    assert res.restored and res.final_loss == res.initial_loss
    for n, p in qlayer.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert math.isclose(_mse(qlayer, inputs, targets, kwargs), res.initial_loss, rel_tol=1e-6)


def test_refine_block_validates_arguments(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    with pytest.raises(DecoupleQConfigError, match="targets"):
        refine_block(layer, inputs, targets[:2], kwargs)
    with pytest.raises(DecoupleQConfigError, match="forward_kwargs"):
        refine_block(layer, inputs, targets, [kwargs])


def test_signsgd_first_step_moves_each_parameter_by_lr_times_its_unit(llama_parts):
    # One step (epochs=1, one batch): every trained parameter moves by exactly lr * unit against its gradient's
    # sign, with unit = |initial scale of the group| for scales and zeros, |initial value| for norm weights.
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    probe = copy.deepcopy(qlayer)
    x, t = inputs[0], targets[0]
    out = probe(x, **kwargs)
    F.mse_loss(out[0] if isinstance(out, tuple) else out, t).backward()
    grads = {n: p.grad.clone() for n, p in probe.named_parameters() if p.grad is not None}
    before = {n: p.detach().clone() for n, p in qlayer.named_parameters()}
    lr = 0.01
    refine_block(qlayer, inputs[:1], targets[:1], kwargs, lr=lr, epochs=1, optimizer="signsgd")
    after = dict(qlayer.named_parameters())
    checked = 0
    for name, grad in grads.items():
        if name.endswith((".scales", ".zeros")):
            unit = before[name.rsplit(".", 1)[0] + ".scales"].abs()
        elif "norm" in name:
            unit = before[name].abs()
        else:
            continue
        expected = before[name] - lr * unit * grad.sign()
        if not torch.equal(after[name].detach(), before[name]):  # training kept (not restored)
            torch.testing.assert_close(after[name].detach(), expected, rtol=1e-6, atol=1e-9)
            checked += 1
    assert checked > 0


def test_signsgd_lowers_output_error_keeps_codes_and_rejects_bad_options(llama_parts):
    layer, inputs, targets, kwargs = llama_parts
    qlayer = _quantize_layer(layer, inputs, kwargs)
    fq = {n: m for n, m in qlayer.named_modules() if isinstance(m, FakeQuantLinear)}
    codes_before = {n: m.codes.clone() for n, m in fq.items()}
    before = _mse(qlayer, inputs, targets, kwargs)
    res = refine_block(qlayer, inputs, targets, kwargs, lr=5e-3, epochs=6, seed=0, optimizer="signsgd")
    after = _mse(qlayer, inputs, targets, kwargs)
    assert not res.restored and math.isclose(res.final_loss, after, rel_tol=1e-5)
    assert after < 0.9 * before
    assert all(torch.equal(m.codes, codes_before[n]) for n, m in fq.items())
    with pytest.raises(DecoupleQConfigError, match="optimizer='sgd'"):
        refine_block(qlayer, inputs, targets, kwargs, optimizer="sgd")
    with pytest.raises(DecoupleQConfigError, match="weight_decay"):
        refine_block(qlayer, inputs, targets, kwargs, optimizer="signsgd", weight_decay=0.1)
