"""The block-wise stage of decoupleQ (Eq. 2): with the codes frozen, train scales, zeros and norms of one block."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DecoupleQConfigError
from .layerwise import QuantResult
from .quant import max_code, num_groups

logger = logging.getLogger(__name__)


class FakeQuantLinear(nn.Module):
    """A linear layer whose weight is ``scales * codes + zeros`` groupwise, differentiable in scales and zeros.

    Args:
        codes: ``uint8 [out, in]`` integer codes (a frozen buffer).
        scales: ``[out, G]`` scales (trainable, stored float32).
        zeros: ``[out, G]`` zeros (trainable, stored float32).
        group_size: columns per group (``in`` for per-channel).
        bits: code width.
        bias: optional ``[out]`` bias, frozen by default (``requires_grad=False``).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bits: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if codes.dim() != 2:
            raise DecoupleQConfigError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        ng = num_groups(in_features, group_size)
        for label, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, ng):
                raise DecoupleQConfigError(
                    f"{label} has shape {tuple(t.shape)}, expected ({out_features}, {ng}) for codes "
                    f"{tuple(codes.shape)} and group_size={group_size}"
                )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise DecoupleQConfigError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        if int(codes.max()) > max_code(bits) or int(codes.min()) < 0:
            raise DecoupleQConfigError(f"codes lie outside [0, {max_code(bits)}] for bits={bits}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.bits = bits
        self.register_buffer("codes", codes.detach().to(torch.uint8).clone())
        self.register_buffer(
            "group_index", torch.arange(in_features, device=codes.device) // group_size, persistent=False
        )
        self.scales = nn.Parameter(scales.detach().float().clone())
        self.zeros = nn.Parameter(zeros.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._loss: torch.Tensor | None = None

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None = None) -> FakeQuantLinear:
        """Build from a :class:`QuantResult` (remembering its proxy loss for :meth:`to_result`)."""
        mod = cls(result.codes, result.scales, result.zeros, result.group_size, result.bits, bias=bias)
        mod._loss = result.loss
        return mod

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` ``[out, in]`` float32, differentiable in ``scales`` and ``zeros``."""
        idx = self.group_index
        return torch.addcmul(self.zeros[:, idx], self.scales[:, idx], self.codes.to(self.scales.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``module.weight``, e.g. its dtype or device)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def to_result(self) -> QuantResult:
        """The current state as a :class:`QuantResult`: same codes, current scales/zeros, the solver's old loss
        (NaN when unknown: the proxy loss is not recomputed here)."""
        loss = self._loss
        if loss is None:
            loss = torch.full((self.out_features,), math.nan, dtype=torch.float64)
        return QuantResult(
            codes=self.codes.clone(),
            scales=self.scales.detach().float().clone(),
            zeros=self.zeros.detach().float().clone(),
            loss=loss,
            bits=self.bits,
            group_size=self.group_size,
            stats={"refined": True},
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class BlockwiseResult:
    """Outcome of :func:`refine_block`.

    Attributes:
        initial_loss: mean MSE over all batches before training (no grad).
        epoch_losses: mean training MSE of each epoch.
        final_loss: mean MSE over all batches after training (equal to ``initial_loss`` if restored).
        restored: training made things worse (or diverged) and the initial parameters were put back.
    """

    initial_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    restored: bool = False


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; floating tensors become float32."""
    if torch.is_tensor(obj):
        obj = obj.to(device)
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, Mapping):
        return {key: _to_device(v, device) for key, v in obj.items()}
    return obj


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _trainable(block: nn.Module, train_norms: bool, train_bias: bool) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}
    for module in block.modules():
        if isinstance(module, FakeQuantLinear):
            params[id(module.scales)] = module.scales
            params[id(module.zeros)] = module.zeros
        if train_norms and "norm" in type(module).__name__.lower():
            for p in module.parameters():
                params[id(p)] = p
    if train_bias:
        for pname, p in block.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias":
                params[id(p)] = p
    return [p for p in params.values() if p.is_floating_point()]


def refine_block(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    forward_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    lr: float = 1e-5,
    epochs: int = 4,
    weight_decay: float = 0.0,
    train_norms: bool = True,
    train_bias: bool = False,
    seed: int = 0,
    grad_clip: float | None = None,
) -> BlockwiseResult:
    """Minimize ``MSE(block(inputs), targets)`` over the block's scales, zeros and norms (Eq. 2), codes frozen.

    Args:
        block: a module called as ``block(hidden_states, **kwargs)`` whose linears to train are already
            :class:`FakeQuantLinear`; its output may be a tensor or a tuple (element 0 is used). It should hold
            float32 parameters: training runs in float32 and inputs are cast to it.
        inputs, targets: one ``[b, seq, hidden]`` tensor per calibration batch, anywhere (moved per batch).
        forward_kwargs: one dict for all batches, or one dict per batch (tensors inside are moved and cast).
        lr, weight_decay: Adam hyper-parameters (reference: lr 1e-5, 4 epochs).
        epochs: passes over the batches, in a seeded random order each epoch.
        train_norms: also train parameters of submodules whose class name contains "Norm".
        train_bias: also train parameters named ``bias``.
        seed: seeds the batch order (a private ``torch.Generator``).
        grad_clip: optional max gradient norm.

    Returns:
        A :class:`BlockwiseResult`. The block is left with the trained parameters, or with the initial ones if
        training did not lower the loss. ``requires_grad`` flags and train/eval mode are restored.
    """
    nb = len(inputs)
    if nb == 0 or len(targets) != nb:
        raise DecoupleQConfigError(f"need as many targets as inputs (>0), got {nb} inputs and {len(targets)} targets")
    if isinstance(forward_kwargs, Sequence) and not isinstance(forward_kwargs, Mapping):
        if len(forward_kwargs) != nb:
            raise DecoupleQConfigError(f"forward_kwargs has {len(forward_kwargs)} dicts for {nb} batches")
        kwargs_list = list(forward_kwargs)
    else:
        kwargs_list = [forward_kwargs or {}] * nb
    if not (isinstance(epochs, int) and epochs >= 0):
        raise DecoupleQConfigError(f"epochs={epochs!r} must be an int >= 0")
    if not (lr > 0 and math.isfinite(lr)):
        raise DecoupleQConfigError(f"lr={lr!r} must be a positive finite float")

    params = _trainable(block, train_norms, train_bias)
    first_param = next(block.parameters(), None)
    device = first_param.device if first_param is not None else inputs[0].device
    flags = {id(p): p.requires_grad for p in block.parameters()}
    was_training = block.training
    snapshot = [p.detach().clone() for p in params]

    def batch_loss(i: int) -> torch.Tensor:
        x = inputs[i].to(device=device, dtype=torch.float32)
        kw = _to_device(kwargs_list[i], device)
        out = _first(block(x, **kw)).float()
        return F.mse_loss(out, targets[i].to(device=device, dtype=torch.float32))

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(batch_loss(i)) for i in range(nb)) / nb

    epoch_losses: list[float] = []
    restored = False
    try:
        block.eval()  # no dropout: the objective is deterministic
        for p in block.parameters():
            p.requires_grad_(False)
        initial = evaluate()
        if not params or epochs == 0:
            return BlockwiseResult(initial_loss=initial, epoch_losses=[], final_loss=initial)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        diverged = False
        with torch.enable_grad():
            for _ in range(epochs):
                total = 0.0
                for i in torch.randperm(nb, generator=gen).tolist():
                    opt.zero_grad(set_to_none=True)
                    loss = batch_loss(i)
                    if not torch.isfinite(loss):
                        diverged = True
                        break
                    loss.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    total += float(loss.detach())
                if diverged:
                    break
                epoch_losses.append(total / nb)
        final = math.inf if diverged else evaluate()
        if not final <= initial:
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
            logger.info(
                "block-wise refinement did not help (loss %.4g -> %s); restored the initial parameters",
                initial, "non-finite" if diverged else f"{final:.4g}",
            )  # fmt: skip
            final = initial
            restored = True
        else:
            logger.debug("block-wise refinement: loss %.4g -> %.4g", initial, final)
        return BlockwiseResult(initial_loss=initial, epoch_losses=epoch_losses, final_loss=final, restored=restored)
    finally:
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        block.train(was_training)


__all__ = ["BlockwiseResult", "FakeQuantLinear", "refine_block"]
