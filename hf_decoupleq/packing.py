"""Packing of 2/3/4/8-bit decoupleQ codes into int32 words (pure torch, no transformers).

Bit layout (format versions 1 and 2; ``docs/format.md`` is the normative description)
------------------------------------------------------------------------------------
A layer ``y = x W^T`` with ``W`` of shape ``[out, in]`` (``N x K``) stores integer codes
``q[n, k]`` in ``[0, 2**bits - 1]``. Each output column ``n`` owns one *bit stream*: its codes
``q[n, 0], q[n, 1], ..., q[n, K-1]`` are concatenated least-significant-bit first, code ``k``
occupying stream bits ``[k * bits, (k + 1) * bits)``. The stream is cut into 32-bit words;
word ``r`` of column ``n`` is ``qweight[r, n]`` (int32, two's complement of the unsigned word).
So ``qweight`` is ``[rows, N]``, K-major like GPTQ: the words of one output column are a
column of ``qweight`` and a row of ``qweight`` (one word index, all outputs) is contiguous.

* bits 2, 4, 8: 16, 8, 4 codes per word, no code crosses a word boundary; this is exactly the
  GPTQ ``qweight`` layout (code ``k`` in word ``k // (32 // bits)`` at shift ``(k % (32 // bits)) * bits``).
* bits 3: 32 codes fill 3 words exactly (3.0 bits/weight, no waste). Codes 10 and 21 of each
  32-code block straddle two words (bits 30-32 and 63-65 of the 96-bit block), which costs a
  second (cached) word load for those codes in the kernels. The alternative, 10 codes per word
  with 2 bits unused, avoids that load but stores 3.2 bits/weight (6.7% more bytes to read in
  a memory-bound decode). We chose density.

``K`` is padded with zero codes to a whole block: 16/32/8/4 codes (1/3/1/1 words) for bits 2/3/4/8,
so ``rows = ceil(K / codes_per_block) * words_per_block``.

Scales and zeros are ``[ceil(K / g), N]`` in the model dtype, and
``W[n, k] = scales[k // g, n] * q[n, k] + zeros[k // g, n]`` (the last group may be shorter).
"""

from __future__ import annotations

import torch

from .errors import DecoupleQConfigError
from .format import (
    SUPPORTED_BITS,
    WORD_BITS,
    check_bits,
    codes_per_block,
    effective_group_size,
    num_groups,
    packed_rows,
    words_per_block,
)

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "codes_per_block",
    "effective_group_size",
    "num_groups",
    "pack",
    "packed_rows",
    "required_format_version",
    "unpack",
    "words_per_block",
]

# The newest format this library reads. 1: the layout above. 2: adds, for incoherence processing
# (`DecoupleQConfig.incoherence`), an int8 `hadamard_signs` tensor per layer and a weight stored in the rotated basis;
# a reader that does not know it would silently compute garbage, so such checkpoints are marked 2 (readers refuse
# versions they do not know). Checkpoints without it keep writing 1, which every reader understands. 3: same tensors as
# 2, but linears that read the same input (q/k/v, gate/up) share one rotation (identical signs), so an engine that
# runs them as one merged linear (vLLM) rotates each input once; version-2 signs are per layer.
FORMAT_VERSION = 3

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32)
_WORD_MASK = 0xFFFFFFFF


def required_format_version(incoherence: bool) -> int:
    """The format version a checkpoint is written with: 3 if its layers carry Hadamard signs (shared by the linears
    that read the same input), else 1."""
    return 3 if incoherence else 1


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[out, in]`` into ``qweight`` int32 ``[packed_rows(in, bits), out]``.

    Args:
        codes: integer tensor (any integer dtype) of shape ``[out, in]`` with values in ``[0, 2**bits - 1]``.
        bits: one of 2, 3, 4, 8.

    Returns:
        int32 tensor on the same device, laid out as described in this module's docstring.

    Raises:
        DecoupleQConfigError: unsupported ``bits``, non-integer dtype, not 2-D / empty, or codes out of range.
    """
    check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise DecoupleQConfigError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in _INTEGER_DTYPES:
        raise DecoupleQConfigError(f"codes dtype {codes.dtype} is not an integer dtype; allowed: {_INTEGER_DTYPES}")
    if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise DecoupleQConfigError(f"codes must be a non-empty 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi > (1 << bits) - 1:
        raise DecoupleQConfigError(f"codes range [{lo}, {hi}] is outside [0, {(1 << bits) - 1}] for bits={bits}")
    n_out, k = c.shape
    cpb, wpb = codes_per_block(bits), words_per_block(bits)
    n_blocks = -(-k // cpb)
    # Work K-major in int64 so shifts never overflow; zero-pad K to whole blocks.
    stream = torch.zeros(n_blocks * cpb, n_out, dtype=torch.int64, device=c.device)
    stream[:k] = c.T
    stream = stream.view(n_blocks, cpb, n_out)
    words = torch.zeros(n_blocks, wpb, n_out, dtype=torch.int64, device=c.device)
    for j in range(cpb):
        pos = j * bits
        w, sh = divmod(pos, WORD_BITS)
        words[:, w] |= (stream[:, j] << sh) & _WORD_MASK
        if sh + bits > WORD_BITS:  # straddling code (3 bits only): the high part goes to the next word
            words[:, w + 1] |= stream[:, j] >> (WORD_BITS - sh)
    words = words.view(n_blocks * wpb, n_out)
    # Reinterpret the unsigned 32-bit values as two's complement int32.
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


def unpack(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight`` int32 ``[rows, out]`` -> codes uint8 ``[out, in_features]``.

    Raises:
        DecoupleQConfigError: unsupported ``bits``, ``qweight`` not int32 2-D, or a row count that does not
            match ``packed_rows(in_features, bits)``.
    """
    check_bits(bits)
    rows = packed_rows(in_features, bits)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        got = qweight.dtype if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise DecoupleQConfigError(f"qweight must be an int32 tensor, got {got}")
    if qweight.dim() != 2 or qweight.shape[0] != rows or qweight.shape[1] < 1:
        raise DecoupleQConfigError(
            f"qweight shape {tuple(qweight.shape)} does not match in_features={in_features}, bits={bits}: "
            f"expected [{rows}, out]"
        )
    cpb, wpb = codes_per_block(bits), words_per_block(bits)
    n_out = qweight.shape[1]
    words = (qweight.to(torch.int64) & _WORD_MASK).view(rows // wpb, wpb, n_out)
    mask = (1 << bits) - 1
    out = torch.empty(rows // wpb, cpb, n_out, dtype=torch.int64, device=qweight.device)
    for j in range(cpb):
        pos = j * bits
        w, sh = divmod(pos, WORD_BITS)
        val = words[:, w] >> sh
        if sh + bits > WORD_BITS:
            val = val | (words[:, w + 1] << (WORD_BITS - sh))
        out[:, j] = val & mask
    return out.view(-1, n_out)[:in_features].T.to(torch.uint8).contiguous()
