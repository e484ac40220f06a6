"""Fine-tuning the float parts: loss goes down, codes stay bit-identical, the saved model reproduces the logits."""

import pytest
import torch
from conftest import WIKI_VALID
from transformers import AutoModelForCausalLM

import hf_decoupleq  # noqa: F401
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear, prepare_for_training


@pytest.fixture()
def quantized(tiny_checkpoint):
    cfg = DecoupleQConfig(bits=2, group_size=16, dataset=str(WIKI_VALID), num_samples=4, seq_len=32, blockwise=False,
                          rounds=1)
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=cfg,
                                                dtype=torch.float32)


def test_training_float_parts_lowers_loss_keeps_codes_and_round_trips(quantized, tiny_tokenizer, wiki_text, tmp_path):
    model = quantized
    codes_before = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}
    names = prepare_for_training(model, train_norms=True)
    assert names and all(n.endswith((".scales", ".zeros", "norm.weight", "layernorm.weight")) for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)

    ids = tiny_tokenizer(wiki_text[:4000], return_tensors="pt").input_ids[:, :256].reshape(4, 64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
        logits = model(input_ids=ids).logits
    assert after < before - 0.05
    for n, m in model.named_modules():
        if isinstance(m, DecoupleQLinear):
            assert torch.equal(m.qweight, codes_before[n]), n

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_prepare_for_training_needs_a_quantized_model(tiny_checkpoint):
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="DecoupleQLinear"):
        prepare_for_training(plain)


def test_finetune_example_runs_and_saves(quantized, tiny_tokenizer, tmp_path):
    import importlib.util
    import pathlib

    src = tmp_path / "q"
    quantized.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "finetune_float_parts.py"
    spec = importlib.util.spec_from_file_location("finetune_float_parts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", str(src), "--text", str(WIKI_VALID), "--output", str(tmp_path / "ft"),
                       "--steps", "8", "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3"])
    assert out["losses"][-1] < out["losses"][0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")
    assert sum(isinstance(m, DecoupleQLinear) for m in reloaded.modules()) == 14
