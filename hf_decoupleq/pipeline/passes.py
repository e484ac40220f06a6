"""Calibration passes over one block: run it on every batch, and trace which linears read the same input."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from ..errors import DecoupleQNumericalError
from .capture import BlockInputs, StopForward
from .replay import ChildReplay

logger = logging.getLogger(__name__)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` for calibration forwards (None: compute in the weights' own dtype)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DecoupleQNumericalError(f"non-finite values (NaN/Inf) in {what}")


@torch.no_grad()
def _forward_all(
    block: nn.Module,
    inputs: BlockInputs,
    device: torch.device,
    keep: bool = True,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> list[torch.Tensor]:
    outputs = []
    for i, h in enumerate(inputs.hidden):
        if replay is not None:
            replay.current = i
        try:
            with _autocast(device, compute_dtype):
                out = _block_output(block(h.to(device), **inputs.kwargs_on(i, device)))
            out = out.to(h.dtype)
        except StopForward:
            continue
        if keep:
            outputs.append(out.detach().to("cpu"))
    return outputs


@torch.no_grad()
def discover_sequential_groups(
    block: nn.Module,
    linears: dict[str, nn.Module],
    inputs: BlockInputs,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    trace: list[str] | None = None,
) -> list[list[str]]:
    """Trace one forward and group linears that read the very same input tensor, in call order.

    For Llama this yields `[[q, k, v], [o], [gate, up], [down]]`; for OPT `[[q, k, v], [out], [fc1], [fc2]]`.
    If `trace` is given, it receives every linear call of that forward, in order (repeats included).
    """
    calls: list[tuple[str, int]] = []
    handles = []
    kept_alive = []

    def make_hook(name):
        def hook(module, args):
            kept_alive.append(args[0])  # keep the tensor alive so ids stay unique during the trace
            calls.append((name, id(args[0])))

        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        with _autocast(device, compute_dtype):
            block(inputs.hidden[0].to(device), **inputs.kwargs_on(0, device))
    finally:
        for h in handles:
            h.remove()
    if trace is not None:
        trace.extend(name for name, _ in calls)
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, input_id in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and input_id == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = input_id
    never_called = [n for n in linears if n not in seen]
    if never_called:
        logger.warning(
            "linears %s were not called by the block's forward; they stay dense (and reload dense)", never_called
        )
    return groups
