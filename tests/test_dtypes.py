"""Dtypes end to end: quantize on load in bfloat16, reload in bfloat16 and float32, and a model whose layers differ
in dtype keeps each layer's dtype (tiny random Llama, CPU)."""

import copy

import pytest
import torch
from conftest import small_config
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQLinear


def packed(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}


def dequantized(model, dtype):
    plain = copy.deepcopy(model)
    plain.dequantize()
    assert not packed(plain)
    return plain.to(dtype)


IDS = torch.arange(3, 23).unsqueeze(0)


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"), quantization_config=small_config(), dtype=torch.bfloat16
    )
    out = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(out)
    return model, out


def test_bfloat16_quantize_on_load_computes_the_dequantized_model(bf16_model):
    model, _ = bf16_model
    layers = packed(model)
    assert len(layers) == 2 * 7
    assert all(m.scales.dtype == m.zeros.dtype == torch.bfloat16 for m in layers.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        got = model(IDS).logits
        ref = dequantized(model, torch.bfloat16)(IDS).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # Same weights, bf16 arithmetic in different orders (fused int4 kernel vs dense GEMM): bf16-level agreement.
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.05)


def test_bfloat16_checkpoint_reloads_in_bfloat16_bit_exact(bf16_model):
    model, out = bf16_model
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_bfloat16_checkpoint_reloads_in_float32(bf16_model):
    model, out = bf16_model
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    for name, module in packed(reloaded).items():
        source = model.get_submodule(name)
        assert module.scales.dtype == torch.float32
        assert torch.equal(module.qweight, source.qweight)
        assert torch.equal(module.scales, source.scales.float()) and torch.equal(module.zeros, source.zeros.float())
    # Reference: a plain float32 model holding the checkpoint's dequantized weights (scale * q + zero in float32).
    with torch.no_grad():
        got = reloaded(IDS).logits
        ref = dequantized(reloaded, torch.float32)(IDS).logits
        in_bf16 = model(IDS).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # And the bf16 model computes the same function to bf16 precision.
    torch.testing.assert_close(got, in_bf16.float(), rtol=0.05, atol=0.05)


class CastingLinear(nn.Linear):
    """A linear that computes in its own dtype (as models with float32 layers in a bf16 model do)."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class LlamaWithFloat32Down(LlamaForCausalLM):
    """transformers keeps `_keep_in_fp32_modules_strict` in float32 under a bf16 load: a model of mixed dtypes."""

    _keep_in_fp32_modules_strict = ("down_proj",)

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            old = layer.mlp.down_proj
            layer.mlp.down_proj = CastingLinear(old.in_features, old.out_features, bias=False)
        self.post_init()


def test_mixed_dtypes_survive_quantize_save_and_reload(tiny_checkpoint, tmp_path):
    model = LlamaWithFloat32Down.from_pretrained(
        tiny_checkpoint("llama"), quantization_config=small_config(blockwise=False), dtype=torch.bfloat16
    )
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    # The float32 layers are precision-sensitive by the model's own declaration: kept in full precision.
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in down)
    assert not set(down) & set(packed(model))
    assert len(packed(model)) == 2 * 6
    model.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, "auto"):
        reloaded, info = LlamaWithFloat32Down.from_pretrained(tmp_path, dtype=dtype, output_loading_info=True)
        assert not any(info.values()), info
        state = reloaded.state_dict()
        for key, value in model.state_dict().items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (dtype, key)
        with torch.no_grad():
            assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
