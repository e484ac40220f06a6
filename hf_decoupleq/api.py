"""`quantize`: decoupleQ for a model that is already in memory (e.g. one read from a GGUF file)."""

from __future__ import annotations

from typing import Any

from .config import DecoupleQConfig
from .errors import DecoupleQConfigError


def quantize(model: Any, config: DecoupleQConfig, tokenizer: Any = None) -> Any:
    """Quantize a loaded full-precision transformers model in place, exactly as quantize-on-load would.

    Afterwards the model behaves like one returned by `from_pretrained(..., quantization_config=config)`:
    `save_pretrained` writes the packed checkpoint, its config and a model card; `push_to_hub` uploads them.

    Args:
        model: a `PreTrainedModel` with real (not meta) full-precision weights.
        config: the `DecoupleQConfig`.
        tokenizer: the tokenizer for text calibration data (overrides `config.tokenizer`).
    """
    from .quantizer import DecoupleQHfQuantizer

    if not isinstance(config, DecoupleQConfig):
        raise DecoupleQConfigError(f"config must be a DecoupleQConfig, got {type(config).__name__}")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and getattr(existing.quantization_config, "quant_method", None) == "decoupleq":
        raise DecoupleQConfigError("this model is already decoupleQ-quantized")
    if existing is not None:
        # e.g. a model dequantized from GGUF still describes its source format: it is full precision now.
        existing.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if tokenizer is not None:
        config.tokenizer = tokenizer
    quantizer = DecoupleQHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model
