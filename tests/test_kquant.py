"""decoupleQ inside llama.cpp's k-quant structures (`DecoupleQConfig(gguf_type=...)`): config validation, the fallback
rule, grid membership of the solver's scales and zeros, the block-wise stage keeping the grid (and symmetric zeros
tied), and the exact export, checked per weight against gguf-py's dequantization of the written file."""

import logging

import numpy as np
import pytest
import torch
from conftest import WIKI_VALID

gguf = pytest.importorskip("gguf")

import hf_decoupleq
from hf_decoupleq import DecoupleQConfig, DecoupleQLinear
from hf_decoupleq.errors import DecoupleQConfigError
from hf_decoupleq.export import export_gguf
from hf_decoupleq.export.ggml_blocks import pack_q5_0, quantize_k, recover_grid
from hf_decoupleq.solver import FakeQuantLinear, refine_block, solve_layer
from hf_decoupleq.solver.kquant import layer_format

# type -> (code bits, sub-block, scale level range, min level range or None when symmetric)
GRIDS = {"q2_k": (2, 16, (0, 15), (0, 15)), "q3_k": (3, 16, (-32, 31), None), "q4_k": (4, 32, (0, 63), (0, 63)),
         "q5_k": (5, 32, (0, 63), (0, 63)), "q6_k": (6, 16, (-128, 127), None)}  # fmt: skip


def _problem(n=24, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) * torch.linspace(0.3, 2.0, k)
    x = x @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5)  # correlated inputs, as in real layers
    h = (x.T @ x / x.shape[0]).double()
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, :64] *= 4  # uneven magnitudes across super-blocks
    return w, h


def _is_fp16(x: torch.Tensor) -> bool:
    x = x.double()
    return bool(torch.equal(x.half().double(), x))


