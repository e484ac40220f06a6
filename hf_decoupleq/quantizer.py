"""`DecoupleQHfQuantizer`: thin glue between transformers' loading hooks and this library."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from transformers.quantizers import HfQuantizer

from .config import DecoupleQConfig
from .errors import DecoupleQCheckpointError, DecoupleQConfigError
from .integration import check_quantizable, dequantize_model, replace_with_decoupleq_linear
from .nn.linear import DecoupleQLinear, share_rotations

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class DecoupleQHfQuantizer(HfQuantizer):
    """Quantize on load with decoupleQ, or load a packed decoupleQ checkpoint.

    - Not pre-quantized: the full-precision weights load into plain `nn.Linear`s, then
      `_process_model_after_weight_loading` calibrates and quantizes block by block (`pipeline.quantize_model`).
    - Pre-quantized (`"quant_method": "decoupleq"` in config.json): linears are swapped for empty
      `DecoupleQLinear`s on the meta device before loading, and the packed tensors load straight into them.
    """

    requires_calibration = False
    quantization_config: DecoupleQConfig

    def __init__(self, quantization_config: DecoupleQConfig, **kwargs):
        if not isinstance(quantization_config, DecoupleQConfig):
            quantization_config = DecoupleQConfig.from_dict(dict(quantization_config))
        super().__init__(quantization_config, **kwargs)

    # --- environment -------------------------------------------------------------------------------------------
    def validate_environment(self, *args, device_map: Any = None, **kwargs) -> None:
        if isinstance(device_map, dict):
            for target in set(map(str, device_map.values())):
                if target.startswith("cuda") or target.isdigit():
                    index = int(target.split(":")[1]) if ":" in target else int(target) if target.isdigit() else 0
                    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                        raise DecoupleQConfigError(
                            f"device_map places modules on {target!r}, but this machine has "
                            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)"
                        )
        elif isinstance(device_map, str) and device_map.startswith("cuda") and not torch.cuda.is_available():
            raise DecoupleQConfigError(f"device_map={device_map!r} asks for CUDA, but no CUDA device is available")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # --- loading -----------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(
        self, model: PreTrainedModel, checkpoint_files: list[str] | None = None, **kwargs
    ) -> None:
        cfg = self.quantization_config
        self.modules_to_not_convert = _modules_to_not_convert(self, model, cfg)
        if not self.pre_quantized:
            # Refuse layouts the pipeline cannot quantize before any weight is read (fused MoE experts).
            check_quantizable(model, self.modules_to_not_convert)
            return
        replaced = replace_with_decoupleq_linear(
            model,
            bits=cfg.bits,
            group_size=cfg.group_size,
            modules_to_not_convert=self.modules_to_not_convert,
            # Each packed module takes the dtype transformers gave its linear (the load dtype, or float32 for
            # `_keep_in_fp32_modules`), so a model whose layers differ in dtype is not flattened to one.
            dtype=None,
            # Format 1 has no Hadamard signs: a version-1 checkpoint claiming incoherence was written before the
            # feature existed (the flag was accepted and ignored), so its weights are in the original basis.
            incoherence=cfg.incoherence and cfg.format_version >= 2,
            packed_modules=cfg.packed_modules,
            gguf_type=getattr(cfg, "gguf_type", None),
            gguf_layer_types=getattr(cfg, "gguf_layer_types", None),
        )
        logger.info("prepared %d packed decoupleQ linears for loading", len(replaced))
        if checkpoint_files:
            check_checkpoint_shapes(model, checkpoint_files)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        cfg = self.quantization_config
        if not self.pre_quantized:
            from .pipeline import quantize_model

            self.modules_to_not_convert = _modules_to_not_convert(self, model, cfg)
            cfg.modules_to_not_convert = list(self.modules_to_not_convert)
            tokenizer = cfg.tokenizer
            quantize_model(model, cfg, tokenizer=tokenizer)
        for module in model.modules():
            if isinstance(module, DecoupleQLinear):
                module.post_init()
        share_rotations(model)
        from .hub.save import attach_card_writer

        attach_card_writer(model)
        return model

    # --- capabilities ------------------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Scales, zeros and norms can be trained with the codes frozen (see `hf_decoupleq.prepare_for_training`).
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Lets a plain `transformers.Trainer` train the float parts after `prepare_for_training` (no adapters).
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        return dequantize_model(model, dtype=dtype)


def _modules_to_not_convert(quantizer: HfQuantizer, model: torch.nn.Module, cfg: DecoupleQConfig) -> list[str]:
    """The config's skips, transformers' default ones (`lm_head`, tied output embeddings) and the model's
    `_keep_in_fp32_modules` (routers and other precision-sensitive layers), sorted so that config.json and the
    resume fingerprint do not depend on set order."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    keep = {name.removesuffix(".weight") for name in keep}  # entries may name a parameter ("gate.weight")
    skips = quantizer.get_modules_to_not_convert(
        model, cfg.modules_to_not_convert, keep_in_fp32_modules=sorted(keep), add_default_skips=True
    )
    return sorted(set(skips))


