"""The model-level run's setup and record: calibration windows, the resolved "auto" settings, the resume store,
and the statistics stored in the config."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import hardware
from ..config import AUTO, DecoupleQConfig
from ..nn.linear import DecoupleQLinear
from ..resume import ResumeStore, calibration_fingerprint
from .placement import _calibration_batch_size, _calibration_dtype, _compute_device

logger = logging.getLogger(__name__)


def _is_tokenized(dataset: Any) -> bool:
    if isinstance(dataset, torch.Tensor):
        return True
    if isinstance(dataset, dict) and "input_ids" in dataset:
        return True
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(x, torch.Tensor) for x in dataset):
        return True
    return hasattr(dataset, "keys") and "input_ids" in getattr(dataset, "keys", list)()


def calibration_windows(model: nn.Module, config: DecoupleQConfig, tokenizer: Any) -> tuple[torch.Tensor, Any]:
    """The seeded calibration windows `[num_samples, seq_len]` and the tokenizer that made them (None for a
    tokenized dataset). The tokenizer is `tokenizer`, else `config.tokenizer`, else the model's `name_or_path`."""
    from ..calibration.data import get_calibration_windows, resolve_tokenizer

    tok = tokenizer if tokenizer is not None else config.tokenizer
    needs_tokenizer = not _is_tokenized(config.dataset)
    if tok is None and needs_tokenizer:
        tok = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if needs_tokenizer:
        tok = resolve_tokenizer(tok)
    windows = get_calibration_windows(
        config.dataset,
        tok,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        model=model,
    )
    return windows, tok


def resolve_settings(
    config: DecoupleQConfig, model: nn.Module, first_block: nn.Module
) -> tuple[torch.dtype | None, int, dict[str, Any]]:
    """`(compute_dtype, batch_size, resolved)`: the "auto" settings, resolved once for the device the first block
    is solved on; `resolved` is their JSON form for the statistics and the resume fingerprint."""
    first_device = _compute_device(config, first_block)
    compute_dtype = _calibration_dtype(config, model, first_device)
    batch_size = _calibration_batch_size(config, model, first_device)
    resolved = {
        "batch_size": batch_size,
        "calibration_dtype": None if compute_dtype is None else str(compute_dtype).removeprefix("torch."),
    }
    logger.info(
        "calibration on %s: batch_size %d%s, calibration_dtype %s%s", hardware.describe_device(first_device), batch_size,
        " (auto)" if config.batch_size == AUTO else "", resolved["calibration_dtype"] or "the model's dtype",
        " (auto)" if config.calibration_dtype == AUTO else "",
    )  # fmt: skip
    return compute_dtype, batch_size, resolved


def _model_identity(model: nn.Module, num_blocks: int) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "")),
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_blocks": num_blocks,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def resume_store(
    config: DecoupleQConfig, model: nn.Module, num_blocks: int, resolved: dict[str, Any], windows: torch.Tensor,
    tok: Any,
) -> ResumeStore | None:  # fmt: skip
    """The checkpoint directory's store of finished blocks (None without `config.checkpoint_dir`)."""
    if config.checkpoint_dir is None:
        return None
    return ResumeStore(
        config.checkpoint_dir,
        fingerprint={**config.result_fingerprint(**resolved), **calibration_fingerprint(windows, tok)},
        model_id=_model_identity(model, num_blocks),
    )


def _state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict with tied tensors (e.g. embeddings shared with lm_head) counted once, as a
    checkpoint stores them. `keep_vars` returns the parameters themselves, so ties are found by identity (also for
    offloaded weights on the meta device)."""
    sizes = {id(t): t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values()}
    return sum(sizes.values())


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def record_summary(
    model: nn.Module,
    config: DecoupleQConfig,
    block_stats: list[dict[str, Any]],
    *,
    t_start: float,
    windows: torch.Tensor,
    original_bytes: int,
    resolved: dict[str, Any],
    e2e: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's statistics, stored in `config.quantization_stats`, and `config.packed_modules`."""
    summary = {
        "blocks": [
            {k: v for k, v in s.items() if k != "layers"} for s in block_stats
        ],
        "mean_layerwise_loss": _mean([s.get("layerwise_loss") for s in block_stats]),
        "seconds": round(time.perf_counter() - t_start, 2),
        "calibration_tokens": int(windows.numel()),
        "original_size_bytes": original_bytes,
        "batch_size": resolved["batch_size"],
        "calibration_dtype": resolved["calibration_dtype"],
        "base_model": str(getattr(model, "name_or_path", "") or "") or None,
    }
    if e2e is not None:
        summary["e2e"] = e2e
    config.quantization_stats = summary
    # The reload rebuilds exactly these (a linear the calibration never reached stays dense, and loads dense).
    config.packed_modules = [name for name, m in model.named_modules() if isinstance(m, DecoupleQLinear)]
    return summary
