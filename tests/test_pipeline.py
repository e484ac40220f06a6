"""The calibration loop's speed-ups must not change results: child replay is exact, bf16 autocast is close."""

import copy

import pytest
import torch
from conftest import build_tiny_model

from hf_decoupleq import DecoupleQConfig, pipeline
from hf_decoupleq.errors import DecoupleQConfigError, DecoupleQError
from hf_decoupleq.integration import find_linears

CPU = torch.device("cpu")


def first_block_inputs(model, num=6, seq=24, batch_size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, model.config.vocab_size, (num, seq), generator=g)
    _, blocks = pipeline.find_decoder_blocks(model)
    return blocks, pipeline.capture_block_inputs(model, blocks[0], windows, batch_size)


def config(**kw):
    base = {"bits": 2, "group_size": 16, "rounds": 1, "blockwise": False, "dataset": "self"}
    base.update(kw)
    return DecoupleQConfig(**base)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_child_replay_gives_bit_identical_results(arch):
    model = build_tiny_model(arch)
    blocks, inputs = first_block_inputs(model)
    plain_block = copy.deepcopy(blocks[0])
    replay_block = copy.deepcopy(blocks[0])
    cfg = config()

    pipeline.quantize_block(plain_block, inputs, cfg, block_name="b", block_index=0, skip=[], device=CPU)
    plain_out = pipeline.forward_quantized_block(plain_block, inputs, CPU)

    replay = pipeline.ChildReplay(replay_block, [], 0)
    pipeline.quantize_block(
        replay_block, inputs, cfg, block_name="b", block_index=0, skip=[], device=CPU, replay=replay
    )
    # The attention child became final after its linears were quantized and was recorded, then replayed.
    recorded = [name for name in replay.outputs if replay.complete(name)]
    assert recorded, "nothing was replayed: the test would not exercise the replay path"
    assert replay.final_forward_ok
    replay_out = pipeline.forward_quantized_block(replay_block, inputs, CPU, replay=replay)

    assert plain_block.state_dict().keys() == replay_block.state_dict().keys()
    for key, value in plain_block.state_dict().items():
        assert torch.equal(value, replay_block.state_dict()[key]), key
    assert len(plain_out) == len(replay_out)
    for a, b in zip(plain_out, replay_out):
        assert torch.equal(a, b)


def test_replay_stands_in_for_children_without_patching_them():
    # Replay swaps a stand-in module into the block for the duration of a pass; the child itself is never patched
    # (no instance `forward`) and is back in its place afterwards, with the block's attributes read through.
    model = build_tiny_model("llama")
    blocks, inputs = first_block_inputs(model)
    block = blocks[0]
    replay = pipeline.ChildReplay(block, [], 0)
    pipeline.quantize_block(block, inputs, config(), block_name="b", block_index=0, skip=[], device=CPU, replay=replay)
    attn = block.self_attn
    assert replay.complete("self_attn") and "forward" not in vars(attn)
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(module.self_attn))
    try:
        with replay.active(replay.upstream_all(), record=False):
            stand_in = block.self_attn
            assert stand_in is not attn and stand_in.layer_idx == attn.layer_idx
            assert not any(name.startswith("self_attn.") for name, _ in block.named_buffers())
            pipeline.forward_quantized_block(block, inputs, CPU)
    finally:
        handle.remove()
    assert seen and all(m is stand_in for m in seen)
    assert block.self_attn is attn and "forward" not in vars(attn)
    assert any(name.startswith("self_attn.") for name, _ in block.named_buffers())


def test_replay_is_not_used_after_the_blockwise_stage_changed_the_weights():
    model = build_tiny_model("llama")
    blocks, inputs = first_block_inputs(model)
    replay = pipeline.ChildReplay(blocks[0], [], 0)
    cfg = config(blockwise=True, blockwise_epochs=1, blockwise_lr=1e-3)
    pipeline.quantize_block(blocks[0], inputs, cfg, block_name="b", block_index=0, skip=[], device=CPU, replay=replay)
    assert not replay.final_forward_ok


def test_forward_quantized_block_matches_the_packed_modules():
    # The next block's inputs come from dense fake-quant copies of the packed tensors; the packed modules' own
    # forward must agree with them (to float32 rounding).
    model = build_tiny_model("llama")
    blocks, inputs = first_block_inputs(model)
    pipeline.quantize_block(blocks[0], inputs, config(), block_name="b", block_index=0, skip=[], device=CPU)
    fast = pipeline.forward_quantized_block(blocks[0], inputs, CPU)
    packed = pipeline._forward_all(blocks[0], inputs, CPU)
    for a, b in zip(fast, packed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_calibration_dtype_values():
    assert DecoupleQConfig(calibration_dtype=torch.bfloat16).calibration_dtype == "bfloat16"
    assert DecoupleQConfig(calibration_dtype="bf16").calibration_dtype == "bfloat16"
    assert DecoupleQConfig().calibration_dtype == "auto"
    assert DecoupleQConfig(calibration_dtype="model").calibration_dtype is None
    with pytest.raises(DecoupleQConfigError, match=r"calibration_dtype='int8'.*bfloat16"):
        DecoupleQConfig(calibration_dtype="int8")
    bf16_model = build_tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(DecoupleQError, match="wider than the model"):
        pipeline._calibration_dtype(DecoupleQConfig(calibration_dtype="float32"), bf16_model)
    assert pipeline._calibration_dtype(DecoupleQConfig(calibration_dtype="bfloat16"), bf16_model) is None
    fp32_model = build_tiny_model("llama")
    assert pipeline._calibration_dtype(DecoupleQConfig(calibration_dtype="bfloat16"), fp32_model) == torch.bfloat16


def test_bfloat16_calibration_collects_nearly_the_float32_hessians():
    model = build_tiny_model("llama")
    blocks, inputs = first_block_inputs(model, num=8, seq=32)
    block = blocks[0]
    linears = find_linears(block, "", [])
    groups = pipeline.discover_sequential_groups(block, linears, inputs, CPU)
    kw = {"block_name": "b", "keep_outputs": True, "stop_after": None}
    accs32, out32 = pipeline._collect_hessians(block, linears, groups, inputs, CPU, **kw)
    accs16, out16 = pipeline._collect_hessians(block, linears, groups, inputs, CPU, compute_dtype=torch.bfloat16, **kw)
    rels = {}
    for group in groups:
        h32, h16 = accs32[group[0]].hessian(), accs16[group[0]].hessian()
        assert h16.dtype == torch.float64
        rels[group[0]] = float((h16 - h32).norm() / h32.norm())
    # bf16 matmuls: ~0.4% per element. The first group reads the (float32) norm output, so it may be exact; the
    # later ones read bf16 matmul outputs, so all-exact would mean autocast never happened.
    assert all(rel < 0.03 for rel in rels.values()), rels
    assert any(rel > 0 for rel in rels.values()), rels
    for a, b in zip(out32, out16):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
