"""Packing: fake-quant layers become `DecoupleQLinear`s, and the packed block computes the next block's inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..integration import set_submodule
from ..nn.linear import DecoupleQLinear
from ..solver import FakeQuantLinear
from .capture import BlockInputs, _same
from .passes import _forward_all
from .replay import ChildReplay


def fake_from_packed(packed: DecoupleQLinear) -> FakeQuantLinear:
    """A `FakeQuantLinear` with exactly the packed module's codes, scales, zeros, bias (float32) and Hadamard
    signs (incoherence)."""
    bias = None if packed.bias is None else packed.bias.detach().float()
    return FakeQuantLinear(
        packed.unpacked_codes().contiguous(),
        packed.scales.detach().float().T,
        packed.zeros.detach().float().T,
        packed.effective_group_size,
        packed.bits,
        bias=bias,
        hadamard_signs=packed.hadamard_signs,
    )


def _same_fake(a: FakeQuantLinear, b: FakeQuantLinear) -> bool:
    return all(
        _same(x, y)
        for x, y in (
            (a.codes, b.codes),
            (a.scales.detach(), b.scales.detach()),
            (a.zeros.detach(), b.zeros.detach()),
            (None if a.bias is None else a.bias.detach().float(), None if b.bias is None else b.bias.detach()),
            (a.hadamard_signs, b.hadamard_signs),
        )
    )


def pack_block(
    block: nn.Module, fake: dict[str, FakeQuantLinear], originals: dict[str, nn.Linear], device: torch.device
) -> bool:
    """Swap each fake-quant layer of `block` for a `DecoupleQLinear` packed from it (in the dense layer's dtype).

    Returns True if every packed module holds exactly the fake-quant layer's values (codes, scales, zeros, bias,
    signs), i.e. a forward of the packed block computes what the fake-quant block computed."""
    same = True
    for name, fq in fake.items():
        original = originals[name]
        packed = DecoupleQLinear.from_linear(
            original, fq.to_result(), dtype=original.weight.dtype, hadamard_signs=fq.hadamard_signs
        )
        if fq.bias is not None and original.bias is not None:
            packed.bias.copy_(fq.bias.detach().to(packed.bias.dtype))
        packed = packed.to(device)
        set_submodule(block, name, packed)
        same = _same_fake(fq, fake_from_packed(packed)) and same
    return same


class _DenseLinear(nn.Module):
    """A packed layer as one dense float32 weight (the dequantized weight, any incoherence rotation folded in as
    `W_hat V`): the same math as `FakeQuantLinear.forward` without autograd, computed once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def forward_quantized_block(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> list[torch.Tensor]:
    """The next block's inputs: `block` run with each `DecoupleQLinear` as a float32 fake-quant copy of its packed
    tensors (one dense weight per layer instead of a dequantization per call). A freshly quantized block and one
    restored from a checkpoint give bit-identical outputs, since both are computed from the packed tensors."""
    if replay is not None and replay.final_outputs is not None:
        return replay.final_outputs
    packed = {name: m for name, m in block.named_modules() if isinstance(m, DecoupleQLinear)}
    for name, module in packed.items():
        fq = fake_from_packed(module)
        bias = None if fq.bias is None else fq.bias.detach()
        set_submodule(block, name, _DenseLinear(fq.effective_weight().detach(), bias))
    try:
        if replay is not None and replay.final_forward_ok:
            with replay.active(replay.upstream_all(), record=False):
                return _forward_all(block, inputs, device, compute_dtype=compute_dtype, replay=replay)
        return _forward_all(block, inputs, device, compute_dtype=compute_dtype)
    finally:
        for name, module in packed.items():
            set_submodule(block, name, module)
