"""Export a decoupleQ checkpoint to a GGUF file that llama.cpp (and Ollama, LM Studio) run.

The file is written with gguf-py's ``GGUFWriter``: the architecture's hyperparameters, the tokenizer (tokens, token
types, merges, special ids, chat template) and the tensors under llama.cpp's names. Quantized layers go in as raw
GGML block bytes packed here in numpy; everything else is F16 (2-D) or F32 (1-D), as llama.cpp's own
``convert_hf_to_gguf.py`` writes them.

Exact paths (the only loss is rounding each block's scale and zero to fp16), for ``K`` and the group size multiples
of 32 and checkpoints without incoherence processing:

* ``Q4_1`` (``w = d q + m``): codes in ``[0, 15]`` (any checkpoint with ``bits <= 4``; ``d = s``, ``m = z`` per block
  of 32);
* ``Q5_1`` (``w = d q + m``): codes in ``[0, 31]`` (``bits <= 4``, or the 5-bit layers of ``gguf_type`` checkpoints,
  stored with 8-bit codes);
* ``Q4_0`` (``w = d (q - 8)``), ``Q5_0`` (``w = d (q - 16)``), ``Q8_0`` (``w = d q``): symmetric layers
  (``z = -r s`` with one integer ``r`` per layer, ``r = 2**(bits-1)`` for ``symmetric=True`` checkpoints, 128 for the
  ``Q8_0`` layers of ``gguf_type`` checkpoints) whose shifted codes ``q - r + 8`` / ``q - r + 16`` / ``q - r`` fit the
  type;
* ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``: checkpoints made with ``DecoupleQConfig(gguf_type=...)``, whose
  float32 scales and zeros lie on the k-quant grid: ``d``, ``sc``, ``dmin``, ``m`` are recovered exactly and the file
  holds exactly the checkpoint's weights (no fp16 rounding left: the solver already rounded ``d`` and ``dmin``; the
  block-32 layers of such a checkpoint also hold fp16 values already).

Anything else (other group sizes, asymmetric to ``Q4_0``, k-quants of other checkpoints, rotated checkpoints) only goes
through ``lossy=True``: the dequantized weight is requantized to the type and the relative weight error it adds is logged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DecoupleQConfigError, UnsupportedModelError
from ..format import storage_bits
from ..solver.kquant import K_FALLBACK  # llama-quantize's fallback for rows that are not a multiple of 256 long
from .ggml_blocks import KQUANT_LEVELS, pack_kquant, pack_q4_0, pack_q4_1, pack_q5_0, pack_q5_1, pack_q8_0, quantize_k

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "GGUF_TYPES", "GGUFExportReport", "TensorRecord", "export_gguf"]

# transformers model_type -> (gguf architecture, whether llama.cpp expects q/k rows permuted for its RoPE layout).
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
# Quantized tensor types this exporter writes (lower case, as in ``--format gguf:q4_0``).
GGUF_TYPES = ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
FLOAT_TYPES = ("f16", "f32")
_FILE_TYPES = {
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q8_0": "MOSTLY_Q8_0", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S",
    "q6_k": "MOSTLY_Q6_K",
    "f16": "MOSTLY_F16", "f32": "ALL_F32",
}  # fmt: skip
# Pre-tokenizer regexes of the tokenizer families llama.cpp knows by name (tokenizer.json "Split" patterns).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor of the exported file.

    Attributes:
        name (`str`): the GGUF tensor name (``blk.0.attn_q.weight``).
        gguf_type (`str`): its GGML type (``Q4_1``, ``F16``, ...).
        source (`str`): ``"exact"`` (the checkpoint's codes, scales/zeros rounded to fp16), ``"requantized"`` (the
            dequantized weight quantized again: lossy) or ``"float"`` (a full-precision tensor).
        rel_error (`float`): ``||W_file - W||_F / ||W||_F`` against the checkpoint's dequantized weight (quantized
            layers only; 0 for float tensors).
        note (`str`): why a layer was requantized or fell back to another type.
    """

    name: str
    gguf_type: str
    source: str
    rel_error: float = 0.0
    note: str = ""


