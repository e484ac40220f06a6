"""Tile configurations and launch-shape heuristics of the Triton kernels (pure Python; no triton import).

Kept apart from the kernels so that the ahead-of-time sweep (:mod:`.aot`), the tests and the benchmarks enumerate
exactly the configurations a GPU autotunes over. A configuration is ``(meta, num_warps, num_stages)`` with ``meta``
the kernel's tile constexprs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "DECODE_BLOCK_N",
    "DECODE_CONFIGS",
    "DECODE_MAX_WEIGHTS_PER_THREAD",
    "DEQUANT_CONFIG",
    "GEMM_CONFIGS",
    "GEMM_M_BUCKETS",
    "INTERPRETER_DECODE_BLOCK_N",
    "INTERPRETER_DECODE_CONFIG",
    "INTERPRETER_GEMM_CONFIG",
    "MAX_DECODE_M",
    "TileConfig",
    "decode_configs",
    "decode_plan",
    "gemm_m_bucket",
    "hadamard_launch",
]


class TileConfig(NamedTuple):
    """One kernel configuration: tile constexprs plus Triton's ``num_warps`` / ``num_stages``."""

    meta: dict[str, Any]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        tiles = "_".join(f"{k}{v}" for k, v in self.meta.items())
        return f"{tiles}_w{self.num_warps}_s{self.num_stages}"


def _gemm(bm: int, bn: int, bk: int, warps: int, stages: int) -> TileConfig:
    return TileConfig({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, warps, stages)


# Prefill (M > MAX_DECODE_M): tensor-core tiles. BLOCK_K is a multiple of 32 (whole 3-bit blocks of codes). The full
# AOT sweep (examples/benchmarks/results/aot, 36 compilations per tile: sm_80/sm_90 x bits 2/3/4 x g 32/64/128 x
# fp16/bf16) found register spills in five earlier candidates (128x128x32 w4 in all 36, 128x256x64 w8 in 32,
# 64x128x128 w4 and 64x128x64 w4 in 24, 128x64x64 w4 in 12; up to 6004 and 8780 bytes of spill stores for the first
# two) and 128x256x64 / 64x128x128 over sm_80's shared memory in some: they are gone. The three kept never spill.
GEMM_CONFIGS = (
    _gemm(128, 128, 64, 8, 3),
    _gemm(64, 64, 64, 4, 4),
    _gemm(32, 64, 64, 4, 4),
)
# The CPU interpreter is slow and cannot benchmark: the autotuned launch uses one small tile there (tests run the GPU
# configurations above explicitly).
INTERPRETER_GEMM_CONFIG = TileConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, 4, 1)

# The prefill kernel is tuned per bucket of M (the smallest bucket >= M, else the last one). Few, wide buckets: a new
# bucket means one round of tuning (logged), and prompts of similar length share one.
GEMM_M_BUCKETS = (32, 128, 512, 2048)

# Decode (1 <= M <= MAX_DECODE_M): split-K over column tiles. BLOCK_N and the split are chosen together on the host
# (:func:`decode_plan`); BLOCK_K, warps and stages are autotuned among the candidates :func:`decode_configs` keeps.
MAX_DECODE_M = 16
DECODE_BLOCK_N = (64, 128)
# (BLOCK_K 64, 4 warps, 3 stages) was a candidate too: the full sweep (results/aot) found it spilling 40 bytes for a
# full W4 fp16 tile on sm_90 (2 of its 624 decode compilations), so it is gone.
DECODE_CONFIGS = (
    TileConfig({"BLOCK_K": 32}, 4, 4),
    TileConfig({"BLOCK_K": 64}, 8, 3),
    TileConfig({"BLOCK_K": 128}, 4, 3),
    TileConfig({"BLOCK_K": 128}, 8, 3),
)
# Weights per thread and K step. With one token every lane keeps its own fp32 products (reduced once after the
# loop), and each weight also holds a code and, off a group boundary, its scale and zero: past 32 weights per
# thread the registers (over 200 at 3 bits, ``python -m hf_decoupleq.kernels.aot``) leave too few warps per SM to
# hide the latency of a bandwidth-bound kernel, and a full decode tile starts to spill.
DECODE_MAX_WEIGHTS_PER_THREAD = 32
INTERPRETER_DECODE_CONFIG = TileConfig({"BLOCK_K": 32}, 4, 1)
INTERPRETER_DECODE_BLOCK_N = 32
# Each split owns at least this many columns of K; at most this many splits.
MIN_SPLIT_K_COLUMNS = 512
MAX_SPLIT_K = 16

# Dequantize: one fixed tile (a bandwidth-bound copy-like kernel).
DEQUANT_CONFIG = TileConfig({"BLOCK_K": 64, "BLOCK_N": 64}, 4, 1)

# Hadamard: float32 values one program keeps (rows x block); a 4096-wide block is one row per program.
HADAMARD_TILE_ELEMS = 4096
HADAMARD_MAX_ROWS = 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def gemm_m_bucket(m: int) -> int:
    """The autotuning bucket of the prefill kernel for ``m`` rows."""
    return next((b for b in GEMM_M_BUCKETS if m <= b), GEMM_M_BUCKETS[-1])


def decode_plan(n_out: int, k: int, num_sms: int) -> tuple[int, int]:
    """``(BLOCK_N, SPLIT_K)`` of the decode kernel for a ``[n_out, k]`` weight on a GPU with ``num_sms`` SMs.

    Decode reads every weight once, so it needs enough programs to keep all SMs streaming: about two per SM. Wide
    column tiles (128) when the columns alone give one program per two SMs, else 64-wide ones; then K is split
    until ``column tiles x splits`` reaches two programs per SM, each split keeping at least
    :data:`MIN_SPLIT_K_COLUMNS` columns of K.
    """
    wide, narrow = max(DECODE_BLOCK_N), min(DECODE_BLOCK_N)
    block_n = wide if 2 * _cdiv(n_out, wide) >= num_sms else narrow
    col_tiles = _cdiv(n_out, block_n)
    split = min(MAX_SPLIT_K, _cdiv(2 * num_sms, col_tiles), k // MIN_SPLIT_K_COLUMNS)
    return block_n, max(1, split)


def decode_configs(
    block_n: int, group_size: int, configs: tuple[TileConfig, ...] = DECODE_CONFIGS
) -> list[TileConfig]:
    """The decode candidates worth tuning for a column tile and an (effective) group size.

    Those within :data:`DECODE_MAX_WEIGHTS_PER_THREAD`; among them, if any, only those whose K step lies inside one
    group (``group_size % BLOCK_K == 0``: one scale row per step instead of per-weight scales).
    """
    fit = [c for c in configs if c.meta["BLOCK_K"] * block_n <= DECODE_MAX_WEIGHTS_PER_THREAD * 32 * c.num_warps]
    aligned = [c for c in fit if group_size % c.meta["BLOCK_K"] == 0]
    return aligned or fit or [min(configs, key=lambda c: c.meta["BLOCK_K"] * block_n / c.num_warps)]


def hadamard_launch(m: int, block: int, interpreter: bool = False) -> tuple[int, int]:
    """``(BLOCK_M, num_warps)`` of the Hadamard kernel for ``m`` rows and Hadamard block ``block``."""
    block_m = max(1, min(HADAMARD_MAX_ROWS, HADAMARD_TILE_ELEMS // block, _next_power_of_2(m)))
    num_warps = 1 if interpreter else (4 if block_m * block <= 2048 else 8)
    return block_m, num_warps