def _check_on_grid(result, gguf_type):
    """Brute force: every super-block's scales are an fp16 d times integers in range (and the zeros likewise, or
    tied to -4 s / -32 s), re-derived from the stored values, not from the solver's own grid object."""
    bits, sub, srange, mrange = GRIDS[gguf_type]
    assert (result.bits, result.group_size) == (bits, sub)
    n, k = result.codes.shape
    s = result.scales.double().reshape(n * k // 256, 256 // sub).numpy()
    z = result.zeros.double().reshape(n * k // 256, 256 // sub).numpy()
    d, sc, ok = recover_grid(s, *srange)
    assert ok.all() and np.array_equal(d[:, None] * sc, s)
    assert np.all(sc != 0)  # the solver never makes a zero scale
    if mrange is None:
        assert np.array_equal(z, -float(1 << (bits - 1)) * s)
    else:
        dmin, m, ok = recover_grid(-z, *mrange)
        assert ok.all() and np.array_equal(-dmin[:, None] * m, z)
    # The grid object agrees with the stored values.
    assert _is_fp16(result.grid.d) and _is_fp16(result.grid.dmin)
    ps, pz = result.grid.project(result.scales, result.zeros)
    assert torch.equal(ps, result.scales) and torch.equal(pz, result.zeros)


# ---------------------------------------------------------------------------------------------------------------------
# Config and the fallback rule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gguf_type", "bits", "group_size", "symmetric"),
    [("q2_k", 2, 16, False), ("q3_k", 3, 16, True), ("q4_k", 4, 32, False), ("q5_k", 5, 32, False),
     ("q6_k", 6, 16, True), ("q4_0", 4, 32, True), ("q5_0", 5, 32, True), ("q5_1", 5, 32, False),
     ("q8_0", 8, 32, True)],
)  # fmt: skip
def test_config_sets_the_layer_shape_from_the_type(gguf_type, bits, group_size, symmetric):
    cfg = DecoupleQConfig(gguf_type=gguf_type.upper(), incoherence=False)
    assert (cfg.gguf_type, cfg.bits, cfg.group_size, cfg.symmetric) == (gguf_type, bits, group_size, symmetric)
    # Matching explicit values are accepted, and the config round-trips through its dict.
    DecoupleQConfig(gguf_type=gguf_type, incoherence=False, bits=bits, group_size=group_size, symmetric=symmetric)
    again = DecoupleQConfig.from_dict(cfg.to_dict())
    assert again.gguf_type == gguf_type and again.bits == bits
    assert cfg.result_fingerprint()["gguf_type"] == gguf_type


def test_config_table_agrees_with_the_solver():
    from hf_decoupleq.config import GGUF_LAYERS
    from hf_decoupleq.solver.kquant import GGUF_TYPES

    assert tuple(GGUF_LAYERS) == GGUF_TYPES
    for t, shape in GGUF_LAYERS.items():
        fmt = layer_format(t, 256)
        assert (fmt.bits, fmt.group_size, fmt.symmetric) == shape


def test_config_refuses_bad_gguf_settings():
    with pytest.raises(DecoupleQConfigError, match=r"gguf_type='q8_k'.*allowed"):
        DecoupleQConfig(gguf_type="q8_k", incoherence=False)
    with pytest.raises(DecoupleQConfigError, match=r"gguf_layer_types.*set gguf_type"):
        DecoupleQConfig(gguf_layer_types={"x": "q5_k"}, incoherence=False)
    with pytest.raises(DecoupleQConfigError, match=r"gguf_layer_types.*not a regular expression"):
        DecoupleQConfig(gguf_type="q4_k", gguf_layer_types={"model.(": "q5_k"}, incoherence=False)
    with pytest.raises(DecoupleQConfigError, match=r"gguf_layer_types.*must be one of"):
        DecoupleQConfig(gguf_type="q4_k", gguf_layer_types={"x": "iq4_xs"}, incoherence=False)
    with pytest.raises(DecoupleQConfigError, match=r"bits=5.*use one of"):
        DecoupleQConfig(bits=5)  # 5- and 6-bit codes only inside a GGUF type
    with pytest.raises(DecoupleQConfigError, match=r"bits=6.*use one of"):
        DecoupleQConfig(bits=6)
    with pytest.raises(DecoupleQConfigError, match="needs incoherence=False"):
        DecoupleQConfig(gguf_type="q2_k")
    with pytest.raises(DecoupleQConfigError, match=r"bits=4.*stores bits=2"):
        DecoupleQConfig(gguf_type="q2_k", incoherence=False, bits=4)
    with pytest.raises(DecoupleQConfigError, match=r"group_size=128.*stores group_size=16"):
        DecoupleQConfig(gguf_type="q3_k", incoherence=False, group_size=128)
    with pytest.raises(DecoupleQConfigError, match="integer_zero"):
        DecoupleQConfig(gguf_type="q4_k", incoherence=False, integer_zero=True)
    assert DecoupleQConfig().gguf_type is None


def test_fallback_rule_is_llama_quantizes():
    # llama.cpp (src/llama-quant.cpp, tensor_type_fallback): Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
    # Q6_K -> Q8_0 when K % 256 != 0.
    assert layer_format("q2_k", 1536).ggml_type == "q2_k"
    for t, fb, bits, sym in (("q2_k", "q4_0", 4, True), ("q3_k", "q4_0", 4, True), ("q4_k", "q5_0", 5, True),
                             ("q5_k", "q5_1", 5, False), ("q6_k", "q8_0", 8, True)):  # fmt: skip
        fmt = layer_format(t, 576)
        assert (fmt.ggml_type, fmt.fallback_from, fmt.bits, fmt.group_size, fmt.symmetric) == (fb, t, bits, 32, sym)
        # The packed format has no 5-bit codes: those layers are stored with 8-bit codes.
        assert fmt.packed_bits == (8 if bits == 5 else bits)
    # Nor 6-bit codes: Q6_K layers are stored with 8-bit codes too.
    fmt = layer_format("q6_k", 512)
    assert (fmt.ggml_type, fmt.bits, fmt.group_size, fmt.symmetric, fmt.packed_bits) == ("q6_k", 6, 16, True, 8)
    assert layer_format("q4_0", 512).ggml_type == "q4_0" and layer_format("q8_0", 512).ggml_type == "q8_0"
    with pytest.raises(DecoupleQConfigError, match=r"in_features=100.*modules_to_not_convert"):
        layer_format("q2_k", 100, "mlp.down_proj")


# ---------------------------------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gguf_type", sorted(GRIDS))
def test_solver_stays_on_the_grid_and_beats_round_to_nearest(gguf_type):
    w, h = _problem()
    res = solve_layer(w, h, gguf_type=gguf_type, rounds=2)
    _check_on_grid(res, gguf_type)
    assert res.codes.max() <= (1 << res.bits) - 1
    # Its loss is the float64 H-weighted loss of exactly what it stores.
    err = (w.double() - res.dequantize().double())
    assert torch.allclose(res.loss, ((err @ h) * err).sum(1), rtol=1e-9, atol=0)
    # Better than the same grid with round-to-nearest, and than an H-blind k-quant quantizer (numpy, read back by
    # gguf-py) on the same weights.
    rtn = solve_layer(w, h, gguf_type=gguf_type, method="rtn")
    _check_on_grid(rtn, gguf_type)
    blind = torch.from_numpy(
        gguf.quants.dequantize(quantize_k(w.numpy(), gguf_type.upper()), gguf.GGMLQuantizationType[gguf_type.upper()])
    ).double().reshape(w.shape)
    blind_loss = (((w.double() - blind) @ h) * (w.double() - blind)).sum()
    assert res.loss.sum() < 0.9 * rtn.loss.sum()
    assert res.loss.sum() < 0.9 * blind_loss


def test_fallback_layers_are_symmetric_with_fp16_scales(caplog):
    w, h = _problem(k=320)
    with caplog.at_level(logging.INFO, logger="hf_decoupleq.solver.layerwise"):
        res = solve_layer(w, h, gguf_type="q2_k", name="blk.mlp.down_proj")
    assert "blk.mlp.down_proj" in caplog.text and "Q2_K falls back to Q4_0" in caplog.text
    assert (res.bits, res.group_size, res.symmetric) == (4, 32, True)
    assert _is_fp16(res.scales) and torch.equal(res.zeros, -8 * res.scales)


@pytest.mark.parametrize("gguf_type", ["q4_0", "q5_0", "q5_1", "q8_0"])
def test_block32_layers_are_what_gguf_reads_back_and_beat_round_to_nearest(gguf_type):
    from hf_decoupleq.export.ggml_blocks import pack_q4_0, pack_q5_1, pack_q8_0

    w, h = _problem(k=320)
    fmt = layer_format(gguf_type, 320)
    res = solve_layer(w, h, gguf_type=gguf_type, rounds=2)
    assert (res.bits, res.group_size, res.symmetric) == (fmt.bits, 32, fmt.symmetric)
    assert res.codes.max() <= (1 << fmt.bits) - 1 and _is_fp16(res.scales) and _is_fp16(res.zeros)
    if fmt.symmetric:
        assert torch.equal(res.zeros, -float(1 << (fmt.bits - 1)) * res.scales)
    # The type's blocks, read back by gguf-py, are exactly the solver's weights.
    codes, s, z = res.codes.numpy(), res.scales.numpy(), res.zeros.numpy()
    data = {"q4_0": lambda: pack_q4_0(codes, s), "q5_0": lambda: pack_q5_0(codes, s),
            "q5_1": lambda: pack_q5_1(codes, s, z),
            "q8_0": lambda: pack_q8_0(codes.astype(np.int16) - 128, s)}[gguf_type]()  # fmt: skip
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[gguf_type.upper()]).reshape(w.shape)
    assert np.array_equal(back, res.dequantize().numpy())
    err = w.double() - res.dequantize().double()
    assert torch.allclose(res.loss, ((err @ h) * err).sum(1), rtol=1e-9, atol=0)
    assert res.loss.sum() < 0.9 * solve_layer(w, h, gguf_type=gguf_type, method="rtn").loss.sum()
    if fmt.bits == 5:  # a fifth bit halves the step: far below the 4-bit symmetric layer
        assert res.loss.sum() < 0.5 * solve_layer(w, h, gguf_type="q4_0", rounds=2).loss.sum()
    if fmt.bits == 8:  # three more bits than Q5_0 (codes reach both ends of the int8 range)
        assert res.codes.min() == 0 or res.codes.max() == 255
        assert res.loss.sum() < 0.1 * solve_layer(w, h, gguf_type="q5_0", rounds=2).loss.sum()


