"""Model surgery: find decoder blocks and their linears, swap `nn.Linear` <-> `DecoupleQLinear`.

Nothing here is specific to one architecture: decoder blocks are found through the model's
`_no_split_modules` (the classes transformers itself keeps whole on one device) or, failing that, as the
largest `nn.ModuleList` of identical modules that contain linear layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from .errors import UnsupportedModelError
from .hadamard import has_transform
from .nn.linear import DecoupleQLinear

logger = logging.getLogger(__name__)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return `(qualified_name, module_list)` of the model's decoder blocks.

    Raises:
        UnsupportedModelError: when no list of repeated blocks with linear layers exists.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        if not any(isinstance(m, (nn.Linear, DecoupleQLinear)) for m in module[0].modules()):
            continue
        candidates.append((name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of decoder blocks containing nn.Linear layers; hf-decoupleq quantizes "
            "transformer decoders such as Llama, Mistral, Qwen2/3, Gemma and OPT"
        )
    preferred = [c for c in candidates if type(c[1][0]).__name__ in no_split]
    pool = preferred or candidates
    # The decoder stack is the longest such list (vision towers or MTP heads come with shorter ones).
    return max(pool, key=lambda c: (len(c[1]), -c[0].count(".")))


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    for pattern in skip:
        if name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".") or f".{pattern}." in name:
            return True
    return False


def find_linears(block: nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of a block, by name relative to the block, minus the skipped ones."""
    skip = list(skip)
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not _is_skipped(f"{prefix}{name}", skip):
            out[name] = module
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def replace_with_decoupleq_linear(
    model: nn.Module,
    *,
    bits: int,
    group_size: int,
    modules_to_not_convert: Iterable[str] = ("lm_head",),
    dtype: torch.dtype | None = None,
    incoherence: bool = False,
) -> list[str]:
    """Replace every linear of every decoder block by an empty `DecoupleQLinear` of the packed shapes.

    Used before the weights of a pre-quantized checkpoint load (the model is on the meta device then), so that
    the checkpoint's `qweight`/`scales`/`zeros` (and, with `incoherence`, `hadamard_signs` for every layer with an
    even `in_features`, exactly the layers quantization rotates) load straight into the buffers. Returns the
    replaced names.
    """
    prefix, blocks = find_decoder_blocks(model)
    replaced = []
    skip = list(modules_to_not_convert)
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}." if prefix else f"{index}."
        for name, linear in find_linears(block, block_prefix, skip).items():
            device = linear.weight.device
            new = DecoupleQLinear(
                linear.in_features,
                linear.out_features,
                bits=bits,
                group_size=group_size,
                bias=linear.bias is not None,
                dtype=dtype or linear.weight.dtype,
                device=device,
                incoherence=incoherence and has_transform(linear.in_features),
            )
            set_submodule(block, name, new)
            replaced.append(block_prefix + name)
    if not replaced:
        raise UnsupportedModelError(f"no linear layer of {type(model).__name__} is left to quantize")
    return replaced


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `DecoupleQLinear` by an `nn.Linear` holding its dequantized weight (in place)."""
    if isinstance(dtype, str):  # transformers passes model.config.dtype, a string once the config was saved
        dtype = getattr(torch, dtype.removeprefix("torch."))
    names = [name for name, m in model.named_modules() if isinstance(m, DecoupleQLinear)]
    for name in names:
        module = model.get_submodule(name)
        weight = module.dequantize_weight()
        target_dtype = dtype or weight.dtype
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=target_dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(target_dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(target_dtype))
        set_submodule(model, name, linear)
    return model
