"""Model cards for decoupleQ checkpoints, rendered from ``model_cards/template.md`` with huggingface_hub.

The card records what a reader needs to trust and reuse the checkpoint: the quantization settings, the calibration
data, the size, measured evaluation numbers, and a usage snippet that imports ``hf_decoupleq`` first (without it
transformers does not know the ``decoupleq`` format and silently loads random weights in place of the packed ones).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..calibration.data import KNOWN_DATASETS, SELF_DATASET
from ..errors import DecoupleQConfigError

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

__all__ = ["render_model_card", "template_text"]

_TEMPLATE_NAME = "template.md"

# (label, candidate keys in the flattened config, in order of preference). Nested sections of the config
# (``layerwise.*``, ``blockwise.*``, ``calibration.*``) are looked up both as "section.key" and as a flat key.
_SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Bits", ("bits", "w_bits", "layerwise.bits")),
    ("Group size", ("group_size", "layerwise.group_size")),
    ("Symmetric", ("symmetric", "sym", "layerwise.symmetric")),
    ("Integer zero points", ("integer_zero", "layerwise.integer_zero")),
    ("Layer-wise method", ("method", "layerwise.method")),
    ("Activation order (GPTQ rounding)", ("act_order", "desc_act", "layerwise.act_order")),
    ("Alternation rounds", ("rounds", "layerwise.rounds")),
    ("Hessian dampening", ("damp", "damp_percent", "layerwise.damp")),
    ("True-sequential", ("true_sequential", "layerwise.true_sequential", "blockwise.true_sequential")),
    ("Incoherence processing (randomized Hadamard)", ("incoherence",)),
)
_BLOCKWISE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Block-wise optimizer", ("blockwise.optimizer", "blockwise_optimizer")),
    ("Block-wise epochs", ("blockwise.epochs", "blockwise_epochs")),
    ("Block-wise learning rate", ("blockwise.lr", "blockwise_lr")),
    ("Block-wise trains norm weights", ("blockwise.train_norms", "train_norms")),
    ("Block-wise trains biases", ("blockwise.train_bias", "train_bias")),
)
_TAIL: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Modules kept in full precision", ("modules_to_not_convert", "modules_to_not_quantize")),
    ("Checkpoint format version", ("format_version",)),
)
_CALIBRATION: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Number of samples", ("calibration.num_samples", "num_samples", "nsamples")),
    ("Sequence length (tokens)", ("calibration.seq_len", "seq_len", "model_seqlen")),
    ("Seed", ("calibration.seed", "seed")),
)
_DATASET_KEYS = ("calibration.dataset", "dataset")


def template_text() -> str:
    """Return the card template (package data ``hf_decoupleq.model_cards/template.md``)."""
    try:
        return (importlib.resources.files("hf_decoupleq.model_cards") / _TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # Not installed: the repository keeps the folder at its root, beside the package.
        return (Path(__file__).resolve().parents[2] / "model_cards" / _TEMPLATE_NAME).read_text(encoding="utf-8")


def _to_dict(quant_config: Any) -> dict:
    if isinstance(quant_config, Mapping):
        return dict(quant_config)
    if hasattr(quant_config, "to_dict"):
        return dict(quant_config.to_dict())
    if dataclasses.is_dataclass(quant_config) and not isinstance(quant_config, type):
        return dataclasses.asdict(quant_config)
    raise DecoupleQConfigError(
        f"quant_config must be a dict or a config with to_dict(), got {type(quant_config).__name__}"
    )


def _flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": 1, "blockwise": {"lr": 2}}`` -> ``{"a": 1, "blockwise": {...}, "blockwise.lr": 2}`` (any depth)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        flat[name] = value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif hasattr(value, "to_dict") and not isinstance(value, Mapping):
            value = value.to_dict()
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
    return flat


def _lookup(flat: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if flat.get(key) is not None:
            return flat[key]
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _blockwise_enabled(flat: Mapping[str, Any]) -> bool:
    if "blockwise" in flat and flat["blockwise"] in (None, False):
        return False
    for key in ("blockwise.enabled", "blockwise_enabled", "blockwise.epochs", "blockwise_epochs"):
        if key in flat and flat[key] in (False, 0):
            return False
    return True


def _settings(flat: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [("Method", "decoupleQ")]
    for label, keys in _SETTINGS:
        value = _lookup(flat, keys)
        if value is None:
            continue
        if label == "Group size" and value in (-1, 0):
            rows.append((label, "per-channel (one group per output row)"))
        else:
            rows.append((label, _fmt(value)))
    if not _blockwise_enabled(flat):
        rows.append(("Block-wise refinement", "off"))
    else:
        for label, keys in _BLOCKWISE:
            value = _lookup(flat, keys)
            if value is None and label == "Block-wise learning rate" and "blockwise_lr" in flat:
                from ..config import DEFAULT_BLOCKWISE_LR  # None: the optimizer's default

                value = DEFAULT_BLOCKWISE_LR.get(_lookup(flat, ("blockwise_optimizer",)) or "adam")
            if value is not None:
                rows.append((label, _fmt(value)))
    for label, keys in _TAIL:
        value = _lookup(flat, keys)
        if value is not None:
            rows.append((label, _fmt(value)))
    return rows


def _dataset_label(dataset: Any) -> tuple[str | None, str | None]:
    """(human label, Hub dataset id for the metadata) of a calibration dataset spec."""
    if dataset is None:
        return None, None
    if isinstance(dataset, str):
        if dataset in KNOWN_DATASETS:
            hub_id = KNOWN_DATASETS[dataset]["hub_id"]
            return f"`{dataset}` ([{hub_id}](https://huggingface.co/datasets/{hub_id}))", hub_id
        if dataset == SELF_DATASET:
            return "data-free: sequences sampled from the base model itself (LLM-QAT style)", None
        # A local path: the file name only; the absolute path means nothing to readers and may leak a home folder.
        return f"local file `{os.path.basename(dataset) or dataset}`", None
    if isinstance(dataset, (list, tuple)):
        return f"in-memory data ({len(dataset)} items)", None
    return f"in-memory `{type(dataset).__name__}`", None


def _calibration(flat: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    rows = []
    label, hub_id = _dataset_label(_lookup(flat, _DATASET_KEYS))
    if label is not None:
        rows.append(("Dataset", label))
    for name, keys in _CALIBRATION:
        value = _lookup(flat, keys)
        if value is not None:
            rows.append((name, _fmt(value)))
    return rows, hub_id


def _eval_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _is_quality_record(value: Any) -> bool:
    """A measured figure with its protocol (`hf_decoupleq.evaluation.perplexity_record`)."""
    return isinstance(value, Mapping) and "metric" in value and "quantized" in value and "protocol" in value


def _quality_lines(eval_results: Mapping[str, Any]) -> list[str]:
    """The card's "Quality" section: one paragraph per quality record, with the numbers and how they were measured."""
    lines = []
    for value in eval_results.values():
        if not _is_quality_record(value):
            continue
        metric = str(value["metric"]).capitalize()
        quantized, original = value["quantized"], value.get("original")
        text = f"{metric} on {_fmt(value.get('dataset', 'unnamed text'))}: **{_eval_value(quantized)}** quantized"
        if original is not None:
            text += f", {_eval_value(original)} for the original model"
            if isinstance(quantized, (int, float)) and isinstance(original, (int, float)) and original > 0:
                text += f" ({quantized / original:.2f}x)"
        text += f". Protocol: {value['protocol']}."
        if value.get("command"):
            text += f" Measured by `{value['command']}`."
        lines.append(text)
    return lines


