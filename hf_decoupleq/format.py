"""The constants and arithmetic of the packed format, in one place (pure Python: no torch, no transformers).

``docs/format.md`` is the normative description. Everything that must agree between the writer
(:mod:`hf_decoupleq.packing`), the readers (:mod:`hf_decoupleq.kernels`, ``DecoupleQLinear``) and the rotation
(:mod:`hf_decoupleq.hadamard`) is defined here once:

* the bit layout: codes of ``bits`` bits, concatenated least-significant bit first per output column and cut into
  :data:`WORD_BITS`-bit words; ``K`` is padded to whole blocks of :func:`codes_per_block` codes in
  :func:`words_per_block` words (:func:`packed_rows` words per column);
* the group arithmetic: :func:`effective_group_size`, :func:`num_groups`, ``W[n, k] = s[k // g, n] * q[n, k] +
  z[k // g, n]``;
* the Hadamard block of incoherence processing: :func:`hadamard_block_size`, capped at :data:`MAX_HADAMARD_BLOCK`.
"""

from __future__ import annotations

import math

from .errors import DecoupleQConfigError

__all__ = [
    "MAX_HADAMARD_BLOCK",
    "SUPPORTED_BITS",
    "WORD_BITS",
    "check_bits",
    "code_mask",
    "codes_per_block",
    "effective_group_size",
    "hadamard_block_size",
    "num_groups",
    "packed_rows",
    "storage_bits",
    "words_per_block",
]

# Width of one packed word (``qweight`` is int32).
WORD_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 8)
# Cap on the Hadamard block. Mixing more columns spreads outliers further; past a few thousand the gain is small, and
# the Triton kernel keeps a whole block of a row in registers (4096 float32 values per row). Every dimension of common
# LLMs is a multiple of a power of two <= 4096 (SmolLM2: 576 = 64 * 9 -> b = 64, 1536 = 512 * 3 -> b = 512;
# Llama-2-7B: 4096 -> 4096, 11008 = 256 * 43 -> 256).
MAX_HADAMARD_BLOCK = 4096


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DecoupleQConfigError(f"{name}={value!r} must be a positive int")


def check_bits(bits: int) -> None:
    """Raise `DecoupleQConfigError` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise DecoupleQConfigError(f"bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}")


def storage_bits(bits: int) -> int:
    """The packed width that holds ``bits``-bit codes: ``bits`` itself if the format has it, else the next wider one
    (5-bit codes, the GGUF types Q5_0/Q5_1/Q5_K, are stored as 8-bit codes in ``[0, 31]``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= max(SUPPORTED_BITS):
        raise DecoupleQConfigError(f"bits={bits!r} is not supported; allowed: 1..{max(SUPPORTED_BITS)}")
    return min(b for b in SUPPORTED_BITS if b >= bits)


def code_mask(bits: int) -> int:
    """``2**bits - 1``: the largest code, and the mask that extracts one code from a shifted word."""
    check_bits(bits)
    return (1 << bits) - 1


def codes_per_block(bits: int) -> int:
    """Smallest number of codes that fills a whole number of words (16/32/8/4 for bits 2/3/4/8)."""
    check_bits(bits)
    return math.lcm(WORD_BITS, bits) // bits


def words_per_block(bits: int) -> int:
    """Number of words holding :func:`codes_per_block` codes (3 for 3 bits, 1 otherwise)."""
    check_bits(bits)
    return math.lcm(WORD_BITS, bits) // WORD_BITS


def packed_rows(in_features: int, bits: int) -> int:
    """Number of rows of ``qweight`` (words along the input dimension) for ``in_features`` codes."""
    _check_positive("in_features", in_features)
    return -(-in_features // codes_per_block(bits)) * words_per_block(bits)


def effective_group_size(in_features: int, group_size: int) -> int:
    """Group size in columns: ``in_features`` for per-channel (``-1``) or any ``group_size >= in_features``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise DecoupleQConfigError(f"group_size={group_size!r} must be -1 (per-channel) or a positive int")
    _check_positive("in_features", in_features)
    return in_features if group_size == -1 or group_size >= in_features else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in_features / g)`` with ``g`` the effective group size (rows of ``scales``/``zeros``)."""
    return -(-in_features // effective_group_size(in_features, group_size))


def hadamard_block_size(in_features: int, max_block: int = MAX_HADAMARD_BLOCK) -> int:
    """The Hadamard block ``b`` for input dimension ``K``: the largest power of two dividing ``K``, capped at
    ``max_block`` (1 for odd ``K``)."""
    _check_positive("in_features", in_features)
    return min(in_features & -in_features, max_block)
