"""Mixture-of-experts layouts. transformers 5 builds Mixtral and Qwen3-MoE experts as fused 3-D parameters, which
hf-decoupleq does not quantize: loading with a DecoupleQConfig refuses them with a message, before any weight is
read, unless they are kept in full precision on purpose; routers are never quantized (tiny random models, CPU)."""

import pytest
import torch
import transformers
from conftest import assert_reloads_identically
from transformers import AutoModelForCausalLM

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear, pipeline
from hf_decoupleq.errors import UnsupportedModelError
from hf_decoupleq.integration import find_linears

COMMON = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_moe(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **COMMON)
        return transformers.MixtralForCausalLM(cfg).eval()
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2, head_dim=16, **COMMON)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()
    raise ValueError(family)  # pragma: no cover


def ids(model, num=4, seq=16, seed=0):
    return torch.randint(0, model.config.vocab_size, (num, seq), generator=torch.Generator().manual_seed(seed))


def config(data, **kw):
    return DecoupleQConfig(bits=4, group_size=16, rounds=1, blockwise=False, dataset=data, num_samples=4, seq_len=16,
                           **kw)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def saved_moe(request, tmp_path_factory):
    model = tiny_moe(request.param)
    # The layout this test is about: fused expert weights, no nn.Linear per expert.
    fused = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert fused and all(".mlp.experts." in n for n in fused)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def test_fused_experts_are_refused_at_load_with_a_message(saved_moe, monkeypatch):
    model, path = saved_moe
    calibrated = []
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, **k: calibrated.append(1))
    with pytest.raises(UnsupportedModelError, match=r"fused 3-D.*mlp\.experts\..*modules_to_not_convert=\['experts'\]"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=config(ids(model)), dtype=torch.float32)
    assert not calibrated  # refused before calibrating anything


def test_quantize_model_refuses_fused_experts_too(saved_moe):
    model, _ = saved_moe
    with pytest.raises(UnsupportedModelError, match="fused 3-D"):
        pipeline.quantize_model(model, config(ids(model)))


def test_experts_kept_on_purpose_the_rest_quantizes_saves_and_reloads(saved_moe, tmp_path):
    model, path = saved_moe
    cfg = config(ids(model), modules_to_not_convert=["experts"])
    quantized = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
    packed = {n for n, m in quantized.named_modules() if isinstance(m, DecoupleQLinear)}
    # Attention is packed; the router and the experts are not.
    assert packed == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    for i in range(2):
        mlp = quantized.model.layers[i].mlp
        assert torch.equal(mlp.experts.gate_up_proj, model.model.layers[i].mlp.experts.gate_up_proj)
        assert torch.equal(mlp.gate.weight, model.model.layers[i].mlp.gate.weight)
    assert assert_reloads_identically(quantized, tmp_path, ids(model, num=1, seq=12, seed=1)) == packed


def test_router_linears_are_never_quantized():
    # Some MoE layers route with a plain nn.Linear (`gate`, `shared_expert_gate`): never a quantization target.
    class Experts(torch.nn.Module):
        pass

    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4)
            self.shared_expert_gate = torch.nn.Linear(8, 1)
            self.shared_expert = torch.nn.Sequential(torch.nn.Linear(8, 8))
            self.experts = Experts()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Moe()
            self.gate = torch.nn.Linear(8, 8)  # not in an MoE layer: an ordinary linear

    assert set(find_linears(Block())) == {"mlp.shared_expert.0", "gate"}
