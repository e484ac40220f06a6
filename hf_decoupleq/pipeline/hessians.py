"""Hessian collection: one calibration pass over a block with hooks feeding one accumulator per sub-group."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..solver import HessianAccumulator
from .capture import BlockInputs, StopForward
from .passes import _forward_all
from .replay import ChildReplay


def _collect_hessians(
    block: nn.Module,
    linears: dict[str, nn.Module],
    groups: Sequence[Sequence[str]],
    inputs: BlockInputs,
    device: torch.device,
    *,
    block_name: str,
    keep_outputs: bool,
    stop_after: str | None,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
    quantized: set[str] | None = None,
) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor]]:
    """One pass over the calibration batches with hooks filling one accumulator per sub-group."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []

    for group in groups:
        first = group[0]
        # Per-batch X^T X in float32 (half the cost of float64 on CPU), summed over batches in float64.
        acc = HessianAccumulator(
            linears[first].in_features, device=device, name=f"{block_name}.{first}", matmul_dtype=torch.float32
        )
        for name in group:
            accs[name] = acc

        def hook(module, args, acc=acc):
            acc.add(args[0])  # non-finite batches are counted there and reported by hessian() with the layer name

        handles.append(linears[first].register_forward_pre_hook(hook))
    if stop_after is not None:

        def stop(module, args, output):
            raise StopForward

        handles.append(linears[stop_after].register_forward_hook(stop))
    try:
        with replay.active(quantized or set()) if replay is not None else contextlib.nullcontext():
            outputs = _forward_all(block, inputs, device, keep=keep_outputs, compute_dtype=compute_dtype, replay=replay)
    finally:
        for h in handles:
            h.remove()
    return accs, outputs