def test_blockwise_stage_keeps_the_grid_and_ties_symmetric_zeros():
    """One tiny 'block' of a k-quant layer and a symmetric layer, trained against targets from a perturbed weight:
    the loss drops, and what comes out is still on the grid / still symmetric."""
    torch.manual_seed(0)
    w, h = _problem(n=32, k=256)
    kq = solve_layer(w, h, gguf_type="q2_k", rounds=1)
    sym = solve_layer(w[:, :32].contiguous(), h[:32, :32], bits=4, group_size=32, symmetric=True, rounds=1)
    assert sym.symmetric
    block = torch.nn.Sequential(FakeQuantLinear.from_result(kq), torch.nn.GELU(), FakeQuantLinear.from_result(sym))
    assert block[0].grid is kq.grid and block[2].symmetric
    target_block = torch.nn.Sequential(torch.nn.Linear(256, 32, bias=False), torch.nn.GELU(),
                                       torch.nn.Linear(32, 32, bias=False))  # fmt: skip
    inputs = [torch.randn(4, 8, 256) for _ in range(8)]
    with torch.no_grad():
        target_block[0].weight.copy_(w * 1.05)
        target_block[2].weight.copy_(w[:, :32] * 0.95)
        targets = [target_block(x) for x in inputs]
    result = refine_block(block, inputs, targets, lr=5e-3, epochs=3, optimizer="signsgd", train_norms=False)
    assert result.final_loss < result.initial_loss and not result.restored
    after = block[0].to_result()
    _check_on_grid(after, "q2_k")
    assert torch.equal(after.grid.d, kq.grid.d)
    assert not torch.equal(after.scales, kq.scales)  # it did move, along the grid
    assert torch.equal(block[0].scales.detach(), after.scales)  # snapped
    sym_after = block[2].to_result()
    assert torch.equal(sym_after.zeros, -8 * sym_after.scales) and not torch.equal(sym_after.scales, sym.scales)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def test_recover_grid_brute_force():
    rng = np.random.default_rng(0)
    d = rng.uniform(1e-4, 1e-2, 200).astype(np.float16).astype(np.float64)
    lev = rng.integers(-32, 32, (200, 16)).astype(np.float64)
    lev[:, 0] = -32  # some rows peak at the long end
    v = (d[:, None] * lev).astype(np.float32).astype(np.float64)  # a float32 checkpoint holds these exactly
    sup, got, ok = recover_grid(v, -32, 31)
    assert ok.all() and np.array_equal(sup[:, None] * got, v) and got.min() >= -32 and got.max() <= 31
    off = v.copy()
    off[:5, 3] *= 1.0001  # off the grid
    assert not recover_grid(off, -32, 31)[2][:5].any()
    zeros = np.zeros((3, 16))
    sup, got, ok = recover_grid(zeros, 0, 15)
    assert ok.all() and not got.any()