_SIGNS = ".hadamard_signs"


def check_checkpoint_shapes(model: torch.nn.Module, checkpoint_files: list[str]) -> None:
    """Compare the packed tensors in the safetensors headers with the packed modules built from the config, so a
    checkpoint that disagrees with its config fails with a message instead of silently uninitialized weights.

    - every tensor of every packed module (`qweight`, `scales`, `zeros`, `bias`, `hadamard_signs`) must be in the
      checkpoint with the shape the config implies;
    - a checkpoint's `qweight` or `hadamard_signs` must have a packed (or rotated) module to go to.
    """
    expected = {
        f"{name}.{key}": tuple(t.shape)
        for name, module in model.named_modules()
        if isinstance(module, DecoupleQLinear)
        for key, t in module.state_dict().items()
    }
    headers: dict[str, dict[str, Any]] = {}
    all_read = bool(checkpoint_files)
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors") or not os.path.exists(path):
            all_read = False
            continue
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            headers[path] = json.loads(f.read(header_len))
    seen = {name for header in headers.values() for name in header}
    packed_in_files = {name for name in seen if name.endswith(".qweight")}
    if packed_in_files and not packed_in_files & expected.keys():
        # Packed tensors under none of the expected names: the files name tensors differently from the model (a
        # key mapping transformers applies while loading), so they cannot be paired here; transformers' load report
        # still lists what is missing.
        logger.warning("the checkpoint's tensor names differ from the model's; the packed-tensor check is skipped")
        return
    for path, header in headers.items():
        for name, info in header.items():
            if name.endswith(_SIGNS) and name not in expected:
                raise DecoupleQCheckpointError(
                    f"{os.path.basename(path)} holds incoherence signs {name!r}, but the checkpoint's "
                    "quantization_config does not describe that layer as rotated (incoherence / format_version): "
                    "the checkpoint and its config.json disagree"
                )
            if name.endswith(".qweight") and name not in expected:
                raise DecoupleQCheckpointError(
                    f"{os.path.basename(path)} holds packed weights {name!r}, but the checkpoint's "
                    "quantization_config does not describe that layer as packed (packed_modules / "
                    "modules_to_not_convert): the checkpoint and its config.json disagree"
                )
            if name == "__metadata__" or name not in expected:
                continue
            found = tuple(info["shape"])
            if found != expected[name]:
                raise DecoupleQCheckpointError(
                    f"packed tensor {name!r} in {os.path.basename(path)} has shape {list(found)}, but the "
                    f"checkpoint's quantization_config (bits/group_size) implies {list(expected[name])}: the "
                    "checkpoint and its config.json disagree"
                )
    if not all_read:
        return
    missing = sorted(name for name in expected if name not in seen)
    signs = [name for name in missing if name.endswith(_SIGNS)]
    if signs:
        raise DecoupleQCheckpointError(
            f"the checkpoint's quantization_config says incoherence=True, but {len(signs)} rotated layer(s) have "
            f"no incoherence signs in the checkpoint (first: {signs[0]!r}): the checkpoint and its config.json "
            "disagree"
        )
    if missing:
        raise DecoupleQCheckpointError(
            f"the checkpoint's quantization_config implies {len(missing)} packed tensor(s) that the checkpoint does "
            f"not hold (first: {missing[0]!r}); they would load uninitialized: the checkpoint and its config.json "
            "disagree"
        )
