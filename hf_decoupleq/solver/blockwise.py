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
from .quant import dequantize, max_code, num_groups

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
        hadamard_signs: optional int8 ``[in]`` signs of an incoherence transform ``V`` (:mod:`hf_decoupleq.hadamard`):
            the codes then quantize ``W V^T`` and ``forward`` computes ``(x V^T) W_hat^T``, so the layer still
            approximates ``x W^T``. :meth:`dequantize` and :attr:`weight` stay in the rotated basis.
        symmetric: the zeros are tied to ``-2**(bits-1) * scales`` (the ``zeros`` parameter is then unused), so
            training keeps a symmetric layer symmetric (what ``Q4_0`` export needs).
        zero_codes: optional integer ``[out, G]`` (``integer_zero``): the zeros are tied to ``-zero_codes * scales``
            (the ``zeros`` parameter is then unused), so training keeps every zero an integer code times its scale.
        grid: a :class:`~hf_decoupleq.solver.kquant.KGrid`: ``scales``/``zeros`` are then latent values whose
            projection onto the k-quant grid (levels re-rounded against the grid's fixed super-scales) is what the
            layer computes with; gradients pass the rounding straight through. :meth:`snap_` writes the projection
            into the parameters.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bits: int,
        bias: torch.Tensor | None = None,
        hadamard_signs: torch.Tensor | None = None,
        symmetric: bool = False,
        grid: Any = None,
        zero_codes: torch.Tensor | None = None,
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
        self.scales = nn.Parameter(scales.detach().float().clone())
        self.zeros = nn.Parameter(zeros.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if hadamard_signs is None:
            self.hadamard_signs = None
        else:
            from ..hadamard import check_signs

            check_signs(hadamard_signs, in_features)
            self.register_buffer("hadamard_signs", hadamard_signs.detach().to(torch.int8).clone())
        self.symmetric = bool(symmetric)
        if zero_codes is None:
            self.zero_codes = None
        else:
            if symmetric or grid is not None:
                raise DecoupleQConfigError("zero_codes (integer zeros) cannot be combined with symmetric or a grid")
            if tuple(zero_codes.shape) != (out_features, ng):
                raise DecoupleQConfigError(
                    f"zero_codes has shape {tuple(zero_codes.shape)}, expected ({out_features}, {ng})"
                )
            if int(zero_codes.max()) > max_code(bits) or int(zero_codes.min()) < 0:
                raise DecoupleQConfigError(f"zero_codes lie outside [0, {max_code(bits)}] for bits={bits}")
            self.register_buffer("zero_codes", zero_codes.detach().to(torch.uint8).clone())
        if grid is not None and (grid.fmt.bits != bits or grid.fmt.group_size != group_size):
            raise DecoupleQConfigError(
                f"grid of {grid.fmt.ggml_type} (W{grid.fmt.bits} g{grid.fmt.group_size}) does not match bits={bits}, "
                f"group_size={group_size}"
            )
        self.grid = grid
        self._loss: torch.Tensor | None = None
        self._dense: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_result(
        cls, result: QuantResult, bias: torch.Tensor | None = None, hadamard_signs: torch.Tensor | None = None
    ) -> FakeQuantLinear:
        """Build from a :class:`QuantResult` (remembering its proxy loss for :meth:`to_result`)."""
        zero_codes = None
        if getattr(result, "integer_zero", False):
            zero_codes = torch.round(-result.zeros.float() / result.scales.float()).clamp_(0, max_code(result.bits))
        mod = cls(
            result.codes, result.scales, result.zeros, result.group_size, result.bits, bias=bias,
            hadamard_signs=hadamard_signs, symmetric=getattr(result, "symmetric", False),
            grid=getattr(result, "grid", None), zero_codes=zero_codes,
        )  # fmt: skip
        mod._loss = result.loss
        return mod

    def effective_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and zeros the layer computes with: the parameters, projected onto ``grid`` (straight-through)
        and with zeros tied to the scales when ``symmetric`` or with ``zero_codes``."""
        s, z = self.scales, self.zeros
        if self.grid is not None:
            ps, pz = self.grid.to(s.device).project(s.detach(), z.detach())
            s = s + (ps - s).detach()
            z = z + (pz - z).detach()
        if self.symmetric:
            z = s * -float(1 << (self.bits - 1))
        elif self.zero_codes is not None:
            z = -s * self.zero_codes.to(s.dtype)
        return s, z

    @torch.no_grad()
    def snap_(self) -> None:
        """Write :meth:`effective_scales_zeros` into the parameters (a no-op for a free, asymmetric layer)."""
        if self.grid is None and not self.symmetric and self.zero_codes is None:
            return
        s, z = self.effective_scales_zeros()
        self.scales.copy_(s)
        self.zeros.copy_(z)

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` ``[out, in]`` float32, differentiable in ``scales`` and ``zeros``."""
        s, z = self.effective_scales_zeros()
        return dequantize(self.codes, s, z, self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``module.weight``, e.g. its dtype or device)."""
        return self.dequantize()

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original input basis, ``W_hat V`` (just ``W_hat`` without incoherence): ``forward``
        computes ``x @ effective_weight().T``. Differentiable in ``scales`` and ``zeros``."""
        w = self.dequantize()
        if self.hadamard_signs is None:
            return w
        from ..hadamard import inverse_transform

        return inverse_transform(w, self.hadamard_signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled():
            rows = x.numel() // max(self.in_features, 1)
            if self.hadamard_signs is not None and rows < self.out_features:
                # Fewer activation rows than weight rows: rotating the input is the cheaper side.
                from ..hadamard import transform_input

                return F.linear(transform_input(x, self.hadamard_signs), self.dequantize().to(x.dtype), bias)
            # (x V^T) W_hat^T = x (W_hat V)^T: rotate the weight once instead of every activation row.
            return F.linear(x, self.effective_weight().to(x.dtype), bias)
        # Without autograd (calibration passes) the dense weight, rotation folded in, is reused until scales/zeros
        # change.
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in (self.scales, self.zeros, self.codes))
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, self.effective_weight().detach())
        return F.linear(x, self._dense[1].to(x.dtype), bias)

    def to_result(self) -> QuantResult:
        """The current state as a :class:`QuantResult`: same codes, current scales/zeros, the solver's old loss
        (NaN when unknown: the proxy loss is not recomputed here)."""
        loss = self._loss
        if loss is None:
            loss = torch.full((self.out_features,), math.nan, dtype=torch.float64)
        s, z = self.effective_scales_zeros()
        return QuantResult(
            codes=self.codes.clone(),
            scales=s.detach().float().clone(),
            zeros=z.detach().float().clone(),
            loss=loss,
            bits=self.bits,
            group_size=self.group_size,
            stats={"refined": True},
            symmetric=self.symmetric,
            grid=self.grid,
            integer_zero=self.zero_codes is not None,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"incoherence={self.hadamard_signs is not None}"
            + (", symmetric=True" if self.symmetric else "")
            + (", integer_zero=True" if self.zero_codes is not None else "")
            + (f", grid={self.grid.fmt.ggml_type}" if self.grid is not None else "")
        )


@dataclass(frozen=True)
class BlockwiseResult:
    """Outcome of :func:`refine_block`.

    Attributes:
        initial_loss: mean MSE over all batches before training (no grad).
        epoch_losses: mean training MSE of each epoch.
        final_loss: mean MSE over all batches after training (equal to ``initial_loss`` if restored).
        restored: training made things worse (or diverged) and the initial parameters were put back.
        outputs: with ``return_outputs=True`` and training kept, the block's outputs per batch (CPU, detached) from
            the final evaluation, i.e. the outputs of the trained block.
    """

    initial_loss: float
    epoch_losses: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    restored: bool = False
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)


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


