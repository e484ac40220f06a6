"""`quantize_block`: the stages of one decoder block wired together (layer-wise solve, block-wise stage, packing)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoupleQConfig
from ..integration import find_linears, set_submodule
from ..solver import FakeQuantLinear, refine_block
from .capture import BlockInputs
from .hessians import _collect_hessians
from .pack import pack_block
from .passes import _check_finite, _forward_all, discover_sequential_groups
from .replay import ChildReplay
from .solve import solve_group

logger = logging.getLogger(__name__)


@dataclass
class _BlockWork:
    """What the stages of one block's quantization share: the block, its linears, the settings, and what the
    layer-wise stage produced so far (fake-quant layers by name, the dense layers they replaced, timers)."""

    block: nn.Module
    linears: dict[str, nn.Linear]
    config: DecoupleQConfig
    block_name: str
    device: torch.device
    compute_dtype: torch.dtype | None
    replay: ChildReplay | None
    stats: dict[str, Any]
    fake: dict[str, FakeQuantLinear] = field(default_factory=dict)
    originals: dict[str, nn.Linear] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=lambda: {"passes": 0.0, "solve": 0.0})

    def collect(self, groups: Sequence[Sequence[str]], inputs: BlockInputs, linears: dict[str, nn.Module], **kw):
        """`_collect_hessians` over this block, timed."""
        t_pass = time.perf_counter()
        out = _collect_hessians(
            self.block, linears, groups, inputs, self.device, block_name=self.block_name,
            compute_dtype=self.compute_dtype, **kw,
        )  # fmt: skip
        self.timing["passes"] += time.perf_counter() - t_pass
        return out

    def solve(self, group: Sequence[str], accs) -> None:
        """Solve `group` and swap its fake-quant layers into the block."""
        t_solve = time.perf_counter()
        solved = solve_group(
            self.linears, group, accs, self.config, block_name=self.block_name, device=self.device
        )  # fmt: skip
        for name, fq, mean_loss in solved:
            self.originals[name] = self.linears[name]
            self.fake[name] = fq
            set_submodule(self.block, name, fq)
            self.stats["layers"][name] = mean_loss
        self.timing["solve"] += time.perf_counter() - t_solve


def _layerwise_stage(
    work: _BlockWork, groups: list[list[str]], inputs: BlockInputs, need_targets: bool
) -> list[torch.Tensor]:
    """Solve every sub-group; returns the full-precision block outputs (block-wise targets) if `need_targets`."""
    config, linears = work.config, work.linears
    # Pass 1: full-precision outputs (block-wise targets) + the first sub-group's Hessian (or every sub-group's).
    first_groups = groups[:1] if config.true_sequential else groups
    # Without targets to keep, the first pass can stop as soon as the first sub-group has seen its input.
    stop_first = None if (need_targets or not config.true_sequential) else groups[0][-1]
    accs, targets = work.collect(first_groups, inputs, linears, keep_outputs=need_targets, stop_after=stop_first)
    for group in first_groups:
        work.solve(group, accs)
    if config.true_sequential:
        # Each later sub-group sees the earlier ones already quantized.
        for group in groups[1:]:
            live = {n: work.fake.get(n, linears[n]) for n in linears}
            live.update({n: linears[n] for n in group})
            accs, _ = work.collect(
                [group], inputs, live, keep_outputs=False, stop_after=group[-1], replay=work.replay,
                quantized=set(work.fake),
            )  # fmt: skip
            work.solve(group, accs)
    return targets


def _blockwise_stage(
    work: _BlockWork,
    inputs: BlockInputs,
    targets: list[torch.Tensor],
    param_dtypes: dict[str, torch.dtype],
    block_index: int,
) -> list[torch.Tensor] | None:
    """Train the block's scales, zeros and norms against `targets` (in float32; every parameter goes back to its
    own dtype afterwards). Returns the trained block's outputs when a replay asked for them."""
    block, config, device, replay = work.block, work.config, work.device, work.replay
    t_refine = time.perf_counter()
    orig_dtype = next(iter(param_dtypes.values()))
    initial_loss = None
    if replay is not None and orig_dtype == torch.float32:
        # The loss before training, with the recorded attention outputs replayed (refine_block would run the
        # whole block once more for it; this is the same computation, so the same number).
        with replay.active(set(work.fake), record=False):
            before = _forward_all(block, inputs, device, compute_dtype=work.compute_dtype, replay=replay)
        initial_loss = sum(float(F.mse_loss(o.float(), t.float())) for o, t in zip(before, targets)) / len(before)
        del before
    block.float()
    result = refine_block(
        block,
        inputs.hidden,
        targets,
        [inputs.kwargs_on(i, device) for i in range(len(inputs.hidden))],
        lr=config.effective_blockwise_lr,
        optimizer=config.blockwise_optimizer,
        epochs=config.blockwise_epochs,
        weight_decay=config.blockwise_weight_decay,
        train_norms=config.train_norms,
        seed=config.seed + block_index,
        autocast_dtype=work.compute_dtype,
        return_outputs=replay is not None,
        micro_batch=1,  # one Adam step per calibration window, whatever the forward batch size
        initial_loss=initial_loss,
    )
    for name, param in block.named_parameters():
        if name in param_dtypes:  # norms and other trained float parameters (not the fake-quant layers)
            param.data = param.data.to(param_dtypes[name])
    work.stats["blockwise_initial_mse"] = result.initial_loss
    work.stats["blockwise_final_mse"] = result.final_loss
    work.stats["seconds_blockwise"] = time.perf_counter() - t_refine
    logger.info("%s: block-wise MSE %.6g -> %.6g", work.block_name, result.initial_loss, result.final_loss)
    return result.outputs


