"""What the machine offers, for the `"auto"` calibration settings: native bf16 matmuls and free memory.

`DecoupleQConfig(batch_size="auto", calibration_dtype="auto")` (the defaults) are resolved here once per run:

- **calibration dtype**: a float32 model is calibrated under bf16 autocast where the compute device multiplies
  bf16 natively (CUDA compute capability 8.0 or newer; x86 CPUs whose ``/proc/cpuinfo`` flags list ``avx512_bf16``
  or ``amx_bf16``); everywhere else, and for models already in 16 bits, in the model's own dtype. Emulated bf16
  (what oneDNN does on other AVX-512 CPUs) is slower than float32, so it is never chosen automatically.
- **batch size**: as many calibration windows per forward pass as fit in half of the memory left after the
  calibration activations the run keeps (estimated from the model config and ``seq_len``), at most
  `AUTO_MAX_BATCH_SIZE` and at most ``num_samples``; 1 when the free memory cannot be read.

Explicit values are never changed. Nothing here imports transformers; the functions take plain values so that
tests can substitute the probes (`native_bf16`, `free_memory_bytes`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_MAX_BATCH_SIZE",
    "activation_bytes_per_window",
    "auto_batch_size",
    "auto_calibration_dtype",
    "cpu_flags",
    "free_memory_bytes",
    "native_bf16",
]

# The batch the benchmarks use on a CPU (examples/benchmarks/bench_real_model.py); larger batches gain little there.
AUTO_MAX_BATCH_SIZE = 8
# Fraction of the free memory the calibration batches may take; the rest is headroom for the solver, the block-wise
# stage (one window at a time) and whatever else runs on the machine.
MEMORY_FRACTION = 0.5
# Live activations of one decoder-block forward, in units of seq_len * width * bytes: residual stream, norms, q/k/v,
# attention output and o_proj, the Hessian hook's float32 copy, autocast copies (hidden-sized); gate, up, the
# activation and their product (intermediate-sized). Deliberately generous: an estimate that is too large only costs
# a smaller batch.
_HIDDEN_TENSORS = 16
_INTERMEDIATE_TENSORS = 6
# Attention scores and probabilities ([heads, seq, seq] each) when the attention kernel materializes them.
_SCORE_TENSORS = 2
# Calibration activations kept for the whole run (block inputs, full-precision targets, next block's inputs).
_KEPT_HIDDEN_COPIES = 3
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (Linux; x86 ``flags`` or ARM ``Features``), empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA sm80+, x86 CPUs with AVX512-BF16 or AMX-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)
    return False


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (CPU: MemAvailable or psutil; CUDA: `torch.cuda.mem_get_info`), or
    None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    if available is not None:
        return available
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _config_int(model_config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def activation_bytes_per_window(model_config: Any, seq_len: int, element_size: int = 4) -> int:
    """Estimated peak bytes of one calibration window's activations in one decoder-block forward.

    Reads ``hidden_size``, the MLP width (``intermediate_size``, ``ffn_dim``, ``n_inner``; 4x hidden if absent) and
    ``num_attention_heads`` from a transformers model config (its text config for multimodal models).
    """
    model_config = getattr(model_config, "text_config", None) or model_config
    hidden = _config_int(model_config, "hidden_size", "d_model", "n_embd") or 4096
    inter = _config_int(model_config, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    heads = _config_int(model_config, "num_attention_heads", "n_head") or max(hidden // 64, 1)
    per_token = _HIDDEN_TENSORS * hidden + _INTERMEDIATE_TENSORS * inter
    return element_size * (seq_len * per_token + _SCORE_TENSORS * heads * seq_len * seq_len)


def auto_batch_size(
    model_config: Any, *, num_samples: int, seq_len: int, free_bytes: int | None, activations_on_device: bool
) -> int:
    """The `batch_size="auto"` choice: the largest batch whose activations fit in `MEMORY_FRACTION` of `free_bytes`
    (less the calibration activations the run keeps, when they live in that memory), between 1 and
    ``min(AUTO_MAX_BATCH_SIZE, num_samples)``; 1 when `free_bytes` is None.

    Args:
        model_config: the model's transformers config (sizes, see `activation_bytes_per_window`).
        num_samples, seq_len: the calibration windows.
        free_bytes: free memory of the compute device (`free_memory_bytes`).
        activations_on_device: whether the kept calibration activations use that same memory (CPU calibration).
    """
    if free_bytes is None:
        return 1
    budget = free_bytes
    if activations_on_device:
        hidden = _config_int(getattr(model_config, "text_config", None) or model_config, "hidden_size", "d_model")
        budget -= _KEPT_HIDDEN_COPIES * num_samples * seq_len * (hidden or 4096) * 4
    fits = int(MEMORY_FRACTION * max(budget, 0)) // activation_bytes_per_window(model_config, seq_len)
    return max(1, min(fits, AUTO_MAX_BATCH_SIZE, num_samples))


def auto_calibration_dtype(weight_dtypes: set[torch.dtype], device: torch.device) -> str | None:
    """The `calibration_dtype="auto"` choice: "bfloat16" for float32 weights on a device with native bf16 matmuls,
    else None (compute in the model's dtype)."""
    if weight_dtypes == {torch.float32} and native_bf16(device):
        return "bfloat16"
    return None


def describe_device(device: torch.device) -> str:
    """A short description for the log line that reports the resolved settings."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm{major}{minor})"
    if device.type == "cpu":
        bf16 = [f for f in _CPU_BF16_FLAGS if f in cpu_flags()]
        return f"CPU ({os.cpu_count()} cores{', ' + '/'.join(bf16) if bf16 else ', no native bf16'})"
    return str(device)
