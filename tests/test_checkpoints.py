"""Saved checkpoints rebuild exactly what was packed, refuse what their config does not explain, and copies of a
quantized model save themselves (tiny random models, CPU)."""

import copy
import json
import pickle

import pytest
import torch
from conftest import build_tiny_model, small_config
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQLinear
from hf_decoupleq.errors import DecoupleQCheckpointError


def packed_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}


class LlamaWithIdleLinear(LlamaForCausalLM):
    """A Llama whose blocks hold one linear that the forward never calls (as in layouts with unused branches)."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.idle = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_init()


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint):
    return AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"), quantization_config=small_config(blockwise=False), dtype=torch.float32
    )


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    quantized.save_pretrained(out)
    return out


def copy_checkpoint(src, dst, *, config=None, drop=()):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config is not None:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_config_records_the_packed_modules(quantized, saved):
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert set(cfg["packed_modules"]) == packed_names(quantized)
    assert len(cfg["packed_modules"]) == 2 * 7


def test_linear_the_forward_never_calls_stays_dense_and_reloads_dense(tiny_tokenizer, tmp_path):
    src = tmp_path / "src"
    fp = LlamaWithIdleLinear(build_tiny_model("llama", vocab_size=len(tiny_tokenizer)).config).eval()
    fp.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    model = LlamaWithIdleLinear.from_pretrained(src, quantization_config=small_config(blockwise=False),
                                                dtype=torch.float32)
    idle = {f"model.layers.{i}.mlp.idle" for i in range(2)}
    assert not idle & packed_names(model)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in idle)
    assert len(packed_names(model)) == 2 * 7
    out = tmp_path / "out"
    model.save_pretrained(out)
    reloaded, info = LlamaWithIdleLinear.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert packed_names(reloaded) == packed_names(model)
    for name in idle:
        torch.testing.assert_close(reloaded.get_submodule(name).weight, fp.get_submodule(name).weight, rtol=0, atol=0)
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("tensor", ["qweight", "scales", "zeros"])
def test_reload_refuses_a_checkpoint_missing_a_packed_tensor(saved, tmp_path, tensor):
    name = f"model.layers.1.mlp.up_proj.{tensor}"
    broken = copy_checkpoint(saved, tmp_path / "broken", drop={name})
    with pytest.raises(DecoupleQCheckpointError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(broken)


def test_reload_refuses_packed_modules_the_model_lacks(saved, tmp_path):
    def rename(cfg):
        cfg["quantization_config"]["packed_modules"][0] = "model.layers.0.mlp.no_such_proj"

    broken = copy_checkpoint(saved, tmp_path / "broken", config=rename)
    with pytest.raises(DecoupleQCheckpointError, match="no_such_proj"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_reload_refuses_packed_tensors_of_a_module_it_keeps_dense(saved, tmp_path):
    def drop_one(cfg):
        cfg["quantization_config"]["packed_modules"].remove("model.layers.0.self_attn.o_proj")

    broken = copy_checkpoint(saved, tmp_path / "broken", config=drop_one)
    with pytest.raises(DecoupleQCheckpointError, match=r"model\.layers\.0\.self_attn\.o_proj\.qweight"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_checkpoint_without_the_list_loads_as_before(quantized, saved, tmp_path):
    old = copy_checkpoint(saved, tmp_path / "old", config=lambda cfg: cfg["quantization_config"].pop("packed_modules"))
    reloaded, info = AutoModelForCausalLM.from_pretrained(old, output_loading_info=True)
    assert not any(info.values()), info
    assert packed_names(reloaded) == packed_names(quantized)
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized(ids).logits)


def test_load_report_sees_a_bad_load(saved, tmp_path):
    # The report the tests check is not blind: without the quantization config, the packed tensors are unexpected.
    plain = copy_checkpoint(saved, tmp_path / "plain", config=lambda cfg: cfg.pop("quantization_config"))
    _, info = AutoModelForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert any(k.endswith(".qweight") for k in info["unexpected_keys"])
    assert any(k.endswith("q_proj.weight") for k in info["missing_keys"])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_saves_itself_with_its_card(quantized, tmp_path, how):
    clone = copy.deepcopy(quantized) if how == "deepcopy" else pickle.loads(pickle.dumps(quantized))
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.scales.mul_(2)
    clone.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.scales"
    assert torch.equal(saved[key], clone.state_dict()[key])
    assert not torch.equal(saved[key], quantized.state_dict()[key])
    assert "import hf_decoupleq" in (tmp_path / "README.md").read_text()
