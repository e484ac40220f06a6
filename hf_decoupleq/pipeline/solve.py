"""The layer solve: one true-sequential sub-group of linears, from its Hessian to fake-quant layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import DecoupleQConfig
from ..hadamard import has_transform, random_signs, transform_hessian, transform_weight
from ..solver import FakeQuantLinear, HessianAccumulator, solve_layer
from ..solver.kquant import resolve_gguf_type

logger = logging.getLogger(__name__)


def _solve_kwargs(config: DecoupleQConfig, full_name: str) -> dict[str, Any]:
    return {
        "bits": config.bits,
        "group_size": config.group_size,
        "method": config.method,
        "rounds": config.rounds,
        "act_order": config.act_order,
        "damp": config.damp,
        "symmetric": config.symmetric,
        "integer_zero": config.integer_zero,
        "gguf_type": resolve_gguf_type(full_name, config.gguf_type, config.gguf_layer_types),
    }


def _incoherence_signs(
    config: DecoupleQConfig, full_name: str, in_features: int, device: torch.device
) -> torch.Tensor | None:
    """The layer's Hadamard signs when `config.incoherence` (None otherwise, or for an odd `in_features`)."""
    if not config.incoherence:
        return None
    if not has_transform(in_features):
        logger.warning(
            "%s: in_features=%d is odd, so it has no Hadamard block; incoherence processing skips this layer",
            full_name, in_features,
        )  # fmt: skip
        return None
    return random_signs(in_features, config.seed, full_name, device=device)


def solve_group(
    linears: dict[str, nn.Linear],
    group: Sequence[str],
    accs: dict[str, HessianAccumulator],
    config: DecoupleQConfig,
    *,
    block_name: str,
    device: torch.device,
) -> list[tuple[str, FakeQuantLinear, float]]:
    """Solve every linear of `group` (linears that read the same input) against the group's Hessian.

    Returns `(name, fake-quant layer, mean proxy loss)` per linear, in the group's order."""
    H = accs[group[0]].hessian()
    # One rotation per input (format 3): the linears of a group read the same tensor, so they share the signs
    # drawn for the group's first layer, and the rotated Hessian V H V^T is computed once for all of them.
    signs = _incoherence_signs(config, f"{block_name}.{group[0]}", linears[group[0]].in_features, device)
    H_rot = None if signs is None else transform_hessian(H, signs)
    solved = []
    for name in group:
        linear = linears[name]
        weight, H_layer = linear.weight.detach().to(device), H
        if signs is not None:
            # Quantize W V^T against V H V^T; the proxy loss is the same as in the original basis, since V is
            # orthogonal.
            weight, H_layer = transform_weight(weight.float(), signs), H_rot
        full_name = f"{block_name}.{name}"
        result = solve_layer(weight, H_layer, name=full_name, **_solve_kwargs(config, full_name))
        bias = None if linear.bias is None else linear.bias.detach().to(device=device, dtype=torch.float32)
        fq = FakeQuantLinear.from_result(result, bias=bias, hadamard_signs=signs)
        mean_loss = float(result.loss.mean())
        logger.info("%s.%s: %s proxy loss %.6g", block_name, name, config.method, mean_loss)
        solved.append((name, fq, mean_loss))
    return solved
