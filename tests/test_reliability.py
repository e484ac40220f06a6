"""Resume after interruption, determinism, and clear errors for bad input (tiny models, CPU)."""

import pytest
import torch
from conftest import WIKI_VALID, build_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_decoupleq import DecoupleQConfig, pipeline
from hf_decoupleq.errors import DecoupleQCheckpointError, DecoupleQDataError, DecoupleQNumericalError


def cfg(**kw):
    base = {
        "bits": 2, "group_size": 16, "dataset": str(WIKI_VALID), "num_samples": 4, "seq_len": 32, "blockwise_epochs": 1,
        "blockwise_lr": 1e-4, "rounds": 1,
    }
    base.update(kw)
    return DecoupleQConfig(**base)


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg(**kw), dtype=torch.float32)


def packed_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_settings_and_seed_give_identical_tensors(tiny_checkpoint):
    src = tiny_checkpoint("llama")
    assert_same_state(packed_state(load(src)), packed_state(load(src)))


# Without the block-wise stage the fresh run replays the attention outputs; incoherent blocks also store their signs.
@pytest.mark.parametrize("blockwise, incoherence", [(True, False), (False, False), (True, True)])
def test_resume_after_interruption_is_bit_exact(tiny_checkpoint, tmp_path, monkeypatch, blockwise, incoherence):
    src = tiny_checkpoint("llama")
    settings = {"blockwise": blockwise, "incoherence": incoherence}
    reference = packed_state(load(src, **settings))

    ckpt = tmp_path / "ckpt"
    real = pipeline.quantize_block
    calls = []

    def crash_on_second_block(block, inputs, config, *, block_index, **kw):
        calls.append(block_index)
        if block_index == 1:
            raise KeyboardInterrupt("simulated interruption after block 0")
        return real(block, inputs, config, block_index=block_index, **kw)

    monkeypatch.setattr(pipeline, "quantize_block", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        load(src, checkpoint_dir=str(ckpt), **settings)
    assert calls == [0, 1]
    assert (ckpt / "block_00000.safetensors").exists() and not (ckpt / "block_00001.safetensors").exists()
    if incoherence:
        assert "self_attn.q_proj.hadamard_signs" in load_file(ckpt / "block_00000.safetensors")

    calls.clear()
    monkeypatch.setattr(pipeline, "quantize_block", lambda *a, block_index, **kw: calls.append(block_index) or real(
        *a, block_index=block_index, **kw))
    resumed = load(src, checkpoint_dir=str(ckpt), **settings)
    assert calls == [1]  # block 0 came from the checkpoint directory
    assert_same_state(packed_state(resumed), reference)


def test_resume_with_different_settings_is_refused(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    ckpt = tmp_path / "ckpt"
    load(src, checkpoint_dir=str(ckpt), blockwise=False)
    with pytest.raises(DecoupleQCheckpointError, match="bits: 2 in the checkpoint directory, 3 now"):
        load(src, checkpoint_dir=str(ckpt), blockwise=False, bits=3)


def test_resume_with_other_calibration_text_is_refused(tiny_checkpoint, tmp_path):
    # Same settings and window shape, another text: the finished blocks were calibrated on other data.
    src = tiny_checkpoint("llama")
    ckpt = tmp_path / "ckpt"
    load(src, checkpoint_dir=str(ckpt), blockwise=False)
    other = tmp_path / "other.txt"
    other.write_text(WIKI_VALID.read_text(encoding="utf-8")[::-1])
    with pytest.raises(DecoupleQCheckpointError, match="calibration_token_ids_sha256"):
        load(src, checkpoint_dir=str(ckpt), blockwise=False, dataset=str(other))
    # The same text resumes (every block from the directory).
    load(src, checkpoint_dir=str(ckpt), blockwise=False)


def test_non_finite_weights_name_the_layer(tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama", vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(DecoupleQNumericalError, match=r"model\.layers\.1\.mlp\.up_proj"):
        load(tmp_path)


def test_missing_dataset_file(tiny_checkpoint, tmp_path):
    with pytest.raises(DecoupleQDataError, match="no_such_file.txt"):
        load(tiny_checkpoint("llama"), dataset=str(tmp_path / "no_such_file.txt"))


def test_dataset_shorter_than_one_window(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the game was released")
    with pytest.raises(DecoupleQDataError, match="seq_len|window"):
        load(tiny_checkpoint("llama"), dataset=str(short))


def test_missing_tokenizer_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(DecoupleQDataError, match="no-such-tokenizer"):
        load(tiny_checkpoint("llama"), tokenizer=str(tmp_path / "no-such-tokenizer"))


def test_disk_offloaded_blocks_are_materialized_not_solved_on_meta(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    # The end-to-end stage needs every weight in memory: it is skipped (with a warning) for the offloaded model, so
    # the reference runs without it too.
    reference = load(src, blockwise=False, e2e_epochs=0)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=cfg(blockwise=False), dtype=torch.float32, device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
    )
    layer = offloaded.model.layers[1].mlp.down_proj
    assert layer.qweight.device.type == "cpu"
    assert torch.equal(layer.qweight, reference.model.layers[1].mlp.down_proj.qweight)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, reference(ids).logits)
