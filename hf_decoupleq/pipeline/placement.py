"""Where and how a block computes: the compute device, the resolved "auto" settings, accelerate offloading."""

from __future__ import annotations

import torch
from torch import nn

from .. import hardware
from ..config import AUTO, DecoupleQConfig
from ..errors import DecoupleQError


def _compute_device(config: DecoupleQConfig, block: nn.Module) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    for t in list(block.parameters()) + list(block.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _calibration_dtype(
    config: DecoupleQConfig, model: nn.Module, device: torch.device | None = None
) -> torch.dtype | None:
    """The autocast dtype for `config.calibration_dtype`, or None when the model already computes in it.

    "auto" resolves with `hardware.auto_calibration_dtype` for the compute `device` (default: `_compute_device`)."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"}
    name = config.calibration_dtype
    if name == AUTO:
        name = hardware.auto_calibration_dtype(weights, device if device is not None else _compute_device(config, model))
    if name is None:
        return None
    dtype = getattr(torch, name)
    if weights == {dtype}:
        return None
    if any(w.itemsize < dtype.itemsize for w in weights):
        raise DecoupleQError(
            f"calibration_dtype={config.calibration_dtype!r} is wider than the model's weights "
            f"({', '.join(sorted(str(w).removeprefix('torch.') for w in weights))}); autocast can only lower "
            "precision: load the model in that dtype instead, or leave calibration_dtype=None"
        )
    return dtype


def _calibration_batch_size(config: DecoupleQConfig, model: nn.Module, device: torch.device) -> int:
    """`config.batch_size`, or for "auto" what fits the free memory of `device` (`hardware.auto_batch_size`)."""
    if config.batch_size != AUTO:
        return config.batch_size
    return hardware.auto_batch_size(
        getattr(model, "config", None),
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        free_bytes=hardware.free_memory_bytes(device),
        activations_on_device=device.type == "cpu",
    )


def _materialize_block(block: nn.Module, device: torch.device, block_name: str) -> bool:
    """Give an accelerate-offloaded block (weights on meta, real ones in a CPU/disk map) real weights on `device`
    and drop its offload hook, so the solver never sees meta tensors. Returns True if the block was offloaded."""
    if not any(t.device.type == "meta" for t in list(block.parameters()) + list(block.buffers())):
        return False
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    # accelerate hooks each offloaded module (often the leaves) with a map of its own tensors.
    values: list[tuple[nn.Module, str, torch.Tensor]] = []
    for mod_name, module in block.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor.device.type != "meta":
                continue
            weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            if weights_map is None:
                raise DecoupleQError(
                    f"{block_name}.{mod_name}.{name} is on the meta device with no accelerate offload map to read it "
                    "from; load the model with a device_map that places or offloads every block with accelerate"
                )
            try:
                values.append((module, name, weights_map[name]))
            except KeyError as exc:
                raise DecoupleQError(
                    f"offloaded weight {block_name}.{mod_name}.{name} is missing from accelerate's map"
                ) from exc
    remove_hook_from_module(block, recurse=True)
    for module, name, value in values:
        set_module_tensor_to_device(module, name, device, value=value)
    return True


def _home_device(block: nn.Module) -> torch.device | None:
    for t in list(block.parameters()) + list(block.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def _place_back(block: nn.Module, home: torch.device | None, device: torch.device, offloaded: bool) -> None:
    """Return the quantized block where the model keeps it. An offloaded block (8x smaller once packed) stays on
    the compute device, with an accelerate hook moving its inputs there."""
    if offloaded:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        add_hook_to_module(block, AlignDevicesHook(execution_device=device, io_same_device=True))
        return
    if home is not None and home != device:
        block.to(home)