def test_q5_blocks_read_back_by_gguf():
    from hf_decoupleq.export.ggml_blocks import pack_kquant, pack_q5_1

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 32, (6, 64))
    d = rng.uniform(1e-3, 1e-1, (6, 2)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-1e-1, 1e-1, (6, 2)).astype(np.float16).astype(np.float32)
    out = gguf.quants.dequantize(pack_q5_0(codes, d), gguf.GGMLQuantizationType.Q5_0).reshape(6, 64)
    assert np.array_equal(out, np.repeat(d, 32, axis=1) * (codes - 16))
    out = gguf.quants.dequantize(pack_q5_1(codes, d, m), gguf.GGMLQuantizationType.Q5_1).reshape(6, 64)
    assert np.array_equal(out, np.repeat(d, 32, axis=1) * codes + np.repeat(m, 32, axis=1))
    # Q5_K from per-sub-block scales and zeros on its grid (fp16 d, dmin; 6-bit levels).
    codes = rng.integers(0, 32, (3, 512))
    sup = rng.uniform(1e-4, 1e-2, (3, 2, 2)).astype(np.float16).astype(np.float64)  # [row, super-block, d/dmin]
    sc, mn = rng.integers(1, 64, (3, 2, 8)), rng.integers(0, 64, (3, 2, 8))
    scales = (sup[..., :1] * sc).reshape(3, 16)
    zeros = -(sup[..., 1:] * mn).reshape(3, 16)
    out = gguf.quants.dequantize(pack_kquant(codes, scales, zeros, "Q5_K"), gguf.GGMLQuantizationType.Q5_K)
    expected = np.repeat(scales, 32, axis=1) * codes + np.repeat(zeros, 32, axis=1)
    assert np.allclose(out.reshape(3, 512), expected, rtol=1e-6, atol=0)
    assert "codes span" in pack_kquant(codes + 1, scales, zeros, "Q5_K")  # a code of 32 does not fit


