"""GGUF export (`hf_decoupleq.export_gguf`, `decoupleq export`): exact Q4_1/Q4_0/Q8_0 paths checked against two
independent readers (gguf-py's dequantization, transformers' GGUF loader), refusals, the lossy path, the k-quant
block packers, and llama.cpp itself when its binaries are built (`examples/benchmarks/build_llamacpp.sh`)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WIKI_VALID, build_tiny_model, small_config

gguf = pytest.importorskip("gguf")

import hf_decoupleq
from hf_decoupleq import DecoupleQLinear, cli
from hf_decoupleq.errors import DecoupleQConfigError, UnsupportedModelError
from hf_decoupleq.export import export_gguf
from hf_decoupleq.export.ggml_blocks import quantize_k

LLAMA_CPP_DIR = Path(os.environ.get("HF_DECOUPLEQ_LLAMA_CPP", Path.home() / ".cache" / "hf-decoupleq" / "llama.cpp"))


def _bpe_tokenizer(text: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2 style, the kind GGUF's "gpt2" tokenizer model describes), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    return fast


@pytest.fixture(scope="module")
def bpe_tokenizer(wiki_text):
    return _bpe_tokenizer(wiki_text[:100_000])


def _quantized(tokenizer, arch="llama", **overrides):
    model = build_tiny_model(arch, vocab_size=len(tokenizer))
    cfg = small_config(
        **{"bits": 4, "group_size": 32, "incoherence": False, "dataset": str(WIKI_VALID), "rounds": 1, **overrides}
    )
    hf_decoupleq.quantize(model, cfg, tokenizer=tokenizer)
    return model


@pytest.fixture(scope="module")
def w4_asym(bpe_tokenizer):
    return _quantized(bpe_tokenizer)


@pytest.fixture(scope="module")
def w4_sym(bpe_tokenizer):
    # The block-wise stage trains zeros freely (it would break z = -8 s), so the symmetric checkpoint is layer-wise.
    return _quantized(bpe_tokenizer, symmetric=True, blockwise=False)


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def _file_weight(tensor) -> np.ndarray:
    """A tensor of the file as a float ``[rows, K]`` array, dequantized by gguf-py."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float64).reshape(int(tensor.shape[1]), int(tensor.shape[0]))


def _unpermute(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (pairs back to the HF half-split layout)."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _fp16_tolerance(layer: DecoupleQLinear) -> np.ndarray:
    """Per-weight bound of the fp16 rounding of s and z: |dq| * q_max * |s| + |dz|, with |dx| <= 2**-11 |x|."""
    from hf_decoupleq.packing import unpack

    g = layer.effective_group_size
    s = layer.scales.float().repeat_interleave(g, 0)[: layer.in_features].T.abs()
    z = layer.zeros.float().repeat_interleave(g, 0)[: layer.in_features].T.abs()
    q = unpack(layer.qweight, layer.bits, layer.in_features).float()
    return (2.0**-11 * (s * q + z) + 1e-7).double().numpy()


def _check_layers_match(model, path, n_head, n_head_kv, expected_type):
    _, tensors = _read(path)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, DecoupleQLinear):
            continue
        block = int(name.split(".")[2])
        t = tensors[f"blk.{block}.{names[name.rsplit('.', 1)[1]]}.weight"]
        assert t.tensor_type.name == expected_type
        w = _file_weight(t)
        if name.endswith("q_proj"):
            w = _unpermute(w, n_head)
        elif name.endswith("k_proj"):
            w = _unpermute(w, n_head_kv)
        ours = layer.dequantize_weight().double().numpy()
        assert np.all(np.abs(w - ours) <= _fp16_tolerance(layer)), name
        checked += 1
    assert checked == 14


