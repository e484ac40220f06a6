"""Fine-tuning the floating-point parts of a decoupleQ model (the paper's extension).

With the integer codes frozen, each packed linear's `scales` and `zeros` (and, optionally, the model's norm
weights and the linears' biases) are ordinary trainable parameters: a task adapter with no extra parameters and no
extra inference cost. `save_pretrained` afterwards writes the same packed format (the state-dict keys do not
change), so the result reloads and serves like any decoupleQ checkpoint.

Gradients flow through the PyTorch path of `DecoupleQLinear` (dequantize groupwise, then matmul): the module uses
it automatically whenever gradients are needed, on CPU and CUDA alike, so training needs no special kernel.
"""

from __future__ import annotations

import logging

from torch import nn

from .nn.linear import DecoupleQLinear

logger = logging.getLogger(__name__)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _as_parameter(module: nn.Module, name: str) -> None:
    """Turn the buffer `name` of `module` into a trainable parameter of the same name (state-dict key unchanged);
    nothing happens if it is no buffer (absent, None, or a parameter already)."""
    tensor = dict(module.named_buffers(recurse=False)).get(name)
    if tensor is None:
        return
    delattr(module, name)
    module.register_parameter(name, nn.Parameter(tensor.detach(), requires_grad=True))


def prepare_for_training(model: nn.Module, train_norms: bool = True, train_bias: bool = False) -> list[str]:
    """Freeze everything but the floating-point parts of the packed linears (and norms), in place.

    After this, a plain `transformers.Trainer` or a hand-written loop over `model.parameters()` trains the scales
    and zeros of every `DecoupleQLinear` (plus the norm weights if `train_norms`, plus the packed linears' biases if
    `train_bias`). Integer codes (`qweight`) never change.

    Returns:
        The names of the trainable parameters.
    """
    packed = [m for m in model.modules() if isinstance(m, DecoupleQLinear)]
    if not packed:
        raise ValueError("prepare_for_training needs a decoupleQ-quantized model (no DecoupleQLinear found)")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in packed:
        _as_parameter(module, "scales")
        _as_parameter(module, "zeros")
        if train_bias:
            _as_parameter(module, "bias")
    if train_norms:
        for module in model.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    logger.info("prepared %d trainable tensors (%d packed linears)", len(names), len(packed))
    return names