@dataclasses.dataclass
class GGUFExportReport:
    """What :func:`export_gguf` wrote.

    Attributes:
        path (`str`): the file.
        file_size (`int`): its size in bytes.
        tensors (`list[TensorRecord]`): every tensor, in file order.
        rel_error (`float`): relative Frobenius error of all quantized layers together against the checkpoint.
    """

    path: str
    file_size: int
    tensors: list[TensorRecord]
    rel_error: float

    @property
    def lossy(self) -> list[TensorRecord]:
        """The requantized tensors."""
        return [t for t in self.tensors if t.source == "requantized"]

    def type_counts(self) -> dict[str, int]:
        """Number of tensors per GGML type."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.gguf_type] = counts.get(t.gguf_type, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _load(model_or_path: Any, tokenizer: Any) -> tuple[Any, Any]:
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hf_decoupleq  # noqa: F401  (registers "decoupleq" so the packed layers load as DecoupleQLinear)

        spec = os.fspath(model_or_path)
        if not os.path.isdir(spec):
            raise DecoupleQConfigError(f"checkpoint folder not found: {spec!r}")
        logger.info("loading %s", spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype="auto")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(spec)
    else:
        model = model_or_path
    if tokenizer is None:
        raise DecoupleQConfigError("export_gguf needs the tokenizer: pass tokenizer= with an in-memory model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------------


def _rope_params(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params and getattr(config, "rope_scaling", None):
        params = dict(config.rope_scaling)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _add_hparams(writer: Any, config: Any, arch: str) -> None:
    import gguf

    head_count = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // head_count
    if head_dim * head_count != config.hidden_size and arch == "llama":
        # llama.cpp reads these from the keys below, but its llama graph assumes n_embd_head == n_embd / n_head
        # unless key_length/value_length are written; write them so any head_dim is described.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or head_count)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope_params(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise UnsupportedModelError(
            f"RoPE scaling {rope_type!r} is not supported by the GGUF exporter (supported: none, 'linear')"
        )
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)


def _pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer a ``tokenizer.json`` describes, or None if it is not a known one."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _adds_token(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer puts ``token_id`` at the start (``first``) or end of an encoded text (tested, not read
    from its config, because what it does is what the perplexity and chat formats depend on)."""
    if token_id is None:
        return False
    ids = tokenizer("hello world")["input_ids"]
    return (
        bool(ids)
        and ids[0 if first else -1] == token_id
        and (tokenizer("hello world", add_special_tokens=False)["input_ids"] != ids)
    )


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, tokenizer_pre: str | None) -> str:
    """Write the tokenizer as a GPT-2-style BPE vocabulary (llama.cpp's ``gpt2`` tokenizer model)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; the GGUF exporter writes byte-level "
            "BPE vocabularies from tokenizer.json"
        )
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tj.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise UnsupportedModelError(
            "only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2) are exported; this one is "
            f"{model.get('type')} with byte_fallback={model.get('byte_fallback')} (SentencePiece-style vocabularies "
            "are not supported yet)"
        )
    pre = tokenizer_pre or _pre_tokenizer_name(tj)
    if pre is None:
        raise UnsupportedModelError(
            "the tokenizer's pre-tokenizer is not one the exporter recognizes (GPT-2, SmolLM, Llama 3, Qwen2 "
            f"patterns): {json.dumps(tj.get('pre_tokenizer'))[:300]}; pass tokenizer_pre= (--tokenizer-pre) with "
            "llama.cpp's name for it"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedModelError(f"tokenizer ids reach {max(vocab.values())} but the model has {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {tok.content: tok for tok in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special token ids and the chat template through gguf-py's reader of a saved tokenizer folder.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise UnsupportedModelError("the tokenizer has no BPE merges")
        special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(_adds_token(tokenizer, tokenizer.bos_token_id, first=True))
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(_adds_token(tokenizer, tokenizer.eos_token_id, first=False))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return pre


# ---------------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------------


def _permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, rows ``[0, 2, 4, ..., 1, 3, 5, ...]`` of the HF half-split
    RoPE layout become interleaved pairs (any trailing dimensions move with their row)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _per_block(t: torch.Tensor, group: int, k: int) -> np.ndarray:
    """``[G, N]`` per-group values -> ``[N, K / 32]`` per 32-value block (float32)."""
    idx = torch.arange(k // 32) * 32 // group
    return t.detach().float().T[:, idx].cpu().numpy()


# Block-32 types: (code bits, offset added to a symmetric layer's codes after removing its own ``r``; None: asymmetric).
_BLOCK32 = {"q4_0": (4, 8), "q5_0": (5, 16), "q8_0": (8, 0), "q4_1": (4, None), "q5_1": (5, None)}


def _codes(layer: Any) -> torch.Tensor:
    from ..packing import unpack

    return unpack(layer.qweight, layer.bits, layer.in_features)


def _symmetric_offset(layer: Any) -> int | None:
    """``r`` if the layer's zeros are ``-r * scales`` for one integer ``r`` (to the stored precision), else None."""
    s, z = layer.scales.detach().double(), layer.zeros.detach().double()
    nonzero = s != 0
    if not bool(nonzero.any()):
        return None
    r = int(torch.round(torch.median(-z[nonzero] / s[nonzero])))
    # Scaling by a power of two is exact in binary floating point, so a symmetric checkpoint satisfies this to the
    # stored precision; a free zero (asymmetric, or moved by the block-wise stage) does not.
    if not torch.allclose(z, -r * s, rtol=1e-3, atol=1e-12 + 1e-3 * float(s.abs().max())):
        return None
    return r