def _eval_rows(eval_results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten ``{"wikitext2 ppl": 9.5}``, ``{"wikitext2": {"ppl": 9.5, "fp16 ppl": 5.7}}`` or PerplexityResults
    (quality records go to the "Quality" section instead, see `_quality_lines`)."""
    rows = []
    for name, value in eval_results.items():
        if _is_quality_record(value):
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            for key, sub in value.items():
                if sub is not None:
                    rows.append((f"{name} ({key})", _eval_value(sub)))
        elif value is not None:
            rows.append((str(name), _eval_value(value)))
    # A "|" would split a Markdown table cell.
    return [(n.replace("|", "\\|"), v.replace("|", "\\|")) for n, v in rows]


def _usage_code(repo_id: str | None) -> str:
    # json.dumps gives a double-quoted literal that is also valid Python, whatever characters the id holds.
    model_id = json.dumps(repo_id or "path/to/this-model")
    return "\n".join(
        [
            "import hf_decoupleq  # registers the 'decoupleq' format; without it the weights load as random",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model_id = {model_id}",
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            'model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto")',
            'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
            "output = model.generate(**inputs, max_new_tokens=32)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    )


def render_model_card(
    quant_config: Mapping[str, Any] | Any,
    *,
    base_model: str | None,
    quantized_size_bytes: int | None = None,
    original_size_bytes: int | None = None,
    eval_results: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Render the model card of a decoupleQ checkpoint.

    Args:
        quant_config (`dict` or a config with ``to_dict()``):
            The quantization config (``model.config.quantization_config``). Flat or nested (``layerwise``,
            ``blockwise``, ``calibration`` sections) keys are read; unknown keys are ignored and missing ones omitted.
        base_model (`str`, *optional*): Hub id of the full-precision model (metadata ``base_model`` with relation
            ``quantized``).
        quantized_size_bytes (`int`, *optional*): size of the quantized checkpoint on disk.
        original_size_bytes (`int`, *optional*): size of the original checkpoint; with the quantized size, the
            compression ratio is shown.
        eval_results (`dict`, *optional*): measured numbers, e.g. ``{"WikiText-2 ppl (2048 tokens)": 9.49}``;
            values may be numbers, dicts of numbers, or :class:`~hf_decoupleq.evaluation.PerplexityResult` (an
            "Evaluation" table), or records of :func:`~hf_decoupleq.evaluation.perplexity_record` (a "Quality"
            section with the figures, the original model's and the protocol).
        repo_id (`str`, *optional*): Hub id of this checkpoint, used in the title and usage snippet.

    Returns:
        `huggingface_hub.ModelCard`: ready for ``card.save(path)`` or ``card.push_to_hub(repo_id)``.

    Raises:
        DecoupleQConfigError: ``quant_config`` is not a mapping/config, or a size is negative.
    """
    from huggingface_hub import ModelCard, ModelCardData

    flat = _flatten(_to_dict(quant_config))
    for field, value in (("quantized_size_bytes", quantized_size_bytes), ("original_size_bytes", original_size_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DecoupleQConfigError(f"{field} must be a non-negative int or None, got {value!r}")

    bits = _lookup(flat, ("bits", "w_bits", "layerwise.bits"))
    group = _lookup(flat, ("group_size", "layerwise.group_size"))
    short_label = f"{bits}-bit" if bits is not None else "low-bit"
    bits_label = short_label
    if group is not None:
        bits_label += " per-channel" if group in (-1, 0) else f" (group size {group})"

    tags = ["decoupleq"] + ([f"{bits}-bit"] if bits is not None else []) + ["quantized", "hf-decoupleq"]
    calibration, dataset_id = _calibration(flat)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        **({"base_model_relation": "quantized"} if base_model else {}),
    )

    sizes = []
    if quantized_size_bytes is not None:
        sizes.append(("Quantized checkpoint", _fmt_size(quantized_size_bytes)))
    if original_size_bytes is not None:
        sizes.append(("Original checkpoint", _fmt_size(original_size_bytes)))
        if quantized_size_bytes:
            sizes.append(("Compression", f"{original_size_bytes / quantized_size_bytes:.2f}x smaller"))

    if repo_id:
        title = repo_id.split("/")[-1]
    elif base_model:
        title = f"{base_model.split('/')[-1]} decoupleQ {short_label}"
    else:
        title = f"decoupleQ {short_label} model"

    card = ModelCard.from_template(
        card_data,
        template_str=template_text(),
        title=title,
        base_model=base_model,
        bits=bits,
        bits_label=bits_label,
        settings=_settings(flat),
        calibration=calibration,
        sizes=sizes,
        quality=_quality_lines(eval_results or {}),
        eval_rows=_eval_rows(eval_results or {}),
        usage_code=_usage_code(repo_id),
    )
    logger.debug("rendered model card for %s", repo_id or base_model or "a local checkpoint")
    return card
