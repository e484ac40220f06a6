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
from ..errors import DecoupleQDataError
from .capture import _input_device

logger = logging.getLogger(__name__)


def _skip_reason(model: nn.Module, config: DecoupleQConfig) -> tuple[int, str] | None:
    """`(log level, why)` when the stage does not run on this model with this config; None when it does."""
    if config.e2e_epochs <= 0:
        return logging.DEBUG, "e2e_epochs=0"
    if config.gguf_type is not None:
        # The stage trains scales and zeros freely; a gguf_type checkpoint must keep them on the GGUF grid.
        return logging.INFO, f"gguf_type={config.gguf_type!r} keeps scales and mins on the GGUF grid"
    if config.symmetric:
        # The stage trains each zero on its own; symmetric layers keep zeros = -scales * 2^(bits-1).
        return logging.INFO, "symmetric=True keeps each zero tied to its scale"
    if config.integer_zero:
        # Likewise an integer zero is an integer code times its scale.
        return logging.INFO, "integer_zero=True keeps each zero an integer code times its scale"
    reason = end_to_end_supported(model)
    if reason is not None:
        return logging.WARNING, reason
    return None


def end_to_end_windows(model: nn.Module, config: DecoupleQConfig, tokenizer: Any, windows: torch.Tensor) -> torch.Tensor:
    """The stage's calibration windows: `config.effective_e2e_samples` of them, drawn like `windows` (the block-wise
    stages' `num_samples`) with that count; `windows` itself when the stage does not run, for `dataset="self"`, or
    when the data holds fewer distinct windows (logged)."""
    wanted = config.effective_e2e_samples
    if _skip_reason(model, config) is not None or wanted == len(windows):
        return windows
    if wanted < len(windows):
        return windows[:wanted]
    from ..calibration.data import SELF_DATASET, get_calibration_windows

    if isinstance(config.dataset, str) and config.dataset == SELF_DATASET:
        logger.info("end-to-end stage: dataset=%r, so it trains on the %d sampled windows (e2e_samples=%d would "
                    "sample again)", SELF_DATASET, len(windows), wanted)  # fmt: skip
        return windows
    try:
        more = get_calibration_windows(
            config.dataset, tokenizer, num_samples=wanted, seq_len=config.seq_len, seed=config.seed, model=model,
            allow_repeats=False,
        )  # fmt: skip
    except DecoupleQDataError as exc:
        logger.info("end-to-end stage: %s; it trains on the %d block-wise windows instead of e2e_samples=%d", exc,
                    len(windows), wanted)  # fmt: skip
        return windows
    return more


def end_to_end_teacher(
    model: nn.Module, windows: torch.Tensor, config: DecoupleQConfig, batch_size: int,
    compute_dtype: torch.dtype | None,
) -> Teacher | None:  # fmt: skip
    """The full-precision model's outputs for the end-to-end stage, captured before any block changes; None when
    the stage is off or cannot run on this model (the log says why)."""
    skip = _skip_reason(model, config)
    if skip is not None:
        level, why = skip
        logger.log(level, "end-to-end stage skipped: %s", why)
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
    stats["windows"] = len(windows)  # likewise for e2e_samples=None
    return stats