def test_q4_1_matches_our_weights_and_transformers_reads_it(w4_asym, bpe_tokenizer, tmp_path):
    """Asymmetric W4 g32 -> Q4_1: gguf-py's dequantization equals our dequantized weights up to the fp16 rounding of
    s and z, and transformers' GGUF loader (a second reader, which also undoes the q/k permutation) gives our logits."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    report = export_gguf(w4_asym, path, tokenizer=bpe_tokenizer)
    assert {t.gguf_type for t in report.tensors if t.source != "float"} == {"Q4_1"}
    assert not report.lossy
    cfg = w4_asym.config
    _check_layers_match(w4_asym, path, cfg.num_attention_heads, cfg.num_key_value_heads, "Q4_1")

    reader, tensors = _read(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = bpe_tokenizer("The tower is 324 metres tall, about the same height", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = w4_asym(ids).logits
        theirs = loaded(ids).logits
    # Their weights are ours rounded through fp16 (scales, zeros, embeddings): agreement to ~1e-3 of the logit scale.
    assert torch.allclose(ours, theirs, atol=2e-3 * float(ours.abs().max()), rtol=0)


def test_qwen2_with_biases_and_tied_embeddings(bpe_tokenizer, tmp_path):
    """The qwen2 family: q/k/v biases, tied embeddings (no output.weight), no q/k permutation."""
    from transformers import AutoModelForCausalLM

    model = _quantized(bpe_tokenizer, arch="qwen2", blockwise=False)
    path = tmp_path / "qwen2.gguf"
    export_gguf(model, path, tokenizer=bpe_tokenizer)
    reader, tensors = _read(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen2"
    assert "blk.0.attn_q.bias" in tensors and "output.weight" not in tensors
    # No permutation for qwen2: the file's rows are ours.
    layer = model.model.layers[0].self_attn.q_proj
    w = _file_weight(tensors["blk.0.attn_q.weight"])
    assert np.all(np.abs(w - layer.dequantize_weight().double().numpy()) <= _fp16_tolerance(layer))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = bpe_tokenizer("The tower is 324 metres tall", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert torch.allclose(ours, theirs, atol=2e-3 * float(ours.abs().max()), rtol=0)


def test_q4_0_exact_for_symmetric_and_tokenizer_metadata(w4_sym, bpe_tokenizer, tmp_path):
    path = tmp_path / "sym.gguf"
    report = export_gguf(w4_sym, path, tokenizer=bpe_tokenizer)  # auto: the exact type is Q4_0
    assert {t.gguf_type for t in report.tensors if t.source != "float"} == {"Q4_0"}
    cfg = w4_sym.config
    _check_layers_match(w4_sym, path, cfg.num_attention_heads, cfg.num_key_value_heads, "Q4_0")
    reader, _ = _read(path)
    fields = reader.fields

    def value(key):
        return fields[key].contents()

    vocab = bpe_tokenizer.get_vocab()
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.bos_token_id") == bpe_tokenizer.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == bpe_tokenizer.eos_token_id
    types = value("tokenizer.ggml.token_type")
    assert types[bpe_tokenizer.bos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert len(value("tokenizer.ggml.merges")) > 0
    assert value("tokenizer.chat_template") == bpe_tokenizer.chat_template
    assert value("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert value("llama.block_count") == cfg.num_hidden_layers


def test_refusals_and_the_lossy_path(w4_asym, bpe_tokenizer, tmp_path):
    # Asymmetric codes do not fit Q4_0 (zero fixed at -8 d): refused without lossy, with the reason.
    with pytest.raises(DecoupleQConfigError, match="not -r \\* scales.*lossy=True"):
        export_gguf(w4_asym, tmp_path / "x.gguf", "q4_0", tokenizer=bpe_tokenizer)
    report = export_gguf(w4_asym, tmp_path / "x.gguf", "q4_0", lossy=True, tokenizer=bpe_tokenizer)
    assert len(report.lossy) == 14 and all(t.gguf_type == "Q4_0" for t in report.lossy)
    # The reported error is the file's: recompute it for one layer from the file.
    _, tensors = _read(tmp_path / "x.gguf")
    layer = w4_asym.model.layers[1].mlp.down_proj
    ours = layer.dequantize_weight().double().numpy()
    rel = np.linalg.norm(_file_weight(tensors["blk.1.ffn_down.weight"]) - ours) / np.linalg.norm(ours)
    record = next(t for t in report.tensors if t.name == "blk.1.ffn_down.weight")
    assert record.rel_error == pytest.approx(rel, rel=1e-4) and 0.01 < rel < 0.3
    # k-quants need K % 256 == 0: the tiny model's K = 64/128 falls back like llama-quantize (Q2_K -> Q4_0).
    report = export_gguf(w4_asym, tmp_path / "k.gguf", "q2_k", lossy=True, tokenizer=bpe_tokenizer)
    assert all(t.gguf_type == "Q4_0" and "multiple of 256" in t.note for t in report.lossy)


def test_rotated_and_unsupported_models_are_refused(bpe_tokenizer, tmp_path):
    rotated = _quantized(bpe_tokenizer, incoherence=True, blockwise=False)
    with pytest.raises(DecoupleQConfigError, match="incoherence=False"):
        export_gguf(rotated, tmp_path / "r.gguf", tokenizer=bpe_tokenizer)
    # With lossy=True the weights (rotated back) are requantized: Q4_1 of W = W_rot V.
    report = export_gguf(rotated, tmp_path / "r.gguf", "q4_1", lossy=True, tokenizer=bpe_tokenizer)
    assert len(report.lossy) == 14 and 0 < report.rel_error < 0.2
    opt = build_tiny_model("opt", vocab_size=len(bpe_tokenizer))
    with pytest.raises(UnsupportedModelError, match="llama"):
        export_gguf(opt, tmp_path / "o.gguf", tokenizer=bpe_tokenizer)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_blocks_read_back_by_gguf(qtype):
    """The k-quant packers write llama.cpp's block layout: gguf-py's reader recovers the values our quantizer chose,
    and the error is that of a 2/3/4/5/6-bit grid (a wrong bit position would give garbage)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 512)) * np.exp(rng.standard_normal((8, 1)))
    data = quantize_k(w, qtype)
    assert data.shape == (8, 512 // 256 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float64)
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    # Round-to-nearest on Gaussian data: 2 bits ~0.3+, 3 bits ~0.17, 4 bits ~0.09, 5 bits ~0.045, 6 bits (symmetric,
    # sub-blocks of 16) ~0.02 relative error.
    bound = {"Q2_K": 0.45, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]
    assert rel < bound
    # And it is at least as good as gguf-py's own lower-bit reference for the same budget where one exists:
    # every value lies on its sub-block's grid (re-quantizing the dequantized values is lossless).
    again = gguf.quants.dequantize(quantize_k(back, qtype), gguf.GGMLQuantizationType[qtype]).astype(np.float64)
    assert np.linalg.norm(again - back) <= 0.2 * np.linalg.norm(back - w)


def test_cli_export(tmp_path, bpe_tokenizer, w4_asym, capsys):
    folder = tmp_path / "ckpt"
    w4_asym.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    out = tmp_path / "m.gguf"
    assert (
        cli.main(["export", str(folder), "--format", "gguf:q4_1", "--output", str(out), "--log-level", "warning"]) == 0
    )
    assert "Q4_1" in capsys.readouterr().out
    _check_layers_match(w4_asym, out, 4, 2, "Q4_1")
    # Refusals are usage errors (exit 2) with the reason on one line; nothing is written.
    assert cli.main(["export", str(folder), "--format", "gguf:q4_1", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = tmp_path / "q4_0.gguf"
    assert cli.main(["export", str(folder), "--format", "gguf:q4_0", "--output", str(other)]) == 2
    assert "--allow-lossy" in capsys.readouterr().err and not other.exists()
    assert cli.main(["export", str(folder), "--format", "onnx", "--output", str(other)]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp itself (skipped unless its binaries are built)
# ---------------------------------------------------------------------------------------------------------------------


def _binary(name: str) -> Path:
    path = LLAMA_CPP_DIR / "build" / "bin" / name
    if not path.is_file():
        message = f"{path} not built (run examples/benchmarks/build_llamacpp.sh, or set HF_DECOUPLEQ_LLAMA_CPP)"
        if os.environ.get("HF_DECOUPLEQ_REQUIRE_LLAMA_CPP"):  # .ci/run builds it: a missing binary is a failure there
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_llama_cpp_generates_with_exported_file(w4_asym, bpe_tokenizer, tmp_path):
    """llama.cpp loads the exported file and its greedy continuation is ours (same weights up to fp16 rounding)."""
    path = tmp_path / "tiny.gguf"
    export_gguf(w4_asym, path, tokenizer=bpe_tokenizer)
    check_llama_cpp_greedy(w4_asym, bpe_tokenizer, path)


PROMPTS = ("The tower is", "In the year", "The song was", "He was born")


def _clear_greedy_steps(model, tokenizer, prompt: str) -> tuple[list[int], int]:
    """`model`'s 8 greedy tokens after `prompt`, and how many come before the first near-tie or special token."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
    # A random model's top two logits can nearly tie, and llama.cpp computes in lower precision (fp16 weights, 8-bit
    # activations): compare the steps before the first near-tie only (margin under 2% of the logit range).
    # Special tokens end the comparison too: llama.cpp stops at end-of-generation tokens and prints no control tokens.
    new_ids = out.sequences[0, ids.shape[1] :].tolist()
    steps = 0
    for logits, token in zip(out.logits, new_ids):
        top = logits[0].topk(2).values
        if token in tokenizer.all_special_ids or float(top[0] - top[1]) < 0.02 * float(
            logits[0].max() - logits[0].min()
        ):
            break
        steps += 1
    return new_ids, steps


def check_llama_cpp_greedy(model, tokenizer, path: Path) -> None:
    """llama.cpp's greedy continuation from the GGUF file at `path` is `model`'s own (up to near-ties).

    The prompt is the one of PROMPTS on which `model` itself has the longest clear greedy path: tiny random models
    often have a near-tie within a step or two, where fp16 rounding may legitimately pick the other token.
    """
    binary = _binary("llama-completion")
    prompt, (new_ids, steps) = max(
        ((p, _clear_greedy_steps(model, tokenizer, p)) for p in PROMPTS), key=lambda item: item[1][1]
    )
    assert steps >= 2, "the tiny model's greedy path has no clear margin on any prompt; change the seed"
    # --no-repack: ggml's AMX path faults on VMs that advertise AMX without enabling it; the result is the same.
    cmd = [binary, "-m", path, "-p", prompt, "-n", "8", "--temp", "0", "-no-cnv", "--no-repack", "-t", "2", "-c", "64"]

    def llama_cpp() -> subprocess.CompletedProcess:
        run = subprocess.run(
            [str(c) for c in cmd], check=False, capture_output=True, timeout=300, stdin=subprocess.DEVNULL
        )
        assert run.returncode == 0, run.stderr[-2000:].decode(errors="replace")
        return run

    run = llama_cpp()
    # A random model emits arbitrary bytes: compare bytes (byte-level BPE tokens map characters back to bytes).
    byte_of = {c: b for b, c in gguf.vocab.bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(new_ids[:steps])
    expected = bytes(byte_of[c] for tok in tokens for c in tok)
    # This llama.cpp prints the text through an asynchronous logger that is not always flushed before the process
    # exits when stdout is a pipe: about half the runs here print the prompt and continuation, the rest a part or
    # nothing. Run it again until one prints in full (a wrong continuation never matches, however often it runs).
    outputs = [run.stdout]
    while prompt.encode() + expected not in outputs[-1] and len(outputs) < 30:
        outputs.append(llama_cpp().stdout)
    assert prompt.encode() + expected in outputs[-1], (expected, max(outputs, key=len))
