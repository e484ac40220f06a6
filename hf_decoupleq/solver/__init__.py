"""decoupleQ solver: pure torch (no transformers import).

- :class:`HessianAccumulator` streams ``H = X X^T / n`` for one linear layer.
- :func:`solve_layer` quantizes one weight against its ``H`` (``"rtn"``, ``"gptq"`` or ``"decoupleq"``) and returns
  a :class:`QuantResult` (codes, scales, zeros, per-row proxy loss).
- :class:`FakeQuantLinear` and :func:`refine_block` run the block-wise stage (Eq. 2).
"""

from .blockwise import BlockwiseResult, FakeQuantLinear, refine_block
from .hessian import HessianAccumulator, inverse_cholesky_upper
from .layerwise import METHODS, QuantResult, scale_zero_step, solve_layer
from .quant import SUPPORTED_BITS, clip_search, dequantize, minmax_params, row_losses, rtn_codes
from .rounding import GPTQFactor, coordinate_descent, gptq_round, prepare_gptq

__all__ = [
    "METHODS",
    "SUPPORTED_BITS",
    "BlockwiseResult",
    "FakeQuantLinear",
    "GPTQFactor",
    "HessianAccumulator",
    "QuantResult",
    "clip_search",
    "coordinate_descent",
    "dequantize",
    "gptq_round",
    "inverse_cholesky_upper",
    "minmax_params",
    "prepare_gptq",
    "refine_block",
    "row_losses",
    "rtn_codes",
    "scale_zero_step",
    "solve_layer",
]