def _split_kwargs(obj: Any, batch: int, start: int, stop: int) -> Any:
    if torch.is_tensor(obj):
        return obj[start:stop] if obj.dim() >= 2 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_split_kwargs(o, batch, start, stop) for o in obj)
    if isinstance(obj, list):
        return [_split_kwargs(o, batch, start, stop) for o in obj]
    if isinstance(obj, Mapping):
        return {key: _split_kwargs(v, batch, start, stop) for key, v in obj.items()}
    return obj


def _micro_batches(
    inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kwargs_list: Sequence[Any], size: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """(input, target, kwargs) per optimizer step: the batches themselves, or slices of `size` samples of each."""
    if size is None:
        return list(zip(inputs, targets, kwargs_list))
    out = []
    for x, t, kw in zip(inputs, targets, kwargs_list):
        n = x.shape[0]
        for start in range(0, n, size):
            stop = min(n, start + size)
            out.append((x[start:stop], t[start:stop], _split_kwargs(kw, n, start, stop) if n > size else kw))
    return out


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


def _sign_units(block: nn.Module, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """The step unit of each parameter for SignSGD: a group's quantization step for its scale and zero, the
    magnitude of the initial value for everything else (a tiny floor keeps exact zeros movable)."""
    units: dict[int, torch.Tensor] = {}
    for module in block.modules():
        if isinstance(module, FakeQuantLinear):
            step = module.scales.detach().abs().clone()
            units[id(module.scales)] = step
            units[id(module.zeros)] = step
    out = []
    for p in params:
        unit = units.get(id(p))
        if unit is None:
            mag = p.detach().abs()
            unit = mag.clamp_min(1e-3 * float(mag.mean()) if mag.numel() and float(mag.mean()) > 0 else 1e-8)
        out.append(unit)
    return out


class _SignSGD:
    """``p -= lr_t * unit * sign(grad)``, with ``lr_t`` decaying linearly from ``lr`` to 0 over ``total_steps``."""

    def __init__(self, params: Sequence[nn.Parameter], units: Sequence[torch.Tensor], lr: float, total_steps: int):
        self.params, self.units, self.lr = list(params), list(units), lr
        self.total, self.done = max(total_steps, 1), 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr_t = self.lr * (1.0 - self.done / self.total)
        for p, unit in zip(self.params, self.units):
            if p.grad is not None:
                p.addcmul_(unit, p.grad.sign(), value=-lr_t)
        self.done += 1


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
    autocast_dtype: torch.dtype | None = None,
    return_outputs: bool = False,
    micro_batch: int | None = None,
    initial_loss: float | None = None,
    optimizer: str = "adam",
) -> BlockwiseResult:
    """Minimize ``MSE(block(inputs), targets)`` over the block's scales, zeros and norms (Eq. 2), codes frozen.

    Args:
        block: a module called as ``block(hidden_states, **kwargs)`` whose linears to train are already
            :class:`FakeQuantLinear`; its output may be a tensor or a tuple (element 0 is used). It should hold
            float32 parameters: training runs in float32 and inputs are cast to it.
        inputs, targets: one ``[b, seq, hidden]`` tensor per calibration batch, anywhere (moved per batch).
        forward_kwargs: one dict for all batches, or one dict per batch (tensors inside are moved and cast).
        lr, weight_decay: Adam hyper-parameters (reference: lr 1e-5, 4 epochs). With ``optimizer="signsgd"``,
            ``lr`` is the relative step (AutoRound: 5e-3) and ``weight_decay`` must be 0.
        optimizer: ``"adam"`` (the paper) or ``"signsgd"`` (SignRound/AutoRound-style): each step moves every
            scale and zero by ``lr_t * |initial scale of its group|`` and every other parameter (norm weights,
            biases) by ``lr_t * |its initial value|``, against the sign of its gradient, with ``lr_t`` decaying
            linearly from ``lr`` to 0 over all steps.
        epochs: passes over the batches, in a seeded random order each epoch.
        train_norms: also train parameters of submodules whose class name contains "Norm".
        train_bias: also train parameters named ``bias``.
        seed: seeds the batch order (a private ``torch.Generator``).
        grad_clip: optional max gradient norm.
        autocast_dtype: run the block's forward (and so its backward) under ``torch.autocast`` to this dtype
            (e.g. bfloat16 on CPUs with native bf16 matmuls); parameters, optimizer state and the loss stay float32.
        micro_batch: take one optimizer step per this many samples: each batch is split along its first dimension
            (inputs, targets, and keyword tensors whose first dimension is the batch's), so the number of steps does
            not depend on how the calibration data was batched. ``None``: one step per batch.
        initial_loss: the loss before training, if the caller already knows it (skips one evaluation pass); it
            must be this function's own definition, the mean over batches of each batch's MSE.
        return_outputs: keep the block's outputs of the final evaluation in the result (saves a caller that needs
            them, like the next block's calibration inputs, one more forward pass).

    Returns:
        A :class:`BlockwiseResult`. The block is left with the trained parameters, or with the initial ones if
        training did not lower the loss. ``requires_grad`` flags and train/eval mode are restored.
    """
    kwargs_list = _check_refine_args(inputs, targets, forward_kwargs, epochs, lr, micro_batch, optimizer, weight_decay)
    steps = _micro_batches(inputs, targets, kwargs_list, micro_batch)
    params = _trainable(block, train_norms, train_bias)
    first_param = next(block.parameters(), None)
    device = first_param.device if first_param is not None else inputs[0].device
    objective = _Objective(block, inputs, targets, kwargs_list, device, autocast_dtype)
    flags = {id(p): p.requires_grad for p in block.parameters()}
    was_training = block.training
    snapshot = [p.detach().clone() for p in params]
    try:
        block.eval()  # no dropout: the objective is deterministic
        for p in block.parameters():
            p.requires_grad_(False)
        initial = objective.evaluate() if initial_loss is None else float(initial_loss)
        if not params or epochs == 0:
            return BlockwiseResult(initial_loss=initial, epoch_losses=[], final_loss=initial)
        for p in params:
            p.requires_grad_(True)
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = _SignSGD(params, _sign_units(block, params), lr=lr, total_steps=epochs * len(steps))
        epoch_losses, diverged = _train(objective, opt, params, steps, epochs=epochs, seed=seed, grad_clip=grad_clip)
        # Layers on a grid (k-quants) or with tied zeros (symmetric, integer zeros) trained latent values: store what
        # they compute.
        for module in block.modules():
            if isinstance(module, FakeQuantLinear):
                module.snap_()
        final_outputs: list[torch.Tensor] | None = [] if return_outputs else None
        final = math.inf if diverged else objective.evaluate(final_outputs)
        if final <= initial:
            logger.debug("block-wise refinement: loss %.4g -> %.4g", initial, final)
            return BlockwiseResult(
                initial_loss=initial, epoch_losses=epoch_losses, final_loss=final, outputs=final_outputs
            )
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
        logger.info(
            "block-wise refinement did not help (loss %.4g -> %s); restored the initial parameters",
            initial, "non-finite" if diverged else f"{final:.4g}",
        )  # fmt: skip
        return BlockwiseResult(initial_loss=initial, epoch_losses=epoch_losses, final_loss=initial, restored=True)
    finally:
        for p in block.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        block.train(was_training)


def _check_refine_args(
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    forward_kwargs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    epochs: int,
    lr: float,
    micro_batch: int | None,
    optimizer: str,
    weight_decay: float,
) -> list[Mapping[str, Any]]:
    """Validate :func:`refine_block`'s arguments; returns the keyword arguments of each batch."""
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
    if micro_batch is not None and not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise DecoupleQConfigError(f"micro_batch={micro_batch!r} must be None or an int >= 1")
    if optimizer not in ("adam", "signsgd"):
        raise DecoupleQConfigError(f"optimizer={optimizer!r} is not allowed: use 'adam' or 'signsgd'")
    if optimizer == "signsgd" and weight_decay:
        raise DecoupleQConfigError("weight_decay is an Adam setting; use weight_decay=0 with optimizer='signsgd'")
    return kwargs_list


class _Objective:
    """``MSE(block(x), t)`` of one batch (inputs cast to float32, optionally under autocast), and its mean over
    all batches."""

    def __init__(
        self,
        block: nn.Module,
        inputs: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        kwargs_list: Sequence[Mapping[str, Any]],
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.block, self.device, self.autocast_dtype = block, device, autocast_dtype
        self.batches = list(zip(inputs, targets, kwargs_list))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, Any], keep: list[torch.Tensor] | None = None):
        x_i, t_i, kw_i = batch
        x = x_i.to(device=self.device, dtype=torch.float32)
        kw = _to_device(kw_i, self.device)
        if self.autocast_dtype is None:
            out = _first(self.block(x, **kw)).float()
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                out = _first(self.block(x, **kw)).float()
        if keep is not None:
            keep.append(out.detach().to("cpu"))
        return F.mse_loss(out, t_i.to(device=self.device, dtype=torch.float32))

    def evaluate(self, keep: list[torch.Tensor] | None = None) -> float:
        """The mean over batches of each batch's MSE (no grad); `keep` receives the outputs."""
        with torch.no_grad():
            return sum(float(self.loss(batch, keep)) for batch in self.batches) / len(self.batches)


def _train(
    objective: _Objective,
    opt: Any,
    params: Sequence[nn.Parameter],
    steps: Sequence[tuple[torch.Tensor, torch.Tensor, Any]],
    *,
    epochs: int,
    seed: int,
    grad_clip: float | None,
) -> tuple[list[float], bool]:
    """``epochs`` passes over ``steps`` in a seeded random order, one optimizer step each. Returns the mean loss
    of each finished epoch and whether a non-finite loss stopped the training."""
    gen = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(steps), generator=gen).tolist():
                opt.zero_grad(set_to_none=True)
                loss = objective.loss(steps[i])
                if not torch.isfinite(loss):
                    return epoch_losses, True
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                total += float(loss.detach())
            epoch_losses.append(total / len(steps))
    return epoch_losses, False


__all__ = ["BlockwiseResult", "FakeQuantLinear", "refine_block"]