def _code_range(layer: Any, shift: int) -> tuple[int, int]:
    """``(min, max)`` of the layer's codes plus ``shift`` (from the code width alone when that suffices)."""
    if layer.bits <= 4:  # native widths: the range is known without unpacking
        return shift, (1 << layer.bits) - 1 + shift
    codes = _codes(layer)
    return int(codes.min()) + shift, int(codes.max()) + shift


def _exact_reason(layer: Any, qtype: str) -> str:
    """Why ``qtype`` blocks cannot hold the layer's codes exactly, or ``""`` if they can."""
    k, bits, g = layer.in_features, layer.bits, layer.effective_group_size
    if getattr(layer, "hadamard_signs", None) is not None:
        return "rotated (incoherence processing)"
    if qtype.upper() in KQUANT_LEVELS:
        sub, kbits, _, _ = KQUANT_LEVELS[qtype.upper()]
        if bits != storage_bits(kbits) or g != sub or k % 256:
            return (
                f"{qtype.upper()} holds {kbits}-bit codes in sub-blocks of {sub} with K % 256 == 0, this layer is "
                f"W{bits} g{g} with K={k} (quantize with gguf_type={qtype!r})"
            )
        result = _kquant_bytes(layer, qtype)
        return result if isinstance(result, str) else ""
    if k % 32 or g % 32:
        return f"in_features {k} and group size {g} must be multiples of 32"
    if qtype not in _BLOCK32:
        return f"{qtype.upper()} does not hold a {bits}-bit g{g} checkpoint"
    tbits, offset = _BLOCK32[qtype]
    lo, hi = (0, (1 << tbits) - 1) if offset is None else (-(1 << (tbits - 1)), (1 << (tbits - 1)) - 1)
    if offset is None:
        shift = 0
    else:
        r = _symmetric_offset(layer)
        if r is None:
            return f"zeros are not -r * scales for one integer r (not a symmetric checkpoint); {qtype.upper()} needs that"
        shift, lo, hi = offset - r, lo + offset, hi + offset
    cmin, cmax = _code_range(layer, shift)
    if cmin < lo or cmax > hi:
        return f"{qtype.upper()} holds {tbits}-bit codes; this layer's (shifted) codes span [{cmin}, {cmax}]"
    return ""


