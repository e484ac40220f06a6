"""Decoder layouts whose blocks differ (sliding/full attention, local/global RoPE): each block is calibrated with the
arguments it gets in a plain forward pass, and these families quantize, save and reload end to end."""

import pytest
import torch
import transformers
from conftest import assert_reloads_identically
from transformers import AutoModelForCausalLM

import hf_decoupleq  # noqa: F401  (registers "decoupleq")
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear, pipeline
from hf_decoupleq.integration import find_decoder_blocks, find_linears

CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")
BASE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny(family: str, layers: int = 4) -> transformers.PreTrainedModel:
    """A tiny random model whose blocks alternate sliding and full attention; the sliding window (8) is shorter than
    the calibration windows (24)."""
    torch.manual_seed(0)
    common = {**BASE, "num_hidden_layers": layers}
    alternating = ["sliding_attention", "full_attention"] * (layers // 2)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(head_dim=16, sliding_window=8, 
                                            layer_types=alternating, **common)
        model = transformers.Gemma3ForCausalLM(cfg)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=16, sliding_window=8, layer_types=alternating,
                                        **common)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif family == "cohere2":
        cfg = transformers.Cohere2Config(sliding_window=8, layer_types=alternating, **common)
        model = transformers.Cohere2ForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(sliding_window=8, use_sliding_window=True, 
                                       layer_types=alternating, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, sliding_window=8, use_sliding_window=True, 
                                       layer_types=alternating, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(family)
    return model.eval()


def windows(model, num=4, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (num, seq), generator=g)


def plain_forward_arguments(model, ids):
    """Every block's keyword arguments in a plain forward of `ids` (the reference), as CPU copies."""
    _, blocks = find_decoder_blocks(model)
    seen = [None] * len(blocks)

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = _copy({k: v for k, v in kwargs.items() if k not in CACHE_KWARGS and k != "use_cache"})

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


def assert_same_arguments(got, expected, where, rows=None):
    """`got` equals `expected` (the first `rows` batch rows of its tensors, when given: the block-wise stage steps
    one window at a time; the rows are equal here, since the windows have no padding)."""
    assert got.keys() == expected.keys(), where
    for key in expected:
        a, b = got[key], expected[key]
        if isinstance(b, (tuple, list)):
            assert len(a) == len(b), (where, key)
            for x, y in zip(a, b):
                assert torch.equal(x, _rows(y, rows)), (where, key)
        elif isinstance(b, torch.Tensor):
            b = _rows(b, rows)
            assert isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), (where, key)
        else:
            assert a == b, (where, key)


def _rows(t, rows):
    return t if rows is None or t.dim() < 2 or t.shape[0] <= rows else t[:rows]


def differs(a, b) -> bool:
    try:
        assert_same_arguments(a, b, "")
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("family", ["gemma3", "gemma2", "cohere2", "qwen2", "qwen3"])
def test_captured_arguments_are_each_blocks_own(family):
    model = tiny(family)
    ids = windows(model)
    reference = plain_forward_arguments(model, ids[:2])
    # The layouts really differ between a sliding and a full layer (else this test would prove nothing).
    assert differs(reference[0], reference[1])
    _, blocks = find_decoder_blocks(model)
    inputs = pipeline.capture_block_inputs(model, blocks, ids, batch_size=2)
    assert len(inputs.all_kwargs) == len(blocks)
    for i, per_batch in enumerate(inputs.all_kwargs):
        assert len(per_batch) == 2
        for kwargs in per_batch:
            kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
            assert_same_arguments(kwargs, reference[i], f"block {i}")
    # Identical arguments are stored once: blocks 0 and 2 (both sliding) share one dict, and so do the batches.
    assert inputs.all_kwargs[0][0] is inputs.all_kwargs[2][0] is inputs.all_kwargs[0][1]


def test_gemma3_blocks_are_calibrated_with_their_own_arguments():
    model = tiny("gemma3", layers=2)
    ids = windows(model)
    reference = plain_forward_arguments(model, ids[:2])
    assert differs(reference[0], reference[1])  # local RoPE + sliding mask vs global RoPE + full mask
    _, blocks = find_decoder_blocks(model)
    used: dict[int, list] = {i: [] for i in range(len(blocks))}

    def record(i):
        def hook(module, args, kwargs):
            rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
            used[i].append((rows, _copy({k: v for k, v in kwargs.items() if k not in CACHE_KWARGS + ("use_cache",)})))

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    cfg = DecoupleQConfig(bits=2, group_size=16, rounds=1, blockwise_epochs=1, blockwise_lr=1e-4, dataset=ids,
                          num_samples=4, seq_len=24, batch_size=2)
    try:
        pipeline.quantize_model(model, cfg)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(blocks)):
        assert used[i], f"block {i} was never run during calibration"
        for n, (rows, kwargs) in enumerate(used[i]):
            assert_same_arguments(kwargs, reference[i], f"block {i}, call {n}", rows=rows)


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "cohere2"])
def test_family_quantizes_saves_and_reloads(family, tmp_path):
    src = tmp_path / "src"
    model = tiny(family, layers=2)
    model.save_pretrained(src)
    ids = windows(model, num=4, seq=24)
    cfg = DecoupleQConfig(bits=3, group_size=16, rounds=1, blockwise=False, dataset=ids, num_samples=4, seq_len=24)
    quantized = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
    _, blocks = find_decoder_blocks(quantized)
    n_linears = sum(len(find_linears(b)) for b in blocks) + sum(
        isinstance(m, DecoupleQLinear) for m in blocks.modules()
    )
    packed = assert_reloads_identically(quantized, tmp_path / "out", windows(model, num=1, seq=20, seed=1))
    assert len(packed) == n_linears > 0
