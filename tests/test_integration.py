"""End-to-end transformers integration on tiny random models: quantize on load, save, reload, generate, push."""

import json

import pytest
import torch
from conftest import assert_same_predictions, build_tiny_model, small_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQLinear
from hf_decoupleq.errors import DecoupleQCheckpointError, DecoupleQConfigError, UnsupportedModelError
from hf_decoupleq.integration import find_decoder_blocks


def quantize(path, **overrides):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=small_config(**overrides), dtype=torch.float32)


def packed_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}


@pytest.fixture(scope="module")
def quantized_llama(tiny_checkpoint):
    return quantize(tiny_checkpoint("llama"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_save_reload_generate(arch, tiny_checkpoint, tiny_tokenizer, tmp_path):
    src = tiny_checkpoint(arch)
    model = quantize(src)
    packed = packed_modules(model)
    # Every linear of every decoder block is packed; lm_head is not.
    _, blocks = find_decoder_blocks(model)
    n_linears = sum(isinstance(m, (torch.nn.Linear, DecoupleQLinear)) for m in blocks.modules())
    assert len(packed) == n_linears == 2 * 7
    assert not isinstance(model.lm_head, DecoupleQLinear)
    assert model.config.quantization_config.quantization_stats["blocks"]

    out = tmp_path / "out"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "decoupleq"
    assert cfg["quantization_config"]["bits"] == 2
    card = (out / "README.md").read_text()
    assert "import hf_decoupleq" in card

    # transformers' load report: nothing missing, unexpected or mismatched.
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not any(info.values()), info
    # The reloaded state dict equals the saved tensors bit for bit.
    saved = load_file(out / "model.safetensors")
    state = reloaded.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert set(packed_modules(reloaded)) == set(packed)
    assert_same_predictions(model, reloaded, tiny_tokenizer)


def test_packed_model_computes_what_the_dequantized_weights_compute(quantized_llama, tiny_tokenizer):
    ids = tiny_tokenizer("in the first season of the series", return_tensors="pt").input_ids
    with torch.no_grad():
        logits_q = quantized_llama(ids).logits
    # Independent reference: a plain model holding the dequantized weights.
    import copy

    plain = copy.deepcopy(quantized_llama)
    plain.dequantize()
    assert not packed_modules(plain)
    with torch.no_grad():
        logits_p = plain(ids).logits
    torch.testing.assert_close(logits_q, logits_p, rtol=1e-4, atol=1e-4)


def test_quantized_model_is_closer_to_fp_than_rtn(tiny_checkpoint, tiny_tokenizer, wiki_text):
    src = tiny_checkpoint("llama")
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dq = quantize(src, bits=3, rounds=3)
    rtn = quantize(src, bits=3, method="rtn", blockwise=False)
    ids = tiny_tokenizer(wiki_text[5000:8000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = fp(ids).logits.double()
        err_dq = (dq(ids).logits.double() - ref).pow(2).mean()
        err_rtn = (rtn(ids).logits.double() - ref).pow(2).mean()
    assert err_dq < err_rtn


def test_push_to_hub_uploads_packed_files_and_card(quantized_llama, monkeypatch):
    import huggingface_hub

    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, str):
                with open(src, "rb") as f:
                    uploaded[op.path_in_repo] = f.read()
            else:
                uploaded[op.path_in_repo] = src.read()
        uploaded["__repo__"] = repo_id
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message="x", commit_description="",
            oid="abc", pr_url=None,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    quantized_llama.push_to_hub("me/tiny-w2", token="hf_dummy")
    assert uploaded["__repo__"] == "me/tiny-w2"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    assert "import hf_decoupleq" in card and "decoupleq" in card
    cfg = json.loads(uploaded["config.json"])
    assert cfg["quantization_config"]["quant_method"] == "decoupleq"
    from safetensors.torch import load

    tensors = load(uploaded["model.safetensors"])
    assert any(k.endswith(".qweight") and v.dtype == torch.int32 for k, v in tensors.items())


def test_sharded_save_reloads(quantized_llama, tmp_path):
    quantized_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(quantized_llama(ids).logits, reloaded(ids).logits)


def _save_with_quantization_config(model, path, **changes):
    """Save `model` to `path`, then change fields of the saved config.json's quantization_config."""
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_checkpoint_shapes_must_match_config(quantized_llama, tmp_path):
    _save_with_quantization_config(quantized_llama, tmp_path, group_size=32)
    with pytest.raises(DecoupleQCheckpointError, match="scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_newer_format_version_is_refused(quantized_llama, tmp_path):
    _save_with_quantization_config(quantized_llama, tmp_path, format_version=99)
    with pytest.raises(DecoupleQConfigError, match="format_version=99"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unsupported_model_is_named():
    with pytest.raises(UnsupportedModelError, match="decoder blocks"):
        find_decoder_blocks(torch.nn.Sequential(torch.nn.Embedding(4, 4)))


def test_opt_blocks_are_found_generically(tiny_checkpoint):
    model = quantize(tiny_checkpoint("opt"), blockwise=False)
    names = set(packed_modules(model))
    assert "model.decoder.layers.0.self_attn.q_proj" in names and "model.decoder.layers.1.fc2" in names
    assert len(names) == 2 * 6


def test_device_map_onto_missing_device_is_refused(quantized_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    quantized_llama.save_pretrained(tmp_path)
    with pytest.raises(DecoupleQConfigError, match="CUDA"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cuda:0"})


def test_modules_to_not_convert_matches_as_transformers_does_regex_included():
    from transformers.quantizers.quantizers_utils import should_convert_module

    from hf_decoupleq.integration import _is_skipped, find_linears

    model = build_tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    # transformers' semantics: a regex up to a module boundary, a prefix at a boundary, a suffix.
    regex = r"model\.layers\.\d+\.self_attn\.(q|k)_proj"
    assert sorted(find_linears(blocks[0], "model.layers.0.", [regex])) == [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj", "self_attn.v_proj"
    ]
    assert find_linears(blocks[1], "model.layers.1.", ["model.layers.1"]) == {}
    assert len(find_linears(blocks[1], "model.layers.1.", ["model.layers.1.mlp.gate"])) == 7  # not gate_proj
    names = [f"model.layers.{i}.{n}" for i, b in enumerate(blocks) for n in find_linears(b)]
    for pattern in (regex, r"model\.layers\.1\..*", "down_proj", "model.layers.1"):
        assert [n for n in names if _is_skipped(n, [pattern])] == [
            n for n in names if not should_convert_module(n, [pattern])
        ], pattern
    # Whole components anywhere in the name also match, as they always did (transformers' helper does not).
    assert _is_skipped("model.layers.0.mlp.experts.0.w1", ["experts"])
    assert _is_skipped("model.layers.1.mlp.down_proj", ["layers.1"])
    assert not _is_skipped("model.layers.0.mlp.gate_proj", ["mlp.gate"])
