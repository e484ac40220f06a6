"""Which decoupleQ layers vLLM's tensor parallelism can split, and how (pure Python: no vLLM import).

vLLM splits a column-parallel linear (including merged q/k/v and gate/up) along its output dimension ``N``: every
``[*, N]`` tensor of the packed format splits by columns, so any split vLLM itself accepts works. A row-parallel
linear (o_proj, down_proj) is split along its input dimension ``K``: rank ``r`` holds input columns
``[r K', (r + 1) K')`` with ``K' = K / tp``. That needs three boundaries to coincide with the rank boundary:

* a (scale, zero) group boundary: ``K' % group_size == 0`` (per-channel layers replicate their scales instead);
* an int32 packing unit: ``K' % codes_per_block(bits) == 0`` (16 codes at 2 bits, 32 at 3, 8 at 4, 4 at 8), so that
  each rank's rows of ``qweight`` are whole words holding exactly its codes;
* a Hadamard block (incoherence): ``K' % block_size(K) == 0``, so that ``x V^T`` is block-diagonal across ranks and
  each rank rotates its own slice of ``x`` with its slice of the signs.
"""

from __future__ import annotations

from ..errors import DecoupleQConfigError
from ..hadamard import block_size
from ..packing import codes_per_block, effective_group_size

__all__ = ["check_row_split", "row_split_problems"]


def row_split_problems(
    in_features: int, tp_size: int, bits: int, group_size: int, rotated: bool
) -> tuple[int | None, list[str]]:
    """``(K', reasons)``: the per-rank input size and why ``K`` cannot be split over ``tp_size`` ranks (empty if it
    can). ``group_size`` is the checkpoint's (``-1`` for per-channel); ``rotated``: the layer has Hadamard signs."""
    if tp_size < 1:
        raise DecoupleQConfigError(f"tensor-parallel size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return in_features, []
    if in_features % tp_size:
        return None, [f"K={in_features} is not a multiple of {tp_size}"]
    per_rank = in_features // tp_size
    reasons = []
    g = effective_group_size(in_features, group_size)
    if g < in_features and per_rank % g:
        reasons.append(f"{per_rank} is not a multiple of the group size {g}")
    unit = codes_per_block(bits)
    if per_rank % unit:
        reasons.append(f"{per_rank} is not a multiple of the {bits}-bit packing unit ({unit} codes per int32 block)")
    if rotated:
        b = block_size(in_features)
        if per_rank % b:
            reasons.append(f"{per_rank} is not a multiple of the Hadamard block ({b} for K={in_features})")
    return per_rank, reasons


def check_row_split(layer_name: str, in_features: int, tp_size: int, bits: int, group_size: int, rotated: bool) -> int:
    """Return ``K' = K / tp_size`` for a row-parallel layer, or raise `DecoupleQConfigError` naming the layer, ``K``,
    the group size, the bit width and the tensor-parallel degree when the split would cut a group, an int32 packing
    unit or a Hadamard block."""
    per_rank, reasons = row_split_problems(in_features, tp_size, bits, group_size, rotated)
    if reasons:
        share = "" if per_rank is None else f" ({per_rank} input columns per rank)"
        raise DecoupleQConfigError(
            f"decoupleQ layer {layer_name!r} (W{bits}, group_size={group_size}"
            f"{', incoherence' if rotated else ''}) cannot be split along its input dimension K={in_features} "
            f"over tensor_parallel_size={tp_size}{share}: {'; '.join(reasons)}. Use a tensor_parallel_size for which "
            f"K / tp is a multiple of these, or re-quantize with a smaller group size."
        )
    return per_rank