def test_q6_k_and_q8_0_blocks_read_back_by_gguf():
    from hf_decoupleq.export.ggml_blocks import pack_kquant, pack_q8_0

    rng = np.random.default_rng(2)
    # Q6_K from per-sub-block scales on its grid (fp16 d, int8 levels, both ends of the int8 range present) and zeros
    # tied to -32 s; codes span all 6 bits.
    codes = rng.integers(0, 64, (3, 512))
    codes[0, :2] = [0, 63]
    d = rng.uniform(1e-5, 1e-2, (3, 2, 1)).astype(np.float16).astype(np.float64)
    sc = rng.integers(-128, 128, (3, 2, 16))
    sc[:, :, :2] = [-128, 127]
    scales = (d * sc).reshape(3, 32)
    data = pack_kquant(codes, scales, -32 * scales, "Q6_K")
    assert data.shape == (3, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K][1])
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K).reshape(3, 512)
    # d * sc * (q - 32) has at most 11 + 7 + 5 significant bits: gguf-py's float32 holds it exactly.
    assert np.array_equal(out, np.repeat(scales, 16, axis=1) * (codes - 32))
    assert "codes span" in pack_kquant(codes + 1, scales, -32 * scales, "Q6_K")  # a code of 64 does not fit
    assert "not -32 * scales" in pack_kquant(codes, scales, -31 * scales, "Q6_K")
    assert "not fp16 d" in pack_kquant(codes, scales * 1.0001, -32 * scales * 1.0001, "Q6_K")
    # Q8_0: int8 codes, one fp16 d per 32.
    codes = rng.integers(-128, 128, (4, 64))
    d = rng.uniform(1e-4, 1e-1, (4, 2)).astype(np.float16).astype(np.float32)
    out = gguf.quants.dequantize(pack_q8_0(codes, d), gguf.GGMLQuantizationType.Q8_0).reshape(4, 64)
    assert np.array_equal(out, np.repeat(d, 32, axis=1) * codes)


@pytest.fixture(scope="module")
def bpe_tokenizer(wiki_text):
    from test_gguf_export import _bpe_tokenizer

    return _bpe_tokenizer(wiki_text[:50_000])


# llama-quantize's Q4_K_S mix in miniature: Q5_K for some layers (v_proj, whose K = 64 falls back to Q5_1, and one
# down_proj), Q4_K / its fallback Q5_0 elsewhere.
MIX = {r"model\.layers\.0\.self_attn\.v_proj": "q5_k", r"model\.layers\.1\.mlp\.down_proj": "q5_k"}
# Its Q4_K_M in miniature: Q6_K for some v_proj (K = 64: falls back to Q8_0) and down_proj, Q4_K / Q5_0 elsewhere.
MIX_M = {r"model\.layers\.0\.self_attn\.v_proj": "q6_k", r"model\.layers\.1\.mlp\.down_proj": "q6_k"}
MIX_M_TYPES = {"model.layers.0.self_attn.v_proj": "Q8_0", "model.layers.1.mlp.down_proj": "Q6_K",
               "model.layers.0.mlp.down_proj": "Q4_K"}  # fmt: skip
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
         "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


