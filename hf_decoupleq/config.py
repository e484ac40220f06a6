"""`DecoupleQConfig`: every option of quantize-on-load, validated, JSON-safe, round-trippable."""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import DecoupleQConfigError
from .packing import FORMAT_VERSION

QUANT_METHOD = "decoupleq"
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_METHODS = ("decoupleq", "gptq", "rtn")
KNOWN_DATASETS = ("wikitext2", "c4", "pile", "self")
BLOCKWISE_OPTIMIZERS = ("adam", "signsgd")
# blockwise_lr=None means: Adam at the paper's 1e-5; SignSGD at AutoRound's 5e-3 (relative to the scales).
DEFAULT_BLOCKWISE_LR = {"adam": 1e-5, "signsgd": 5e-3}
# e2e_lr=None means: this relative step below 4 bits, the smaller one from 4 bits on (measured on SmolLM2-135M).
DEFAULT_E2E_LR_LOW_BITS = 1.5e-3
DEFAULT_E2E_LR_HIGH_BITS = 3e-4
# e2e_samples=None means: this many times num_samples windows for the end-to-end stage (measured on SmolLM2-135M).
DEFAULT_E2E_SAMPLES_FACTOR = 1.5

# Fields that change the numbers a run produces. A resume directory written with different values is refused.
# (The end-to-end stage's fields are not among them: it runs after the last block, on the blocks the resume
# directory holds, so a run may resume with other e2e settings.)
RESULT_FIELDS = (
    "bits",
    "group_size",
    "symmetric",
    "act_order",
    "rounds",
    "damp",
    "method",
    "integer_zero",
    "blockwise",
    "blockwise_epochs",
    "blockwise_lr",
    "blockwise_weight_decay",
    "blockwise_optimizer",
    "train_norms",
    "num_samples",
    "seq_len",
    "seed",
    "modules_to_not_convert",
    "true_sequential",
    "dataset",
    "batch_size",
    "calibration_dtype",
    "incoherence",
    "gguf_type",
    "gguf_layer_types",
    "format_version",
)

# gguf_type -> (bits, group_size, symmetric) of its layers whose in_features is a multiple of 256. The solver's own
# table is hf_decoupleq.solver.kquant.layer_format (this module imports only errors and packing; a test checks that
# the two agree).
GGUF_LAYERS = {"q2_k": (2, 16, False), "q3_k": (3, 16, True), "q4_k": (4, 32, False), "q5_k": (5, 32, False),
               "q6_k": (6, 16, True), "q4_0": (4, 32, True), "q5_0": (5, 32, True), "q5_1": (5, 32, False),
               "q8_0": (8, 32, True)}  # fmt: skip

# calibration_dtype values: forwards during calibration run under autocast to this dtype.
CALIBRATION_DTYPES = ("float32", "bfloat16", "float16")
# batch_size / calibration_dtype value chosen per run from the hardware (hf_decoupleq.hardware).
AUTO = "auto"


