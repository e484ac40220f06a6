"""The end-to-end stage's wiring into the run: capture the full-precision teacher before the first block changes,
train after the last one (the stage itself is `hf_decoupleq.e2e`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..config import DecoupleQConfig
from ..e2e import Teacher, capture_teacher, end_to_end_supported, train_end_to_end
from .capture import _input_device

logger = logging.getLogger(__name__)


def end_to_end_teacher(
    model: nn.Module, windows: torch.Tensor, config: DecoupleQConfig, batch_size: int,
    compute_dtype: torch.dtype | None,
) -> Teacher | None:  # fmt: skip
    """The full-precision model's outputs for the end-to-end stage, captured before any block changes; None when
    the stage is off or cannot run on this model (the log says why)."""
    if config.e2e_epochs <= 0:
        return None
    if config.gguf_type is not None:
        # The stage trains scales and zeros freely; a gguf_type checkpoint must keep them on the GGUF grid.
        logger.info("end-to-end stage skipped: gguf_type=%r keeps scales and mins on the GGUF grid", config.gguf_type)
        return None
    if config.symmetric:
        # The stage trains each zero on its own; symmetric layers keep zeros = -scales * 2^(bits-1).
        logger.info("end-to-end stage skipped: symmetric=True keeps each zero tied to its scale")
        return None
    reason = end_to_end_supported(model)
    if reason is not None:
        logger.warning("end-to-end stage skipped: %s", reason)
        return None
    t0 = time.perf_counter()
    teacher = capture_teacher(
        model, windows, batch_size=batch_size, compute_dtype=compute_dtype, device=_input_device(model)
    )
    logger.info("end-to-end stage: full-precision outputs of %d windows captured in %.1f s", len(windows),
                time.perf_counter() - t0)  # fmt: skip
    return teacher


def run_end_to_end(
    model: nn.Module, windows: torch.Tensor, teacher: Teacher | None, config: DecoupleQConfig,
    compute_dtype: torch.dtype | None,
) -> dict[str, Any] | None:  # fmt: skip
    """Train the quantized model's float parts against `teacher` (no-op without one); returns the stage's stats."""
    if teacher is None:
        return None
    lr = config.effective_e2e_lr
    stats = train_end_to_end(
        model, windows, teacher, epochs=config.e2e_epochs, lr=lr, norm_lr=lr, train_norms=config.train_norms,
        compute_dtype=compute_dtype, device=_input_device(model), seed=config.seed, relative=True,
    )  # fmt: skip
    stats["lr"] = lr  # the step actually used (config.json may record e2e_lr=None, the bit width's default)
    return stats