def _kquant_bytes(layer: Any, qtype: str) -> np.ndarray | str:
    """The layer's k-quant blocks, or why its scales and zeros are not on the grid of ``qtype``."""
    if layer.scales.dtype != torch.float32:
        return f"scales are {str(layer.scales.dtype).removeprefix('torch.')}, which cannot hold d * sc exactly " \
            "(quantize a float32 model for an exact k-quant export)"
    scales = layer.scales.detach().T.double().cpu().numpy()
    zeros = layer.zeros.detach().T.double().cpu().numpy()
    return pack_kquant(_codes(layer).numpy(), scales, zeros, qtype.upper())


def _exact_bytes(layer: Any, qtype: str) -> np.ndarray:
    """The layer's codes in ``qtype`` blocks (for a layer and type with an empty :func:`_exact_reason`)."""
    if qtype.upper() in KQUANT_LEVELS:
        return _kquant_bytes(layer, qtype)
    k, g = layer.in_features, layer.effective_group_size
    s = _per_block(layer.scales, g, k)
    codes = _codes(layer).numpy().astype(np.int16)
    if qtype in ("q4_1", "q5_1"):
        return (pack_q4_1 if qtype == "q4_1" else pack_q5_1)(codes, s, _per_block(layer.zeros, g, k))
    shifted = codes + (_BLOCK32[qtype][1] - _symmetric_offset(layer))
    return {"q4_0": pack_q4_0, "q5_0": pack_q5_0, "q8_0": pack_q8_0}[qtype](shifted, s)


def _requantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize a float weight ``[N, K]`` to ``qtype`` block bytes (lossy)."""
    import gguf

    if qtype.upper() in KQUANT_LEVELS:
        return quantize_k(w, qtype.upper())
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType[qtype.upper()])


def _dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype.upper()])


def _resolve_type(gguf_name: str, default: str, tensor_types: dict[str, str] | None) -> str:
    for pattern, qtype in (tensor_types or {}).items():
        if fnmatch.fnmatchcase(gguf_name, pattern):
            return qtype.lower()
    return default


def _check_type(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise DecoupleQConfigError(f"{name}={value!r} is not supported; allowed: {allowed}")
    return value


def _checkpoint_gguf_types(config: Any) -> tuple[str | None, dict[str, str] | None]:
    """``gguf_type`` and ``gguf_layer_types`` of the checkpoint's quantization config (a checkpoint made with them
    exports as those types)."""
    qc = getattr(config, "quantization_config", None)
    get = qc.get if isinstance(qc, dict) else lambda key: getattr(qc, key, None)
    value = get("gguf_type")
    return (str(value).lower() if value else None), get("gguf_layer_types") or None


def _auto_type(layers: dict[str, Any]) -> str:
    """The exact type for a checkpoint's layers: Q4_0 for symmetric <= 4 bits, Q8_0 for symmetric 8 bits, else Q4_1."""
    for qtype in ("q4_0", "q8_0", "q4_1"):
        if not any(_exact_reason(layer, qtype) for layer in layers.values()):
            return qtype
    return "q4_1"


