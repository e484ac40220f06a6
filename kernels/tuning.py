"""Autotuning around the kernels: Triton configs from :mod:`.configs`, a log line whenever a launch tunes, and
:func:`pretune` to do all of it before ``generate`` instead of in the middle of it.

Triton's autotuner benchmarks every configuration the first time it meets a new key (a new shape, or for prefill a
new bucket of M, :data:`~.configs.GEMM_M_BUCKETS`); that takes seconds. :func:`launch_tuned` logs each time it
happens, and the autotuners keep their results on disk (``cache_results``), so a later process reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import triton

from .configs import GEMM_M_BUCKETS, MAX_DECODE_M, TileConfig

logger = logging.getLogger(__name__)

__all__ = ["launch_tuned", "pretune", "triton_configs"]


def triton_configs(configs: Iterable[TileConfig]) -> list[triton.Config]:
    """``triton.Config`` objects for the autotuner."""
    return [triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


def launch_tuned(tuned: Any, grid: Any, args: dict[str, Any], name: str) -> None:
    """Launch an autotuned kernel; log when this launch had to tune (a key the autotuner had not seen)."""
    known = len(tuned.cache)
    start = time.perf_counter()
    tuned[grid](**args)
    if len(tuned.cache) > known:
        key = ", ".join(f"{k}={args[k]}" for k in tuned.keys if k in args)
        logger.info(
            "%s: tuned tiles for a new shape (%s, %s) in %.2f s -> %s; hf_decoupleq.kernels.tuning.pretune(model) "
            "does this before generation",
            name,
            key,
            args["x_ptr"].dtype,
            time.perf_counter() - start,
            tuned.best_config,
        )


def _packed_layers(model: torch.nn.Module) -> dict[tuple, torch.nn.Module]:
    """One module per distinct packed shape (what the autotuners key on)."""
    found: dict[tuple, torch.nn.Module] = {}
    for module in model.modules():
        if not all(hasattr(module, a) for a in ("qweight", "scales", "zeros", "bits", "effective_group_size")):
            continue
        key = (tuple(module.qweight.shape), module.bits, module.effective_group_size, module.in_features)
        found.setdefault(key, module)
    return found


@torch.no_grad()
def pretune(model: torch.nn.Module, dtype: torch.dtype | None = None, m_values: Iterable[int] | None = None) -> int:
    """Run every packed layer shape of ``model`` once for each row count in ``m_values``, so that the kernels tune
    now rather than in the middle of ``generate``; returns the number of launches.

    The default ``m_values`` reach every autotuning key: one token and a full decode tile (the two decode kernels)
    and one row count per prefill bucket. ``dtype`` (default: each layer's scales dtype) is the activation dtype.
    """
    import hf_decoupleq.kernels  # noqa: F401  (registers torch.ops.hf_decoupleq.*)

    m_values = tuple(m_values) if m_values is not None else (1, MAX_DECODE_M, *GEMM_M_BUCKETS)
    layers = _packed_layers(model)
    launches = 0
    for (_, bits, g, k), module in layers.items():
        act = dtype or module.scales.dtype
        for m in m_values:
            x = torch.zeros(m, k, dtype=act, device=module.qweight.device)
            torch.ops.hf_decoupleq.matmul(x, module.qweight, module.scales, module.zeros, bits, g, k)
            launches += 1
    logger.info("pretuned %d packed layer shapes at M in %s (%d launches)", len(layers), m_values, launches)
    return launches
