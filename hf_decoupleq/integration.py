"""Model surgery: find decoder blocks and their linears, swap `nn.Linear` <-> `DecoupleQLinear`.

Nothing here is specific to one architecture: decoder blocks are found through the model's
`_no_split_modules` (the classes transformers itself keeps whole on one device) or, failing that, as the
largest `nn.ModuleList` of identical modules that contain linear layers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from .errors import DecoupleQCheckpointError, UnsupportedModelError
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
    """Whether the full module name `name` matches a `modules_to_not_convert` pattern.

    A pattern matches as transformers' own `should_convert_module` matches it (from the start up to a module
    boundary, as a regex with that boundary, e.g. `model.layers.(0|1).mlp`, or as a suffix), and also, as
    hf-decoupleq has always matched, as whole dotted components anywhere in the name (`experts` matches
    `model.layers.0.mlp.experts.0.w1`, which transformers' helper does not)."""
    for pattern in skip:
        if f".{pattern}." in f".{name}.":
            return True
        try:
            if not should_convert_module(name, [pattern]):
                return True
        except re.error:  # not a valid regex: it matches literally (above), as it always did
            pass
    return False


# Names of the routing linears of mixture-of-experts layers (a module with an `experts` child); they choose the
# experts, so they stay in full precision, like transformers' own `_keep_in_fp32_modules`.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _is_router(block: nn.Module, name: str) -> bool:
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in ROUTER_NAMES:
        return False
    parent = block.get_submodule(parent_name) if parent_name else block
    return hasattr(parent, "experts")


def find_linears(block: nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules of a block, by name relative to the block, minus the skipped ones and MoE routers."""
    skip = list(skip)
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and not _is_skipped(f"{prefix}{name}", skip) and not _is_router(block, name):
            out[name] = module
    return out


def check_quantizable(model: nn.Module, skip: Iterable[str] = ()) -> None:
    """Refuse decoder blocks holding weights that hf-decoupleq would silently leave dense: fused mixture-of-experts
    weights (3-D parameters such as `mlp.experts.gate_up_proj` [experts, out, in], what transformers 5 builds for
    Mixtral, Qwen3-MoE, GPT-OSS...). Convolutions (3-D kernels) are not linear layers and are left alone.

    Raises:
        UnsupportedModelError: naming the fused weights, and how to keep them in full precision on purpose.
    """
    prefix, blocks = find_decoder_blocks(model)
    skip = list(skip)
    fused = []
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}." if prefix else f"{index}."
        for name, module in block.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd) or _is_skipped(f"{block_prefix}{name}", skip):
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() >= 3 and param.is_floating_point():
                    fused.append(f"{block_prefix}{name}.{pname}" if name else f"{block_prefix}{pname}")
    if fused:
        owners = sorted({n.rsplit(".", 1)[0].split(".")[-1] for n in fused})
        raise UnsupportedModelError(
            f"{type(model).__name__} stores {len(fused)} weight(s) as fused 3-D tensors (e.g. {fused[0]!r}), as "
            "transformers does for mixture-of-experts layers; hf-decoupleq quantizes nn.Linear layers only and will "
            "not leave these dense without being told. To quantize everything else and keep them in full "
            f"precision, pass modules_to_not_convert={owners!r} (lm_head stays in full precision anyway)"
        )


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
    packed_modules: Iterable[str] | None = None,
    gguf_type: str | None = None,
    gguf_layer_types: dict[str, str] | None = None,
) -> list[str]:
    """Replace linears by empty `DecoupleQLinear`s of the packed shapes.

    Used before the weights of a pre-quantized checkpoint load (the model is on the meta device then), so that
    the checkpoint's `qweight`/`scales`/`zeros` (and, with `incoherence`, `hadamard_signs` for every layer with an
    even `in_features`, exactly the layers quantization rotates) load straight into the buffers. `packed_modules`
    (the checkpoint's own list) names exactly the linears to replace; without it (checkpoints written before the
    list existed) every linear of every decoder block except `modules_to_not_convert` is replaced. Each packed
    module takes `dtype`, or else its linear's own dtype (so a model whose layers differ in dtype keeps them).
    With `gguf_type` (`DecoupleQConfig.gguf_type`, and `gguf_layer_types` per layer) each layer's bits and group
    size are those of its GGUF type (`hf_decoupleq.solver.kquant.layer_format`: the k-quant, or its fallback when
    `in_features % 256 != 0`; 5-bit types in 8-bit codes).
    Returns the replaced names.

    Raises:
        DecoupleQCheckpointError: `packed_modules` names a module that is not a linear layer of this model.
    """
    if packed_modules is not None:
        targets = {}
        for name in packed_modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                raise DecoupleQCheckpointError(
                    f"the checkpoint's quantization_config lists {name!r} as packed, but {type(model).__name__} has "
                    f"no linear layer of that name: the checkpoint and its config.json disagree"
                )
            targets[name] = module
    else:
        prefix, blocks = find_decoder_blocks(model)
        skip = list(modules_to_not_convert)
        targets = {}
        for index, block in enumerate(blocks):
            block_prefix = f"{prefix}.{index}." if prefix else f"{index}."
            for name, linear in find_linears(block, block_prefix, skip).items():
                targets[block_prefix + name] = linear
    for name, linear in targets.items():
        b, g = bits, group_size
        if gguf_type is not None:
            from .solver.kquant import layer_format, resolve_gguf_type

            fmt = layer_format(resolve_gguf_type(name, gguf_type, gguf_layer_types), linear.in_features, name)
            b, g = fmt.packed_bits, fmt.group_size
        new = DecoupleQLinear.empty_like(
            linear, b, g, dtype=dtype, incoherence=incoherence and has_transform(linear.in_features)
        )
        set_submodule(model, name, new)
    if not targets:
        raise UnsupportedModelError(f"no linear layer of {type(model).__name__} is left to quantize")
    return list(targets)


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