def export_gguf(
    model_or_path: Any,
    path: str | os.PathLike,
    quant_type: str | None = None,
    *,
    lossy: bool = False,
    tokenizer: Any = None,
    tensor_types: dict[str, str] | None = None,
    embedding_type: str = "f16",
    output_type: str = "f16",
    tokenizer_pre: str | None = None,
    name: str | None = None,
) -> GGUFExportReport:
    """Write a decoupleQ checkpoint as a GGUF file for llama.cpp / Ollama.

    Args:
        model_or_path: a saved decoupleQ checkpoint folder (its tokenizer is read from the same folder), or a loaded
            model whose quantized layers are `DecoupleQLinear` (then pass ``tokenizer``).
        path: the ``.gguf`` file to write (overwritten).
        quant_type (`str`, *optional*): GGML type of the quantized layers, one of `GGUF_TYPES`. `None` picks the type
            that holds the checkpoint exactly: the checkpoint's ``gguf_type`` and ``gguf_layer_types`` (with
            llama-quantize's fallback for layers whose ``in_features`` is not a multiple of 256), else ``q4_0`` for
            symmetric W4, ``q8_0`` for symmetric W8, else ``q4_1``.
        lossy (`bool`, defaults to `False`): allow layers the type cannot hold exactly (other group sizes, k-quants,
            asymmetric to ``q4_0``, rotated checkpoints): their dequantized weight is requantized to the type and the
            relative weight error is logged and reported. Without it such layers raise `DecoupleQConfigError`.
        tokenizer: the tokenizer (object or folder); defaults to the checkpoint folder's.
        tensor_types (`dict[str, str]`, *optional*): per-tensor types by GGUF tensor name or `fnmatch` pattern
            (``{"blk.*.ffn_down.weight": "q3_k"}``), first match wins; the rest get ``quant_type``. Applies to the
            quantized layers only.
        embedding_type (`str`, defaults to "f16"): type of ``token_embd.weight`` ("f16", "f32" or a quantized type).
        output_type (`str`, defaults to "f16"): type of a full-precision ``output.weight`` (untied ``lm_head``).
        tokenizer_pre (`str`, *optional*): llama.cpp's pre-tokenizer name; by default it is recognized from
            ``tokenizer.json`` (``gpt-2``, ``smollm``, ``llama-bpe``, ``qwen2``).
        name (`str`, *optional*): ``general.name``; defaults to the checkpoint's ``name_or_path``.

    Returns:
        `GGUFExportReport` with every tensor's type, how it was produced and its relative error.

    Raises:
        DecoupleQConfigError: an unknown type, or layers the type cannot hold exactly without ``lossy=True``.
        UnsupportedModelError: an architecture or tokenizer llama.cpp's GGUF conventions are not implemented for here.
    """
    import gguf

    if quant_type is not None:
        quant_type = _check_type("quant_type", quant_type, GGUF_TYPES)
    embedding_type = _check_type("embedding_type", embedding_type, FLOAT_TYPES + GGUF_TYPES)
    output_type = _check_type("output_type", output_type, FLOAT_TYPES + GGUF_TYPES)
    for pattern, qtype in (tensor_types or {}).items():
        _check_type(f"tensor_types[{pattern!r}]", qtype, GGUF_TYPES)
    model, tokenizer = _load(model_or_path, tokenizer)
    config = model.config
    arch, layers = _packed_layers(model, lossy)
    ckpt_type, ckpt_layer_types = _checkpoint_gguf_types(model.config)
    default_type = quant_type or ckpt_type or _auto_type(layers)
    layer_types = None
    if quant_type is None and ckpt_type is not None and ckpt_layer_types:
        from ..solver.kquant import resolve_gguf_type

        layer_types = {n: resolve_gguf_type(n, ckpt_type, ckpt_layer_types) for n in layers}
    names = _Names(gguf, config, arch)
    plans = _plan_layers(layers, names, default_type, tensor_types, lossy, layer_types)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model")
    _add_hparams(writer, config, arch)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[default_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    logger.info("tokenizer: gpt2 BPE, pre-tokenizer %r, %d tokens", pre, config.vocab_size)

    tensors = _TensorWriter(gguf, writer, names)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            if leaf == "bias":
                tensors.add_bias(key, tensor)
            elif leaf == "qweight":  # scales, zeros, signs: inside the blocks
                tensors.add_packed(owner, layers[owner], plans[owner])
        elif not (tied and key == "lm_head.weight"):
            tensors.add_float(key, tensor, embedding_type=embedding_type, output_type=output_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    total_rel = (tensors.err_sq / tensors.ref_sq) ** 0.5 if tensors.ref_sq > 0 else 0.0
    report = GGUFExportReport(str(path), path.stat().st_size, tensors.records, total_rel)
    n_lossy = len(report.lossy)
    logger.info(
        "wrote %s (%.1f MiB): %s; quantized layers' relative weight error %.2e%s",
        path, report.file_size / 2**20, report.type_counts(), total_rel,
        f" ({n_lossy} tensors requantized)" if n_lossy else " (exact up to fp16 scales)",
    )  # fmt: skip
    return report


def _packed_layers(model: Any, lossy: bool) -> tuple[str, dict[str, Any]]:
    """The GGUF architecture and the model's `DecoupleQLinear`s by name, after checking that they can be exported
    (a supported family, a decoupleQ model, no incoherence unless `lossy`)."""
    from ..nn.linear import DecoupleQLinear

    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF export supports the model families {sorted(ARCHITECTURES)}, not {model_type!r}"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DecoupleQLinear)}
    if not layers:
        raise DecoupleQConfigError("the model has no DecoupleQLinear layers: it is not a decoupleQ checkpoint")
    rotated = [n for n, m in layers.items() if m.hadamard_signs is not None]
    if rotated and not lossy:
        raise DecoupleQConfigError(
            f"{len(rotated)} layers (e.g. {rotated[0]}) were quantized with incoherence processing: their codes "
            "describe the weight in a rotated basis that GGUF block types cannot express. Re-quantize with "
            "incoherence=False (--no-incoherence) for an exact GGUF export, or pass lossy=True (--allow-lossy) to "
            "requantize the dequantized weights (adds error)."
        )
    return ARCHITECTURES[model_type][0], layers


class _Names:
    """llama.cpp's tensor names, and its row order of q/k projections, for one model."""

    def __init__(self, gguf: Any, config: Any, arch: str) -> None:
        self.model_type = config.model_type
        self.permute_qk = ARCHITECTURES[self.model_type][1]
        self.n_head = config.num_attention_heads
        self.n_head_kv = getattr(config, "num_key_value_heads", None) or self.n_head
        self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)

    def gguf_name(self, hf_name: str) -> str:
        mapped = self.tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedModelError(f"no GGUF name for tensor {hf_name!r} of a {self.model_type} model")
        return mapped

    def permute(self, hf_name: str, x: np.ndarray) -> np.ndarray:
        if self.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute_rows(x, self.n_head)
        if self.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute_rows(x, self.n_head_kv)
        return x


def _plan_layers(
    layers: dict[str, Any],
    names: _Names,
    default_type: str,
    tensor_types: dict[str, str] | None,
    lossy: bool,
    layer_types: dict[str, str] | None = None,
) -> dict[str, tuple[str, str, bool, str]]:
    """`(gguf name, type, exact, note)` of every quantized layer, planned before anything is written, so a refusal
    costs nothing and names every offending layer. `layer_types` (by module name) replaces `default_type` per layer;
    `tensor_types` (by GGUF name) wins over both."""
    plans: dict[str, tuple[str, str, bool, str]] = {}
    refused: list[str] = []
    for lname, layer in layers.items():
        hf_name = f"{lname}.weight"
        out_name = names.gguf_name(hf_name)
        qtype = _resolve_type(out_name, (layer_types or {}).get(lname, default_type), tensor_types)
        note = ""
        if qtype in K_FALLBACK and layer.in_features % 256:
            fallback = K_FALLBACK[qtype]
            note = f"K={layer.in_features} is not a multiple of 256: {qtype.upper()} -> {fallback.upper()}"
            logger.info("%s: %s (as llama-quantize does)", out_name, note)
            qtype = fallback
        reason = _exact_reason(layer, qtype)
        if reason:
            refused.append(f"{lname} ({reason})")
            note = f"{note}; {reason}" if note else reason
        plans[lname] = (out_name, qtype, not reason, note)
    if refused and not lossy:
        shown = "; ".join(refused[:4]) + (f"; and {len(refused) - 4} more" if len(refused) > 4 else "")
        raise DecoupleQConfigError(
            f"{len(refused)} of {len(layers)} layers are not exactly representable as the requested GGUF types: "
            f"{shown}. Pass lossy=True (--allow-lossy) to requantize them (the added error is reported), or pick "
            "quant_type='q4_1' (exact for bits <= 4 and group sizes that are multiples of 32)."
        )
    return plans


class _TensorWriter:
    """Adds tensors to the GGUF writer under llama.cpp's names and keeps a `TensorRecord` of each, plus the summed
    squared weight error (and reference) of the quantized layers."""

    def __init__(self, gguf: Any, writer: Any, names: _Names) -> None:
        self.gguf, self.writer, self.names = gguf, writer, names
        self.records: list[TensorRecord] = []
        self.err_sq, self.ref_sq = 0.0, 0.0

    def add_packed(self, owner: str, layer: Any, plan: tuple[str, str, bool, str]) -> None:
        """A packed layer's weight: its exact GGML blocks, or the dequantized weight requantized."""
        out_name, qtype, exact, note = plan
        w_ref = layer.dequantize_weight().detach().float().cpu().numpy()
        if exact:
            data, source = _exact_bytes(layer, qtype), "exact"
        else:
            data, source = _requantize(w_ref, qtype), "requantized"
        w_file = _dequantize(data, qtype)
        e, r = float(((w_file - w_ref) ** 2).sum()), float((w_ref**2).sum())
        self.err_sq, self.ref_sq = self.err_sq + e, self.ref_sq + r
        rel = (e / r) ** 0.5 if r > 0 else 0.0
        if source == "requantized":
            logger.warning("%s: requantized to %s, relative weight error %.4f (%s)", out_name, qtype.upper(), rel,
                           note)  # fmt: skip
        self.writer.add_tensor(
            out_name, self.names.permute(f"{owner}.weight", data),
            raw_dtype=self.gguf.GGMLQuantizationType[qtype.upper()],
        )  # fmt: skip
        self.records.append(TensorRecord(out_name, qtype.upper(), source, rel, note))

    def add_bias(self, key: str, tensor: torch.Tensor) -> None:
        """A packed layer's bias, in float32."""
        arr = self.names.permute(key, tensor.detach().float().cpu().numpy())
        self.writer.add_tensor(self.names.gguf_name(key), arr)
        self.records.append(TensorRecord(self.names.gguf_name(key), "F32", "float"))

    def add_float(self, key: str, tensor: torch.Tensor, *, embedding_type: str, output_type: str) -> None:
        """A full-precision tensor: F32 if 1-D (norms, biases), else `embedding_type` for the token embedding and
        `output_type` for the rest (a float type, or a quantized one by requantization)."""
        out_name = self.names.gguf_name(key)
        arr = self.names.permute(key, tensor.detach().float().cpu().numpy())
        if arr.ndim == 1:
            self.writer.add_tensor(out_name, arr.astype(np.float32))
            self.records.append(TensorRecord(out_name, "F32", "float"))
            return
        ftype = embedding_type if out_name == "token_embd.weight" else output_type
        if ftype in FLOAT_TYPES:
            self.writer.add_tensor(out_name, arr.astype(np.float16 if ftype == "f16" else np.float32))
            self.records.append(TensorRecord(out_name, ftype.upper(), "float"))
        else:
            data = _requantize(arr, ftype)
            rel = float(np.linalg.norm(_dequantize(data, ftype) - arr) / max(np.linalg.norm(arr), 1e-30))
            self.writer.add_tensor(out_name, data, raw_dtype=self.gguf.GGMLQuantizationType[ftype.upper()])
            self.records.append(TensorRecord(out_name, ftype.upper(), "requantized", rel, "full-precision tensor"))
