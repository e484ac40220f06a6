"""`quantize_model`: the block-by-block decoupleQ loop (the only HF-aware orchestration).

For each decoder block, in order:
1. run the full-precision block on its (already quantized-path) inputs, keeping the outputs as block-wise
   targets and collecting the Hessian of the first sub-group of linears;
2. true-sequential sub-groups (linears that read the same input tensor, e.g. `[q, k, v]`, `o`, `[gate, up]`,
   `down`, discovered by tracing one forward): collect `H` with the earlier sub-groups already quantized, solve
   each linear with the layer-wise solver and swap in a differentiable fake-quant linear;
3. the block-wise stage trains scales, zeros and norm weights against the targets;
4. pack into `DecoupleQLinear` and run the packed block to produce the next block's inputs.

After the last block, the end-to-end stage (`end_to_end`, `hf_decoupleq.e2e`) trains the float parts of the whole
model against the full-precision model's outputs, captured before the first block changed.

Calibration activations stay on the CPU and move to the compute device one batch at a time, so peak
accelerator memory is about one block plus one batch.

The parts (see docs/architecture.md): `capture` (block inputs), `replay` (children's recorded outputs), `passes`
(calibration forwards, sub-group tracing), `hessians`, `solve` (the layer solve of one sub-group), `end_to_end` (the
end-to-end stage's wiring), `block` (the stages of one block wired together), `pack` (packing, next block's inputs),
`placement` (devices, offloading, "auto" settings), `run` (the run's setup and statistics). This module is the
model-level driver.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DecoupleQConfig
from ..integration import check_quantizable, find_decoder_blocks
from ..packing import required_format_version
from ..resume import ResumeStore
from ..solver.kquant import resolve_gguf_type
from .block import quantize_block
from .capture import BlockInputs, StopForward, capture_block_inputs
from .end_to_end import end_to_end_teacher, end_to_end_windows, run_end_to_end
from .hessians import _collect_hessians  # noqa: F401 (tests and benchmarks reach it here)
from .pack import fake_from_packed, forward_quantized_block, pack_block
from .passes import _check_finite, _forward_all, discover_sequential_groups  # noqa: F401 (as above)
from .placement import (  # noqa: F401 (_calibration_dtype, _compute_device: as above)
    _calibration_dtype,
    _compute_device,
    _home_device,
    _materialize_block,
    _place_back,
)
from .replay import ChildReplay
from .run import _state_bytes, calibration_windows, record_summary, resolve_settings, resume_store
from .solve import solve_group

logger = logging.getLogger(__name__)

__all__ = [
    "BlockInputs",
    "ChildReplay",
    "StopForward",
    "capture_block_inputs",
    "discover_sequential_groups",
    "fake_from_packed",
    "find_decoder_blocks",
    "forward_quantized_block",
    "pack_block",
    "quantize_block",
    "quantize_model",
    "solve_group",
]


def quantize_model(model: nn.Module, config: DecoupleQConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Calibrate and quantize `model` in place with decoupleQ; returns statistics (also stored in the config).

    Args:
        model: a transformers causal LM with full-precision weights loaded.
        config: the `DecoupleQConfig`; its calibration fields say which data to use.
        tokenizer: overrides `config.tokenizer` (which falls back to the model's `name_or_path`).
    """
    # The oldest format that can read the result: incoherent layers need readers that know `hadamard_signs`.
    config.format_version = required_format_version(config.incoherence)
    t_start = time.perf_counter()
    original_bytes = _state_bytes(model)
    prefix, blocks = find_decoder_blocks(model)
    skip = config.effective_modules_to_not_convert
    check_quantizable(model, skip)
    windows, tok = calibration_windows(model, config, tokenizer)
    compute_dtype, batch_size, resolved = resolve_settings(config, model, blocks[0])
    store = resume_store(config, model, len(blocks), resolved, windows, tok)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks, windows, batch_size)
        for h in inputs.hidden:
            _check_finite(h, "the calibration activations entering the first decoder block")
        e2e_windows = end_to_end_windows(model, config, tok, windows)
        teacher = end_to_end_teacher(model, e2e_windows, config, batch_size, compute_dtype)
        block_stats = _quantize_blocks(blocks, prefix, inputs, config, skip, compute_dtype, store)
        e2e = run_end_to_end(model, e2e_windows, teacher, config, compute_dtype)
    finally:
        model.train(was_training)
    return record_summary(
        model, config, block_stats, t_start=t_start, windows=windows, original_bytes=original_bytes, resolved=resolved,
        e2e=e2e,
    )


def _quantize_blocks(
    blocks: nn.ModuleList,
    prefix: str,
    inputs: BlockInputs,
    config: DecoupleQConfig,
    skip: list[str],
    compute_dtype: torch.dtype | None,
    store: ResumeStore | None,
) -> list[dict[str, Any]]:
    """Quantize (or restore from `store`) every block in order, each on the previous quantized block's outputs."""
    block_stats: list[dict[str, Any]] = []
    bar = tqdm(range(len(blocks)), desc="decoupleQ", unit="block")
    for index in bar:
        block = blocks[index]
        block_name = f"{prefix}.{index}" if prefix else str(index)
        home = _home_device(block)
        device = _compute_device(config, block)
        offloaded = _materialize_block(block, device, block_name)
        block.to(device)
        replay = ChildReplay(block, [], len(inputs.hidden))
        stats = _quantize_or_restore(block, inputs, config, store, block_name=block_name, block_index=index,
                                     skip=skip, device=device, compute_dtype=compute_dtype, replay=replay)  # fmt: skip
        block_stats.append(stats)
        if index + 1 < len(blocks):
            outputs = forward_quantized_block(block, inputs, device, compute_dtype=compute_dtype, replay=replay)
            del replay
            for out in outputs:
                _check_finite(out, f"the outputs of quantized {block_name}")
            inputs = inputs.for_block(index + 1, outputs)
        _place_back(block, home, device, offloaded)
        if "layerwise_loss" in stats:
            bar.set_postfix(loss=f"{stats['layerwise_loss']:.4g}")
    return block_stats


def _quantize_or_restore(
    block: nn.Module, inputs: BlockInputs, config: DecoupleQConfig, store: ResumeStore | None, **kwargs: Any
) -> dict[str, Any]:
    """`quantize_block` (saving the result to `store`), or the block as `store` saved it in an earlier run."""
    index = kwargs["block_index"]
    if store is not None and store.has(index):
        prefix = kwargs["block_name"]
        store.load_block(index, block, bits=config.bits, group_size=config.group_size,
                         gguf_type=lambda name: resolve_gguf_type(f"{prefix}.{name}", config.gguf_type,
                                                                  config.gguf_layer_types))  # fmt: skip
        logger.info("%s: restored from %s", kwargs["block_name"], config.checkpoint_dir)
        return store.stats(index)
    stats = quantize_block(block, inputs, config, **kwargs)
    if store is not None:
        store.save_block(index, block, stats)
    return stats