def _dtype_name(dtype: Any) -> Any:
    """`torch.bfloat16` / "torch.bfloat16" / "bf16" -> "bfloat16"; "model" / "none" -> None (the model's dtype);
    anything else is returned for validation."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in ("model", "none")):
        return None
    name = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )


def _describe_dataset(dataset: Any) -> Any:
    """A JSON-safe description of a dataset argument (objects never go into config.json)."""
    if dataset is None or isinstance(dataset, str):
        return dataset
    if isinstance(dataset, os.PathLike):
        return os.fspath(dataset)
    if isinstance(dataset, (list, tuple)):
        if all(isinstance(x, str) for x in dataset):
            return f"<list of {len(dataset)} strings>"
        return f"<list of {len(dataset)} items>"
    try:
        import torch

        if isinstance(dataset, torch.Tensor):
            return f"<tokenized tensor {list(dataset.shape)}>"
    except ImportError:  # pragma: no cover
        pass
    name = type(dataset).__name__
    length = getattr(dataset, "num_rows", None)
    return f"<{name}{'' if length is None else f' with {length} rows'}>"


def _describe_tokenizer(tokenizer: Any) -> str | None:
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    if isinstance(tokenizer, os.PathLike):
        return os.fspath(tokenizer)
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


class DecoupleQConfig(QuantizationConfigMixin):
    r"""Configuration of decoupleQ quantization (arXiv 2404.12759) for `from_pretrained`.

    Passing it as `quantization_config` quantizes the model on load: calibration windows are drawn from
    `dataset`, every linear layer of every decoder block (except `modules_to_not_convert`) is solved with the
    two-stage decoupleQ solver, and replaced by a packed `DecoupleQLinear`. Saved checkpoints record this config
    in `config.json` and reload packed, without calibration.

    Args:
        bits (`int`, defaults to 2): bits per weight code; one of 2, 3, 4, 8.
        group_size (`int`, defaults to 64): input columns sharing one (scale, zero); -1 for one group per row.
        symmetric (`bool`, defaults to False): zero fixed at `-scale * 2**(bits-1)` instead of a free float.
        act_order (`bool`, defaults to True): GPTQ rounding in descending `diag(H)` order.
        rounds (`int`, defaults to 3): alternations of the closed-form (s, z) step and re-rounding (paper's T).
        damp (`float`, defaults to 0.01): relative Hessian dampening (raised tenfold, boundedly, if Cholesky fails).
        method (`str`, defaults to "decoupleq"): "decoupleq", or the baselines "gptq" / "rtn" from the same machinery.
        integer_zero (`bool`, defaults to False): restrict zeros to the integer grid (GPTQ-format compatible): each
            zero is `-scale * z_int` with an integer `z_int` in the code range. The block-wise stage keeps each
            group's `z_int` and trains its scale; the end-to-end stage is skipped (it trains zeros on their own).
        blockwise (`bool`, defaults to True): run the block-wise stage (Eq. 2) after each block's layer-wise stage.
        blockwise_epochs (`int`, defaults to 1): passes over the calibration windows in the block-wise stage (the
            paper's Adam setting uses 4).
        blockwise_lr (`float`, *optional*): its step size; `None` means the optimizer's default (Adam: 1e-5, the
            paper's; SignSGD: 5e-3, relative to each group's initial scale, AutoRound's).
        blockwise_weight_decay (`float`, defaults to 0.0): Adam weight decay of the block-wise stage.
        blockwise_optimizer (`str`, defaults to "signsgd"): "signsgd" (SignRound-style signed gradient steps,
            linearly decaying: each scale and zero moves by `lr * |initial scale|` per step, each norm weight by
            `lr * |its initial value|`) or "adam" (the paper's block-wise stage). SignSGD for 1 epoch is the
            default because it measured better and faster than the paper's Adam (lr 1e-5, 2 epochs) on SmolLM2
            (README, "Measured results"); `blockwise_optimizer="adam", blockwise_epochs=4` is the paper's setting.
        train_norms (`bool`, defaults to True): also train the block's norm weights in the block-wise stage (and in
            the end-to-end stage).
        e2e_epochs (`float`, defaults to 1.0): passes over the calibration windows of the end-to-end stage, which
            runs after every block is quantized and trains scales, zeros (and norms) of the whole model against
            the full-precision model's next-token distribution (KL), codes frozen; fractions allowed, 0 turns it
            off. Kept only if it lowers the KL on a few calibration windows (see `hf_decoupleq.e2e`). Not run with
            `gguf_type` (it would move scales and mins off the GGUF grid) or `symmetric` (it trains each zero on
            its own); the log says it was skipped.
        e2e_lr (`float`, *optional*): relative Adam step size of the end-to-end stage: each packed layer's scales
            and zeros step by `e2e_lr` times the mean |scale| of that layer, each norm weight by `e2e_lr` times its
            own mean magnitude (at least 0.01; until 2026-12-05 by `e2e_lr` itself); 5% warm-up, cosine decay.
            `None` (the default) picks it by bit width: 1.5e-3 below 4 bits, 3e-4 from 4 bits on (a 4-bit model
            starts much closer to the float one; the larger step undid the stage's gain there, see
            docs/benchmarks.md). (Earlier checkpoints record `e2e_lr=3e-4` or `1.5e-3`: the first was an absolute
            step, 5x that for norms.)
        e2e_samples (`int`, *optional*): calibration windows of the end-to-end stage (one Adam step each per epoch).
            They are drawn like the block-wise stages' windows, from the same `dataset`, `seq_len` and `seed`, with
            `e2e_samples` in place of `num_samples`: for local files, `"wikitext2"` and token ids the first
            `num_samples` of them are the block-wise stages' windows and the rest are new; for `"c4"` and `"pile"`
            the larger draw reads more documents. `None` (the default) means 1.5 x `num_samples` (192 for 128):
            fresh windows measured better than a second epoch over the same ones (docs/benchmarks.md). When the data
            holds fewer distinct windows, or for `dataset="self"` (sampling more would take as long again), the stage
            trains on the `num_samples` windows; the log says so.
        num_samples (`int`, defaults to 128), seq_len (`int`, defaults to 2048): calibration windows.
        seed (`int`, defaults to 0): seeds window sampling and block-wise batch order.
        modules_to_not_convert (`list[str]`, *optional*): module names kept in full precision (default: `lm_head`
            and whatever transformers skips by default).
        true_sequential (`bool`, defaults to True): collect each sub-group's Hessian with the earlier sub-groups of
            the block already quantized (`[q, k, v] -> o -> [gate, up] -> down` in Llama).
        dataset (defaults to "c4"): "wikitext2", "c4", "pile" (Hub datasets), "self" (sampled from the model itself),
            a local `.txt`/`.jsonl`/`.parquet` path, a list of strings, a `datasets.Dataset`, or token ids.
        tokenizer (*optional*): a tokenizer or its name/path; defaults to the model's `name_or_path`.
        batch_size (`int` or "auto", defaults to "auto"): calibration windows per forward pass (more is faster,
            needs more memory for activations). "auto" takes as many as fit in half the free memory of the compute
            device after the kept calibration activations, at most 8 (the benchmarks' CPU setting) and at most
            `num_samples`; 1 if the free memory cannot be read. The block-wise stage still takes one optimizer step
            per window, so results depend on it only through float rounding.
        calibration_dtype (`str`, defaults to "auto"): run the calibration forwards (Hessian collection, block
            outputs, the block-wise stage) under autocast to this dtype: "bfloat16" or "float16" on a float32 model.
            The solver itself always works in float32/float64 and the stored scales keep the model's dtype. `None`
            (or "model") computes in the model's own dtype. "auto" picks "bfloat16" for a float32 model on a device
            with native bf16 matmuls (CUDA compute capability 8.0+, CPUs with AVX512-BF16 or AMX) and the model's
            dtype elsewhere. The values "auto" resolved to are logged and stored in `quantization_stats`.
        incoherence (`bool`, defaults to True): QuIP-style incoherence processing: a seeded randomized Hadamard
            transform on the input side of each quantized linear (`W -> W V^T`, `H -> V H V^T`), undone at
            inference by transforming the activations. On by default because it measured markedly more accurate at
            2, 3 and 4 bits on SmolLM2 for about 4% more quantization time (README, "Incoherence processing"); it
            costs one Hadamard transform per layer input at inference (layers that read the same input share it)
            and writes `format_version: 3` checkpoints. `False` gives the plain method and version-1 checkpoints.
        gguf_type (`str`, *optional*): solve inside the block structure of a llama.cpp GGUF type, so that
            `hf_decoupleq.export_gguf` writes exactly what the solver found: "q2_k" (2-bit codes, sub-blocks of 16,
            `s = d sc`, `z = -dmin m` with 4-bit `sc`, `m` and fp16 `d`, `dmin` per 256 weights), "q3_k" (3-bit,
            symmetric `w = d sc (q - 4)`, signed 6-bit `sc`, sub-blocks of 16), "q4_k" (4-bit, sub-blocks of 32, 6-bit
            `sc`, `m`), "q5_k" (as "q4_k" with 5-bit codes), "q6_k" (6-bit, symmetric `w = d sc (q - 32)`, signed
            8-bit `sc`, sub-blocks of 16), or the block-32 types "q4_0", "q5_0", "q8_0" (symmetric 4, 5 and 8 bits,
            fp16 scale per 32 weights) and "q5_1" (5-bit, fp16 scale and min). A layer whose `in_features` is not a
            multiple of 256 gets llama-quantize's fallback type: Q4_0 for "q2_k"/"q3_k", Q5_0 for "q4_k", Q5_1 for
            "q5_k", Q8_0 for "q6_k"; the log names those layers. The packed format has no 5- or 6-bit codes, so
            such layers are stored with 8-bit codes (values 0-31 / 0-63) in the checkpoint; the GGUF file holds them
            in 5 / 6 bits. `bits`,
            `group_size` and `symmetric` are set from the type (leave them at their defaults or give the matching
            values); needs
            `incoherence=False` and `integer_zero=False`. Both stages keep the grid: the block-wise stage trains
            scales and zeros through their projection onto it. The k-quant grid is exact in float32 scales: quantize
            a float32 model (fp16/bf16 scales round `d * sc`). `None` (default): the ordinary decoupleQ layers.
        gguf_layer_types (`dict[str, str]`, *optional*): per-layer GGUF types on top of `gguf_type`, as
            `{regex: type}` matched with `re.fullmatch` against the full module name, first match wins; for the mixes
            llama-quantize writes (its Q4_K_S makes `attn_v` of the first 4 layers and `ffn_down` of the first eighth
            Q5_K: `{r"model\.layers\.[0-3]\.self_attn\.v_proj": "q5_k", ...}`). Needs `gguf_type`.
        checkpoint_dir (`str`, *optional*): save each finished block there atomically and resume from it.
        device (`str`, *optional*): device to solve on (default: CUDA if available, else where the block is).
        format_version (`int`): version of the packed format; written by this library, checked on load.
        packed_modules (`list[str]`, *optional*): the modules stored packed (full names); written by this library
            after quantizing, so that a reload rebuilds exactly those. `None` (checkpoints written before it
            existed): every linear of every decoder block, minus `modules_to_not_convert`.
    """

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 64,
        symmetric: bool = False,
        act_order: bool = True,
        rounds: int = 3,
        damp: float = 0.01,
        method: str = "decoupleq",
        integer_zero: bool = False,
        blockwise: bool = True,
        blockwise_epochs: int = 1,
        blockwise_lr: float | None = None,
        blockwise_weight_decay: float = 0.0,
        blockwise_optimizer: str = "signsgd",
        train_norms: bool = True,
        e2e_epochs: float = 1.0,
        e2e_lr: float | None = None,
        e2e_samples: int | None = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        modules_to_not_convert: list[str] | None = None,
        true_sequential: bool = True,
        dataset: Any = "c4",
        tokenizer: Any = None,
        batch_size: int | str = AUTO,
        calibration_dtype: str | None = AUTO,
        incoherence: bool = True,
        gguf_type: str | None = None,
        gguf_layer_types: dict[str, str] | None = None,
        checkpoint_dir: str | None = None,
        device: str | None = None,
        format_version: int = FORMAT_VERSION,
        quantization_stats: dict | None = None,
        packed_modules: list[str] | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise DecoupleQConfigError(
                f"DecoupleQConfig got unknown option(s) {sorted(kwargs)}; allowed options are "
                f"{sorted(self._field_names())}"
            )
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.act_order = act_order
        self.rounds = rounds
        self.damp = damp
        self.method = method
        self.integer_zero = integer_zero
        self.blockwise = blockwise
        self.blockwise_epochs = blockwise_epochs
        self.blockwise_lr = blockwise_lr
        self.blockwise_weight_decay = blockwise_weight_decay
        self.blockwise_optimizer = blockwise_optimizer
        self.train_norms = train_norms
        self.e2e_epochs = e2e_epochs
        self.e2e_lr = e2e_lr
        self.e2e_samples = e2e_samples
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.true_sequential = true_sequential
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.calibration_dtype = _dtype_name(calibration_dtype)
        self.incoherence = incoherence
        self.gguf_type = gguf_type.lower() if isinstance(gguf_type, str) else gguf_type
        self.gguf_layer_types = (
            {k: v.lower() if isinstance(v, str) else v for k, v in gguf_layer_types.items()}
            if isinstance(gguf_layer_types, dict)
            else gguf_layer_types
        )
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.device = None if device is None else str(device)
        self.format_version = format_version
        self.quantization_stats = quantization_stats
        self.packed_modules = None if packed_modules is None else list(packed_modules)
        self.post_init()

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        import inspect

        return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs"))

    def post_init(self) -> None:
        """Validate every field; raise `DecoupleQConfigError` naming the field, its value and what is allowed."""

        def fail(field: str, allowed: str) -> None:
            raise DecoupleQConfigError(f"DecoupleQConfig.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        gguf_bits = GGUF_LAYERS[self.gguf_type][0] if self.gguf_type in GGUF_LAYERS else None
        if not is_int(self.bits) or (self.bits not in SUPPORTED_BITS and self.bits != gguf_bits):
            fail("bits", f"use one of {list(SUPPORTED_BITS)}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            fail("group_size", "use a positive integer (e.g. 32, 64, 128) or -1 for per-channel")
        flags = ("symmetric", "act_order", "integer_zero", "blockwise", "train_norms", "true_sequential", "incoherence")
        for flag in flags:
            if not isinstance(getattr(self, flag), bool):
                fail(flag, "use True or False")
        if not is_int(self.rounds) or self.rounds < 0:
            fail("rounds", "use an integer >= 0")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not 0 < self.damp < 1:
            fail("damp", "use a float in (0, 1), e.g. 0.01")
        if self.method not in SUPPORTED_METHODS:
            fail("method", f"use one of {list(SUPPORTED_METHODS)}")
        if self.blockwise_optimizer not in BLOCKWISE_OPTIMIZERS:
            fail("blockwise_optimizer", f"use one of {list(BLOCKWISE_OPTIMIZERS)}")
        if not is_int(self.blockwise_epochs) or self.blockwise_epochs < 0:
            fail("blockwise_epochs", "use an integer >= 0")
        lr = self.blockwise_lr
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf")):
            fail("blockwise_lr", "use a positive float, or None for the optimizer's default")
        wd = self.blockwise_weight_decay
        if not isinstance(wd, (int, float)) or isinstance(wd, bool) or wd < 0:
            fail("blockwise_weight_decay", "use a float >= 0")
        epochs = self.e2e_epochs
        if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or not 0 <= epochs < float("inf"):
            fail("e2e_epochs", "use a number >= 0 (0 turns the end-to-end stage off)")
        lr = self.e2e_lr
        if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf")):
            fail("e2e_lr", "use a positive float, e.g. 1.5e-3, or None for the bit width's default")
        if self.e2e_samples is not None and (not is_int(self.e2e_samples) or self.e2e_samples < 1):
            fail("e2e_samples", "use a positive integer, or None for 1.5 x num_samples")
        for field in ("num_samples", "seq_len"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 1:
                fail(field, "use a positive integer")
        if isinstance(self.batch_size, str) and self.batch_size.lower() == AUTO:
            self.batch_size = AUTO
        elif not is_int(self.batch_size) or self.batch_size < 1:
            fail("batch_size", f"use a positive integer or {AUTO!r}")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "use an integer >= 0")
        if self.modules_to_not_convert is not None and not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            fail("modules_to_not_convert", "use a list of module names")
        if self.packed_modules is not None and not all(isinstance(m, str) for m in self.packed_modules):
            fail("packed_modules", "use a list of module names (written by the library)")
        if isinstance(self.calibration_dtype, str) and self.calibration_dtype.lower() == AUTO:
            self.calibration_dtype = AUTO
        elif self.calibration_dtype is not None and self.calibration_dtype not in CALIBRATION_DTYPES:
            fail(
                "calibration_dtype",
                f"use {AUTO!r}, None (the model's dtype) or one of {list(CALIBRATION_DTYPES)}",
            )
        if isinstance(self.dataset, str) and self.dataset.lower() in KNOWN_DATASETS:
            self.dataset = self.dataset.lower()
        if self.dataset is None:
            fail("dataset", f"use one of {list(KNOWN_DATASETS)}, a file path, a list of strings or a datasets.Dataset")
        if self.gguf_type is not None:
            self._check_gguf_type(fail)
        if self.gguf_layer_types is not None:
            self._check_gguf_layer_types(fail)
        if not is_int(self.format_version) or self.format_version < 1:
            fail("format_version", "use a positive integer")
        if self.format_version > FORMAT_VERSION:
            raise DecoupleQConfigError(
                f"this checkpoint was written with decoupleQ format_version={self.format_version}, but this "
                f"hf-decoupleq supports format_version <= {FORMAT_VERSION}: upgrade hf-decoupleq "
                "(pip install -U hf-decoupleq)"
            )

    def _check_gguf_type(self, fail) -> None:
        if self.gguf_type not in GGUF_LAYERS:
            fail("gguf_type", f"use None or one of {list(GGUF_LAYERS)}")
        bits, group_size, symmetric = GGUF_LAYERS[self.gguf_type]
        for field, default, wanted in (
            ("bits", 2, bits), ("group_size", 64, group_size), ("symmetric", False, symmetric)
        ):
            value = getattr(self, field)
            if value != default and value != wanted:
                fail(field, f"gguf_type={self.gguf_type!r} stores {field}={wanted!r}; leave {field} at its default")
            setattr(self, field, wanted)
        if self.incoherence:
            raise DecoupleQConfigError(
                f"DecoupleQConfig.gguf_type={self.gguf_type!r} needs incoherence=False: GGUF block types cannot "
                "express the Hadamard rotation of incoherence processing"
            )
        if self.integer_zero:
            fail("integer_zero", f"gguf_type={self.gguf_type!r} puts zeros on the GGUF grid; use integer_zero=False")

    def _check_gguf_layer_types(self, fail) -> None:
        if self.gguf_type is None:
            fail("gguf_layer_types", "set gguf_type as well (the type of every layer no pattern matches)")
        if not isinstance(self.gguf_layer_types, dict):
            fail("gguf_layer_types", "use a dict {regular expression: GGUF type}")
        for pattern, qtype in self.gguf_layer_types.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                fail("gguf_layer_types", f"{pattern!r} is not a regular expression ({err})")
            if qtype not in GGUF_LAYERS:
                fail("gguf_layer_types", f"the type of {pattern!r} must be one of {list(GGUF_LAYERS)}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Rebuild a config from `to_dict()` output (for instance a checkpoint's `config.json`).

        A checkpoint written before incoherence processing existed has no `incoherence` key and no Hadamard signs:
        it reads as `incoherence=False`, not as today's default.
        """
        config_dict = dict(config_dict)
        config_dict.setdefault("incoherence", False)
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def effective_blockwise_lr(self) -> float:
        """`blockwise_lr`, or the default of `blockwise_optimizer` when it is None."""
        if self.blockwise_lr is not None:
            return float(self.blockwise_lr)
        return DEFAULT_BLOCKWISE_LR[self.blockwise_optimizer]

    @property
    def effective_e2e_lr(self) -> float:
        """`e2e_lr`, or when it is None the default for `bits`: 1.5e-3 below 4 bits, 3e-4 from 4 bits on."""
        if self.e2e_lr is not None:
            return float(self.e2e_lr)
        return DEFAULT_E2E_LR_LOW_BITS if self.bits < 4 else DEFAULT_E2E_LR_HIGH_BITS

    @property
    def effective_e2e_samples(self) -> int:
        """`e2e_samples`, or when it is None `num_samples` x 1.5 (rounded down)."""
        if self.e2e_samples is not None:
            return int(self.e2e_samples)
        return int(self.num_samples * DEFAULT_E2E_SAMPLES_FACTOR)

    @property
    def effective_modules_to_not_convert(self) -> list[str]:
        return ["lm_head"] if self.modules_to_not_convert is None else list(self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: datasets and tokenizers are recorded by name, never as objects."""
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if key == "dataset":
                value = _describe_dataset(value)
            elif key == "tokenizer":
                value = _describe_tokenizer(value)
            out[key] = copy.deepcopy(value)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def result_fingerprint(self, **resolved: Any) -> dict[str, Any]:
        """The fields that determine the quantized result (used to refuse resuming with other settings).

        `resolved` gives the values an "auto" field resolved to in this run (`batch_size`, `calibration_dtype`): they
        replace "auto", so the fingerprint names what was computed, and an "auto" run that resolved to the same
        values as an explicit one can resume it. Explicit values are kept as given.
        """
        d = self.to_dict()
        for key, value in resolved.items():
            if key not in RESULT_FIELDS:
                raise ValueError(f"{key!r} is not a result field")
            if d[key] == AUTO:
                d[key] = value
        return {k: d[k] for k in RESULT_FIELDS}

    def __iter__(self):
        yield from self.to_dict().items()

    def __deepcopy__(self, memo):
        # transformers deep-copies its kwargs; tokenizers/datasets objects are shared, not copied.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("dataset", "tokenizer"):
                new.__dict__[key] = value
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new