def _tiny_kquant_model(tokenizer, gguf_type, layer_types=None, **kwargs):
    """hidden 64 (q/k/v/o/gate/up fall back: K = 64), intermediate 256 (down_proj is a k-quant), as in SmolLM2."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, max_position_embeddings=256,
        intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    qc = DecoupleQConfig(gguf_type=gguf_type, gguf_layer_types=layer_types, incoherence=False, dataset=str(WIKI_VALID),
                         num_samples=4, seq_len=32, rounds=1, blockwise_lr=1e-3, **kwargs)  # fmt: skip
    hf_decoupleq.quantize(model, qc, tokenizer=tokenizer)
    return model, qc


@pytest.mark.parametrize(("gguf_type", "fallback"), [("q2_k", "Q4_0"), ("q3_k", "Q4_0"), ("q4_k", "Q5_0"),
                                                     ("q5_k", "Q5_1"), ("q6_k", "Q8_0")])  # fmt: skip
def test_export_holds_exactly_the_solvers_weights(bpe_tokenizer, tmp_path, caplog, gguf_type, fallback):
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        model, qc = _tiny_kquant_model(bpe_tokenizer, gguf_type)
    assert "down_proj: in_features" not in caplog.text
    # The end-to-end stage (on by default) would move scales off the grid: a gguf_type run skips it.
    assert f"end-to-end stage skipped: gguf_type='{gguf_type}'" in caplog.text
    assert f"q_proj: in_features=64 is not a multiple of 256, so {gguf_type.upper()} falls back to {fallback}" \
        in caplog.text
    blocks = qc.quantization_stats["blocks"]
    assert all(b["blockwise_final_mse"] <= b["blockwise_initial_mse"] for b in blocks)
    path = tmp_path / f"{gguf_type}.gguf"
    report = export_gguf(model, path, tokenizer=bpe_tokenizer)  # the type comes from the checkpoint's config
    assert report.type_counts() == {"F16": 2, "F32": 5, fallback: 12, gguf_type.upper(): 2}
    assert not report.lossy and report.rel_error == 0.0
    _check_file_holds_the_weights(model, path, lambda name: gguf_type.upper() if "down_proj" in name else fallback)


def _check_file_holds_the_weights(model, path, type_of):
    """Every quantized layer of the file at `path` has the GGML type `type_of(module name)` and, dequantized by gguf-py,
    equals the layer's dequantized weight exactly."""
    from test_gguf_export import _file_weight, _read, _unpermute

    _, tensors = _read(path)
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, DecoupleQLinear):
            continue
        t = tensors[f"blk.{name.split('.')[2]}.{NAMES[name.rsplit('.', 1)[1]]}.weight"]
        assert t.tensor_type.name == type_of(name), name
        w = _file_weight(t)
        if name.endswith("q_proj"):
            w = _unpermute(w, 4)
        elif name.endswith("k_proj"):
            w = _unpermute(w, 2)
        # Per weight, exactly: the solver already rounded d/dmin (and the fallback layers' scales) to fp16.
        assert np.array_equal(w, layer.dequantize_weight().double().numpy()), name
        checked += 1
    assert checked == 14


@pytest.mark.parametrize("gguf_type", ["q2_k", "q3_k", "q4_k", "mix", "mix_m"])
def test_llama_cpp_generates_with_kquant_file(bpe_tokenizer, tmp_path, gguf_type):
    """llama.cpp runs the k-quant file (k-quant ffn_down, fallback Q4_0/Q5_0 elsewhere; "mix": Q4_K, Q5_K, Q5_0 and
    Q5_1 in one file; "mix_m", llama-quantize's Q4_K_M in miniature: Q4_K, Q6_K, Q5_0 and Q8_0) and continues as we
    do."""
    from test_gguf_export import check_llama_cpp_greedy

    if gguf_type in ("mix", "mix_m"):
        model, _ = _tiny_kquant_model(bpe_tokenizer, "q4_k", MIX if gguf_type == "mix" else MIX_M)
    else:
        model, _ = _tiny_kquant_model(bpe_tokenizer, gguf_type)
    path = tmp_path / f"{gguf_type}.gguf"
    report = export_gguf(model, path, tokenizer=bpe_tokenizer)
    if gguf_type == "mix_m":  # gguf-py reads every tensor back exactly (before, and without, llama.cpp)
        assert not report.lossy and report.rel_error == 0.0
        assert report.type_counts() == {"F16": 2, "F32": 5, "Q5_0": 11, "Q8_0": 1, "Q4_K": 1, "Q6_K": 1}
        _check_file_holds_the_weights(model, path, lambda name: MIX_M_TYPES.get(name, "Q5_0"))
    check_llama_cpp_greedy(model, bpe_tokenizer, path)