def quantize_block(
    block: nn.Module,
    inputs: BlockInputs,
    config: DecoupleQConfig,
    *,
    block_name: str,
    block_index: int,
    skip: Sequence[str],
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    replay: ChildReplay | None = None,
) -> dict[str, Any]:
    """Quantize one decoder block in place (its linears become `DecoupleQLinear`). Returns per-block statistics.

    `compute_dtype` (from `_calibration_dtype`) autocasts the block's forwards; the solver is unaffected. A `replay`
    (see `ChildReplay`) is filled here and may be reused by `forward_quantized_block` afterwards."""
    t0 = time.perf_counter()
    # The block-wise stage trains in float32; every parameter goes back to its own dtype afterwards.
    param_dtypes = {name: p.dtype for name, p in block.named_parameters()}
    linears = find_linears(block, f"{block_name}.", skip)
    stats: dict[str, Any] = {"index": block_index, "layers": {}}
    if not linears:
        return stats
    for name, linear in linears.items():
        _check_finite(linear.weight, f"the weight of {block_name}.{name}")
    trace: list[str] = []
    groups = discover_sequential_groups(block, linears, inputs, device, compute_dtype, trace=trace)
    if replay is not None:
        replay.track(trace, len(inputs.hidden))
    work = _BlockWork(block, linears, config, block_name, device, compute_dtype, replay, stats)
    need_targets = config.blockwise and config.blockwise_epochs > 0
    targets = _layerwise_stage(work, groups, inputs, need_targets)
    stats["layerwise_loss"] = sum(stats["layers"].values()) / max(len(stats["layers"]), 1)
    stats["seconds_calibration_passes"] = work.timing["passes"]
    stats["seconds_solve"] = work.timing["solve"]
    refined_outputs = None
    if need_targets:
        refined_outputs = _blockwise_stage(work, inputs, targets, param_dtypes, block_index)
    del targets
    same = pack_block(block, work.fake, work.originals, device)
    if replay is not None:
        # The block-wise stage's final evaluation ran exactly the packed values (float32 models): its outputs are
        # the next block's inputs, bit for bit what forward_quantized_block would compute.
        if need_targets and same and refined_outputs is not None and next(block.parameters()).dtype == torch.float32:
            replay.final_outputs = refined_outputs
        # The recorded outputs came from these fake-quant layers; the next block's inputs are computed from the
        # packed ones (see forward_quantized_block), so replay there only if both give the very same weights.
        replay.final_forward_ok = not need_targets and same
    stats["seconds"] = time.perf_counter() - t0
    logger.debug(
        "%s: %.1f s (calibration passes %.1f s, solver %.1f s, block-wise %.1f s)", block_name, stats["seconds"],
        work.timing["passes"], work.timing["solve"], stats.get("seconds_blockwise", 0.0),
    )  # fmt: skip
    return stats