def test_kquant_checkpoint_reloads_with_per_layer_shapes(bpe_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _tiny_kquant_model(bpe_tokenizer, "q2_k")
    model.save_pretrained(tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for name, layer in model.named_modules():
        if isinstance(layer, DecoupleQLinear):
            other = again.get_submodule(name)
            assert (other.bits, other.effective_group_size) == (layer.bits, layer.effective_group_size)
            assert torch.equal(other.dequantize_weight(), layer.dequantize_weight())
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_per_layer_types_solve_save_resume_and_export_exactly(bpe_tokenizer, tmp_path, caplog):
    """`gguf_layer_types` (llama-quantize's mixes): each layer gets its own type, 5-bit layers are stored with 8-bit
    codes in [0, 31], a reload and a resumed run rebuild the same shapes and weights, and the export writes each
    layer's type exactly (read back per weight by gguf-py)."""
    from transformers import AutoModelForCausalLM

    model, _ = _tiny_kquant_model(bpe_tokenizer, "q4_k", MIX, checkpoint_dir=str(tmp_path / "resume"))
    expected = {"model.layers.0.self_attn.v_proj": ("q5_1", 5, False), "model.layers.1.mlp.down_proj": ("q5_k", 5, False),
                "model.layers.0.mlp.down_proj": ("q4_k", 4, False)}  # fmt: skip
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}
    for name, layer in layers.items():
        _, bits, _ = expected.get(name, ("q5_0", 5, True))
        assert layer.bits == (8 if bits == 5 else bits), name
        codes = layer.unpacked_codes()
        assert int(codes.max()) <= (1 << bits) - 1 and int(codes.max()) > (1 << (bits - 1)) - 1, name  # bits used
        assert layer.effective_group_size == 32
    # A resumed run restores every block from the resume folder with the same per-layer shapes and values.
    with caplog.at_level(logging.INFO, logger="hf_decoupleq"):
        again, _ = _tiny_kquant_model(bpe_tokenizer, "q4_k", MIX, checkpoint_dir=str(tmp_path / "resume"))
    assert caplog.text.count("restored from") == 2
    for name, layer in layers.items():
        other = again.get_submodule(name)
        assert other.bits == layer.bits and torch.equal(other.dequantize_weight(), layer.dequantize_weight())
    # Save and reload: config.json carries the per-layer types, the reload rebuilds the same packed shapes.
    model.save_pretrained(tmp_path / "ckpt")
    bpe_tokenizer.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.quantization_config.gguf_layer_types == MIX
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # Export from the saved folder: the types come from its config, every weight exactly.
    path = tmp_path / "mix.gguf"
    report = export_gguf(tmp_path / "ckpt", path)
    assert not report.lossy and report.rel_error == 0.0
    assert report.type_counts() == {"F16": 2, "F32": 5, "Q5_0": 11, "Q5_1": 1, "Q4_K": 1, "Q5_K": 1}
    _check_file_holds_the_weights(model, path, lambda name: expected.get(name, ("q5_0",))[0].upper())


def test_symmetric_checkpoint_with_blockwise_stage_exports_to_q4_0(bpe_tokenizer, tmp_path):
    from conftest import build_tiny_model, small_config
    from test_gguf_export import _check_layers_match

    model = build_tiny_model("llama", vocab_size=len(bpe_tokenizer))
    cfg = small_config(bits=4, group_size=32, symmetric=True, incoherence=False, rounds=1, blockwise_lr=1e-3)
    hf_decoupleq.quantize(model, cfg, tokenizer=bpe_tokenizer)
    assert all(b["blockwise_final_mse"] < b["blockwise_initial_mse"] for b in cfg.quantization_stats["blocks"])
    path = tmp_path / "sym.gguf"
    report = export_gguf(model, path, "q4_0", tokenizer=bpe_tokenizer)
    assert not report.lossy
    _check_layers_match(model, path, 4, 2, "Q4_0")


def test_kquant_export_refuses_layers_off_the_grid(bpe_tokenizer, tmp_path):
    from conftest import build_tiny_model, small_config

    model = build_tiny_model("llama", vocab_size=len(bpe_tokenizer))
    # A plain W2 g16 checkpoint of a model whose layers have K = 64 or 128: not Q2_K-shaped.
    hf_decoupleq.quantize(model, small_config(incoherence=False, blockwise=False, rounds=0), tokenizer=bpe_tokenizer)
    with pytest.raises(DecoupleQConfigError, match="not exactly representable"):
        export_gguf(model, tmp_path / "x.gguf", "q4_1", tokenizer=bpe_tokenizer,
                    tensor_types={"blk.*.ffn_down.weight": "q2_k"})  # fmt: skip
